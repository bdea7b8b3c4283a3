"""Mask pooling ``cuda`` backend: glue over ``mmkernels._C`` (csrc/mask_pool/). Semantics: reference.py.

The kernels (csrc/mask_pool/kernels.cu) are plain fp32 FMA tiles, correctness first: forward, dx and the soft-mode
mask grad, each computing the resized weights of its tile on the fly from the logits through the tap tables of
reference.taps (the same tables the Triton kernels read), features and masks by strides, fp32/fp16/bf16 each (they
may differ), no atomics (deterministic). This module allocates the outputs, passes the tables and the threshold in
the form the kernels compare with, and computes the small [B, Q] vector u of the mask grad.

Limits (``supports`` says which one fails): CUDA tensors of those dtypes, and the Triton backend's size limits
(triton.supports_sizes: a batch of at most 65535, Q at most 65535 * 16, int32 offsets within one mask). The backend is experimental until
its kernels have passed their tests on a GPU.
"""

from __future__ import annotations

import torch

from mmkernels import _backend
from mmkernels._ext import C
from mmkernels.ops.mask_pool import reference
from mmkernels.ops.mask_pool.triton import MODE_ID, supports_sizes, threshold_arg

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The mask backward's source tile (csrc/mask_pool/mask_pool.h: kDmI, kDmJ).
DMASK_TILE = (8, 8)


def supports(features, masks, mode, threshold, eps) -> _backend.Reason:
    """None when the cuda kernels can run these inputs, else why not."""
    why = _backend.cuda_supports_tensors(features, masks, dtypes=DTYPES)
    if why is None:
        # The Triton backend's limits are these kernels' too (the mask backward's grid holds Q / 16 blocks in y,
        # every grid the batch in y or z).
        why = supports_sizes(features, masks)
    return why


def _tables(features: torch.Tensor, masks: torch.Tensor):
    return reference.tables(masks.shape[2], masks.shape[3], features.shape[2], features.shape[3], features.device)


def forward(features: torch.Tensor, masks: torch.Tensor, mode: str, threshold: float,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, Cc = features.shape[:2]
    Q = masks.shape[1]
    out = torch.empty((B, Q, Cc), dtype=features.dtype, device=features.device)
    denom = torch.empty((B, Q), dtype=torch.float32, device=features.device)
    C.mask_pool_fwd(features, masks, *_tables(features, masks), out, denom, MODE_ID[mode],
                    threshold_arg(mode, threshold, masks.dtype), float(eps))
    return out, denom


def backward(dout: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, denom: torch.Tensor,
             out: torch.Tensor, mode: str, threshold: float, need_dx: bool, need_dm: bool):
    dout = dout.to(features.dtype)  # read by strides (an expanded grad stays expanded)
    denom = denom.to(torch.float32).contiguous()
    tabs = _tables(features, masks)
    dx = dm = None
    if need_dx:
        dx = torch.empty_like(features)
        C.mask_pool_bwd_dx(dout, denom, features, masks, *tabs, dx, MODE_ID[mode],
                           threshold_arg(mode, threshold, masks.dtype))
    if need_dm and mode == "soft":
        dm = torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)
        u = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).div_(denom).contiguous()
        ranges = reference.adjoint_ranges(masks.shape[2], masks.shape[3], features.shape[2], features.shape[3],
                                          *DMASK_TILE, features.device)
        C.mask_pool_bwd_dmask(dout, denom, u, features, masks, *tabs, *ranges, dm,
                              threshold_arg(mode, threshold, masks.dtype))
    return dx, dm
