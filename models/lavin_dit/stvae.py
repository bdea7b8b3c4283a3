"""ST-VAE: LaVin-DiT's causal 3D video autoencoder, the official architecture on mmkernels ops.

Semantics and state-dict keys follow the official ``AutoencoderKLSTVAE`` (../shared/specs/lavin_dit.md §2): images
and videos [B, 3, T, H, W] in [-1, 1] (T = 1 + 4k, H and W multiples of 8) map to a 16-channel latent
[B, 16, 1 + k, H/8, W/8] and back. The module loads the official ``stvae.pt`` strictly (see ``convert.py``).

Two implementations of every layer live side by side, chosen per model (``STVAE(cfg, fused=...)``):

* ``fused=True`` (ours): activations in channels_last_3d; every causal 3D conv, the 1x1x1 shortcuts and the
  per-frame 3x3 upsampler convs run through :func:`mmkernels.causal_conv3d` (no padded or replicated copies);
  GroupNorm -> [SpatialNorm modulation] -> SiLU is one :func:`mmkernels.group_norm_silu` call; the SpatialNorm 1x1
  convs run at latent resolution and the nearest upsample happens inside the norm kernel (an exact rewrite allowed by
  the spec, gotcha 22: a 1x1 conv commutes with nearest resizing).
* ``fused=False``: the official composition (replicate-pad by concatenation, F.pad, cuDNN conv3d, nn.GroupNorm,
  F.interpolate, SiLU), the benchmark baseline and the parity reference in the tests.

Beyond the official module:

* **Temporal streaming** (``encode(x, chunk_frames=n)`` / ``decode(z, chunk_frames=n)``): the video runs chunk by chunk
  with causal-conv caches carrying the last frames of the previous chunk, so activation memory is bounded by the chunk.
  GroupNorm statistics span all frames in the official model, so a chunked pass cannot see them directly. With
  ``norm_stats="exact"`` (the default) they are gathered in sweeps: sweep k runs every chunk up to the k-th norm and
  accumulates its statistics (the earlier norms use the statistics of earlier sweeps), and the last sweep produces the
  output. This costs about (number of norms)/2 passes over the video but equals the full pass (up to fp rounding)
  with bounded memory. ``norm_stats="chunk"`` normalizes each chunk with its own statistics, one pass, as the
  official temporal tiling does; it is an approximation.
* **Spatial tiling** (``enable_tiling()``): the official overlap-and-blend tiling (linear ramps over a quarter tile,
  blended tiles modified in place as in diffusers), with the tile size of the official inference.py (512) as default.
* **Trainable**: parameters are not frozen and encode/decode are differentiable (the official module freezes itself
  and wraps both in no_grad). ``DiagonalGaussian.kl`` sums over every non-batch dim (the official sums over [1, 2, 3]
  only, which is wrong for 5-D latents, gotcha 18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from models.lavin_dit.config import STVAEConfig

# The official inference.py normalizes latents for the DiT as (z - SHIFT) * SCALE (spec §2.11).
LATENT_SHIFT = 0.032470703125
LATENT_SCALE = 1.08936170213


# ------------------------------------------------------------------------------------------------------------------
# How one forward runs: fused or official ops, and the streaming state.


class _SweepDone(Exception):
    """Raised inside a chunk once the statistics the current sweep gathers have been accumulated."""


@dataclass
class _Stream:
    norm_stats: str  # "exact" | "chunk"
    stats: dict = field(default_factory=dict)  # norm call index -> (mean, rstd), each [B, G] fp64 (exact mode)
    target: int = -1  # exact mode: the norm call whose statistics this sweep accumulates
    acc: Optional[list] = None  # [sum, sum of squares, count] for the target (fp64)
    eps: float = 0.0  # the target norm's eps
    caches: dict = field(default_factory=dict)  # id(conv) -> the last kt-1 input frames of the previous chunk
    first: bool = True  # the current chunk holds frame 0
    calls: int = 0  # norm calls so far in the current chunk


@dataclass
class _Run:
    fused: bool
    stream: Optional[_Stream] = None


def _official_causal_conv3d(x, weight, bias, stride=1):
    """The official STVAECausalConv3d: frame 0 replicated kt-1 times in front, zeros around H and W, conv3d."""
    kt, kh, kw = weight.shape[2:]
    if kt > 1:
        x = torch.cat([x[:, :, :1]] * (kt - 1) + [x], dim=2)
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2))
    return F.conv3d(x, weight, bias, stride=(stride, 1, 1))


def _resize_official(zq: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """SpatialNorm's nearest resize of the latent to f's (T, H, W): frame 0 separately when T is odd and > 1."""
    T = size[0]
    if T > 1 and T % 2 == 1 and zq.shape[2] > 1:
        head = F.interpolate(zq[:, :, :1], size=(1, *size[1:]), mode="nearest")
        tail = F.interpolate(zq[:, :, 1:], size=(T - 1, *size[1:]), mode="nearest")
        return torch.cat([head, tail], dim=2)
    return F.interpolate(zq, size=tuple(size), mode="nearest")


def _integer_nearest(size: Sequence[int], small: Sequence[int]) -> bool:
    """Whether the official resize from ``small`` to ``size`` is an integer-factor nearest map that
    mmkernels.group_norm_silu can do in-kernel (scale/shift read at latent resolution)."""
    T, H, W = size
    t, h, w = small
    if H % h or W % w:
        return False
    if t == T or t == 1:
        return True
    if T % 2 == 1:
        return t > 1 and (T - 1) % (t - 1) == 0
    return T % t == 0


def _group_stats(x: torch.Tensor, groups: int):
    """Per-(batch, group) sum, sum of squares and count of x, in fp64 (for statistics gathered across chunks)."""
    xd = x.double().reshape(x.shape[0], groups, -1)
    return [xd.sum(-1), (xd * xd).sum(-1), xd.shape[-1]]


def _norm_act(run: _Run, gn: nn.GroupNorm, x, scale=None, shift=None, silu=True):
    """SiLU(GroupNorm(x) [* scale + shift]). scale/shift: x's (T, H, W), or an integer-factor smaller one (fused)."""
    st = run.stream
    if st is not None and st.norm_stats == "exact":
        return _norm_act_given_stats(st, gn, x, scale, shift, silu)
    if run.fused:
        return mmkernels.group_norm_silu(x, gn.num_groups, gn.weight, gn.bias, gn.eps, scale=scale, shift=shift,
                                         silu=silu)
    y = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    if scale is not None:
        y = y * scale + shift
    return F.silu(y) if silu else y


