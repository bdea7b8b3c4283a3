"""models/unpair_seg/model.py (UnpairSegS1) and official_style.py on the tiny config.

References, written here from the spec (not calls of the code under test): the normalisation and padding with the
spec's constants (§1, §7.1), the point -> +-2 px box rule (§7.2), the official grid formula, and the §7.3
post-processing composed in the test (second sigmoid, ALL masks upsampled, score filter, the literal official NMS
loop ``mmkernels.ops.mask_nms.reference.mask_nms_official``, square resize + crop) on the predictor's outputs.

On ties in the NMS: the official ``scores.sort(descending=True)`` is not stable, so tied scores have no defined order
there; mmkernels.mask_nms visits ties lowest index first. Where scores are distinct we compare against the official
unstable sort itself; where we create ties on purpose we compare against the same loop with ``stable=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.ops.mask_nms.reference import mask_nms_official
from models.unpair_seg import preprocess as pp
from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.model import UnpairSegS1
from models.unpair_seg.official_style import (dense_mask_nms, mask_pooling, official_postprocess,
                                              official_style_inference)

MEAN = torch.tensor([122.7709383, 116.7460125, 104.09373615]).view(1, 3, 1, 1)  # spec §1
STD = torch.tensor([68.5005327, 66.6321579, 70.32316305]).view(1, 3, 1, 1)
S = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UnpairSegS1(UnpairSegConfig.tiny(image_size=S)).eval()
    # Random-init heads give near-identical masks and IoU scores just below the 0.65 filter; spread them so that
    # the filter and the NMS both have work to do.
    with torch.no_grad():
        for k, t in m.sem_seg_head.predictor.state_dict().items():
            if t.is_floating_point() and "positional_encoding" not in k:
                t.copy_(torch.randn_like(t) * (0.2 if t.dim() > 1 else 0.1) + (1.0 if k.endswith("norm.weight") else 0))
        for head in m.sem_seg_head.predictor.iou_embed:
            head.layers[2].weight.mul_(10)
    return m


@contextlib.contextmanager
def configured(m, **changes):
    """Inference-only fields (chunking, thresholds) read from ``m.cfg`` at call time; restored afterwards."""
    old = m.cfg
    m.cfg = dataclasses.replace(old, **changes)
    try:
        yield m
    finally:
        m.cfg = old


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _grid_ref(n_x, n_y, h, w, size):
    """The official prepare_points, written from the spec: int sizes (W-1, H-1), float32 ratio (size-1)/max."""
    sizes = torch.tensor([w - 1, h - 1])
    scaled = sizes * ((size - 1.0) / sizes.amax())
    ox, oy = 1 / (2 * n_x), 1 / (2 * n_y)
    gx, gy = torch.meshgrid(torch.linspace(ox, 1 - ox, n_x), torch.linspace(oy, 1 - oy, n_y), indexing="xy")
    return torch.stack([gx, gy], -1).reshape(-1, 2) * scaled


def _spec_inference(m, entry, kind, prompts):
    """Spec §7.3 on the predictor's outputs of all prompts in one pass: (proposals, scores, flat indices)."""
    cfg = m.cfg
    h, w = entry["height"], entry["width"]
    with torch.no_grad():
        mf, ms = m.image_features(entry["image"][None])
        boxes = prompts if kind == "box" else torch.cat([prompts - 2.0, prompts + 2.0], -1)
        out = m.sem_seg_head.predictor(ms, mf, boxes[None], kind)
        masks = out["pred_masks"].flatten(1, 2)
        ious = out["pred_ious"].flatten(1, 2).sigmoid()[0]
        up = F.interpolate(masks, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)[0]
        idx = torch.nonzero(ious >= cfg.score_threshold).squeeze(1)
        order = mask_nms_official(up[idx], ious[idx], iou_threshold=cfg.nms_iou,
                                  coverage_threshold=cfg.nms_coverage, downsample=cfg.nms_downsample)
        idx = idx[order]
        side = max(h, w)
        prop = F.interpolate(up[idx][None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return prop[:, :h, :w], ious[idx], idx


def _same(a, b, atol=1e-5):
    assert a["proposal"].shape == b["proposal"].shape
    assert torch.equal(a["prompt_index"], b["prompt_index"]) and torch.equal(a["mask_index"], b["mask_index"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a["proposal"], b["proposal"], rtol=1e-5, atol=atol)


def _blob_masks(n, size, seed, groups=8):
    """Logits [n, size, size] of smooth blobs: masks of one group are nested level sets of a shared field (so IoU
    and coverage both land on either side of the thresholds), plus a little per-mask texture."""
    g = torch.Generator().manual_seed(seed)
    fields = F.interpolate(torch.randn(groups, 1, 5, 5, generator=g) * 3, size=(size, size), mode="bilinear",
                           align_corners=False)[:, 0]
    which = torch.randint(0, groups, (n,), generator=g)
    shift = torch.randn(n, 1, 1, generator=g) * 1.5 - 2.0
    texture = F.interpolate(torch.randn(n, 1, 9, 9, generator=g), size=(size, size), mode="bilinear",
                            align_corners=False)[:, 0] * 0.3
    return fields[which] + shift + texture


# ---------------------------------------------------------------------------------------------------------------------
# image path and decoding


def test_preprocess_and_features_vs_manual(model):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 100, 120), generator=g, dtype=torch.uint8)
    x = model.preprocess_images(images)
    ref = F.pad((images.float() - MEAN) / STD, (0, 8, 0, 28), value=0.0)  # zero pad to 128 x 128 (multiple of 32)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 128, 128)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.preprocess_images(images.float()), x, rtol=0, atol=0)
    mf, ms = model.image_features(images)
    assert mf.shape == (2, 32, 32, 32) and [t.shape for t in ms] == [(2, 32, 4, 4), (2, 32, 8, 8), (2, 32, 16, 16)]
    with torch.no_grad():
        rmf, _, rms = model.sem_seg_head.pixel_decoder.forward_features(model.backbone.extract_features(ref))
    torch.testing.assert_close(mf, rmf, rtol=0, atol=0)
    for a, b in zip(ms, rms):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_points_and_boxes(model):
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 3, S, S), generator=g, dtype=torch.uint8)
    points = torch.rand(2, 5, 2, generator=g) * S
    with torch.no_grad():
        out = model(images=images, prompts=points, prompt_type="point")
        mf, ms = model.image_features(images)
        x, y = points[..., 0], points[..., 1]
        ref = model.sem_seg_head.predictor(ms, mf, torch.stack([x - 2, y - 2, x + 2, y + 2], -1), "point")
    assert out["pred_masks"].shape == (2, 5, 4, 32, 32) and out["pred_ious"].shape == (2, 5, 4)
    assert len(out["aux_outputs"]) == model.cfg.dec_layers - 1
    assert all(a["pred_masks"].shape == (2, 5, 4, 32, 32) for a in out["aux_outputs"])
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=0, atol=0)
    torch.testing.assert_close(out["pred_ious"], ref["pred_ious"], rtol=0, atol=0)
    xy = torch.rand(2, 3, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(2, 3, 2, generator=g) * 28], -1)
    with torch.no_grad():
        out = model(images=images, prompts=boxes, prompt_type="box")
        ref = model.sem_seg_head.predictor(ms, mf, boxes, "box")
    assert out["pred_masks"].shape == (2, 3, 1, 32, 32) and out["pred_ious"].shape == (2, 3, 1)
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=0, atol=0)
    # training needs gradients through the heads (the backbone is frozen)
    out = model(images=images[:1], prompts=points[:1, :2], prompt_type="point")
    out["pred_masks"].sum().backward()
    assert model.sem_seg_head.predictor.mask_embed[1].layers[0].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    model.zero_grad(set_to_none=True)


