// Multi-scale deformable attention: the parameters the host (ms_deform_attn.cu) passes to the kernels
// (msda_fwd.cu, msda_bwd.cu) and the launchers. Plain CUDA types only (no ATen in the kernel files).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmk {
namespace msda {

// Layouts (all contiguous; element offsets in int64):
//   value       [B, S, H, C]          T
//   loc         [B, Q, H, L, P, 2]    TC   (x, y) normalized to [0, 1]
//   attn        [B, Q, H, L, P]       TC
//   shapes      [L, 2] int64 (H_l, W_l); starts [L] int64 (exclusive cumsum of H_l * W_l)
//   out, grad_out [B, Q, H*C]         T    (head-major channels: item n = (b*Q + q)*H + h owns [n*C, n*C + C))
//   grad_value_f32 [B, S, H, C] fp32, zeroed (atomic backward) or null (then no value gradient is scattered)
//   grad_value  [B, S, H, C]          T    (gather backward: every element written)
//   grad_loc, grad_attn: loc's and attn's shapes, TC (every element written)
//   entries int64 [E], offsets int64 [B*S*H + 1]: the CSR plan of mmkernels/ops/ms_deform_attn/plan.py
//
// Thread mapping: a group of G lanes (a power of two <= 32, aligned inside its warp) owns one work item (a query
// head (b, q, h) in the forward and backward, a value row (b, s, h) in the gather). A lane owns a vector of VEC
// consecutive channels (VEC = 16 bytes of T when C % VEC == 0 and the bases are 16-byte aligned, else 1); the
// nvec = C / VEC vectors are covered in nch = ceil(nvec / G) chunks of G.
struct Params {
  const void* value;
  const void* loc;
  const void* attn;
  const int64_t* shapes;
  const int64_t* starts;
  const void* grad_out;
  void* out;
  float* grad_value_f32;
  void* grad_value;
  void* grad_loc;
  void* grad_attn;
  const int64_t* entries;
  const int64_t* offsets;
  int64_t B, S, Q;
  int H, C, L, P;
  int vec, G, nvec, nch;
  int sm_count;
};

constexpr int kThreads = 256;     // threads per block, every kernel
constexpr int kMaxLevels = 1024;  // the level table lives in shared memory: 3 ints per level

// T: float, __half, __nv_bfloat16 (value, out and grad_value); TC: T or float (loc, attn and their grads).
template <typename T, typename TC>
cudaError_t launch_forward(const Params& p, cudaStream_t stream);
// grad_loc and grad_attn, plus the atomic scatter of the value gradient into grad_value_f32 when it is not null.
template <typename T, typename TC>
cudaError_t launch_backward(const Params& p, cudaStream_t stream);
// The value gradient as a gather over the CSR plan: grad_value, bitwise repeatable.
template <typename T, typename TC>
cudaError_t launch_value_grad_gather(const Params& p, cudaStream_t stream);

}  // namespace msda
}  // namespace mmk
