// Joint attention forward, the Hopper (sm_90a) path: wgmma + TMA + mbarriers + warp specialization. It computes
// exactly what the sm_80 kernel (fwd_kernel.cuh) and triton.py's _attn_fwd_kernel compute, for one stream of L
// queries at joint offset tok_off: q~ = RoPE(RMSNorm(q)) built in the prologue, online softmax in the exp2 domain
// over the joint keys, out = softmax(scale q~ K^T) V written into the stream's [B, L, Hq*D] tensor, natural-log LSE.
//
// CTA = 128 queries of one (batch b, query head hq), 384 threads = 3 warpgroups:
//   WG0, producer: setmaxnreg.dec to 40; one thread streams the K and V tiles (128 keys each) of kv head
//        hq / group into a 2-stage shared-memory ring with TMA (cp.async.bulk.tensor), each stage guarded by a
//        "full" mbarrier (expect_tx bytes) and an "empty" mbarrier (8 arrivals: one per consumer warp).
//   WG1, WG2, consumers: setmaxnreg.inc to 232; consumer c owns queries 64c .. 64c+63 of the CTA tile. Each
//        builds its q~ tile (fp32 norm + RoPE, one rounding to T) in shared memory, then runs the main loop:
//        S = q~ K^T by wgmma (A and B from shared memory, 128 keys, k16 steps over D rounded up to 16), masking of
//        keys >= Ltot, online softmax in registers, P rounded to T and fed from registers as the A operand of
//        O += P V (wgmma, B = V from shared memory, N = D: 64/72/80/96/128 directly), O rescaled by alpha.
//
// Softmax/MMA overlap, chosen: ping-pong between the two consumer warpgroups plus a one-tile software pipeline
// inside each. Named barrier 1 + c is consumer c's "turn": a consumer waits for its turn, issues its wgmmas for
// section i (S_i = q~ K_i^T, then O += P_{i-1} V_{i-1}, two commit groups) and passes the turn to the other, so one
// warpgroup's GEMMs run on the tensor cores while the other does its softmax (MUFU/FMA). Inside a warpgroup the
// softmax of S_i starts as soon as the S group completes (wgmma.wait_group 1) while its P_{i-1} V_{i-1} group still
// runs; O is rescaled and P_i packed only after wait_group 0 (in the SASS of this build ptxas schedules that wait
// after the masking and row max but ahead of the exponentials, so most of the overlap comes from the ping-pong).
// Why this rather than issuing QK^T_{i+1} before the softmax of tile i (FA3's intra-warpgroup overlap): it needs one
// S accumulator (64 registers) instead of two, and its correctness does not hinge on the turn-taking at all (the
// named barriers only order issue; the mbarriers and wgmma waits carry every data dependence), which matters for a
// kernel that could not be run before it shipped.
// Section n_tiles issues only the last P V. Turn accounting: consumer 1 passes the first turn to consumer 0 before
// its loop and does not pass it after its last section, so both barriers see matching sync/arrive counts.
//
// Shared-memory layouts (no swizzle, wgmma "interleave" mode, every operand in 8-row x 16-byte core matrices):
//   tile[chunk][row][8 elements]: chunk = 16-byte column group of the head dim (d / 8), row = token (or query),
//   so each core matrix (8 consecutive rows of one chunk) is 128 contiguous bytes.
//   q~ tile of consumer c: [sm90_qk_chunks(D)][64][8]; K stage: [sm90_qk_chunks(D)][128][8]; V stage: [D/8][128][8].
//   Descriptors (bytes): q~ as K-major A: LBO (next chunk, the K direction) = 64*16 = 1024, SBO (next 8 rows) = 128;
//   K as K-major B: LBO = 128*16 = 2048, SBO = 128; V as MN-major B (imm-trans-b = 1, N = head dim): LBO (next 8
//   keys, the K direction) = 128, SBO (next chunk along N) = 2048.
//   TMA writes this layout directly: one 2-D box {8 elements, 128 tokens} per chunk (16-byte inner box, no swizzle),
//   so the 144-byte rows of D = 72 need no special case: the K tile just has one more chunk (cols 72..79) than TMA
//   fills, zeroed once at kernel start, and q~ writes zeros there, so the 5th k16 step of q~ K^T adds 0 * 0.
//   Why not 128B swizzle: 144/160/192-byte rows do not tile 128-byte swizzle atoms; splitting each tile into a
//   swizzled 64-column part and a 16/32-column part with another swizzle mode needs two descriptors per operand and
//   two PV accumulators per row. Interleave mode is one uniform layout for every D, at the price of small (16-byte)
//   TMA boxes; whether that costs throughput is for a GPU session to measure.
//
// Invariants relied on:
//   * Every key tile holds at least one key < Ltot (n_tiles = ceil(Ltot / 128)), so the running max is finite
//     after the first tile and alpha = exp2(-inf - m) = 0 then. TMA zero-fills rows >= Ltot of the tail tile (the
//     tensor map's token extent is Ltot per head), so masked V rows are 0, never NaN, and p = 0 multiplies them.
//   * Rows >= L of the CTA tile run the full loop (they are part of the warpgroup's wgmmas) with q~ = 0; they are
//     neither stored nor their LSE written. Both consumers run the same n_tiles + 1 sections, always.
//   * The 8 "empty" arrivals per stage and per K/V come from lane 0 of each consumer warp, after that warp's
//     wgmma.wait_group has retired the wgmma that read the stage.
//   * Generic-proxy shared-memory writes read by wgmma (q~, the zeroed K chunk) are followed by
//     fence.proxy.async.shared::cta and a barrier before the first wgmma that reads them.
//   * The epilogue stages O in the consumer's own q~ tile: its last reader, the final q~ K^T group, has retired.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "joint_attention/fwd.h"
#include "joint_attention/fwd_kernel.cuh"  // detail::Elem, fast_exp2, smem_addr

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MMK_JA_SM90_DEVICE 1
#endif

