"""Multi-scale deformable attention ``cuda`` backend: glue over ``mmkernels._C`` (csrc/ms_deform_attn/).
Semantics: reference.py.

Arguments go to the kernels contiguous (one copy where they are not: the stride-0 grad of ``y.sum().backward()``,
a permuted value), the level tables as int64 on value's device (the public function also accepts int32 tables and
tables on the CPU), grad_out in value's dtype.

Kernels (layouts and thread mapping: csrc/ms_deform_attn/msda.h), fp32/fp16/bf16 value with locations and weights
in value's dtype or fp32, fp32 arithmetic everywhere:

* forward (msda_fwd.cu): a group of G lanes owns one query head (b, q, h); a lane owns VEC consecutive channels
  (VEC = one 16-byte vector: 8 for fp16/bf16, 4 for fp32, when C % VEC == 0; else 1, the generic path, any C),
  G = the power of two covering C / VEC channel vectors, at most 32 (more channels loop in chunks of G vectors).
  Per sample each lane gathers its vector at the 4 corners (one 16-byte load each) and accumulates attn * w * v;
  the output vector is written once. Consecutive groups take the heads of one query, then the next queries: the
  heads of a pixel are adjacent in value's rows and neighbouring queries sample neighbouring pixels, so a block's
  gathers share L1/L2 lines.
* backward (msda_bwd.cu), same mapping: each lane holds grad_out's vector, gathers the corners again and forms its
  share of grad_attn = sum_c g * sample and of sum_c g * d(sample)/dx, /dy; the group adds its lanes with a fixed
  xor butterfly and lane 0 writes grad_attn and grad_loc (each element once: deterministic in both modes).
  grad_value, non-deterministic mode: fp32 atomics into a zeroed fp32 [B, S, H, C] buffer, then one cast. The
  per-lane pre-reduction is structural: lanes own channels, so a group's atomics for one corner are C distinct
  consecutive floats (coalesced, never two lanes of a warp on one address), and on sm_90 a lane issues its
  channels as 16-byte vector atomics (atomicAdd(float4*), i.e. red.global.add.v4.f32), 4x fewer L2 atomic
  operations than scalar ones.
  grad_value, deterministic mode: plan.value_grad_csr lists each value row's samples (ascending sample id); a group
  owns one row, lane j decodes entry i0 + j (coefficient attn * w from the destination pixel, and its grad_out
  offset), the group broadcasts the entries one by one with shuffles and every lane adds coef * g for its channel
  vector, in plan order: bitwise repeatable, no atomics.

Cost per call (N = B*Q*H*L*P samples, s = bytes per value element, t = per location/weight element; the
Unpair-Seg encoder at a 1024^2 image: S = Q = 21504 (levels 32^2, 64^2, 128^2), H = 8, C = 32, L = 3, P = 4, so
N = 2.06M per image; numbers below for B = 1, bf16 value with fp32 locations and weights, B = 8 is 8x)::

    forward  FLOP  4 corners x C multiply-adds per sample = 8*N*C (+ ~30 per sample for the footprint):
                   0.53 GFLOP, nothing against 790 TFLOP/s
             HBM   value once (B*S*H*C*s = 11.0 MB), loc (2*N*t = 16.5 MB), attn (N*t = 8.3 MB), out (11.0 MB):
                   46.8 MB, 10.9 us at 4.3 TB/s
             L2    4 corner vectors of C*s bytes per sample: 4*N*C*s = 528 MB (1.06 GB with fp32 value)
    backward FLOP  ~ 16*N*C (4 dot products and 4 scaled atomics per sample and channel)
             HBM   value, grad_out, loc, attn read once; grad_loc, grad_attn, grad_value written; the fp32
                   buffer zeroed, read once by the cast: ~130 MB, ~30 us
             L2    the 528 MB of corner gathers again, plus 4*N*C fp32 atomics = 1.06 GB of atomic payload
                   (66M 16-byte vector atomics on sm_90)
    deterministic  + the plan (torch: ~4N int64 keys built, stably sorted and counted) and the gather kernel:
                   entries (8 B each, ~4N), loc/attn per entry, and 4*N*C*s = 528 MB of grad_out gathers

The "L2-gather floor": value (11 MB, 22 MB fp32) sits in the 50 MB L2, so after its first read the gathers are L2
traffic, and the forward cannot beat max(HBM bytes / 4.3 TB/s, gathered bytes / L2 bandwidth). The L2 read
bandwidth of an H200 is not measured here (bench/ops/ms_deform_attn.py measures it in the same run); at an
assumed 8-10 TB/s the forward floor is ~53-66 us per image in bf16, i.e. L2-bound, 5-6x above the HBM floor. L1
hits (neighbouring queries of a block sharing corners) lower the L2 bytes below this count, so a kernel can beat
the floor as stated. Anchors, measured by the benchmark in the same run: the grid_sample reference (what the
official module falls back to) and the official design (one thread per output channel, fp32 only).

Limits (``supports`` says which one fails): CUDA tensors of fp32/fp16/bf16 on a compiled arch, locations and weights
of one dtype (value's or fp32), 1 to 1024 levels (the level table lives in shared memory), and inside one batch
element S*H, Q*H*C and Q*H*L*P*2 below 2**30 (the kernels index and divide in 32 bits there; 64-bit division is
a called subroutine). Any C and P. The backend is experimental until its kernels have passed their tests on a GPU.
"""

