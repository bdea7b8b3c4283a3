"""In-context inference for LaVin-DiT (the official inference.py, spec §4), for images and videos.

A query is answered from k example pairs of one task: the "visual sentence" [in_1, tgt_1, ..., in_k, tgt_k, query]
is VAE-encoded (each element on its own, as the official code encodes each frame as a 1-frame clip; a video element
[3, 1+4m, H, W] is one clip), normalized for the DiT ((z - shift) * scale), and the target latent is sampled from
noise with the flow ODE (Euler, official grids) under classifier-free guidance, then decoded.

Classifier-free guidance combines the velocity given the full context with the velocity given the unconditional
context [zero frame, query] (``flow.uncond_context``). The two sequences differ in length and in RoPE positions (the
target sits at t = 2k+1 in one and t = 2 in the other). ``SampleConfig.cfg_mode`` picks how they run
(``JDiT.forward_with_cfg``): "two_pass" is the official two DiT passes per step; "batched" is one pass with both
sequences packed along the token axis (attention per sequence, every other layer once over all tokens). The two agree
up to floating-point summation order.

``SampleConfig.compile`` wraps the DiT of the denoising loop in ``torch.compile`` (shapes are fixed across steps, so it
compiles once per query shape); mode "reduce-overhead" adds CUDA graphs on GPU.

Randomness (official: unseeded global RNGs): here every draw comes from one ``torch.Generator`` seeded by ``seed``
(the posterior samples, then the initial noise, both drawn on the CPU as the official code does), so a seed
reproduces a result on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from models.lavin_dit import sampler
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.stvae import STVAE


@dataclass
class SampleConfig:
    steps: int = 20  # grid points; 20/30/40 are the official grids
    cfg_scale: float = 1.5  # the official CLI default
    posterior: str = "sample"  # "sample" (official) or "mean"
    seed: Optional[int] = 0
    cfg_mode: str = "two_pass"  # "two_pass" (official) or "batched" (one packed pass per step)
    compile: Optional[str] = None  # None, or a torch.compile mode: "default", "reduce-overhead", "max-autotune"
    compile_backend: str = "inductor"

    def __post_init__(self):
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"SampleConfig: cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"SampleConfig: compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"SampleConfig: steps must be an int >= 2 (grid points), got {self.steps!r}")


CFG_MODES = ("two_pass", "batched")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _CompiledDiT:
    """``forward`` and ``forward_with_cfg`` of a JDiT, each through ``torch.compile`` (the official inference.py
    compiles the module, but then calls the plain ``forward_with_cfg`` method, so its compile never runs)."""

    def __init__(self, dit: JDiT, mode: str, backend: str):
        opts = dict(mode=None if mode == "default" else mode, backend=backend, dynamic=False)
        self.forward = torch.compile(dit.forward, **opts)
        self.forward_with_cfg = torch.compile(dit.forward_with_cfg, **opts)


class InContextPipeline:
    """Answer queries from in-context example pairs with an ST-VAE and a J-DiT.

    Images are [3, H, W] and videos [3, T, H, W] tensors in [-1, 1] (H, W multiples of 16; T = 1 + 4m). The models
    run in their own dtype and device (bf16 on GPU in the official setup).
    """

    def __init__(self, vae: STVAE, dit: JDiT):
        if dit.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"InContextPipeline: the DiT takes {dit.config.in_channels} latent channels but the VAE "
                             f"makes {vae.config.latent_channels}")
        self.vae, self.dit = vae, dit
        self._compiled: dict = {}

    def _dit_for(self, cfg: SampleConfig):
        """The DiT whose ``forward`` / ``forward_with_cfg`` the loop calls: compiled copies are made once per
        (mode, backend) and kept, so later queries of the same shapes reuse the compiled graphs."""
        if cfg.compile is None:
            return self.dit
        key = (cfg.compile, cfg.compile_backend)
        if key not in self._compiled:
            self._compiled[key] = _CompiledDiT(self.dit, cfg.compile, cfg.compile_backend)
        return self._compiled[key]

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def _as_clip(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[0] != 3:
            raise ValueError(f"InContextPipeline: {what} must be an image [3, H, W] or a video [3, T, H, W], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return x if x.dim() == 4 else x.unsqueeze(1)

    @torch.no_grad()
    def encode(self, items: Sequence[torch.Tensor], posterior: str, generator: torch.Generator) -> torch.Tensor:
        """DiT latents [1, C, sum of latent frames, h, w] of the items, in order, each encoded on its own."""
        vae_dtype = next(self.vae.parameters()).dtype
        lat = []
        for x in items:
            post = self.vae.encode(x.unsqueeze(0).to(self.device, vae_dtype))
            if posterior == "sample":
                z = post.sample(generator)
            elif posterior == "mean":
                z = post.mode()
            else:
                raise ValueError(f"InContextPipeline: posterior must be 'sample' or 'mean', got {posterior!r}")
            lat.append(STVAE.to_dit_latent(z))
        return torch.cat(lat, dim=2)

    @torch.no_grad()
    def __call__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], query: torch.Tensor,
                 config: Optional[SampleConfig] = None, target_frames: Optional[int] = None) -> torch.Tensor:
        """The predicted target for ``query`` in [-1, 1] (fp32, on the CPU): [3, H, W] for an image query, else
        [3, T, H, W]. ``target_frames`` (video tasks) is the number of frames to predict, default the query's.
        Randomness: one generator seeded with ``config.seed`` draws the posterior samples, then the noise."""
        cfg = config or SampleConfig()
        return self.batch([pairs], [query], cfg, target_frames, seeds=[cfg.seed])[0]

    def _prepare(self, pairs, query, target_frames, what: str) -> tuple[list[torch.Tensor], int]:
        """The visual sentence of one query as clips [3, T, H, W], checked, and its number of target frames."""
        if len(pairs) < 1:
            raise ValueError(f"InContextPipeline: at least one example pair is needed{what}")
        clips = []
        for i, (a, b) in enumerate(pairs):
            clips += [self._as_clip(a, f"pairs[{i}][0]{what}"), self._as_clip(b, f"pairs[{i}][1]{what}")]
        q = self._as_clip(query, f"query{what}")
        clips.append(q)
        size = q.shape[-2:]
        for i, c in enumerate(clips):
            if c.shape[-2:] != size:
                raise ValueError(f"InContextPipeline: every image must have the query's size {tuple(size)}; item {i}"
                                 f"{what} is {tuple(c.shape[-2:])} (resize first, as the official code does)")
        T = target_frames if target_frames is not None else q.shape[1]
        r = self.vae.config.temporal_compression_ratio
        if isinstance(T, bool) or not isinstance(T, int) or T < 1 or (T - 1) % r:
            raise ValueError(f"InContextPipeline: target_frames must be 1 + {r}m, got {T!r}")
        return clips, T

    @torch.no_grad()
    def batch(self, pairs: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], queries: Sequence[torch.Tensor],
              config: Optional[SampleConfig] = None, target_frames: Optional[int] = None,
              seeds: Optional[Sequence[Optional[int]]] = None) -> list[torch.Tensor]:
        """Answer several queries in one batched sampling run: ``pairs[i]`` are query i's examples. Every query
        must give the same shapes (number of pairs, frames, size). Query i draws its posterior samples and noise from
        its own generator seeded ``seeds[i]`` (default ``config.seed + i``; None: unseeded), so each answer equals
        the one a single call with that seed gives, up to floating-point summation order. Returns one tensor per
        query, as ``__call__``."""
        cfg = config or SampleConfig()
        if len(queries) < 1 or len(pairs) != len(queries):
            raise ValueError(f"InContextPipeline.batch: need one list of pairs per query, got {len(pairs)} lists for "
                             f"{len(queries)} queries")
        if seeds is None:
            seeds = [None if cfg.seed is None else cfg.seed + i for i in range(len(queries))]
        if len(seeds) != len(queries):
            raise ValueError(f"InContextPipeline.batch: {len(seeds)} seeds for {len(queries)} queries")
        r = self.vae.config.temporal_compression_ratio
        conds, nulls, noises, T = [], [], [], None
        for i, (prs, q) in enumerate(zip(pairs, queries)):
            what = f" (query {i})" if len(queries) > 1 else ""
            clips, T_i = self._prepare(prs, q, target_frames, what)
            gen = torch.Generator().manual_seed(seeds[i]) if seeds[i] is not None else torch.Generator()
            cond = self.encode(clips, cfg.posterior, gen)
            nq = 1 + (clips[-1].shape[1] - 1) // r  # the query's latent frames
            null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -nq:]], dim=2)  # official: [0-frame, query]
            C, h, w = cond.shape[1], cond.shape[-2], cond.shape[-1]
            noise = torch.randn(1, C, 1 + (T_i - 1) // r, h, w, generator=gen)  # CPU fp32, as official
            if conds and (cond.shape != conds[0].shape or null.shape != nulls[0].shape or T_i != T):
                raise ValueError(f"InContextPipeline.batch: query {i}'s visual sentence has latent shape "
                                 f"{tuple(cond.shape)} and {T_i} target frames, but query 0's has "
                                 f"{tuple(conds[0].shape)} and {T}: batch only queries of one shape")
            conds.append(cond)
            nulls.append(null)
            noises.append(noise)
            T = T_i
        dit_dtype = next(self.dit.parameters()).dtype
        x = torch.cat(noises).to(self.device, dit_dtype)
        p = self.dit.config.patch_size
        cond_p, null_p = patchify(torch.cat(conds).to(dit_dtype), p), patchify(torch.cat(nulls).to(dit_dtype), p)
        dit = self._dit_for(cfg)

        def velocity(y, t):
            yp = patchify(y.to(dit_dtype), p)
            if cfg.cfg_scale == 1.0:
                return dit.forward(yp, t, cond_p)
            return dit.forward_with_cfg(yp, t, cond_p, null_p, cfg.cfg_scale, batched=cfg.cfg_mode == "batched")

        z = sampler.euler(velocity, x, sampler.time_grid(cfg.steps))
        vae_dtype = next(self.vae.parameters()).dtype
        out = self.vae.decode(STVAE.from_dit_latent(z).to(vae_dtype)).clamp(-1, 1).float().cpu()
        return [o[:, 0] if q.dim() == 3 and T == 1 else o for o, q in zip(out, queries)]
