"""Low-rank adapters and the stage-2 semantic adapter (thesis §3.3, Fig. 3.5, eq. 3.7; spec §6, §11.6).

:class:`LoRALinear` is the official ``lib/models/utils.py`` LoRA linear (loralib-style, spec §6): a frozen base
``weight`` [out, in] (and frozen ``bias``), trainable ``lora_A`` [r, in] (kaiming-uniform, a = sqrt 5) and ``lora_B``
[out, r] (zeros), ``scaling = lora_alpha / r``::

    y = x W^T + b + scaling * (x A^T) B^T

``train(False)`` merges ``scaling * B @ A`` into ``weight`` in place (one GEMM at eval) and ``train(True)`` un-merges.
Two deliberate differences from loralib, both invisible to the maths:

* un-merging restores the base weight **bit for bit** (a copy taken at merge time, a non-persistent buffer that moves
  with ``.to()``), since ``(W + D) - D`` is not ``W`` in floating point (and far from it in bf16);
* the state dict always holds the **un-merged** base weight, whatever the mode, and loading into a merged module
  re-merges with the loaded LoRA factors, so checkpoints never depend on the mode they were saved in.

:class:`SemanticAdapter` is our design of the thesis' "low-rank adapters on the multi-scale features, upsampled and
fused by an MLP, then mask pooling" (the official module is not released; spec §11.6 lists what is unknown):

1. **Low-rank adapters.** Every input map ``x_l`` (default the four ConvNeXt maps res2, res3, res4 and
   ``clip_vis_dense`` (res5 after ``norm_pre``; 192/384/768/1536 wide officially)) gets a residual low-rank transform
   ``x'_l = x_l + scaling * B_l A_l x_l`` per pixel: a :class:`LoRALinear` whose frozen base is the identity (so the
   adapter starts from CLIP's features, rank 8, alpha 1 as the official config), applied as a 1x1 convolution.
2. **Upsample and fuse (MLP).** ``h = GELU(sum_l up(P_l x'_l))`` at the grid of the finest input map, with ``P_l`` a
   Linear C_l -> ``hidden_dim`` and ``up`` bilinear (align_corners=False). Summing per-level projections is exactly one
   Linear over the concatenation of the upsampled maps (projection and bilinear upsampling commute, both linear), but
   never materialises a 2880-wide map at stride 4. Then the MLP's output layer ``O``: hidden_dim -> C_res5 (no
   bias, **zero-initialised**).
3. **Enhanced feature and pooling (eq. 3.7).** The enhanced feature is ``x^e = x'_res5 + O h``, pooled under each mask
   with ``mmkernels.mask_pool`` (official mode) and then, in ``region.region_embeddings``, projected by CLIP's frozen
   ``visual_prediction_forward`` into the text space (our interfaces put the adapter before CLIP's projector, so that
   region and text embeddings share CLIP's space without a new projector). The two terms of ``x^e`` live on different
   grids (res5's own, and the finest level's), and mask pooling is linear in the features, so the pooled ``x^e`` is
   computed as ``mask_pool(x'_res5, m) + O mask_pool(h, m)``, each term pooled at its own grid: this keeps the frozen
   path bit-identical at initialisation (``B_l = 0``, ``O = 0``: the adapted region embedding IS the frozen CLIP's,
   tested) and never builds a C_res5-wide map at stride 4.

Gradients: ``lora_B`` of ``clip_vis_dense`` and ``O`` get gradients from the first step (the other factors once
``O`` is non-zero); the CLIP features are computed without grad (the backbone is frozen) and the projector is frozen
but differentiable.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "SemanticAdapter", "mark_only_lora_trainable"]


class LoRALinear(nn.Module):
    """A Linear with a frozen base and a trainable rank-``r`` update (module docstring).

    Args:
        in_features, out_features: the Linear's sizes.
        r: the rank (>= 1; official 8).
        lora_alpha: the update's scale numerator (official 1): ``scaling = lora_alpha / r``.
        bias: whether the base has a (frozen) bias.
        merge_weights: merge on ``train(False)`` / un-merge on ``train(True)`` (loralib's flag; default True).
        base_weight: an initial base weight [out, in] (copied); default nn.Linear's init (kaiming-uniform a = sqrt 5,
            bias uniform(+-1/sqrt(in))).

    Input ``x`` [..., in] -> [..., out].
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 1.0, bias: bool = True,
                 merge_weights: bool = True, base_weight: Optional[torch.Tensor] = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoRALinear: '{name}' must be a positive int, got {v!r}")
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
            raise ValueError(f"LoRALinear: 'lora_alpha' must be a finite number, got {lora_alpha!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / r
        self.merge_weights = bool(merge_weights)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.register_buffer("_base_weight", None, persistent=False)
        self.reset_parameters()
        if base_weight is not None:
            if not isinstance(base_weight, torch.Tensor) or tuple(base_weight.shape) != (out_features, in_features):
                raise ValueError(f"LoRALinear: 'base_weight' must be a tensor [{out_features}, {in_features}], got "
                                 f"{getattr(base_weight, 'shape', type(base_weight).__name__)}")
            with torch.no_grad():
                self.weight.copy_(base_weight)

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base, kaiming-uniform(a = sqrt 5) for lora_A, zeros for lora_B (loralib)."""
        self._unmerge()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def identity(cls, features: int, r: int = 8, lora_alpha: float = 1.0, **kw) -> "LoRALinear":
        """A LoRALinear whose frozen base is the identity (no bias): ``y = x + scaling * B A x``."""
        return cls(features, features, r, lora_alpha, bias=False, base_weight=torch.eye(features), **kw)

    @property
    def merged(self) -> bool:
        return self._base_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _merge(self) -> None:
        if self.merged:
            return
        with torch.no_grad():
            self._base_weight = self.weight.detach().clone()
            self.weight.add_(self.delta_weight().to(self.weight.dtype))

    def _unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._base_weight)
        self._base_weight = None

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if self.merge_weights:
            if mode:
                self._unmerge()
            else:
                self._merge()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear: input must end in {self.in_features} features, got shape {tuple(x.shape)}")
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    # The state dict holds the un-merged base weight in either mode (module docstring).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self._base_weight
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_merged = self.merged
        self._unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self._merge()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, bias={self.bias is not None}, merged={self.merged}")


def mark_only_lora_trainable(module: nn.Module) -> nn.Module:
    """loralib's ``mark_only_lora_as_trainable``: freeze every parameter of ``module`` except ``lora_*`` ones."""
    for name, p in module.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1].startswith("lora_"))
    return module


