// Mask NMS (Unpair-Seg inner-NMS) kernels: semantics in mmkernels/ops/mask_nms/reference.py, glue in cuda.py.
//
// Three stages, each its own entry point so that tests can compare every stage with the reference:
//
//   mask_nms_pack      src [N, Hs, Ws] (float/half/bf16, any strides) read through order int64 [N]
//                      -> bits int32 [N, K] (row r = mask order[r], bit b of word k = output pixel 32k + b) and
//                         area int32 [N].
//                      One warp per word: lane b computes pixel 32k + b (downsampled by PyTorch's CUDA bilinear
//                      formula when factor > 1, see reference.Plan), compares it with the exact sigmoid threshold,
//                      and __ballot_sync assembles the word. Areas are int32 atomic adds (exact in any order).
//   mask_nms_suppress  -> sup int32 [N, W], W = ceil(N/32): bit (j % 32) of sup[i][j / 32] is set when j > i and
//                      the kept mask i removes candidate j. A block owns a 64 x 64 tile of pairs; tiles with no
//                      j > i exit at once. Intersections: AND + __popc over the words, staged through shared memory
//                      32 words at a time (each thread a 4 x 4 sub-tile); decisions in fp32 with IEEE division
//                      (__fdiv_rn) exactly as the reference; bits gathered per row in shared memory (atomicOr,
//                      whose result is order-independent) and written once. No global atomics.
//   mask_nms_scan      -> keep uint8 [N]: one block of 1024 threads walks the rows 32 at a time with the removed
//                      bitmask in shared memory. Warp 0 resolves the block's 32 x 32 diagonal word sequentially
//                      (the words broadcast by __shfl_sync); then warp w ORs the kept rows' words w' = b+1+w, ...
//                      with one load per lane (lane = row) and __reduce_or_sync. ceil(N/32) dependent steps.
//
// Limits checked here and in cuda.py: N <= 131072 (the removed bitmask, 16 KB, in static-size shared memory is
// well below 48 KB), pixels per mask <= 2^23 (fp32 areas and area sums exact). Offsets of the packed arrays and
// of the masks are 64-bit.
#include "common.h"

#include <vector>

namespace mmk {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPackWarps = 8;     // words per pack block
constexpr int kTile = 64;         // pairs per tile side
constexpr int kChunk = 32;        // words per shared-memory stage
constexpr int kPairThreads = 256; // 16 x 16 threads, 4 x 4 pairs each
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxMasks = 131072;
constexpr int64_t kMaxPixels = int64_t(1) << 23;

template <typename T>
__global__ void __launch_bounds__(kPackWarps * 32)
    pack_kernel(const T* __restrict__ x, const int64_t* __restrict__ order, int64_t sn, int64_t sh, int64_t sw,
                int factor, float lam0, float lam1, int out_w, int n_pixels, int n_words, float threshold,
                int32_t* __restrict__ bits, int32_t* __restrict__ area) {
  const int row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int word = blockIdx.y * kPackWarps + (threadIdx.x >> 5);
  if (word >= n_words) return;  // warp-uniform: the ballot below sees full warps only
  const int p = word * 32 + lane;
  bool on = false;
  if (p < n_pixels) {
    const T* m = x + order[row] * sn;
    const int oh = p / out_w, ow = p - (p / out_w) * out_w;
    float v;
    if (factor == 1) {
      v = to_float(m[oh * sh + ow * sw]);
    } else {
      // PyTorch's upsample_bilinear2d_out_frame at scale 1/factor: the 2x2 pixels at factor*o + (factor-1)/2,
      // weights (lam0, lam1) exact, fp32, one rounding to T. Every output pixel has its 2x2 block in range.
      const int64_t off = (int64_t(oh) * factor + (factor - 1) / 2) * sh + (int64_t(ow) * factor + (factor - 1) / 2) * sw;
      const float a = to_float(m[off]), b = to_float(m[off + sw]);
      const float c = to_float(m[off + sh]), e = to_float(m[off + sh + sw]);
      v = round_to<T>(lam0 * (lam0 * a + lam1 * b) + lam1 * (lam0 * c + lam1 * e));
    }
    on = v >= threshold;  // NaN: off, as sigmoid(NaN) >= 0.5 is false
  }
  const unsigned w = __ballot_sync(kFull, on);
  if (lane == 0) {
    bits[int64_t(row) * n_words + word] = static_cast<int32_t>(w);
    if (w) atomicAdd(area + row, __popc(w));
  }
}

__global__ void __launch_bounds__(kPairThreads)
    suppress_kernel(const uint32_t* __restrict__ bits, const int32_t* __restrict__ area, int n, int n_words,
                    int n_sup_words, float iou_t, float cov_t, float eps, bool combine_and,
                    uint32_t* __restrict__ sup) {
  const int i0 = blockIdx.y * kTile, j0 = blockIdx.x * kTile;
  if (j0 + kTile - 1 <= i0) return;  // block-uniform: no pair with j > i in this tile
  __shared__ uint32_t as[kTile][kChunk + 1];  // +1: the 16 rows a warp reads sit in distinct banks
  __shared__ uint32_t bs[kTile][kChunk + 1];
  __shared__ uint32_t out[kTile][kTile / 32];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  int cnt[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) cnt[r][c] = 0;

  for (int k0 = 0; k0 < n_words; k0 += kChunk) {
    for (int e = threadIdx.x; e < kTile * kChunk; e += kPairThreads) {
      const int r = e / kChunk, k = e % kChunk, gk = k0 + k;
      as[r][k] = (i0 + r < n && gk < n_words) ? bits[int64_t(i0 + r) * n_words + gk] : 0u;
      bs[r][k] = (j0 + r < n && gk < n_words) ? bits[int64_t(j0 + r) * n_words + gk] : 0u;
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      uint32_t a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = as[ty + 16 * r][k];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = bs[tx + 16 * c][k];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) cnt[r][c] += __popc(a[r] & b[c]);
    }
    __syncthreads();  // the next stage overwrites as/bs
  }

