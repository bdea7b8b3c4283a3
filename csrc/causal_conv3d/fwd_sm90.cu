// Causal 3D convolution forward, the Hopper (sm_90a) kernel: the same implicit GEMM as fwd_sm80.cu (same tiles,
// same Loader, same results up to the order of the fp32 accumulation), with the multiply-accumulate done by wgmma
// from shared memory. Layouts and the invariants the host checks: conv.h.
//
// CTA = 128 output positions x 128 output channels, 256 threads = 2 warpgroups; warpgroup wg owns rows 64 wg .. +63
// and all 128 columns: one wgmma.m64n128k16 per k16 step, 64 fp32 accumulators per thread. K runs in steps of 64
// through a 4-stage shared-memory ring filled by cp.async (the im2col gather of A is irregular, so there is no TMA
// box for it; B goes the same way, which keeps a single completion mechanism). Warp w copies 16-byte chunk column w
// of rows lane + 32 i (i = 0..3) of both tiles.
//
// Shared-memory tiles use the wgmma no-swizzle ("interleave") layout: [chunk][row][8 elements], chunk = 16-byte
// column group of K (k / 8), so each core matrix (8 rows x 16 bytes) is 128 contiguous bytes. Both operands are
// K-major: descriptor LBO (next core matrix along K) = 128 rows * 16 B = 2048, SBO (next 8 rows along M or N) = 128.
// cp.async stores of one warp hit 32 consecutive 16-byte slots (conflict-free).
//
// Pipeline (prefetch distance S-2 = 2 tiles, one wgmma group in flight), iteration kt:
//   1. cp.async.wait_group S-3: this thread's copies of tile kt have landed; fence.proxy.async makes them visible to
//      wgmma (the async proxy); __syncthreads: every thread's copies are, and every warpgroup has retired the wgmma
//      group of tile kt-2 (its wait_group 1 in iteration kt-1), so slot (kt-2) % S is free.
//   2. cp.async tile kt+S-2 into slot (kt+S-2) % S == (kt-2) % S; commit (an empty group past the end of K, which
//      keeps the wait counts uniform).
//   3. wgmma.fence; 4 wgmmas on slot kt % S; commit; wait_group 1 (tile kt-1's group has retired).
// Slots in use after step 3: kt-1 and kt (wgmma), kt+1 .. kt+S-2 (cp.async): S distinct slots.
// The accumulators are zero-initialized and every wgmma accumulates (scale-d = 1). They are pinned with empty asm
// statements around each wgmma batch so the compiler cannot move their reads or writes across the asynchronous
// instructions.
#include "causal_conv3d/gather.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MMK_CONV_SM90_DEVICE 1
#endif

namespace mmk {
namespace conv {
namespace detail {

static_assert(kBM == 128 && kBN == 128 && kSm90BK == 64 && kSm90Threads == 256 && kSm90Stages >= 3,
              "the warp-to-chunk mapping and the wgmma shapes below");
constexpr uint32_t kSm90TileBytes = kBM * kSm90BK * 2;  // one A or B tile: 16 KiB
constexpr uint32_t kSm90StageBytes = 2 * kSm90TileBytes;
static_assert(fwd_sm90_smem_bytes() == 128 + kSm90Stages * kSm90StageBytes, "conv.h disagrees with the layout");

struct Sm90Layout {  // [chunk][128 rows][8 elements]
  __device__ static __forceinline__ uint32_t off(int row, int kc) { return (kc * kBM + row) * 16; }
};

#ifdef MMK_CONV_SM90_DEVICE
using ptx::fence_proxy_async;
using ptx::make_desc;
using ptx::pin;
using ptx::wgmma_commit;
using ptx::wgmma_fence;
using ptx::wgmma_wait;

// d (64 x 128, fp32) += A (64 x 16, smem, K-major) * B (16 x 128, smem, K-major); register i of d is operand %i,
// then the two descriptors and the scale-d predicate's source (always 1: accumulate).
#define MMK_CONV_WGMMA_N128(TY)                                                                              \
  asm volatile(                                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                         \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                        \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                              \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                    \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                     \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                    \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),       \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),            \
        "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),            \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),            \
        "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),            \
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),            \
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),            \
        "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                          \
      : "l"(desc_a), "l"(desc_b), "r"(1))

