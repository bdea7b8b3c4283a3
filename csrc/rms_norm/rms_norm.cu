// RMSNorm over the last dim of a 2-D view x[M, N] (unit column stride, any row stride).
//
//   rstd = rsqrt(mean(x^2) + eps)                      (fp32)
//   y    = T(T(x * rstd) * T(w))                        (apex rounding: normalized value rounded before the weight)
//   dx   = rstd * (g - xhat * mean(g * xhat)),  g = dy * w,  xhat = x * rstd      (fp32, one rounding at the end)
//   dw   = sum_rows dy * xhat                           (per-group fp32 partials, summed by the caller)
//
// Work split: a group of G = 2^k threads owns one row at a time; G <= 32 reduces with sub-warp shuffles, G > 32 is a
// whole block (blockDim == G) reducing through shared memory. Each thread holds NV vectors of VEC elements (16-byte
// loads) in registers, so x is read from DRAM once; those kernels use groups of at most kResidentThreads threads
// and are compiled with that launch bound (they need more than 64 registers, which a 1024-thread block cannot
// have). NV == 0 is the streaming variant for rows too wide for registers: 512 threads, x read twice. The row loop
// steps by a block-uniform base so that every thread runs the same number of iterations: full-mask shuffles and
// __syncthreads are then safe when M is not a multiple of the number of groups.
#include "common.h"

#include <algorithm>

namespace mmk {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kResidentThreads = 256;   // max group (= block) size of the register-resident kernels
constexpr int kStreamingThreads = 512;  // block size of the streaming kernels (1024 would cap registers at 64 and spill)
constexpr int kFwdMaxNV = 8;            // vectors per thread held in registers, forward
constexpr int kBwdMaxNV = 4;            // backward holds x and dy (NV = 8 spilled on sm_90a)

template <int NV>
constexpr int max_threads() { return NV > 0 ? kResidentThreads : kStreamingThreads; }

// Sum of v over the G threads of a group. Requires every thread of the block to call it (see the loop shape).
__device__ __forceinline__ float group_sum(float v, int G, float* smem) {
  const int width = G < 32 ? G : 32;
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  if (G <= 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = lane < (G >> 5) ? smem[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(kFullMask, t, o);
  return t;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> normalize(const Vec<T, VEC>& xv, const Vec<T, VEC>& wv, bool has_w, float r) {
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float yn = to_float(xv.v[j]) * r;
    out.v[j] = has_w ? from_float<T>(round_to<T>(yn) * to_float(wv.v[j])) : from_float<T>(yn);
  }
  return out;
}

template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(max_threads<NV>())
    rms_norm_fwd_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, T* __restrict__ y,
                        float* __restrict__ rstd, int64_t M, int N, float eps, int g_log2) {
  extern __shared__ float smem[];
  const int G = 1 << g_log2;
  const int lane = threadIdx.x & (G - 1);
  const int group = threadIdx.x >> g_log2;
  const int groups = blockDim.x >> g_log2;
  const int nvec = N / VEC;
  const bool has_w = w != nullptr;
  const float inv_n = 1.f / static_cast<float>(N);

  Vec<T, VEC> wbuf[NV > 0 ? NV : 1];
  if constexpr (NV > 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int v = lane + k * G;
      if (has_w && v < nvec) wbuf[k] = load_vec<T, VEC>(w + v * VEC);
    }
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < M;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = base + group;
    const bool valid = row < M;
    const T* xr = x + (valid ? row : 0) * sx;
    T* yr = y + (valid ? row : 0) * static_cast<int64_t>(N);
    float ss = 0.f;
    if constexpr (NV > 0) {
      Vec<T, VEC> buf[NV];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = lane + k * G;
        if (valid && v < nvec) {
          buf[k] = load_vec<T, VEC>(xr + v * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float f = to_float(buf[k].v[j]);
            ss += f * f;
          }
        }
      }
      const float r = rsqrtf(group_sum(ss, G, smem) * inv_n + eps);
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = lane + k * G;
        if (valid && v < nvec) store_vec<T, VEC>(yr + v * VEC, normalize<T, VEC>(buf[k], wbuf[k], has_w, r));
      }
      if (valid && lane == 0) rstd[row] = r;
    } else {
      for (int v = lane; v < nvec; v += G) {
        if (!valid) break;
        const Vec<T, VEC> xv = load_vec<T, VEC>(xr + v * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float f = to_float(xv.v[j]);
          ss += f * f;
        }
      }
      const float r = rsqrtf(group_sum(ss, G, smem) * inv_n + eps);
      for (int v = lane; v < nvec; v += G) {
        if (!valid) break;
        Vec<T, VEC> wv;
        if (has_w) wv = load_vec<T, VEC>(w + v * VEC);
        store_vec<T, VEC>(yr + v * VEC, normalize<T, VEC>(load_vec<T, VEC>(xr + v * VEC), wv, has_w, r));
      }
      if (valid && lane == 0) rstd[row] = r;
    }
  }
}