  for (int e = threadIdx.x; e < kTile * (kTile / 32); e += kPairThreads) out[e / 2][e % 2] = 0u;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = i0 + ty + 16 * r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int jl = tx + 16 * c, j = j0 + jl;
      if (i < n && j < n && j > i) {
        // reference.suppression_matrix, operation by operation (exact integers until the + eps roundings).
        const float inter = static_cast<float>(cnt[r][c]);
        const float ai = static_cast<float>(area[i]), aj = static_cast<float>(area[j]);
        const float num = inter + eps;
        const float iou = __fdiv_rn(num, __fadd_rn(__fsub_rn(__fadd_rn(ai, aj), inter), eps));
        const float cov = __fdiv_rn(num, __fadd_rn(aj, eps));
        const bool by_iou = iou >= iou_t, by_cov = cov >= cov_t;
        if (combine_and ? (by_iou && by_cov) : (by_iou || by_cov)) atomicOr(&out[ty + 16 * r][jl >> 5], 1u << (jl & 31));
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * (kTile / 32); e += kPairThreads) {
    const int r = e / 2, wc = j0 / 32 + e % 2, i = i0 + r;
    if (i < n && wc < n_sup_words) sup[int64_t(i) * n_sup_words + wc] = out[r][e % 2];
  }
}

__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const uint32_t* __restrict__ sup, int n, int n_sup_words, uint8_t* __restrict__ keep) {
  __shared__ uint32_t removed[kMaxMasks / 32];
  __shared__ uint32_t kept_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int w = threadIdx.x; w < n_sup_words; w += blockDim.x) removed[w] = 0u;
  __syncthreads();
  for (int b = 0; b < n_sup_words; ++b) {
    const int row0 = b * 32;
    if (warp == 0) {
      const int row = row0 + lane;
      const uint32_t diag = row < n ? sup[int64_t(row) * n_sup_words + b] : 0u;
      uint32_t cur = removed[b];
      uint32_t kept = 0u;
      // Every lane runs the same sequence (cur is uniform), so all hold the same result.
      for (int t = 0; t < 32; ++t) {
        const uint32_t d = __shfl_sync(kFull, diag, t);
        if (!((cur >> t) & 1u)) {
          kept |= 1u << t;
          cur |= d;
        }
      }
      const int valid = n - row0;  // >= 1
      if (valid < 32) kept &= (1u << valid) - 1u;
      if (lane == 0) kept_s = kept;
      if (row < n) keep[row] = static_cast<uint8_t>((kept >> lane) & 1u);
    }
    __syncthreads();  // kept_s and removed[b] are final
    const uint32_t kept = kept_s;
    if (kept != 0u) {
      const bool mine = (kept >> lane) & 1u;  // implies row0 + lane < n
      for (int w = b + 1 + warp; w < n_sup_words; w += warps) {
        uint32_t v = mine ? sup[int64_t(row0 + lane) * n_sup_words + w] : 0u;
        v = __reduce_or_sync(kFull, v);
        if (lane == 0) removed[w] |= v;  // word w belongs to this warp alone in this step
      }
    }
    __syncthreads();  // every read of kept_s is done before warp 0 writes the next one
  }
}

}  // namespace

