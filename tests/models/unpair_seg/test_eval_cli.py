"""models/unpair_seg/eval.py: open_vocab_predict and prompt_predict against plain-PyTorch compositions of the spec
(written here), and the CLI end to end on 2-image ShapesWorld datasets (tiny config, random weights)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.eval import main, open_vocab_predict, prompt_predict
from models.unpair_seg.model import UnpairSegS1
from models.unpair_seg.panoptic import panoptic_inference
from models.unpair_seg.preprocess import point_grid
from models.unpair_seg.templates import SIMPLE, expand
from train.data.seg_eval import write_shapes_panoptic, write_shapes_semantic
from train.data.shapes import CATEGORIES, ShapesWorld
from tests.models.unpair_seg.common import randomize_

WORLD = ShapesWorld(seed=11, size=(48, 64), min_objects=2, max_objects=3)
CLASSES = list(CATEGORIES) + ["background"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UnpairSegS1(dataclasses.replace(UnpairSegConfig.tiny(), score_threshold=0.0))
    randomize_(m, weight_scale=0.05)
    return m.eval()


def _image(i=0):
    return np.round(np.clip(WORLD.scene(i).image, 0, 1) * 255).astype(np.uint8)


def _canvas(img, s):
    """The official canvas, written out: longest side s (PIL bilinear), content top-left, pad 128."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = s / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    out = np.full((s, s, 3), 128, np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def _reference_regions(bb, canvas, masks, scales, cfg):
    """Spec §11.3 for scales that are multiples of 32: resize, normalise, CLIP res5, logits resized to the grid,
    sigmoid >= 0.5 masked mean, CLIP head, L2; mean over scales, L2."""
    mean = torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(1, 3, 1, 1)
    per = []
    for s in scales:
        x = canvas[None].float()
        if s != x.shape[-1]:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        feat = bb((x - mean) / std)["clip_vis_dense"][0]  # [C, g, g]
        m = F.interpolate(masks[None], size=feat.shape[-2:], mode="bilinear", align_corners=False)[0]
        m = (m.sigmoid() >= 0.5).float()
        pooled = torch.einsum("chw,qhw->qc", feat, m / (m.sum((1, 2), keepdim=True) + 1e-8))
        per.append(F.normalize(bb.visual_prediction_forward(pooled[None])[0], dim=-1))
    return F.normalize(torch.stack(per).mean(0), dim=-1)


