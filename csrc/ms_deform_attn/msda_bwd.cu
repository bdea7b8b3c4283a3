// Multi-scale deformable attention backward (semantics: mmkernels/ops/ms_deform_attn/reference.py; layouts and the
// thread mapping: msda.h). With g = grad_out[b, q, h*C : h*C + C], per sample (b, q, h, l, p) and in-range corner k:
//
//   grad_value[b, start_l + pix_k, h, :] += attn * w_k * g
//   grad_attn  = sum_c g_c * sum_k w_k   * v_k,c
//   grad_loc_x = W_l * attn * sum_c g_c * sum_k dw_k/dx * v_k,c        (likewise y with H_l and dw_k/dy)
//
// msda_bwd_kernel: a group of G lanes owns one (b, q, h); each lane holds g for its VEC channels (in registers when
// one chunk covers C), gathers the corners like the forward, and sums its channels' share of the three reductions;
// the group then adds its lanes by a fixed xor butterfly (group_sum) and lane 0 writes grad_attn and grad_loc:
// every element is written exactly once, in a fixed order, so these two are deterministic in both modes.
// The value gradient in the atomic mode is fp32 atomics (RED, no return) into a zeroed fp32 buffer. The
// reduction across lanes happens before the atomics by construction: lanes own channels, so the G lanes of a
// group add C distinct consecutive floats of one corner row (coalesced, no two lanes of a warp on one address),
// and on sm_90 each lane adds its channels four at a time with a 16-byte vector atomic, which cuts the L2 atomic
// operations by 4x over scalar ones. Collisions left are between different queries touching the same pixel,
// which only the L2 can order.
//
// msda_value_gather_kernel (deterministic mode): a group owns one value row r = (b*S + s)*H + h and sums, in the
// plan's ascending order, attn * w * g over its entries. Lane j of the group decodes entry i0 + j (its weight from
// the destination pixel, not from floor(), and the offset of its grad_out row), the group broadcasts them one at
// a time with shuffles, and every lane adds its channels: decoding is shared, the g gathers are VEC wide.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ms_deform_attn/msda.h"
#include "ms_deform_attn/sample.cuh"