std::vector<at::Tensor> mask_nms_pack(const at::Tensor& src, const at::Tensor& order, int64_t factor, double lam0,
                                      double lam1, int64_t out_h, int64_t out_w, double threshold) {
  check_cuda(src, "src");
  check_float(src, "src");
  check_cuda(order, "order");
  check_same_device(src, "src", order, "order");
  MMK_CHECK(src.dim() == 3, "argument 'src' must be [N, H, W], got ", src.sizes());
  MMK_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == src.size(0) &&
                order.is_contiguous(),
            "argument 'order' must be a contiguous int64 [N] tensor");
  // The last source row/column an output pixel reads: its own (factor 1) or the second of its 2x2 block.
  const int64_t reach = factor == 1 ? 0 : (factor - 1) / 2 + 1;
  MMK_CHECK(factor >= 1 && out_h >= 1 && out_w >= 1 && (out_h - 1) * factor + reach < src.size(1) &&
                (out_w - 1) * factor + reach < src.size(2),
            "factor ", factor, " and output size ", out_h, "x", out_w, " do not fit src ", src.sizes());
  MMK_CHECK(out_h * out_w <= kMaxPixels, "at most 2^23 output pixels per mask, got ", out_h * out_w);
  const int64_t n = src.size(0);
  const int n_pixels = static_cast<int>(out_h * out_w);
  const int n_words = (n_pixels + 31) / 32;
  const c10::cuda::CUDAGuard guard(src.device());
  auto bits = at::empty({n, n_words}, src.options().dtype(at::kInt));
  auto area = at::zeros({n}, src.options().dtype(at::kInt));
  if (n == 0) return {bits, area};
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((n_words + kPackWarps - 1) / kPackWarps));
  MMK_DISPATCH_FLOAT(src.scalar_type(), "mask_nms_pack", [&] {
    pack_kernel<scalar_t><<<grid, kPackWarps * 32, 0, current_stream()>>>(
        reinterpret_cast<const scalar_t*>(src.data_ptr()), order.data_ptr<int64_t>(), src.stride(0), src.stride(1),
        src.stride(2), static_cast<int>(factor), static_cast<float>(lam0), static_cast<float>(lam1),
        static_cast<int>(out_w), n_pixels, n_words, static_cast<float>(threshold), bits.data_ptr<int32_t>(),
        area.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {bits, area};
}

at::Tensor mask_nms_suppress(const at::Tensor& bits, const at::Tensor& area, double iou_threshold,
                             double coverage_threshold, double eps, bool combine_and) {
  check_cuda(bits, "bits");
  check_same_device(bits, "bits", area, "area");
  MMK_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.is_contiguous(),
            "argument 'bits' must be a contiguous int32 [N, K] tensor");
  MMK_CHECK(area.scalar_type() == at::kInt && area.dim() == 1 && area.size(0) == bits.size(0) && area.is_contiguous(),
            "argument 'area' must be a contiguous int32 [N] tensor");
  const int64_t n = bits.size(0);
  MMK_CHECK(n <= kMaxMasks, "at most ", kMaxMasks, " masks, got ", n);
  MMK_CHECK(bits.size(1) * 32 <= kMaxPixels + 31, "at most 2^23 pixels per mask");
  const int n_sup_words = static_cast<int>((n + 31) / 32);
  const c10::cuda::CUDAGuard guard(bits.device());
  auto sup = at::zeros({n, n_sup_words}, bits.options());
  if (n == 0) return sup;
  const unsigned tiles = static_cast<unsigned>((n + kTile - 1) / kTile);
  suppress_kernel<<<dim3(tiles, tiles), kPairThreads, 0, current_stream()>>>(
      reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>()), area.data_ptr<int32_t>(), static_cast<int>(n),
      static_cast<int>(bits.size(1)), n_sup_words, static_cast<float>(iou_threshold),
      static_cast<float>(coverage_threshold), static_cast<float>(eps), combine_and,
      reinterpret_cast<uint32_t*>(sup.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sup;
}

at::Tensor mask_nms_scan(const at::Tensor& sup) {
  check_cuda(sup, "sup");
  MMK_CHECK(sup.scalar_type() == at::kInt && sup.dim() == 2 && sup.is_contiguous(),
            "argument 'sup' must be a contiguous int32 [N, ceil(N/32)] tensor");
  const int64_t n = sup.size(0);
  MMK_CHECK(n <= kMaxMasks, "at most ", kMaxMasks, " masks, got ", n);
  MMK_CHECK(sup.size(1) == (n + 31) / 32, "argument 'sup' must have ceil(N/32) = ", (n + 31) / 32,
            " words per row, got ", sup.size(1));
  const c10::cuda::CUDAGuard guard(sup.device());
  auto keep = at::empty({n}, sup.options().dtype(at::kByte));
  if (n == 0) return keep;
  scan_kernel<<<1, kScanThreads, 0, current_stream()>>>(reinterpret_cast<const uint32_t*>(sup.data_ptr<int32_t>()),
                                                        static_cast<int>(n), static_cast<int>(sup.size(1)),
                                                        keep.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace mmk
