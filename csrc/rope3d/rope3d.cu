// 3D rotate-half RoPE (LaVin-DiT's RotaryEmbedding3D) of x[B, L, H, D] -> y[B, L, H, D] (contiguous).
//
// The head dim is split into chunks (d_t, d_h, d_w); inside a chunk of size d, element i pairs with i + d/2 at
// frequency inv_freq_i and angle theta = coord * inv_freq_i, where token n of the (T, Hg, Wg) grid has coords
// (n / (Hg*Wg) + o_t, (n / Wg) % Hg + o_h, n % Wg + o_w). With c = cos(theta), s = sin(theta):
//   y_lo = x_lo * c - x_hi * s,   y_hi = x_hi * c + x_lo * s       (inverse: s -> -s, the exact backward)
// inv_freq arrives as a [D/2] fp32 table in pair order (t pairs, h pairs, w pairs), computed once per
// (split, base, device) on the Python side exactly as the official code does (1 / base^(2i/d)).
//
// cos/sin depend only on (token, pair), not on batch or head, so a block takes a tile of tokens, computes their
// angles once into shared memory (accurate sincosf: angles reach hundreds of radians), then streams every
// (batch, head) vector of those tokens through them. Loads move VEC consecutive pairs of one half-chunk at once.
#include "common.h"

#include <algorithm>

namespace mmk {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSmemPairs = 4096;  // tokens_per_block * (D/2) cos/sin pairs in shared memory (32 KiB)

struct RopeGeom {
  int64_t sb, sl, sh;  // x strides in elements (unit last stride)
  int B, L, H, D;
  int grid_h, grid_w;  // Hg, Wg; T is implied by L
  int off_t, off_h, off_w;
  int pairs_t, pairs_h;  // d_t/2, d_h/2 (d_w/2 is the rest)
  float sign;  // +1 forward, -1 inverse
};

template <typename T, int VEC>
__global__ void rope3d_kernel(const T* __restrict__ x, const float* __restrict__ inv_freq, T* __restrict__ y,
                              RopeGeom g, int tokens_per_block) {
  extern __shared__ __align__(32) float smem[];
  const int P = g.D / 2;
  float* cs = smem;
  float* sn = smem + tokens_per_block * P;
  const int64_t l0 = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int ntok = static_cast<int>(std::min<int64_t>(tokens_per_block, g.L - l0));

  for (int idx = threadIdx.x; idx < ntok * P; idx += blockDim.x) {
    const int tl = idx / P, p = idx - tl * P;
    const int64_t n = l0 + tl;
    const int64_t hw = static_cast<int64_t>(g.grid_h) * g.grid_w;
    int coord;
    if (p < g.pairs_t) {
      coord = static_cast<int>(n / hw) + g.off_t;
    } else if (p < g.pairs_t + g.pairs_h) {
      coord = static_cast<int>((n / g.grid_w) % g.grid_h) + g.off_h;
    } else {
      coord = static_cast<int>(n % g.grid_w) + g.off_w;
    }
    float s, c;
    sincosf(static_cast<float>(coord) * inv_freq[p], &s, &c);  // theta rounded to fp32 first, as the reference
    cs[idx] = c;
    sn[idx] = g.sign * s;
  }
  __syncthreads();

  const int PV = P / VEC;  // vector slots per head
  const int BH = g.B * g.H;
  const int items = ntok * BH * PV;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int pv = it % PV;
    const int rest = it / PV;
    const int bh = rest % BH;
    const int tl = rest / BH;
    const int b = bh / g.H, h = bh - b * g.H;
    const int p0 = pv * VEC;
    int chunk_base, half, i0;
    if (p0 < g.pairs_t) {
      chunk_base = 0; half = g.pairs_t; i0 = p0;
    } else if (p0 < g.pairs_t + g.pairs_h) {
      chunk_base = 2 * g.pairs_t; half = g.pairs_h; i0 = p0 - g.pairs_t;
    } else {
      chunk_base = 2 * (g.pairs_t + g.pairs_h); half = P - g.pairs_t - g.pairs_h; i0 = p0 - g.pairs_t - g.pairs_h;
    }
    const int lo = chunk_base + i0, hi = lo + half;
    const int64_t l = l0 + tl;
    const T* xp = x + b * g.sb + l * g.sl + h * g.sh;
    T* yp = y + ((static_cast<int64_t>(b) * g.L + l) * g.H + h) * g.D;
    const Vec<T, VEC> xl = *reinterpret_cast<const Vec<T, VEC>*>(xp + lo);
    const Vec<T, VEC> xh = *reinterpret_cast<const Vec<T, VEC>*>(xp + hi);
    // Vector reads of the angles: VEC divides P and p0, so these are aligned, and lanes do not bank-conflict.
    const Vec<float, VEC> cv = *reinterpret_cast<const Vec<float, VEC>*>(cs + tl * P + p0);
    const Vec<float, VEC> sv = *reinterpret_cast<const Vec<float, VEC>*>(sn + tl * P + p0);
    Vec<T, VEC> yl, yh;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float c = cv.v[j], s = sv.v[j];
      const float a = to_float(xl.v[j]), bb = to_float(xh.v[j]);
      yl.v[j] = from_float<T>(a * c - bb * s);
      yh.v[j] = from_float<T>(bb * c + a * s);
    }
    *reinterpret_cast<Vec<T, VEC>*>(yp + lo) = yl;
    *reinterpret_cast<Vec<T, VEC>*>(yp + hi) = yh;
  }
}