template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (kBf16) {
    MMK_CONV_WGMMA_N128("bf16");
  } else {
    MMK_CONV_WGMMA_N128("f16");
  }
}
#undef MMK_CONV_WGMMA_N128
#endif  // MMK_CONV_SM90_DEVICE

template <typename T>
__global__ void __launch_bounds__(kSm90Threads, 1) causal_conv3d_fwd_sm90_kernel(const FwdParams p) {
#ifdef MMK_CONV_SM90_DEVICE
  using E = Pack<T>;
  constexpr int BK = kSm90BK, S = kSm90Stages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 127u) & ~127u;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;
  const TileCoord tc = tile_coord(p);
  Loader<T, 4, 32, Sm90Layout> ld;
  ld.init(p, tc, warp, lane);
  const int nk = (ld.K + BK - 1) / BK;

  auto stage = [&](int st) { return base + static_cast<uint32_t>(st) * kSm90StageBytes; };
  // Prologue: tiles 0 .. S-3 in flight.
#pragma unroll
  for (int st = 0; st < S - 2; ++st) {
    if (st < nk) {
      ld.load(p, tc.n0, stage(st), stage(st) + kSm90TileBytes);
      ld.advance(BK, p);
    }
    cp_async_commit();
  }

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<S - 3>();  // committed: tiles 0 .. kt+S-3, so tile kt has landed
    fence_proxy_async();
    __syncthreads();
    const int nt = kt + S - 2;
    if (nt < nk) {
      ld.load(p, tc.n0, stage(nt % S), stage(nt % S) + kSm90TileBytes);
      ld.advance(BK, p);
    }
    cp_async_commit();

    const uint32_t a_tile = stage(kt % S) + wg * 64 * 16;  // this warpgroup's 64 rows: 8 core-matrix rows in
    const uint32_t b_tile = stage(kt % S) + kSm90TileBytes;
    pin(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // k16 step ks covers chunks 2 ks, 2 ks + 1: 2 * 128 * 16 bytes into each tile.
      wgmma_m64n128k16<E::kBf16>(acc, make_desc(a_tile + ks * 4096, kBM * 16, 128),
                                 make_desc(b_tile + ks * 4096, kBN * 16, 128));
    }
    wgmma_commit();
    wgmma_wait<1>();
    pin(acc);
  }
  wgmma_wait<0>();
  pin(acc);
  cp_async_wait<0>();

  // Epilogue: warp w of the warpgroup holds rows 16 (w % 4) + g and + 8; acc[4j + 0, 1] are columns 8j + 2 t4, + 1
  // of the first row, acc[4j + 2, 3] of the second.
  const int g = lane >> 2, t4 = lane & 3;
  const int hw_total = p.Ho * p.Wo;
  T* const y = static_cast<T*>(p.y) + (static_cast<int64_t>(tc.b) * p.T_out + tc.t) * hw_total * p.Cout;
  const T* bias = static_cast<const T*>(p.bias);
  const int row0 = tc.m0 + wg * 64 + (warp & 3) * 16 + g;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const int col = tc.n0 + j * 8 + 2 * t4;
    if (col >= p.Cout) continue;
    const float b0 = bias != nullptr ? E::to_float(bias[col]) : 0.f;
    const float b1 = bias != nullptr ? E::to_float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row < hw_total) {
        *reinterpret_cast<uint32_t*>(y + (row * p.Cout + col)) = E::pack(acc[4 * j + 2 * h] + b0,
                                                                         acc[4 * j + 2 * h + 1] + b1);
      }
    }
  }
#else
  __trap();  // built without sm_90a: the host never launches this image (launch_fwd_sm90 checks binaryVersion)
#endif
}

}  // namespace detail

template <typename T>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  auto kernel = detail::causal_conv3d_fwd_sm90_kernel<T>;
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (attr.binaryVersion != 90) return cudaErrorNoKernelImageForDevice;  // an sm_80 image would only trap
  constexpr size_t smem = fwd_sm90_smem_bytes();
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid_ctas(p)), kSm90Threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_fwd_sm90<__half>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd_sm90<__nv_bfloat16>(const FwdParams&, cudaStream_t);

}  // namespace conv
}  // namespace mmk