def test_open_vocab_predict_matches_reference(model):
    cfg = model.cfg
    s = cfg.image_size
    img = _image(0)
    h, w = img.shape[:2]
    prompts, counts = expand(CLASSES, SIMPLE)
    text = F.normalize(model.backbone.get_text_classifier(prompts).float(), dim=-1)
    scales = (96, 128, 160)
    out = open_vocab_predict(model, None, img, text, counts, scales=scales, tasks=("semantic", "panoptic"),
                             is_thing=[True] * 6 + [False], object_mask_threshold=0.0)
    # The proposals equal the official inference at the original size (same grid, filter, NMS, resize + crop).
    official = model([{"image": _canvas(img, s), "height": h, "width": w}])[0]
    k = official["proposal"].shape[0]
    assert k >= 2, "the random model should give several proposals at score_threshold 0"
    torch.testing.assert_close(out["proposal"], official["proposal"].float(), rtol=0, atol=0)
    torch.testing.assert_close(out["scores"], official["scores"])
    # Region embeddings from the canvas-aligned proposals at stride 4.
    canvas_masks = model([{"image": _canvas(img, s), "height": s, "width": s,
                           "points": point_grid(*cfg.pts_per_side, h, w, s)}])[0]["proposal"]
    small = F.interpolate(canvas_masks[None].float(), size=(s // 4, s // 4), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        regions = _reference_regions(model.backbone, _canvas(img, s), small, scales, cfg)
    torch.testing.assert_close(out["region_embeddings"], regions, rtol=1e-4, atol=1e-5)
    # FC-CLIP logits: max over each class's templates, times min(exp(logit_scale), 100).
    factor = min(float(model.backbone.clip_model.logit_scale.exp()), 100.0)
    cos = regions @ text.T
    ref_cls = torch.stack([cos[:, 5 * c:5 * c + 5].max(1).values for c in range(len(CLASSES))], 1) * factor
    torch.testing.assert_close(out["class_logits"], ref_cls, rtol=1e-4, atol=1e-4)
    # Semantic labels: argmax of sum_q softmax(class) x sigmoid(mask).
    ref_sem = torch.einsum("qk,qhw->khw", ref_cls.softmax(-1), official["proposal"].float().sigmoid()).argmax(0)
    assert torch.equal(out["sem_seg"], ref_sem)
    seg, info = panoptic_inference(out["proposal"], ref_cls, [True] * 6 + [False], 0.0, 0.4)
    assert torch.equal(out["panoptic_seg"], seg) and [x["id"] for x in out["segments_info"]] == [x["id"] for x in info]
    assert len(info) >= 1


def test_prompt_predict_matches_decoder(model):
    cfg = model.cfg
    s = cfg.image_size
    img = _image(1)
    h, w = img.shape[:2]
    points = [(10, 7), (40, 30), (63, 47)]
    boxes = [(0, 0, 20, 16), (30, 10, 64, 48)]
    r = s / max(h, w)
    canvas = _canvas(img, s)[None]
    for kind, prompts, canvas_prompts in (
            ("point", points, torch.tensor(points, dtype=torch.float32) * (s - 1) / (max(h, w) - 1)),
            ("box", boxes, torch.tensor(boxes, dtype=torch.float32) * r)):
        got = prompt_predict(model, img, prompts, kind)
        with torch.no_grad():
            dec = model(images=canvas, prompts=canvas_prompts[None], prompt_type=kind)
        pm = dec["pred_masks"][0]  # [P, K, s/4, s/4]
        p, k = pm.shape[:2]
        up = F.interpolate(pm.flatten(0, 1)[None], size=(s, s), mode="bilinear", align_corners=False)
        side = max(h, w)
        ref = F.interpolate(up, size=(side, side), mode="bilinear", align_corners=False)[0, :, :h, :w]
        assert got["masks"].shape == (p, k, h, w) and k == (cfg.num_masks if kind == "point" else 1)
        torch.testing.assert_close(got["masks"], ref.reshape(p, k, h, w), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["ious"], dec["pred_ious"][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_type"):
        prompt_predict(model, img, points, "scribble")


def test_grid_protocol_matches_reference(model, datasets):
    from models.unpair_seg.eval import evaluate_prompts
    from train.data.seg_eval import COCOPanopticDataset

    cfg, s = model.cfg, model.cfg.image_size
    root = datasets / "pan"
    ds = COCOPanopticDataset(root / "annotations/panoptic_val.json", root / "panoptic_val", root / "val", limit=1)
    got = evaluate_prompts(model, ds, "point", "all", protocol="grid")
    item = ds[0]
    h, w = item["pan"].shape
    gts = [item["pan"] == seg["id"] for seg in item["segments_info"]]
    # Reference: the whole grid in one decoder call, every output upsampled, each GT's best IoU.
    grid = point_grid(*cfg.pts_per_side, h, w, s)
    with torch.no_grad():
        pm = model(images=_canvas(item["image"], s)[None], prompts=grid[None], prompt_type="point")["pred_masks"][0]
    up = F.interpolate(pm.flatten(0, 1)[None], size=(s, s), mode="bilinear", align_corners=False)
    side = max(h, w)
    cand = (F.interpolate(up, size=(side, side), mode="bilinear", align_corners=False)[0, :, :h, :w] >= 0).numpy()
    best = [max(np.sum(g & c) / np.sum(g | c) for c in cand) for g in gts]
    assert got["count"] == len(gts) and got["mIoU"] == pytest.approx(float(np.mean(best)), abs=1e-6)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_prompts(model, ds, "box", protocol="grid")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov_eval")
    write_shapes_semantic(WORLD, [0, 1], root / "sem", split="val")
    write_shapes_panoptic(WORLD, [0, 1], root / "pan", split="val")
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_cli_semantic_and_panoptic(datasets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--task", "semantic", "--data", str(datasets / "sem"), "--classes", str(datasets / "sem/classes.txt"),
                 "--config", "tiny", "--random-init", "--out", str(out), "--score-threshold", "0.0"]) == 0
    r = _read(out / "val_semantic.json")
    assert r["task"] == "semantic" and r["split"] == "val"
    assert {"mIoU", "mIoU_mmseg", "fwIoU", "mACC", "pACC", "IoU", "ACC"} <= set(r["metrics"])
    assert len(r["metrics"]["IoU"]) == len(CLASSES) and 0.0 <= r["metrics"]["pACC"] <= 1.0
    prov = r["provenance"]
    assert prov["count"] == 2 and prov["config"] == "tiny" and prov["random_init"] and prov["checkpoint"] is None
    assert prov["templates"] == "simple" and prov["scales"] == [112, 128, 144]
    assert "mIoU" in capsys.readouterr().out

    assert main(["--task", "panoptic", "--data", str(datasets / "pan"), "--config", "tiny", "--random-init",
                 "--out", str(out), "--limit", "1", "--score-threshold", "0.0", "--object-mask-threshold", "0.0"]) == 0
    r = _read(out / "val_panoptic.json")
    assert {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "per_class"} <= set(r["metrics"])
    assert r["provenance"]["count"] == 1 and r["provenance"]["thresholds"]["object_mask"] == 0.0
    assert r["metrics"]["count"] == 1


def test_cli_prompts_with_checkpoints(datasets, tmp_path, model):
    from safetensors.torch import save_file

    from models.unpair_seg.adapter import SemanticAdapter
    from models.unpair_seg.convert import save_official
    from models.unpair_seg.stage2 import Stage2Config, save_adapter

    ckpt, clip, adapter = tmp_path / "stage1.pth", tmp_path / "clip.safetensors", tmp_path / "adapter.safetensors"
    save_official(model, ckpt)
    save_file({k: v.contiguous() for k, v in model.backbone.clip_model.state_dict().items()}, str(clip))
    s2 = Stage2Config.tiny()
    save_adapter(SemanticAdapter(model.backbone.channels, s2.adapter_features, rank=s2.adapter_rank,
                                 hidden_dim=s2.adapter_hidden), adapter, s2)
    out = tmp_path / "out"
    for task in ("point", "box"):
        assert main(["--task", task, "--data", str(datasets / "pan"), "--config", "tiny", "--checkpoint", str(ckpt),
                     "--out", str(out), "--split", "val"]) == 0
        r = _read(out / f"val_{task}.json")
        assert r["metrics"]["count"] >= 2 and 0.0 <= r["metrics"]["mIoU"] <= 1.0 and "mIoU_top" in r["metrics"]
        assert r["provenance"]["checkpoint"] == str(ckpt) and not r["provenance"]["random_init"]
    assert main(["--task", "point", "--data", str(datasets / "pan"), "--config", "tiny", "--checkpoint", str(ckpt),
                 "--out", str(out / "grid"), "--point-protocol", "grid", "--segments", "all"]) == 0
    r = _read(out / "grid" / "val_point.json")
    assert r["provenance"]["point_protocol"] == "grid" and r["metrics"]["count"] >= 4
    assert main(["--task", "semantic", "--data", str(datasets / "sem"), "--config", "tiny", "--checkpoint", str(ckpt),
                 "--clip", str(clip), "--stage2", str(adapter), "--out", str(out), "--score-threshold", "0.0"]) == 0
    prov = _read(out / "val_semantic.json")["provenance"]
    assert prov["stage2"] == str(adapter) and prov["clip"] == str(clip) and prov["scales"] == list(s2.loss_scales)


def test_cli_refuses_random_weights_and_bad_paths(datasets, tmp_path):
    with pytest.raises(SystemExit):
        main(["--task", "semantic", "--data", str(datasets / "sem"), "--config", "tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--task", "panoptic", "--data", str(datasets / "sem"), "--config", "tiny", "--random-init",
              "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--task", "box", "--data", str(datasets / "pan"), "--config", "tiny", "--checkpoint",
              str(tmp_path / "missing.pth")])