int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

}  // namespace

at::Tensor rope3d(const at::Tensor& x, const at::Tensor& inv_freq, std::vector<int64_t> grid,
                  std::vector<int64_t> split, std::vector<int64_t> offsets, bool inverse) {
  check_cuda(x, "x");
  check_cuda(inv_freq, "inv_freq");
  check_same_device(x, "x", inv_freq, "inv_freq");
  check_float(x, "x");
  MMK_CHECK(x.dim() == 4, "argument 'x' must be [B, L, H, D], got shape ", x.sizes());
  MMK_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "argument 'x' must have unit last stride, got strides ", x.strides());
  MMK_CHECK(grid.size() == 3 && split.size() == 3 && offsets.size() == 3,
            "grid, split and offsets must each have 3 entries");
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  MMK_CHECK(grid[0] * grid[1] * grid[2] == L, "grid ", grid, " does not cover L=", L);
  MMK_CHECK(split[0] + split[1] + split[2] == D && split[0] % 2 == 0 && split[1] % 2 == 0 && split[2] % 2 == 0,
            "split ", split, " must be even parts summing to D=", D);
  MMK_CHECK(D <= 2 * kMaxSmemPairs && B * H < (int64_t{1} << 31) / std::max<int64_t>(D, 1) &&
                L < (int64_t{1} << 31),
            "rope3d: D=", D, ", B*H=", B * H, ", L=", L, " is beyond what the kernel indexes with 32-bit ints");
  MMK_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) == D / 2 &&
                inv_freq.is_contiguous(),
            "argument 'inv_freq' must be a contiguous float32 [D/2] = [", D / 2, "] tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({B, L, H, D}, x.options());
  if (y.numel() == 0) return y;

  RopeGeom g;
  g.sb = x.stride(0); g.sl = x.stride(1); g.sh = x.stride(2);
  g.B = static_cast<int>(B); g.L = static_cast<int>(L); g.H = static_cast<int>(H); g.D = static_cast<int>(D);
  g.grid_h = static_cast<int>(grid[1]); g.grid_w = static_cast<int>(grid[2]);
  g.off_t = static_cast<int>(offsets[0]); g.off_h = static_cast<int>(offsets[1]); g.off_w = static_cast<int>(offsets[2]);
  g.pairs_t = static_cast<int>(split[0] / 2); g.pairs_h = static_cast<int>(split[1] / 2);
  g.sign = inverse ? -1.f : 1.f;

  const int P = static_cast<int>(D / 2);

  MMK_DISPATCH_FLOAT(x.scalar_type(), "rope3d", [&] {
    using T = scalar_t;
    // VEC must divide every half-chunk (so a vector never straddles chunks), the strides of dims longer than 1
    // (the others are never stepped), and the pointer alignment.
    int64_t common = 0;
    for (int a = 0; a < 3; ++a) common = gcd(common, split[a] / 2);
    for (int d = 0; d < 3; ++d) {
      if (x.size(d) > 1) common = gcd(common, x.stride(d) < 0 ? -x.stride(d) : x.stride(d));
    }
    int vec = static_cast<int>(16 / sizeof(T));
    while (vec > 1 && (common % vec != 0 || !aligned(x.data_ptr(), vec * sizeof(T)))) vec >>= 1;
    // Items per token = B*H*P/VEC; take enough tokens per block for about 4 items per thread.
    const int64_t per_token = std::max<int64_t>(1, B * H * P / vec);
    int tokens_per_block = static_cast<int>(std::clamp<int64_t>((kThreads * 4 + per_token - 1) / per_token, 1, 64));
    tokens_per_block = std::max(1, std::min(tokens_per_block, kMaxSmemPairs / std::max(P, 1)));
    const int64_t blocks = (L + tokens_per_block - 1) / tokens_per_block;
    const size_t smem = 2 * static_cast<size_t>(tokens_per_block) * P * sizeof(float);
    auto launch = [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      rope3d_kernel<T, VEC><<<blocks, kThreads, smem, current_stream()>>>(
          reinterpret_cast<const T*>(x.data_ptr()), inv_freq.data_ptr<float>(), reinterpret_cast<T*>(y.data_ptr()), g,
          tokens_per_block);
    };
    switch (vec) {
      case 8: launch(std::integral_constant<int, 8>{}); break;
      case 4: launch(std::integral_constant<int, 4>{}); break;
      case 2: launch(std::integral_constant<int, 2>{}); break;
      default: launch(std::integral_constant<int, 1>{}); break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace mmk
