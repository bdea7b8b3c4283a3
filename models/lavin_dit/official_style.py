"""The official LaVin-DiT composition in plain PyTorch, on the weights of our :class:`~models.lavin_dit.jdit.JDiT`: the
baseline that the sampling benchmark (bench/models/lavin_dit_sampling.py) times against our fused model, and a
second, structurally different path for parity checks.

It follows the official ``LaVinDiT.forward`` / ``forward_with_cfg`` and inference.py (../shared/specs/lavin_dit.md
§1.3-1.9, §4) op by op, with the released code's structure and none of our fusions:

* every RMSNorm is its own op: the sandwich norms (no affine) as ``F.rms_norm`` standing in for apex
  ``FusedRMSNorm`` (fp32 statistics, one rounding to the activation dtype), then the modulation ``(1 + scale) * n``
  and the gate ``res + tanh(gate) * n`` as separate elementwise ops in the activation dtype;
* joint attention is :func:`mmkernels.ops.joint_attention.reference.official_style`: the QK RMSNorm per stream with
  apex's two roundings, heads split with ``view(...).contiguous()`` (einops ``rearrange`` in the official code),
  ``torch.cat`` of the cond and x streams, split/cat 3D RoPE in the activation dtype (cos/sin built in fp32, then
  rounded), KV heads ``repeat_interleave``-d for GQA, and ``F.scaled_dot_product_attention`` (the official code calls
  flash-attn with native GQA; SDPA on expanded KV heads is the stand-in named in spec §6);
* the last block's cond-stream update is computed, as the official code does (our model skips it: it never reaches
  the output);
* CFG as the official ``forward_with_cfg``: the state is [2B] (conditional half, unconditional half), each half is
  patchified and run through its own forward pass (the two contexts differ in length), and the guided velocity is
  returned for both halves.

Parameters are read from the wrapped JDiT (shared, not copied), so both paths run on the same weights. The patch
embedders (Linear + LayerNorm) and the timestep MLP are the same plain torch modules in both paths. The module runs
in the weights' dtype without autocast (the official code runs bf16 weights under bf16 autocast; every op here then
sees bf16 operands, as there).

:func:`sample` is the official inference.py around it: the 2k+1 context frames VAE-encoded as one batch of 1-frame
clips, posterior samples, the (z - shift) * scale normalization, the null context [zero frame, query], noise
repeated to the [2B] state, the Euler ODE over ``forward_with_cfg``, then the decode of row 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.ops.joint_attention import reference as ja_ref
from models.lavin_dit import sampler
from models.lavin_dit.jdit import JDiT, _drop_path, patchify, unpatchify
from models.lavin_dit.stvae import STVAE

NORM_EPS = 1e-6  # norm1/norm2/post_norm1/post_norm2/norm_final (apex FusedRMSNorm, no affine)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """apex ``FusedRMSNorm(D, elementwise_affine=False, eps=1e-6)``: fp32 statistics, the result rounded once."""
    return F.rms_norm(x, (x.shape[-1],), None, NORM_EPS)


def modulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Pre-norm with modulation (norm1/norm2, the final layer): ``(1 + scale) * RMSNorm(x)``, separate ops."""
    return (1 + scale) * rms_norm(x)


def gated_residual(res: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, rate: float = 0.0,
                   training: bool = False) -> torch.Tensor:
    """Post-norm with gate (post_norm1/post_norm2): ``res + DropPath(tanh(gate) * RMSNorm(branch))``."""
    return res + _drop_path(torch.tanh(gate) * rms_norm(branch), rate, training)