namespace mmk {
namespace msda {
namespace {

using detail::Footprint;

template <typename T, typename TC, int VEC>
__global__ void __launch_bounds__(kThreads) msda_bwd_kernel(const Params p) {
  extern __shared__ int lv[];
  detail::load_levels(p, lv);
  const T* __restrict__ value = static_cast<const T*>(p.value);
  const TC* __restrict__ loc = static_cast<const TC*>(p.loc);
  const TC* __restrict__ attn = static_cast<const TC*>(p.attn);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  float* __restrict__ gv = p.grad_value_f32;
  TC* __restrict__ grad_loc = static_cast<TC*>(p.grad_loc);
  TC* __restrict__ grad_attn = static_cast<TC*>(p.grad_attn);

  const int G = p.G;
  const int lane = threadIdx.x & (G - 1);
  const int groups = blockDim.x / G;
  const int LP = p.L * p.P;
  const int64_t HC = static_cast<int64_t>(p.H) * p.C;
  const int QH = static_cast<int>(p.Q) * p.H;  // items of one batch (< 2**30: host)
  const bool one_chunk = p.nch == 1;
  // The loop bounds are the same for every lane of the block (b and base are block-uniform; L, P, nch uniform),
  // so every lane reaches each full-warp shuffle of group_sum; lanes without an item (qh >= QH) or a channel
  // vector (cv >= nvec) contribute zeros.
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    // int: QH < 2**30 (host) and the stride is under 2**30 (grid_for), so base + stride cannot overflow.
    for (int base = blockIdx.x * groups; base < QH; base += gridDim.x * groups) {
      const bool valid = base + static_cast<int>(threadIdx.x) / G < QH;
      const int qh = valid ? base + static_cast<int>(threadIdx.x) / G : 0;
      const int h = qh % p.H;
      const int64_t n = b * QH + qh;  // (b*Q + q)*H + h
      const T* vb = value + (b * p.S * p.H + h) * p.C;
      const T* gb = grad_out + n * p.C;
      float* gvb = gv != nullptr ? gv + (b * p.S * p.H + h) * p.C : nullptr;
      const TC* ln = loc + n * LP * 2;
      const TC* an = attn + n * LP;
      float g1[VEC];  // g of this lane's vector when one chunk covers C
#pragma unroll
      for (int e = 0; e < VEC; ++e) g1[e] = 0.f;
      if (valid && one_chunk && lane < p.nvec) detail::load_vec<T, VEC>(gb + static_cast<int64_t>(lane) * VEC, g1);

      for (int l = 0; l < p.L; ++l) {
        const int Hl = lv[3 * l], Wl = lv[3 * l + 1];
        const int64_t row0 = static_cast<int64_t>(lv[3 * l + 2]);
        for (int pt = 0; pt < p.P; ++pt) {
          const int i = l * p.P + pt;
          Footprint f;
          float a = 0.f;
          bool in = false;
          float zx = 0.f, zy = 0.f;  // a sample outside the map: 0, or NaN for a non-finite location (sample.cuh)
          if (valid) {
            const float lx = to_float(ln[2 * i]), ly = to_float(ln[2 * i + 1]);
            in = detail::footprint(lx, ly, Hl, Wl, f);
            a = to_float(an[i]);
            if (!in) detail::outside_terms(lx, ly, Hl, Wl, zx, zy);
          }
          // Every lane of the group carries the outside terms; group_sum keeps 0 at 0 and NaN at NaN.
          float ga = zx * zy, gx = zy, gy = zx;
          if (in) {
            for (int ch = 0; ch < p.nch; ++ch) {
              const int cv = ch * G + lane;
              if (cv >= p.nvec) break;
              const int64_t coff = static_cast<int64_t>(cv) * VEC;
              float g[VEC];
              if (one_chunk) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) g[e] = g1[e];
              } else {
                detail::load_vec<T, VEC>(gb + coff, g);
              }
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                if (!f.ok[k]) continue;
                const int64_t pix = (row0 + f.pix[k]) * HC + coff;
                float v[VEC];
                detail::load_vec<T, VEC>(vb + pix, v);
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) dot = fmaf(g[e], v[e], dot);
                ga = fmaf(f.w[k], dot, ga);
                gx = fmaf(f.dwx[k], dot, gx);
                gy = fmaf(f.dwy[k], dot, gy);
                if (gvb != nullptr) {
                  const float aw = a * f.w[k];
                  float add[VEC];
#pragma unroll
                  for (int e = 0; e < VEC; ++e) add[e] = aw * g[e];
                  detail::atomic_add_vec<VEC>(gvb + pix, add);
                }
              }
            }
          }
          ga = detail::group_sum(ga, G);
          gx = detail::group_sum(gx, G);
          gy = detail::group_sum(gy, G);
          if (valid && lane == 0) {
            // Samples with no corner in the map get exact zeros (NaN for a non-finite location; times a, also for a
            // non-finite weight), as the reference.
            const int64_t s = n * LP + i;
            grad_attn[s] = from_float<TC>(ga);
            grad_loc[2 * s] = from_float<TC>(static_cast<float>(Wl) * a * gx);
            grad_loc[2 * s + 1] = from_float<TC>(static_cast<float>(Hl) * a * gy);
          }
        }
      }
    }
  }
}

