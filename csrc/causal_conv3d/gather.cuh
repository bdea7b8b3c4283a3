// Device pieces shared by the two causal-conv3d forward kernels (fwd_sm80.cuh, fwd_sm90.cuh): cp.async, the CTA's
// tile coordinates, and the per-thread operand loader that gathers the implicit-GEMM A operand (im2col rows of x,
// with the causal front frames and the spatial zero border as index arithmetic) and streams the B operand (weight
// rows) into one pipeline stage of shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "causal_conv3d/conv.h"
#include "ptx.cuh"

namespace mmk {
namespace conv {
namespace detail {

template <typename T> using Pack = ptx::Elem<T>;
using ptx::cp_async16_ca;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::smem_addr;
// Weights stream through (.cg: no L1 allocation).
__device__ __forceinline__ void cp_async16_cg(uint32_t dst, const void* src, int src_bytes) {
  ptx::cp_async16(dst, src, src_bytes);
}

// The tile of this CTA: output frame (b, t), first output position m0 (row-major over Ho x Wo) and first output
// channel n0. A tile never spans two frames: every output frame is computed by the same tiles with the same
// accumulation order whatever T is, so chunked streaming with a cache reproduces a whole-video call bitwise.
struct TileCoord {
  int b, t, m0, n0;
};

__device__ __forceinline__ TileCoord tile_coord(const FwdParams& p) {
  const int m_tiles = (p.Ho * p.Wo + kBM - 1) / kBM;
  const int n_tiles = (p.Cout + kBN - 1) / kBN;
  int pid = static_cast<int>(blockIdx.x);  // < 2**31 (host check)
  const int nt = pid % n_tiles;  // N fastest: neighbouring CTAs gather the same A rows, which L2 then serves
  pid /= n_tiles;
  const int mt = pid % m_tiles;
  const int bt = pid / m_tiles;
  TileCoord tc;
  tc.b = bt / p.T_out;
  tc.t = bt - tc.b * p.T_out;
  tc.m0 = mt * kBM;
  tc.n0 = nt * kBN;
  return tc;
}

// The loads of one thread for every K tile of its CTA. The thread owns one 16-byte chunk column kc of the tile
// (K elements k0 + 8*kc .. +7, k0 = tile * BK): 8 channels of a single tap, because Cin % 8 == 0. It owns kRows
// rows of the A tile (output positions m0 + row) and the same rows of the B tile (output channels n0 + row), rows
// row0 + i * kRowStep. Layout::off(row, kc) is the byte offset of that 16-byte chunk inside a tile; A and B tiles
// have the same shape (kBM == kBN). Tiles must be loaded in K order, each followed by advance(BK).
template <typename T, int kRows, int kRowStep, class Layout>
struct Loader {
  static_assert(kBM == kBN, "A and B tiles share the row mapping");
  static_assert(kRows <= 32, "row_ok is a 32-bit mask");
  // K position of the chunk: flat k, and channel c of tap (dt, dh, dw); dt >= KT means k >= K (zero-fill).
  int k, c, dt, dh, dw;
  int kc;
  int row0;
  uint32_t row_ok;  // bit i: A row i is an output position < Ho*Wo
  int ho[kRows], wo[kRows];
  int K;          // KT*KH*KW*Cin
  int frame;      // H*W*Cin, elements of one frame of x or the cache
  int p_base;     // t*stride - (KT-1): tap dt reads x frame p_base + dt (negative: a front frame)
  const T* x_b;   // frame 0 of x for this CTA's batch
  const T* c_b;   // frame 0 of the cache for this batch (only read with kFrontCache)
  const T* w_n0;  // weight row n0

  __device__ __forceinline__ void init(const FwdParams& p, const TileCoord& tc, int kc_, int row0_) {
    kc = kc_;
    row0 = row0_;
    K = p.KT * p.KH * p.KW * p.Cin;
    frame = p.H * p.W * p.Cin;
    p_base = tc.t * p.stride - (p.KT - 1);
    x_b = static_cast<const T*>(p.x) + static_cast<int64_t>(tc.b) * p.T * frame;
    c_b = p.cache != nullptr ? static_cast<const T*>(p.cache) + static_cast<int64_t>(tc.b) * (p.KT - 1) * frame : x_b;
    w_n0 = static_cast<const T*>(p.w) + static_cast<int64_t>(tc.n0) * K;
    row_ok = 0;
    const int hw_total = p.Ho * p.Wo;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int hw = tc.m0 + row0 + i * kRowStep;
      ho[i] = hw / p.Wo;
      wo[i] = hw - ho[i] * p.Wo;
      if (hw < hw_total) row_ok |= 1u << i;
    }
    k = c = dt = dh = dw = 0;
    advance(8 * kc, p);
  }

  // Move the chunk n elements along K (the taps are (dt, dh, dw) row-major, channels fastest).
  __device__ __forceinline__ void advance(int n, const FwdParams& p) {
    k += n;
    c += n;
    while (c >= p.Cin) {  // at most n / Cin + 1 trips
      c -= p.Cin;
      if (++dw == p.KW) {
        dw = 0;
        if (++dh == p.KH) {
          dh = 0;
          ++dt;
        }
      }
    }
  }

  // Issue the cp.async copies of this thread's chunks of the current K tile into the A and B tiles at shared
  // addresses sA, sB (zero-filled where the operand is padding or past the end of M, N or K).
  __device__ __forceinline__ void load(const FwdParams& p, int n0, uint32_t sA, uint32_t sB) const {
    const bool k_ok = dt < p.KT;
    // The frame tap dt reads: x frame pf, or for pf < 0 a front frame (cache frame pf + KT-1, frame 0 of x with
    // replicate padding, nothing with zero padding).
    const int pf = p_base + dt;
    const T* src = x_b + static_cast<int64_t>(pf > 0 ? pf : 0) * frame;
    bool f_ok = k_ok;
    if (pf < 0) {
      if (p.front == kFrontCache) src = c_b + static_cast<int64_t>(pf + p.KT - 1) * frame;
      else if (p.front == kFrontZeros) f_ok = false;
    }
    const int oh = dh - p.KH / 2, ow = dw - p.KW / 2;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int row = row0 + i * kRowStep;
      const int hi = ho[i] + oh, wi = wo[i] + ow;
      // Unsigned compares reject negative coordinates as well.
      const bool a_ok = f_ok && ((row_ok >> i) & 1u) && static_cast<unsigned>(hi) < static_cast<unsigned>(p.H) &&
                        static_cast<unsigned>(wi) < static_cast<unsigned>(p.W);
      const T* a_src = a_ok ? src + ((hi * p.W + wi) * p.Cin + c) : x_b;  // in-frame offset < 2**31
      cp_async16_ca(sA + Layout::off(row, kc), a_src, a_ok ? 16 : 0);
      const bool b_ok = k_ok && n0 + row < p.Cout;
      const T* b_src = b_ok ? w_n0 + (row * K + k) : w_n0;  // Cout * K < 2**31
      cp_async16_cg(sB + Layout::off(row, kc), b_src, b_ok ? 16 : 0);
    }
  }
};

}  // namespace detail
}  // namespace conv
}  // namespace mmk
