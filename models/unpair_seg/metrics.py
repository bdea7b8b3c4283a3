"""Evaluation metrics for Unpair-Seg: semantic mIoU, panoptic PQ/SQ/RQ, and 1-point / 1-box oracle IoU.

All results are fractions in [0, 1] (detectron2 and panopticapi print them x 100). Every accumulator keeps integer /
float64 sums only, so it merges exactly: ``a.merge(b)`` adds another accumulator's state, ``state_dict`` /
``load_state_dict`` move it between processes, ``all_reduce()`` sums it over ``torch.distributed`` ranks.

Semantic segmentation (:class:`SemanticMetrics`): a K x K confusion matrix ``conf[gt, pred]`` of the pixels whose
ground truth is not ``ignore_label``. Per class: ``IoU = TP / (TP + FP + FN)``, ``ACC = TP / (TP + FN)``. Two means:

* ``mIoU``: detectron2's ``SemSegEvaluator`` (the Mask2Former / FC-CLIP lineage Unpair-Seg comes from): the mean over
  classes **present in the ground truth** (``TP + FN > 0``) of the whole evaluated set; a class that only the
  prediction contains does not enter the mean (its false positives still lower the IoU of the true classes).
* ``mIoU_mmseg``: mmsegmentation's ``mean_iou`` (nan-mean): the mean over classes **present in the ground truth or
  the prediction** (``TP + FP + FN > 0``); a predicted-only class counts with IoU 0.

Both are equal whenever every predicted class occurs in the ground truth somewhere in the split (e.g. ADE20K-150 val);
they differ on ADE-847 / PASCAL-Context-459, where some classes never occur in val. Also reported, as detectron2:
``fwIoU`` (IoU weighted by GT frequency), ``mACC`` (over GT-present classes), ``pACC`` (pixel accuracy), the per-class
``IoU`` / ``ACC`` lists (None where undefined).

Panoptic segmentation (:class:`PanopticMetrics`): the COCO panopticapi rules (``pq_compute_single_core``): segments
are matched per image when they share a category and ``IoU > 0.5`` (strictly), where the union leaves out the
predicted segment's pixels on VOID (id 0) ground truth; crowd GT segments (``iscrowd == 1``) are never matched nor
counted as FN; an unmatched prediction is not a FP when more than half of it lies on VOID plus the crowd region of
its own category. ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)`` per
category, averaged over the categories with ``TP + FP + FN > 0`` (overall, things, stuff). GT areas come from
``segments_info["area"]`` when present (panopticapi reads the GT JSON's areas), else from the PNG; prediction areas
always from the prediction's PNG, as panopticapi. Where panopticapi divides by zero (no category with any segment)
the mean here is 0 with ``n = 0``.

Promptable segmentation (:class:`PromptMetrics`, :func:`oracle_iou`): per GT instance one prompt, the model's
multi-mask outputs [K, H, W]; the instance's oracle IoU is the best IoU over the K outputs (SAM's protocol), and
``mIoU`` the mean over instances. (The thesis' other wording, a point grid as the prompts and each GT mask's best
match among all grid outputs, is :func:`pairwise_iou` + :meth:`PromptMetrics.add`.) The 1-point prompt (:func:`oracle_point`) is the instance pixel farthest from the
mask boundary: the argmax of the exact Euclidean distance transform of the mask zero-padded by one pixel (so the image
border counts as boundary, as RITM's click simulation), ties to the first pixel in row-major order. The 1-box prompt
(:func:`mask_box`) is the tight box of the mask, pixel edges ``(x0, y0, x1, y1)`` end-exclusive (COCO's
``[x, y, x + w, y + h]``), answered by the single box head (head 0). Prediction logits are binarised at ``>= 0``
(sigmoid >= 0.5).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[np.ndarray, Tensor]

VOID = 0
OFFSET = 256 * 256 * 256  # panopticapi: ids are 24-bit (R + 256 G + 256^2 B)


def _np(name: str, fn: str, a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: '{name}' must be a numpy array or a tensor, got {type(a).__name__}")
    return a


def _int_map(name: str, fn: str, a) -> np.ndarray:
    a = _np(name, fn, a)
    if a.ndim != 2:
        raise ValueError(f"{fn}: '{name}' must be a map [H, W], got shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{fn}: '{name}' must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _reduce(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Sum numpy arrays over torch.distributed ranks (no-op when not initialised); float64 / int64 exact."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return arrays
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        out.append(t.cpu().numpy().astype(a.dtype, copy=False))
    return out


def _mean_or_none(v: np.ndarray, valid: np.ndarray) -> Optional[float]:
    return float(v[valid].mean()) if valid.any() else None


# ---------------------------------------------------------------------------------------------------------------------
# Semantic segmentation


class SemanticMetrics:
    """Confusion-matrix semantic segmentation metrics (module docstring).

    Args:
        num_classes: K; predictions and (non-ignored) labels are class indices in [0, K).
        ignore_label: the label value excluded from every count (255 for 8-bit label PNGs, 65535 for the uint16
            ADE-847 / PASCAL-Context-459 files); must not be a class index.
        class_names: optional K names for the per-class output.
    """

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Optional[Sequence[str]] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"SemanticMetrics: 'num_classes' must be an int >= 1, got {num_classes!r}")
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, (int, np.integer)):
            raise TypeError(f"SemanticMetrics: 'ignore_label' must be an int, got {ignore_label!r}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"SemanticMetrics: 'ignore_label' ({ignore_label}) must not be a class index "
                             f"(0..{num_classes - 1})")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"SemanticMetrics: 'class_names' must have {num_classes} entries, got {len(class_names)}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.count = 0

    def update(self, pred: Array, gt: Array) -> None:
        """Add one image: ``pred`` [H, W] class indices, ``gt`` [H, W] class indices or ``ignore_label``."""
        fn = "SemanticMetrics.update"
        p, g = _int_map("pred", fn, pred), _int_map("gt", fn, gt)
        if p.shape != g.shape:
            raise ValueError(f"{fn}: 'pred' {p.shape} and 'gt' {g.shape} must have the same shape")
        valid = g != self.ignore_label
        p, g = p[valid], g[valid]
        k = self.num_classes
        if g.size and (g.min() < 0 or g.max() >= k):
            raise ValueError(f"{fn}: 'gt' holds labels outside [0, {k}) other than ignore_label {self.ignore_label}: "
                             f"{sorted(set(np.unique(g[(g < 0) | (g >= k)]).tolist()))[:10]}")
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"{fn}: 'pred' holds labels outside [0, {k}) on evaluated pixels")
        self.conf += np.bincount(g * k + p, minlength=k * k).reshape(k, k)
        self.count += 1

    def merge(self, other: "SemanticMetrics") -> "SemanticMetrics":
        if not isinstance(other, SemanticMetrics) or other.num_classes != self.num_classes:
            raise ValueError("SemanticMetrics.merge: 'other' must be a SemanticMetrics with the same num_classes")
        self.conf += other.conf
        self.count += other.count
        return self

    def state_dict(self) -> dict:
        return {"conf": self.conf.copy(), "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        conf = np.asarray(state["conf"], dtype=np.int64)
        if conf.shape != self.conf.shape:
            raise ValueError(f"SemanticMetrics.load_state_dict: 'conf' must be {self.conf.shape}, got {conf.shape}")
        self.conf, self.count = conf.copy(), int(state["count"])

    def all_reduce(self) -> "SemanticMetrics":
        """Sum the state over torch.distributed ranks in place (every rank gets the totals)."""
        conf, count = _reduce([self.conf, np.array([self.count], dtype=np.int64)])
        self.conf, self.count = conf, int(count[0])
        return self

    def compute(self) -> dict:
        """``{"mIoU", "mIoU_mmseg", "fwIoU", "mACC", "pACC", "IoU", "ACC", "count", "pixels"}`` (module docstring);
        per-class lists hold None where undefined; means are None when no class qualifies."""
        conf = self.conf.astype(np.float64)
        tp = np.diag(conf)
        pos_gt = conf.sum(1)
        pos_pred = conf.sum(0)
        union = pos_gt + pos_pred - tp
        if pos_gt.sum() == 0:
            raise ValueError("SemanticMetrics.compute: no evaluated pixels (every label ignored, or no update)")
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(pos_gt > 0, tp / pos_gt, np.nan)
        in_gt = pos_gt > 0
        in_any = union > 0
        weights = pos_gt / pos_gt.sum()
        out = {
            "mIoU": _mean_or_none(iou, in_gt),
            "mIoU_mmseg": _mean_or_none(iou, in_any),
            "fwIoU": float((iou[in_gt] * weights[in_gt]).sum()),
            "mACC": _mean_or_none(acc, in_gt),
            "pACC": float(tp.sum() / pos_gt.sum()),
            "IoU": [None if np.isnan(v) else float(v) for v in iou],
            "ACC": [None if np.isnan(v) else float(v) for v in acc],
            "count": self.count,
            "pixels": int(pos_gt.sum()),
        }
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Panoptic segmentation


def _segments(name: str, fn: str, segs) -> dict[int, dict]:
    if isinstance(segs, Mapping) or isinstance(segs, (str, bytes)):
        raise TypeError(f"{fn}: '{name}' must be a list of segment dicts, got {type(segs).__name__}")
    out = {}
    for s in segs:
        if not isinstance(s, Mapping) or "id" not in s or "category_id" not in s:
            raise ValueError(f"{fn}: every entry of '{name}' must be a dict with 'id' and 'category_id', got {s!r}")
        sid = int(s["id"])
        if sid == VOID or not 0 < sid < OFFSET:
            raise ValueError(f"{fn}: '{name}' segment id {sid} must be in [1, {OFFSET}) (0 is VOID)")
        if sid in out:
            raise ValueError(f"{fn}: '{name}' has segment id {sid} twice")
        out[sid] = dict(s)
    return out


class PanopticMetrics:
    """PQ / SQ / RQ with the COCO panopticapi rules (module docstring).

    Args:
        categories: the dataset categories, dicts with "id" and "isthing" (COCO's 0/1 or a bool), optionally "name";
            segments refer to them by "category_id".
    """

    def __init__(self, categories: Sequence[Mapping]):
        if isinstance(categories, Mapping):
            raise TypeError("PanopticMetrics: 'categories' must be a list of dicts with 'id' and 'isthing'")
        cats = list(categories)
        if not cats:
            raise ValueError("PanopticMetrics: 'categories' is empty")
        self.categories = []
        for c in cats:
            if not isinstance(c, Mapping) or "id" not in c or "isthing" not in c:
                raise ValueError(f"PanopticMetrics: every category must be a dict with 'id' and 'isthing', got {c!r}")
            self.categories.append({"id": int(c["id"]), "isthing": bool(int(c["isthing"])),
                                    "name": str(c.get("name", c["id"]))})
        ids = [c["id"] for c in self.categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PanopticMetrics: duplicate category ids in {ids}")
        self.index = {cid: k for k, cid in enumerate(ids)}
        n = len(ids)
        self.tp = np.zeros(n, dtype=np.int64)
        self.fp = np.zeros(n, dtype=np.int64)
        self.fn = np.zeros(n, dtype=np.int64)
        self.iou = np.zeros(n, dtype=np.float64)
        self.count = 0

    def _cat(self, cid, fn: str, what: str) -> int:
        cid = int(cid)
        if cid not in self.index:
            raise ValueError(f"{fn}: {what} has unknown category_id {cid} (known: {sorted(self.index)})")
        return self.index[cid]

    def update(self, pan_gt: Array, gt_segments: Sequence[Mapping], pan_pred: Array,
               pred_segments: Sequence[Mapping]) -> None:
        """Add one image.

        Args:
            pan_gt: [H, W] GT segment ids (rgb2id of the GT PNG; 0 = VOID).
            gt_segments: the GT ``segments_info`` (dicts with "id", "category_id", optional "iscrowd", "area").
            pan_pred: [H, W] predicted segment ids (0 = VOID: unassigned).
            pred_segments: the predicted segments (dicts with "id", "category_id"); every non-zero id of ``pan_pred``
                must be listed and every listed id must occur (panopticapi's sanity checks).
        """
        fn = "PanopticMetrics.update"
        g, p = _int_map("pan_gt", fn, pan_gt), _int_map("pan_pred", fn, pan_pred)
        if g.shape != p.shape:
            raise ValueError(f"{fn}: 'pan_gt' {g.shape} and 'pan_pred' {p.shape} must have the same shape")
        for name, a in (("pan_gt", g), ("pan_pred", p)):
            if a.size and (a.min() < 0 or a.max() >= OFFSET):
                raise ValueError(f"{fn}: '{name}' ids must be in [0, {OFFSET})")
        gt_segs = _segments("gt_segments", fn, gt_segments)
        pred_segs = _segments("pred_segments", fn, pred_segments)
        for s in gt_segs.values():
            s["_cat"] = self._cat(s["category_id"], fn, f"GT segment {s['id']}")
        for s in pred_segs.values():
            s["_cat"] = self._cat(s["category_id"], fn, f"predicted segment {s['id']}")

        labels, counts = np.unique(p, return_counts=True)
        missing = set(pred_segs)
        for label, cnt in zip(labels.tolist(), counts.tolist()):
            if label == VOID:
                continue
            if label not in pred_segs:
                raise ValueError(f"{fn}: segment id {label} is in 'pan_pred' but not in 'pred_segments'")
            pred_segs[label]["_area"] = cnt
            missing.discard(label)
        if missing:
            raise ValueError(f"{fn}: segment ids {sorted(missing)} are in 'pred_segments' but not in 'pan_pred'")
        gt_labels, gt_counts = np.unique(g, return_counts=True)
        gt_pixels = dict(zip(gt_labels.tolist(), gt_counts.tolist()))
        for sid, s in gt_segs.items():
            s["_area"] = int(s["area"]) if "area" in s else gt_pixels.get(sid, 0)

        joint = g.astype(np.uint64) * np.uint64(OFFSET) + p.astype(np.uint64)
        pairs, inter = np.unique(joint, return_counts=True)
        overlap = {(int(j // OFFSET), int(j % OFFSET)): int(c) for j, c in zip(pairs.tolist(), inter.tolist())}

        gt_matched, pred_matched = set(), set()
        for (gl, pl), n in overlap.items():
            if gl not in gt_segs or pl not in pred_segs:
                continue
            gs, ps = gt_segs[gl], pred_segs[pl]
            if int(gs.get("iscrowd", 0)) == 1 or gs["_cat"] != ps["_cat"]:
                continue
            union = ps["_area"] + gs["_area"] - n - overlap.get((VOID, pl), 0)
            iou = n / union
            if iou > 0.5:
                self.tp[gs["_cat"]] += 1
                self.iou[gs["_cat"]] += iou
                gt_matched.add(gl)
                pred_matched.add(pl)

        crowd = {}
        for gl, gs in gt_segs.items():
            if gl in gt_matched:
                continue
            if int(gs.get("iscrowd", 0)) == 1:
                crowd[gs["_cat"]] = gl
                continue
            self.fn[gs["_cat"]] += 1
        for pl, ps in pred_segs.items():
            if pl in pred_matched:
                continue
            ignored = overlap.get((VOID, pl), 0)
            if ps["_cat"] in crowd:
                ignored += overlap.get((crowd[ps["_cat"]], pl), 0)
            if ignored / ps["_area"] > 0.5:
                continue
            self.fp[ps["_cat"]] += 1
        self.count += 1

    def merge(self, other: "PanopticMetrics") -> "PanopticMetrics":
        if not isinstance(other, PanopticMetrics) or other.categories != self.categories:
            raise ValueError("PanopticMetrics.merge: 'other' must be a PanopticMetrics over the same categories")
        for name in ("tp", "fp", "fn", "iou"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.count += other.count
        return self

    def state_dict(self) -> dict:
        return {"tp": self.tp.copy(), "fp": self.fp.copy(), "fn": self.fn.copy(), "iou": self.iou.copy(),
                "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        for name, dt in (("tp", np.int64), ("fp", np.int64), ("fn", np.int64), ("iou", np.float64)):
            v = np.asarray(state[name], dtype=dt)
            if v.shape != getattr(self, name).shape:
                raise ValueError(f"PanopticMetrics.load_state_dict: '{name}' must have shape "
                                 f"{getattr(self, name).shape}, got {v.shape}")
            setattr(self, name, v.copy())
        self.count = int(state["count"])

    def all_reduce(self) -> "PanopticMetrics":
        tp, fp, fn, iou, count = _reduce([self.tp, self.fp, self.fn, self.iou,
                                          np.array([self.count], dtype=np.int64)])
        self.tp, self.fp, self.fn, self.iou, self.count = tp, fp, fn, iou, int(count[0])
        return self

    def per_class(self) -> list[dict]:
        """Per category ``{"id", "name", "isthing", "pq", "sq", "rq", "tp", "fp", "fn"}`` (panopticapi's 0s for a
        category with no segment at all)."""
        out = []
        for k, c in enumerate(self.categories):
            tp, fp, fn, iou = int(self.tp[k]), int(self.fp[k]), int(self.fn[k]), float(self.iou[k])
            denom = tp + 0.5 * fp + 0.5 * fn
            pq = iou / denom if denom else 0.0
            sq = iou / tp if tp else 0.0
            rq = tp / denom if denom else 0.0
            out.append({**c, "pq": pq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn})
        return out

    def compute(self) -> dict:
        """``{"PQ", "SQ", "RQ", "n", "PQ_th", "SQ_th", "RQ_th", "n_th", "PQ_st", "SQ_st", "RQ_st", "n_st",
        "per_class", "count"}``."""
        rows = self.per_class()
        out = {}
        for suffix, things in (("", None), ("_th", True), ("_st", False)):
            sel = [r for r in rows if (things is None or r["isthing"] == things) and r["tp"] + r["fp"] + r["fn"] > 0]
            n = len(sel)
            for key in ("pq", "sq", "rq"):
                out[key.upper() + suffix] = sum(r[key] for r in sel) / n if n else 0.0
            out["n" + suffix] = n
        out["per_class"] = rows
        out["count"] = self.count
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Promptable segmentation


def _bool_mask(name: str, fn: str, m, ndim: int) -> np.ndarray:
    m = _np(name, fn, m)
    if m.ndim != ndim:
        raise ValueError(f"{fn}: '{name}' must have {ndim} dims, got shape {m.shape}")
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.floating):
        return m >= 0  # logits: sigmoid >= 0.5
    return m != 0


def oracle_point(mask: Array) -> tuple[int, int]:
    """The pixel ``(x, y)`` (column, row indices) of ``mask`` [H, W] farthest from its boundary (module docstring).
    Raises ValueError for an empty mask."""
    from scipy.ndimage import distance_transform_edt

    m = _bool_mask("mask", "oracle_point", mask, 2)
    if not m.any():
        raise ValueError("oracle_point: 'mask' is empty")
    dist = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def mask_box(mask: Array) -> tuple[int, int, int, int]:
    """The tight box ``(x0, y0, x1, y1)`` of ``mask`` [H, W] in pixel edges, end-exclusive. Raises for an empty mask."""
    m = _bool_mask("mask", "mask_box", mask, 2)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not rows.size:
        raise ValueError("mask_box: 'mask' is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_ious(pred: Array, gt: Array) -> np.ndarray:
    """[K] float64 IoUs of K predictions [K, H, W] (bool, or logits binarised at >= 0) with one GT mask [H, W]
    (non-empty)."""
    fn = "mask_ious"
    p = _bool_mask("pred", fn, pred, 3)
    g = _bool_mask("gt", fn, gt, 2)
    if p.shape[1:] != g.shape:
        raise ValueError(f"{fn}: 'pred' {p.shape} and 'gt' {g.shape} must share [H, W]")
    if not g.any():
        raise ValueError(f"{fn}: 'gt' is empty (instances without pixels have no prompt)")
    inter = (p & g).reshape(p.shape[0], -1).sum(1).astype(np.float64)
    union = (p | g).reshape(p.shape[0], -1).sum(1).astype(np.float64)
    return inter / union


def pairwise_iou(pred: Array, gt: Array) -> np.ndarray:
    """[N, M] float64 IoUs of N GT masks [N, H, W] with M predictions [M, H, W] (bool, or logits binarised at >= 0);
    0 where both are empty."""
    fn = "pairwise_iou"
    p = _bool_mask("pred", fn, pred, 3)
    g = _bool_mask("gt", fn, gt, 3)
    if p.shape[1:] != g.shape[1:]:
        raise ValueError(f"{fn}: 'pred' {p.shape} and 'gt' {g.shape} must share [H, W]")
    pf = p.reshape(p.shape[0], -1).astype(np.float64)
    gf = g.reshape(g.shape[0], -1).astype(np.float64)
    inter = gf @ pf.T
    union = gf.sum(1)[:, None] + pf.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def oracle_iou(pred_masks: Array, gt_masks: Array) -> np.ndarray:
    """[N] float64: for each of N instances the best IoU over its K outputs.

    Args:
        pred_masks: [N, K, H, W] (bool, or logits binarised at >= 0); K = 1 for box prompts (head 0), the model's
            ``num_masks`` outputs for point prompts.
        gt_masks: [N, H, W] non-empty GT masks.
    """
    fn = "oracle_iou"
    p = _np("pred_masks", fn, pred_masks)
    g = _np("gt_masks", fn, gt_masks)
    if p.ndim != 4 or g.ndim != 3 or p.shape[0] != g.shape[0]:
        raise ValueError(f"{fn}: expected pred_masks [N, K, H, W] and gt_masks [N, H, W] with the same N, got "
                         f"{p.shape} and {g.shape}")
    return np.array([mask_ious(p[i], g[i]).max() for i in range(p.shape[0])], dtype=np.float64)


class PromptMetrics:
    """Accumulates per-instance IoUs of promptable segmentation: ``mIoU`` (oracle: best of the K outputs) and, when
    the model's scores are given, ``mIoU_top`` (the output with the highest predicted IoU)."""

    def __init__(self):
        self.sum_oracle = 0.0
        self.sum_top = 0.0
        self.count = 0
        self.count_top = 0

    def update(self, pred_masks: Array, gt_masks: Array, scores: Optional[Array] = None) -> np.ndarray:
        """Add N instances (see :func:`oracle_iou`); ``scores`` [N, K] picks the top output. Returns the [N, K]
        IoUs."""
        fn = "PromptMetrics.update"
        p = _np("pred_masks", fn, pred_masks)
        g = _np("gt_masks", fn, gt_masks)
        if p.ndim != 4 or g.ndim != 3 or p.shape[0] != g.shape[0]:
            raise ValueError(f"{fn}: expected pred_masks [N, K, H, W] and gt_masks [N, H, W] with the same N, got "
                             f"{p.shape} and {g.shape}")
        ious = np.stack([mask_ious(p[i], g[i]) for i in range(p.shape[0])]) if p.shape[0] else np.zeros((0, p.shape[1]))
        self.sum_oracle += float(ious.max(1).sum()) if ious.size else 0.0
        self.count += int(ious.shape[0])
        if scores is not None:
            s = _np("scores", fn, scores)
            if s.shape != ious.shape:
                raise ValueError(f"{fn}: 'scores' must be [N, K] = {ious.shape}, got {s.shape}")
            if ious.size:
                self.sum_top += float(ious[np.arange(ious.shape[0]), s.argmax(1)].sum())
            self.count_top += int(ious.shape[0])
        return ious

    def add(self, oracle_ious: Array, top_ious: Optional[Array] = None) -> None:
        """Add precomputed per-instance IoUs [N] (e.g. the grid protocol's best match, :func:`pairwise_iou`)."""
        o = np.asarray(_np("oracle_ious", "PromptMetrics.add", oracle_ious), dtype=np.float64).reshape(-1)
        self.sum_oracle += float(o.sum())
        self.count += int(o.size)
        if top_ious is not None:
            t = np.asarray(_np("top_ious", "PromptMetrics.add", top_ious), dtype=np.float64).reshape(-1)
            if t.size != o.size:
                raise ValueError(f"PromptMetrics.add: 'top_ious' must have {o.size} entries, got {t.size}")
            self.sum_top += float(t.sum())
            self.count_top += int(t.size)

    def merge(self, other: "PromptMetrics") -> "PromptMetrics":
        if not isinstance(other, PromptMetrics):
            raise TypeError("PromptMetrics.merge: 'other' must be a PromptMetrics")
        self.sum_oracle += other.sum_oracle
        self.sum_top += other.sum_top
        self.count += other.count
        self.count_top += other.count_top
        return self

    def state_dict(self) -> dict:
        return {"sum_oracle": self.sum_oracle, "sum_top": self.sum_top, "count": self.count,
                "count_top": self.count_top}

    def load_state_dict(self, state: Mapping) -> None:
        self.sum_oracle, self.sum_top = float(state["sum_oracle"]), float(state["sum_top"])
        self.count, self.count_top = int(state["count"]), int(state["count_top"])

    def all_reduce(self) -> "PromptMetrics":
        f, i = _reduce([np.array([self.sum_oracle, self.sum_top], dtype=np.float64),
                        np.array([self.count, self.count_top], dtype=np.int64)])
        self.sum_oracle, self.sum_top = float(f[0]), float(f[1])
        self.count, self.count_top = int(i[0]), int(i[1])
        return self

    def compute(self) -> dict:
        """``{"mIoU", "count"}`` plus ``"mIoU_top"`` when scores were given; None means for no instance."""
        out = {"mIoU": self.sum_oracle / self.count if self.count else None, "count": self.count}
        if self.count_top:
            out["mIoU_top"] = self.sum_top / self.count_top
        return out
