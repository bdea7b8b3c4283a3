"""CRIS evaluation metrics, computed exactly as the official ``validate`` / ``inference`` and ``trainMetricGPU``
(spec §6 "Evaluation metrics", §8.9).

Per sample (one referring expression): ``IoU = |P & G| / (|P | G| + 1e-6)`` on boolean masks at the **original**
image resolution (P = the thresholded prediction after the inverse letterbox, G = ``gt != 0``); two empty masks give
0. Over a split:

* ``mIoU``: the mean of the per-sample IoUs (float64), the number CRIS reports as "IoU";
* ``oIoU`` (overall / cumulative IoU): the sum of the intersections over the sum of the unions (no epsilon; 0 when
  every union is empty);
* ``Pr@50`` .. ``Pr@90``: the fraction of samples whose IoU is **strictly greater** than the threshold, with the
  thresholds of ``torch.arange(0.5, 1.0, 0.1)`` in float32 (0.5, 0.6000000238, 0.6999999881, 0.8000000119,
  0.8999999762), compared against the float64 IoUs (torch promotes the 0-d float32 threshold to float64, so an IoU of
  0.60000001 does not pass Pr@60 while 0.69999999 passes Pr@70).

All results are fractions in [0, 1] (the official logs print them times 100).

The training-time metric :func:`train_metric` is ``trainMetricGPU``: ``sigmoid(logits) >= 0.35`` at the logits'
resolution (104 x 104) against ``target.bool()`` (the nearest-subsampled soft target, non-zero = object), per-sample
IoU in float32 with the same epsilon, its batch mean, and the fraction of samples with IoU > 0.5 ("Prec@50"). The
official function returns both times 100; this one returns fractions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

EPS = 1e-6
PR_THRESHOLDS = torch.arange(0.5, 1.0, 0.1)  # float32, exactly the official thresholds
PR_KEYS = tuple(f"Pr@{round(float(t) * 100)}" for t in PR_THRESHOLDS)  # Pr@50 .. Pr@90

Mask = Union[np.ndarray, torch.Tensor]


def _as_bool(name: str, fn: str, m) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    if not isinstance(m, np.ndarray):
        raise TypeError(f"{fn}: '{name}' must be a numpy array or tensor, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{fn}: '{name}' must be a mask [h, w], got shape {tuple(m.shape)}")
    return m != 0


def mask_counts(pred: Mask, gt: Mask) -> tuple[int, int]:
    """(|P & G|, |P | G|) of two masks [h, w] of the same shape (non-zero = object)."""
    p, g = _as_bool("pred", "mask_counts", pred), _as_bool("gt", "mask_counts", gt)
    if p.shape != g.shape:
        raise ValueError(f"mask_counts: 'pred' {p.shape} and 'gt' {g.shape} must have the same shape (evaluate at the "
                         "original resolution)")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def iou_from_counts(inter: int, union: int) -> float:
    """``inter / (union + 1e-6)`` in float64, as the official numpy code."""
    return float(np.float64(inter) / (np.float64(union) + EPS))


def sample_iou(pred: Mask, gt: Mask) -> float:
    """The official per-sample IoU of two masks [h, w] (0 when both are empty)."""
    return iou_from_counts(*mask_counts(pred, gt))


def precision_at(ious: Union[Sequence[float], np.ndarray, torch.Tensor]) -> dict[str, float]:
    """``{"Pr@50": ..., "Pr@90": ...}``: the fraction of ``ious`` strictly above each float32 threshold."""
    t = torch.as_tensor(np.asarray(ious, dtype=np.float64)).reshape(-1)
    if t.numel() == 0:
        raise ValueError("precision_at: 'ious' is empty")
    # (float64 tensor > 0-d float32 tensor): the threshold is promoted to float64, exactly as official.
    return {k: float((t > thr).float().mean()) for k, thr in zip(PR_KEYS, PR_THRESHOLDS)}


def summarize(ious, inters=None, unions=None) -> dict:
    """``{"mIoU", "Pr@50".."Pr@90", "count"}`` of per-sample ``ious``, plus ``"oIoU"`` when the per-sample
    intersections and unions are given."""
    t = torch.as_tensor(np.asarray(ious, dtype=np.float64)).reshape(-1)
    if t.numel() == 0:
        raise ValueError("summarize: no samples")
    out = {"mIoU": float(t.mean())}
    if inters is not None and unions is not None:
        i, u = int(np.sum(inters, dtype=np.int64)), int(np.sum(unions, dtype=np.int64))
        out["oIoU"] = i / u if u > 0 else 0.0
    out.update(precision_at(t))
    out["count"] = int(t.numel())
    return out


class ReferMetrics:
    """Accumulates per-sample intersections, unions and IoUs over a split.

    ``update(preds, gts)`` takes a list of masks [h_b, w_b] each (sizes may differ between samples), or a stacked
    [B, h, w] tensor / array; ``ids`` optionally names the samples (e.g. ref ids) for :meth:`to_json`'s per-sample
    list. ``state()`` / ``merge(state)`` move the raw counts between processes (gather them, merge, compute)."""

    def __init__(self):
        self.inters: list[int] = []
        self.unions: list[int] = []
        self.ious: list[float] = []
        self.ids: list = []

    def __len__(self) -> int:
        return len(self.ious)

    def reset(self) -> None:
        self.__init__()

    def update(self, preds, gts, ids: Optional[Sequence] = None) -> list[float]:
        """Add a batch; returns its per-sample IoUs."""
        preds, gts = list(preds), list(gts)
        if len(preds) != len(gts):
            raise ValueError(f"ReferMetrics.update: 'preds' has {len(preds)} masks but 'gts' has {len(gts)}")
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(preds):
                raise ValueError(f"ReferMetrics.update: 'ids' has {len(ids)} entries for {len(preds)} masks")
        counts = [mask_counts(p, g) for p, g in zip(preds, gts)]  # validate the whole batch before adding any
        out = [iou_from_counts(i, u) for i, u in counts]
        self.inters += [i for i, _ in counts]
        self.unions += [u for _, u in counts]
        self.ious += out
        self.ids += [None] * len(out) if ids is None else ids
        return out

    def state(self) -> dict:
        return {"inters": list(self.inters), "unions": list(self.unions), "ious": list(self.ious),
                "ids": list(self.ids)}

    def merge(self, state: dict) -> None:
        n = len(state["ious"])
        if not (len(state["inters"]) == len(state["unions"]) == len(state.get("ids", [None] * n)) == n):
            raise ValueError("ReferMetrics.merge: 'state' lists have different lengths")
        self.inters += [int(v) for v in state["inters"]]
        self.unions += [int(v) for v in state["unions"]]
        self.ious += [float(v) for v in state["ious"]]
        self.ids += list(state.get("ids", [None] * n))

    def compute(self) -> dict:
        """``{"mIoU", "oIoU", "Pr@50", ..., "Pr@90", "count"}`` (fractions); ValueError when empty."""
        if not self.ious:
            raise ValueError("ReferMetrics.compute: no samples were added")
        return summarize(self.ious, self.inters, self.unions)

    def to_json(self, path: Union[str, os.PathLike], per_sample: bool = False, **extra) -> dict:
        """Write :meth:`compute` (plus ``extra`` fields, e.g. dataset and split) as JSON, atomically; with
        ``per_sample``, also the list of {id, iou, inter, union}. Returns the written dict."""
        out = dict(extra)
        out.update(self.compute())
        if per_sample:
            out["samples"] = [{"id": i, "iou": v, "inter": a, "union": u}
                              for i, v, a, u in zip(self.ids, self.ious, self.inters, self.unions)]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, path)
        return out


def train_metric(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.35,
                 pr_iou: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean IoU, Prec@50) of a training batch as 0-d float32 tensors on ``logits``' device (fractions).

    ``logits``: [B, ...] raw outputs (CRIS: [B, 1, 104, 104]); ``target``: the same shape, the resized soft target
    (any non-zero value is the object). Prediction = ``sigmoid(logits) >= threshold``, the sigmoid taken in float32
    (the official one runs in the autocast dtype, which can flip a pixel within fp16 rounding of the threshold)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("train_metric: 'logits' and 'target' must be tensors")
    if logits.dim() not in (2, 3, 4):
        raise ValueError(f"train_metric: 'logits' must be [B, ...] with 2 to 4 dims, got {tuple(logits.shape)}")
    if logits.shape != target.shape:
        raise ValueError(f"train_metric: 'logits' {tuple(logits.shape)} and 'target' {tuple(target.shape)} must "
                         "have the same shape")
    pred = torch.sigmoid(logits.detach().flatten(1).float()) >= threshold
    tgt = target.detach().flatten(1).bool()
    inter = (pred & tgt).sum(dim=1)
    union = (pred | tgt).sum(dim=1)
    ious = inter / (union + EPS)  # int64 / float32 -> float32, as official
    return ious.mean(), (ious > pr_iou).float().mean()
