// Mask pooling kernels (semantics: mmkernels/ops/mask_pool/reference.py; parameters and layouts: mask_pool.h).
//
// Plain fp32 FMA tiles, correctness first: every block computes the resized weights of its [masks x pixels] tile
// from the logits (4 taps through the tap tables) into shared memory, stages the other operand there as fp32, and
// accumulates in registers. Nothing of size [B, Q, Hf, Wf] is written. No atomics: every output element is
// written once by one block, and every sum runs in a fixed order (deterministic).
//
// * forward: block (c tile, q tile, b): out = (w @ x) / (sum w + eps) over all pixels, denom written by the first
//   c tile;
// * dx: block (c tile, p tile, b): dx = (w / denom)^T @ dout over all masks;
// * mask backward (soft mode): block (source tile of kDmI x kDmJ mask pixels, q tile, b): for the feature pixels
//   whose taps touch the tile (rlo/rhi x clo/chi), dr = ((dout @ x) / denom - u) * s * (1 - s), then
//   dm[q, s] = sum_p dr[q, p] * A[p, s] with A the product of the row and column tap weights (a gather form of the
//   adjoint of the resize).
// Index arithmetic in int64 wherever a tensor offset is formed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mask_pool/mask_pool.h"
#include "ptx.cuh"

namespace mmk {
namespace mp {
namespace {

// The resized logit of the mask at mq at feature pixel (ph, pw), as PyTorch's upsample_bilinear2d computes it.
// Tap indices are clamped into the mask: the tables come from Python unchecked (mask_pool.cu).
__device__ __forceinline__ int64_t clamp_idx(int i, int n) { return static_cast<int64_t>(min(max(i, 0), n - 1)); }

// One source row (element offset r) of the mask at mq, interpolated along the columns (c0, c1, column weight lw).
template <typename MT>
__device__ __forceinline__ float row_value(const MT* mq, int64_t r, int64_t c0, int64_t c1, float lw, bool same_w) {
  const float a = to_float(mq[r + c0]);
  if (same_w) return a;
  const float b = to_float(mq[r + c1]);
  return (1.f - lw) * a + lw * b;
}

template <typename MT>
__device__ __forceinline__ float resized(const MT* mq, int ph, int pw, const Params& p) {
  int64_t c0 = static_cast<int64_t>(pw) * p.smw, c1 = c0;
  float lw = 0.f;
  if (!p.same_w) {
    c0 = clamp_idx(p.w0[pw], p.Wm) * p.smw;
    c1 = clamp_idx(p.w1[pw], p.Wm) * p.smw;
    lw = p.lw[pw];
  }
  const bool sw = p.same_w;
  if (p.same_h) return row_value(mq, static_cast<int64_t>(ph) * p.smh, c0, c1, lw, sw);
  const float lh = p.lh[ph];
  return (1.f - lh) * row_value(mq, clamp_idx(p.h0[ph], p.Hm) * p.smh, c0, c1, lw, sw) +
         lh * row_value(mq, clamp_idx(p.h1[ph], p.Hm) * p.smh, c0, c1, lw, sw);
}

// The weight of a resized logit r per mode (reference.py): official rounds r and its sigmoid to the masks' dtype.
template <typename MT>
__device__ __forceinline__ float weight(float r, int mode, float thr) {
  if (mode == 0) {
    const float rr = round_to<MT>(r);
    const float s = round_to<MT>(1.f / (1.f + expf(-rr)));
    return s >= thr ? 1.f : 0.f;
  }
  if (mode == 1) return r > thr ? 1.f : 0.f;
  return 1.f / (1.f + expf(thr - r));
}

template <typename XT>
__device__ __forceinline__ float load_x(const XT* x, int c, int pix, const Params& p) {
  const int ph = pix / p.Wf, pw = pix - ph * p.Wf;
  return to_float(x[static_cast<int64_t>(c) * p.sxc + static_cast<int64_t>(ph) * p.sxh +
                    static_cast<int64_t>(pw) * p.sxw]);
}

template <typename XT, typename MT>
__global__ void __launch_bounds__(kThreads) mp_fwd_kernel(const Params p) {
  __shared__ float ws[kFwdP][kFwdQ + 1];  // weights, [pixel][mask]; +1: conflict-free column writes
  __shared__ float xs[kFwdP][kFwdC + 1];  // features as fp32, [pixel][channel]
  __shared__ float dens[kFwdQ];
  const int tid = threadIdx.x;
  const int n_ct = (p.C + kFwdC - 1) / kFwdC;
  const int c_base = static_cast<int>(blockIdx.x % n_ct) * kFwdC;
  const int q_base = static_cast<int>(blockIdx.x / n_ct) * kFwdQ;
  const int b = blockIdx.y;
  const int P = p.Hf * p.Wf;
  const XT* x = static_cast<const XT*>(p.x) + static_cast<int64_t>(b) * p.sxb;
  const MT* m = static_cast<const MT*>(p.m) + static_cast<int64_t>(b) * p.smb;
  const int tq = tid / 16, tc = tid % 16;  // this thread's outputs: masks 2*tq + {0, 1}, channels tc + 16*{0..3}
  float acc[2][4] = {};
  float den = 0.f;  // threads tid < kFwdQ: the weight sum of mask q_base + tid
  for (int p0 = 0; p0 < P; p0 += kFwdP) {
    for (int e = tid; e < kFwdQ * kFwdP; e += kThreads) {
      const int qi = e / kFwdP, pi = e % kFwdP;
      const int q = q_base + qi, pix = p0 + pi;
      float w = 0.f;
      if (q < p.Q && pix < P) {
        const int ph = pix / p.Wf, pw = pix - ph * p.Wf;
        w = weight<MT>(resized(m + static_cast<int64_t>(q) * p.smq, ph, pw, p), p.mode, p.thr);
      }
      ws[pi][qi] = w;
    }
    for (int e = tid; e < kFwdP * kFwdC; e += kThreads) {
      // Adjacent threads along x's unit-stride axis.
      const int pi = p.x_cfast ? e / kFwdC : e % kFwdP;
      const int ci = p.x_cfast ? e % kFwdC : e / kFwdP;
      const int pix = p0 + pi, c = c_base + ci;
      xs[pi][ci] = (pix < P && c < p.C) ? load_x(x, c, pix, p) : 0.f;
    }
    __syncthreads();
    if (tid < kFwdQ) {
#pragma unroll 8
      for (int pi = 0; pi < kFwdP; ++pi) den += ws[pi][tid];
    }
#pragma unroll 4
    for (int pi = 0; pi < kFwdP; ++pi) {
      const float w0 = ws[pi][2 * tq], w1 = ws[pi][2 * tq + 1];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float xv = xs[pi][tc + 16 * j];
        acc[0][j] += w0 * xv;
        acc[1][j] += w1 * xv;
      }
    }
    __syncthreads();
  }
  if (tid < kFwdQ) dens[tid] = den + p.eps;
  __syncthreads();
  XT* out = static_cast<XT*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = q_base + 2 * tq + i;
    if (q >= p.Q) continue;
    const float d = dens[2 * tq + i];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c_base + tc + 16 * j;
      if (c < p.C) out[(static_cast<int64_t>(b) * p.Q + q) * p.C + c] = from_float<XT>(acc[i][j] / d);
    }
  }
  if (c_base == 0 && tid < kFwdQ && q_base + tid < p.Q) {
    p.denom[static_cast<int64_t>(b) * p.Q + q_base + tid] = dens[tid];
  }
}

