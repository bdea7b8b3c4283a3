"""train/clip_pretrain.py: the tiny open_clip CLIP pretraining for Unpair-Seg's stage 2.

* a few trainer steps lower the contrastive loss (a plain-PyTorch symmetric InfoNCE written here) on a fixed batch,
  and the logged first-step loss is that reference loss of the initial model; the logit scale trains;
* the saved safetensors holds exactly ``open_clip.CLIP(**TINY_CLIP).state_dict()``'s keys and shapes, loads strictly
  (also under ``backbone.clip_model.``) and reproduces the trained model's image and text features;
* two runs of the same config are bitwise identical on the CPU (weights and metrics);
* the region read-out equals a hand computation (timm's forward_features, the bilinear mask resize at the cell
  centres done by hand, LayerNorm + MLP by hand) and mmkernels' official MaskPooling on +-10 logits;
* the caption mix: kinds follow the weights, captions name the scene's objects, per-epoch captions, bad configs.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import open_clip
from models.common.checkpoint import load_into
from models.unpair_seg.config import TINY_CLIP
from train import clip_pretrain as cp
from train import launch
from train.data.shapes import CATEGORIES, ObjectSpec, ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "train", "configs", "clip_tiny.yaml")
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")

# TINY_CLIP without stochastic depth, so that the trainer's train-mode forward equals the eval-mode reference.
NO_DROP = copy.deepcopy(TINY_CLIP)
NO_DROP["vision_cfg"]["timm_drop_path"] = 0.0


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    launch.shutdown()


def _small_cfg(**over) -> dict:
    """The shipped config at 64^2 on 8 items, batch 8 (a fixed batch when every item is a whole scene, whose caption
    does not change per epoch), a tiny eval."""
    cfg = cp.load_config(CONFIG)
    cfg["model"]["clip"] = copy.deepcopy(NO_DROP)
    cfg["data"].update(image_size=64, train_items=8, mix={"scene": 1.0}, supersample=2)
    cfg["eval"].update(image_scenes=6, region_scenes=4, scales=[64], batch_size=4)
    cfg["train"].update(steps=6, micro_batch=8, lr=3e-3, warmup_steps=0, schedule="constant", log_every=1,
                        progress=False)
    for key, value in over.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return cp.resolve_config(cfg)


def _reference_loss(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, log_scale: float) -> float:
    """Symmetric InfoNCE of CLIP, written out: unit features, logits = exp(s) * I T^T, mean of both CEs."""
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = math.exp(min(max(log_scale, 0.0), math.log(100.0))) * img @ txt.T
        target = torch.arange(len(img))
        return float((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = _small_cfg()
    out_dir = str(tmp_path_factory.mktemp("clip_run"))
    init = open_clip.CLIP(**NO_DROP).eval()
    init.load_state_dict(cp.build_model(cfg, seed=cfg["train"]["seed"]).clip_state_dict())
    data = cp.ShapesCaptionDataset(cfg["data"], init.context_length)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    out = cp.train(cfg, out_dir)
    return {"cfg": cfg, "out": out, "dir": out_dir, "init": init, "batch": batch}


# ---------------------------------------------------------------------------------------------------------------------
# Training, the checkpoint, determinism


def test_steps_lower_the_contrastive_loss_on_a_fixed_batch(run):
    batch, init, out = run["batch"], run["init"], run["out"]
    assert set(batch["kind"].tolist()) == {cp.KINDS.index("scene")}
    before = _reference_loss(init, batch["image"], batch["text"], float(init.logit_scale.detach()))
    recs = [r for r in out["records"] if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 7))
    # Step 1's image loss is the initial model's on the whole fixed batch (it does not depend on the item order);
    # the total adds the region pairs' loss at region_weight 1.
    assert recs[0]["loss_image"] == pytest.approx(before, rel=1e-5, abs=1e-5)
    assert recs[0]["loss"] == pytest.approx(recs[0]["loss_image"] + recs[0]["loss_region"], rel=1e-5)
    assert recs[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    trained = open_clip.CLIP(**NO_DROP).eval()
    trained.load_state_dict(load_file(os.path.join(run["dir"], cp.CHECKPOINT)))
    after = _reference_loss(trained, batch["image"], batch["text"], float(trained.logit_scale.detach()))
    assert after < before - 0.3, (before, after)
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert float(trained.logit_scale.detach()) != pytest.approx(math.log(1 / 0.07), abs=1e-4)  # the scale is learned


def test_checkpoint_is_open_clips_state_dict_and_reproduces_features(run):
    path = os.path.join(run["dir"], cp.CHECKPOINT)
    sd = load_file(path)
    fresh = open_clip.CLIP(**TINY_CLIP)
    ref = fresh.state_dict()
    assert list(sd) == sorted(ref) and all(sd[k].shape == ref[k].shape for k in ref)
    assert sd["logit_scale"].dim() == 0 and all(v.dtype == torch.float32 for v in sd.values())
    load_into(fresh, sd)  # strict
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.clip_model = open_clip.CLIP(**TINY_CLIP)
    load_into(holder, {f"backbone.clip_model.{k}": v for k, v in sd.items()})
    trained = run["out"]["model"]
    assert isinstance(trained, cp.TrainCLIP) and trained.logit_scale.shape == (1,)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=g)
    tokens = open_clip.tokenize(["a photo of a star.", "two shapes: a small red circle on the left and a cross.",
                                 "There is a large blue square in the scene"])
    for model in (fresh.eval(), holder.backbone.clip_model.eval(), cp.load_clip(path)):
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), trained.encode_image(images))
            assert torch.equal(model.encode_text(tokens), trained.encode_text(tokens))
        assert float(model.logit_scale) == float(trained.logit_scale[0])
    metrics = json.loads(open(os.path.join(run["dir"], cp.METRICS)).read())
    assert metrics["image"]["count"] == 6 and metrics["region"]["64"]["count"] >= 8
    assert 0 <= metrics["region"]["64"]["accuracy"] <= 1 and metrics["chance"] == pytest.approx(1 / 6)
    assert metrics["steps"] == 6 and metrics["train_time_s"] > 0


def test_runs_are_deterministic_on_cpu(run, tmp_path):
    again = cp.train(run["cfg"], str(tmp_path))
    first = run["out"]["state_dict"]
    assert set(again["state_dict"]) == set(first)
    assert all(torch.equal(again["state_dict"][k], first[k]) for k in first)
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}  # noqa: E731
    assert strip(again["metrics"]) == strip(run["out"]["metrics"])


def test_logit_scale_is_a_vector_for_the_trainer():
    model = cp.TrainCLIP(**NO_DROP)
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []
    assert list(model.state_dict()) == list(open_clip.CLIP(**NO_DROP).state_dict())  # same keys, same order
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above log(100): the forward clamps as open_clip's in-place clamp would
    _, _, scale = model(torch.randn(2, 3, 64, 64), open_clip.tokenize(["a circle", "a star"]))
    assert scale.shape == (1,) and float(scale.detach()) == pytest.approx(100.0)
    assert model.clip_state_dict()["logit_scale"].shape == ()


# ---------------------------------------------------------------------------------------------------------------------
# The region read-out against a hand computation


def _hand_region_predictions(model, images, masks, classifier):
    """Per (n, q): res5 via timm's forward_features; cell (i, j) of the 32-stride grid is in the mask iff the
    bilinear sample at the cell centre (pixel 32 i + 15.5: the mean of pixels 15 and 16 of the cell along each axis)
    is >= 0.5; masked mean; LayerNorm (eps 1e-6) with trunk.head.norm's affine; fc1 -> exact GELU -> fc2; cosine."""
    trunk = model.visual.trunk
    feats = trunk.forward_features(images)
    n_img, q_n = masks.shape[:2]
    hf, wf = feats.shape[-2:]
    norm, mlp = trunk.head.norm, model.visual.head.mlp
    pred = torch.zeros(n_img, q_n, dtype=torch.int64)
    empty = torch.zeros(n_img, q_n, dtype=torch.bool)
    for n in range(n_img):
        for q in range(q_n):
            cells = []
            for i in range(hf):
                for j in range(wf):
                    centre = masks[n, q, 32 * i + 15:32 * i + 17, 32 * j + 15:32 * j + 17].float().mean()
                    if centre >= 0.5:
                        cells.append(feats[n, :, i, j])
            pooled = torch.stack(cells).sum(0) / (len(cells) + 1e-8) if cells else torch.zeros(feats.shape[1])
            empty[n, q] = not cells
            x = F.layer_norm(pooled, (pooled.numel(),), norm.weight, norm.bias, 1e-6)
            x = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight)
            pred[n, q] = int(torch.argmax(classifier @ (x / x.norm())))
    return pred, empty