def _norm_act_given_stats(st: _Stream, gn: nn.GroupNorm, x, scale, shift, silu):
    """Exact-statistics streaming: normalize with whole-video statistics gathered by earlier sweeps."""
    idx = st.calls
    st.calls += 1
    G = gn.num_groups
    if idx == st.target:
        part = _group_stats(x, G)
        st.eps = gn.eps
        if st.acc is None:
            st.acc = part
        else:
            st.acc = [a + p for a, p in zip(st.acc, part)]
        raise _SweepDone
    mean, rstd = st.stats[idx]
    B, C = x.shape[:2]
    cd = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics arithmetic, fp64 for fp64 models
    y = ((x.to(cd).reshape(B, G, -1) - mean.to(cd)[..., None]) * rstd.to(cd)[..., None]).reshape(x.shape)
    if gn.weight is not None:
        per_c = (1, C) + (1,) * (x.dim() - 2)
        y = y * gn.weight.to(cd).view(per_c) + gn.bias.to(cd).view(per_c)
    y = y.to(x.dtype)
    if scale is not None:
        size = x.shape[2:]
        if tuple(scale.shape[2:]) != tuple(size):
            scale, shift = _resize_official(scale, size), _resize_official(shift, size)
        y = y * scale + shift
    return F.silu(y) if silu else y


# ------------------------------------------------------------------------------------------------------------------
# Layers (parameter names as the official module).


class CausalConv3d(nn.Module):
    """STVAECausalConv3d: kernel (k, k, k), temporal stride, frame-0 replicate padding in time, zeros in space.
    Keys: ``conv.weight`` [cout, cin, k, k, k], ``conv.bias`` [cout]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv3d(cin, cout, k, stride=(stride, 1, 1), padding=0)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        w, b = self.conv.weight, self.conv.bias
        if not run.fused:
            return _official_causal_conv3d(x, w, b, self.stride)
        st = run.stream
        if st is None or w.shape[2] == 1:
            return mmkernels.causal_conv3d(x, w, b, stride=self.stride)
        y, st.caches[id(self)] = mmkernels.causal_conv3d(x, w, b, stride=self.stride, cache=st.caches.get(id(self)),
                                                          return_cache=True)
        return y


class SpatialNorm3D(nn.Module):
    """STVAESpatialNorm3D: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's size."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=eps, affine=True)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, run: _Run, silu: bool = True) -> torch.Tensor:
        size = f.shape[2:]
        if run.fused and _integer_nearest(size, zq.shape[2:]):
            # 1x1 convs at latent resolution; the kernel reads them at the nearest source position.
            return _norm_act(run, self.norm_layer, f, self.conv_y(zq, run), self.conv_b(zq, run), silu)
        zq = _resize_official(zq, size)
        return _norm_act(run, self.norm_layer, f, self.conv_y(zq, run), self.conv_b(zq, run), silu)


