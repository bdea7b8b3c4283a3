"""models/cris/evaluate.py and models/cris/infer.py: evaluate() on a hand-made case against hand-computed metrics
and against the official one-sentence-at-a-time loop, the evaluate CLI (JSON per split), and the infer CLI end to
end on a ShapesWorld image (random weights with --allow-random, and a saved official checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from models.cris import CRIS, CRISConfig
from models.cris.convert import load_official, save_official
from models.cris.evaluate import evaluate
from models.cris.evaluate import main as evaluate_main
from models.cris.infer import main as infer_main
from models.cris.infer import overlay, predict
from tests.models.cris.test_model import _randomize
from train import cris
from train.data.cris_data import ShapesReferDataset, scene_rgb
from train.data.shapes import ShapesWorld

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
pytestmark = pytest.mark.filterwarnings("ignore:CRIS. backbone.clip:UserWarning")


# ---------------------------------------------------------------------------------------------------------------------
# evaluate()


class _LogitsFromImage(nn.Module):
    """A stand-in model whose logits are channel 0 of the image at full resolution (so the post-processing neither
    resizes nor, with an identity inverse, resamples: prediction = channel 0 > logit(0.35))."""

    def __init__(self, size: int):
        super().__init__()
        self.config = types.SimpleNamespace(input_size=size)
        self.unit = nn.Parameter(torch.ones(()))

    def forward(self, img, tokens):
        assert not self.training and tokens.dtype == torch.int64
        return img[:, :1] * self.unit


class _HandSet(torch.utils.data.Dataset):
    mode, size = "test", 8

    def __init__(self, cases):
        self.cases = cases

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        pred, gt = self.cases[i]
        img = torch.zeros(3, 8, 8)
        img[0] = torch.where(torch.from_numpy(pred), 5.0, -5.0)
        return {"image": img, "tokens": torch.tensor([49406, 320, 49407, 0]), "target": torch.zeros(1, 8, 8),
                "gt": torch.from_numpy(gt), "inverse": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64),
                "ori_size": (8, 8), "sentence": "a", "ref_id": i}


def _rows(a, b):
    m = np.zeros((8, 8), bool)
    m[a:b] = True
    return m


def _cols(a, b):
    m = np.zeros((8, 8), bool)
    m[:, a:b] = True
    return m


def test_evaluate_hand_made_case():
    empty = np.zeros((8, 8), bool)
    cases = [(_rows(0, 4), _rows(0, 4)),    # I 32, U 32: IoU 1 (less the 1e-6 epsilon)
             (_rows(2, 6), _rows(0, 4)),    # I 16, U 48: 1/3
             (empty, _cols(0, 2)),          # I 0, U 16: 0
             (_cols(0, 3), _cols(0, 4)),    # I 24, U 32: 0.75
             (empty, empty)]                # both empty: 0, as official
    model = _LogitsFromImage(8).eval()
    for batch_size, dtype in ((2, torch.float32), (1, torch.float32), (16, torch.float64)):
        r = evaluate(model, _HandSet(cases), batch_size=batch_size, dtype=dtype)
        assert r["count"] == 5
        assert r["mIoU"] == pytest.approx((32 / (32 + 1e-6) + 16 / (48 + 1e-6) + 0 + 24 / (32 + 1e-6) + 0) / 5,
                                          rel=1e-12)
        assert r["oIoU"] == pytest.approx(72 / 128, rel=1e-12)
        assert [r[k] for k in ("Pr@50", "Pr@60", "Pr@70", "Pr@80", "Pr@90")] == \
            pytest.approx([0.4, 0.4, 0.4, 0.2, 0.2], rel=1e-6)  # (float32 means, as official)
    assert model.unit.dtype == torch.float32 and not model.training  # evaluated a float64 copy, left the model be
    model.train()
    evaluate(model, _HandSet(cases), batch_size=2)
    assert model.training  # put back in its mode


def _official_loop(model, ds) -> list[float]:
    """The official test.py: one sentence at a time, sigmoid -> bicubic (align_corners) -> cv2 inverse warp (cubic)
    -> > 0.35, IoU = I / (U + 1e-6) in numpy."""
    import cv2

    out = []
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            pred = torch.sigmoid(model(it["image"][None], it["tokens"][None]))
            pred = F.interpolate(pred, size=it["image"].shape[-2:], mode="bicubic", align_corners=True)
            pred = pred.squeeze().numpy()
            h, w = it["ori_size"]
            pred = cv2.warpAffine(pred, it["inverse"].numpy(), (w, h), flags=cv2.INTER_CUBIC,
                                  borderValue=0.0) > 0.35
            gt = it["gt"].numpy()
            out.append(np.logical_and(pred, gt).sum() / (np.logical_or(pred, gt).sum() + 1e-6))
    return out


def test_evaluate_matches_the_official_loop():
    torch.manual_seed(0)
    cfg = CRISConfig.tiny(input_size=64)
    model = _randomize(CRIS(cfg), seed=4).eval()
    with torch.no_grad():
        model.proj.txt.bias[-1] = 2.0  # shift the logits so that the random model predicts some object pixels
    world = ShapesWorld(seed=3, size=(40, 56), max_objects=3)
    test = ShapesReferDataset(world, "val", 3, size=64, mode="test")
    ious = _official_loop(model, test)
    assert len(ious) == sum(len(s) for s in test.sentences) > len(test.refs)  # every sentence
    assert 0 < np.mean(ious) < 1
    r = evaluate(model, test, batch_size=4)
    assert r["count"] == len(ious)
    assert r["mIoU"] == pytest.approx(np.mean(ious), abs=2e-3)  # batched vs one at a time: float rounding only
    assert r["Pr@50"] == pytest.approx(np.mean(np.array(ious) > 0.5), abs=1 / len(ious) + 1e-9)
    val = ShapesReferDataset(world, "val", 3, size=64, mode="val")
    assert evaluate(model, val, batch_size=3)["count"] == len(val.refs)


def test_evaluate_bad_inputs():
    model = _LogitsFromImage(8)
    ds = _HandSet([(np.zeros((8, 8), bool), np.zeros((8, 8), bool))])
    with pytest.raises(ValueError, match="'batch_size'"):
        evaluate(model, ds, batch_size=0)
    with pytest.raises(TypeError, match="'dtype'"):
        evaluate(model, ds, dtype=torch.int32)
    with pytest.raises(TypeError, match="'model'"):
        evaluate(lambda x, y: x, ds)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, _HandSet([]))
    ds.mode = "train"
    with pytest.raises(ValueError, match="train mode"):
        evaluate(model, ds)
    ds.mode, ds.size = "test", 16
    with pytest.raises(ValueError, match="letterboxes to 16"):
        evaluate(model, ds)


# ---------------------------------------------------------------------------------------------------------------------
# The CLIs


def _tiny_config(tmp_path, **shapes) -> str:
    cfg = cris.load_config(os.path.join(ROOT, "train", "configs", "cris_tiny.yaml"))
    cfg["model"]["input_size"] = 64
    cfg["data"]["shapes"].update(val_scenes=2, **shapes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _checkpoint(tmp_path, seed=6) -> str:
    """A random tiny CRIS whose output bias puts the median logit of a ShapesWorld scene at the 0.35 threshold, so that
    its masks are neither empty nor full."""
    model = _randomize(CRIS(CRISConfig.tiny(input_size=64)), seed=seed).eval()
    _, rgb = _scene_png(tmp_path)
    with torch.no_grad():
        _, prob, _ = predict(model, rgb, "the star")
        median = float(np.median(prob.clip(1e-6, 1 - 1e-6)))
        model.proj.txt.bias[-1] += float(np.log(0.35 / 0.65) - np.log(median / (1 - median)))
    path = str(tmp_path / "best_model.pth")
    save_official(model, path)
    return path


def test_evaluate_cli_writes_json_per_split(tmp_path):
    config, weights = _tiny_config(tmp_path), _checkpoint(tmp_path)
    out = tmp_path / "res" / "results.json"
    assert evaluate_main(["--config", config, "--weights", weights, "--split", "val", "--split", "testA",
                          "--out", str(out), "--batch-size", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "test" and res["weights"] == os.path.abspath(weights) and set(res["splits"]) == {"val",
                                                                                                         "testA"}
    cfg = cris.load_config(config)
    model = load_official(CRIS(cris.model_config(cfg)), weights)
    for split, r in res["splits"].items():
        want = evaluate(model, cris.build_dataset(cfg, split, "test"), batch_size=3)
        assert r == want, split
        assert set(r) == {"mIoU", "oIoU", "Pr@50", "Pr@60", "Pr@70", "Pr@80", "Pr@90", "count"}
    with pytest.raises(SystemExit):  # no weights: refuses unless --allow-random
        evaluate_main(["--config", config, "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        evaluate_main(["--config", config, "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")])
    assert evaluate_main(["--config", config, "--allow-random", "--mode", "val", "--out", str(tmp_path / "r.json")]) \
        == 0
    assert json.loads((tmp_path / "r.json").read_text())["splits"]["val"]["count"] == len(
        cris.build_dataset(cfg, "val", "val"))


def _scene_png(tmp_path) -> tuple[str, np.ndarray]:
    import cv2

    rgb = scene_rgb(ShapesWorld(seed=1, size=(48, 72), max_objects=3).scene(0))
    path = str(tmp_path / "scene.png")
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path, rgb


def test_infer_cli_random_weights(tmp_path):
    image, rgb = _scene_png(tmp_path)
    config = _tiny_config(tmp_path)
    out = tmp_path / "out"
    argv = ["--image", image, "--text", "the red circle", "--config", config, "--out", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit):  # random weights are refused without --allow-random
        infer_main(argv)
    assert not out.exists()
    assert infer_main(argv + ["--allow-random"]) == 0
    mask = np.asarray(Image.open(out / "mask.png"))
    over = np.asarray(Image.open(out / "overlay.png"))
    prob = np.asarray(Image.open(out / "prob.png"))
    assert mask.shape == prob.shape == (48, 72) and over.shape == (48, 72, 3) and set(np.unique(mask)) <= {0, 255}
    res = json.loads((out / "result.json").read_text())
    assert res["text"] == "the red circle" and res["random_weights"] and res["weights"] is None
    assert res["ori_size"] == [48, 72] and res["input_size"] == 64 and res["mask_pixels"] == int((mask > 0).sum())
    assert res["tokens"][0] == 49406 and len(res["tokens"]) == 17
    # The same seeded model, by the function: the same mask and overlay.
    model = cris.build_model(cris.load_config(config), model_cls=CRIS).eval()
    want, p, _ = predict(model, rgb, "the red circle")
    assert np.array_equal(mask > 0, want)
    assert np.array_equal(over, overlay(rgb, want))
    assert np.abs(prob.astype(int) - np.round(p.clip(0, 1) * 255)).max() == 0


def test_infer_cli_with_a_checkpoint_as_a_module(tmp_path):
    """python -m models.cris.infer with --weights: the saved model's prediction."""
    image, rgb = _scene_png(tmp_path)
    config, weights = _tiny_config(tmp_path), _checkpoint(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "models.cris.infer", "--image", image, "--text", "the star",
                           "--config", config, "--weights", weights, "--out", str(out), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_official(CRIS(CRISConfig.tiny(input_size=64)), weights).eval()
    want, _, _ = predict(model, rgb, "the star")
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    assert np.array_equal(mask, want) and 0 < want.sum() < want.size
    res = json.loads((out / "result.json").read_text())
    assert res["weights"] == os.path.abspath(weights) and not res["random_weights"]
    for bad, match in ((["--weights", str(tmp_path / "nope.pth")], "does not exist"),
                       (["--clip", str(tmp_path / "RN50.pt"), "--allow-random"], "does not exist")):
        proc = subprocess.run([sys.executable, "-m", "models.cris.infer", "--image", image, "--text", "x",
                               "--config", config, "--out", str(out), *bad], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and match in proc.stderr


def test_overlay_and_predict_inputs():
    img = np.full((3, 4, 3), 100, np.uint8)
    m = np.zeros((3, 4), bool)
    m[:, :3] = True
    out = overlay(img, m, colour=(200, 0, 0), alpha=0.5)
    assert out[1, 1].tolist() == [150, 50, 50]  # interior: half tint
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 2].tolist() == [200, 0, 0]  # boundary: solid
    assert out[1, 3].tolist() == [100, 100, 100]  # outside
    with pytest.raises(ValueError, match="'mask'"):
        overlay(img, m[:2])
    with pytest.raises(ValueError, match="'image'"):
        overlay(img.astype(np.float32), m)
    model = CRIS(CRISConfig.tiny(input_size=64)).eval()
    with pytest.raises(ValueError, match="'text'"):
        predict(model, img, "  ")