template <typename XT, typename MT>
__global__ void __launch_bounds__(kThreads) mp_dx_kernel(const Params p) {
  __shared__ float ws[kDxQ][kDxP + 1];  // w / denom, [mask][pixel]
  __shared__ float gs[kDxQ][kDxC + 1];  // dout as fp32, [mask][channel]
  const int tid = threadIdx.x;
  const int n_ct = (p.C + kDxC - 1) / kDxC;
  const int c_base = static_cast<int>(blockIdx.x % n_ct) * kDxC;
  const int p_base = static_cast<int>(blockIdx.x / n_ct) * kDxP;
  const int b = blockIdx.y;
  const int P = p.Hf * p.Wf;
  const MT* m = static_cast<const MT*>(p.m) + static_cast<int64_t>(b) * p.smb;
  const XT* dout = static_cast<const XT*>(p.dout) + static_cast<int64_t>(b) * p.sgb;
  const float* denom = p.denom + static_cast<int64_t>(b) * p.Q;
  const int tp = tid / 16, tc = tid % 16;  // outputs: pixels 2*tp + {0, 1}, channels tc + 16*{0..3}
  float acc[2][4] = {};
  for (int q0 = 0; q0 < p.Q; q0 += kDxQ) {
    for (int e = tid; e < kDxQ * kDxP; e += kThreads) {
      const int qi = e / kDxP, pi = e % kDxP;
      const int q = q0 + qi, pix = p_base + pi;
      float w = 0.f;
      if (q < p.Q && pix < P) {
        const int ph = pix / p.Wf, pw = pix - ph * p.Wf;
        w = weight<MT>(resized(m + static_cast<int64_t>(q) * p.smq, ph, pw, p), p.mode, p.thr) / denom[q];
      }
      ws[qi][pi] = w;
    }
    for (int e = tid; e < kDxQ * kDxC; e += kThreads) {
      const int qi = e / kDxC, ci = e % kDxC;
      const int q = q0 + qi, c = c_base + ci;
      gs[qi][ci] = (q < p.Q && c < p.C)
                       ? to_float(dout[static_cast<int64_t>(q) * p.sgq + static_cast<int64_t>(c) * p.sgc])
                       : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int qi = 0; qi < kDxQ; ++qi) {
      const float w0 = ws[qi][2 * tp], w1 = ws[qi][2 * tp + 1];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float g = gs[qi][tc + 16 * j];
        acc[0][j] += w0 * g;
        acc[1][j] += w1 * g;
      }
    }
    __syncthreads();
  }
  XT* dx = static_cast<XT*>(p.dx) + static_cast<int64_t>(b) * p.sdb;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int pix = p_base + 2 * tp + i;
    if (pix >= P) continue;
    const int ph = pix / p.Wf, pw = pix - ph * p.Wf;
    const int64_t off = static_cast<int64_t>(ph) * p.sdh + static_cast<int64_t>(pw) * p.sdw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c_base + tc + 16 * j;
      if (c < p.C) dx[off + static_cast<int64_t>(c) * p.sdc] = from_float<XT>(acc[i][j]);
    }
  }
}

