"""Unpair-Seg stage-1 inference computed the way the official code computes it: the benchmark baseline and the test
oracle of the post-processing in models/unpair_seg/model.py.

Same modules and weights as :class:`~models.unpair_seg.model.UnpairSegS1`, but:

* the deformable attention runs on mmkernels' ``torch`` backend (``F.grid_sample`` per level, the official
  ``ms_deform_attn_core_pytorch`` fallback) and, like every other module, in fp32 unless ``autocast_dtype`` asks for
  the demo's bf16 autocast (the pixel decoder stays fp32 either way, as officially; spec §10);
* the decoder outputs of ALL prompts are kept at stride 4 and ALL masks are upsampled to the canvas BEFORE the score
  filter (spec §7.3 steps 1-3 and §12.15: ~6.7 GB at the official size), then
* the NMS is :func:`dense_mask_nms`, a literal transcription of the official ``mask_nms(..., "inner-nms")`` loop (spec
  §7.3 step 4): dense fp32 einsum IoU and coverage matrices with the ``+1e-6`` formulas, ``torch.sort`` (NOT stable
  unless ``stable=True``), one host sync per kept mask;
* :func:`mask_pooling` is the official ``MaskPooling`` (interpolate + einsum, spec §6) for stage-2 baselines.

:func:`official_postprocess` returns the same dict as ``UnpairSegS1.postprocess``; :func:`official_style_inference`
the same list of dicts as ``UnpairSegS1.forward(batched_inputs)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-6


def dense_mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5,
                   inner_threshold: float = 0.7, downsample: float = 0.5, stable: bool = False) -> torch.Tensor:
    """The official inner-NMS. masks [N, H, W] logits, scores [N] -> kept indices int64 [K] (descending score).

    ``downsample`` is the official scale factor (< 1 interpolates bilinearly with that ``scale_factor``; the official
    stage-1 value 0.5 is an exact 2x2 mean). ``stable=False`` sorts as the official code (``scores.sort(descending=
    True)``, no order among tied scores is promised); ``stable=True`` visits ties lowest index first, which is the
    order mmkernels.mask_nms promises. N = 0 returns an empty result (the official reshape fails on it).
    """
    if masks.dim() != 3:
        raise ValueError(f"dense_mask_nms: 'masks' must be [N, H, W], got shape {tuple(masks.shape)}")
    if scores.dim() != 1 or scores.shape[0] != masks.shape[0]:
        raise ValueError(f"dense_mask_nms: 'scores' must be [N] with N = {masks.shape[0]}, got "
                         f"{tuple(scores.shape)}")
    if masks.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=masks.device)
    if downsample < 1.0:
        masks = F.interpolate(masks.unsqueeze(0), scale_factor=downsample, mode="bilinear").squeeze(0)
    flat = masks.reshape(masks.shape[0], -1).sigmoid().ge(0.5).float()
    inter = torch.einsum("nc,mc->nm", flat, flat)
    area = flat.sum(-1)
    iou = (inter + EPS) / (area[:, None] + area[None, :] - inter + EPS)
    inner = (inter + EPS) / (area + EPS)  # [i, j]: the fraction of j covered by i (area broadcasts over columns)

    _, order = scores.sort(descending=True, stable=stable)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        rest = order[1:]
        remain = (iou[i, rest] < iou_threshold) & (inner[i, rest] < inner_threshold)
        order = order[torch.nonzero(remain).squeeze(dim=1) + 1]
    return torch.as_tensor(keep, dtype=torch.int64, device=masks.device)


def official_postprocess(pred_masks: torch.Tensor, pred_ious: torch.Tensor, height: int, width: int, cfg,
                         stable: bool = False) -> dict:
    """The official post-processing of one image's decoder outputs (spec §7.3), in the official order.

    Args:
        pred_masks: [M, h, w] stride-4 mask logits of all prompts (prompt-major, then the K outputs).
        pred_ious: [M] the decoder's (once-sigmoided) IoU predictions.
        height, width: the original image size; cfg: the model's UnpairSegConfig (canvas ``image_size``,
            ``score_threshold``, ``nms_iou``, ``nms_coverage``, ``nms_downsample``).
        stable: passed to :func:`dense_mask_nms`.

    Returns:
        {"proposal": [K', height, width] logits, "scores": [K'] (double sigmoid), "indices": int64 [K'] into M},
        in NMS order (descending score).
    """
    if pred_masks.dim() != 3 or pred_ious.shape != pred_masks.shape[:1]:
        raise ValueError(f"official_postprocess: expected pred_masks [M, h, w] and pred_ious [M], got "
                         f"{tuple(pred_masks.shape)} and {tuple(pred_ious.shape)}")
    size = cfg.image_size
    ious = pred_ious.sigmoid()
    masks = F.interpolate(pred_masks.unsqueeze(0), size=(size, size), mode="bilinear",
                          align_corners=False).squeeze(0)
    keep = ious.ge(cfg.score_threshold)
    ious, masks = ious[keep], masks[keep]
    index = torch.nonzero(keep).squeeze(1)
    nms = dense_mask_nms(masks, ious, cfg.nms_iou, cfg.nms_coverage, downsample=1.0 / cfg.nms_downsample,
                         stable=stable)
    ious, masks, index = ious[nms], masks[nms], index[nms]
    side = max(int(height), int(width))
    if masks.shape[0]:
        masks = F.interpolate(masks.unsqueeze(0), size=(side, side), mode="bilinear",
                              align_corners=False).squeeze(0)
    else:
        masks = masks.new_zeros((0, side, side))
    return {"proposal": masks[:, :height, :width], "scores": ious, "indices": index}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def official_style_inference(model, batched_inputs: list, autocast_dtype: Optional[torch.dtype] = None,
                             chunk: int = 100, stable: bool = False) -> list:
    """``model(batched_inputs)`` (an :class:`~models.unpair_seg.model.UnpairSegS1`) computed officially (module
    docstring): deformable attention on the grid_sample reference, prompts in chunks of ``chunk`` (official 100)
    whose outputs are all concatenated, every mask upsampled before the filter, :func:`dense_mask_nms`.

    ``autocast_dtype``: None (fp32 everywhere; autocast disabled) or torch.bfloat16 (the demo's autocast; the model's
    pixel decoder must be configured fp32, as officially). Returns the list of dicts of ``UnpairSegS1.forward``.
    """
    import mmkernels
    from models.unpair_seg.model import UnpairSegS1

    if not isinstance(model, UnpairSegS1):
        raise TypeError(f"official_style_inference: expected an UnpairSegS1, got {type(model).__name__}")
    if model.cfg.pixel_decoder_dtype != "fp32":
        raise ValueError("official_style_inference: the official pixel decoder runs in fp32; this model is "
                         f"configured with pixel_decoder_dtype={model.cfg.pixel_decoder_dtype!r}")
    if autocast_dtype not in (None, torch.bfloat16):
        raise ValueError(f"official_style_inference: autocast_dtype must be None or torch.bfloat16, got "
                         f"{autocast_dtype!r}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("official_style_inference: the model's parameters must be fp32 (the official model is "
                         "never cast; bf16 comes from autocast_dtype)")
    entries = model.check_batched_inputs(batched_inputs)
    device = model.pixel_mean.device
    results = []
    with mmkernels.use_backend("torch"), _autocast(device, autocast_dtype):
        images = torch.stack([e["image"] for e in entries]).to(device)
        mask_features, multi_scale = model.image_features(images)
        for n, e in enumerate(entries):
            height, width = e["height"], e["width"]
            kind, prompts = model.entry_prompts(e)
            if prompts.shape[0] == 0:
                results.append(model.empty_result(kind, prompts, height, width, mask_features.dtype))
                continue
            masks, ious = [], []
            for part in torch.split(prompts.to(device), chunk):
                out = model.decode(mask_features[n:n + 1], [m[n:n + 1] for m in multi_scale], part[None], kind)
                masks.append(out["pred_masks"].flatten(1, 2))
                ious.append(out["pred_ious"].flatten(1, 2))
            masks, ious = torch.cat(masks, 1)[0], torch.cat(ious, 1)[0]
            k = masks.shape[0] // prompts.shape[0]
            res = official_postprocess(masks, ious, height, width, model.cfg, stable=stable)
            idx = res.pop("indices")
            res["prompt_index"] = torch.div(idx, k, rounding_mode="floor")
            res["mask_index"] = idx % k
            res["points" if kind == "point" else "boxes"] = prompts.to(device)[res["prompt_index"]]
            results.append(res)
    return results


def mask_pooling(features: torch.Tensor, mask_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The official ``MaskPooling`` (spec §6): features [B, C, H, W], mask logits [B, Q, h, w] -> [B, Q, C].

    Logits are bilinearly resized to (H, W) when the sizes differ (align_corners=False); then, without gradient,
    ``m = (sigmoid(logits) >= threshold)`` in the logits' dtype and ``m / (sum_hw m + 1e-8)``; the pooled features
    are ``einsum("bchw,bqhw->bqc", features, m / denom)`` (a masked mean; an empty mask gives 0). Gradients reach
    the features only."""
    if features.dim() != 4 or mask_logits.dim() != 4 or features.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"mask_pooling: expected features [B, C, H, W] and mask_logits [B, Q, h, w] with the same "
                         f"B, got {tuple(features.shape)} and {tuple(mask_logits.shape)}")
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        m = mask_logits.detach().sigmoid().ge(threshold).to(mask_logits.dtype)
        m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, m.to(features.dtype))


__all__ = ["dense_mask_nms", "official_postprocess", "official_style_inference", "mask_pooling"]
