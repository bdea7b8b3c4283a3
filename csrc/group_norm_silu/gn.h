// GroupNorm (+ SpatialNorm scale/shift at latent resolution) + SiLU: the parameters the host (group_norm_silu.cu)
// passes to the kernels (kernels.cu) and the launchers. Plain CUDA types only (no ATen in the kernel file).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmk {
namespace gn {

// A tensor as [B, C, D0, D1, D2] with element strides (x's spatial dims padded to three with size-1 dims, or merged
// when there are more; see mmkernels/ops/group_norm_silu/triton.py: canonical). Stride 0 broadcasts.
struct View5 {
  void* ptr;
  int64_t sb, sc, s0, s1, s2;
};

// Thread tiling of a pass. A block owns a tile of tc channels x tw columns (positions of D2, or source columns of
// D2 in the backward reduce) and loops over rows. A thread owns `vec` consecutive channels at one column: vec > 1
// only when x (and y, dy, dx) have unit channel stride, C % vec == 0, 16-byte aligned bases and every other stride
// a multiple of vec, so the vec elements are one 16-byte vector. `cfast`: threadIdx.x runs along the channels (bx
// vectors of vec channels, by columns); else along the columns (bx columns, by channels, vec == 1): adjacent threads
// follow the unit-stride axis, so loads coalesce in both layouts.
struct Tiles {
  int bx, by;        // block shape, bx * by <= 256
  int tc, tw;        // channels and columns of a tile
  int n_ct, n_wt;    // channel tiles (grid y), column tiles
  int n_rc, rpp;     // row chunks and rows per chunk (row-tiled passes)
  int64_t np;        // programs per (b, channel): partial sums per channel
};

// Layouts: x, y, dy, dx are [B, C, D0, D1, D2] views of x's shape; scale, shift, dscale, dshift are
// [B, C, Q0, Q1, Q2] views at the source (latent) resolution; weight, bias fp32 [C] or null; mean, rstd, m1, m2
// fp32 [B, G]; pa, pb, pc fp32 [B, C, np] partials; sa, sb fp32 [B, C].
// Nearest map (reference.py: resize_plan), per row (t, h) and column w: source (st, sh, sw) with sh = h / F1,
// sw = w / F2, st = t / F0, or with `first`: st = 0 for t = 0 and 1 + (t-1) / F0 after. The host checks that it
// stays inside the source.
struct Params {
  View5 x, y, dy, dx, scale, shift, dscale, dshift;
  const float* weight;
  const float* bias;
  float* mean;
  float* rstd;
  float* m1;
  float* m2;
  float* pa;
  float* pb;
  float* pc;
  float* sa;
  float* sb;
  int B, C, G, cpg, D0, D1, D2;
  int F0, F1, F2, first;
  int has_w, has_b, has_scale, has_shift, silu;
  int vec, cfast;
  float eps;
  float inv_n;  // 1 / (cpg * D0 * D1 * D2)
  Tiles rows;   // stats, apply and dx passes: tiles over (channels, D2), row chunks of D0*D1
  // Backward reduce, tiled in source space: a program owns source row (q0, q1) and a tile of source columns, and
  // walks every position that reads them (rows [t_lo, t_hi) x [h_lo, h_hi), columns sw*RF2 .. +RF2). Without
  // scale/shift the "source" is a virtual grid (Q0, Q1, Q2) = (D0, ceil(D1 / RF1), D2), RF = (1, RF1, 1).
  Tiles src;
  int Q0, Q1, Q2;
  int RF0, RF1, RF2, rfirst;
};

constexpr int kMaxThreads = 256;
constexpr int kFinalizeThreads = 256;

// Forward: partial statistics, their fixed-order reduction into mean/rstd, then y. T: float, __half, __nv_bfloat16.
template <typename T>
cudaError_t launch_forward(const Params& p, cudaStream_t stream);
// Backward: dscale/dshift and the partial sums (source-space pass), their reduction into sa, sb, m1, m2, then dx.
template <typename T>
cudaError_t launch_backward(const Params& p, cudaStream_t stream);

}  // namespace gn
}  // namespace mmk