def _linear_nchw(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear applied per pixel of an NCHW map (a 1x1 convolution) -> NCHW."""
    return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SemanticAdapter(nn.Module):
    """The stage-2 semantic adapter (module docstring).

    Args:
        channels: the backbone's ``{name: channels}`` (``CLIPBackbone.channels``); must include ``out_feature``.
        in_features: the maps to adapt and fuse (a subset of ``channels``; default res2, res3, res4,
            clip_vis_dense).
        out_feature: the map whose (adapted) features CLIP's projector reads (``clip_vis_dense``, = res5).
        rank, alpha: the LoRA rank and alpha of every level (official config RANK 8, alpha 1).
        hidden_dim: the fusion MLP's width.

    Attributes: ``lora`` (ModuleDict of :class:`LoRALinear`, identity bases), ``proj`` (ModuleDict of Linear C_l ->
    hidden_dim), ``out`` (Linear hidden_dim -> C_out, no bias, zero-init).
    """

    def __init__(self, channels: Mapping[str, int], in_features: Sequence[str] = ("res2", "res3", "res4",
                                                                                 "clip_vis_dense"),
                 out_feature: str = "clip_vis_dense", rank: int = 8, alpha: float = 1.0, hidden_dim: int = 256):
        super().__init__()
        in_features = tuple(in_features)
        if not in_features or len(set(in_features)) != len(in_features):
            raise ValueError(f"SemanticAdapter: 'in_features' must be distinct feature names, got {in_features!r}")
        missing = [f for f in in_features + (out_feature,) if f not in channels]
        if missing:
            raise ValueError(f"SemanticAdapter: features {missing} are not in the backbone's channels "
                             f"{sorted(channels)}")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"SemanticAdapter: 'hidden_dim' must be a positive int, got {hidden_dim!r}")
        self.in_features, self.out_feature = in_features, out_feature
        self.channels = {k: int(channels[k]) for k in in_features + (out_feature,)}
        self.lora = nn.ModuleDict({f: LoRALinear.identity(self.channels[f], rank, alpha) for f in in_features})
        self.proj = nn.ModuleDict({f: nn.Linear(self.channels[f], hidden_dim) for f in in_features})
        self.out = nn.Linear(hidden_dim, self.channels[out_feature], bias=False)
        nn.init.zeros_(self.out.weight)

    def adapt(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(``x'_out`` [N, C_out, h5, w5] the adapted projector input map, ``h`` [N, hidden, hf, wf] the fused
        hidden map at the finest input grid)."""
        for f in self.in_features + (self.out_feature,):
            if f not in features:
                raise ValueError(f"SemanticAdapter: feature {f!r} missing from the inputs (got {sorted(features)})")
        adapted = {f: _linear_nchw(self.lora[f], features[f]) for f in self.in_features}
        base = adapted[self.out_feature] if self.out_feature in adapted else features[self.out_feature]
        finest = max(self.in_features, key=lambda f: features[f].shape[-2] * features[f].shape[-1])
        size = tuple(features[finest].shape[-2:])
        h = None
        for f in self.in_features:
            p = _linear_nchw(self.proj[f], adapted[f])
            if tuple(p.shape[-2:]) != size:
                p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            h = p if h is None else h + p
        return base, F.gelu(h)

    def forward(self, features: Mapping[str, torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        """Pooled enhanced features ``mask_pool(x^e, m)`` [N, Q, C_out] (module docstring, step 3).

        Args:
            features: the backbone's maps (``CLIPBackbone.forward``), each [N, C_l, h_l, w_l].
            mask_logits: [N, Q, Hm, Wm] canvas-aligned mask logits (any resolution).
        """
        import mmkernels

        base, h = self.adapt(features)
        pooled = mmkernels.mask_pool(base, mask_logits, mode="official")
        pooled_h = mmkernels.mask_pool(h, mask_logits, mode="official")
        return pooled + self.out(pooled_h)
