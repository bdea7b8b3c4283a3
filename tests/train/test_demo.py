"""The demo's pieces: the PNG line chart, the LaVin-DiT demo's evaluation/report on a very short run, and the
top-level report of python -m train.demo."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from train.plot import COLORS, line_chart


def test_line_chart_draws_each_series(tmp_path):
    path = line_chart(str(tmp_path / "c.png"), {"a": [(0, 1.0), (10, 0.5), (20, 0.25)], "b": [(0, 2.0), (20, 1.0)]},
                      "loss", width=300, height=160)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (160, 300, 3)
    for color in COLORS[:2]:  # both polylines are drawn in their colours
        assert (np.abs(img.astype(int) - np.array(color)).sum(-1) == 0).sum() > 20
    # the first series falls from left to right: its colour's topmost pixel in the left third is above the one in
    # the right third
    mask = (np.abs(img.astype(int) - np.array(COLORS[0])).sum(-1) == 0)
    mask[:, 150:] &= np.arange(300)[150:] < 280  # leave out the legend text at the right
    rows_left = np.nonzero(mask[:, 60:100].any(1))[0]
    rows_right = np.nonzero(mask[:, 200:280].any(1))[0]
    assert rows_left.min() < rows_right.min()
    line_chart(str(tmp_path / "log.png"), {"a": [(1, 1e-3), (2, 1e-1)]}, log_y=True)
    with pytest.raises(ValueError, match="no finite points"):
        line_chart(str(tmp_path / "x.png"), {"a": [(0, float("nan"))]})


def _tiny_config(tmp_path) -> str:
    with open("train/configs/lavin_dit_tiny.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["tasks"] = ["foreground_segmentation", "video_frame_prediction"]
    cfg["vae"].update(stage1_steps=2, disc_start=3)
    cfg["vae"]["train"].update(steps=4, log_every=1, micro_batch=2)
    cfg["train"].update(steps=3, log_every=1, micro_batch=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_lavin_dit_demo_report(tmp_path):
    """A 4 + 3 step run: every task of the config evaluated for the untrained and trained models and the VAE
    ceiling, images and curves written, the report's verdict consistent with the metrics."""
    from train import lavin_dit_demo

    section, ok = lavin_dit_demo.run(str(tmp_path / "out"), _tiny_config(tmp_path), queries=1, sample_steps=3)
    out = tmp_path / "out" / "lavin_dit"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["metrics"]) == {"foreground_segmentation", "video_frame_prediction"}
    verdicts = []
    for task, r in m["metrics"].items():
        assert set(r) == {"untrained", "trained", "vae", "primary"}
        name, higher = r["primary"]["metric"], r["primary"]["higher_is_better"]
        assert (name, higher) == ("mse", False)
        assert ("iou" in r["trained"]) == (task == "foreground_segmentation")
        u, t = r["untrained"][name], r["trained"][name]
        assert r["primary"]["trained_better"] == (t > u if higher else t < u)
        verdicts.append(r["primary"]["trained_better"])
        assert np.isfinite(r["vae"]["mse"]) and (out / f"{task}.png").exists()
        assert f"lavin_dit/{task}.png" in section
    assert ok == all(verdicts) == m["all_tasks_better"]
    video = np.asarray(Image.open(out / "video_frame_prediction.png"))
    assert video.shape[0] == 2 * 5 * 32  # 5 frames stacked, upscaled 2x
    assert (out / "loss_vae.png").exists() and (out / "loss_dit.png").exists()
    assert len(m["curves"]["vae"]) == 4 and len(m["curves"]["dit"]) == 3
    assert (out / "report.md").read_text().count("](") == len(m["metrics"]) + 2  # paths relative to its folder


@pytest.mark.slow
def test_demo_writes_the_report(tmp_path, monkeypatch):
    """python -m train.demo end to end with the benchmarks skipped and a very short LaVin-DiT run (the default config
    is swapped for a tiny one): the backend table and the LaVin-DiT section land in report.md; the exit status
    follows the verdict."""
    from train import demo, lavin_dit_demo

    cfg = _tiny_config(tmp_path)
    real_run = lavin_dit_demo.run
    monkeypatch.setattr(lavin_dit_demo, "run", lambda out, **kw: real_run(out, cfg, **kw, sample_steps=3))
    # The CRIS part has its own end-to-end test (tests/train/test_cris_train.py); skipped here to keep this short.
    rc = demo.main(["--out", str(tmp_path / "demo"), "--skip-bench", "--queries", "1", "--skip-cris",
                    "--skip-unpair-seg"])
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Backends" in report and "joint_attention" in report and "## LaVin-DiT (tiny)" in report
    verdict = json.loads((tmp_path / "demo" / "lavin_dit" / "metrics.json").read_text())["all_tasks_better"]
    assert rc == (0 if verdict else 1)
    assert ("FAILED" in report) == (not verdict)
    assert os.path.exists(tmp_path / "demo" / "mmkernels.txt")
    assert torch.get_default_dtype() == torch.float32
