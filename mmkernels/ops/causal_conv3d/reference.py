"""Causal 3D convolution: the definition (plain PyTorch) and the ``torch`` backend.

Layouts: ``x`` [B, Cin, T, H, W] (any strides), ``weight`` [Cout, Cin, kt, kh, kw], ``bias`` [Cout] or None,
``cache`` [B, Cin, kt-1, H, W] or None. All four share one dtype (fp16, bf16, fp32; fp64 too on this backend).

Math (ST-VAE's ``STVAECausalConv3d``, specs/lavin_dit.md §2.2, with stride and a streaming cache added)::

    P     = kt - 1                                           # front frames
    front = cache                    if cache is given       # the previous chunk's last P input frames
          = x[:, :, :1] repeated P   if replicate            # the official behaviour
          = zeros                    otherwise
    xp    = cat([front, x], dim=2)                           # [B, Cin, P+T, H, W]
    xp    = zero-pad H by kh//2 and W by kw//2 on *each* side
    y     = conv3d(xp, weight, bias, stride=(stride, 1, 1), padding=0)

so ``T_out = (T + P - kt) // stride + 1 = (T - 1) // stride + 1``, ``H_out = H + 2*(kh//2) - kh + 1`` and likewise
W_out: H and W for odd kernels, H+1 and W+1 for even ones (the official padding is symmetric, so an even kernel
grows the output by one, exactly as the official module does). Output frame t reads padded frames
``[t*stride, t*stride + kt)``.

Precision: the conv runs in fp32 (fp64 for fp64 inputs) and the result is rounded once to x's dtype. On CUDA the
fp32 conv is forced to exact fp32 (no TF32), whatever the global cuDNN setting says.

Streaming: the forward runs one ``F.conv3d`` per output frame on a contiguous copy of its kt-frame window. Every
output frame is then computed by a call of the same shape whatever the chunking, so a video run chunk by chunk
with the cache equals one call on the whole video bitwise (a single conv3d over the whole video may pick another
algorithm for another T, on cuDNN). The reference's copies (the padded input, the windows) are fine here: it is the
definition and the CPU path; the Triton backend never copies x.

Backward (the backend contract), with ``dxp`` the gradient of the padded input (``aten.convolution_backward``),
cropped spatially::

    dx      = dxp[:, :, P:]                    (+ dxp[:, :, :P].sum(2) into frame 0 when replicate and no cache)
    dcache  = dxp[:, :, :P]                    (when a cache is given)
    dweight = the conv weight gradient;  dbias = dy summed over B, T_out, H_out, W_out

all in fp32 and rounded once, to each input's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (so fp64 can serve as ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def output_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is channels-last (and not also NCDHW-contiguous, as size-1 dims allow), else
    contiguous. Outputs and gradients follow the layout of the tensor they belong to."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[int, int, int, int, int]:
    """[B, Cout, T_out, H_out, W_out] per the module docstring (T_out is 0 for T = 0)."""
    B, _, T, H, W = x.shape
    _, _, kt, kh, kw = weight.shape
    return B, weight.shape[0], (T - 1) // stride + 1, H + 2 * (kh // 2) - kh + 1, W + 2 * (kw // 2) - kw + 1


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """cuDNN convolutions in exact fp32 (TF32 off) inside the block, on CUDA; a no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def front_frames(x: torch.Tensor, cache: Optional[torch.Tensor], kt: int, replicate: bool) -> torch.Tensor:
    """The P = kt-1 frames in front of x: the cache, frame 0 repeated, or zeros (x's dtype, [B, Cin, P, H, W])."""
    P = kt - 1
    if cache is not None:
        return cache
    B, C, _, H, W = x.shape
    if replicate and P > 0:
        return x[:, :, :1].expand(B, C, P, H, W)
    return x.new_zeros((B, C, P, H, W))


def padded_input(x: torch.Tensor, cache: Optional[torch.Tensor], kh_kw: Sequence[int], kt: int,
                 replicate: bool) -> torch.Tensor:
    """[B, Cin, P+T, H + 2*(kh//2), W + 2*(kw//2)] in the compute dtype: the official module's padded copy."""
    cd = compute_dtype(x)
    kh, kw = kh_kw
    xp = torch.cat([front_frames(x, cache, kt, replicate).to(cd), x.to(cd)], dim=2)
    return F.pad(xp, (kw // 2, kw // 2, kh // 2, kh // 2))


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
                  replicate: bool = True, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable reference (autograd through plain torch ops). See the module docstring."""
    return forward(x, weight, bias, cache, stride, replicate)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cache: Optional[torch.Tensor],
            stride: int, replicate: bool) -> torch.Tensor:
    """y per the module docstring, in x's dtype and output_format(x)."""
    B, Cout, T_out, Ho, Wo = output_shape(x, weight, stride)
    kt, kh, kw = weight.shape[2:]
    cd = compute_dtype(x)
    fmt = output_format(x)
    if B == 0 or T_out == 0:
        return x.new_empty((B, Cout, T_out, Ho, Wo)).contiguous(memory_format=fmt)
    xp = padded_input(x, cache, (kh, kw), kt, replicate)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    with exact_fp32(x.device):
        frames = [F.conv3d(xp[:, :, t * stride:t * stride + kt].contiguous(), w, b) for t in range(T_out)]
    return torch.cat(frames, dim=2).to(x.dtype).contiguous(memory_format=fmt)


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor], stride: int,
             replicate: bool, needs: Sequence[bool]):
    """(dx, dweight, dbias, dcache) per the module docstring; an entry is None where ``needs`` (the same four
    flags) is False, and dcache is None without a cache."""
    need_x, need_w, need_b, need_c = needs
    need_c = need_c and cache is not None
    cd = compute_dtype(x)
    kt, kh, kw = weight.shape[2:]
    P = kt - 1
    B, Cin, T, H, W = x.shape
    ph, pw = kh // 2, kw // 2
    dx = dw = db = dc = None
    if dy.numel() == 0:  # no output positions (B = 0 or T_out = 0): every gradient is zero
        dx = torch.zeros_like(x, memory_format=output_format(x)) if need_x else None
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
        db = x.new_zeros((weight.shape[0],)) if need_b else None
        dc = torch.zeros_like(cache, memory_format=output_format(cache)) if need_c else None
        return dx, dw, db, dc
    xp = padded_input(x, cache, (kh, kw), kt, replicate)
    with exact_fp32(x.device):
        gxp, gw, gb = torch.ops.aten.convolution_backward(
            dy.to(cd), xp, weight.to(cd), [weight.shape[0]], [stride, 1, 1], [0, 0, 0], [1, 1, 1], False,
            [0, 0, 0], 1, [need_x or need_c, need_w, need_b])
    if need_x or need_c:
        gxp = gxp[:, :, :, ph:ph + H, pw:pw + W]
        if need_x:
            g = gxp[:, :, P:]
            if replicate and cache is None and P > 0 and T > 0:
                # Every replicated front frame is frame 0: its taps' gradients land there too.
                g = torch.cat([g[:, :, :1] + gxp[:, :, :P].sum(dim=2, keepdim=True), g[:, :, 1:]], dim=2)
            # copy=True: dx and dcache are views of one buffer, and a custom op's outputs must not alias.
            dx = g.to(dtype=x.dtype, memory_format=output_format(x), copy=True)
        if need_c:
            dc = gxp[:, :, :P].to(dtype=cache.dtype, memory_format=output_format(cache), copy=True)
    if need_w:
        dw = gw.to(weight.dtype).contiguous()
    if need_b:
        db = gb.to(x.dtype)
    return dx, dw, db, dc
