"""Mask NMS ``cuda`` backend: glue over ``mmkernels._C`` (csrc/mask_nms/mask_nms.cu). Semantics: reference.py.

The same three stages as the Triton backend, as CUDA kernels: pack (binarize, fused 2x2 bilinear downsampling for
contiguous masks, one warp ballot per 32-pixel word), the popcount suppression matrix (64 x 64 tiles of pairs over
the upper triangle, words staged in shared memory), and the one-block greedy scan with the removed bitmask in
shared memory. One host sync, for the size of the result. Stage functions have the Triton backend's signatures,
so the tests compare both with the reference stage by stage.

Limits (``supports``): CUDA tensors, fp32/fp16/bf16 masks, N <= 131072, Ho * Wo <= 2^23. Experimental until its
kernels have passed their tests on a GPU.
"""

from __future__ import annotations

import torch

from mmkernels import _backend
from mmkernels._ext import C
from mmkernels.ops.mask_nms import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MASKS = 131072
FUSE_DOWNSAMPLE = True  # as triton.FUSE_DOWNSAMPLE (the pack kernel computes the bilinear taps itself)


def supports(masks, scores, iou_threshold, coverage_threshold, combine, downsample) -> _backend.Reason:
    why = _backend.cuda_supports_tensors(masks, dtypes=DTYPES)
    if why is None:
        why = reference.kernel_limits(masks, downsample, MAX_MASKS)
    return why


def pack(p: reference.Plan, dense: bool = False):
    """(bits int32 [N, K], area int32 [N], None): the Triton ``pack`` signature (no dense output here)."""
    if dense:
        raise ValueError("the cuda backend has no dense (matmul) variant")
    bits, area = C.mask_nms_pack(p.src, p.order, p.factor, p.lam0, p.lam1, p.out_h, p.out_w, p.threshold)
    return bits, area, None


def suppression(bits, area, iou_threshold: float, coverage_threshold: float, combine: str, dense=None):
    return C.mask_nms_suppress(bits, area, float(iou_threshold), float(coverage_threshold), reference.EPS,
                               combine == "and")


def scan(sup) -> torch.Tensor:
    return C.mask_nms_scan(sup)


def fuse(masks: torch.Tensor) -> bool:
    return FUSE_DOWNSAMPLE and masks.is_contiguous()


def mask_nms(masks, scores, iou_threshold, coverage_threshold, combine, downsample) -> torch.Tensor:
    p = reference.plan(masks, scores, downsample, fuse(masks))
    bits, area, _ = pack(p)
    sup = suppression(bits, area, iou_threshold, coverage_threshold, combine)
    return p.order[scan(sup).bool()]
