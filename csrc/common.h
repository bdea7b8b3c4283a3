// Shared helpers for mmkernels CUDA sources: argument checks that raise Python exceptions with clear messages,
// dtype dispatch limited to what we instantiate, and small device utilities.
#pragma once

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a bare toolkit may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"  // to_float, from_float, round_to, Vec

#define MMK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "mmkernels._C: ", __VA_ARGS__)

namespace mmk {

inline void check_cuda(const at::Tensor& t, const char* name) {
  MMK_CHECK(t.is_cuda(), "argument '", name, "' must be a CUDA tensor, got device ", t.device(),
            " (the cuda backend runs only on GPU tensors; use the torch backend on CPU)");
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  MMK_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "argument '", name,
            "' must be float32, float16 or bfloat16, got ", s);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  MMK_CHECK(a.device() == b.device(), "arguments '", an, "' (", a.device(), ") and '", bn, "' (", b.device(),
            ") must be on the same device");
}

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

inline int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Map at::ScalarType to the device element type.
template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

}  // namespace mmk

// Dispatch over float / half / bfloat16 only: the dtypes every kernel instantiates.
#define MMK_DISPATCH_FLOAT(stype, NAME, ...)                                                         \
  [&] {                                                                                              \
    switch (stype) {                                                                                 \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                             \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                             \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }                  \
      default: MMK_CHECK(false, NAME, ": unsupported dtype ", stype);                                \
    }                                                                                                \
  }()
