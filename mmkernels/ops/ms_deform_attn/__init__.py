"""``mmkernels.ms_deform_attn``: multi-scale deformable attention (Deformable-DETR, Unpair-Seg's pixel decoder),
forward and backward, with torch / Triton / CUDA backends and a deterministic backward.

Registered as the custom ops ``mmkernels::ms_deform_attn_fwd`` and ``mmkernels::ms_deform_attn_bwd``
(torch.library) with fake implementations and autograd, so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. Semantics: reference.py.

Cost, per call (N = B*Q*H*L*P samples, s = bytes per element of value, t = of locations and weights)::

    forward    FLOP  ~ N * C * 12 (4 corner weights x multiply-add, the attention multiply-add)
               HBM   value once (B*S*H*C*s), locations (2*N*t), weights (N*t), output written (B*Q*H*C*s)
               L2    4 corner rows of C*s bytes per sample: 4*N*C*s gathered bytes
    backward   FLOP  ~ N * C * 30
               HBM   as forward plus grad_out read, grad_value written (and its fp32 atomic buffer, 4 bytes per
                     element read-modify-written), grad_loc and grad_attn written
               L2    4 corner reads + 4 atomic adds of C*4 bytes per sample

At the Unpair-Seg encoder shapes (1024^2 input: levels 32^2, 64^2, 128^2, S = Q = 21504, H = 8, C = 32, L = 3, P = 4;
bf16 value, fp32 locations and weights as the module produces them): N = 2.06M samples per image; HBM bytes
11.0 MB value + 16.5 MB locations + 8.3 MB weights + 11.0 MB output = 46.8 MB (11 us at 4.3 TB/s), while the
gathers move 4*N*64 B = 528 MB through L2 (value fits in the 50 MB L2 many times over). The op is L2-gather-bound:
its floor is the gathered bytes at the L2 bandwidth (bench/ops/ms_deform_attn.py computes it from a measured L2
read bandwidth in the same run). The FLOPs (0.8 GFLOP per image) are negligible against 790 TFLOP/s. Anchors: the
grid_sample reference (what the official code falls back to) and the official one-thread-per-channel kernel
design (fp32 only), measured in the same run.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.ms_deform_attn import plan, reference

_OP = _backend.register_op("ms_deform_attn")
_NAME = "ms_deform_attn"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _kernel_dtypes(value, loc, attn) -> _backend.Reason:
    if loc.dtype != attn.dtype or loc.dtype not in (value.dtype, torch.float32):
        return (f"the kernels take sampling_locations and attention_weights of one dtype, value's ({value.dtype}) or "
                f"float32; got {loc.dtype} and {attn.dtype}")
    return None


def _triton_supports(value, spatial_shapes, level_start_index, loc, attn) -> _backend.Reason:
    why = _backend.triton_supports_tensors(value, loc, attn, dtypes=_KERNEL_DTYPES) or _kernel_dtypes(value, loc, attn)
    if why is None:
        from mmkernels.ops.ms_deform_attn import triton as msda_triton

        why = msda_triton.supports_sizes(value)
    return why


def _cuda_supports(value, spatial_shapes, level_start_index, loc, attn) -> _backend.Reason:
    why = _kernel_dtypes(value, loc, attn)
    if why is None:
        from mmkernels.ops.ms_deform_attn import cuda as msda_cuda

        why = msda_cuda.supports(value, spatial_shapes, level_start_index, loc, attn)
    return why


_OP.register(_backend.Backend("torch", "mmkernels.ops.ms_deform_attn.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.ms_deform_attn.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.ms_deform_attn.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _impl(backend: str, value, spatial_shapes, level_start_index, loc, attn):
    impl = _OP.resolve(backend, value, spatial_shapes, level_start_index, loc, attn)
    # The level table is checked against S here, where the tensors are real (eager and compiled calls alike);
    # the check reads a GPU table once and then caches it (plan.check_levels).
    why = plan.check_levels(spatial_shapes, level_start_index, value.shape[1])
    if why is not None:
        raise ValueError(f"mmkernels.{_NAME}: arguments 'spatial_shapes' and 'level_start_index' do not match "
                         f"value: {why}")
    return reference if min(loc.numel(), value.numel()) == 0 else impl


@torch.library.custom_op("mmkernels::ms_deform_attn_fwd", mutates_args=())
def _msda_fwd(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor, deterministic: bool,
              backend: str) -> torch.Tensor:
    # ``deterministic`` only matters to the backward; it is an input so that autograd's context can see it.
    impl = _impl(backend, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return impl.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_msda_fwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic, backend):
    B, _, H, C = value.shape
    return value.new_empty((B, sampling_locations.shape[1], H * C))


@torch.library.custom_op("mmkernels::ms_deform_attn_bwd", mutates_args=())
def _msda_bwd(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(backend, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return impl.backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         deterministic)


@_msda_bwd.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic,
      backend):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, loc, attn, deterministic, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
    ctx.deterministic, ctx.backend = deterministic, backend


def _backward(ctx, grad_out):
    value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
    dv, dloc, dattn = torch.ops.mmkernels.ms_deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, loc,
                                                             attn, ctx.deterministic, ctx.backend)
    return dv, None, None, dloc, dattn, None, None


_msda_fwd.register_autograd(_backward, setup_context=_setup_context)

Levels = Union[torch.Tensor, Sequence[Sequence[int]]]


def _index_table(name: str, t, value: torch.Tensor, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.tensor(t)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"mmkernels.{_NAME}: argument '{name}' must be an integer tensor or a sequence of ints "
                            f"({e})") from None
        if t.dtype != torch.int64:
            raise TypeError(f"mmkernels.{_NAME}: argument '{name}' must hold ints, got {t.dtype} values")
        t = t.to(value.device)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"mmkernels.{_NAME}: argument '{name}' must be an int64 or int32 tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"mmkernels.{_NAME}: argument '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.device != value.device and t.device.type != "cpu":
        raise ValueError(f"mmkernels.{_NAME}: argument '{name}' is on {t.device} but 'value' is on {value.device}")
    return t


def ms_deform_attn(value: torch.Tensor, spatial_shapes: Levels, level_start_index: Levels,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                   deterministic: bool = False) -> torch.Tensor:
    """Multi-scale deformable attention: attention-weighted bilinear samples of a multi-level value map.

    Args:
        value: [B, S, H, C] (S = sum over levels of H_l * W_l rows, each level row-major (H_l, W_l); H heads of C
            channels), float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
        spatial_shapes: [L, 2] int64/int32 tensor (on value's device or the CPU) or a sequence of (H_l, W_l).
        level_start_index: [L] (same kinds): the exclusive cumulative sum of H_l * W_l. Both are checked against
            S (ValueError); a table on the GPU is read once and then cached until modified in place.
        sampling_locations: [B, Q, H, L, P, 2], (x, y) normalized to [0, 1] per level (x along W); values outside
            [0, 1] are allowed (neighbours outside a map contribute 0).
        attention_weights: [B, Q, H, L, P], any values (normalization is the caller's business).
            The Triton and CUDA kernels take locations and weights of one dtype, value's or float32 (float32
            locations with bf16 value keep sub-pixel precision at 128^2 levels); other combinations run on torch.
        deterministic: make the backward bitwise repeatable: grad_value is gathered per value row in a fixed order
            (plan.py) instead of being scattered with float atomics. Forward results are always deterministic.

    Returns:
        [B, Q, H*C] in value's dtype (head-major channels), accumulated in fp32:
        ``out[b,q,h*C+c] = sum_{l,p} A[b,q,h,l,p] * bilinear(V_l[b,:,:,h,c], loc_x*W_l - 0.5, loc_y*H_l - 0.5)``,
        equal to grid_sample(bilinear, zeros, align_corners=False) per level. Differentiable in value,
        sampling_locations and attention_weights. Non-finite inputs propagate as grid_sample's: a NaN or infinite
        location, or a NaN weight (even on a location outside the map), makes its (b, q, h) output NaN and its
        grad_attn / grad_loc entries NaN; a sample with no corner in the map adds nothing to grad_value.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    """
    _checks.tensor(_NAME, "value", value, ndim=4)
    _checks.tensor(_NAME, "sampling_locations", sampling_locations, ndim=6)
    _checks.tensor(_NAME, "attention_weights", attention_weights, ndim=5)
    spatial_shapes = _index_table("spatial_shapes", spatial_shapes, value, 2)
    level_start_index = _index_table("level_start_index", level_start_index, value, 1)
    B, S, H, C = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"mmkernels.{_NAME}: argument 'spatial_shapes' must have shape [L, 2] (rows H_l, W_l), got "
                         f"{tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != L:
        raise ValueError(f"mmkernels.{_NAME}: argument 'level_start_index' must have shape [{L}] (one per level of "
                         f"spatial_shapes), got {tuple(level_start_index.shape)}")
    loc, attn = sampling_locations, attention_weights
    if loc.shape[-1] != 2:
        raise ValueError(f"mmkernels.{_NAME}: argument 'sampling_locations' must end in a dim of 2 (x, y), got shape "
                         f"{tuple(loc.shape)}")
    if loc.shape[0] != B or loc.shape[2] != H or loc.shape[3] != L:
        raise ValueError(f"mmkernels.{_NAME}: argument 'sampling_locations' must have shape [B, Q, H, L, P, 2] = "
                         f"[{B}, Q, {H}, {L}, P, 2] (value's batch and heads, spatial_shapes' levels), got "
                         f"{tuple(loc.shape)}")
    if tuple(attn.shape) != tuple(loc.shape[:5]):
        raise ValueError(f"mmkernels.{_NAME}: argument 'attention_weights' must have shape [B, Q, H, L, P] = "
                         f"{list(loc.shape[:5])} (sampling_locations' without the last dim), got {tuple(attn.shape)}")
    _checks.same_device(_NAME, "value", value, "sampling_locations", loc)
    _checks.same_device(_NAME, "value", value, "attention_weights", attn)
    if not isinstance(deterministic, bool):
        raise TypeError(f"mmkernels.{_NAME}: argument 'deterministic' must be a bool, got "
                        f"{type(deterministic).__name__}")
    return torch.ops.mmkernels.ms_deform_attn_fwd(value, spatial_shapes, level_start_index, loc, attn, deterministic,
                                                  _backend.requested_backend())
