// Causal 3D convolution forward, host side: argument checks and dispatch to the sm_80 mma.sync kernel (fwd_sm80.cu)
// or the sm_90a wgmma kernel (fwd_sm90.cu); conv.h documents the layouts and the invariants checked here. Python
// glue: mmkernels/ops/causal_conv3d/cuda.py (channels-last copies, the weight reorder, the kernel choice, the Triton
// backward).
//
// Host code only: the whole file sits under #ifndef __CUDA_ARCH__, so nvcc's device passes (one per arch) see an
// empty translation unit instead of parsing ATen's headers once more per arch.
#ifndef __CUDA_ARCH__

#include <algorithm>
#include <string>

#include "causal_conv3d/conv.h"
#include "common.h"

#ifndef MMKERNELS_CUDA_ARCHS
#define MMKERNELS_CUDA_ARCHS "unknown"
#endif

namespace mmk {
namespace {

constexpr int64_t kIntMax = 2147483647;

void check_cl_dense(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name);
  check_same_device(x, "x", t, name);
  MMK_CHECK(t.scalar_type() == x.scalar_type(), "causal_conv3d_fwd: argument '", name, "' must have x's dtype ",
            x.scalar_type(), ", got ", t.scalar_type());
  MMK_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast3d), "causal_conv3d_fwd: argument '", name,
            "' must be channels_last_3d-contiguous (memory order [B, T, H, W, C]), got strides ", t.strides());
  MMK_CHECK(aligned(t.data_ptr(), 16), "causal_conv3d_fwd: argument '", name, "' must be 16-byte aligned");
}

