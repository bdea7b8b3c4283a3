// Joint attention forward, host side: argument checks and dispatch to the mma.sync kernels (fwd_kernel.cuh, which
// documents the design; layouts in fwd.h) or to the sm_90a wgmma/TMA kernels (fwd_sm90.cuh), whose K/V tensor maps
// are built here. Python glue: mmkernels/ops/joint_attention/cuda.py, which builds the joint K/V buffers and the
// full-width q rstd with the Triton prep kernels, picks the kernel and calls this once per stream.
#include <string>
#include "common.h"
#include "joint_attention/fwd.h"

#include <cuda.h>

#include <cmath>
#include <limits>

#ifndef MMKERNELS_CUDA_ARCHS
#define MMKERNELS_CUDA_ARCHS "unknown"
#endif

namespace mmk {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_cuda(t, name);
  check_same_device(ref, "q", t, name);
}

template <typename T>
cudaError_t dispatch_head_dim(int64_t D, const ja::FwdParams& p, cudaStream_t stream) {
  switch (D) {
    case 64: return ja::launch_fwd<T, 64>(p, stream);
    case 72: return ja::launch_fwd<T, 72>(p, stream);
    case 80: return ja::launch_fwd<T, 80>(p, stream);
    case 96: return ja::launch_fwd<T, 96>(p, stream);
    case 128: return ja::launch_fwd<T, 128>(p, stream);
    default: MMK_CHECK(false, "joint_attention_fwd: head dim ", D, " is not compiled (64, 72, 80, 96, 128)");
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_head_dim_sm90(int64_t D, const ja::FwdParams& p, const ja::Sm90Maps& maps, cudaStream_t stream) {
  switch (D) {
    case 64: return ja::launch_fwd_sm90<T, 64>(p, maps, stream);
    case 72: return ja::launch_fwd_sm90<T, 72>(p, maps, stream);
    case 80: return ja::launch_fwd_sm90<T, 80>(p, maps, stream);
    case 96: return ja::launch_fwd_sm90<T, 96>(p, maps, stream);
    case 128: return ja::launch_fwd_sm90<T, 128>(p, maps, stream);
    default: MMK_CHECK(false, "joint_attention_fwd_sm90: head dim ", D, " is not compiled (64, 72, 80, 96, 128)");
  }
  return cudaSuccess;
}

// cuTensorMapEncodeTiled, fetched from the driver through the runtime so that _C does not link libcuda.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    MMK_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && ptr != nullptr,
              "joint_attention_fwd_sm90: the CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12+ driver): ",
              cudaGetErrorString(err));
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// The TMA view of a joint [B, Hkv, Ltot, D] buffer: 3-D {D, Ltot, B*Hkv} with a {8, kSm90BlockN, 1} box, so one
// copy fills one 16-byte column chunk of a K/V tile ([chunk][token][8] in shared memory, fwd_sm90.cuh). Tokens past
// Ltot of a head read as zeros (out of bounds of dim 1), never as the next head's rows.
CUtensorMap make_kv_map(const at::Tensor& t, const char* name) {
  const int64_t BH = t.size(0) * t.size(1), Ltot = t.size(2), D = t.size(3);
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(Ltot), static_cast<cuuint64_t>(BH)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(D * 2), static_cast<cuuint64_t>(Ltot * D * 2)};  // bytes
  const cuuint32_t box[3] = {8, static_cast<cuuint32_t>(ja::kSm90BlockN), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapDataType dtype =
      t.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap map;
  const CUresult res = encode_tiled()(&map, dtype, 3, t.data_ptr(), dims, strides, box, elem_strides,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MMK_CHECK(res == CUDA_SUCCESS, "joint_attention_fwd_sm90: cuTensorMapEncodeTiled failed for argument '", name,
            "' (shape ", t.sizes(), ") with CUresult ", static_cast<int>(res));
  return map;
}

// One stream of joint attention (see joint_attention_fwd below); sm90 selects the Hopper kernel.
void fwd_impl(const at::Tensor& q, const std::optional<at::Tensor>& q_weight, const std::optional<at::Tensor>& q_rstd,
              const std::optional<at::Tensor>& inv_freq, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse, int64_t tok_off, int64_t norm_mode, double eps, const std::vector<int64_t>& rope,
              double scale, bool sm90);

}  // namespace

// One stream of joint attention: out[b, m, h*D:(h+1)*D] = softmax(scale * q~ K^T) V for its L queries, and
// lse[b, h, tok_off + m] (natural log). q~ = RoPE(RMSNorm(q)) is built in the kernel's prologue:
//   norm_mode 0: no norm (q_weight, q_rstd unused); 1 ("full"): q_weight [Hq*D], q_rstd [B, L] fp32 contiguous
//   (rstd over the token's Hq*D values); 2 ("head"): q_weight [D], the rstd over each head's D values computed here.
//   rope: empty for no RoPE, else {grid_h, grid_w, off_t, off_h, off_w, pairs_t, pairs_h} with inv_freq [D/2] fp32.
// q [B, L, Hq*D] fp16/bf16 with unit last stride; k, v [B, Hkv, Ltot, D] contiguous (Hq % Hkv == 0; query head j
// reads kv head j / (Hq/Hkv)); out [B, L, Hq*D] contiguous, q's dtype; lse [B, Hq, Ltot] fp32 contiguous.
void joint_attention_fwd(const at::Tensor& q, const std::optional<at::Tensor>& q_weight,
                         const std::optional<at::Tensor>& q_rstd, const std::optional<at::Tensor>& inv_freq,
                         const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t tok_off,
                         int64_t norm_mode, double eps, std::vector<int64_t> rope, double scale) {
  fwd_impl(q, q_weight, q_rstd, inv_freq, k, v, out, lse, tok_off, norm_mode, eps, rope, scale, false);
}

// The same contract, computed by the sm_90a kernel (wgmma, TMA, warp-specialized; fwd_sm90.cuh). Hopper (compute
// capability 9.x) only, and only when the extension was built with 9.0a in TORCH_CUDA_ARCH_LIST.
void joint_attention_fwd_sm90(const at::Tensor& q, const std::optional<at::Tensor>& q_weight,
                              const std::optional<at::Tensor>& q_rstd, const std::optional<at::Tensor>& inv_freq,
                              const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                              int64_t tok_off, int64_t norm_mode, double eps, std::vector<int64_t> rope,
                              double scale) {
  fwd_impl(q, q_weight, q_rstd, inv_freq, k, v, out, lse, tok_off, norm_mode, eps, rope, scale, true);
}

namespace {

void fwd_impl(const at::Tensor& q, const std::optional<at::Tensor>& q_weight, const std::optional<at::Tensor>& q_rstd,
              const std::optional<at::Tensor>& inv_freq, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse, int64_t tok_off, int64_t norm_mode, double eps, const std::vector<int64_t>& rope,
              double scale, bool sm90) {
  const char* const fn = sm90 ? "joint_attention_fwd_sm90" : "joint_attention_fwd";
  check_cuda(q, "q");
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  check_tensor(out, "out", q);
  check_tensor(lse, "lse", q);
  const auto dtype = q.scalar_type();
  MMK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
            "joint_attention_fwd: argument 'q' must be float16 or bfloat16, got ", dtype);
  MMK_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && out.scalar_type() == dtype,
            "joint_attention_fwd: arguments 'k', 'v' and 'out' must have q's dtype ", dtype, ", got ",
            k.scalar_type(), ", ", v.scalar_type(), " and ", out.scalar_type());
  MMK_CHECK(lse.scalar_type() == at::kFloat, "joint_attention_fwd: argument 'lse' must be float32, got ",
            lse.scalar_type());
  MMK_CHECK(q.dim() == 3, "joint_attention_fwd: argument 'q' must be [B, L, Hq*D], got shape ", q.sizes());
  MMK_CHECK(k.dim() == 4, "joint_attention_fwd: argument 'k' must be [B, Hkv, Ltot, D], got shape ", k.sizes());
  MMK_CHECK(v.sizes() == k.sizes(), "joint_attention_fwd: argument 'v' must have k's shape ", k.sizes(), ", got ",
            v.sizes());
  const int64_t B = q.size(0), L = q.size(1), Hkv = k.size(1), Ltot = k.size(2), D = k.size(3);
  MMK_CHECK(D == 64 || D == 72 || D == 80 || D == 96 || D == 128,
            "joint_attention_fwd: head dim D = k.size(3) = ", D, " is not supported (64, 72, 80, 96, 128)");
  MMK_CHECK(q.size(2) % D == 0, "joint_attention_fwd: argument 'q' width ", q.size(2), " is not a multiple of D=", D);
  const int64_t Hq = q.size(2) / D;
  MMK_CHECK(Hkv >= 1 && Hq % Hkv == 0, "joint_attention_fwd: Hq=", Hq, " query heads must be a multiple of Hkv=",
            Hkv, " kv heads");
  MMK_CHECK(k.size(0) == B, "joint_attention_fwd: argument 'k' has batch ", k.size(0), ", q has ", B);
  MMK_CHECK(tok_off >= 0 && tok_off + L <= Ltot, "joint_attention_fwd: tok_off=", tok_off, " with L=", L,
            " tokens does not fit in the joint length Ltot=", Ltot);
  MMK_CHECK(q.size(2) <= 1 || q.stride(2) == 1, "joint_attention_fwd: argument 'q' must have unit last stride, got "
            "strides ", q.strides());
  MMK_CHECK(k.is_contiguous() && v.is_contiguous(), "joint_attention_fwd: arguments 'k' and 'v' must be contiguous");
  MMK_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "joint_attention_fwd: argument 'out' must be a "
            "contiguous tensor of q's shape ", q.sizes(), ", got shape ", out.sizes(), " strides ", out.strides());
  MMK_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Ltot && lse.is_contiguous(),
            "joint_attention_fwd: argument 'lse' must be a contiguous [B, Hq, Ltot] = [", B, ", ", Hq, ", ", Ltot,
            "] tensor, got shape ", lse.sizes());
  MMK_CHECK(aligned(k.data_ptr(), 16) && aligned(v.data_ptr(), 16) && aligned(out.data_ptr(), 16),
            "joint_attention_fwd: arguments 'k', 'v' and 'out' must be 16-byte aligned");
  MMK_CHECK(B * Hq <= 65535, "joint_attention_fwd: B*Hq=", B * Hq, " is above 65535 (the kernel's grid y)");
  MMK_CHECK(Ltot < (int64_t{1} << 30), "joint_attention_fwd: Ltot=", Ltot, " is beyond the kernel's 32-bit token "
            "positions");
  MMK_CHECK(norm_mode >= 0 && norm_mode <= 2, "joint_attention_fwd: argument 'norm_mode' must be 0, 1 or 2, got ",
            norm_mode);
  MMK_CHECK(std::isfinite(eps) && eps >= 0, "joint_attention_fwd: argument 'eps' must be finite and >= 0, got ", eps);
  MMK_CHECK(std::isfinite(scale) && scale > 0, "joint_attention_fwd: argument 'scale' must be finite and > 0, got ",
            scale);

  // The norm weight is read as fp32 (exact for fp16/bf16 weights).
  at::Tensor w32, rstd;
  if (norm_mode != 0) {
    MMK_CHECK(q_weight.has_value(), "joint_attention_fwd: norm_mode ", norm_mode, " needs argument 'q_weight'");
    const at::Tensor& w = *q_weight;
    check_tensor(w, "q_weight", q);
    check_float(w, "q_weight");
    const int64_t width = norm_mode == 1 ? Hq * D : D;
    MMK_CHECK(w.dim() == 1 && w.size(0) == width, "joint_attention_fwd: argument 'q_weight' must be [", width,
              "] for norm_mode ", norm_mode, ", got shape ", w.sizes());
    w32 = w.to(at::kFloat).contiguous();
  }
  if (norm_mode == 1) {
    MMK_CHECK(q_rstd.has_value(), "joint_attention_fwd: norm_mode 1 (full) needs argument 'q_rstd' [B, L]");
    rstd = *q_rstd;
    check_tensor(rstd, "q_rstd", q);
    MMK_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 2 && rstd.size(0) == B && rstd.size(1) == L &&
                  rstd.is_contiguous(),
              "joint_attention_fwd: argument 'q_rstd' must be a contiguous float32 [B, L] = [", B, ", ", L,
              "] tensor, got ", rstd.scalar_type(), " of shape ", rstd.sizes());
  }
  const bool has_rope = !rope.empty();
  at::Tensor freq;
  if (has_rope) {
    MMK_CHECK(rope.size() == 7, "joint_attention_fwd: argument 'rope' must be empty or {grid_h, grid_w, off_t, "
              "off_h, off_w, pairs_t, pairs_h}, got ", rope.size(), " values");
    const int64_t gh = rope[0], gw = rope[1], pt = rope[5], ph = rope[6];
    MMK_CHECK(gh >= 1 && gw >= 1 && gh * gw <= kIntMax, "joint_attention_fwd: rope grid_h=", gh, ", grid_w=", gw,
              " must be positive (and their product below 2**31)");
    for (int i = 2; i < 5; ++i) {
      MMK_CHECK(std::abs(rope[i]) < (int64_t{1} << 30), "joint_attention_fwd: rope offset ", rope[i], " is too large");
    }
    MMK_CHECK(pt >= 0 && ph >= 0 && pt + ph <= D / 2, "joint_attention_fwd: rope pairs_t=", pt, ", pairs_h=", ph,
              " must be non-negative with pairs_t + pairs_h <= D/2 = ", D / 2);
    MMK_CHECK(inv_freq.has_value(), "joint_attention_fwd: RoPE needs argument 'inv_freq' [D/2]");
    freq = *inv_freq;
    check_tensor(freq, "inv_freq", q);
    MMK_CHECK(freq.scalar_type() == at::kFloat && freq.dim() == 1 && freq.size(0) == D / 2 && freq.is_contiguous(),
              "joint_attention_fwd: argument 'inv_freq' must be a contiguous float32 [D/2] = [", D / 2, "] tensor");
  }
  if (B == 0 || L == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  if (sm90) {
    MMK_CHECK(major == 9, fn, ": the sm_90a kernel (wgmma, TMA) runs only on Hopper (compute capability 9.x), got ",
              major, ".x; use joint_attention_fwd (the sm_80 kernel)");
  } else {
    MMK_CHECK(major >= 8, fn, ": needs an sm_80 or newer GPU (mma.sync bf16/fp16, cp.async), got "
              "compute capability ", major, ".x");
  }
  const size_t smem_needed = sm90 ? ja::fwd_sm90_smem_bytes(static_cast<int>(D))
                                  : ja::fwd_smem_bytes(static_cast<int>(D));
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  MMK_CHECK(static_cast<size_t>(smem_optin) >= smem_needed, fn, ": the D=", D, " kernel needs ", smem_needed,
            " bytes of shared memory per block, the device allows ", smem_optin);

  ja::FwdParams p{};
  p.q = q.data_ptr();
  p.q_w = norm_mode != 0 ? w32.data_ptr<float>() : nullptr;
  p.q_rstd = norm_mode == 1 ? rstd.data_ptr<float>() : nullptr;
  p.inv_freq = has_rope ? freq.data_ptr<float>() : nullptr;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.sqb = q.stride(0);
  p.sql = q.stride(1);
  p.B = static_cast<int>(B);
  p.L = static_cast<int>(L);
  p.Ltot = static_cast<int>(Ltot);
  p.tok_off = static_cast<int>(tok_off);
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.qk_scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.eps = static_cast<float>(eps);
  p.norm = static_cast<int>(norm_mode);
  p.rope = has_rope ? 1 : 0;
  if (has_rope) {
    p.grid_h = static_cast<int>(rope[0]);
    p.grid_w = static_cast<int>(rope[1]);
    p.off_t = static_cast<int>(rope[2]);
    p.off_h = static_cast<int>(rope[3]);
    p.off_w = static_cast<int>(rope[4]);
    p.pt = static_cast<int>(rope[5]);
    p.ph = static_cast<int>(rope[6]);
  } else {
    p.grid_h = p.grid_w = 1;
  }

  const cudaStream_t stream = current_stream();
  cudaError_t err;
  if (sm90) {
    // The runtime cannot tell an sm_90 image (whose kernel body is a trap) from an sm_90a one, so refuse builds
    // without 9.0a up front instead of launching a trap.
    MMK_CHECK(std::string(MMKERNELS_CUDA_ARCHS).find("9.0a") != std::string::npos, fn, ": this build of "
              "mmkernels._C has no sm_90a image (built for ", MMKERNELS_CUDA_ARCHS, "); rebuild with 9.0a in "
              "TORCH_CUDA_ARCH_LIST");
    ja::Sm90Maps maps;
    maps.k = make_kv_map(k, "k");
    maps.v = make_kv_map(v, "v");
    err = dtype == at::kHalf ? dispatch_head_dim_sm90<__half>(D, p, maps, stream)
                             : dispatch_head_dim_sm90<__nv_bfloat16>(D, p, maps, stream);
    MMK_CHECK(err != cudaErrorNoKernelImageForDevice, fn, ": this build of mmkernels._C has no sm_90a image of the "
              "kernel (built for ", MMKERNELS_CUDA_ARCHS, "); rebuild with 9.0a in TORCH_CUDA_ARCH_LIST");
  } else {
    err = dtype == at::kHalf ? dispatch_head_dim<__half>(D, p, stream)
                             : dispatch_head_dim<__nv_bfloat16>(D, p, stream);
  }
  C10_CUDA_CHECK(err);
}

}  // namespace

}  // namespace mmk