class ResnetBlock3D(nn.Module):
    """STVAEResnetBlock3D: x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with a plain 1x1x1 Conv3d shortcut
    (key ``conv_shortcut``) when the channel count changes. Norms are GroupNorm, or SpatialNorm3D in the decoder."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: Optional[int] = None):
        super().__init__()

        def norm(c):
            if zq_channels is None:
                return nn.GroupNorm(groups, c, eps=eps, affine=True)
            return SpatialNorm3D(c, zq_channels, groups, eps)

        self.norm1 = norm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.norm2 = norm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    @staticmethod
    def _norm(norm, x, zq, run):
        if isinstance(norm, SpatialNorm3D):
            return norm(x, zq, run)
        return _norm_act(run, norm, x)

    def forward(self, x: torch.Tensor, run: _Run, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(self._norm(self.norm1, x, zq, run), run)
        h = self.conv2(self._norm(self.norm2, h, zq, run), run)
        if self.conv_shortcut is not None:
            sc = self.conv_shortcut
            x = mmkernels.causal_conv3d(x, sc.weight, sc.bias) if run.fused else sc(x)
        return x + h


def _per_frame(x: torch.Tensor):
    """[B, C, T, H, W] -> [B*T, C, H, W] (a view for channels_last_3d input)."""
    B, C, T, H, W = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)


def _from_frames(y: torch.Tensor, B: int, T: int) -> torch.Tensor:
    return y.reshape(B, T, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _pool_time(x: torch.Tensor) -> torch.Tensor:
    """Average pairs of frames; with odd T, frame 0 is kept and the rest are paired (T' = 1 + (T-1)/2)."""
    T = x.shape[2]
    if T == 1:
        return x
    if T % 2:
        return torch.cat([x[:, :, :1], _avg_pairs(x[:, :, 1:])], dim=2)
    return _avg_pairs(x)


def _avg_pairs(x: torch.Tensor) -> torch.Tensor:
    # The CPU has no bf16/fp16 avg_pool3d kernel: there it pools in fp32 and rounds once, which is what the CUDA kernel
    # computes (an fp32 sum of the pair, halved, rounded to x's dtype).
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return F.avg_pool3d(x.float(), (2, 1, 1), (2, 1, 1)).to(x.dtype)
    return F.avg_pool3d(x, (2, 1, 1), (2, 1, 1))


class Downsample3D(nn.Module):
    """STVAEDownsample3D: optional temporal pooling, then zero padding right/bottom by 1 and a stride-2 3x3 Conv2d
    on every frame. Key ``conv`` ([C, C, 3, 3])."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        if self.compress_time:
            if run.stream is not None and not run.stream.first and x.shape[2] % 2:
                raise ValueError("STVAE streaming: a chunk after the first reached a time-downsampling layer with an "
                                 f"odd number of frames ({x.shape[2]}); chunk_frames must be a multiple of the "
                                 "temporal compression ratio")
            x = _pool_time(x)
        B, T = x.shape[0], x.shape[2]
        y = F.conv2d(F.pad(_per_frame(x), (0, 1, 0, 1)), self.conv.weight, self.conv.bias, stride=2)
        return _from_frames(y, B, T)


class Upsample3D(nn.Module):
    """STVAEUpsample3D: nearest x2 (frame 0 in space only, the other frames in time and space when compress_time),
    then a 3x3 Conv2d (padding 1) on every frame. Key ``conv`` ([C, C, 3, 3])."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        first = run.stream is None or run.stream.first
        T = x.shape[2]
        if self.compress_time and not first:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.compress_time and T > 1:
            head = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            tail = F.interpolate(x[:, :, 1:], scale_factor=2.0, mode="nearest")
            x = torch.cat([head, tail], dim=2)
        else:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        if run.fused:
            # A per-frame 3x3 conv with padding 1 is a causal conv3d with kt = 1.
            return mmkernels.causal_conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias)
        B, T = x.shape[0], x.shape[2]
        return _from_frames(self.conv(_per_frame(x)), B, T)


