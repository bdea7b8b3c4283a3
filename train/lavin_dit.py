"""``python -m train.lavin_dit --config train/configs/lavin_dit_tiny.yaml``: train LaVin-DiT with the shared trainer.

Two stages, each a :class:`train.trainer.Trainer` run in its own sub-directory of ``out_dir``:

1. ``vae/``: the ST-VAE (skipped when ``vae.weights`` names a checkpoint, e.g. the official stvae.pt): every frame of
   every in-context sample (inputs, targets, query, answer) is autoencoded; loss MSE + LPIPS (when ``vae.lpips``
   names local weights) + KL (models/lavin_dit/vae_loss.py). The adversarial term needs a second optimizer and is
   left to ``vae_loss.vae_train_step`` users; it is off here (``disc_start`` past the run).
2. ``dit/``: the J-DiT on the frozen VAE's latents, flow matching as the official transport (t logit-normal, t = 0
   noise, loss MSE + 0.1 L1 on the velocity), with ``uncond_ratio`` of the samples trained on the official
   unconditional context [zero frame, query].

Data: :class:`train.data.lavin_tasks.InContextDataset` on ShapesWorld (``data.manifest`` switches to a JSONL manifest
of real images/videos, read by :class:`train.data.manifest.ManifestDataset`). Batches hold one (task, k) group.

The YAML has sections ``model`` (J-DiT preset and overrides), ``vae`` (preset, weights, train: TrainConfig fields),
``data``, ``flow`` and ``train`` (TrainConfig fields for the DiT); see train/configs/lavin_dit_tiny.yaml.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Optional

import torch
import yaml

from models.lavin_dit import flow
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.convert import load_official
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.stvae import STVAE
from models.lavin_dit.vae_loss import VAELoss, VAELossConfig
from train.data.lavin_tasks import InContextDataset, collate
from train.data.shapes import ShapesWorld
from train.trainer import TrainConfig, Trainer


def _unwrap(model):
    return getattr(model, "module", model)


def build_dataset(cfg: dict):
    d = cfg.get("data", {})
    if d.get("manifest"):
        from train.data.manifest import ManifestDataset

        return ManifestDataset(d["manifest"], k=d.get("k", 2), size=tuple(d.get("size", (64, 64))))
    size = tuple(d.get("size", (32, 32)))
    world = ShapesWorld(seed=d.get("seed", 0), size=size)
    k = d.get("k", (1, 2))
    return InContextDataset(world, tasks=d.get("tasks"), k=tuple(k) if isinstance(k, list) else k,
                            length=d.get("length", 100_000), frames=d.get("frames", 5), seed=d.get("seed", 0))


def _clips(batch: dict) -> list[torch.Tensor]:
    """The visual sentence of a collated batch as [B, 3, T, H, W] clips: in_1, tgt_1, ..., in_k, tgt_k, query, answer."""
    ins, tgts = batch["inputs"], batch["targets"]  # [B, k, 3, T, H, W]
    out = []
    for j in range(ins.shape[1]):
        out += [ins[:, j], tgts[:, j]]
    return out + [batch["query"], batch["target"]]


class VAEObjective:
    """Stage 1 loss: every clip of the batch through the VAE (MSE + LPIPS + KL)."""

    def __init__(self, loss_cfg: VAELossConfig):
        self.criterion = VAELoss(loss_cfg)

    def __call__(self, model, batch, step):
        device = next(_unwrap(model).parameters()).device
        x = torch.cat(_clips(batch), 0).to(device)
        recon, post = model(x, sample_posterior=True)
        loss, logs = self.criterion.generator_loss(x, recon, post, step)
        return loss, {k: float(v) for k, v in logs.items() if k in ("mse", "lpips", "kl")}


class FlowObjective:
    """Stage 2 loss: flow matching of the answer's latent given the in-context latents, with CFG dropout."""

    def __init__(self, vae: STVAE, uncond_ratio: float = flow.UNCOND_RATIO, t_kind: str = "lognorm",
                 shift: float = 1.0):
        self.vae = vae.eval().requires_grad_(False)
        self.uncond_ratio, self.t_kind, self.shift = uncond_ratio, t_kind, shift

    @torch.no_grad()
    def latents(self, batch, device, dtype):
        """(cond [B, C, F_c, h, w], answer [B, C, F_x, h, w], query frames), DiT-normalized posterior samples."""
        lat = []
        for clip in _clips(batch):
            z = self.vae.encode(clip.to(device, next(self.vae.parameters()).dtype)).sample()
            lat.append(STVAE.to_dit_latent(z).to(dtype))
        return torch.cat(lat[:-1], 2), lat[-1], lat[-2].shape[2]

    def __call__(self, model, batch, step):
        net = _unwrap(model)
        p0 = next(net.parameters())
        cond, x1, nq = self.latents(batch, p0.device, p0.dtype)
        B, p = x1.shape[0], net.config.patch_size
        t = flow.sample_t(B, kind=self.t_kind, shift=self.shift).to(p0.device)
        x0 = torch.randn_like(x1)
        xt, u = flow.interpolate(x0, x1, t)
        drop = flow.drop_mask(B, self.uncond_ratio).to(p0.device)
        null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -nq:]], dim=2)
        total = x1.new_zeros((), dtype=torch.float32)
        for mask, ctx in ((~drop, cond), (drop, null)):  # two sequence lengths: two passes
            n = int(mask.sum())
            if n == 0:
                continue
            v = model(patchify(xt[mask], p), t[mask], patchify(ctx[mask], p))
            total = total + flow.flow_loss(v, u[mask]) * (n / B)
        return total, {"uncond_frac": float(drop.float().mean())}