#include "joint_attention/fwd_sm90_wgmma.cuh"

namespace mmk {
namespace ja {
namespace sm90 {

// Kernel arguments: the tensor maps must live in parameter space (__grid_constant__) for TMA to read them.
struct Args {
  Sm90Maps maps;
  FwdParams p;
};

constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register budget of one CTA per SM");
static_assert(kSm90BlockM == 128 && kSm90BlockN == 128 && kSm90Threads == 384,
              "two 64-row consumer warpgroups, S fragments of 128 keys (qk_m64n128k16_ss)");

// Shared-memory map of the <D> kernel (byte offsets from a 1024-aligned base; every tile offset is a multiple of
// 1024, TMA needs 128-byte aligned destinations).
template <int D>
struct Layout {
  static constexpr int kChunks = D / 8;               // 16-byte chunks of a K/V/O row
  static constexpr int kQkChunks = sm90_qk_chunks(D);  // chunks of the q~ K^T reduction (D = 72: 10)
  static constexpr int kK16 = kQkChunks / 2;           // k16 steps of q~ K^T
  static constexpr uint32_t kQBytes = kQkChunks * 64 * 16;
  static constexpr uint32_t kKBytes = kQkChunks * kSm90BlockN * 16;
  static constexpr uint32_t kVBytes = kChunks * kSm90BlockN * 16;
  static constexpr uint32_t kQOff = 0;
  static constexpr uint32_t kKOff = kQOff + 2 * kQBytes;
  static constexpr uint32_t kVOff = kKOff + kSm90Stages * kKBytes;
  static constexpr uint32_t kRowOff = kVOff + kSm90Stages * kVBytes;  // float rstd[128], then int coords[128][3]
  static constexpr uint32_t kBarOff = kRowOff + kSm90BlockM * 16;     // full_k, full_v, empty_k, empty_v [stages]
  static constexpr uint32_t kBytes = kBarOff + 4 * kSm90Stages * 8;
  static constexpr uint32_t kTileTx = kChunks * kSm90BlockN * 16;    // bytes TMA brings per K or V tile
  static_assert(D % 8 == 0 && D >= 64 && D <= 128, "head dims 64..128, multiples of 8");
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0, "tile alignment");
  static_assert(1024 + kBytes == fwd_sm90_smem_bytes(D), "fwd.h's fwd_sm90_smem_bytes disagrees with the layout");
};

#ifdef MMK_JA_SM90_DEVICE
namespace dev {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits until the phase with the given parity has completed (a fresh barrier counts its phase "1" as completed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
using ptx::fence_proxy_async;
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int kRegs> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
using ptx::make_desc;
using ptx::pin;
using ptx::wgmma_commit;
using ptx::wgmma_fence;
using ptx::wgmma_wait;

// Element offset of (row r, column col) in a [chunk][rows][8] tile.
template <int kRows> __device__ __forceinline__ int tile_idx(int r, int col) {
  return ((col >> 3) * kRows + r) * 8 + (col & 7);
}

}  // namespace dev
#endif  // MMK_JA_SM90_DEVICE

template <typename T, int D>
__global__ void __launch_bounds__(kSm90Threads, 1) joint_attention_fwd_sm90_kernel(const __grid_constant__ Args args) {
#ifdef MMK_JA_SM90_DEVICE
  using namespace dev;
  using E = detail::Elem<T>;
  using Lay = Layout<D>;
  constexpr bool kBf16 = E::kBf16;
  constexpr int kChunks = Lay::kChunks;
  constexpr int kQkChunks = Lay::kQkChunks;
  constexpr int P = D / 2;  // rotation pairs
  constexpr int kSRegs = kSm90BlockN / 2;  // S accumulator floats per thread (16 n8 tiles x 4)
  constexpr int kORegs = D / 2;            // O accumulator floats per thread
  const FwdParams& p = args.p;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = detail::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* const sbase = smem_raw + (base - raw);
  const uint32_t full_k = base + Lay::kBarOff;
  const uint32_t full_v = full_k + 8 * kSm90Stages;
  const uint32_t empty_k = full_v + 8 * kSm90Stages;
  const uint32_t empty_v = empty_k + 8 * kSm90Stages;

  const int tid = threadIdx.x;
  const int wg = __shfl_sync(detail::kFullMask, tid >> 7, 0);  // warp-uniform, and visibly so to the compiler
  const int m0 = blockIdx.x * kSm90BlockM;
  const int bh = blockIdx.y;
  const int b = bh / p.Hq, hq = bh - b * p.Hq;
  const int Hkv = p.Hq / p.group;
  const int bhk = b * Hkv + hq / p.group;  // the tensor maps' third coordinate: (batch, kv head)
  const int n_tiles = (p.Ltot + kSm90BlockN - 1) / kSm90BlockN;

  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < kSm90Stages; ++st) {
      mbar_init(full_k + 8 * st, 1);
      mbar_init(full_v + 8 * st, 1);
      mbar_init(empty_k + 8 * st, 8);
      mbar_init(empty_v + 8 * st, 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (kQkChunks > kChunks) {
    // D = 72: the K chunk of columns 72..79 is read by the last k16 step but never written by TMA; zero it once.
    constexpr int kPad = (kQkChunks - kChunks) * kSm90BlockN;  // 16-byte slots per stage
    for (int i = tid; i < kSm90Stages * kPad; i += kSm90Threads) {
      const int st = i / kPad, slot = i - st * kPad;
      *reinterpret_cast<uint4*>(sbase + Lay::kKOff + st * Lay::kKBytes + kChunks * kSm90BlockN * 16 + slot * 16) =
          make_uint4(0, 0, 0, 0);
    }
  }
  fence_proxy_async();
  __syncthreads();

  if (wg == 0) {
    // ---- Producer ----
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      prefetch_map(&args.maps.k);
      prefetch_map(&args.maps.v);
      for (int i = 0; i < n_tiles; ++i) {
        const int st = i % kSm90Stages;
        const uint32_t ph = (i / kSm90Stages) & 1;
        const int n0 = i * kSm90BlockN;
        mbar_wait(empty_k + 8 * st, ph ^ 1);
        mbar_arrive_expect_tx(full_k + 8 * st, Lay::kTileTx);
        const uint32_t k_dst = base + Lay::kKOff + st * Lay::kKBytes;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          tma_load_3d(k_dst + c * kSm90BlockN * 16, &args.maps.k, c * 8, n0, bhk, full_k + 8 * st);
        }
        mbar_wait(empty_v + 8 * st, ph ^ 1);
        mbar_arrive_expect_tx(full_v + 8 * st, Lay::kTileTx);
        const uint32_t v_dst = base + Lay::kVOff + st * Lay::kVBytes;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          tma_load_3d(v_dst + c * kSm90BlockN * 16, &args.maps.v, c * 8, n0, bhk, full_v + 8 * st);
        }
      }
    }
    return;
  }