def test_region_accuracy_equals_a_hand_computation():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 96, generator=g)  # res5: 3 x 3 cells
    masks = torch.zeros(2, 3, 96, 96, dtype=torch.bool)
    masks[0, 0, :40, :40] = True          # cell (0, 0) only
    masks[0, 1, 10:90, 40:96] = True      # cells (0..2, 1..2)
    masks[0, 2, 16:50, 0:96] = True       # starts at pixel 16: the centre sample of row 0 is exactly 0.5 -> in
    masks[1, 0, 40:60, 40:60] = True      # covers the centre of cell (1, 1)
    masks[1, 1, 2:12, 2:12] = True        # misses every cell centre: empty, pools to zeros
    classifier = F.normalize(torch.randn(4, TINY_CLIP["embed_dim"], generator=g), dim=-1)
    with torch.no_grad():
        want_pred, want_empty = _hand_region_predictions(model, images, masks, classifier)
    pred, empty = cp.region_predictions(model, images, masks, classifier)
    assert torch.equal(pred, want_pred) and torch.equal(empty, want_empty)
    assert want_empty.tolist() == [[False, False, False], [False, True, True]]
    # Labels: right for 3 of the 5 real regions, wrong for 2; slot (1, 2) is padding.
    labels = want_pred.clone()
    labels[0, 1] = (labels[0, 1] + 1) % 4
    labels[1, 0] = (labels[1, 0] + 2) % 4
    labels[1, 2] = -1
    res = cp.region_accuracy(model, images, masks, labels, classifier, names=["a", "b", "c", "d"])
    assert res["accuracy"] == pytest.approx(3 / 5) and res["count"] == 5 and res["empty"] == 1
    per = {}
    for n, q in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        k = "abcd"[int(labels[n, q])]
        hits, count = per.get(k, (0, 0))
        per[k] = (hits + int(want_pred[n, q] == labels[n, q]), count + 1)
    assert res["per_class"] == {k: {"accuracy": h / c, "count": c} for k, (h, c) in per.items()}


