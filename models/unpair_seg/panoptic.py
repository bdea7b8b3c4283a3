"""Semantic and panoptic assembly of classified mask proposals, Mask2Former-style (spec §8 OBJECT_MASK_THRESHOLD 0.7 /
OVERLAP_THRESHOLD 0.4, §11.9).

Inputs per image: ``mask_logits`` [Q, H, W] (the proposals, logits, at the output resolution) and ``class_logits``
[Q, K] (e.g. :func:`models.unpair_seg.classify.fcclip_logits` of the proposals' region embeddings).

Class probabilities. Mask2Former's classifier has K + 1 outputs, the last a learned "no object" (void) class that
both inference functions drop. Unpair-Seg has no such class: a proposal's class distribution is ``softmax`` over the K
class logits. An optional ``void_logits`` ([Q] or a scalar) appends a void column before the softmax and drops it
afterwards, which recovers Mask2Former exactly (a constant void logit acts as a rejection threshold).

* :func:`semantic_inference`: ``einsum("qk,qhw->khw", probs, sigmoid(mask_logits))`` (Mask2Former's
  ``semantic_inference``); the per-pixel label is its argmax over K.
* :func:`panoptic_inference`: Mask2Former's ``panoptic_inference``: keep proposals whose top probability exceeds
  ``object_mask_threshold`` (strictly); weight each kept mask's sigmoid by its score and give every pixel to the
  argmax; a proposal becomes a segment only if it owns some pixels, its own mask (sigmoid >= 0.5) is non-empty, the
  pixels it owns that are also in its own mask are non-empty, and ``owned / own-mask area >= overlap_threshold``; the
  segment is the owned pixels inside its own mask; stuff (``is_thing[k]`` false) segments of one class merge into the
  first one. Segment ids count from 1 in query order; 0 is void (unassigned pixels).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def _describe(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check(mask_logits, class_logits, fn: str) -> None:
    if not isinstance(mask_logits, Tensor) or mask_logits.ndim != 3 or not mask_logits.is_floating_point():
        raise ValueError(f"{fn}: 'mask_logits' must be a floating tensor [Q, H, W], got {_describe(mask_logits)}")
    if (not isinstance(class_logits, Tensor) or class_logits.ndim != 2 or not class_logits.is_floating_point()
            or class_logits.shape[0] != mask_logits.shape[0]):
        raise ValueError(f"{fn}: 'class_logits' must be a floating tensor [Q, K] with Q = {mask_logits.shape[0]} "
                         f"(mask_logits' proposals), got {_describe(class_logits)}")
    if class_logits.shape[1] < 1:
        raise ValueError(f"{fn}: 'class_logits' must have K >= 1 classes, got {tuple(class_logits.shape)}")


def class_probabilities(class_logits: Tensor, void_logits: Optional[Union[Tensor, float]] = None) -> Tensor:
    """[Q, K] probabilities: softmax over K, or over K + 1 with ``void_logits`` as the last column (then dropped)."""
    logits = class_logits.float()
    if void_logits is None:
        return logits.softmax(-1)
    void = torch.as_tensor(void_logits, dtype=logits.dtype, device=logits.device)
    if void.ndim == 0:
        void = void.expand(logits.shape[0])
    if void.shape != (logits.shape[0],):
        raise ValueError(f"class_probabilities: 'void_logits' must be a scalar or [Q] with Q = {logits.shape[0]}, got "
                         f"shape {tuple(void.shape)}")
    return torch.cat([logits, void[:, None]], -1).softmax(-1)[:, :-1]


def semantic_inference(mask_logits: Tensor, class_logits: Tensor,
                       void_logits: Optional[Union[Tensor, float]] = None) -> Tensor:
    """Per-class scores [K, H, W] (float32): sum over proposals of class probability x sigmoid(mask).

    Args:
        mask_logits: [Q, H, W] proposal mask logits. Q = 0 gives all zeros (the argmax is then class 0 everywhere).
        class_logits: [Q, K].
        void_logits: optional void logit (scalar or [Q]); see the module docstring.
    """
    _check(mask_logits, class_logits, "semantic_inference")
    probs = class_probabilities(class_logits, void_logits)
    return torch.einsum("qk,qhw->khw", probs, mask_logits.float().sigmoid())


def panoptic_inference(mask_logits: Tensor, class_logits: Tensor, is_thing: Sequence[bool],
                       object_mask_threshold: float = 0.7, overlap_threshold: float = 0.4,
                       void_logits: Optional[Union[Tensor, float]] = None) -> tuple[Tensor, list[dict]]:
    """Mask2Former panoptic assembly (module docstring).

    Args:
        mask_logits: [Q, H, W] proposal mask logits, in the priority order of the queries (ties of the weighted
            argmax go to the lower index).
        class_logits: [Q, K].
        is_thing: K booleans (thing classes keep one segment per proposal; stuff classes merge).
        object_mask_threshold: minimum top-class probability (strictly greater), Mask2Former's 0.7.
        overlap_threshold: minimum fraction of a proposal's own mask it must win, 0.4.
        void_logits: optional void logit (scalar or [Q]).

    Returns: ``(panoptic_seg [H, W] int32, segments_info)``, segments_info a list of
    ``{"id", "category_id" (contiguous class index), "isthing", "score"}`` in id order; "score" is the proposal's
    top probability (Mask2Former leaves it out of the panoptic output; detectron2's evaluators ignore it).
    """
    fn = "panoptic_inference"
    _check(mask_logits, class_logits, fn)
    k_classes = class_logits.shape[1]
    is_thing = [bool(v) for v in is_thing]
    if len(is_thing) != k_classes:
        raise ValueError(f"{fn}: 'is_thing' must have K = {k_classes} entries, got {len(is_thing)}")
    for name, v in (("object_mask_threshold", object_mask_threshold), ("overlap_threshold", overlap_threshold)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{fn}: '{name}' must be in [0, 1], got {v!r}")
    scores, labels = class_probabilities(class_logits, void_logits).max(-1)
    masks = mask_logits.float().sigmoid()
    keep = scores > object_mask_threshold
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    h, w = masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment: dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        owned = cur_mask_ids == k
        own = cur_masks[k] >= 0.5
        mask = owned & own
        mask_area, original_area = int(owned.sum()), int(own.sum())
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not is_thing[pred_class]:
            if pred_class in stuff_segment:
                panoptic_seg[mask] = stuff_segment[pred_class]
                continue
            stuff_segment[pred_class] = current_id + 1
        current_id += 1
        panoptic_seg[mask] = current_id
        segments_info.append({"id": current_id, "category_id": pred_class, "isthing": is_thing[pred_class],
                              "score": float(cur_scores[k])})
    return panoptic_seg, segments_info


def semantic_labels(mask_logits: Tensor, class_logits: Tensor, void_logits: Optional[Union[Tensor, float]] = None,
                    rows_per_chunk: Optional[int] = None) -> Tensor:
    """[H, W] int64 per-pixel class: the argmax over K of :func:`semantic_inference` (ties to the lower class).

    ``rows_per_chunk`` bounds memory for large K (ADE-847: K x H x W floats) by scoring that many image rows at a
    time; the labels are the same."""
    if rows_per_chunk is None:
        return semantic_inference(mask_logits, class_logits, void_logits).argmax(0)
    _check(mask_logits, class_logits, "semantic_labels")
    if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
        raise ValueError(f"semantic_labels: 'rows_per_chunk' must be a positive int, got {rows_per_chunk!r}")
    probs = class_probabilities(class_logits, void_logits)
    h, w = mask_logits.shape[-2:]
    out = torch.empty((h, w), dtype=torch.int64, device=mask_logits.device)
    for r in range(0, h, rows_per_chunk):
        m = mask_logits[:, r:r + rows_per_chunk].float().sigmoid()
        out[r:r + rows_per_chunk] = torch.einsum("qk,qhw->khw", probs, m).argmax(0)
    return out


def resize_logits(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of [Q, h, w] logits to ``size`` = (H, W)."""
    if mask_logits.shape[-2:] == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
