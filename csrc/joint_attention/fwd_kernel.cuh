// Joint attention forward, the portable sm_80 path (mma.sync; also what sm_90 runs): exactly the computation of
// _attn_fwd_kernel in mmkernels/ops/joint_attention/triton.py, for one stream of L queries at joint offset tok_off.
//
// One CTA = kFwdBlockM (64) queries of one (batch, query head); 4 warps, each owning a 16-row slab. Steps:
//
// 1. K/V tile 0 starts streaming in (cp.async) while the prologue builds q~ = RoPE(x * r * w) in fp32 for the
//    64 x D tile (r: rstd from the Triton prep pass for norm "full", the per-head RMS for "head"), rounds it once to
//    T and stages it in shared memory; each warp then keeps its 16 x D slab of q~ in registers as MMA A fragments.
// 2. Main loop over the joint keys in tiles of 64: K and V tiles are double-buffered in shared memory (the load of
//    tile i+1 overlaps the math of tile i); S = q~ K^T with m16n8k16 MMAs (D = 72 adds one m16n8k8 step for its last
//    8 columns, no padding to 128), online softmax in the exp2 domain (scale * log2 e folded into one FMA), P rounded
//    to T and fed from the S accumulators straight into the A operand of P V, whose D/8 n8 tiles (9 for D = 72) are
//    fp32 accumulators. Keys past Ltot (tail tile only) are masked to -inf and their K/V rows are zero-filled.
// 3. Epilogue: O = acc / l rounded to T, staged through shared memory into 16-byte stores of out's rows; the
//    natural-log LSE (m + log2 l) * ln 2 goes to lse[b, h, tok_off + m].
//
// Shared memory tiles have a padded row stride (fwd_row_stride) that makes every ldmatrix conflict-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "joint_attention/fwd.h"
#include "ptx.cuh"

namespace mmk {
namespace ja {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 32 * kFwdWarps;
static_assert(kFwdBlockM <= kFwdBlockN, "the Q tile is staged in a K tile buffer");
static_assert(kFwdBlockN == 64, "the softmax/PV fragment code below assumes 64-key tiles");

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::Elem;
using ptx::smem_addr;

using ptx::ldsm_x2;
using ptx::ldsm_x2_trans;
using ptx::ldsm_x4;
using ptx::ldsm_x4_trans;
using ptx::mma_k16;
using ptx::mma_k8;

__device__ __forceinline__ float fast_exp2(float x) {  // ex2(-inf) = 0; what Triton's exp2 lowers to
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Copy rows n0 .. n0+kFwdBlockN-1 of one head's [Ltot, D] slab into a shared tile (row stride S); rows at or past
// Ltot are zero-filled so that their (masked, p = 0) V rows cannot turn the accumulators into NaN.
template <typename T, int D, int S>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int n0, int Ltot, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = kFwdBlockN * kChunks;
  const uint32_t base = smem_addr(tile);
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kTotal % kThreads != 0 && c >= kTotal) break;
    const int row = c / kChunks, col = c - row * kChunks;
    const int n = n0 + row;
    const bool ok = n < Ltot;
    const T* src = ok ? head + static_cast<int64_t>(n) * D + col * 8 : head;
    cp_async16(base + (row * S + col * 8) * 2, src, ok ? 16 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) joint_attention_fwd_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = Elem<T>;
  constexpr bool kBf16 = E::kBf16;
  constexpr int S = fwd_row_stride(D);    // shared row stride (elements)
  constexpr int kTile = kFwdBlockN * S;   // elements of one K or V tile
  constexpr int kK16 = D / 16;            // full k16 steps of q~ K^T
  constexpr bool kTail8 = (D % 16) != 0;  // one more k8 step (D = 72)
  constexpr int kNT = D / 8;              // n8 tiles of the output
  constexpr int P = D / 2;                // rotation pairs
  constexpr int kSTiles = kFwdBlockN / 8;  // n8 tiles of a score slab
  static_assert(D % 8 == 0 && D >= 16, "head dim must be a multiple of 8");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Layout: [K stage 0][V stage 0][K stage 1][V stage 1]; stage st's K tile starts at 2*st*kTile, V at +kTile.
  T* const sbase = reinterpret_cast<T*>(smem_raw);
  T* const sQ = sbase + 2 * kTile;  // K stage 1: free until the loads of key tile 1 are issued
  T* const sO = sbase;              // K stage 0: the epilogue's staging tile, after the last loads have landed
  float* s_r = reinterpret_cast<float*>(smem_raw + 4 * kTile * sizeof(T));  // [kFwdBlockM] rstd
  int* s_c = reinterpret_cast<int*>(s_r + kFwdBlockM);                      // [kFwdBlockM][3] RoPE coordinates

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * kFwdBlockM;
  const int bh = blockIdx.y;
  const int b = bh / p.Hq, hq = bh - b * p.Hq;
  const int hk = hq / p.group;
  const int Hkv = p.Hq / p.group;
  const int64_t kv_off = (static_cast<int64_t>(b) * Hkv + hk) * p.Ltot * D;
  const T* k_head = static_cast<const T*>(p.k) + kv_off;
  const T* v_head = static_cast<const T*>(p.v) + kv_off;