def test_mask_pool_binary_is_official_mask_pooling():
    """Binary masks as +-10 logits through mmkernels' official MaskPooling (sigmoid >= 0.5 after the bilinear
    resize): the same pooled features, including the exact-0.5 boundary samples."""
    import mmkernels

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 5, 4, 4, generator=g)
    masks = torch.rand(2, 3, 128, 128, generator=g) > 0.6
    masks[:, 0] = False
    masks[:, 0, 16:80, 48:128] = True
    got = cp.mask_pool_binary(feats, masks)
    want = mmkernels.mask_pool(feats, masks.float() * 20 - 10, mode="official")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        cp.mask_pool_binary(feats, masks[0])


def test_text_classifier_averages_unit_template_embeddings():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    templates = ["a photo of a {}.", "There is a {} in the scene"]
    got = cp.text_classifier(model, ["circle", "star"], templates)
    with torch.no_grad():
        rows = []
        for name in ("circle", "star"):
            f = model.encode_text(open_clip.tokenize([t.format(name) for t in templates]))
            f = f / f.norm(dim=-1, keepdim=True)
            m = f.mean(0)
            rows.append(m / m.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The caption mix and the config


def test_caption_mix():
    cfg = cp.load_config(CONFIG)
    data = dict(cfg["data"], image_size=64, supersample=1, train_items=400)
    ds = cp.ShapesCaptionDataset(data, 77)
    kinds = [ds.kind(i) for i in range(400)]
    frac = {k: kinds.count(k) / 400 for k in cp.KINDS}
    for k, w in data["mix"].items():
        assert abs(frac[k] - w / sum(data["mix"].values())) < 0.08, frac
    for i in range(12):
        item, scene, kind = ds[i], ds.scene(i), kinds[i]
        assert item["image"].shape == (3, 64, 64) and item["text"].shape == (77,)
        assert int(item["kind"]) == cp.KINDS.index(kind)
        caption = ds.caption(i, scene, 0)
        assert torch.equal(item["text"], open_clip.tokenize([caption])[0])
        if kind == "scene":
            assert caption == scene.caption() and 2 <= len(scene.specs) <= 4
        elif kind == "colour":
            sp = scene.specs[0]
            assert len(scene.specs) == 1 and f"{sp.colour} shape" in caption
            assert not any(w in caption.split() for w in list(data["categories"]) + list(data["sizes"]))
        else:
            assert len(scene.specs) == 1 and scene.specs[0].category in caption
        # Region pairs: one per object, its res5-cell coverage as pooling weights, a caption naming the object.
        g = ds.group(i) // 32
        assert item["region_weights"].shape == (ds.slots, g, g)
        regions = ds.region_captions(i, scene, 0)
        assert len(regions) == len(scene.specs) and not item["region_valid"][len(regions):].any()
        for j, (sp, text) in enumerate(zip(scene.specs, regions)):
            assert sp.category in text or f"{sp.colour} shape" in text
            cover = scene.masks[j].reshape(g, 32, g, 32).mean(axis=(1, 3))
            np.testing.assert_allclose(item["region_weights"][j].numpy(), cover, rtol=1e-6)
            assert torch.equal(item["region_text"][j], open_clip.tokenize([text])[0])
            assert bool(item["region_valid"][j]) == bool(cover.sum() > 0)
        if kind == "category":
            assert not any(w in caption.split() for w in list(data["colours"]) + list(data["sizes"]))
    # Images stay, captions of single-object items are redrawn per epoch.
    singles = [i for i in range(40) if kinds[i] != "scene"]
    ds.set_epoch(1)
    assert any(ds.caption(i, ds.scene(i), 1) != ds.caption(i, ds.scene(i), 0) for i in singles)
    first = ds[singles[0]]["image"]
    assert torch.equal(first, cp.ShapesCaptionDataset(data, 77)[singles[0]]["image"])
    # The eval scenes are held out: they start at EVAL_OFFSET, beyond every train index.
    assert cp.EVAL_OFFSET > data["train_items"]


def test_normalisation_is_the_unpair_seg_pixel_statistics():
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    x = cp.normalize_image(img)
    mean = torch.tensor([122.7709383, 116.7460125, 104.09373615]).view(3, 1, 1)
    std = torch.tensor([68.5005327, 66.6321579, 70.32316305]).view(3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(img).permute(2, 0, 1) * 255 - mean) / std)


