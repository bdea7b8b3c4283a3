"""J-DiT: LaVin-DiT's joint diffusion transformer, the official architecture on mmkernels ops.

Semantics and state-dict keys follow the official ``LaVinDiT`` (../shared/specs/lavin_dit.md §1); the official
checkpoint ``lavin_dit.safetensors`` loads strictly (``convert.load_official``).

Layout (as the official ``forward``): ``cond`` [B, T_c, H, W, p*p*C] and ``x`` [B, T_x, H, W, p*p*C] are patchified
latents, channels last, features ordered (ph, pw, c) with c fastest; H, W are token-grid sizes; ``t`` [B] is the
flow time in [0, 1] (t = 0 noise, t = 1 data; not scaled by 1000). The output is the velocity for the target,
[B, C, T_x, p*H, p*W] in fp32.

Per block and stream s (cond, x), with m_s = Linear(SiLU(t_s)) split into scale_msa, gate_msa, scale_mlp,
gate_mlp:

    s <- s + tanh(gate_msa) * RMSNorm(JointAttn((1 + scale_msa) * RMSNorm(s)))
    s <- s + tanh(gate_mlp) * RMSNorm(SwiGLU((1 + scale_mlp) * RMSNorm(s)))

Our ops: :func:`mmkernels.adarn` fuses each RMSNorm with its modulation, gate and residual add (one pass each);
:class:`mmkernels.nn.JointAttention` runs QK RMSNorm + 3D RoPE + GQA attention over [cond; x] in one fused op. The
last block's cond-stream update is skipped: it never reaches the output (an exact optimization, spec §1.3).

Deviations from the official numerics, on purpose: RoPE is applied in fp32 with one rounding (official: bf16
arithmetic with a rounding after every multiply and add), inside the attention op.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mmkernels
from mmkernels.nn import JointAttention, Segment
from models.lavin_dit import sampler
from models.lavin_dit.config import JDiTConfig

FREQ_DIM = 256  # sinusoidal timestep features


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: [cos(t*f), sin(t*f)] (cos first; f_i = 10000^(-i/128), fp32), then Linear-SiLU-Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    """down_proj(SiLU(gate_proj(h)) * up_proj(h)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def _drop_path(y: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's branch with probability ``rate``, scale the kept ones by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return y
    keep = 1.0 - rate
    mask = torch.empty((y.shape[0],) + (1,) * (y.dim() - 1), device=y.device, dtype=y.dtype).bernoulli_(keep)
    return y * mask / keep


def _residual(res, branch, gate, rate, training):
    """res + tanh(gate) * RMSNorm(branch), with stochastic depth on the gated branch when training."""
    if rate > 0.0 and training:
        return res + _drop_path(mmkernels.adarn(branch, gate=gate), rate, training)
    return mmkernels.adarn(branch, gate=gate, residual=res)


class JDiTBlock(nn.Module):
    """One joint block: per-stream modulation, sandwich RMSNorms, joint attention and SwiGLU MLPs."""

    def __init__(self, cfg: JDiTConfig, drop_path: float = 0.0):
        super().__init__()
        D = cfg.hidden_size
        self.joint_attn = JointAttention(D, cfg.num_heads, cfg.num_kv_heads, streams=("cond", "x"), norm="full",
                                         norm_eps=1e-6, rope_split=cfg.resolved_rope_split(), rope_base=cfg.rope_base)
        self.cond_mlp = SwiGLU(D, cfg.mlp_hidden)
        self.x_mlp = SwiGLU(D, cfg.mlp_hidden)
        self.cond_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D))
        self.x_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D))
        self.drop_path = drop_path
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, cond, x, t_cond, t_x, grid: Optional[Sequence[int]], last: bool = False, segments=None):
        B, D = x.shape[0], x.shape[-1]
        mc = self.cond_modulation(t_cond).view(B, 4, 1, D).unbind(1)  # scale_msa, gate_msa, scale_mlp, gate_mlp
        mx = self.x_modulation(t_x).view(B, 4, 1, D).unbind(1)
        ac, ax = self.joint_attn(mmkernels.adarn(cond, scale=mc[0]), mmkernels.adarn(x, scale=mx[0]), grid=grid,
                                 segments=segments)
        x = _residual(x, ax, mx[1], self.drop_path, self.training)
        x = _residual(x, self.x_mlp(mmkernels.adarn(x, scale=mx[2])), mx[3], self.drop_path, self.training)
        if last:  # the cond stream of the last block never reaches the output
            return cond, x
        cond = _residual(cond, ac, mc[1], self.drop_path, self.training)
        cond = _residual(cond, self.cond_mlp(mmkernels.adarn(cond, scale=mc[2])), mc[3], self.drop_path,
                         self.training)
        return cond, x