  // Key tile 0 streams in while the prologue runs.
  load_tile<T, D, S>(sbase, k_head, 0, p.Ltot, tid);
  cp_async_commit();
  load_tile<T, D, S>(sbase + kTile, v_head, 0, p.Ltot, tid);
  cp_async_commit();

  // ---- Prologue: q~ = RoPE(x * r * w), fp32, one rounding to T. ----
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.sqb + static_cast<int64_t>(hq) * D;
  if (p.norm == 2) {  // per-head RMS over the D values of each row, one warp per row
    for (int r = warp; r < kFwdBlockM; r += kFwdWarps) {
      const int m = m0 + r;
      float ss = 0.f;
      if (m < p.L) {
        const T* row = q + static_cast<int64_t>(m) * p.sql;
        for (int d = lane; d < D; d += 32) {
          const float x = E::to_float(row[d]);
          ss += x * x;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(kFullMask, ss, o);
      if (lane == 0) s_r[r] = rsqrtf(ss / D + p.eps);
    }
  }
  for (int r = tid; r < kFwdBlockM; r += kThreads) {
    const int m = m0 + r;
    if (p.norm == 1) s_r[r] = m < p.L ? p.q_rstd[static_cast<int64_t>(b) * p.L + m] : 0.f;
    if (p.rope) {
      const int pos = p.tok_off + m;
      s_c[3 * r + 0] = pos / (p.grid_h * p.grid_w) + p.off_t;
      s_c[3 * r + 1] = (pos / p.grid_w) % p.grid_h + p.off_h;
      s_c[3 * r + 2] = pos % p.grid_w + p.off_w;
    }
  }
  __syncthreads();
  const float* w = p.q_w + (p.norm == 1 ? hq * D : 0);
  for (int it = tid; it < kFwdBlockM * P; it += kThreads) {
    const int r = it / P, pr = it - r * P;
    const int m = m0 + r;
    // The rotate-half column map (see _rope_cols): pair pr joins columns lo and hi of its chunk.
    int lo, hi, axis;
    if (!p.rope) {
      lo = pr; hi = pr + P; axis = 0;
    } else if (pr < p.pt) {
      lo = pr; hi = pr + p.pt; axis = 0;
    } else if (pr < p.pt + p.ph) {
      lo = 2 * p.pt + (pr - p.pt); hi = lo + p.ph; axis = 1;
    } else {
      lo = 2 * (p.pt + p.ph) + (pr - p.pt - p.ph); hi = lo + (P - p.pt - p.ph); axis = 2;
    }
    float xl = 0.f, xh = 0.f;
    if (m < p.L) {
      const T* row = q + static_cast<int64_t>(m) * p.sql;
      xl = E::to_float(row[lo]);
      xh = E::to_float(row[hi]);
      if (p.norm != 0) {
        const float rr = s_r[r];
        xl = xl * rr * w[lo];
        xh = xh * rr * w[hi];
      }
      if (p.rope) {
        float sn, cs;
        // theta rounded to fp32 first, then accurate sincos (angles reach hundreds of radians).
        sincosf(static_cast<float>(s_c[3 * r + axis]) * p.inv_freq[pr], &sn, &cs);
        const float yl = xl * cs - xh * sn;
        const float yh = xh * cs + xl * sn;
        xl = yl;
        xh = yh;
      }
    }
    sQ[r * S + lo] = E::from_float(xl);
    sQ[r * S + hi] = E::from_float(xh);
  }
  __syncthreads();

  // This warp's 16 x D slab of q~ as A fragments (row-major, k = head-dim column).
  const int g = lane >> 2, t4 = lane & 3;  // MMA fragment row group and column pair
  uint32_t qa[kK16][4];
  uint32_t qa8[2];
  {
    const int mi = lane >> 3, r8 = lane & 7;
    const T* slab = sQ + (warp * 16) * S;
#pragma unroll
    for (int kk = 0; kk < kK16; ++kk) {
      ldsm_x4(qa[kk], smem_addr(slab + ((mi & 1) * 8 + r8) * S + kk * 16 + (mi >> 1) * 8));
    }
    if constexpr (kTail8) ldsm_x2(qa8, smem_addr(slab + (lane & 15) * S + kK16 * 16));
  }
  __syncthreads();  // every warp has its fragments: sQ (K stage 1) may be overwritten

  float acc[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};  // running max (log2 domain, scaled) of rows g and g+8
  float l_r[2] = {0.f, 0.f};              // this thread's partial row sums (reduced over the quad at the end)

  const int n_tiles = (p.Ltot + kFwdBlockN - 1) / kFwdBlockN;
  for (int i = 0; i < n_tiles; ++i) {
    const int st = i & 1;
    const int n0 = i * kFwdBlockN;
    const T* const kt = sbase + 2 * st * kTile;
    const T* const vt = kt + kTile;
    T* const next = sbase + 2 * (st ^ 1) * kTile;
    // Prefetch tile i+1 into the other stage (empty groups on the last tile keep the wait counts uniform).
    if (i + 1 < n_tiles) load_tile<T, D, S>(next, k_head, n0 + kFwdBlockN, p.Ltot, tid);
    cp_async_commit();
    if (i + 1 < n_tiles) load_tile<T, D, S>(next + kTile, v_head, n0 + kFwdBlockN, p.Ltot, tid);
    cp_async_commit();
    cp_async_wait<3>();  // K_i has landed (pending at most: V_i, K_{i+1}, V_{i+1})
    __syncthreads();

    // S = q~ K_i^T: 16 x 64 per warp, 8 n8 tiles.
    float s[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    {
      const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
      for (int kk = 0; kk < kK16; ++kk) {
#pragma unroll
        for (int j = 0; j < kSTiles; j += 2) {
          // Matrices: (keys of tile j, k lo), (tile j, k hi), (tile j+1, k lo), (tile j+1, k hi).
          uint32_t kb[4];
          ldsm_x4(kb, smem_addr(kt + ((j + (mi >> 1)) * 8 + r8) * S + kk * 16 + (mi & 1) * 8));
          mma_k16<kBf16>(s[j], qa[kk], kb[0], kb[1]);
          mma_k16<kBf16>(s[j + 1], qa[kk], kb[2], kb[3]);
        }
      }
      if constexpr (kTail8) {
#pragma unroll
        for (int j = 0; j < kSTiles; j += 4) {
          uint32_t kb[4];  // matrices: key tiles j .. j+3, head-dim columns kK16*16 .. +7
          ldsm_x4(kb, smem_addr(kt + ((j + mi) * 8 + r8) * S + kK16 * 16));
#pragma unroll
          for (int u = 0; u < 4; ++u) mma_k8<kBf16>(s[j + u], qa8, kb[u]);
        }
      }
    }

    // Tail tile: keys at or past Ltot do not exist.
    if (n0 + kFwdBlockN > p.Ltot) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        const int n = n0 + j * 8 + 2 * t4;
        if (n >= p.Ltot) s[j][0] = s[j][2] = -INFINITY;
        if (n + 1 >= p.Ltot) s[j][1] = s[j][3] = -INFINITY;
      }
    }

    // Online softmax (each row is spread over the 4 lanes of a quad).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float alpha[2], neg_m[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFullMask, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFullMask, mx[h], 2));
      // max(s) * scale == max(s * scale) for a positive scale; every tile holds at least one real key, so m_new
      // is finite and alpha = exp2(-inf) = 0 on the first tile.
      const float m_new = fmaxf(m_r[h], mx[h] * p.qk_scale_log2);
      alpha[h] = fast_exp2(m_r[h] - m_new);
      m_r[h] = m_new;
      neg_m[h] = -m_new;
      l_r[h] *= alpha[h];
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
    }
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = fast_exp2(fmaf(s[j][e], p.qk_scale_log2, neg_m[e >> 1]));
        l_r[e >> 1] += s[j][e];  // unrounded p, as the Triton kernel sums it
      }
    }

