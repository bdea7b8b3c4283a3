"""Flow matching for LaVin-DiT (the official ``lib/transport`` with Linear path and velocity prediction, spec §3).

Time convention (official): t = 0 is pure noise x0, t = 1 is data x1. The path is x_t = t*x1 + (1-t)*x0 and the
target velocity is u = x1 - x0. Training draws t logit-normal (t = sigmoid(u), u ~ N(0, 1)), optionally shifted by
t <- t / (t + s(1 - t)). The loss per sample is MSE(v, u) + 0.1 * L1(v, u), each averaged over the sample's elements,
and the batch loss is the mean over samples.

Latents here are channels-first [B, C, T, H, W] (VAE latents after the DiT normalization, see
``STVAE.to_dit_latent``); the model works on patchified tokens (``jdit.patchify``).

Unconditional training (classifier-free guidance): with probability ``uncond_ratio`` (0.1) a sample's context is
replaced by the official unconditional construction, [a zero latent frame, the query frame] (spec §4.5): the query is
the last context frame.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

LOSS_L1_WEIGHT = 0.1
UNCOND_RATIO = 0.1
EMA_DECAY = 0.9999


def sample_t(n: int, *, kind: str = "lognorm", shift: float = 1.0, generator: Optional[torch.Generator] = None,
             device=None) -> torch.Tensor:
    """n flow times in [0, 1] (fp32): "lognorm" (official training: sigmoid of a standard normal) or "uniform";
    then the time shift t / (t + shift*(1 - t)) (shift 1 is the identity)."""
    if kind == "lognorm":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    elif kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        raise ValueError(f"sample_t: kind must be 'lognorm' or 'uniform', got {kind!r}")
    if not shift > 0:
        raise ValueError(f"sample_t: shift must be > 0, got {shift}")
    return t / (t + shift * (1 - t)) if shift != 1.0 else t


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u): the point on the linear path at per-sample times t [B] and the target velocity x1 - x0."""
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def flow_loss(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The official loss: mean over samples of [MSE(v, u) + 0.1 * L1(v, u)], each averaged over the sample (fp32)."""
    d = (v.float() - u.float()).flatten(1)
    return (d.square().mean(1) + LOSS_L1_WEIGHT * d.abs().mean(1)).mean()


def uncond_context(cond: torch.Tensor) -> torch.Tensor:
    """The official unconditional context [zeros frame, query frame] for a context [B, C, T_c, H, W]."""
    return torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -1:]], dim=2)


def drop_mask(batch: int, ratio: float = UNCOND_RATIO, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which samples train unconditionally (a bool [batch] on the CPU)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop_mask: ratio must be in [0, 1], got {ratio}")
    return torch.rand(batch, generator=generator) < ratio


class EMA:
    """Exponential moving average of a model's parameters (fp32 shadow copies): p_ema <- d*p_ema + (1-d)*p."""

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Write the averaged parameters into ``model`` (cast to each parameter's dtype); returns it."""
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
        return model

    def averaged(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding the averaged parameters."""
        return self.copy_to(copy.deepcopy(model))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA.load_state_dict: parameter names differ: {sorted(missing)[:10]}")
        self.decay = float(state["decay"])
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}
