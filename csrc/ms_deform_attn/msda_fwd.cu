// Multi-scale deformable attention forward (semantics: mmkernels/ops/ms_deform_attn/reference.py; layouts and the
// thread mapping: msda.h).
//
//   out[b, q, h*C + c] = sum_{l, p} attn[b,q,h,l,p] * sum_{k in-range corners} w_k * value[b, start_l + pix_k, h, c]
//
// A group of G lanes owns one (b, q, h) and one chunk of its channels; each lane accumulates its VEC channels in
// fp32 over the L*P samples and writes them once. Per sample every lane of the group reads the same loc/attn
// (one broadcast transaction per group) and computes the footprint itself: a few dozen ALU operations, against the
// four VEC-wide gathers it then issues. Consecutive groups take consecutive heads, then queries: the heads of one
// query sit side by side in value's rows, and consecutive queries sample neighbouring pixels, so a block's gathers
// reuse L1/L2 lines. Each corner read is one 16-byte load per lane and a group reads C contiguous elements (whole
// 32-byte sectors for C * sizeof(T) % 32 == 0). No shuffles, no shared memory beyond the level table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ms_deform_attn/msda.h"
#include "ms_deform_attn/sample.cuh"

namespace mmk {
namespace msda {
namespace {

using detail::Footprint;

template <typename T, typename TC, int VEC>
__global__ void __launch_bounds__(kThreads) msda_fwd_kernel(const Params p) {
  extern __shared__ int lv[];
  detail::load_levels(p, lv);
  const T* __restrict__ value = static_cast<const T*>(p.value);
  const TC* __restrict__ loc = static_cast<const TC*>(p.loc);
  const TC* __restrict__ attn = static_cast<const TC*>(p.attn);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int G = p.G;
  const int lane = threadIdx.x & (G - 1);
  const int groups = blockDim.x / G;
  const int LP = p.L * p.P;
  const int64_t HC = static_cast<int64_t>(p.H) * p.C;
  const int QH = static_cast<int>(p.Q) * p.H;  // items of one batch; QH * nch < 2**30 (host)
  const int work = QH * p.nch;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    // int: work < 2**30 (host) and the stride is under 2**30 (grid_for), so w + stride cannot overflow.
    for (int w = blockIdx.x * groups + threadIdx.x / G; w < work; w += gridDim.x * groups) {
      const int qh = w / p.nch;
      const int cv = (w - qh * p.nch) * G + lane;  // this lane's channel vector
      if (cv >= p.nvec) continue;
      const int h = qh % p.H;
      const int64_t n = b * QH + qh;  // (b*Q + q)*H + h
      const T* vb = value + (b * p.S * p.H + h) * p.C + static_cast<int64_t>(cv) * VEC;
      const TC* ln = loc + n * LP * 2;
      const TC* an = attn + n * LP;
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
      for (int l = 0; l < p.L; ++l) {
        const int Hl = lv[3 * l], Wl = lv[3 * l + 1];
        const T* vl = vb + static_cast<int64_t>(lv[3 * l + 2]) * HC;
        for (int pt = 0; pt < p.P; ++pt) {
          const int i = l * p.P + pt;
          Footprint f;
          const float lx = to_float(ln[2 * i]), ly = to_float(ln[2 * i + 1]);
          const float a = to_float(an[i]);
          if (!detail::footprint(lx, ly, Hl, Wl, f)) {
            float zx, zy;  // 0, or NaN for a non-finite location or weight (sample.cuh)
            detail::outside_terms(lx, ly, Hl, Wl, zx, zy);
            const float z = a * (zx * zy);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += z;
            continue;
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!f.ok[k]) continue;
            float v[VEC];
            detail::load_vec<T, VEC>(vl + static_cast<int64_t>(f.pix[k]) * HC, v);
            const float aw = a * f.w[k];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = fmaf(aw, v[e], acc[e]);
          }
        }
      }
      detail::store_vec<T, VEC>(out + n * p.C + static_cast<int64_t>(cv) * VEC, acc);
    }
  }
}

}  // namespace

template <typename T, typename TC>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return launch_on(p.vec == kVec ? msda_fwd_kernel<T, TC, kVec> : msda_fwd_kernel<T, TC, 1>, p.Q * p.H * p.nch, p,
                   stream);
}

template cudaError_t launch_forward<float, float>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__half, __half>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__half, float>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16, __nv_bfloat16>(const Params&, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16, float>(const Params&, cudaStream_t);

}  // namespace msda
}  // namespace mmk
