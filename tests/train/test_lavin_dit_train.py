"""train/lavin_dit.py: the flow objective recomputed by hand, and both training stages end to end on ShapesWorld."""

import json
import math

import torch
import yaml

from mmkernels.testing import assert_close
from models.lavin_dit import flow
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.stvae import STVAE
from train import lavin_dit
from train.data.lavin_tasks import InContextDataset, collate
from train.data.shapes import ShapesWorld


def _batch():
    ds = InContextDataset(ShapesWorld(seed=0, size=(32, 32)), tasks=["depth_estimation"], k=2, length=8)
    return collate([ds[0], ds[1], ds[2]])


def test_flow_objective_by_hand():
    torch.manual_seed(0)
    vae, dit = STVAE(STVAEConfig.tiny()), JDiT(JDiTConfig.preset("tiny"))
    with torch.no_grad():
        for p in dit.parameters():  # non-zero output layer so the loss depends on the model
            p.add_(0.02 * torch.randn_like(p))
    batch = _batch()
    obj = lavin_dit.FlowObjective(vae, uncond_ratio=0.5)
    torch.manual_seed(3)
    loss, logs = obj(dit, batch, 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.blocks[0].parameters())
    assert dit.final_layer.linear.weight.grad.abs().sum() > 0
    # By hand, drawing in the same order: posterior samples clip by clip, t, x0, the CFG dropout mask.
    torch.manual_seed(3)
    with torch.no_grad():
        clips = [batch["inputs"][:, 0], batch["targets"][:, 0], batch["inputs"][:, 1], batch["targets"][:, 1],
                 batch["query"], batch["target"]]
        lat = [STVAE.to_dit_latent(vae.encode(c).sample()) for c in clips]
        cond, x1 = torch.cat(lat[:-1], 2), lat[-1]
        t = torch.sigmoid(torch.randn(3))
        x0 = torch.randn_like(x1)
        drop = torch.rand(3) < 0.5
        xt, u = t.view(-1, 1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1, 1)) * x0, x1 - x0
        null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -1:]], 2)
        per = []
        for i in range(3):
            ctx = null[i:i + 1] if drop[i] else cond[i:i + 1]
            v = dit(patchify(xt[i:i + 1], 2), t[i:i + 1], patchify(ctx, 2))
            d = (v - u[i:i + 1]).flatten()
            per.append(d.square().mean() + 0.1 * d.abs().mean())
        want = torch.stack(per).mean()
    assert_close(loss.detach(), want, dtype=torch.float32, what="flow loss")
    assert logs["uncond_frac"] == float(drop.float().mean())


def test_vae_objective_lowers_reconstruction_error():
    torch.manual_seed(0)
    vae = STVAE(STVAEConfig.tiny())
    obj = lavin_dit.VAEObjective(lavin_dit.VAELossConfig(disc_start=10 ** 9))
    batch = _batch()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    first = None
    for step in range(12):
        loss, logs = obj(vae, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = logs["mse"] if first is None else first
    assert logs["mse"] < 0.7 * first, (first, logs["mse"])


def test_main_runs_both_stages(tmp_path):
    with open("train/configs/lavin_dit_tiny.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["vae"]["train"].update(steps=3, micro_batch=2, save_every=3, log_every=1, zero_stage=0)
    cfg["train"].update(steps=3, micro_batch=2, save_every=3, log_every=1, zero_stage=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert lavin_dit.main(["--config", str(path), "--out-dir", str(tmp_path / "run")]) == 0
    for stage in ("vae", "dit"):
        lines = [json.loads(x) for x in (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in lines if "loss" in r]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert flow.UNCOND_RATIO == cfg["flow"]["uncond_ratio"]


def test_every_config_builds():
    import glob

    for path in sorted(glob.glob("train/configs/lavin_dit_*.yaml")):
        with open(path) as f:
            cfg = yaml.safe_load(f)
        dit_cfg = lavin_dit.build_dit_config(cfg)
        tc = lavin_dit._train_config(cfg["train"], "/tmp/unused")
        assert tc.steps > 0 and dit_cfg.hidden_size % dit_cfg.num_heads == 0, path
    assert lavin_dit.build_dit_config({"model": {"preset": "3.4B"}}) == JDiTConfig.preset("3.4B")