// One row's contribution for the VEC columns of a vector: returns sum_j g_j * xhat_j.
template <typename T, int VEC>
__device__ __forceinline__ float row_dot(const Vec<T, VEC>& dyv, const Vec<T, VEC>& xv, const Vec<T, VEC>& wv,
                                         bool has_w, float r) {
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float g = has_w ? to_float(dyv.v[j]) * to_float(wv.v[j]) : to_float(dyv.v[j]);
    acc += g * to_float(xv.v[j]) * r;
  }
  return acc;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> grad_x(const Vec<T, VEC>& dyv, const Vec<T, VEC>& xv, const Vec<T, VEC>& wv,
                                              bool has_w, float r, float c) {
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float g = has_w ? to_float(dyv.v[j]) * to_float(wv.v[j]) : to_float(dyv.v[j]);
    out.v[j] = from_float<T>(r * (g - to_float(xv.v[j]) * r * c));
  }
  return out;
}

template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(max_threads<NV>())
    rms_norm_bwd_kernel(const T* __restrict__ dy, int64_t sdy, const T* __restrict__ x, int64_t sx,
                        const T* __restrict__ w, const float* __restrict__ rstd, T* __restrict__ dx,
                        float* __restrict__ dwp, int64_t M, int N, int g_log2) {
  extern __shared__ float smem[];
  const int G = 1 << g_log2;
  const int lane = threadIdx.x & (G - 1);
  const int group = threadIdx.x >> g_log2;
  const int groups = blockDim.x >> g_log2;
  const int nvec = N / VEC;
  const bool has_w = w != nullptr;
  const float inv_n = 1.f / static_cast<float>(N);
  // This group's row of dw partial sums; every group owns one, so there are no races.
  float* dw_row = has_w ? dwp + (static_cast<int64_t>(blockIdx.x) * groups + group) * N : nullptr;

  Vec<T, VEC> wbuf[NV > 0 ? NV : 1];
  float dwacc[NV > 0 ? NV : 1][VEC];
  if constexpr (NV > 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int v = lane + k * G;
      if (has_w && v < nvec) wbuf[k] = load_vec<T, VEC>(w + v * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dwacc[k][j] = 0.f;
    }
  } else if (has_w) {
    // Zero exactly the columns this thread accumulates below (same vector mapping), so no other thread races.
    for (int v = lane; v < nvec; v += G) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dw_row[v * VEC + j] = 0.f;
    }
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < M;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = base + group;
    const bool valid = row < M;
    const int64_t rr = valid ? row : 0;
    const T* dyr = dy + rr * sdy;
    const T* xr = x + rr * sx;
    T* dxr = dx + rr * static_cast<int64_t>(N);
    const float r = valid ? rstd[rr] : 0.f;
    float dot = 0.f;
    if constexpr (NV > 0) {
      Vec<T, VEC> xb[NV], db[NV];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = lane + k * G;
        if (valid && v < nvec) {
          xb[k] = load_vec<T, VEC>(xr + v * VEC);
          db[k] = load_vec<T, VEC>(dyr + v * VEC);
          dot += row_dot<T, VEC>(db[k], xb[k], wbuf[k], has_w, r);
        }
      }
      const float c = group_sum(dot, G, smem) * inv_n;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = lane + k * G;
        if (valid && v < nvec) {
          store_vec<T, VEC>(dxr + v * VEC, grad_x<T, VEC>(db[k], xb[k], wbuf[k], has_w, r, c));
          if (has_w) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) dwacc[k][j] += to_float(db[k].v[j]) * to_float(xb[k].v[j]) * r;
          }
        }
      }
    } else {
      for (int v = lane; v < nvec; v += G) {
        if (!valid) break;
        Vec<T, VEC> wv;
        if (has_w) wv = load_vec<T, VEC>(w + v * VEC);
        dot += row_dot<T, VEC>(load_vec<T, VEC>(dyr + v * VEC), load_vec<T, VEC>(xr + v * VEC), wv, has_w, r);
      }
      const float c = group_sum(dot, G, smem) * inv_n;
      for (int v = lane; v < nvec; v += G) {
        if (!valid) break;
        Vec<T, VEC> wv;
        if (has_w) wv = load_vec<T, VEC>(w + v * VEC);
        const Vec<T, VEC> xv = load_vec<T, VEC>(xr + v * VEC);
        const Vec<T, VEC> dv = load_vec<T, VEC>(dyr + v * VEC);
        store_vec<T, VEC>(dxr + v * VEC, grad_x<T, VEC>(dv, xv, wv, has_w, r, c));
        if (has_w) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) dw_row[v * VEC + j] += to_float(dv.v[j]) * to_float(xv.v[j]) * r;
        }
      }
    }
  }

  if constexpr (NV > 0) {
    if (has_w) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = lane + k * G;
        if (v < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) dw_row[v * VEC + j] = dwacc[k][j];
        }
      }
    }
  }
}