def test_forward_several_prompt_types_shares_the_encoder(model):
    """prompts={"point": P, "box": B}: each output equals its single-type call, and the gradients of a loss on both
    equal the sum of the two single-type calls' gradients (the pixel decoder's included)."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 3, S, S), generator=g, dtype=torch.uint8)
    points = torch.rand(2, 3, 2, generator=g) * S
    xy = torch.rand(2, 2, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 2, 2, generator=g) * 30], -1)
    w = {k: torch.randn(shape, generator=g) for k, shape in (("point", (2, 3, 4, 32, 32)), ("box", (2, 2, 1, 32, 32)))}
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    both = model(images=images, prompts={"point": points, "box": boxes})
    assert set(both) == {"point", "box"}
    got = grads(sum((both[k]["pred_masks"] * w[k]).sum() + both[k]["pred_ious"].sum() for k in both))
    want = None
    for kind, p in (("point", points), ("box", boxes)):
        one = model(images=images, prompts=p, prompt_type=kind)
        torch.testing.assert_close(both[kind]["pred_masks"], one["pred_masks"], rtol=0, atol=0)
        torch.testing.assert_close(both[kind]["pred_ious"], one["pred_ious"], rtol=0, atol=0)
        gk = grads((one["pred_masks"] * w[kind]).sum() + one["pred_ious"].sum())
        want = gk if want is None else [a + b for a, b in zip(want, gk)]
    model.zero_grad(set_to_none=True)
    pixel = [i for i, (n, p) in enumerate(n_p for n_p in model.named_parameters() if n_p[1].requires_grad)
             if n.startswith("sem_seg_head.pixel_decoder")]
    assert pixel and any(float(got[i].abs().sum()) > 0 for i in pixel)
    for a, b in zip(got, want):  # fp32 sums in another order: tolerance relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))
    with pytest.raises(ValueError, match="prompt types"):
        model(images=images, prompts={"mask": points})
    with pytest.raises(ValueError, match="prompt types"):
        model(images=images, prompts={})


# ---------------------------------------------------------------------------------------------------------------------
# official inference


def test_grid_inference_matches_spec_composition(model):
    img = _image(96, 128, seed=5)
    entry = pp.prepare(img, S)
    res = model([entry])[0]  # 64 grid prompts in chunks of points_per_batch = 16
    grid = _grid_ref(8, 8, 96, 128, S)
    torch.testing.assert_close(pp.point_grid(8, 8, 96, 128, S), grid, rtol=0, atol=0)
    prop, scores, idx = _spec_inference(model, entry, "point", grid)
    assert 2 <= prop.shape[0] < 64 * 4  # the filter and the NMS both removed and kept some
    assert res["proposal"].shape == prop.shape == (prop.shape[0], 96, 128)
    assert torch.equal(res["prompt_index"], idx // 4) and torch.equal(res["mask_index"], idx % 4)
    torch.testing.assert_close(res["scores"], scores, rtol=0, atol=0)
    torch.testing.assert_close(res["proposal"], prop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["points"], grid[idx // 4], rtol=0, atol=0)
    assert bool((res["scores"][:-1] >= res["scores"][1:]).all())


def test_batch_of_two_equals_singles(model):
    e1 = pp.prepare(_image(96, 128, seed=6), S)
    e2 = pp.prepare(_image(128, 80, seed=7), S)
    e2["points"] = torch.rand(9, 2, generator=torch.Generator().manual_seed(8)) * torch.tensor([80.0, 128.0])
    with configured(model, score_threshold=0.6):
        both = model([e1, e2])
        singles = [model([e1])[0], model([e2])[0]]
    assert len(both) == 2 and both[1]["proposal"].shape[1:] == (128, 80)
    for a, b in zip(both, singles):
        assert a["proposal"].shape[0] > 0
        _same(a, b, atol=1e-4)


@pytest.mark.parametrize("prompt_type", ["point", "box"])
def test_chunk_size_invariance(model, prompt_type):
    entry = pp.prepare(_image(96, 128, seed=9), S)
    if prompt_type == "box":
        xy = torch.rand(20, 2, generator=torch.Generator().manual_seed(10)) * 90
        entry["boxes"] = torch.cat([xy, xy + 5 + torch.rand(20, 2) * 30], -1)
    runs = []
    for chunk in (1, 7, 1000):
        with configured(model, points_per_batch=chunk, score_threshold=0.6, nms_iou=0.8, nms_coverage=0.9):
            runs.append(model([entry])[0])
    assert runs[0]["proposal"].shape[0] >= 3
    for other in runs[1:]:
        _same(runs[0], other)


def test_filter_first_equals_official_on_random_outputs(model):
    pm = _blob_masks(150, 32, seed=11)  # > UPSAMPLE_CHUNK pass the filter: the chunked NMS input is exercised
    pi = 0.6 + 0.4 * torch.rand(150, generator=torch.Generator().manual_seed(12))
    for h, w in ((96, 128), (128, 50), (128, 128)):
        ours = model.postprocess(pm, pi, h, w)
        ref = official_postprocess(pm, pi, h, w, model.cfg)  # distinct scores: the unstable sort is unambiguous
        assert ours["proposal"].shape[0] >= 2
        assert torch.equal(ours["indices"], ref["indices"])
        torch.testing.assert_close(ours["scores"], ref["scores"], rtol=0, atol=0)
        torch.testing.assert_close(ours["proposal"], ref["proposal"], rtol=1e-6, atol=1e-6)
        assert int((pi.sigmoid() >= 0.65).sum()) > 64
    none = model.postprocess(pm, torch.zeros(150), 96, 128)  # sigmoid(0) = 0.5 < 0.65: nothing passes
    assert none["proposal"].shape == (0, 96, 128) and none["indices"].numel() == 0
    assert official_postprocess(pm, torch.zeros(150), 96, 128, model.cfg)["proposal"].shape == (0, 96, 128)


def test_model_equals_official_style_inference(model):
    entries = [pp.prepare(_image(96, 128, seed=13), S), pp.prepare(_image(70, 128, seed=14), S)]
    xy = torch.rand(6, 2, generator=torch.Generator().manual_seed(15)) * 60
    entries[1]["boxes"] = torch.cat([xy, xy + 20], -1)
    with configured(model, score_threshold=0.6):
        ours = model(entries)
        ref = official_style_inference(model, entries, stable=True)
    assert ours[0]["proposal"].shape[0] > 0 and "boxes" in ours[1] and "boxes" in ref[1]
    for a, b in zip(ours, ref):
        _same(a, b)
        key = "boxes" if "boxes" in a else "points"
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_nms_equals_dense_official_nms(seed):
    masks = _blob_masks(80, 64, seed=100 + seed)
    g = torch.Generator().manual_seed(200 + seed)
    distinct = torch.randperm(80, generator=g).float() / 80 + 0.5
    kept = mmkernels.mask_nms(masks, distinct, iou_threshold=0.5, coverage_threshold=0.7, combine="or", downsample=2)
    ref = dense_mask_nms(masks, distinct, 0.5, 0.7, downsample=0.5)
    assert 3 <= kept.numel() < 80
    assert torch.equal(kept, ref)
    # ties: 4 score values for 80 masks; compared with the official loop visiting ties lowest index first
    tied = torch.tensor([0.6, 0.65, 0.7, 0.72])[torch.randint(0, 4, (80,), generator=g)]
    kept = mmkernels.mask_nms(masks, tied, iou_threshold=0.5, coverage_threshold=0.7, combine="or", downsample=2)
    assert torch.equal(kept, dense_mask_nms(masks, tied, 0.5, 0.7, downsample=0.5, stable=True))
    # and a hand-written greedy walk over the spec's formulas (descending score, then index)
    order = sorted(range(80), key=lambda i: (-float(tied[i]), i))
    small = F.avg_pool2d(masks[:, None], 2)[:, 0].reshape(80, -1).sigmoid() >= 0.5
    inter = (small[:, None, :] & small[None, :, :]).sum(-1).double()
    area = small.sum(-1).double()
    alive, walk = set(order), []
    for i in order:
        if i not in alive:
            continue
        walk.append(i)
        for j in list(alive):
            if j == i:
                continue
            iou = (inter[i, j] + 1e-6) / (area[i] + area[j] - inter[i, j] + 1e-6)
            cov = (inter[i, j] + 1e-6) / (area[j] + 1e-6)
            if iou >= 0.5 or cov >= 0.7:
                alive.discard(j)
        alive.discard(i)
    assert kept.tolist() == walk


def test_box_prompts_and_predict_in_original_pixels(model):
    img = _image(100, 128, seed=16)
    boxes = torch.tensor([[5.0, 5.0, 60.0, 50.0], [40.0, 30.0, 120.0, 95.0], [0.0, 0.0, 127.0, 99.0]])
    with configured(model, score_threshold=0.5):
        res = model.predict(img, boxes=boxes)
        entry = pp.prepare(img, S)
        canvas = pp.to_canvas(boxes, 100, 128, S)
        entry["boxes"] = canvas
        prop, scores, idx = _spec_inference(model, entry, "box", canvas)
    assert res["proposal"].shape == (prop.shape[0], 100, 128) and prop.shape[0] >= 1
    assert torch.equal(res["mask_index"], torch.zeros_like(res["mask_index"]))
    assert torch.equal(res["prompt_index"], idx)
    torch.testing.assert_close(res["proposal"], prop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["boxes"], boxes[idx], rtol=1e-6, atol=1e-4)  # back in original pixels
    assert res["masks"].dtype == torch.bool and torch.equal(res["masks"], res["proposal"].sigmoid() >= 0.5)
    points = torch.tensor([[10.0, 20.0], [100.0, 80.0]])
    with configured(model, score_threshold=0.5):
        res = model.predict(img, points=points)
        gres = model.predict(img, grid=(3, 2))
    assert res["proposal"].shape[0] >= 1 and set(res["mask_index"].tolist()) <= {0, 1, 2, 3}
    torch.testing.assert_close(res["points"], points[res["prompt_index"]], rtol=1e-6, atol=1e-4)
    grid = pp.from_canvas(_grid_ref(3, 2, 100, 128, S), 100, 128, S)
    torch.testing.assert_close(gres["points"], grid[gres["prompt_index"]], rtol=1e-6, atol=1e-4)


def test_bf16_autocast_and_empty_prompts(model):
    entry = pp.prepare(_image(96, 128, seed=17), S)
    with torch.autocast("cpu", dtype=torch.bfloat16), configured(model, score_threshold=0.6):
        res = model([entry])[0]
    assert res["proposal"].shape[1:] == (96, 128) and res["proposal"].shape[0] >= 1
    assert torch.isfinite(res["proposal"].float()).all()
    entry["points"] = torch.zeros(0, 2)
    res = model([entry])[0]
    assert res["proposal"].shape == (0, 96, 128) and res["points"].shape == (0, 2)


def test_mask_pooling_is_a_masked_mean():
    g = torch.Generator().manual_seed(18)
    feats = torch.randn(2, 5, 8, 8, generator=g, requires_grad=True)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    logits[0, 2] = -5.0  # empty mask -> zeros
    out = mask_pooling(feats, logits)
    m = (logits > 0).float()
    ref = (feats[:, None] * m[:, :, None]).sum((-1, -2)) / (m.sum((-1, -2))[..., None] + 1e-8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0, 2], torch.zeros(5))
    out.sum().backward()
    assert feats.grad is not None
    small = mask_pooling(feats.detach(), torch.randn(2, 3, 4, 4, generator=g))  # logits resized to the features
    assert small.shape == (2, 3, 5)


def test_bad_inputs_raise(model):
    img = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8)
    pts = torch.rand(1, 2, 2) * S
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(images=img[0], prompts=pts)
    with pytest.raises(TypeError, match="uint8 or floating"):
        model(images=img.to(torch.int32), prompts=pts)
    with pytest.raises(ValueError, match="prompt_type"):
        model(images=img, prompts=pts, prompt_type="mask")
    with pytest.raises(ValueError, match=r"boxes \[N, Q, 4\]"):
        model(images=img, prompts=pts, prompt_type="box")
    with pytest.raises(ValueError, match="'prompts' are required"):
        model(images=img)
    with pytest.raises(ValueError, match="one row per image"):
        model(images=img, prompts=torch.rand(2, 2, 2))
    with pytest.raises(TypeError, match="list of dicts"):
        model({"image": img[0]})
    with pytest.raises(ValueError, match="canvas"):
        model([{"image": img[0, :, :64]}])
    with pytest.raises(ValueError, match="both 'points' and 'boxes'"):
        model([{"image": img[0], "points": pts[0], "boxes": torch.tensor([[0.0, 0, 1, 1]])}])
    with pytest.raises(ValueError, match="height"):
        model([{"image": img[0], "height": 0, "width": 5}])
    with pytest.raises(ValueError, match="x1 >= x0"):
        model([{"image": img[0], "boxes": torch.tensor([[5.0, 0, 1, 1]])}])
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        model([{"image": img[0], "points": pts}])
    with pytest.raises(ValueError, match="at most one"):
        model.predict(_image(20, 20, 0), points=[[1.0, 2.0]], grid=3)
    with pytest.raises(TypeError, match="uint8"):
        model.predict(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="grid"):
        model.predict(_image(20, 20, 0), grid="x")
    with pytest.raises(ValueError, match="pred_ious"):
        model.postprocess(torch.zeros(3, 8, 8), torch.zeros(2), 8, 8)
    with pytest.raises(TypeError, match="UnpairSegConfig"):
        UnpairSegS1({"image_size": 64})