template <typename XT, typename MT>
__global__ void __launch_bounds__(kThreads) mp_dmask_kernel(const Params p) {
  constexpr int kS = kDmI * kDmJ;
  static_assert(kDmQ * 16 == kThreads && kDmP == 32 && kS == 64, "thread roles below assume these tiles");
  __shared__ float gs[kDmQ][kDmC + 1];   // dout, [mask][channel]
  __shared__ float xs[kDmC][kDmP + 1];   // x, [channel][pixel]
  __shared__ float drs[kDmQ][kDmP + 1];  // dr, [mask][pixel]
  __shared__ int sph[kDmP], spw[kDmP], sh0[kDmP], sh1[kDmP], sw0[kDmP], sw1[kDmP], sok[kDmP];
  __shared__ float slh[kDmP], slw[kDmP];
  const int tid = threadIdx.x;
  const int ib = static_cast<int>(blockIdx.x) / p.n_jb, jb = static_cast<int>(blockIdx.x) % p.n_jb;
  const int q_base = blockIdx.y * kDmQ;
  const int b = blockIdx.z;
  const int tq = tid / 16, tl = tid % 16;  // mask q_base + tq; pixels tl + 16*{0,1}; source pixels tl + 16*{0..3}
  const int q = q_base + tq;
  const bool q_ok = q < p.Q;
  const MT* mq = static_cast<const MT*>(p.m) + static_cast<int64_t>(b) * p.smb + static_cast<int64_t>(q_ok ? q : 0) * p.smq;
  const XT* x = static_cast<const XT*>(p.x) + static_cast<int64_t>(b) * p.sxb;
  const XT* dout = static_cast<const XT*>(p.dout) + static_cast<int64_t>(b) * p.sgb;
  const int64_t qrow = static_cast<int64_t>(b) * p.Q + q;
  const float dq = q_ok ? p.denom[qrow] : 1.f;
  const float uq = q_ok ? p.u[qrow] : 0.f;
  // The feature rows and columns touching this tile, clamped into the feature grid (unchecked tables).
  const int h_lo = min(max(p.rlo[ib], 0), p.Hf), h_hi = min(max(p.rhi[ib], 0), p.Hf);
  const int w_lo = min(max(p.clo[jb], 0), p.Wf), w_hi = min(max(p.chi[jb], 0), p.Wf);
  const int nw = w_hi - w_lo > 0 ? w_hi - w_lo : 1;
  const int n = (h_hi > h_lo && w_hi > w_lo) ? (h_hi - h_lo) * (w_hi - w_lo) : 0;
  int si[4], sj[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int s = tl + 16 * k;
    si[k] = ib * kDmI + s / kDmJ;
    sj[k] = jb * kDmJ + s % kDmJ;
  }
  float acc[4] = {};
  for (int k0 = 0; k0 < n; k0 += kDmP) {
    if (tid < kDmP) {
      const int lin = k0 + tid;
      const bool ok = lin < n;
      const int ph = h_lo + lin / nw, pw = w_lo + lin % nw;
      sok[tid] = ok;
      sph[tid] = ok ? ph : 0;
      spw[tid] = ok ? pw : 0;
      sh0[tid] = ok ? p.h0[ph] : -1;
      sh1[tid] = ok ? p.h1[ph] : -1;
      slh[tid] = ok ? p.lh[ph] : 0.f;
      sw0[tid] = ok ? p.w0[pw] : -1;
      sw1[tid] = ok ? p.w1[pw] : -1;
      slw[tid] = ok ? p.lw[pw] : 0.f;
    }
    __syncthreads();
    float gx[2] = {0.f, 0.f};
    for (int c0 = 0; c0 < p.C; c0 += kDmC) {
      for (int e = tid; e < kDmQ * kDmC; e += kThreads) {
        const int qi = e / kDmC, ci = e % kDmC;
        const int qq = q_base + qi, c = c0 + ci;
        gs[qi][ci] = (qq < p.Q && c < p.C)
                         ? to_float(dout[static_cast<int64_t>(qq) * p.sgq + static_cast<int64_t>(c) * p.sgc])
                         : 0.f;
      }
      for (int e = tid; e < kDmC * kDmP; e += kThreads) {
        const int pi = p.x_cfast ? e / kDmC : e % kDmP;
        const int ci = p.x_cfast ? e % kDmC : e / kDmP;
        const int c = c0 + ci;
        xs[ci][pi] = (sok[pi] && c < p.C)
                         ? to_float(x[static_cast<int64_t>(c) * p.sxc + static_cast<int64_t>(sph[pi]) * p.sxh +
                                      static_cast<int64_t>(spw[pi]) * p.sxw])
                         : 0.f;
      }
      __syncthreads();
      for (int ci = 0; ci < kDmC; ++ci) {
        const float g = gs[tq][ci];
        gx[0] += g * xs[ci][tl];
        gx[1] += g * xs[ci][tl + 16];
      }
      __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int pi = tl + 16 * k;
      float dr = 0.f;
      if (q_ok && sok[pi]) {
        const float r = resized(mq, sph[pi], spw[pi], p);
        const float s = 1.f / (1.f + expf(p.thr - r));
        dr = (gx[k] / dq - uq) * s * (1.f - s);
      }
      drs[tq][pi] = dr;
    }
    __syncthreads();
    for (int pi = 0; pi < kDmP; ++pi) {
      const float d = drs[tq][pi];
      const int h0 = sh0[pi], h1 = sh1[pi], w0 = sw0[pi], w1 = sw1[pi];
      const float lh = slh[pi], lw = slw[pi];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // Both taps may hit the same source index (clamped edges, equal sizes): their weights add.
        const float ah = (h0 == si[k] ? 1.f - lh : 0.f) + (h1 == si[k] ? lh : 0.f);
        const float aw = (w0 == sj[k] ? 1.f - lw : 0.f) + (w1 == sj[k] ? lw : 0.f);
        acc[k] += d * (ah * aw);
      }
    }
    __syncthreads();  // the next chunk overwrites the pixel tables and drs
  }
  if (!q_ok) return;
  MT* dm = static_cast<MT*>(p.dm) + qrow * p.Hm * p.Wm;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (si[k] < p.Hm && sj[k] < p.Wm) dm[static_cast<int64_t>(si[k]) * p.Wm + sj[k]] = from_float<MT>(acc[k]);
  }
}

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

