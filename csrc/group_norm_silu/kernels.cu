// GroupNorm (+ SpatialNorm scale/shift) + SiLU kernels: exactly the math and rounding points of
// mmkernels/ops/group_norm_silu/reference.py (and of the Triton kernels in triton.py), fp32/fp16/bf16 storage, fp32
// arithmetic. Parameters, layouts and the thread tiling: gn.h. Every reduction is split into per-program partials
// that a second kernel combines in a fixed order: deterministic, no atomics.
//
// Forward, two passes over x:
//   1. stats: each thread runs Welford over its rows for its vec channels at one column (equal counts for every
//      valid thread of a block), the block combines its columns per channel (mean of means + Chan's M2 term) into
//      one partial (mean, M2, count) per (b, c, program); stats_finalize: one block per (b, group) merges the
//      group's partials with Chan's formula, thread-strided then a fixed tree, into mean and rstd.
//   2. apply: y = SiLU(rnd(rnd(rnd(xhat * w + bias) * scale) + shift)) with scale/shift read through the nearest map.
// Backward, two passes over x and dy:
//   1. reduce, tiled in source space: a thread owns the vec channels of one source column of one source row and
//      walks exactly the positions that read them, so dscale/dshift are complete sums written once; it also sums dg
//      and dg * xhat, which the block combines per channel into partials per (b, c, program); bwd_finalize: one
//      block per (b, group) sums them (fixed tree) into sa, sb [B, C] and the group means m1, m2.
//   2. dx = rstd * (dg * w - m1 - xhat * m2), dg recomputed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "group_norm_silu/gn.h"
#include "ptx.cuh"  // to_float, from_float, round_to, Vec