@pytest.mark.parametrize("section,key,value,match", [
    ("data", "mix", {"scene": -1.0}, "data.mix"),
    ("data", "mix", {"crops": 1.0}, "data.mix"),
    ("data", "image_size", 100, "data.image_size"),
    ("data", "region_colour_p", 0.8, "region_category_p \\+ data.region_colour_p"),
    ("data", "crop_size", 48, "data.crop_size"),
    ("data", "bogus", 1, "data: unknown"),
    ("eval", "templates", ["no placeholder"], "eval.templates"),
    ("eval", "scales", [100], "eval.scales"),
    ("eval", "region_objects", [1, 1], "eval.region_objects"),
    ("train", "lr_typo", 1.0, "train: unknown"),
])
def test_bad_config_raises(section, key, value, match):
    cfg = cp.load_config(CONFIG)
    cfg[section][key] = value
    with pytest.raises(ValueError, match=match):
        cp.resolve_config(cfg)


def test_region_pairs_are_weighted_res5_means_through_the_visual_heads():
    """TrainCLIP's one-pass forward: the image features equal encode_image; each valid region's feature is the
    coverage-weighted mean of the res5 map (stem -> stages -> norm_pre), through trunk.head and visual.head,
    normalised; its text feature is encode_text of its caption. Checked on random weights and random soft weights."""
    torch.manual_seed(0)
    model = cp.TrainCLIP(**NO_DROP).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):  # timm's 1e-6 layer scale would hide the blocks
                p.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 64, 64)
    text = open_clip.tokenize(["a photo of a red shape.", "a star"])
    weights = torch.rand(2, 3, 2, 2)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    region_text = open_clip.tokenize(["a", "b", "c", "d", "e", "f"]).view(2, 3, -1)
    with torch.no_grad():
        img, txt, scale, reg, reg_txt = model(images, text, weights, region_text, valid)
        trunk = model.visual.trunk
        dense = trunk.norm_pre(trunk.stages(trunk.stem(images)))
        want = []
        for b, r in valid.nonzero().tolist():
            w = weights[b, r]
            pooled = (dense[b] * w).sum((-1, -2)) / (w.sum() + 1e-8)
            want.append(F.normalize(model.visual.head(trunk.head(pooled.view(1, -1, 1, 1))), dim=-1)[0])
        torch.testing.assert_close(reg, torch.stack(want), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(img, F.normalize(model.encode_image(images), dim=-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reg_txt, F.normalize(model.encode_text(region_text[valid]), dim=-1))
        torch.testing.assert_close(txt, F.normalize(model.encode_text(text), dim=-1))
    assert scale.shape == (1,) and float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
