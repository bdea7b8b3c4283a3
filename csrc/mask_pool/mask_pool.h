// Mask pooling: the parameters the host (mask_pool.cu) passes to the kernels (kernels.cu) and the launchers. Plain
// CUDA types only (no ATen in the kernel file). Semantics: mmkernels/ops/mask_pool/reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmk {
namespace mp {

// Layouts (element strides, any layout):
//   x     features [B, C, Hf, Wf] (sxb, sxc, sxh, sxw); dx the same shape with its own strides
//   m     mask logits [B, Q, Hm, Wm] (smb, smq, smh, smw)
//   dout  [B, Q, C] (sgb, sgq, sgc), x's dtype
//   out   [B, Q, C] contiguous, x's dtype; denom, u fp32 [B, Q] contiguous; dm [B, Q, Hm, Wm] contiguous, m's dtype
//   tap tables (reference.taps): h0, h1 int32 [Hf] and lh fp32 [Hf] (row taps), w0, w1, lw (column taps, [Wf]);
//   resized logit at (h, w) = (1-lh) * ((1-lw) * m[h0, w0] + lw * m[h0, w1]) + lh * ((1-lw) * m[h1, w0] + ...),
//   one tap per axis whose sizes are equal (same_h, same_w)
//   rlo, rhi int32 [ceil(Hm / block_i)], clo, chi int32 [ceil(Wm / block_j)]: the feature rows / columns whose taps
//   touch each block of source rows / columns (reference.adjoint_ranges), for the soft-mode mask backward
struct Params {
  const void* x;
  const void* m;
  const void* dout;
  void* out;
  void* dx;
  void* dm;
  float* denom;
  const float* u;
  const int* h0;
  const int* h1;
  const float* lh;
  const int* w0;
  const int* w1;
  const float* lw;
  const int* rlo;
  const int* rhi;
  const int* clo;
  const int* chi;
  int64_t sxb, sxc, sxh, sxw;
  int64_t sdb, sdc, sdh, sdw;  // dx
  int64_t smb, smq, smh, smw;
  int64_t sgb, sgq, sgc;
  int B, Q, C, Hf, Wf, Hm, Wm;
  int mode;       // 0 official, 1 hard, 2 soft
  float thr;      // official: sigmoid(threshold) rounded to m's dtype; hard and soft: the threshold
  float eps;
  int same_h, same_w;
  int x_cfast;    // x (or dx) has unit channel stride: threads run along the channels when loading/storing it
  int n_jb;       // column blocks of the source tiles (mask backward)
};

// Tiles (fp32 FMA, 256 threads): forward [kFwdQ masks x kFwdC channels] over chunks of kFwdP pixels; dx
// [kDxP pixels x kDxC channels] over chunks of kDxQ masks; mask backward [kDmQ masks x kDmI*kDmJ source pixels]
// over chunks of kDmP feature pixels and kDmC channels.
constexpr int kThreads = 256;
constexpr int kFwdQ = 32, kFwdC = 64, kFwdP = 32;
constexpr int kDxP = 32, kDxC = 64, kDxQ = 32;
constexpr int kDmQ = 16, kDmI = 8, kDmJ = 8, kDmP = 32, kDmC = 32;

// XT: the features' element type, MT: the masks' (float, __half, __nv_bfloat16 each).
template <typename XT, typename MT>
cudaError_t launch_forward(const Params& p, cudaStream_t stream);
template <typename XT, typename MT>
cudaError_t launch_dx(const Params& p, cudaStream_t stream);
template <typename XT, typename MT>
cudaError_t launch_dmask(const Params& p, cudaStream_t stream);

}  // namespace mp
}  // namespace mmk
