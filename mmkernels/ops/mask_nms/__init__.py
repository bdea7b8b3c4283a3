"""``mmkernels.mask_nms``: Unpair-Seg's mask NMS (Algorithm 1, the official "inner-NMS"), torch / Triton / CUDA.

Greedy non-maximum suppression of mask proposals by IoU and coverage of their binarized, downsampled masks; the
semantics (downsampling, the exact binarization boundary, the fp32 formulas, ``>=``, stable ties) are in
reference.py, whose literal transcription of the official loop is the test oracle. Every backend returns the same
indices as that oracle, bit for bit in every decision.

Registered as the custom op ``mmkernels::mask_nms`` (torch.library) with a fake implementation whose output size
is data-dependent (``ctx.new_dynamic_size()``), so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. There is no autograd: the result is indices (the inputs are detached).

Cost, for N masks of H x W logits (s bytes each) downsampled by d to P = Ho * Wo pixels, K = ceil(P/32) words,
at the benchmark shape N = 1200, 256 x 256, bf16, d = 2 (P = 16384, K = 512):

    pack        reads N*H*W*s = 157 MB, writes 4*N*K = 2.5 MB packed masks (+ 2*N*P = 39 MB fp16 pixels for the
                matmul variant); ~7 FLOP per output pixel (the bilinear tap), negligible
    pairs       N*(N-1)/2 = 719,400 pairs of the upper triangle (sorted order), each 2*P "FLOP" (an AND + add per
                pixel pair): 23.6 G; as words, 368 M AND + popcount; operands (2.5 MB / 39 MB) stay in L2 (50 MB)
    decisions   ~10 fp32 ops per pair (two IEEE divisions), 4*N*ceil(N/32) = 182 KB of suppression bits
    scan        ceil(N/32) = 38 dependent steps over <= 182 KB

Ceiling on an H200 (~790 TFLOP/s fp16/bf16 tensor cores, ~4.3 TB/s, 132 SMs, popc 16/clock/SM = ~4.2 T/s):
pack >= 37 us (bandwidth), pairs >= 30 us on tensor cores (Triton "dot" variant, fp16 0/1 with fp32 accumulation:
exact) or >= 88 us by popcount (Triton "popcount" variant, the CUDA backend), scan ~1 us per step (~40 us), so
~110-170 us in all. The anchor (bench/ops/mask_nms.py, same run): the official loop over torch ops, whose two fp32
einsums alone are 2 x 47 GFLOP (~1.6 ms without TF32) and which syncs with the host once per kept mask, and the
vectorized torch reference. Bar (issue #6): >= 20x faster than the official loop. No performance claim is made
here without a GPU measurement.
"""

from __future__ import annotations

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.mask_nms import reference

_OP = _backend.register_op("mask_nms")
_NAME = "mask_nms"


def _triton_supports(*args) -> _backend.Reason:
    from mmkernels.ops.mask_nms import triton as nms_triton

    return nms_triton.supports(*args)


def _cuda_supports(*args) -> _backend.Reason:
    from mmkernels.ops.mask_nms import cuda as nms_cuda

    return nms_cuda.supports(*args)


