"""models/unpair_seg/infer.py end to end on a small PNG with the tiny config: the files it writes, RLE that decodes
back to the PNGs (pycocotools), masks equal to the model's own prediction, prompts in original pixels, checkpoint
loading, and the refusal to run random weights without --random-init."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.convert import save_official
from models.unpair_seg.infer import main, overlay, rle_encode
from models.unpair_seg.model import UnpairSegS1

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
H, W = 60, 80
# pycocotools' decode passes copy=False to numpy's __array__ protocol (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = (30, 60, 90)
    img[10:40, 15:50] = (220, 40, 40)
    img[30:55, 45:75] = (40, 200, 60)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(img).save(path)
    return str(path)


def _read_outputs(out):
    with open(os.path.join(out, "masks.json")) as f:
        masks = json.load(f)
    with open(os.path.join(out, "scores.json")) as f:
        scores = json.load(f)
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    pngs = [np.asarray(Image.open(os.path.join(out, a["png"]))) for a in masks["annotations"]]
    return masks, scores, result, pngs


def test_cli_grid_end_to_end(tmp_path, image_path):
    out = str(tmp_path / "out")
    assert main(["--image", image_path, "--config", "tiny", "--random-init", "--grid", "4", "--out", out,
                 "--score-threshold", "0.5", "--device", "cpu"]) == 0
    masks, scores, result, pngs = _read_outputs(out)
    anns = masks["annotations"]
    assert len(anns) >= 1 and len(anns) == len(scores) == len(pngs) == result["num_proposals"]
    assert sorted(os.listdir(out)) == sorted([a["png"] for a in anns] + ["masks.json", "scores.json", "overlay.png",
                                                                         "result.json"])
    assert masks["height"] == H and masks["width"] == W and masks["prompt_type"] == "point"
    assert result["random_weights"] and result["grid"] == [4, 4] and result["config"] == "tiny"
    for a, png, s in zip(anns, pngs, scores):
        assert png.dtype == np.uint8 and png.shape == (H, W) and set(np.unique(png)) <= {0, 255}
        rle = dict(a["segmentation"])
        assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded, (png > 0).astype(np.uint8))
        assert a["area"] == int((png > 0).sum()) and a["score"] == s
        assert 0 <= a["prompt"][0] <= W - 1 and 0 <= a["prompt"][1] <= H - 1  # grid points in original pixels
    assert scores == sorted(scores, reverse=True)
    # the same as the model's own prediction (same seed, same config)
    torch.manual_seed(0)
    model = UnpairSegS1(UnpairSegConfig.tiny(score_threshold=0.5)).eval()
    img = np.asarray(Image.open(image_path).convert("RGB"))
    res = model.predict(img, grid=4)
    assert res["masks"].shape[0] == len(pngs)
    for k, png in enumerate(pngs):
        np.testing.assert_array_equal(res["masks"][k].numpy(), png > 0)
    ov = np.asarray(Image.open(os.path.join(out, "overlay.png")))
    np.testing.assert_array_equal(ov, overlay(img, res["masks"].numpy()))


def test_cli_points_boxes_with_checkpoint(tmp_path, image_path):
    torch.manual_seed(5)
    model = UnpairSegS1(UnpairSegConfig.tiny())
    ckpt = str(tmp_path / "stage1.pth")
    save_official(model, ckpt)
    out = str(tmp_path / "pts")
    assert main(["--image", image_path, "--config", "tiny", "--checkpoint", ckpt, "--points", "10,20; 50,30",
                 "--out", out, "--score-threshold", "0.5", "--device", "cpu"]) == 0
    masks, scores, result, pngs = _read_outputs(out)
    assert not result["random_weights"] and result["points"] == [[10.0, 20.0], [50.0, 30.0]]
    given = {(10.0, 20.0), (50.0, 30.0)}
    assert len(pngs) >= 1
    for a in masks["annotations"]:
        assert tuple(round(v, 3) for v in a["prompt"]) in given and 0 <= a["mask_index"] < 4
    out = str(tmp_path / "box")
    assert main(["--image", image_path, "--config", "tiny", "--checkpoint", ckpt, "--boxes", "5,5,60,50",
                 "--out", out, "--score-threshold", "0.5", "--device", "cpu"]) == 0
    masks, _, _, pngs = _read_outputs(out)
    assert masks["prompt_type"] == "box" and len(pngs) == 1
    np.testing.assert_allclose(masks["annotations"][0]["prompt"], [5, 5, 60, 50], atol=1e-3)
    # the checkpoint's weights, not the random init, made the masks
    img = np.asarray(Image.open(image_path).convert("RGB"))
    with torch.no_grad():
        res = UnpairSegS1(UnpairSegConfig.tiny(score_threshold=0.5)).eval()
        from models.unpair_seg.convert import load_official

        load_official(res, ckpt)
        ref = res.predict(img, boxes=[[5.0, 5.0, 60.0, 50.0]])
    np.testing.assert_array_equal(ref["masks"][0].numpy(), pngs[0] > 0)


def test_cli_refuses_random_weights_and_bad_args(tmp_path, image_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--image", image_path, "--config", "tiny", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--random-init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", image_path, "--checkpoint", str(tmp_path / "missing.pth")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", image_path, "--config", "tiny", "--random-init", "--points", "1,2,3"])
    assert "--points" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", image_path, "--random-init", "--points", "1,2", "--boxes", "1,2,3,4"])
    assert not os.path.exists(tmp_path / "x")


def test_rle_helper():
    m = np.zeros((5, 7), bool)
    m[1:4, 2:6] = True
    rle = rle_encode(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [5, 7]
    np.testing.assert_array_equal(mask_util.decode({"size": [5, 7], "counts": rle["counts"].encode()}), m)


def test_module_entry_point_bf16(tmp_path, image_path):
    out = str(tmp_path / "bf16")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "models.unpair_seg.infer", "--image", image_path, "--config", "tiny",
                           "--random-init", "--dtype", "bf16", "--out", out, "--score-threshold", "0.5",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "proposals" in proc.stdout
    masks, scores, result, pngs = _read_outputs(out)
    assert result["dtype"] == "bf16" and len(pngs) == len(scores) >= 1