namespace mmk {
namespace gn {
namespace detail {

static_assert(kMaxThreads == 256 && kFinalizeThreads == 256, "shared-memory sizes below");
constexpr int kMaxVec = 8;  // 16 bytes of bf16/fp16

// VEC consecutive elements (VEC > 1 only for unit channel strides, 16-byte aligned: gn.h).
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(v.v[e]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// The elements of this thread in its block's tile: channels c0 .. c0+VEC-1 at column col (of D2, or of Q2 in the
// source-space pass). cl, ci: local channel and column in the tile. ok: inside the tensor (C % VEC == 0).
struct Slot {
  int c0, col, cl, ci;
  bool ok;
};

template <int VEC>
__device__ __forceinline__ Slot slot(const Params& p, const Tiles& tl, int n_cols) {
  const int cv = p.cfast ? threadIdx.x : threadIdx.y;
  const int wi = p.cfast ? threadIdx.y : threadIdx.x;
  Slot s;
  s.cl = cv * VEC;
  s.ci = wi;
  s.c0 = blockIdx.y * tl.tc + s.cl;
  s.col = (blockIdx.x % tl.n_wt) * tl.tw + wi;
  s.ok = s.c0 < p.C && s.col < n_cols;
  return s;
}

__device__ __forceinline__ int flat_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Per-channel parameters of batch b: the group's mean and rstd, the affine weight and bias (1 and 0 when absent:
// xhat * 1 + 0 == xhat exactly).
template <int VEC>
__device__ __forceinline__ void channel_params(const Params& p, int b, int c0, float (&mean)[VEC],
                                               float (&rstd)[VEC], float (&w)[VEC], float (&bias)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int c = c0 + e;
    const int grp = b * p.G + c / p.cpg;
    mean[e] = p.mean[grp];
    rstd[e] = p.rstd[grp];
    w[e] = p.has_w ? p.weight[c] : 1.f;
    bias[e] = p.has_b ? p.bias[c] : 0.f;
  }
}

// Walks rows r = t * D1 + h in order, keeping the source row (st, sh) of the nearest map without a division per row.
struct RowIter {
  int t, h, st, sh, hr;  // hr = h - sh * F1
  __device__ __forceinline__ void init(const Params& p, int r) {
    t = r / p.D1;
    h = r - t * p.D1;
    sh = h / p.F1;
    hr = h - sh * p.F1;
    set_st(p);
  }
  __device__ __forceinline__ void set_st(const Params& p) {
    st = p.first ? (t > 0 ? 1 + (t - 1) / p.F0 : 0) : t / p.F0;
  }
  __device__ __forceinline__ void next(const Params& p) {
    if (++h == p.D1) {
      h = sh = hr = 0;
      ++t;
      set_st(p);
    } else if (++hr == p.F1) {
      hr = 0;
      ++sh;
    }
  }
};

// Modulation values of the vec channels at source (st, sh) of a pointer already at (b, c0, column); scalar loads,
// since scale/shift have their own strides (stride 0 included).
template <typename T, int VEC>
__device__ __forceinline__ void load_mod(const T* base, const View5& v, int st, int sh, float (&out)[VEC]) {
  const T* q = base + st * v.s0 + sh * v.s1;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(q[e * v.sc]);
}

// xhat, g and a of reference.py for one element, with the same rounding points.
template <typename T>
__device__ __forceinline__ void values(const Params& p, float x, float mean, float rstd, float w, float bias, float sc,
                                       float sh, float& xhat, float& g, float& a) {
  xhat = (x - mean) * rstd;
  g = round_to<T>(xhat * w + bias);
  a = g;
  if (p.has_scale) a = round_to<T>(a * sc);
  if (p.has_shift) a = round_to<T>(a + sh);
}

__device__ __forceinline__ float silu_grad(float a, float dy) {
  const float s = 1.f / (1.f + expf(-a));
  return dy * (s * (1.f + a * (1.f - s)));
}

// Chan's merge of (nb, mb, m2b) into (n, mean, m2).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.f) return;
  const float nn = n + nb;
  const float f = nb / nn;
  const float d = mb - mean;
  mean += d * f;
  m2 += m2b + d * d * n * f;
  n = nn;
}

// Sum over the block in a fixed tree order (blockDim.x == kFinalizeThreads, a power of two).
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();  // red is reused by the next call
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gn_stats_kernel(const Params p) {
  __shared__ float s_mean[kMaxThreads * kMaxVec];  // [column in tile][channel in tile]: tc * tw <= 256 * VEC
  __shared__ float s_m2[kMaxThreads * kMaxVec];
  const Tiles& tl = p.rows;
  const Slot s = slot<VEC>(p, tl, p.D2);
  const int b = blockIdx.z;
  const int n_rows = p.D0 * p.D1;
  const int r_lo = (blockIdx.x / tl.n_wt) * tl.rpp;
  const int r_hi = min(r_lo + tl.rpp, n_rows);  // < 2**31: the host keeps D0*D1 < 2**30
  float mean[VEC], m2[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) mean[e] = m2[e] = 0.f;
  if (s.ok) {
    const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + s.c0 * p.x.sc + s.col * p.x.s2;
    int t = r_lo / p.D1, h = r_lo - t * p.D1;
    for (int r = r_lo; r < r_hi; ++r) {
      float v[VEC];
      load<T, VEC>(x + t * p.x.s0 + h * p.x.s1, v);
      const float inv = 1.f / static_cast<float>(r - r_lo + 1);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = v[e] - mean[e];
        mean[e] += d * inv;
        m2[e] += d * (v[e] - mean[e]);
      }
      if (++h == p.D1) {
        h = 0;
        ++t;
      }
    }
  }
  const int idx = s.ci * tl.tc + s.cl;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_mean[idx + e] = mean[e];
    s_m2[idx + e] = m2[e];
  }
  __syncthreads();
  // Every valid column of the tile saw the same k rows: the channel's mean is the mean of the column means and its
  // M2 is sum(M2_i) + k * sum((mean_i - mean)^2).
  const int nv = min(tl.tw, p.D2 - static_cast<int>(blockIdx.x % tl.n_wt) * tl.tw);
  const float k = static_cast<float>(r_hi - r_lo);
  for (int cl = flat_tid(); cl < tl.tc; cl += blockDim.x * blockDim.y) {
    const int c = blockIdx.y * tl.tc + cl;
    if (c >= p.C) continue;
    float sum = 0.f;
    for (int i = 0; i < nv; ++i) sum += s_mean[i * tl.tc + cl];
    const float cm = sum / static_cast<float>(nv);
    float m2s = 0.f, dev = 0.f;
    for (int i = 0; i < nv; ++i) {
      const float d = s_mean[i * tl.tc + cl] - cm;
      m2s += s_m2[i * tl.tc + cl];
      dev += d * d;
    }
    const int64_t out = (static_cast<int64_t>(b) * p.C + c) * tl.np + blockIdx.x;
    p.pa[out] = cm;
    p.pb[out] = m2s + k * dev;
    p.pc[out] = k * static_cast<float>(nv);
  }
}