_OP.register(_backend.Backend("torch", "mmkernels.ops.mask_nms.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.mask_nms.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.mask_nms.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


@torch.library.custom_op("mmkernels::mask_nms", mutates_args=())
def _mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float, coverage_threshold: float,
              combine: str, downsample: int, backend: str) -> torch.Tensor:
    impl = _OP.resolve(backend, masks, scores, iou_threshold, coverage_threshold, combine, downsample)
    if masks.shape[0] == 0:  # no kernel for an empty set, on any backend
        return torch.empty(0, dtype=torch.int64, device=masks.device)
    # Intersections are exact counts on every backend: under autocast the torch path's matmul would otherwise run in
    # bf16 and round them (e.g. 49286 -> 49408), flipping decisions near a threshold that the kernels get right.
    with torch.autocast(masks.device.type, enabled=False):
        return impl.mask_nms(masks, scores, iou_threshold, coverage_threshold, combine, downsample)


@_mask_nms.register_fake
def _(masks, scores, iou_threshold, coverage_threshold, combine, downsample, backend):
    kept = torch.library.get_ctx().new_dynamic_size()
    return masks.new_empty((kept,), dtype=torch.int64)


def _threshold(name: str, v) -> float:
    v = _checks.finite_float(_NAME, name, v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"mmkernels.{_NAME}: argument '{name}' must be in [0, 1], got {v}")
    return v


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float, coverage_threshold: float,
             combine: str = "or", downsample: int = 2) -> torch.Tensor:
    """Greedy mask NMS by IoU and coverage (Unpair-Seg's inner-NMS); the indices of the masks it keeps.

    Args:
        masks: [N, H, W] mask logits, float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
            A pixel is foreground when sigmoid(logit) >= 0.5 in the masks' dtype after downsampling.
        scores: [N] floating scores on the masks' device; masks are visited in descending score order, ties
            lowest index first.
        iou_threshold: in [0, 1]; a kept mask i removes candidate j when IoU(i, j) >= iou_threshold ...
        coverage_threshold: in [0, 1]; ... or (``combine="or"``, the official rule) / and (``"and"``) when the
            fraction of j covered by i, (inter + 1e-6) / (area_j + 1e-6), is >= coverage_threshold.
            The official stage-1 values are 0.5 and 0.7.
        combine: "or" or "and".
        downsample: integer factor d >= 1 (the official 0.5 scale is d = 2; 1 means none): the masks go through
            ``F.interpolate(scale_factor=1/d, mode="bilinear", align_corners=False)`` first, so H, W >= d; odd
            sizes drop their last rows/columns as interpolate does (reference.py).

    Returns:
        int64 [K] indices into ``masks`` (on its device) of the kept masks, in descending score order. Not
        differentiable. One host sync (the result's size) on every backend.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend); the Triton
    backend's intersection variant by ``MMKERNELS_MASK_NMS_INTERSECT=dot|popcount`` (default dot).
    """
    _checks.tensor(_NAME, "masks", masks, ndim=3)
    _checks.tensor(_NAME, "scores", scores, ndim=1)
    n, h, w = masks.shape
    if scores.shape[0] != n:
        raise ValueError(f"mmkernels.{_NAME}: argument 'scores' must have shape [{n}] (one score per mask), got "
                         f"{tuple(scores.shape)}")
    _checks.same_device(_NAME, "masks", masks, "scores", scores)
    iou_threshold = _threshold("iou_threshold", iou_threshold)
    coverage_threshold = _threshold("coverage_threshold", coverage_threshold)
    if not isinstance(combine, str):
        raise TypeError(f"mmkernels.{_NAME}: argument 'combine' must be a str, got {type(combine).__name__}")
    if combine not in reference.COMBINES:
        raise ValueError(f"mmkernels.{_NAME}: argument 'combine' must be one of {', '.join(reference.COMBINES)}, "
                         f"got {combine!r}")
    if isinstance(downsample, bool) or not isinstance(downsample, int):
        raise TypeError(f"mmkernels.{_NAME}: argument 'downsample' must be an int, got {type(downsample).__name__}")
    if downsample < 1:
        raise ValueError(f"mmkernels.{_NAME}: argument 'downsample' must be >= 1, got {downsample}")
    if h < downsample or w < downsample:
        raise ValueError(f"mmkernels.{_NAME}: argument 'masks' must have H and W >= downsample = {downsample}, "
                         f"got shape {tuple(masks.shape)}")
    return torch.ops.mmkernels.mask_nms(masks.detach(), scores.detach(), iou_threshold, coverage_threshold, combine,
                                        downsample, _backend.requested_backend())