template <typename XT, typename MT>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(p.C, kFwdC)) * cdiv(p.Q, kFwdQ), p.B);
  mp_fwd_kernel<XT, MT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename XT, typename MT>
cudaError_t launch_dx(const Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(p.C, kDxC)) * cdiv(static_cast<int64_t>(p.Hf) * p.Wf, kDxP), p.B);
  mp_dx_kernel<XT, MT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename XT, typename MT>
cudaError_t launch_dmask(const Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(p.Hm, kDmI)) * cdiv(p.Wm, kDmJ), cdiv(p.Q, kDmQ), p.B);
  mp_dmask_kernel<XT, MT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define MMK_MP_INSTANTIATE(XT, MT)                                                 \
  template cudaError_t launch_forward<XT, MT>(const Params&, cudaStream_t);        \
  template cudaError_t launch_dx<XT, MT>(const Params&, cudaStream_t);             \
  template cudaError_t launch_dmask<XT, MT>(const Params&, cudaStream_t);
#define MMK_MP_INSTANTIATE_X(XT)   \
  MMK_MP_INSTANTIATE(XT, float)    \
  MMK_MP_INSTANTIATE(XT, __half)   \
  MMK_MP_INSTANTIATE(XT, __nv_bfloat16)
MMK_MP_INSTANTIATE_X(float)
MMK_MP_INSTANTIATE_X(__half)
MMK_MP_INSTANTIATE_X(__nv_bfloat16)
#undef MMK_MP_INSTANTIATE_X
#undef MMK_MP_INSTANTIATE

}  // namespace mp
}  // namespace mmk
