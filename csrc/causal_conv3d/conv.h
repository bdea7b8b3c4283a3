// Causal 3D convolution forward (implicit GEMM): the parameters the host (causal_conv3d.cu) passes to the kernels
// (fwd_sm80.cuh: mma.sync, fwd_sm90.cuh: wgmma) and the launchers their translation units instantiate. Plain CUDA
// types only, so that the kernel files compile without ATen.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mmk {
namespace conv {

// Where the kt-1 front frames (padded frames 0 .. kt-2) come from.
enum Front : int {
  kFrontReplicate = 0,  // frame 0 of x, repeated (the official module)
  kFrontZeros = 1,      // zeros: the taps that read them are skipped (zero-filled operands)
  kFrontCache = 2,      // the previous chunk's last kt-1 frames (`cache`)
};

// Layouts (elements; every tensor dense, channels fastest, 16-byte aligned base):
//   x      [B, T, H, W, Cin]        (x of the op in channels_last_3d memory order)
//   cache  [B, KT-1, H, W, Cin]     (null unless front == kFrontCache)
//   w      [Cout, KT, KH, KW, Cin]  (the op's weight reordered: the GEMM's B operand, K-major)
//   bias   [Cout] or null
//   y      [B, T_out, Ho, Wo, Cout] (channels_last_3d memory order), written in full
// The GEMM: M = Ho*Wo positions of one output frame (b, t) per CTA row block, N = Cout, K = KT*KH*KW*Cin with
// k = ((dt*KH + dh)*KW + dw)*Cin + c. Output position (ho, wo) of frame t reads x frame p = t*stride + dt - (KT-1)
// (p < 0: a front frame) at (ho + dh - KH/2, wo + dw - KW/2), zero outside [0, H) x [0, W).
// Host-checked invariants the kernels rely on:
//   * Cin % 8 == 0 and Cout % 8 == 0: a 16-byte chunk of a K row is 8 channels of one tap, and output column pairs
//     never straddle Cout.
//   * H*W*Cin, Ho*Wo*Cout and Cout*K are < 2**31: offsets inside one frame (and the weight) fit int32; frame bases
//     are int64.
//   * B*T_out * ceil(Ho*Wo / BM) * ceil(Cout / BN) < 2**31 (a 1-D grid).
//   * T >= 1 and T_out = (T-1)/stride + 1, so every frame index p is <= T-1.
struct FwdParams {
  const void* x;
  const void* cache;
  const void* w;
  const void* bias;
  void* y;
  int B, T, H, W, Cin, Cout;
  int KT, KH, KW;
  int T_out, Ho, Wo, stride;
  int front;  // a Front value
};

// CTA tile of both kernels: BM output positions x BN output channels, K in steps of BK.
constexpr int kBM = 128;
constexpr int kBN = 128;

// sm_80 kernel (mma.sync m16n8k16 + ldmatrix + cp.async): 8 warps as 2 (M) x 4 (N), warp tile 64 x 32.
constexpr int kSm80BK = 32;
constexpr int kSm80Stages = 4;
constexpr int kSm80Threads = 256;
// Shared row stride (elements) of the A and B tiles: 32 + 8, i.e. 5 16-byte chunks, so the 8 row addresses of an
// ldmatrix fall in 8 different 4-bank groups (conflict-free without a swizzle).
constexpr int kSm80Lds = kSm80BK + 8;
constexpr size_t fwd_sm80_smem_bytes() {
  return static_cast<size_t>(kSm80Stages) * (kBM + kBN) * kSm80Lds * 2;
}

// sm_90a kernel (wgmma m64n128k16, operands from shared memory, cp.async gather): 2 warpgroups, each 64 rows x 128
// columns of the CTA tile.
constexpr int kSm90BK = 64;
constexpr int kSm90Stages = 4;
constexpr int kSm90Threads = 256;
constexpr size_t fwd_sm90_smem_bytes() {
  return 128 + static_cast<size_t>(kSm90Stages) * (kBM + kBN) * kSm90BK * 2;  // + alignment slack
}

// Launch the kernel for element type T (__half or __nv_bfloat16) on `stream`; return the launch error. The sm_90a
// launcher returns cudaErrorNoKernelImageForDevice when this build has no sm_90a image of its kernel (the sm_80
// image of it is a trap, never launched).
template <typename T>
cudaError_t launch_fwd_sm80(const FwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream);

// Number of CTAs of the 1-D grid (both kernels share the tiling).
inline int64_t grid_ctas(const FwdParams& p) {
  const int64_t m_tiles = (static_cast<int64_t>(p.Ho) * p.Wo + kBM - 1) / kBM;
  const int64_t n_tiles = (p.Cout + kBN - 1) / kBN;
  return static_cast<int64_t>(p.B) * p.T_out * m_tiles * n_tiles;
}

}  // namespace conv
}  // namespace mmk
