"""Mask NMS (Unpair-Seg Algorithm 1, "inner-NMS"): the definition in plain PyTorch, and the ``torch`` backend.

Semantics (../shared/specs/unpair_seg.md §7.3 step 4, §11.8, §12.11; the official ``lib/utils/post_process.py``
``mask_nms(..., nms_type="inner-nms", downsample=0.5)``), for masks [N, H, W] of logits and scores [N]:

1. **Downsample** by an integer factor d (``downsample``; the official 0.5 is d = 2): for d > 1,
   ``F.interpolate(masks.unsqueeze(0), scale_factor=1/d, mode="bilinear", align_corners=False).squeeze(0)`` in the
   masks' dtype, as the official code calls it on [1, N, H, W]. The output is [N, Ho, Wo] with Ho = int(H * (1/d))
   (double arithmetic, as PyTorch computes it; equal to H // d for every size we checked), so odd sizes drop their
   last rows/columns. For d = 2 every output pixel is the exact mean of a 2x2 block (source index 2*o + 0.5, both
   weights 1/2); for general d it is *not* a d x d mean: bilinear without antialiasing samples the 2 x 2 pixels
   around d*o + (d-1)/2, i.e. weights (1/2, 1/2) on d*o + d/2 - 1 and d*o + d/2 for even d, and the single pixel
   d*o + (d-1)/2 for odd d (weights 1 and 0). d = 1 means no interpolation. H and W must be >= d.
2. **Binarize**: ``masks.reshape(N, -1).sigmoid().ge(0.5)`` in the masks' dtype (the sigmoid is rounded to that dtype
   before the comparison). Because sigmoid rounds, the boundary is not at 0: sigmoid(v) >= 0.5 holds for
   v >= -0x1.7ffffcp-23 (about -1.79e-7) in fp32, v >= -2^-11 in fp16 and v >= -2^-8 in bf16 (measured with
   PyTorch's CPU sigmoid; :func:`binarize_threshold` finds it on any device, and the kernels compare against it).
3. **Overlaps**, in fp32 on the 0/1 masks (intersections and areas are exact integers):
   ``IoU[i, j] = (inter + 1e-6) / (area_i + area_j - inter + 1e-6)`` and
   ``coverage[i, j] = (inter + 1e-6) / (area_j + 1e-6)``, the fraction of candidate j covered by kept mask i.
   1e-6 is rounded to fp32 (as a Python scalar added to an fp32 tensor), every operation rounds in fp32, the
   divisions are IEEE. Two empty masks have IoU (0 + 1e-6) / (0 + 1e-6) = 1; an empty candidate is fully covered
   (coverage 1) by any mask: both are suppressed, as the formulas decide.
4. **Greedy**, in descending score order: keep the best remaining mask i, then remove every remaining candidate j
   with ``IoU[i, j] >= iou_threshold OR coverage[i, j] >= coverage_threshold`` (``combine="or"``, the official
   rule; ``"and"`` requires both). The official code compares with ``>=`` (it keeps ``iou < t``), although the
   paper says "exceeds"; we follow the code. Thresholds are compared in fp32 (PyTorch casts a Python scalar to the
   tensor's dtype), so 0.7 means float32(0.7) = 0.699999988.
5. **Ties**: the official ``scores.sort(descending=True)`` is not stable, so tied scores have no defined order
   there. Here the sort is stable: tied scores are visited lowest index first. NaN scores sort first (as
   ``torch.sort`` places them), consistently on every backend.

Result: the kept indices into ``masks`` (int64, on the masks' device), in descending-score order.

This file holds the oracle, :func:`mask_nms_official` (a literal transcription of the official loop: torch ops, one
kept mask at a time, a host sync per kept mask), the ``torch`` backend :func:`mask_nms` (vectorized: one matmul for
every intersection, the suppression matrix, then the greedy scan on the host), the stage functions the kernel tests
compare against, and the input plan shared by the ``triton`` and ``cuda`` backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6
COMBINES = ("or", "and")
WORD_BITS = 32


# ----------------------------------------------------------------------------------------------------------------
# The oracle: the official loop.


def _pairwise_iou(masks1: torch.Tensor, masks2: torch.Tensor) -> torch.Tensor:
    """The official ``pairwise_iou`` on flattened 0/1 fp32 masks."""
    intersection = torch.einsum("nc,mc->nm", masks1, masks2)
    union = masks1.sum(-1)[:, None] + masks2.sum(-1)[None, :]
    return (intersection + EPS) / (union - intersection + EPS)


def _pairwise_coverage(masks1: torch.Tensor, masks2: torch.Tensor) -> torch.Tensor:
    """The official ``pairwise_inner``: [i, j] is the fraction of masks2[j] covered by masks1[i]."""
    inter = torch.einsum("nc,mc->nm", masks1, masks2)
    return (inter + EPS) / (masks2.sum(dim=1) + EPS)


def mask_nms_official(masks: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float,
                      coverage_threshold: float, combine: str = "or", downsample: int = 2) -> torch.Tensor:
    """The official inner-NMS, transcribed: the test oracle. Differences from the official code, all documented in
    the module docstring: the sort is stable, ``combine="and"`` exists, ``downsample`` is the integer factor d
    (official 0.5 = d 2), and N = 0 returns an empty result (the official reshape fails on it)."""
    if masks.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=masks.device)
    if downsample > 1:
        masks = F.interpolate(masks.unsqueeze(0), scale_factor=1.0 / downsample, mode="bilinear",
                              align_corners=False).squeeze(0)
    masks = masks.reshape(masks.shape[0], -1)
    masks = masks.sigmoid().ge(0.5).float()
    iou_matrix = _pairwise_iou(masks, masks)
    coverage_matrix = _pairwise_coverage(masks, masks)

    _, order = scores.sort(descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        current_iou = iou_matrix[i, order[1:]]
        current_coverage = coverage_matrix[i, order[1:]]
        if combine == "or":
            remain = (current_iou < iou_threshold) & (current_coverage < coverage_threshold)
        else:
            remain = (current_iou < iou_threshold) | (current_coverage < coverage_threshold)
        order = order[torch.nonzero(remain).squeeze(dim=1) + 1]
    return torch.as_tensor(keep, dtype=torch.int64, device=masks.device)


# ----------------------------------------------------------------------------------------------------------------
# Stages (vectorized), shared by the torch backend and the kernel tests.


def output_size(h: int, w: int, downsample: int) -> tuple[int, int]:
    """(Ho, Wo) of the downsampled masks: PyTorch's int(size * scale_factor) in double arithmetic."""
    if downsample == 1:
        return h, w
    scale = 1.0 / downsample
    return int(h * scale), int(w * scale)