class OfficialStyleJDiT(nn.Module):
    """The official J-DiT forward on ``model``'s parameters (see the module docstring). ``forward`` has the official
    signature and layouts of :meth:`JDiT.forward`; ``forward_with_cfg`` is the official CFG entry point."""

    def __init__(self, model: JDiT):
        super().__init__()
        if not isinstance(model, JDiT):
            raise TypeError(f"OfficialStyleJDiT: 'model' must be a JDiT, got {type(model).__name__}")
        if model.config.rope_base != 10000.0:
            raise ValueError(f"OfficialStyleJDiT: the official RoPE has base 10000, the model has "
                             f"{model.config.rope_base}")
        self.model = model  # a submodule: its parameters are this module's parameters (shared, not copied)
        self.config = model.config

    def _block(self, blk, c, x, t_cond, t_x, grid):
        attn = blk.joint_attn
        mc = blk.cond_modulation(t_cond).unsqueeze(1).chunk(4, dim=-1)  # scale_msa, gate_msa, scale_mlp, gate_mlp
        mx = blk.x_modulation(t_x).unsqueeze(1).chunk(4, dim=-1)
        hc, hx = modulate(c, mc[0]), modulate(x, mx[0])
        qs = [attn.cond_q(hc), attn.x_q(hx)]
        ks = [attn.cond_k(hc), attn.x_k(hx)]
        vs = [attn.cond_v(hc), attn.x_v(hx)]
        oc, ox = ja_ref.official_style(qs, ks, vs, [attn.cond_qnorm.weight, attn.x_qnorm.weight],
                                       [attn.cond_knorm.weight, attn.x_knorm.weight], attn.norm_eps, grid,
                                       attn.rope_split, attn.num_heads, attn.num_kv_heads, attn.head_dim ** -0.5)
        rate, training = blk.drop_path, self.training
        c = gated_residual(c, attn.cond_proj(oc), mc[1], rate, training)
        x = gated_residual(x, attn.x_proj(ox), mx[1], rate, training)
        c = gated_residual(c, blk.cond_mlp(modulate(c, mc[2])), mc[3], rate, training)
        x = gated_residual(x, blk.x_mlp(modulate(x, mx[2])), mx[3], rate, training)
        return c, x

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        """Velocity [B, C, T_x, p*H, p*W] (fp32) for patchified ``x`` [B, T_x, H, W, p*p*C] and ``cond``
        [B, T_c, H, W, p*p*C] at flow time ``t`` [B] (the official ``LaVinDiT.forward``)."""
        del kwargs
        m, cfg = self.model, self.config
        m._check_inputs("OfficialStyleJDiT.forward", x, t, cond=cond)
        B, Tx, H, W, _ = x.shape
        Tc = cond.shape[1]
        dtype = m.x_embedder[0].weight.dtype
        c = m.cond_embedder(cond.reshape(B, -1, cfg.patch_dim).to(dtype))
        h = m.x_embedder(x.reshape(B, -1, cfg.patch_dim).to(dtype))
        temb = m.t_embedder(t)
        t_cond, t_x = temb + m.prompt_embed, temb + m.answer_embed
        grid = (Tc + Tx, H, W)
        for blk in m.blocks:
            c, h = self._block(blk, c, h, t_cond, t_x, grid)
        final = m.final_layer
        scale = final.adaLN_modulation(t_x).unsqueeze(1)
        out = final.linear(modulate(h, scale))
        return unpatchify(out, Tx, H, W, cfg.patch_size, cfg.in_channels).contiguous().float()

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, conds: Sequence[torch.Tensor],
                         cfg_scale: float) -> torch.Tensor:
        """The official CFG step: ``x`` [2B, C, F, 2H, 2W] (conditional half first), ``t`` [2B], ``conds`` = (cond,
        cond_null) channels-first latents (they may differ in frames). Two forward passes; returns [eps; eps] with
        eps = v_u + cfg_scale * (v_c - v_u) in fp32."""
        cond, cond_null = conds
        p = self.config.patch_size
        xa, xb = x.chunk(2, dim=0)
        ta, tb = t.chunk(2, dim=0)
        dtype = self.model.x_embedder[0].weight.dtype
        v_c = self(patchify(xa.to(dtype), p), ta, patchify(cond.to(dtype), p))
        v_u = self(patchify(xb.to(dtype), p), tb, patchify(cond_null.to(dtype), p))
        eps = sampler.cfg_combine(v_c, v_u, cfg_scale)
        return torch.cat([eps, eps], dim=0)


@torch.no_grad()
def sample(vae: STVAE, model: OfficialStyleJDiT, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
           query: torch.Tensor, *, steps: int = 20, cfg_scale: float = 1.5, seed: Optional[int] = 0) -> torch.Tensor:
    """The official inference.py for one image query (spec §4.4-4.8) on ``vae`` and ``model``: returns the predicted
    target [3, H, W] in [-1, 1] (fp32, CPU), like :class:`models.lavin_dit.pipeline.InContextPipeline`.

    Images are [3, H, W] in [-1, 1]. Random draws (official: unseeded global RNGs) come from one CPU generator seeded
    by ``seed``, in the order the pipeline draws them (one posterior sample per frame, in frame order, then the
    noise), so that the two implementations see the same numbers: the only differences left are the ops."""
    frames = [im for pair in pairs for im in pair] + [query]
    for i, f in enumerate(frames):
        if not isinstance(f, torch.Tensor) or f.shape != query.shape or f.dim() != 3 or f.shape[0] != 3:
            raise ValueError(f"sample: every image must be [3, H, W] like the query {tuple(query.shape)}; item {i} "
                             f"is {tuple(getattr(f, 'shape', ()))}")
    p0 = next(vae.parameters())
    # [2k+1, 3, 1, H, W]: every frame a 1-frame clip, the frames form the batch (official).
    clip = torch.stack(frames).unsqueeze(2).to(p0.device, p0.dtype)
    post = vae.encode(clip)
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    eps = torch.cat([torch.randn(post.mean[i:i + 1].shape, generator=gen) for i in range(len(frames))])
    z = post.mean + post.std * eps.to(post.mean.device, post.mean.dtype)  # DiagonalGaussian.sample, per frame
    cond = STVAE.to_dit_latent(z).permute(2, 1, 0, 3, 4)  # [2k+1, C, 1, h, w] -> [1, C, 2k+1, h, w] (official)
    cond_null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -1:]], dim=2)
    C, h, w = cond.shape[1], cond.shape[-2], cond.shape[-1]
    noise = torch.randn(1, C, 1, h, w, generator=gen)  # CPU fp32, as the official code draws it
    dit_dtype = model.model.x_embedder[0].weight.dtype
    dev = model.model.x_embedder[0].weight.device
    x = noise.repeat(2, 1, 1, 1, 1).to(dev, dit_dtype)
    conds = (cond.to(dev), cond_null.to(dev))

    def drift(y, t):
        return model.forward_with_cfg(y, t, conds, cfg_scale)

    out = sampler.euler(drift, x, sampler.time_grid(steps))[:1]
    img = vae.decode(STVAE.from_dit_latent(out).to(p0.dtype))
    return img[0, :, 0].clamp(-1, 1).float().cpu()
