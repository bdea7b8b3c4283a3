"""Multi-scale CLIP region embeddings of mask proposals (thesis eq. 3.5 and the ensemble after it; spec §11.3).

For every scale ``s`` (default 896, 1024, 1152, the thesis' Table 3.8) and every mask ``i``::

    x_s   = normalise(resize(canvas, s x s))                       (bilinear, antialiased; skipped when s == S)
    f_s   = CLIP res5 of x_s (``clip_vis_dense``, stride 32)          (frozen backbone, no grad)
            or, with an adapter, the pooled enhanced feature of the adapter (adapter.py)
    p_s,i = mmkernels.mask_pool(f_s, m_i)                             (official MaskPooling: logits resized to the
                                                                       feature grid, sigmoid >= 0.5, masked mean)
    r_s,i = normalise(visual_prediction_forward(p_s,i))               (CLIP's head: [C_res5] -> [embed_dim])
    r_i   = normalise(mean_s r_s,i)                                   (the thesis' r-hat = sum_s r_s / S, then unit)

Masks are canvas-aligned logits at any resolution (the whole S x S canvas, content top-left, as the stage-1 model
predicts them), so one set of masks serves every scale.

Scales that are not a multiple of the backbone's stride 32 (e.g. 112 and 144 for a 128 canvas) are handled as the
official ``ImageList`` handles such images: the resized image is zero-padded (after normalisation) at the bottom /
right to the next multiple of 32, and the masks are resized to ``s x s`` and padded with a large negative logit, so a
mask never covers padding. At multiples of 32 (every official scale) the features' grid covers exactly the resized
canvas and nothing is padded or resized besides the pooling's own resize.

Normalisation: ``(x - pixel_mean) / pixel_std`` on 0..255 RGB, computed in fp32 and then cast to the backbone's
dtype, with the statistics given (keyword ``pixel_mean`` / ``pixel_std``), else the backbone config's when it has
one, else CLIP's (``config.PIXEL_MEAN`` / ``PIXEL_STD``, the official values).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.unpair_seg.config import PIXEL_MEAN, PIXEL_STD

__all__ = ["region_embeddings", "multiscale_region_embeddings", "check_scales", "resize_canvas", "scale_features"]

# A logit far below any real one: sigmoid(-1e4) is 0 in every dtype, so padding is never inside a mask.
_OFF = -1.0e4


def check_scales(scales) -> tuple[int, ...]:
    """``scales`` as a non-empty tuple of positive ints (ValueError otherwise)."""
    if isinstance(scales, (int, str)) or scales is None:
        raise ValueError(f"region_embeddings: 'scales' must be a sequence of positive ints, got {scales!r}")
    out = tuple(scales)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out):
        raise ValueError(f"region_embeddings: 'scales' must be a non-empty sequence of positive ints, got {scales!r}")
    return out


def _stats(backbone: nn.Module, device, dtype, pixel_mean=None,
           pixel_std=None) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = getattr(backbone, "cfg", None)
    mean = pixel_mean if pixel_mean is not None else getattr(cfg, "pixel_mean", PIXEL_MEAN)
    std = pixel_std if pixel_std is not None else getattr(cfg, "pixel_std", PIXEL_STD)
    if len(tuple(mean)) != 3 or len(tuple(std)) != 3:
        raise ValueError(f"region_embeddings: 'pixel_mean' and 'pixel_std' must have 3 values (RGB), got {mean!r}, "
                         f"{std!r}")
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1))


def _divisor(backbone: nn.Module) -> int:
    strides = getattr(backbone, "strides", None) or {}
    return int(strides.get("clip_vis_dense", 32))


def resize_canvas(images: torch.Tensor, scale: int) -> torch.Tensor:
    """0..255 canvases [N, 3, S, S] -> float [N, 3, scale, scale] (bilinear, antialiased when shrinking; the
    images themselves, as float, when ``scale == S``)."""
    x = images if images.is_floating_point() else images.float()
    if x.shape[-1] == scale and x.shape[-2] == scale:
        return x
    return F.interpolate(x, size=(scale, scale), mode="bilinear", align_corners=False, antialias=True)


def _check_inputs(images: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"region_embeddings: 'images' must be a tensor [N, 3, S, S] (0..255 RGB canvases), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"region_embeddings: 'images' must be square canvases, got {tuple(images.shape[-2:])}")
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 4:
        raise ValueError(f"region_embeddings: 'mask_logits' must be a tensor [N, Q, h, w], got "
                         f"{getattr(mask_logits, 'shape', type(mask_logits).__name__)}")
    if mask_logits.shape[0] != images.shape[0]:
        raise ValueError(f"region_embeddings: 'mask_logits' has batch {mask_logits.shape[0]}, 'images' "
                         f"{images.shape[0]}")
    if not mask_logits.is_floating_point():
        raise TypeError(f"region_embeddings: 'mask_logits' must be float logits, got {mask_logits.dtype}")


def scale_features(backbone: nn.Module, images: torch.Tensor, mask_logits: torch.Tensor, scale: int,
                   pixel_mean=None, pixel_std=None):
    """The frozen backbone's maps of the canvases at ``scale`` and the masks aligned to them: ``(features dict,
    masks [N, Q, h', w'])`` (module docstring; the masks come back unchanged when ``scale`` is a multiple of 32)."""
    div = _divisor(backbone)
    x = resize_canvas(images, scale)
    param = next(backbone.parameters())
    mean, std = _stats(backbone, x.device, torch.float32, pixel_mean, pixel_std)
    x = ((x.float() - mean) / std).to(param.dtype)
    masks = mask_logits
    pad = (-scale) % div
    if pad:
        x = F.pad(x, (0, pad, 0, pad))
        n, q = mask_logits.shape[:2]
        if q == 0:  # interpolate refuses empty inputs
            masks = mask_logits.new_full((n, 0, scale + pad, scale + pad), _OFF)
        else:
            masks = F.interpolate(mask_logits.float(), size=(scale, scale), mode="bilinear", align_corners=False)
            masks = F.pad(masks, (0, pad, 0, pad), value=_OFF).to(mask_logits.dtype)
    with torch.no_grad():
        feats = backbone(x)
    return feats, masks


def _project(backbone: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """visual_prediction_forward + L2 normalisation, [N, Q, C_res5] -> [N, Q, E] (Q = 0 allowed)."""
    n, q = pooled.shape[:2]
    if q == 0:
        e = int(getattr(backbone, "embed_dim"))
        return pooled.new_zeros(n, 0, e)
    return F.normalize(backbone.visual_prediction_forward(pooled), dim=-1)


def _ensemble(per_scale: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(torch.stack(per_scale).mean(0), dim=-1)


def multiscale_region_embeddings(backbone: nn.Module, images: torch.Tensor, mask_logits: torch.Tensor,
                                 scales: Sequence[int] = (896, 1024, 1152), adapter: Optional[nn.Module] = None,
                                 *, frozen: bool = True, adapter_scales: Optional[Sequence[int]] = None,
                                 pixel_mean: Optional[Sequence[float]] = None,
                                 pixel_std: Optional[Sequence[float]] = None) -> dict:
    """Frozen and adapted region embeddings from one backbone pass per scale (stage-2 training needs both).

    Returns a dict with
        ``"per_scale"``: [len(scales), N, Q, E] frozen per-scale unit embeddings r_s (no grad) when ``frozen``;
        ``"frozen"``: [N, Q, E] their ensemble (the thesis' r-hat) when ``frozen``;
        ``"adapted"``: [N, Q, E] the ensemble of the adapter's embeddings over ``adapter_scales`` (default:
        ``scales``) when ``adapter`` is given (differentiable in the adapter's parameters).
    ``pixel_mean`` / ``pixel_std`` override the normalisation statistics (module docstring).
    """
    _check_inputs(images, mask_logits)
    scales = check_scales(scales)
    adapter_scales = scales if adapter_scales is None else check_scales(adapter_scales)
    import mmkernels

    per_scale, adapted = [], []
    for s in dict.fromkeys(scales + (adapter_scales if adapter is not None else ())):
        feats, masks = scale_features(backbone, images, mask_logits, s, pixel_mean, pixel_std)
        if frozen and s in scales:
            with torch.no_grad():
                pooled = mmkernels.mask_pool(feats["clip_vis_dense"], masks, mode="official")
                per_scale.append(_project(backbone, pooled))
        if adapter is not None and s in adapter_scales:
            adapted.append(_project(backbone, adapter(feats, masks)))
    out = {}
    if frozen:
        out["per_scale"] = torch.stack(per_scale)
        out["frozen"] = _ensemble(per_scale)
    if adapter is not None:
        out["adapted"] = _ensemble(adapted)
    return out


def region_embeddings(backbone: nn.Module, images: torch.Tensor, mask_logits: torch.Tensor,
                      scales: Sequence[int] = (896, 1024, 1152), adapter: Optional[nn.Module] = None, *,
                      pixel_mean: Optional[Sequence[float]] = None,
                      pixel_std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Multi-scale CLIP region embeddings [N, Q, embed_dim] (unit vectors) of the masks (module docstring).

    Args:
        backbone: a ``CLIPBackbone`` (frozen; ``forward`` gives the maps, ``visual_prediction_forward`` the head).
        images: canvases [N, 3, S, S], RGB 0..255 (uint8 or float).
        mask_logits: [N, Q, h, w] canvas-aligned mask logits at any resolution.
        scales: the image sides (positive ints).
        adapter: a :class:`models.unpair_seg.adapter.SemanticAdapter` (or any module ``(features, masks) ->
            [N, Q, C_res5]``), replacing the plain pooling of res5; None gives the frozen CLIP's embeddings.
        pixel_mean, pixel_std: keyword-only RGB statistics of the 0..255 normalisation (default: the backbone
            config's, else CLIP's; pass the stage-1 model's ``cfg.pixel_mean`` / ``cfg.pixel_std``).

    Without an adapter the result carries no gradient; with one it is differentiable in the adapter's parameters
    (through the frozen projector).
    """
    out = multiscale_region_embeddings(backbone, images, mask_logits, scales, adapter, frozen=adapter is None,
                                       pixel_mean=pixel_mean, pixel_std=pixel_std)
    return out["frozen"] if adapter is None else out["adapted"]
