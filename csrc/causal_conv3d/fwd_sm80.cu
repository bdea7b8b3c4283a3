// Causal 3D convolution forward, the portable sm_80 kernel (also what other sm_8x/sm_9x GPUs run): an implicit GEMM
// y[m, n] = sum_k A[m, k] * W[n, k] + bias[n] over one output frame, fp16/bf16 operands, fp32 accumulation, one
// rounding. Layouts and the invariants the host checks: conv.h.
//
// CTA = 128 output positions x 128 output channels, 8 warps as 2 (M) x 4 (N) with 64 x 32 warp tiles, K in steps of
// 32 through a 4-stage cp.async pipeline (up to three K tiles are in flight while one is multiplied):
//   * loads: warp w copies 16-byte chunk column w % 4 of rows (w / 4) * 32 + lane + 64 i (i = 0, 1) of both the A
//     tile (gathered x rows: the Loader in gather.cuh turns padding, front frames and tails into zero fills) and
//     the B tile (weight rows);
//   * math: ldmatrix.x4 fragments from row-major tiles whose 80-byte row stride makes every ldmatrix and every
//     cp.async store conflict-free, then 16 mma.sync.m16n8k16 per warp and k16 step;
//   * epilogue: + bias in fp32, one rounding, 32-bit stores of column pairs straight from the accumulators (Cout is
//     a multiple of 8, so a pair never straddles the last channel).
#include "causal_conv3d/gather.cuh"

namespace mmk {
namespace conv {
namespace detail {

constexpr int kSm80Warps = kSm80Threads / 32;
static_assert(kSm80Warps == 8 && kBM == 128 && kBN == 128 && kSm80BK == 32, "the warp layout below");

struct Sm80Layout {  // [row][kSm80Lds] elements, row-major
  __device__ static __forceinline__ uint32_t off(int row, int kc) { return (row * kSm80Lds + kc * 8) * 2; }
};

using ptx::ldsm_x4;
using ptx::mma_k16;

template <typename T>
__global__ void __launch_bounds__(kSm80Threads) causal_conv3d_fwd_sm80_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = Pack<T>;
  constexpr int BK = kSm80BK, S = kSm80Stages, LDS = kSm80Lds;
  constexpr int kTile = kBM * LDS;  // elements of one A or B tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);  // stage st: A tile at 2*st*kTile, B tile right after it
  const uint32_t sbase = smem_addr(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TileCoord tc = tile_coord(p);
  Loader<T, 2, 64, Sm80Layout> ld;
  ld.init(p, tc, warp % 4, (warp / 4) * 32 + lane);
  const int nk = (ld.K + BK - 1) / BK;

  auto stage_a = [&](int st) { return sbase + static_cast<uint32_t>(2 * st * kTile * 2); };
  // Prologue: tiles 0 .. S-2 in flight (one commit group each, empty past the end of K).
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < nk) {
      ld.load(p, tc.n0, stage_a(st), stage_a(st) + kTile * 2);
      ld.advance(BK, p);
    }
    cp_async_commit();
  }

  const int wm = warp & 1, wn = warp >> 1;  // warp tile: rows 64*wm .. +63, columns 32*wn .. +31
  const int mi = lane >> 3, r8 = lane & 7;  // ldmatrix: matrix index and row of this lane's address
  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b][0] = acc[a][b][1] = acc[a][b][2] = acc[a][b][3] = 0.f;

  for (int kt = 0; kt < nk; ++kt) {
    // Committed so far: tiles 0 .. kt+S-2; at most S-2 groups pending means tile kt has landed (for this thread),
    // and the barrier makes every thread's copies visible. It also means every warp is done with tile kt-1, whose
    // slot (kt+S-1) % S the next load reuses.
    cp_async_wait<S - 2>();
    __syncthreads();
    const int nt = kt + S - 1;
    if (nt < nk) {
      ld.load(p, tc.n0, stage_a(nt % S), stage_a(nt % S) + kTile * 2);
      ld.advance(BK, p);
    }
    cp_async_commit();

    const uint32_t a_tile = stage_a(kt % S), b_tile = a_tile + kTile * 2;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        // Matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) of the m16 tile.
        const int row = wm * 64 + mt * 16 + (mi & 1) * 8 + r8;
        ldsm_x4(af[mt], a_tile + (row * LDS + ks * 16 + (mi >> 1) * 8) * 2);
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        // Matrices: (channels of n8 tile j, k 0-7), (tile j, k 8-15), (tile j+1, k 0-7), (tile j+1, k 8-15).
        uint32_t r[4];
        const int n = wn * 32 + (j + (mi >> 1)) * 8 + r8;
        ldsm_x4(r, b_tile + (n * LDS + ks * 16 + (mi & 1) * 8) * 2);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_k16<E::kBf16>(acc[mt][j], af[mt], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups can be left; nothing reads shared memory after this

  // Epilogue: accumulator (mt, j) holds rows g and g+8 of m16 tile mt, columns 2*t4, 2*t4+1 of n8 tile j.
  const int g = lane >> 2, t4 = lane & 3;
  const int hw_total = p.Ho * p.Wo;
  T* const y = static_cast<T*>(p.y) + (static_cast<int64_t>(tc.b) * p.T_out + tc.t) * hw_total * p.Cout;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int col = tc.n0 + wn * 32 + j * 8 + 2 * t4;
    if (col >= p.Cout) continue;
    const float b0 = bias != nullptr ? E::to_float(bias[col]) : 0.f;
    const float b1 = bias != nullptr ? E::to_float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = tc.m0 + wm * 64 + mt * 16 + g + 8 * h;
        if (row < hw_total) {
          *reinterpret_cast<uint32_t*>(y + (row * p.Cout + col)) =
              E::pack(acc[mt][j][2 * h] + b0, acc[mt][j][2 * h + 1] + b1);
        }
      }
    }
  }
#else
  __trap();  // the host refuses devices below sm_80; this image exists only for archs the build was asked for
#endif
}

}  // namespace detail

template <typename T>
cudaError_t launch_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = fwd_sm80_smem_bytes();
  auto kernel = detail::causal_conv3d_fwd_sm80_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid_ctas(p)), kSm80Threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_fwd_sm80<__half>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd_sm80<__nv_bfloat16>(const FwdParams&, cudaStream_t);

}  // namespace conv
}  // namespace mmk
