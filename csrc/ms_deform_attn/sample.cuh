// Device helpers shared by the ms_deform_attn kernels (msda_fwd.cu, msda_bwd.cu): the level table in shared memory,
// the bilinear footprint of one sample, channel-vector loads, group reductions and vector atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "ms_deform_attn/msda.h"
#include "ptx.cuh"  // to_float, from_float, Vec

namespace mmk {
namespace msda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// The level table as ints in shared memory: lv[3l] = H_l, lv[3l+1] = W_l, lv[3l+2] = start_l (every level is
// inside S < 2**31 rows; the host checks S). Every thread of the block must call this (it synchronizes).
__device__ __forceinline__ void load_levels(const Params& p, int* lv) {
  for (int l = threadIdx.x; l < p.L; l += blockDim.x) {
    lv[3 * l] = static_cast<int>(p.shapes[2 * l]);
    lv[3 * l + 1] = static_cast<int>(p.shapes[2 * l + 1]);
    lv[3 * l + 2] = static_cast<int>(p.starts[l]);
  }
  __syncthreads();
}

// The bilinear footprint of one sample at a level of Hl x Wl pixels: corner k = 2*dy + dx at pixel
// (y0 + dy, x0 + dx), its weight w[k], the derivatives of w[k] by x and y, and whether it is inside the map.
struct Footprint {
  int pix[4];  // y * Wl + x inside the level (only meaningful where ok)
  float w[4], dwx[4], dwy[4];
  bool ok[4];
};

// x = loc_x * Wl - 0.5 and y = loc_y * Hl - 0.5 rounded after the product and after the sum, as the torch code of
// plan.py and reference.py computes them (no fused multiply-add), so that floor() agrees with the plan's corners.
__device__ __forceinline__ float pixel_coord(float loc, int size) {
  return __fadd_rn(__fmul_rn(loc, static_cast<float>(size)), -0.5f);
}

// What a sample with no corner in the map adds, as the reference computes it (masked corner values of 0 times the
// bilinear fractions fx = x - floor(x), fy = y - floor(y)): zx = 0 * fx and zy = 0 * fy are exact zeros for a finite
// location, and NaN for a NaN or infinite one. The kernels add a * zx * zy to the output (NaN also for a NaN or
// infinite weight) and zx * zy, zy, zx as the sample's grad_attn and location-derivative terms, so that a non-finite
// input gives NaN where the reference does instead of a zero that hides it. Needs -fno-fast-math semantics (0 * x
// is not folded to 0), which setup.py's flags keep.
__device__ __forceinline__ void outside_terms(float loc_x, float loc_y, int Hl, int Wl, float& zx, float& zy) {
  const float x = pixel_coord(loc_x, Wl);
  const float y = pixel_coord(loc_y, Hl);
  zx = 0.f * (x - floorf(x));
  zy = 0.f * (y - floorf(y));
}

// False when no corner is inside the map (the sample contributes nothing and has zero gradients). The test is
// grid_sample's: a corner column x0 or x0 + 1 lies in [0, Wl) exactly when x is in [-1, Wl); NaN fails it. It also
// keeps the float -> int conversions below in range.
__device__ __forceinline__ bool footprint(float loc_x, float loc_y, int Hl, int Wl, Footprint& f) {
  const float x = pixel_coord(loc_x, Wl);
  const float y = pixel_coord(loc_y, Hl);
  if (!(x >= -1.f && y >= -1.f && x < static_cast<float>(Wl) && y < static_cast<float>(Hl))) return false;
  const float xf = floorf(x), yf = floorf(y);
  const int x0 = static_cast<int>(xf), y0 = static_cast<int>(yf);
  const float lx = x - xf, ly = y - yf;
  const float hx = 1.f - lx, hy = 1.f - ly;
  const bool xin[2] = {x0 >= 0, x0 + 1 < Wl};
  const bool yin[2] = {y0 >= 0, y0 + 1 < Hl};
  const float wx[2] = {hx, lx}, wy[2] = {hy, ly};
#pragma unroll
  for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
    for (int dx = 0; dx < 2; ++dx) {
      const int k = 2 * dy + dx;
      f.ok[k] = xin[dx] && yin[dy];
      f.pix[k] = (y0 + dy) * Wl + (x0 + dx);
      f.w[k] = wy[dy] * wx[dx];
      f.dwx[k] = dx ? wy[dy] : -wy[dy];  // d/dx of wy * wx: wx = 1 - lx or lx
      f.dwy[k] = dy ? wx[dx] : -wx[dx];
    }
  }
  return true;
}

// VEC consecutive elements from a VEC-aligned offset (VEC > 1 only with 16-byte aligned bases: msda.h).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[VEC]) {
  const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(v.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = v;
}

// Sum over the G lanes of each aligned group of a warp, by a fixed xor butterfly: every lane ends with the same
// bits (a + b == b + a in IEEE), and the order never depends on timing. All 32 lanes of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// dst[e] += v[e] (fp32 atomics without return, i.e. RED). On sm_90 four channels go in one 16-byte vector atomic
// (dst is then 16-byte aligned: VEC % 4 == 0 channels at a VEC-aligned offset of a 16-byte aligned buffer).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;  // atomicAdd(float4*, float4): compute capability 9.x and later
#else
constexpr bool kVectorAtomics = false;
#endif

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&v)[VEC]) {
  if constexpr (kVectorAtomics && VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) {
      atomicAdd(reinterpret_cast<float4*>(dst) + j,
                make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]));
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(dst + e, v[e]);
  }
}

}  // namespace detail

// The grid for `items` work items of G lanes each in every batch: gridDim.y walks the batch (the kernels loop when
// B > 65535) and gridDim.x the items of one batch, both capped (the kernels loop) so the whole grid stays a modest
// number of waves. Splitting the batch off keeps every index inside a batch below 2**30 (the host checks it), so the
// kernels loop and divide in 32 bits (64-bit division is a called subroutine, with a stack frame and spills around
// the call): an index below 2**30 plus the grid's stride in lanes, below 2**30 as well, cannot overflow an int.
inline dim3 grid_for(int64_t items, int G, int64_t B, int sm_count) {
  const int64_t per_block = kThreads / G;
  const int64_t blocks = (items + per_block - 1) / per_block;
  // At most 64 blocks per SM, and at most 2**30 lanes in gridDim.x.
  const int64_t cap = std::min<int64_t>(static_cast<int64_t>(std::max(sm_count, 1)) * 64, (int64_t{1} << 30) / kThreads);
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({B, 65535, cap}));
  const int64_t gx = std::max<int64_t>(1, std::min(blocks, std::max<int64_t>(1, cap / gy)));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

inline size_t level_smem(const Params& p) { return sizeof(int) * 3 * static_cast<size_t>(p.L); }

// Launches `kernel` (every kernel takes the Params by value, kThreads threads and the level table in dynamic
// shared memory) over `items` work items per batch element.
inline cudaError_t launch_on(void (*kernel)(Params), int64_t items, const Params& p, cudaStream_t stream) {
  kernel<<<grid_for(items, p.G, p.B, p.sm_count), kThreads, level_smem(p), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace msda
}  // namespace mmk