class _Stage(nn.Module):
    """A down or up block: ``resnets`` plus an optional ``downsamplers.0`` / ``upsamplers.0``."""

    def __init__(self, resnets, sampler_name: Optional[str] = None, sampler: Optional[nn.Module] = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))
        self._sampler_name = sampler_name if sampler is not None else None

    def forward(self, x, run, zq=None):
        for r in self.resnets:
            x = r(x, run, zq)
        if self._sampler_name is not None:
            x = getattr(self, self._sampler_name)[0](x, run)
        return x


class _Mid(nn.Module):
    def __init__(self, resnets):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)

    def forward(self, x, run, zq=None):
        for r in self.resnets:
            x = r(x, run, zq)
        return x


class Encoder(nn.Module):
    """STVAEEncoder3D (prefix ``encoder.``): [B, 3, T, H, W] -> moments [B, 2*latent, 1+(T-1)/4, H/8, W/8]."""

    def __init__(self, cfg: STVAEConfig):
        super().__init__()
        ch, G, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            res = [ResnetBlock3D(cin if j == 0 else cout, cout, G, eps) for j in range(cfg.layers_per_block)]
            last = i == len(ch) - 1
            blocks.append(_Stage(res, "downsamplers", None if last else Downsample3D(cout, i < cfg.time_stages)))
            cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _Mid([ResnetBlock3D(ch[-1], ch[-1], G, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(G, ch[-1], eps=eps, affine=True)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        x = self.conv_in(x, run)
        for blk in self.down_blocks:
            x = blk(x, run)
        x = self.mid_block(x, run)
        return self.conv_out(_norm_act(run, self.norm_out, x), run)


class Decoder(nn.Module):
    """STVAEDecoder3D (prefix ``decoder.``): z [B, latent, t, h, w] -> [B, 3, 1+4(t-1), 8h, 8w]. Every norm is a
    SpatialNorm3D conditioned on z itself."""

    def __init__(self, cfg: STVAEConfig):
        super().__init__()
        ch, G, eps, zc = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0], 3)
        self.mid_block = _Mid([ResnetBlock3D(ch[0], ch[0], G, eps, zc) for _ in range(2)])
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            res = [ResnetBlock3D(cin if j == 0 else cout, cout, G, eps, zc) for j in range(cfg.layers_per_block + 1)]
            last = i == len(ch) - 1
            blocks.append(_Stage(res, "upsamplers", None if last else Upsample3D(cout, i < cfg.time_stages)))
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = SpatialNorm3D(ch[-1], zc, G, eps)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, run: _Run) -> torch.Tensor:
        x = self.conv_in(z, run)
        x = self.mid_block(x, run, z)
        for blk in self.up_blocks:
            x = blk(x, run, z)
        return self.conv_out(self.norm_out(x, z, run), run)