def _train_config(section: dict, out_dir: str) -> TrainConfig:
    fields = dict(section)
    fields["out_dir"] = out_dir
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    return TrainConfig(**fields)


def train_vae(cfg: dict, out_dir: str, dataset) -> STVAE:
    v = cfg.get("vae", {})
    vae_cfg = STVAEConfig.tiny() if v.get("preset", "tiny") == "tiny" else STVAEConfig.official()
    if v.get("weights"):
        from models.common import read_state_dict

        return load_official(STVAE(vae_cfg), read_state_dict(v["weights"]))
    vae = STVAE(vae_cfg)
    loss_cfg = VAELossConfig(kl_weight=v.get("kl_weight", 1e-6), lpips_path=v.get("lpips"),
                             disc_start=10 ** 12)  # no discriminator in this loop (see the module docstring)
    trainer = Trainer(vae, VAEObjective(loss_cfg), dataset, _train_config(v.get("train", {}), os.path.join(out_dir, "vae")),
                      collate_fn=collate, group_key=dataset.key)
    trainer.train()
    return _final_weights(trainer)


def _final_weights(trainer: Trainer):
    """The trained model on every rank: the EMA weights when EMA is on (they live on rank 0 and are broadcast)."""
    import torch.distributed as dist

    model = copy.deepcopy(trainer.engine.module).float()
    if trainer.config.ema_decay is None:
        return model
    if trainer.rank == 0:
        model = trainer.ema_model().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    return model


def build_dit_config(cfg: dict) -> JDiTConfig:
    m = dict(cfg.get("model", {}))
    preset = m.pop("preset", "tiny")
    return JDiTConfig.preset(preset, **m)


def build_dit(cfg: dict) -> JDiT:
    return JDiT(build_dit_config(cfg))


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out-dir", default=None, help="overrides the config's out_dir")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    out_dir = args.out_dir or cfg.get("out_dir", "runs/lavin_dit")
    dataset = build_dataset(cfg)
    vae = copy.deepcopy(train_vae(cfg, out_dir, dataset)).float()
    dit = build_dit(cfg)
    fl = cfg.get("flow", {})
    objective = FlowObjective(vae, fl.get("uncond_ratio", flow.UNCOND_RATIO), fl.get("t_kind", "lognorm"),
                              fl.get("shift", 1.0))
    trainer = Trainer(dit, objective, dataset, _train_config(cfg.get("train", {}), os.path.join(out_dir, "dit")),
                      collate_fn=collate, group_key=dataset.key)
    objective.vae.to(next(trainer.engine.module.parameters()).device)  # the frozen VAE follows the DiT's device
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
