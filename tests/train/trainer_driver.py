"""A tiny seeded regression task for the trainer tests, and a driver that trains it under torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.trainer_driver --out DIR
--config '{"steps": 8, ...}' --result NAME`` trains :class:`TinyNet` on :class:`RegressionSet` with the shared
trainer (TrainConfig fields from ``--config``; ``group_key`` groups indices by ``i % 3``) and has rank 0 write
``DIR/NAME.pt`` = {"records", "weights" (final parameters, CPU), "ema"}. ``MMKERNELS_TRAIN_FAULT`` (see
train/trainer.py) makes it exit early, as a killed job would.

The model has dropout and the loss draws input noise from the global torch RNG, so an exact resume needs the RNG
states restored, and its loss asserts that every micro-batch holds one group only.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

GROUPS = 3


class TinyNet(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, d_out)
        # A frozen parameter: the trainer must leave it alone and keep it out of the EMA.
        self.out_scale = nn.Parameter(torch.linspace(0.5, 1.5, d_out), requires_grad=False)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x))))) * self.out_scale


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


class RegressionSet(Dataset):
    """``n`` samples {"x": [6], "y": [3], "group": int}: y = tanh(x W) + small noise, all from ``seed``."""

    def __init__(self, n: int = 96, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        w = torch.randn(6, 3, generator=g) / 6 ** 0.5
        self.y = torch.tanh(self.x @ w) * 2.0 + 0.05 * torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "group": i % GROUPS}


def group_key(i: int) -> int:
    return i % GROUPS


def loss_fn(model, batch, step):
    g = batch["group"]
    if not bool((g == g[0]).all()):
        raise AssertionError(f"micro-batch mixes groups {g.tolist()}")
    noise = 0.01 * torch.randn_like(batch["x"])
    pred = model(batch["x"] + noise)
    loss = F.mse_loss(pred.float(), batch["y"].float())
    err = (pred.detach().float() - batch["y"].float()).abs().mean()
    return loss, {"mae": float(err), f"group{int(g[0])}": float(loss.detach())}


def eval_fn(model, step):
    # Draws from the global RNG on purpose: the trainer must restore it, or the resumed run (which does not repeat
    # the evaluation at its checkpoint) would diverge.
    data = RegressionSet()
    x = data.x + 0.01 * torch.randn_like(data.x)
    with torch.no_grad():
        pred = model(x.to(next(model.parameters()).device))
    return {"mse": float(F.mse_loss(pred.float().cpu(), data.y))}


def full_weights(trainer) -> dict:
    """Every rank: the full parameters (gathered under ZeRO-3), as CPU tensors."""
    import deepspeed

    params = list(trainer.engine.module.named_parameters())
    if trainer.zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params}
    return {n: p.detach().cpu().clone() for n, p in params}


def main(argv=None):
    from train.trainer import Trainer, TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--result", default="result")
    ap.add_argument("--no-group", action="store_true")
    args = ap.parse_args(argv)
    kw = {"micro_batch": 2, "grad_accum": 2, "lr": 1e-2, "log_every": 1, "save_every": 3, "progress": False}
    kw.update(json.loads(args.config))
    cfg = TrainConfig(out_dir=args.out, **kw)
    trainer = Trainer(make_model(), loss_fn, RegressionSet(), cfg, group_key=None if args.no_group else group_key,
                      eval_fn=eval_fn)
    records = trainer.train()
    weights = full_weights(trainer)
    if trainer.rank == 0:
        torch.save({"records": records, "weights": weights, "ema": trainer.ema_state_dict()},
                   os.path.join(args.out, args.result + ".pt"))


if __name__ == "__main__":
    main()