class DiagonalGaussian:
    """The posterior: ``moments`` [B, 2C, ...] split into mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps. As in the official code, eps is drawn in fp32 on the generator's device (the CPU for the
        global generator) and then moved to the mean's device and dtype, so CPU seeds reproduce GPU runs."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], summed over every non-batch dim (fp32)."""
        m, v, lv = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * (m * m + v - 1.0 - lv).flatten(1).sum(1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x`` per sample [B], summed over every non-batch dim (fp32)."""
        d = (x.float() - self.mean.float()) ** 2 / self.var.float()
        return 0.5 * (math.log(2.0 * math.pi) + self.logvar.float() + d).flatten(1).sum(1)


# ------------------------------------------------------------------------------------------------------------------


class STVAE(nn.Module):
    """The ST-VAE (``AutoencoderKLSTVAE``); see the module docstring.

    Args:
        config: architecture (``STVAEConfig.official()`` by default, ``STVAEConfig.tiny()`` for tests).
        fused: run on mmkernels ops (True) or on the official composition of torch ops (False).
    """

    def __init__(self, config: Optional[STVAEConfig] = None, fused: bool = True):
        super().__init__()
        config = config or STVAEConfig.official()
        self.config = config
        self.fused = fused
        self.use_tiling = False
        self.tile_sample_min_size = config.tile_sample_min_size
        self.tile_overlap = config.tile_overlap
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # -- public API ----------------------------------------------------------------------------------------------

    def enable_tiling(self, tile_sample_min_size: Optional[int] = None, overlap: Optional[float] = None) -> None:
        """Encode/decode frames larger than the tile in overlapping spatial tiles blended linearly (official)."""
        size = self.tile_sample_min_size if tile_sample_min_size is None else int(tile_sample_min_size)
        r = self.config.spatial_ratio
        if size < r or size % r:
            raise ValueError(f"STVAE.enable_tiling: tile_sample_min_size must be a positive multiple of {r}, got {size}")
        ov = self.tile_overlap if overlap is None else float(overlap)
        if not 0.0 <= ov < 1.0:
            raise ValueError(f"STVAE.enable_tiling: overlap must be in [0, 1), got {ov}")
        if int(size * (1 - ov)) % r:
            raise ValueError(f"STVAE.enable_tiling: the tile stride int({size} * (1 - {ov})) must be a multiple of {r} "
                             "so that every tile's frame size stays a multiple of it")
        self.use_tiling, self.tile_sample_min_size, self.tile_overlap = True, size, ov

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.conv.weight

    def encode(self, x: torch.Tensor, *, chunk_frames: Optional[int] = None,
               norm_stats: str = "exact") -> DiagonalGaussian:
        """x [B, in_channels, T, H, W] (T = 1 + 4k; H, W multiples of 8) -> posterior over [B, 16, 1 + k, H/8, W/8].

        chunk_frames: stream the video in chunks (the first holds 1 + chunk_frames frames, the others chunk_frames,
        a multiple of the temporal compression ratio); None runs all frames at once. norm_stats: see the module
        docstring ("exact" or "chunk"; only used when streaming).
        """
        self._check_video("encode", "x", x, self.config.in_channels, sample=True)
        x = self._prepare(x)
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            moments = self._tiled_encode(x, chunk_frames, norm_stats)
        else:
            moments = self._run(self.encoder, x, chunk_frames, self.config.temporal_compression_ratio, norm_stats)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, *, chunk_frames: Optional[int] = None, norm_stats: str = "exact") -> torch.Tensor:
        """z [B, 16, t, h, w] (the raw latent, not the DiT-normalized one) -> [B, out_channels, 1 + 4(t-1), 8h, 8w].

        chunk_frames: stream in chunks of latent frames (the first holds 1 + chunk_frames); None runs all at once.
        """
        self._check_video("decode", "z", z, self.config.latent_channels, sample=False)
        z = self._prepare(z)
        latent_tile = self.tile_sample_min_size // self.config.spatial_ratio
        if self.use_tiling and max(z.shape[-2:]) > latent_tile:
            return self._tiled_decode(z, chunk_frames, norm_stats)
        return self._run(self.decoder, z, chunk_frames, 1, norm_stats)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior), decoding a posterior sample (or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @staticmethod
    def to_dit_latent(z: torch.Tensor) -> torch.Tensor:
        """The official inference.py normalization of a VAE latent for the DiT."""
        return (z - LATENT_SHIFT) * LATENT_SCALE

    @staticmethod
    def from_dit_latent(latent: torch.Tensor) -> torch.Tensor:
        return latent / LATENT_SCALE + LATENT_SHIFT

    # -- internals -------------------------------------------------------------------------------------------------

    def _check_video(self, fn, name, x, channels, sample):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"STVAE.{fn}: argument '{name}' must be a tensor, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"STVAE.{fn}: argument '{name}' must be [B, {channels}, T, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"STVAE.{fn}: argument '{name}' must be floating point, got {x.dtype}")
        T, H, W = x.shape[2:]
        if sample:
            r, s = self.config.temporal_compression_ratio, self.config.spatial_ratio
            if T < 1 or (T - 1) % r:
                raise ValueError(f"STVAE.{fn}: argument '{name}' must have T = 1 + {r}k frames, got T={T}")
            if H % s or W % s or H == 0 or W == 0:
                raise ValueError(f"STVAE.{fn}: argument '{name}' must have H and W positive multiples of {s}, "
                                 f"got {H}x{W}")
        elif T < 1 or H < 1 or W < 1:
            raise ValueError(f"STVAE.{fn}: argument '{name}' must have T, H, W >= 1, got {tuple(x.shape)}")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        p = self.encoder.conv_in.conv.weight
        if x.device != p.device:
            raise ValueError(f"STVAE: input is on {x.device} but the model is on {p.device}")
        x = x.to(p.dtype)
        # Our kernels want channels last (Cin contiguous); the official path runs NCDHW as cuDNN's default.
        return x.contiguous(memory_format=torch.channels_last_3d) if self.fused else x.contiguous()

    def _run(self, part: nn.Module, x: torch.Tensor, chunk_frames: Optional[int], ratio: int,
             norm_stats: str) -> torch.Tensor:
        if chunk_frames is None:
            return part(x, _Run(self.fused))
        if norm_stats not in ("exact", "chunk"):
            raise ValueError(f"STVAE: norm_stats must be 'exact' or 'chunk', got {norm_stats!r}")
        if not self.fused:
            raise ValueError("STVAE: streaming (chunk_frames) needs the fused ops (fused=True)")
        if not isinstance(chunk_frames, int) or chunk_frames < ratio or chunk_frames % ratio:
            raise ValueError(f"STVAE: chunk_frames must be a positive multiple of {ratio}, got {chunk_frames!r}")
        T = x.shape[2]
        bounds = [0] + list(range(1 + chunk_frames, T, chunk_frames)) + [T]
        chunks = [x[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if norm_stats == "chunk":
            return torch.cat(self._sweep(part, chunks, _Stream("chunk")), dim=2)
        stats: dict = {}
        while True:
            st = _Stream("exact", stats=stats, target=len(stats))
            outs = self._sweep(part, chunks, st)
            if st.acc is None:  # no norm left to gather: this sweep ran every chunk to the end
                return torch.cat(outs, dim=2)
            s, ss, n = st.acc
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0.0)
            stats[len(stats)] = (mean, torch.rsqrt(var + st.eps))  # fp64, cast where used

    def _sweep(self, part, chunks, st: _Stream):
        outs = []
        for i, c in enumerate(chunks):
            st.first, st.calls = i == 0, 0
            try:
                outs.append(part(c, _Run(True, st)))
            except _SweepDone:
                pass
        return outs

    def _tiled_encode(self, x, chunk_frames, norm_stats):
        r = self.config.spatial_ratio
        fn = lambda t: self._run(self.encoder, t, chunk_frames, self.config.temporal_compression_ratio, norm_stats)  # noqa: E731
        return self._tiled(x, fn, self.tile_sample_min_size, self.tile_sample_min_size // r)

    def _tiled_decode(self, z, chunk_frames, norm_stats):
        r = self.config.spatial_ratio
        fn = lambda t: self._run(self.decoder, t, chunk_frames, 1, norm_stats)  # noqa: E731
        return self._tiled(z, fn, self.tile_sample_min_size // r, self.tile_sample_min_size)

    def _tiled(self, x, fn, tile_in: int, tile_out: int) -> torch.Tensor:
        """The official spatial tiling: tiles of ``tile_in`` at stride tile_in*(1-overlap), each blended with the
        (already blended) tile above and the one to the left over ``tile_out*overlap`` rows/columns, then cropped to
        tile_out - extent and concatenated."""
        stride = int(tile_in * (1 - self.tile_overlap))
        extent = int(tile_out * self.tile_overlap)
        limit = tile_out - extent
        H, W = x.shape[-2:]
        rows = [[fn(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, W, stride)] for i in range(0, H, stride)]
        out_rows = []
        for i, row in enumerate(rows):
            parts = []
            for j in range(len(row)):
                tile = row[j]
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, extent, dim=-2)
                if j > 0:
                    tile = _blend(row[j - 1], tile, extent, dim=-1)
                row[j] = tile  # later tiles blend against the blended version, as the official in-place code does
                parts.append(tile[..., :limit, :limit])
            out_rows.append(torch.cat(parts, dim=-1))
        return torch.cat(out_rows, dim=-2)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first e = min(extent, sizes) rows (dim=-2) or columns (dim=-1) replaced by
    a[-e + y] * (1 - y/e) + b[y] * (y/e)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    cd = torch.promote_types(b.dtype, torch.float32)
    w = torch.arange(e, dtype=cd, device=b.device) / e
    w = w.view(-1, 1) if dim == -2 else w
    head = a.narrow(dim, a.shape[dim] - e, e).to(cd) * (1 - w) + b.narrow(dim, 0, e).to(cd) * w
    return torch.cat([head.to(b.dtype), b.narrow(dim, e, b.shape[dim] - e)], dim=dim)
