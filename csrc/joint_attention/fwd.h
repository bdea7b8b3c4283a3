// Joint attention forward (sm_80 mma.sync path, and the sm_90a wgmma/TMA path of fwd_sm90.cuh): the parameters the
// host passes to the kernels, and the launchers the per-dtype translation units instantiate. Plain CUDA types only
// (cuda.h only for the CUtensorMap type), so that the kernel files compile without ATen.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mmk {
namespace ja {

// Layouts (elements, not bytes):
//   q      [B, L, Hq*D] raw projection output of one stream, strides (sqb, sql, 1); head j is columns j*D..j*D+D-1
//   q_w    fp32 RMSNorm weight: [Hq*D] (norm 1, "full") or [D] (norm 2, "head"); null for norm 0
//   q_rstd fp32 [B, L] contiguous per-token rstd over all Hq*D values (norm 1 only; the Triton prep pass makes it)
//   inv_freq fp32 [D/2] RoPE inverse frequencies in pair order (t pairs, h pairs, w pairs); null without RoPE
//   k, v   joint [B, Hkv, Ltot, D] contiguous (k already normalized and rotated, from the Triton _joint_kv pass)
//   out    [B, L, Hq*D] contiguous, written in full
//   lse    fp32 [B, Hq, Ltot] contiguous, natural log; this call writes columns tok_off .. tok_off+L-1
struct FwdParams {
  const void* q;
  const float* q_w;
  const float* q_rstd;
  const float* inv_freq;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t sqb, sql;  // q strides of the batch and token dims
  int B, L, Ltot, tok_off, Hq, group;  // group = Hq / Hkv
  float qk_scale_log2;  // softmax scale * log2(e)
  float eps;
  int norm;  // 0 none, 1 full (rstd given), 2 head (rstd computed in the prologue)
  int rope;  // 0/1
  int grid_h, grid_w, off_t, off_h, off_w;  // token n sits at (n/(gh*gw)+off_t, (n/gw)%gh+off_h, n%gw+off_w)
  int pt, ph;  // pairs of the t and h chunks (the w chunk has the remaining D/2 - pt - ph)
};

// Queries per CTA (one 16-row MMA slab per warp) and keys per K/V tile.
constexpr int kFwdWarps = 4;
constexpr int kFwdBlockM = 16 * kFwdWarps;
constexpr int kFwdBlockN = 64;

// Launches the kernel for element type T (__half or __nv_bfloat16) and head dim D on `stream`; returns the launch
// error (cudaSuccess when it was queued).
template <typename T, int D>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);

// Shared-memory row stride (elements) of the Q/K/V/O tiles: an odd number of 16-byte chunks per row, so that the 8
// row addresses of an ldmatrix hit 8 different 4-bank groups (no conflicts) without a swizzle.
constexpr int fwd_row_stride(int D) { return (D / 8) % 2 == 1 ? D : D + 8; }

// Dynamic shared memory of the <D> kernel (bytes): K and V tiles, two stages each (the Q tile lives in stage 1 of K
// until its fragments are in registers), then the per-row rstd and RoPE coordinates of the prologue.
constexpr size_t fwd_smem_bytes(int D) {
  return 4 * static_cast<size_t>(kFwdBlockN) * fwd_row_stride(D) * 2 + kFwdBlockM * 4 * sizeof(float);
}

// ---- sm_90a path (fwd_sm90.cuh) ----
// One CTA = kSm90BlockM queries of one (batch, query head): a producer warpgroup (TMA) and two consumer warpgroups
// of 64 queries each; K/V tiles of kSm90BlockN keys in a kSm90Stages-deep shared-memory ring.
constexpr int kSm90BlockM = 128;
constexpr int kSm90BlockN = 128;
constexpr int kSm90Stages = 2;
constexpr int kSm90Threads = 384;

// 16-byte column chunks of q~ and K covered by the k16 steps of q~ K^T: D rounded up to 16 (72 -> 80), in chunks.
constexpr int sm90_qk_chunks(int D) { return (D + 15) / 16 * 2; }

// Dynamic shared memory of the sm_90a <D> kernel (bytes): 1024 bytes of alignment slack, the two consumers' q~
// tiles, the K and V stages, per-row rstd / RoPE coordinates (16 bytes a row) and the 4 * kSm90Stages mbarriers.
constexpr size_t fwd_sm90_smem_bytes(int D) {
  return 1024 + static_cast<size_t>(2 * sm90_qk_chunks(D) * 64 * 16) +
         static_cast<size_t>(kSm90Stages) * (sm90_qk_chunks(D) + D / 8) * kSm90BlockN * 16 + kSm90BlockM * 16 +
         4 * kSm90Stages * 8;
}

// The tensor maps of the joint K and V buffers, built on the host (joint_attention.cu): 3-D {D, Ltot, B*Hkv}
// (elements; strides D and Ltot*D), box {8, kSm90BlockN, 1}, no swizzle, no interleave, zero fill out of bounds.
struct Sm90Maps {
  CUtensorMap k;
  CUtensorMap v;
};

// Launches the sm_90a kernel; cudaErrorNoKernelImageForDevice when this build has no sm_90a image of it for the
// current device (the sm_80 image of the sm_90a kernel is a trap, never launched).
template <typename T, int D>
cudaError_t launch_fwd_sm90(const FwdParams& p, const Sm90Maps& maps, cudaStream_t stream);

}  // namespace ja
}  // namespace mmk