__global__ void __launch_bounds__(kFinalizeThreads) gn_stats_finalize_kernel(const Params p) {
  __shared__ float s_n[kFinalizeThreads], s_mean[kFinalizeThreads], s_m2[kFinalizeThreads];
  const int bg = blockIdx.x;
  const int b = bg / p.G, g = bg - b * p.G;
  const int tid = threadIdx.x;
  const int64_t np = p.rows.np;
  const int64_t start = (static_cast<int64_t>(b) * p.C + static_cast<int64_t>(g) * p.cpg) * np;  // [cpg, np]
  const int64_t total = p.cpg * np;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t i = tid; i < total; i += kFinalizeThreads) chan_merge(n, mean, m2, p.pc[start + i],
                                                                     p.pa[start + i], p.pb[start + i]);
  s_n[tid] = n;
  s_mean[tid] = mean;
  s_m2[tid] = m2;
  __syncthreads();
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      chan_merge(n, mean, m2, s_n[tid + s], s_mean[tid + s], s_m2[tid + s]);
      s_n[tid] = n;
      s_mean[tid] = mean;
      s_m2[tid] = m2;
    }
    __syncthreads();
  }
  if (tid == 0) {
    const float var = fmaxf(m2 / n, 0.f);
    p.mean[bg] = mean;
    p.rstd[bg] = 1.f / sqrtf(var + p.eps);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gn_apply_kernel(const Params p) {
  const Tiles& tl = p.rows;
  const Slot s = slot<VEC>(p, tl, p.D2);
  if (!s.ok) return;
  const int b = blockIdx.z;
  const int r_lo = (blockIdx.x / tl.n_wt) * tl.rpp;
  const int r_hi = min(r_lo + tl.rpp, p.D0 * p.D1);
  float mean[VEC], rstd[VEC], w[VEC], bias[VEC];
  channel_params<VEC>(p, b, s.c0, mean, rstd, w, bias);
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + s.c0 * p.x.sc + s.col * p.x.s2;
  T* y = static_cast<T*>(p.y.ptr) + b * p.y.sb + s.c0 * p.y.sc + s.col * p.y.s2;
  const int sw = s.col / p.F2;
  const T* scale = p.has_scale ? static_cast<const T*>(p.scale.ptr) + b * p.scale.sb + s.c0 * p.scale.sc +
                                     sw * p.scale.s2 : nullptr;
  const T* shift = p.has_shift ? static_cast<const T*>(p.shift.ptr) + b * p.shift.sb + s.c0 * p.shift.sc +
                                     sw * p.shift.s2 : nullptr;
  RowIter it;
  it.init(p, r_lo);
  for (int r = r_lo; r < r_hi; ++r) {
    float v[VEC], sc[VEC] = {}, sh[VEC] = {}, out[VEC];
    load<T, VEC>(x + it.t * p.x.s0 + it.h * p.x.s1, v);
    if (p.has_scale) load_mod<T, VEC>(scale, p.scale, it.st, it.sh, sc);
    if (p.has_shift) load_mod<T, VEC>(shift, p.shift, it.st, it.sh, sh);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float xhat, g, a;
      values<T>(p, v[e], mean[e], rstd[e], w[e], bias[e], sc[e], sh[e], xhat, g, a);
      out[e] = p.silu ? a / (1.f + expf(-a)) : a;
    }
    store<T, VEC>(y + it.t * p.y.s0 + it.h * p.y.s1, out);
    it.next(p);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gn_bwd_reduce_kernel(const Params p) {
  __shared__ float s_a[kMaxThreads * kMaxVec];  // [source column in tile][channel in tile]
  __shared__ float s_b[kMaxThreads * kMaxVec];
  const Tiles& tl = p.src;
  const Slot s = slot<VEC>(p, tl, p.Q2);
  const int b = blockIdx.z;
  const int q01 = blockIdx.x / tl.n_wt;
  const int q0 = q01 / p.Q1, q1 = q01 - q0 * p.Q1;
  // The positions that read source (q0, q1, sw): the inverse of the nearest map (RowIter, apply).
  // The host checks that the map covers x exactly (Q * F == D per dim, 1 + (Q0-1) * F0 == D0 with the first-frame
  // rule) and that D0*D1, D2 < 2**30, so these sums stay far from 2**31.
  int t_lo, t_hi;
  if (p.rfirst) {  // frame 0 alone, then runs of RF0 frames
    t_lo = q0 > 0 ? 1 + (q0 - 1) * p.RF0 : 0;
    t_hi = q0 > 0 ? t_lo + p.RF0 : 1;
  } else {
    t_lo = q0 * p.RF0;
    t_hi = t_lo + p.RF0;
  }
  t_hi = min(t_hi, p.D0);
  const int h_lo = q1 * p.RF1, h_hi = min(h_lo + p.RF1, p.D1);  // short only in the virtual grid's last row chunk
  const int w_lo = s.col * p.RF2, w_hi = min(w_lo + p.RF2, p.D2);

  float acc_a[VEC], acc_b[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc_a[e] = acc_b[e] = 0.f;
  if (s.ok) {
    float mean[VEC], rstd[VEC], w[VEC], bias[VEC], sc[VEC] = {}, sh[VEC] = {}, acc_sc[VEC], acc_sh[VEC];
    channel_params<VEC>(p, b, s.c0, mean, rstd, w, bias);
    const T* scale = nullptr;
    const T* shift = nullptr;
    if (p.has_scale) {  // one source element per channel for the whole walk
      scale = static_cast<const T*>(p.scale.ptr) + b * p.scale.sb + s.c0 * p.scale.sc + s.col * p.scale.s2;
      load_mod<T, VEC>(scale, p.scale, q0, q1, sc);
    }
    if (p.has_shift) {
      shift = static_cast<const T*>(p.shift.ptr) + b * p.shift.sb + s.c0 * p.shift.sc + s.col * p.shift.s2;
      load_mod<T, VEC>(shift, p.shift, q0, q1, sh);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_sc[e] = acc_sh[e] = 0.f;
    const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + s.c0 * p.x.sc;
    const T* dy = static_cast<const T*>(p.dy.ptr) + b * p.dy.sb + s.c0 * p.dy.sc;
    for (int t = t_lo; t < t_hi; ++t) {
      for (int h = h_lo; h < h_hi; ++h) {
        for (int wc = w_lo; wc < w_hi; ++wc) {
          float xv[VEC], dv[VEC];
          load<T, VEC>(x + t * p.x.s0 + h * p.x.s1 + wc * p.x.s2, xv);
          load<T, VEC>(dy + t * p.dy.s0 + h * p.dy.s1 + wc * p.dy.s2, dv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            float xhat, g, a;
            values<T>(p, xv[e], mean[e], rstd[e], w[e], bias[e], sc[e], sh[e], xhat, g, a);
            const float da = p.silu ? silu_grad(a, dv[e]) : dv[e];
            acc_sh[e] += da;
            acc_sc[e] += da * g;
            const float dg = p.has_scale ? da * sc[e] : da;
            acc_a[e] += dg;
            acc_b[e] += dg * xhat;
          }
        }
      }
    }
    // This thread is the only one that reads (and so sums for) these source elements.
    if (p.has_scale) {
      T* ds = static_cast<T*>(p.dscale.ptr) + b * p.dscale.sb + q0 * p.dscale.s0 + q1 * p.dscale.s1 +
              s.col * p.dscale.s2 + s.c0 * p.dscale.sc;
#pragma unroll
      for (int e = 0; e < VEC; ++e) ds[e * p.dscale.sc] = from_float<T>(acc_sc[e]);
    }
    if (p.has_shift) {
      T* dh = static_cast<T*>(p.dshift.ptr) + b * p.dshift.sb + q0 * p.dshift.s0 + q1 * p.dshift.s1 +
              s.col * p.dshift.s2 + s.c0 * p.dshift.sc;
#pragma unroll
      for (int e = 0; e < VEC; ++e) dh[e * p.dshift.sc] = from_float<T>(acc_sh[e]);
    }
  }
  const int idx = s.ci * tl.tc + s.cl;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_a[idx + e] = acc_a[e];
    s_b[idx + e] = acc_b[e];
  }
  __syncthreads();
  const int nv = min(tl.tw, p.Q2 - static_cast<int>(blockIdx.x % tl.n_wt) * tl.tw);
  for (int cl = flat_tid(); cl < tl.tc; cl += blockDim.x * blockDim.y) {
    const int c = blockIdx.y * tl.tc + cl;
    if (c >= p.C) continue;
    float a = 0.f, bb = 0.f;
    for (int i = 0; i < nv; ++i) {
      a += s_a[i * tl.tc + cl];
      bb += s_b[i * tl.tc + cl];
    }
    const int64_t out = (static_cast<int64_t>(b) * p.C + c) * tl.np + blockIdx.x;
    p.pa[out] = a;
    p.pb[out] = bb;
  }
}

__global__ void __launch_bounds__(kFinalizeThreads) gn_bwd_finalize_kernel(const Params p) {
  __shared__ float red[kFinalizeThreads];
  const int bg = blockIdx.x;
  const int b = bg / p.G, g = bg - b * p.G;
  const int tid = threadIdx.x;
  const int64_t np = p.src.np;
  float acc1 = 0.f, acc2 = 0.f;  // meaningful in thread 0
  for (int ci = 0; ci < p.cpg; ++ci) {
    const int c = g * p.cpg + ci;
    const int64_t base = (static_cast<int64_t>(b) * p.C + c) * np;
    float a = 0.f, bb = 0.f;
    for (int64_t i = tid; i < np; i += kFinalizeThreads) {
      a += p.pa[base + i];
      bb += p.pb[base + i];
    }
    a = block_sum(a, red);
    bb = block_sum(bb, red);
    if (tid == 0) {
      p.sa[static_cast<int64_t>(b) * p.C + c] = a;
      p.sb[static_cast<int64_t>(b) * p.C + c] = bb;
      const float wc = p.has_w ? p.weight[c] : 1.f;
      acc1 += a * wc;
      acc2 += bb * wc;
    }
  }
  if (tid == 0) {
    p.m1[bg] = acc1 * p.inv_n;
    p.m2[bg] = acc2 * p.inv_n;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gn_bwd_dx_kernel(const Params p) {
  const Tiles& tl = p.rows;
  const Slot s = slot<VEC>(p, tl, p.D2);
  if (!s.ok) return;
  const int b = blockIdx.z;
  const int r_lo = (blockIdx.x / tl.n_wt) * tl.rpp;
  const int r_hi = min(r_lo + tl.rpp, p.D0 * p.D1);
  float mean[VEC], rstd[VEC], w[VEC], bias[VEC], m1[VEC], m2[VEC];
  channel_params<VEC>(p, b, s.c0, mean, rstd, w, bias);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int grp = b * p.G + (s.c0 + e) / p.cpg;
    m1[e] = p.m1[grp];
    m2[e] = p.m2[grp];
  }
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + s.c0 * p.x.sc + s.col * p.x.s2;
  const T* dy = static_cast<const T*>(p.dy.ptr) + b * p.dy.sb + s.c0 * p.dy.sc + s.col * p.dy.s2;
  T* dx = static_cast<T*>(p.dx.ptr) + b * p.dx.sb + s.c0 * p.dx.sc + s.col * p.dx.s2;
  const int sw = s.col / p.F2;
  const T* scale = p.has_scale ? static_cast<const T*>(p.scale.ptr) + b * p.scale.sb + s.c0 * p.scale.sc +
                                     sw * p.scale.s2 : nullptr;
  const T* shift = p.has_shift ? static_cast<const T*>(p.shift.ptr) + b * p.shift.sb + s.c0 * p.shift.sc +
                                     sw * p.shift.s2 : nullptr;
  RowIter it;
  it.init(p, r_lo);
  for (int r = r_lo; r < r_hi; ++r) {
    float xv[VEC], dv[VEC], sc[VEC] = {}, sh[VEC] = {}, out[VEC];
    load<T, VEC>(x + it.t * p.x.s0 + it.h * p.x.s1, xv);
    load<T, VEC>(dy + it.t * p.dy.s0 + it.h * p.dy.s1, dv);
    if (p.has_scale) load_mod<T, VEC>(scale, p.scale, it.st, it.sh, sc);
    if (p.has_shift) load_mod<T, VEC>(shift, p.shift, it.st, it.sh, sh);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float xhat, g, a;
      values<T>(p, xv[e], mean[e], rstd[e], w[e], bias[e], sc[e], sh[e], xhat, g, a);
      float dg = p.silu ? silu_grad(a, dv[e]) : dv[e];
      if (p.has_scale) dg *= sc[e];
      out[e] = rstd[e] * (dg * w[e] - m1[e] - xhat * m2[e]);
    }
    store<T, VEC>(dx + it.t * p.dx.s0 + it.h * p.dx.s1, out);
    it.next(p);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.

dim3 rows_grid(const Params& p) { return dim3(p.rows.n_wt * p.rows.n_rc, p.rows.n_ct, p.B); }

template <typename T, int VEC>
cudaError_t forward_vec(const Params& p, cudaStream_t stream) {
  const dim3 block(p.rows.bx, p.rows.by);
  gn_stats_kernel<T, VEC><<<rows_grid(p), block, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_stats_finalize_kernel<<<p.B * p.G, kFinalizeThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_apply_kernel<T, VEC><<<rows_grid(p), block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t backward_vec(const Params& p, cudaStream_t stream) {
  gn_bwd_reduce_kernel<T, VEC><<<dim3(static_cast<unsigned>(p.src.np), p.src.n_ct, p.B), dim3(p.src.bx, p.src.by),
                                 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_bwd_finalize_kernel<<<p.B * p.G, kFinalizeThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_bwd_dx_kernel<T, VEC><<<rows_grid(p), dim3(p.rows.bx, p.rows.by), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

template <typename T>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return p.vec > 1 ? detail::forward_vec<T, kVec>(p, stream) : detail::forward_vec<T, 1>(p, stream);
}

template <typename T>
cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return p.vec > 1 ? detail::backward_vec<T, kVec>(p, stream) : detail::backward_vec<T, 1>(p, stream);
}

template cudaError_t launch_forward<float>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__half>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16>(const Params&, cudaStream_t);
template cudaError_t launch_backward<float>(const Params&, cudaStream_t);
template cudaError_t launch_backward<__half>(const Params&, cudaStream_t);
template cudaError_t launch_backward<__nv_bfloat16>(const Params&, cudaStream_t);

}  // namespace gn
}  // namespace mmk