// The level holding row s: the largest l with start_l <= s (levels are in ascending start order; an empty level
// shares its start with the next one, and the largest such l is the non-empty level that holds s).
__device__ __forceinline__ int level_of(const int* lv, int L, int s) {
  int lo = 0, hi = L - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (lv[3 * mid + 2] <= s) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, typename TC, int VEC>
__global__ void __launch_bounds__(kThreads) msda_value_gather_kernel(const Params p) {
  extern __shared__ int lv[];
  detail::load_levels(p, lv);
  const TC* __restrict__ loc = static_cast<const TC*>(p.loc);
  const TC* __restrict__ attn = static_cast<const TC*>(p.attn);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  const int64_t* __restrict__ entries = p.entries;
  const int64_t* __restrict__ offsets = p.offsets;
  T* __restrict__ grad_value = static_cast<T*>(p.grad_value);

  const int G = p.G;
  const int lane = threadIdx.x & (G - 1);
  const int groups = blockDim.x / G;
  // The group's lanes: its loops are uniform inside the group only (rows have different entry counts), so its
  // shuffles name exactly its own lanes.
  const unsigned mask = G == 32 ? detail::kFullMask : ((1u << G) - 1u) << ((threadIdx.x & 31) & ~(G - 1));
  const int LP = p.L * p.P;
  const int SH = static_cast<int>(p.S) * p.H;                   // rows of one batch (< 2**30: host)
  const int64_t samples = static_cast<int64_t>(p.Q) * p.H * LP;  // samples of one batch (< 2**30: host)
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const int64_t e_base = b * samples;
    const int64_t n_base = b * p.Q * p.H;
    // int: SH < 2**30 (host) and the stride is under 2**30 (grid_for), so sh + stride cannot overflow.
    for (int sh = blockIdx.x * groups + threadIdx.x / G; sh < SH; sh += gridDim.x * groups) {
      const int64_t r = b * SH + sh;  // (b*S + s)*H + h
      const int s = sh / p.H;
      const int l = level_of(lv, p.L, s);
      const int Hl = lv[3 * l], Wl = lv[3 * l + 1];
      const int rel = s - lv[3 * l + 2];
      const int yc = rel / Wl, xc = rel - yc * Wl;
      const float xcf = static_cast<float>(xc), ycf = static_cast<float>(yc);
      const int64_t beg = offsets[r], end = offsets[r + 1];
      for (int ch = 0; ch < p.nch; ++ch) {
        const int cv = ch * G + lane;
        const int64_t coff = static_cast<int64_t>(cv) * VEC;
        float acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
        for (int64_t i0 = beg; i0 < end; i0 += G) {
          // Lane j decodes entry i0 + j: its coefficient attn * w and the offset of its grad_out row (b, q, h).
          float coef = 0.f;
          long long goff = 0;
          if (i0 + lane < end) {
            const int64_t e = entries[i0 + lane];
            const float x = detail::pixel_coord(to_float(loc[2 * e]), Wl);
            const float y = detail::pixel_coord(to_float(loc[2 * e + 1]), Hl);
            const float wx = fmaxf(0.f, 1.f - fabsf(x - xcf));
            const float wy = fmaxf(0.f, 1.f - fabsf(y - ycf));
            coef = to_float(attn[e]) * (wy * wx);
            // The entry's (q, h) inside batch b (every entry of row r is from batch b): e = (n*L + l)*P + p.
            const int local = static_cast<int>(e - e_base);
            goff = static_cast<long long>((n_base + local / LP) * p.C);
          }
          const int cnt = static_cast<int>(end - i0 < G ? end - i0 : G);
          for (int k = 0; k < cnt; ++k) {
            const float ck = __shfl_sync(mask, coef, k, G);
            const long long gk = __shfl_sync(mask, goff, k, G);
            if (cv < p.nvec) {
              float g[VEC];
              detail::load_vec<T, VEC>(grad_out + gk + coff, g);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[e] = fmaf(ck, g[e], acc[e]);
            }
          }
        }
        if (cv < p.nvec) detail::store_vec<T, VEC>(grad_value + r * p.C + coff, acc);
      }
    }
  }
}

}  // namespace

template <typename T, typename TC>
cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return launch_on(p.vec == kVec ? msda_bwd_kernel<T, TC, kVec> : msda_bwd_kernel<T, TC, 1>, p.Q * p.H, p, stream);
}

template <typename T, typename TC>
cudaError_t launch_value_grad_gather(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return launch_on(p.vec == kVec ? msda_value_gather_kernel<T, TC, kVec> : msda_value_gather_kernel<T, TC, 1>,
                   p.S * p.H, p, stream);
}

#define MMK_MSDA_INSTANTIATE(T, TC)                                                   \
  template cudaError_t launch_backward<T, TC>(const Params&, cudaStream_t);           \
  template cudaError_t launch_value_grad_gather<T, TC>(const Params&, cudaStream_t);
MMK_MSDA_INSTANTIATE(float, float)
MMK_MSDA_INSTANTIATE(__half, __half)
MMK_MSDA_INSTANTIATE(__half, float)
MMK_MSDA_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
MMK_MSDA_INSTANTIATE(__nv_bfloat16, float)
#undef MMK_MSDA_INSTANTIATE

}  // namespace msda
}  // namespace mmk