// Launch shape for a row of nvec vectors: G threads per row, NV vectors per thread held in registers (0: streaming).
struct Shape {
  int g_log2;
  int nv;
  int block;
};

inline int ceil_log2(int64_t v) {
  int k = 0;
  while ((int64_t{1} << k) < v) ++k;
  return k;
}

// target_nv: how many vectors a thread should hold (fewer => wider groups => fewer dw partial rows in backward);
// max_nv: the most a thread may hold in registers. Rows that do not fit kResidentThreads * max_nv vectors stream.
inline Shape pick_shape(int64_t nvec, int target_nv, int max_nv) {
  const int64_t want = std::max<int64_t>(1, (nvec + target_nv - 1) / target_nv);
  const int g_log2 = std::min(ceil_log2(kResidentThreads), ceil_log2(want));
  const int64_t G = int64_t{1} << g_log2;
  const int64_t per = (nvec + G - 1) / G;
  if (per > max_nv) return {ceil_log2(kStreamingThreads), 0, kStreamingThreads};
  const int nv = per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 8;
  return {g_log2, nv, G > 32 ? static_cast<int>(G) : 128};
}

// Instantiates NV in {0, 1, 2, 4} and, when MAX_NV allows, 8.
template <int MAX_NV, typename F>
void dispatch_nv(int nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8:
      if constexpr (MAX_NV >= 8) f(std::integral_constant<int, 8>{});
      else MMK_CHECK(false, "rms_norm: internal error, NV=8 above this kernel's limit");
      break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

void check_2d(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  check_float(t, name);
  MMK_CHECK(t.dim() == 2, "argument '", name, "' must be a 2-D [M, N] view, got shape ", t.sizes());
  MMK_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "argument '", name, "' must have unit column stride, got strides ",
            t.strides());
  MMK_CHECK(t.size(1) < (int64_t{1} << 31), "argument '", name, "' rows are too wide: ", t.size(1));
}

}  // namespace

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  check_2d(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  if (weight.has_value()) {
    check_cuda(*weight, "weight");
    check_same_device(x, "x", *weight, "weight");
    MMK_CHECK(weight->scalar_type() == x.scalar_type(), "argument 'weight' must have x's dtype ", x.scalar_type(),
              ", got ", weight->scalar_type());
    MMK_CHECK(weight->dim() == 1 && weight->size(0) == N && weight->is_contiguous(),
              "argument 'weight' must be a contiguous [", N, "] tensor, got shape ", weight->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, N}, x.options());
  auto rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {y, rstd};

  MMK_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_fwd", [&] {
    using T = scalar_t;
    constexpr int VMAX = 16 / sizeof(T);
    const T* wp = weight.has_value() ? reinterpret_cast<const T*>(weight->data_ptr()) : nullptr;
    const bool vec_ok = N % VMAX == 0 && x.stride(0) % VMAX == 0 && aligned(x.data_ptr(), 16) &&
                        (wp == nullptr || aligned(wp, 16));
    auto launch = [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const Shape s = pick_shape(N / VEC, 4, kFwdMaxNV);
      const int groups = s.block >> s.g_log2;
      const int64_t blocks = std::min<int64_t>((M + groups - 1) / groups, int64_t{sm_count(x.get_device())} * 64);
      dispatch_nv<kFwdMaxNV>(s.nv, [&](auto nv_c) {
        constexpr int NV = decltype(nv_c)::value;
        rms_norm_fwd_kernel<T, VEC, NV><<<blocks, s.block, (s.block / 32) * sizeof(float),
                                          current_stream()>>>(
            reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), wp, reinterpret_cast<T*>(y.data_ptr()),
            rstd.data_ptr<float>(), M, static_cast<int>(N), static_cast<float>(eps), s.g_log2);
      });
    };
    if (vec_ok) launch(std::integral_constant<int, VMAX>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  check_2d(dy, "dy");
  check_2d(x, "x");
  check_same_device(x, "x", dy, "dy");
  MMK_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "argument 'dy' must match x (",
            x.sizes(), ", ", x.scalar_type(), "), got ", dy.sizes(), ", ", dy.scalar_type());
  const int64_t M = x.size(0), N = x.size(1);
  check_cuda(rstd, "rstd");
  check_same_device(x, "x", rstd, "rstd");
  MMK_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == M && rstd.is_contiguous(),
            "argument 'rstd' must be a contiguous float32 [", M, "] tensor");
  if (weight.has_value()) {
    check_cuda(*weight, "weight");
    check_same_device(x, "x", *weight, "weight");
    MMK_CHECK(weight->scalar_type() == x.scalar_type() && weight->dim() == 1 && weight->size(0) == N &&
                  weight->is_contiguous(),
              "argument 'weight' must be a contiguous [", N, "] tensor of x's dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) {
    auto dwp = at::zeros({weight.has_value() ? 1 : 0, N}, x.options().dtype(at::kFloat));
    return {dx, dwp};
  }

  at::Tensor dwp;
  MMK_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_bwd", [&] {
    using T = scalar_t;
    constexpr int VMAX = 16 / sizeof(T);
    const T* wp = weight.has_value() ? reinterpret_cast<const T*>(weight->data_ptr()) : nullptr;
    const bool vec_ok = N % VMAX == 0 && x.stride(0) % VMAX == 0 && dy.stride(0) % VMAX == 0 &&
                        aligned(x.data_ptr(), 16) && aligned(dy.data_ptr(), 16) && (wp == nullptr || aligned(wp, 16));
    auto launch = [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      // Wide groups (2 vectors per thread) keep the number of dw partial rows, and their traffic, small.
      const Shape s = pick_shape(N / VEC, 2, kBwdMaxNV);
      const int groups = s.block >> s.g_log2;
      const int sms = sm_count(x.get_device());
      int64_t blocks = std::min<int64_t>((M + groups - 1) / groups, int64_t{sms} * std::max(1, 1024 / s.block));
      if (wp) {  // cap the [blocks * groups, N] fp32 partials near 8 MiB, keeping at least 2 blocks per SM
        const int64_t cap = std::max<int64_t>(2 * sms, (int64_t{1} << 21) / (groups * N));
        blocks = std::max<int64_t>(1, std::min(blocks, cap));
      }
      dwp = at::empty({wp ? blocks * groups : 0, N}, x.options().dtype(at::kFloat));
      dispatch_nv<kBwdMaxNV>(s.nv, [&](auto nv_c) {
        constexpr int NV = decltype(nv_c)::value;
        rms_norm_bwd_kernel<T, VEC, NV><<<blocks, s.block, (s.block / 32) * sizeof(float),
                                          current_stream()>>>(
            reinterpret_cast<const T*>(dy.data_ptr()), dy.stride(0), reinterpret_cast<const T*>(x.data_ptr()),
            x.stride(0), wp, rstd.data_ptr<float>(), reinterpret_cast<T*>(dx.data_ptr()),
            wp ? dwp.data_ptr<float>() : nullptr, M, static_cast<int>(N), s.g_log2);
      });
    };
    if (vec_ok) launch(std::integral_constant<int, VMAX>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dwp};
}

}  // namespace mmk