def sort_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` in descending order, ties lowest index first (int64)."""
    return torch.sort(scores, descending=True, stable=True).indices


def downsample_masks(masks: torch.Tensor, downsample: int) -> torch.Tensor:
    """[N, Ho, Wo] in the masks' dtype: the official bilinear interpolate (d > 1), or masks itself (d = 1)."""
    if downsample == 1:
        return masks
    return F.interpolate(masks.unsqueeze(0), scale_factor=1.0 / downsample, mode="bilinear",
                         align_corners=False).squeeze(0)


def binarize(masks: torch.Tensor, downsample: int) -> torch.Tensor:
    """The binary masks [N, Ho * Wo] (bool), pixels row-major: steps 1 and 2."""
    small = downsample_masks(masks, downsample)
    return small.reshape(small.shape[0], -1).sigmoid().ge(0.5)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool [R, C] -> int32 [R, ceil(C/32)]: bit b of word k is column 32*k + b (padding bits 0)."""
    rows, cols = bits.shape
    words = -(-cols // WORD_BITS)
    padded = torch.zeros((rows, words * WORD_BITS), dtype=torch.int64, device=bits.device)
    padded[:, :cols] = bits.to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=bits.device, dtype=torch.int64)
    packed = (padded.view(rows, words, WORD_BITS) << shifts).sum(-1)
    # Words with bit 31 set are the int32 with the same bits (two's complement).
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def suppression_matrix(bits: torch.Tensor, iou_threshold: float, coverage_threshold: float,
                       combine: str) -> torch.Tensor:
    """Bool [N, N] for binary masks [N, P] already in visiting order: [i, j] is True when j > i and a kept i
    removes j (step 4's test). Intersections by one fp32 matmul of the 0/1 masks: exact integers up to 2^24."""
    f = bits.to(torch.float32)
    inter = f @ f.T
    area = f.sum(1)
    iou = (inter + EPS) / (area[:, None] + area[None, :] - inter + EPS)
    coverage = (inter + EPS) / (area[None, :] + EPS)
    by_iou, by_coverage = iou >= iou_threshold, coverage >= coverage_threshold
    decision = by_iou | by_coverage if combine == "or" else by_iou & by_coverage
    return decision.triu(1)


def greedy_scan(suppress: torch.Tensor) -> torch.Tensor:
    """Keep flags (bool [N] on the CPU, visiting order) of the greedy walk over a suppression matrix [N, N]."""
    suppress = suppress.cpu()
    n = suppress.shape[0]
    removed = torch.zeros(n, dtype=torch.bool)
    keep = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if not removed[i]:
            keep[i] = True
            removed |= suppress[i]
    return keep


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float, coverage_threshold: float,
             combine: str, downsample: int) -> torch.Tensor:
    """The ``torch`` backend: the stages above (one host copy of the [N, N] suppression matrix for the scan)."""
    order = sort_order(scores)
    bits = binarize(masks, downsample)[order]
    keep = greedy_scan(suppression_matrix(bits, iou_threshold, coverage_threshold, combine))
    return order[keep.to(order.device)]


# ----------------------------------------------------------------------------------------------------------------
# The exact binarization threshold.

_THRESHOLDS: dict[tuple[str, torch.dtype], float] = {}


def _first_true(ok: torch.Tensor, what: str) -> int:
    """Index of the first True of a (CPU) bool vector that must be False...False True...True."""
    n = ok.numel()
    first = int(torch.argmax(ok.to(torch.int8)).item()) if bool(ok.any()) else n
    expected = torch.arange(n, device=ok.device) >= first
    if not torch.equal(ok, expected):
        raise RuntimeError(f"mmkernels.mask_nms: sigmoid(v) >= 0.5 is not monotone in v over {what} on this device; "
                           "the kernels' threshold comparison would not be exact")
    return first


def binarize_threshold(device: torch.device, dtype: torch.dtype) -> float:
    """t such that ``v.sigmoid().ge(0.5)`` equals ``v >= t`` for every value v of ``dtype`` when PyTorch computes
    the sigmoid on ``device``: the exact comparison the kernels make (returned as a Python float; it is a value of
    ``dtype``, exact in fp32). Found once per (device, dtype) by evaluating torch.sigmoid on the device: every
    finite value for fp16/bf16; for fp32 a grid over [-1, 0], then every float in the bracketing interval. Raises
    RuntimeError if the sigmoid is not monotone there (never seen; it would make a threshold inexact)."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _THRESHOLDS:
        return _THRESHOLDS[key]
    if dtype in (torch.float16, torch.bfloat16):
        patterns = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
        values = patterns[torch.isfinite(patterns)].to(torch.float32).sort().values.to(dtype).to(device)
        first = _first_true(values.sigmoid().ge(0.5).cpu(), f"every {dtype} value")
        t = float(values[first].item())
    elif dtype == torch.float32:
        # Negative floats v = -m: larger bit patterns of m are larger magnitudes. Coarse grid over m in [0, 1].
        one = 0x3F800000
        step = 1 << 14
        mags = torch.arange(0, one + step, step, dtype=torch.int32)
        ok = (-mags.view(torch.float32)).to(device).sigmoid().ge(0.5).cpu()
        last = _first_true(~ok, "a grid of fp32 values in [-1, 0]") - 1  # last magnitude still True
        if last < 0 or last + 1 >= mags.numel():
            raise RuntimeError("mmkernels.mask_nms: the fp32 sigmoid boundary is not inside [-1, 0]")
        fine = torch.arange(int(mags[last]), int(mags[last + 1]) + 1, dtype=torch.int32)
        ok = (-fine.view(torch.float32)).to(device).sigmoid().ge(0.5).cpu()
        last_fine = _first_true(~ok, "the fp32 values at the sigmoid boundary") - 1
        t = -float(fine[last_fine:last_fine + 1].view(torch.float32).item())
        positives = mags.view(torch.float32).to(device)
        if not bool(positives.sigmoid().ge(0.5).all()):
            raise RuntimeError("mmkernels.mask_nms: sigmoid(v) < 0.5 for some v >= 0 on this device")
    else:
        raise TypeError(f"mmkernels.mask_nms: no kernel threshold for dtype {dtype}")
    _THRESHOLDS[key] = t
    return t


# ----------------------------------------------------------------------------------------------------------------
# What the kernels receive (the triton and cuda backends).


@dataclass
class Plan:
    """Inputs of the pack kernels, which write the binary masks in visiting order.

    ``src`` [N, Hs, Ws] (any strides) is read through ``order`` (row r of the packed masks is src[order[r]]).
    ``factor`` is the downsampling the kernel fuses: 1 (src is already at the output size: d = 1, or the official
    interpolate ran first) or d, where the kernel computes PyTorch's CUDA bilinear formula itself,
    ``lam0 * (lam0 * a + lam1 * b) + lam1 * (lam0 * c + lam1 * e)`` in fp32 over the 2x2 pixels at
    (d*o + (d-1)//2 + {0, 1}) with (lam0, lam1) = (1/2, 1/2) for even d and (1, 0) for odd d, rounded once to the
    masks' dtype (upsample_bilinear2d_out_frame; the weights are exact, so FMA contraction changes no result other
    than subnormal ones, which lie far above the threshold). A pixel is on when its value >= ``threshold``.
    """

    order: torch.Tensor
    src: torch.Tensor
    factor: int
    lam0: float
    lam1: float
    out_h: int
    out_w: int
    words: int
    threshold: float

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w


def plan(masks: torch.Tensor, scores: torch.Tensor, downsample: int, fuse: bool) -> Plan:
    """The kernel plan. ``fuse``: compute the downsampling in the pack kernel (the CUDA formula; used for
    contiguous masks on a GPU, where PyTorch runs that formula); otherwise PyTorch's own interpolate runs first, so
    the downsampled values are the reference's bit for bit on any device (the CPU kernels sum in other orders)."""
    n, h, w = masks.shape
    out_h, out_w = output_size(h, w, downsample)
    factor = downsample if fuse else 1
    src = masks if fuse else downsample_masks(masks, downsample)
    lam1 = 0.5 if factor % 2 == 0 else 0.0
    return Plan(order=sort_order(scores), src=src, factor=factor, lam0=1.0 - lam1, lam1=lam1, out_h=out_h,
                out_w=out_w, words=-(-(out_h * out_w) // WORD_BITS),
                threshold=binarize_threshold(masks.device, masks.dtype))


KERNEL_MAX_PIXELS = 2 ** 23


def kernel_limits(masks: torch.Tensor, downsample: int, max_masks: int):
    """None when the kernel backends can run these sizes (the mask limit is each backend's), else why not. Above
    2^23 pixels, fp32 areas and area sums would no longer be exact integers."""
    n, h, w = masks.shape
    if n > max_masks:
        return f"{n} masks is above the kernels' limit of {max_masks}"
    ho, wo = output_size(h, w, downsample)
    if ho * wo > KERNEL_MAX_PIXELS:
        return f"{ho}x{wo} pixels per downsampled mask is above the kernels' limit of 2^23"
    return None


def words_per_row(n: int) -> int:
    """Words of one row of the bit-packed suppression matrix [N, ceil(N/32)]."""
    return math.ceil(n / WORD_BITS)