class FinalLayer(nn.Module):
    """linear((1 + scale) * RMSNorm(x)), scale = adaLN_modulation(t_x); no shift, no gate."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, t_x: torch.Tensor) -> torch.Tensor:
        scale = self.adaLN_modulation(t_x).unsqueeze(1)
        return self.linear(mmkernels.adarn(x, scale=scale))


def _patch_embed(cfg: JDiTConfig) -> nn.Sequential:
    """Linear(p*p*C -> D) then LayerNorm (eps 1e-5): keys ``.0.*`` and ``.1.*``."""
    return nn.Sequential(nn.Linear(cfg.patch_dim, cfg.hidden_size), nn.LayerNorm(cfg.hidden_size, eps=1e-5))


class JDiT(nn.Module):
    """The joint diffusion transformer (official ``LaVinDiT``); see the module docstring for layouts."""

    def __init__(self, config: Optional[JDiTConfig] = None):
        super().__init__()
        cfg = config or JDiTConfig()
        self.config = cfg
        D = cfg.hidden_size
        self.cond_embedder = _patch_embed(cfg)
        self.x_embedder = _patch_embed(cfg)
        self.t_embedder = TimestepEmbedder(D)
        self.prompt_embed = nn.Parameter(torch.zeros(1, D))
        self.answer_embed = nn.Parameter(torch.zeros(1, D))
        rates = [cfg.drop_path * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([JDiTBlock(cfg, r) for r in rates])
        self.final_layer = FinalLayer(D, cfg.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier-uniform Linears with zero bias; type embeddings and timestep MLP normal(0.02);
        modulation linears and the final linear zero (so an untrained model predicts 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.joint_attn.reset_parameters()
        nn.init.normal_(self.prompt_embed, std=0.02)
        nn.init.normal_(self.answer_embed, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            for mod in (blk.cond_modulation[1], blk.x_modulation[1]):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for blk in self.blocks:
            blk.grad_checkpointing = bool(enabled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        """Velocity [B, C, T_x, p*H, p*W] (fp32) for the patchified target ``x`` [B, T_x, H, W, p*p*C] at time ``t``
        [B], given the patchified context ``cond`` [B, T_c, H, W, p*p*C]. Extra keyword arguments are ignored, as in
        the official signature."""
        del kwargs
        cfg = self.config
        self._check_inputs("forward", x, t, cond=cond)
        B, Tx, H, W, _ = x.shape
        out = self._tokens(cond.reshape(B, -1, cfg.patch_dim), x.reshape(B, -1, cfg.patch_dim), t,
                           grid=(cond.shape[1] + Tx, H, W))
        return unpatchify(out, Tx, H, W, cfg.patch_size, cfg.in_channels).float()

    def _tokens(self, cond, x, t, grid=None, segments=None):
        """The trunk on token sequences: cond [B, L_c, p*p*C], x [B, L_x, p*p*C] -> [B, L_x, p*p*C] (the final
        layer's output, model dtype), with one RoPE ``grid`` over [cond; x] or packed ``segments``."""
        c = self.cond_embedder(cond.to(self.cond_embedder[0].weight.dtype))
        h = self.x_embedder(x.to(self.x_embedder[0].weight.dtype))
        temb = self.t_embedder(t)
        t_cond, t_x = temb + self.prompt_embed, temb + self.answer_embed
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            if blk.grad_checkpointing and torch.is_grad_enabled():
                c, h = checkpoint(blk, c, h, t_cond, t_x, grid, i == n - 1, segments, use_reentrant=False)
            else:
                c, h = blk(c, h, t_cond, t_x, grid, last=i == n - 1, segments=segments)
        return self.final_layer(h, t_x)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_null: torch.Tensor,
                         cfg_scale: float, *, batched: bool = True) -> torch.Tensor:
        """The guided velocity ``v_u + cfg_scale * (v_c - v_u)`` [B, C, T_x, p*H, p*W] (fp32), where v_c is the
        velocity given ``cond`` [B, T_c, H, W, p*p*C] and v_u given ``cond_null`` [B, T_n, H, W, p*p*C] (the
        official unconditional context [zero frame, query]: T_n < T_c in general), for the same ``x``
        [B, T_x, H, W, p*p*C] and ``t`` [B].

        ``batched=False`` is the official ``forward_with_cfg``: two forward passes, since the two sequences differ
        in length. ``batched=True`` runs one pass: per sample, the conditional and the unconditional sequence are
        packed one after the other along the token axis ([cond; cond_null] in the cond stream, [x; x] in the target
        stream), every per-token layer runs once over all of them, and attention runs per sequence with its own
        RoPE grid (:class:`mmkernels.nn.Segment`), so each sequence sees exactly what it sees alone. The two modes
        agree up to floating-point summation order.
        """
        cfg = self.config
        self._check_inputs("forward_with_cfg", x, t, cond=cond, cond_null=cond_null)
        B, Tx, H, W, _ = x.shape
        if not batched:
            v_c, v_u = self(x, t, cond), self(x, t, cond_null)
        else:
            Tc, Tn, hw = cond.shape[1], cond_null.shape[1], H * W
            xt = x.reshape(B, -1, cfg.patch_dim)
            segments = (Segment((Tc * hw, Tx * hw), (Tc + Tx, H, W)), Segment((Tn * hw, Tx * hw), (Tn + Tx, H, W)))
            packed_cond = torch.cat([cond.reshape(B, -1, cfg.patch_dim), cond_null.reshape(B, -1, cfg.patch_dim)], 1)
            out = self._tokens(packed_cond, torch.cat([xt, xt], 1), t, segments=segments)
            v_c, v_u = (unpatchify(o, Tx, H, W, cfg.patch_size, cfg.in_channels).float() for o in out.chunk(2, dim=1))
        return sampler.cfg_combine(v_c, v_u, cfg_scale)

    def _check_inputs(self, where: str, x, t, **contexts) -> None:
        """``x`` and every context a patchified latent [B, T, H, W, p*p*C], the contexts sharing B, H and W with
        ``x``, and ``t`` [B]; a ValueError naming the argument otherwise."""
        for name, v in (("x", x), *contexts.items()):
            if not isinstance(v, torch.Tensor) or v.dim() != 5 or v.shape[-1] != self.config.patch_dim:
                raise ValueError(f"JDiT.{where}: argument '{name}' must be a patchified latent [B, T, H, W, "
                                 f"{self.config.patch_dim}], got {getattr(v, 'shape', type(v).__name__)}")
        for name, v in contexts.items():
            if v.shape[0] != x.shape[0] or v.shape[2:4] != x.shape[2:4]:
                raise ValueError(f"JDiT.{where}: {name!r} {tuple(v.shape)} must share B, H and W with 'x' "
                                 f"{tuple(x.shape)}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"JDiT.{where}: argument 't' must be a tensor of shape [{B}], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, p*H, p*W] -> [B, T, H, W, p*p*C], features ordered (ph, pw, c) with c fastest (official)."""
    B, C, T, Hp, Wp = latent.shape
    if Hp % p or Wp % p:
        raise ValueError(f"patchify: latent H and W ({Hp}, {Wp}) must be multiples of the patch size {p}")
    x = latent.reshape(B, C, T, Hp // p, p, Wp // p, p)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, T, Hp // p, Wp // p, p * p * C)


def unpatchify(tokens: torch.Tensor, T: int, H: int, W: int, p: int, C: int) -> torch.Tensor:
    """[B, T*H*W, p*p*C] -> [B, C, T, p*H, p*W] (the inverse of :func:`patchify`)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, T, H, W, p, p, C)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, T, H * p, W * p)