at::Tensor fwd_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& cache, int64_t stride, bool replicate, bool sm90) {
  const char* const fn = sm90 ? "causal_conv3d_fwd_sm90" : "causal_conv3d_fwd";
  check_cuda(x, "x");
  const auto dtype = x.scalar_type();
  MMK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, fn, ": argument 'x' must be float16 or bfloat16 (fp32 "
            "runs on the Triton backend), got ", dtype);
  MMK_CHECK(x.dim() == 5, fn, ": argument 'x' must be [B, Cin, T, H, W], got shape ", x.sizes());
  check_cl_dense(x, "x", x);
  MMK_CHECK(weight.dim() == 5, fn, ": argument 'weight' must be the reordered [Cout, kt, kh, kw, Cin], got shape ",
            weight.sizes());
  check_cuda(weight, "weight");
  check_same_device(x, "x", weight, "weight");
  MMK_CHECK(weight.scalar_type() == dtype && weight.is_contiguous() && aligned(weight.data_ptr(), 16), fn,
            ": argument 'weight' must be a contiguous, 16-byte aligned tensor of x's dtype ", dtype);
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = weight.size(0), KT = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  MMK_CHECK(weight.size(4) == Cin, fn, ": argument 'weight' ([Cout, kt, kh, kw, Cin] = ", weight.sizes(),
            ") must have x's Cin = ", Cin, " as its last dim");
  MMK_CHECK(Cin % 8 == 0 && Cout % 8 == 0, fn, ": Cin and Cout must be multiples of 8 (16-byte channel chunks), "
            "got Cin=", Cin, ", Cout=", Cout);
  MMK_CHECK(Cout >= 8 && KT >= 1 && KH >= 1 && KW >= 1 && H >= 1 && W >= 1, fn, ": empty kernel or frame: weight ",
            weight.sizes(), ", x ", x.sizes());
  MMK_CHECK(stride >= 1, fn, ": argument 'stride' must be >= 1, got ", stride);
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    check_same_device(x, "x", *bias, "bias");
    MMK_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == Cout && bias->is_contiguous(),
              fn, ": argument 'bias' must be a contiguous [", Cout, "] tensor of x's dtype");
  }
  if (cache.has_value()) {
    MMK_CHECK(cache->dim() == 5 && cache->size(0) == B && cache->size(1) == Cin && cache->size(2) == KT - 1 &&
                  cache->size(3) == H && cache->size(4) == W,
              fn, ": argument 'cache' must be [B, Cin, kt-1, H, W] = [", B, ", ", Cin, ", ", KT - 1, ", ", H, ", ", W,
              "], got ", cache->sizes());
    check_cl_dense(*cache, "cache", x);
  }
  const int64_t Ho = H + 2 * (KH / 2) - KH + 1, Wo = W + 2 * (KW / 2) - KW + 1;
  const int64_t T_out = T > 0 ? (T - 1) / stride + 1 : 0;
  auto y = at::empty({B, Cout, T_out, Ho, Wo}, x.options(), at::MemoryFormat::ChannelsLast3d);
  if (B == 0 || T_out == 0) return y;

  const int64_t K = KT * KH * KW * Cin;
  MMK_CHECK(H * W * Cin <= kIntMax && Ho * Wo * Cout <= kIntMax && Cout * K <= kIntMax, fn, ": a frame (H*W*Cin = ",
            H * W * Cin, ", Ho*Wo*Cout = ", Ho * Wo * Cout, ") or the weight (", Cout * K, " elements) passes the "
            "kernels' 32-bit offsets");
  conv::FwdParams p{};
  p.x = x.data_ptr();
  p.cache = cache.has_value() ? cache->data_ptr() : nullptr;
  p.w = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.B = static_cast<int>(B);
  p.T = static_cast<int>(T);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.Cin = static_cast<int>(Cin);
  p.Cout = static_cast<int>(Cout);
  p.KT = static_cast<int>(KT);
  p.KH = static_cast<int>(KH);
  p.KW = static_cast<int>(KW);
  p.T_out = static_cast<int>(T_out);
  p.Ho = static_cast<int>(Ho);
  p.Wo = static_cast<int>(Wo);
  p.stride = static_cast<int>(std::min<int64_t>(stride, kIntMax));
  p.front = cache.has_value() ? conv::kFrontCache : replicate ? conv::kFrontReplicate : conv::kFrontZeros;
  MMK_CHECK(B * T <= kIntMax && conv::grid_ctas(p) <= kIntMax, fn, ": B*T = ", B * T, " frames make a grid of ",
            conv::grid_ctas(p), " CTAs, beyond the kernels' 32-bit grid");

  const c10::cuda::CUDAGuard guard(x.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  const size_t smem_needed = sm90 ? conv::fwd_sm90_smem_bytes() : conv::fwd_sm80_smem_bytes();
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  const cudaStream_t stream = current_stream();
  cudaError_t err;
  if (sm90) {
    MMK_CHECK(major == 9, fn, ": the sm_90a kernel (wgmma) runs only on Hopper (compute capability 9.x), got ",
              major, ".x; use causal_conv3d_fwd (the sm_80 kernel)");
    // The runtime cannot tell an sm_90 image (whose kernel body is a trap) from an sm_90a one, so refuse builds
    // without 9.0a up front instead of launching a trap.
    MMK_CHECK(std::string(MMKERNELS_CUDA_ARCHS).find("9.0a") != std::string::npos, fn, ": this build of "
              "mmkernels._C has no sm_90a image (built for ", MMKERNELS_CUDA_ARCHS, "); rebuild with 9.0a in "
              "TORCH_CUDA_ARCH_LIST");
    MMK_CHECK(static_cast<size_t>(smem_optin) >= smem_needed, fn, ": the kernel needs ", smem_needed,
              " bytes of shared memory per block, the device allows ", smem_optin);
    err = dtype == at::kHalf ? conv::launch_fwd_sm90<__half>(p, stream)
                             : conv::launch_fwd_sm90<__nv_bfloat16>(p, stream);
    MMK_CHECK(err != cudaErrorNoKernelImageForDevice, fn, ": this build of mmkernels._C has no sm_90a image of the "
              "kernel (built for ", MMKERNELS_CUDA_ARCHS, "); rebuild with 9.0a in TORCH_CUDA_ARCH_LIST");
  } else {
    MMK_CHECK(major >= 8, fn, ": needs an sm_80 or newer GPU (mma.sync bf16/fp16, cp.async), got compute "
              "capability ", major, ".x");
    MMK_CHECK(static_cast<size_t>(smem_optin) >= smem_needed, fn, ": the kernel needs ", smem_needed,
              " bytes of shared memory per block, the device allows ", smem_optin);
    err = dtype == at::kHalf ? conv::launch_fwd_sm80<__half>(p, stream)
                             : conv::launch_fwd_sm80<__nv_bfloat16>(p, stream);
  }
  C10_CUDA_CHECK(err);
  return y;
}

}  // namespace

// y = causal_conv3d(x, weight, bias) of mmkernels/ops/causal_conv3d/reference.py, computed by the sm_80 kernel.
// x [B, Cin, T, H, W] fp16/bf16, channels_last_3d-contiguous and 16-byte aligned; weight the op's weight reordered to
// a contiguous [Cout, kt, kh, kw, Cin]; bias [Cout] or None; cache None or [B, Cin, kt-1, H, W] channels_last_3d
// (it replaces the front padding); replicate selects the front padding without a cache (frame 0 vs zeros).
// Cin and Cout multiples of 8. Returns y [B, Cout, T_out, Ho, Wo] in x's dtype, channels_last_3d.
at::Tensor causal_conv3d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& cache, int64_t stride, bool replicate) {
  return fwd_impl(x, weight, bias, cache, stride, replicate, false);
}

// The same contract, computed by the sm_90a kernel (wgmma). Hopper only, and only in builds with 9.0a.
at::Tensor causal_conv3d_fwd_sm90(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cache,
                                  int64_t stride, bool replicate) {
  return fwd_impl(x, weight, bias, cache, stride, replicate, true);
}

}  // namespace mmk

#endif  // __CUDA_ARCH__