from __future__ import annotations

import torch

from mmkernels import _backend
from mmkernels._ext import C

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_LEVELS = 1024  # csrc/ms_deform_attn/msda.h: kMaxLevels
INDEX_MAX = 1 << 30  # csrc/ms_deform_attn/ms_deform_attn.cu: kIndexMax
_ENTRY_POINTS = ("ms_deform_attn_fwd", "ms_deform_attn_bwd", "ms_deform_attn_bwd_value")


def supports(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> _backend.Reason:
    """None when the cuda kernels can run these inputs, else why not."""
    why = _backend.cuda_supports_tensors(value, sampling_locations, attention_weights, dtypes=DTYPES)
    if why is not None:
        return why
    if C is None or not all(hasattr(C, name) for name in _ENTRY_POINTS):
        return "mmkernels._C was built without the ms_deform_attn kernels (rebuild the extension)"
    loc, attn = sampling_locations, attention_weights
    if loc.dtype != attn.dtype or loc.dtype not in (value.dtype, torch.float32):
        return (f"the kernels take sampling_locations and attention_weights of one dtype, value's ({value.dtype}) "
                f"or float32; got {loc.dtype} and {attn.dtype}")
    L = spatial_shapes.shape[0]
    if not 1 <= L <= MAX_LEVELS:
        return f"the kernels take 1 to {MAX_LEVELS} levels (a shared-memory table), got {L}"
    _, S, H, Ch = value.shape
    Q, P = loc.shape[1], loc.shape[4]
    for what, n in (("S*H", S * H), ("Q*H*C", Q * H * Ch), ("Q*H*L*P*2", Q * H * L * P * 2)):
        if n >= INDEX_MAX:
            return f"{what} = {n} per batch element is at or above the kernels' 32-bit index limit of 2**30"
    return None


def _index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int64).contiguous()


def _args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    dev = value.device
    return (value.contiguous(), _index(spatial_shapes, dev), _index(level_start_index, dev),
            sampling_locations.contiguous(), attention_weights.contiguous())


def forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """out [B, Q, H*C] in value's dtype (reference.forward)."""
    return C.ms_deform_attn_fwd(*_args(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights))


def backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
             level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_loc, grad_attn), each in its input's dtype (reference.backward). grad_out [B, Q, H*C] is
    taken in value's dtype (the output's)."""
    v, ss, lsi, loc, attn = _args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    g = grad_out.to(value.dtype).contiguous()
    gv, gloc, gattn = C.ms_deform_attn_bwd(g, v, ss, lsi, loc, attn, not deterministic)
    if deterministic:
        from mmkernels.ops.ms_deform_attn import plan

        entries, offsets = plan.value_grad_csr(ss, lsi, loc, v.shape[1])
        gv = C.ms_deform_attn_bwd_value(g, v, ss, lsi, loc, attn, entries.contiguous(), offsets.contiguous())
    return gv, gloc, gattn