  // ---- Consumers ----
  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1;
  const int ctid = tid - 128 * wg;
  const int warp = ctid >> 5, lane = ctid & 31;
  const int g = lane >> 2, t4 = lane & 3;  // accumulator fragment: rows g and g+8 of the warp's 16, columns 2*t4
  const int row0 = 64 * c;                 // this warpgroup's first row of the CTA tile
  const int bar_wg = 3 + c;                // named barrier of this warpgroup alone (128 threads)
  const uint32_t sq = base + Lay::kQOff + c * Lay::kQBytes;
  T* const sq_ptr = reinterpret_cast<T*>(sbase + Lay::kQOff + c * Lay::kQBytes);
  float* const s_r = reinterpret_cast<float*>(sbase + Lay::kRowOff) + row0;
  int* const s_c = reinterpret_cast<int*>(sbase + Lay::kRowOff + kSm90BlockM * 4) + 3 * row0;

  // ---- Prologue: q~ = RoPE(x * r * w) in fp32, one rounding to T, into this warpgroup's [chunk][64][8] tile ----
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.sqb + static_cast<int64_t>(hq) * D;
  if (p.norm == 2) {  // per-head RMS over the D values of each row, one warp per row
    for (int r = warp; r < 64; r += 4) {
      const int m = m0 + row0 + r;
      float ss = 0.f;
      if (m < p.L) {
        const T* row = q + static_cast<int64_t>(m) * p.sql;
        for (int d = lane; d < D; d += 32) {
          const float x = E::to_float(row[d]);
          ss += x * x;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(detail::kFullMask, ss, o);
      if (lane == 0) s_r[r] = rsqrtf(ss / D + p.eps);
    }
  }
  if (ctid < 64) {
    const int r = ctid, m = m0 + row0 + r;
    if (p.norm == 1) s_r[r] = m < p.L ? p.q_rstd[static_cast<int64_t>(b) * p.L + m] : 0.f;
    if (p.rope) {
      const int pos = p.tok_off + m;
      s_c[3 * r + 0] = pos / (p.grid_h * p.grid_w) + p.off_t;
      s_c[3 * r + 1] = (pos / p.grid_w) % p.grid_h + p.off_h;
      s_c[3 * r + 2] = pos % p.grid_w + p.off_w;
    }
  }
  bar_sync(bar_wg, 128);
  const float* w = p.q_w + (p.norm == 1 ? hq * D : 0);
  for (int it = ctid; it < 64 * P; it += 128) {
    const int r = it / P, pr = it - r * P;
    const int m = m0 + row0 + r;
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
    sq_ptr[tile_idx<64>(r, lo)] = E::from_float(xl);
    sq_ptr[tile_idx<64>(r, hi)] = E::from_float(xh);
  }
  if constexpr (kQkChunks > kChunks) {  // D = 72: q~ columns 72..79 are zero (the padded k16 step)
    for (int i = ctid; i < (kQkChunks - kChunks) * 64; i += 128) {
      *reinterpret_cast<uint4*>(sq_ptr + kChunks * 64 * 8 + i * 8) = make_uint4(0, 0, 0, 0);
    }
  }
  fence_proxy_async();  // q~ is read by wgmma (the async proxy)
  bar_sync(bar_wg, 128);

  // ---- Main loop ----
  float o[kORegs];
  float s[kSRegs];
  uint32_t pf[kSRegs / 2];  // P of the previous tile as 8 k16 A fragments (4 registers each)
#pragma unroll
  for (int j = 0; j < kORegs; ++j) o[j] = 0.f;
#pragma unroll
  for (int j = 0; j < kSRegs; ++j) s[j] = 0.f;
#pragma unroll
  for (int j = 0; j < kSRegs / 2; ++j) pf[j] = 0u;
  float m_r[2] = {-INFINITY, -INFINITY};  // running max (log2 domain, scaled) of rows g and g+8
  float l_r[2] = {0.f, 0.f};              // this thread's partial row sums (reduced over the quad at the end)

  const uint64_t q_desc = make_desc(sq, 64 * 16, 128);
  const uint64_t k_desc = make_desc(base + Lay::kKOff, kSm90BlockN * 16, 128);
  const uint64_t v_desc = make_desc(base + Lay::kVOff, 128, kSm90BlockN * 16);
  const int my_turn = 1 + c, other_turn = 2 - c;

  // Section pieces. wgmma issue sits outside any data-dependent branch: ptxas serializes wgmmas that it finds on
  // a possibly divergent path, so the first (S only) and the last (P V only) sections are peeled off the loop.
  auto issue_s = [&](int st) {
#pragma unroll
    for (int k = 0; k < Lay::kK16; ++k) {
      // k-step k covers chunks 2k, 2k+1: 2 * 64 * 16 bytes into q~, 2 * 128 * 16 bytes into the K tile.
      qk_m64n128k16_ss<kBf16>(s, q_desc + ((k * 2048) >> 4), k_desc + ((st * Lay::kKBytes + k * 4096) >> 4),
                              k > 0 ? 1 : 0);
    }
  };
  auto issue_pv = [&](int pst) {
#pragma unroll
    for (int kk = 0; kk < kSm90BlockN / 16; ++kk) {
      // keys 16kk .. 16kk+15 of the V tile start 16kk rows = 256kk bytes into each chunk.
      pv_m64k16_rs<kBf16, D>(o, pf + 4 * kk, v_desc + ((pst * Lay::kVBytes + kk * 256) >> 4));
    }
  };
  // Online softmax of S_i in place (S becomes unrounded P); returns the rescale factors of rows g, g+8 via alpha.
  auto softmax = [&](int i, float (&alpha)[2]) {
    // Keys at or past Ltot (tail tile) do not exist. Selects, not a branch: ptxas moves the wgmma wait ahead of a
    // branch it cannot prove uniform, which would end the overlap of this softmax with the running P V.
    const int left = p.Ltot - i * kSm90BlockN - 2 * t4;  // keys of this tile from this thread's first column on
#pragma unroll
    for (int j = 0; j < kSm90BlockN / 8; ++j) {
      const bool dead0 = j * 8 >= left, dead1 = j * 8 + 1 >= left;
      s[4 * j + 0] = dead0 ? -INFINITY : s[4 * j + 0];
      s[4 * j + 2] = dead0 ? -INFINITY : s[4 * j + 2];
      s[4 * j + 1] = dead1 ? -INFINITY : s[4 * j + 1];
      s[4 * j + 3] = dead1 ? -INFINITY : s[4 * j + 3];
    }
    float mx[2] = {-INFINITY, -INFINITY};  // each row is spread over the 4 lanes of a quad
#pragma unroll
    for (int j = 0; j < kSm90BlockN / 8; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[4 * j + 0], s[4 * j + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    float neg_m[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(detail::kFullMask, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(detail::kFullMask, mx[h], 2));
      // max(s) * scale == max(s * scale) for a positive scale; every tile holds a real key, so m_new is finite
      // and alpha = exp2(-inf) = 0 on the first tile.
      const float m_new = fmaxf(m_r[h], mx[h] * p.qk_scale_log2);
      alpha[h] = detail::fast_exp2(m_r[h] - m_new);
      m_r[h] = m_new;
      neg_m[h] = -m_new;
      l_r[h] *= alpha[h];
    }
#pragma unroll
    for (int j = 0; j < kSRegs; ++j) {
      const int h = (j >> 1) & 1;  // registers 4j'+0,1: row g; 4j'+2,3: row g+8
      s[j] = detail::fast_exp2(fmaf(s[j], p.qk_scale_log2, neg_m[h]));
      l_r[h] += s[j];  // unrounded p, as the Triton kernel sums it
    }
  };
  // After the section's last wgmma group retired: O *= alpha, P_i packed to T as the next section's A fragments.
  // The S accumulators of n8 tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk (m16n8k16 layout):
  // pf[4kk + r] = (s[8kk + 2r], s[8kk + 2r + 1]).
  auto rescale_and_pack = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < kORegs; ++j) o[j] *= alpha[(j >> 1) & 1];
#pragma unroll
    for (int u = 0; u < kSRegs / 2; ++u) pf[u] = E::pack(s[2 * u], s[2 * u + 1]);
  };
  auto begin_issue = [&]() {
    bar_sync(my_turn, 256);
    pin(o);
    pin(s);
    pin(pf);
    wgmma_fence();
  };

  if (c == 1) bar_arrive(1, 256);  // consumer 0 takes the first turn

  // Section 0: S_0 only.
  {
    float alpha[2];
    mbar_wait(full_k, 0);
    begin_issue();
    issue_s(0);
    wgmma_commit();
    bar_arrive(other_turn, 256);  // section 0 is never the last (n_tiles >= 1)
    wgmma_wait<0>();
    pin(s);
    if (lane == 0) mbar_arrive(empty_k);
    softmax(0, alpha);
    rescale_and_pack(alpha);
  }
  // Sections 1 .. n_tiles-1: S_i, then P_{i-1} V_{i-1}.
  for (int i = 1; i < n_tiles; ++i) {
    const int st = i % kSm90Stages, pst = (i - 1) % kSm90Stages;
    const uint32_t ph = (i / kSm90Stages) & 1, pph = ((i - 1) / kSm90Stages) & 1;
    float alpha[2];
    mbar_wait(full_k + 8 * st, ph);
    mbar_wait(full_v + 8 * pst, pph);
    begin_issue();
    issue_s(st);
    wgmma_commit();
    issue_pv(pst);
    wgmma_commit();
    bar_arrive(other_turn, 256);
    wgmma_wait<1>();  // S_i is complete (P_{i-1} V_{i-1} may still run)
    pin(s);
    if (lane == 0) mbar_arrive(empty_k + 8 * st);
    softmax(i, alpha);
    wgmma_wait<0>();  // P_{i-1} V_{i-1} is complete: O and pf may change
    pin(o);
    pin(pf);
    if (lane == 0) mbar_arrive(empty_v + 8 * pst);
    rescale_and_pack(alpha);
  }
  // Section n_tiles: P_{n-1} V_{n-1} only; consumer 1 keeps the turn (nobody waits for it any more).
  {
    const int pst = (n_tiles - 1) % kSm90Stages;
    const uint32_t pph = ((n_tiles - 1) / kSm90Stages) & 1;
    mbar_wait(full_v + 8 * pst, pph);
    begin_issue();
    issue_pv(pst);
    wgmma_commit();
    if (c == 0) bar_arrive(other_turn, 256);
    wgmma_wait<0>();
    pin(o);
    if (lane == 0) mbar_arrive(empty_v + 8 * pst);
  }

  // ---- Epilogue: O / l rounded to T, staged in this warpgroup's q~ tile, then 16-byte row stores ----
  float inv_l[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_r[h] += __shfl_xor_sync(detail::kFullMask, l_r[h], 1);
    l_r[h] += __shfl_xor_sync(detail::kFullMask, l_r[h], 2);
    inv_l[h] = 1.f / l_r[h];
  }
  const int r_lo = warp * 16 + g;  // this thread's rows r_lo and r_lo + 8 of the warpgroup's 64
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int col = j * 8 + 2 * t4;
    *reinterpret_cast<uint32_t*>(sq_ptr + tile_idx<64>(r_lo, col)) =
        E::pack(o[4 * j + 0] * inv_l[0], o[4 * j + 1] * inv_l[0]);
    *reinterpret_cast<uint32_t*>(sq_ptr + tile_idx<64>(r_lo + 8, col)) =
        E::pack(o[4 * j + 2] * inv_l[1], o[4 * j + 3] * inv_l[1]);
  }
  if (t4 == 0) {
    float* lse_row = p.lse + static_cast<int64_t>(bh) * p.Ltot + p.tok_off + m0 + row0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      if (m0 + row0 + r < p.L) lse_row[r] = (m_r[h] + log2f(l_r[h])) * detail::kLn2;
    }
  }
  bar_sync(bar_wg, 128);
  {
    T* out = static_cast<T*>(p.out);
    const int64_t row_len = static_cast<int64_t>(p.Hq) * D;
    for (int idx = ctid; idx < 64 * kChunks; idx += 128) {
      const int r = idx / kChunks, cc = idx - r * kChunks;
      const int m = m0 + row0 + r;
      if (m < p.L) {
        *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(b) * p.L + m) * row_len + hq * D + cc * 8) =
            *reinterpret_cast<const uint4*>(sq_ptr + (cc * 64 + r) * 8);
      }
    }
  }
#else
  __trap();  // built without sm_90a: the host never launches this image (launch_fwd_sm90 checks binaryVersion)
#endif
}

}  // namespace sm90

template <typename T, int D>
cudaError_t launch_fwd_sm90(const FwdParams& p, const Sm90Maps& maps, cudaStream_t stream) {
  auto kernel = sm90::joint_attention_fwd_sm90_kernel<T, D>;
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (attr.binaryVersion != 90) return cudaErrorNoKernelImageForDevice;  // an sm_80 image would only trap
  constexpr size_t smem = fwd_sm90_smem_bytes(D);
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  sm90::Args args;
  args.maps = maps;
  args.p = p;
  const dim3 grid((p.L + kSm90BlockM - 1) / kSm90BlockM, p.B * p.Hq);
  kernel<<<grid, kSm90Threads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace ja
}  // namespace mmk