    cp_async_wait<2>();  // V_i has landed
    __syncthreads();

    // acc += P V_i: the score accumulators of key tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk.
    {
      const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
      for (int kk = 0; kk < kFwdBlockN / 16; ++kk) {
        uint32_t pa[4];
        pa[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int j = 0; j + 1 < kNT; j += 2) {
          // Matrices (transposed): (keys lo, out tile j), (keys hi, tile j), (keys lo, tile j+1), (keys hi, tile j+1).
          uint32_t vb[4];
          ldsm_x4_trans(vb, smem_addr(vt + (kk * 16 + (mi & 1) * 8 + r8) * S + (j + (mi >> 1)) * 8));
          mma_k16<kBf16>(acc[j], pa, vb[0], vb[1]);
          mma_k16<kBf16>(acc[j + 1], pa, vb[2], vb[3]);
        }
        if constexpr (kNT % 2 == 1) {  // the ninth output tile of D = 72
          uint32_t vb[2];
          ldsm_x2_trans(vb, smem_addr(vt + (kk * 16 + (lane & 15)) * S + (kNT - 1) * 8));
          mma_k16<kBf16>(acc[kNT - 1], pa, vb[0], vb[1]);
        }
      }
    }
    __syncthreads();  // every warp is done with stage st before the next iteration refills it
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- Epilogue ----
  float inv_l[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_r[h] += __shfl_xor_sync(kFullMask, l_r[h], 1);
    l_r[h] += __shfl_xor_sync(kFullMask, l_r[h], 2);
    inv_l[h] = 1.f / l_r[h];
  }
  const int row0 = warp * 16 + g;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = j * 8 + 2 * t4;
    *reinterpret_cast<uint32_t*>(sO + row0 * S + col) = E::pack(acc[j][0] * inv_l[0], acc[j][1] * inv_l[0]);
    *reinterpret_cast<uint32_t*>(sO + (row0 + 8) * S + col) = E::pack(acc[j][2] * inv_l[1], acc[j][3] * inv_l[1]);
  }
  if (t4 == 0) {
    float* lse_row = p.lse + static_cast<int64_t>(bh) * p.Ltot + p.tok_off + m0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + 8 * h;
      if (m0 + r < p.L) lse_row[r] = (m_r[h] + log2f(l_r[h])) * kLn2;
    }
  }
  __syncthreads();
  {
    constexpr int kChunks = D / 8;
    T* out = static_cast<T*>(p.out);
    const int64_t row_len = static_cast<int64_t>(p.Hq) * D;
    for (int c = tid; c < kFwdBlockM * kChunks; c += kThreads) {
      const int r = c / kChunks, col = c - r * kChunks;
      const int m = m0 + r;
      if (m < p.L) {
        *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(b) * p.L + m) * row_len + hq * D + col * 8) =
            *reinterpret_cast<const uint4*>(sO + r * S + col * 8);
      }
    }
  }
#else
  __trap();  // the host refuses devices below sm_80; this image exists only for archs the build was asked for
#endif
}

}  // namespace detail

template <typename T, int D>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes(D);
  auto kernel = detail::joint_attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.L + kFwdBlockM - 1) / kFwdBlockM, p.B * p.Hq);
  kernel<<<grid, detail::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ja
}  // namespace mmk
