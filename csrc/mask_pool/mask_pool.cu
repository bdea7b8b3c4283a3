// Mask pooling, host side: argument checks, Params (mask_pool.h) and the launches of kernels.cu. Python glue:
// mmkernels/ops/mask_pool/cuda.py, which allocates the outputs and passes the tap tables of reference.taps.
//
// The tap and range tables are read on the device without a host-side check (that would cost a synchronization per
// call); the kernels clamp every index they take from them into the tensor, so a wrong table gives wrong numbers,
// never an out-of-bounds access.
//
// Host code only: the whole file sits under #ifndef __CUDA_ARCH__, so nvcc's device passes see an empty translation
// unit instead of parsing ATen's headers once more per arch.
#ifndef __CUDA_ARCH__

#include <cmath>
#include <optional>
#include <vector>

#include "common.h"
#include "mask_pool/mask_pool.h"

namespace mmk {
namespace {

constexpr int64_t kIntMax = 2147483647;
constexpr int64_t kGridYZ = 65535;

void check_4d(const at::Tensor& t, const char* name, const char* fn) {
  check_cuda(t, name);
  check_float(t, name);
  MMK_CHECK(t.dim() == 4, fn, ": argument '", name, "' must have 4 dims, got shape ", t.sizes());
}

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n, const at::Tensor& x,
                 const char* fn) {
  check_cuda(t, name);
  check_same_device(x, "features", t, name);
  MMK_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), fn, ": argument '",
            name, "' must be a contiguous ", dtype, " [", n, "] tensor, got ", t.scalar_type(), " of shape ",
            t.sizes());
}

void check_bq(const at::Tensor& t, const char* name, int64_t B, int64_t Q, const at::Tensor& x, const char* fn) {
  check_cuda(t, name);
  check_same_device(x, "features", t, name);
  MMK_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B && t.size(1) == Q && t.is_contiguous(),
            fn, ": argument '", name, "' must be a contiguous float32 [B, Q] = [", B, ", ", Q, "] tensor");
}

// Checks shared by every entry point; the Params fields of the inputs and the tap tables.
mp::Params setup(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& h0, const at::Tensor& h1,
                 const at::Tensor& lh, const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& lw,
                 int64_t mode, double thr, const char* fn) {
  check_4d(features, "features", fn);
  check_4d(masks, "masks", fn);
  check_same_device(features, "features", masks, "masks");
  const int64_t B = features.size(0), C = features.size(1), Hf = features.size(2), Wf = features.size(3);
  const int64_t Q = masks.size(1), Hm = masks.size(2), Wm = masks.size(3);
  MMK_CHECK(masks.size(0) == B, fn, ": argument 'masks' must have features' batch size ", B, ", got shape ",
            masks.sizes());
  MMK_CHECK(mode >= 0 && mode <= 2, fn, ": argument 'mode' must be 0 (official), 1 (hard) or 2 (soft), got ", mode);
  MMK_CHECK(std::isfinite(thr), fn, ": argument 'thr' must be finite, got ", thr);
  MMK_CHECK(B <= kGridYZ && C <= kIntMax && Q <= kIntMax && Hf * Wf <= kIntMax && Hm * Wm <= kIntMax, fn,
            ": sizes beyond the kernels' limits (B <= 65535; C, Q, Hf*Wf, Hm*Wm < 2**31), got features ",
            features.sizes(), " and masks ", masks.sizes());
  MMK_CHECK(Hf * Wf == 0 || Hm * Wm > 0, fn, ": argument 'masks' has an empty grid");
  check_table(h0, "h0", at::kInt, Hf, features, fn);
  check_table(h1, "h1", at::kInt, Hf, features, fn);
  check_table(lh, "lh", at::kFloat, Hf, features, fn);
  check_table(w0, "w0", at::kInt, Wf, features, fn);
  check_table(w1, "w1", at::kInt, Wf, features, fn);
  check_table(lw, "lw", at::kFloat, Wf, features, fn);
  mp::Params p{};
  p.x = features.data_ptr();
  p.m = masks.data_ptr();
  p.h0 = h0.data_ptr<int>();
  p.h1 = h1.data_ptr<int>();
  p.lh = lh.data_ptr<float>();
  p.w0 = w0.data_ptr<int>();
  p.w1 = w1.data_ptr<int>();
  p.lw = lw.data_ptr<float>();
  p.sxb = features.stride(0);
  p.sxc = features.stride(1);
  p.sxh = features.stride(2);
  p.sxw = features.stride(3);
  p.smb = masks.stride(0);
  p.smq = masks.stride(1);
  p.smh = masks.stride(2);
  p.smw = masks.stride(3);
  p.B = static_cast<int>(B);
  p.Q = static_cast<int>(Q);
  p.C = static_cast<int>(C);
  p.Hf = static_cast<int>(Hf);
  p.Wf = static_cast<int>(Wf);
  p.Hm = static_cast<int>(Hm);
  p.Wm = static_cast<int>(Wm);
  p.mode = static_cast<int>(mode);
  p.thr = static_cast<float>(thr);
  p.same_h = Hm == Hf;
  p.same_w = Wm == Wf;
  p.x_cfast = C > 1 && features.stride(1) == 1;
  return p;
}

// The backward's upstream grad dout ([B, Q, C], the features' dtype, any strides) and the forward's denom.
void set_grad_inputs(mp::Params& p, const at::Tensor& dout, const at::Tensor& denom, const at::Tensor& features,
                     const char* fn) {
  check_cuda(dout, "dout");
  check_same_device(features, "features", dout, "dout");
  MMK_CHECK(dout.scalar_type() == features.scalar_type() && dout.dim() == 3 && dout.size(0) == p.B &&
                dout.size(1) == p.Q && dout.size(2) == p.C,
            fn, ": argument 'dout' must be a [B, Q, C] tensor of the features' dtype, got ", dout.sizes());
  check_bq(denom, "denom", p.B, p.Q, features, fn);
  p.dout = dout.data_ptr();
  p.sgb = dout.stride(0);
  p.sgq = dout.stride(1);
  p.sgc = dout.stride(2);
  p.denom = const_cast<float*>(denom.data_ptr<float>());
}

template <typename F>
void dispatch2(at::ScalarType xs, at::ScalarType ms, F&& f) {
  auto inner = [&](auto xtag) {
    switch (ms) {
      case at::kFloat: f(xtag, float{}); break;
      case at::kHalf: f(xtag, __half{}); break;
      case at::kBFloat16: f(xtag, __nv_bfloat16{}); break;
      default: MMK_CHECK(false, "mask_pool: unsupported masks dtype ", ms);
    }
  };
  switch (xs) {
    case at::kFloat: inner(float{}); break;
    case at::kHalf: inner(__half{}); break;
    case at::kBFloat16: inner(__nv_bfloat16{}); break;
    default: MMK_CHECK(false, "mask_pool: unsupported features dtype ", xs);
  }
}

}  // namespace

// Forward of mmkernels/ops/mask_pool/reference.py: writes out (contiguous [B, Q, C], features' dtype) and denom
// (contiguous fp32 [B, Q], the weight sums + eps). h0, h1, lh / w0, w1, lw: the row / column tap tables
// (reference.taps: int32, int32, fp32 of [Hf] / [Wf]). mode 0 official, 1 hard, 2 soft; thr: official the rounded
// sigmoid of the threshold, else the threshold.
void mask_pool_fwd(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& h0, const at::Tensor& h1,
                   const at::Tensor& lh, const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& lw,
                   at::Tensor& out, at::Tensor& denom, int64_t mode, double thr, double eps) {
  const char* const fn = "mask_pool_fwd";
  mp::Params p = setup(features, masks, h0, h1, lh, w0, w1, lw, mode, thr, fn);
  MMK_CHECK(std::isfinite(eps) && eps >= 0, fn, ": argument 'eps' must be finite and >= 0, got ", eps);
  check_cuda(out, "out");
  check_same_device(features, "features", out, "out");
  MMK_CHECK(out.scalar_type() == features.scalar_type() && out.dim() == 3 && out.size(0) == p.B &&
                out.size(1) == p.Q && out.size(2) == p.C && out.is_contiguous(),
            fn, ": argument 'out' must be a contiguous [B, Q, C] tensor of the features' dtype");
  check_bq(denom, "denom", p.B, p.Q, features, fn);
  if (static_cast<int64_t>(p.B) * p.Q * p.C == 0) return;
  MMK_CHECK(static_cast<int64_t>(p.Hf) * p.Wf > 0, fn, ": an empty feature grid needs no kernel (the Python side "
            "handles it)");
  const c10::cuda::CUDAGuard guard(features.device());
  p.out = out.data_ptr();
  p.denom = denom.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  cudaError_t err = cudaSuccess;
  dispatch2(features.scalar_type(), masks.scalar_type(), [&](auto xt, auto mt) {
    err = mp::launch_forward<decltype(xt), decltype(mt)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
}

// dx of the backward: writes dx (the features' shape and dtype, any strides) = (w / denom)^T @ dout. dout: [B, Q, C]
// in the features' dtype, any strides (stride 0 included); denom: the forward's.
void mask_pool_bwd_dx(const at::Tensor& dout, const at::Tensor& denom, const at::Tensor& features,
                      const at::Tensor& masks, const at::Tensor& h0, const at::Tensor& h1, const at::Tensor& lh,
                      const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& lw, at::Tensor& dx, int64_t mode,
                      double thr) {
  const char* const fn = "mask_pool_bwd_dx";
  mp::Params p = setup(features, masks, h0, h1, lh, w0, w1, lw, mode, thr, fn);
  set_grad_inputs(p, dout, denom, features, fn);
  check_cuda(dx, "dx");
  check_same_device(features, "features", dx, "dx");
  MMK_CHECK(dx.scalar_type() == features.scalar_type() && dx.sizes() == features.sizes(), fn,
            ": argument 'dx' must have the features' shape and dtype");
  const int64_t P = static_cast<int64_t>(p.Hf) * p.Wf;
  if (static_cast<int64_t>(p.B) * p.C * P == 0) return;
  if (p.Q == 0) {
    dx.zero_();
    return;
  }
  MMK_CHECK(static_cast<int64_t>((p.C + mp::kDxC - 1) / mp::kDxC) * ((P + mp::kDxP - 1) / mp::kDxP) <= kIntMax, fn,
            ": grid too large");
  const c10::cuda::CUDAGuard guard(features.device());
  p.dx = dx.data_ptr();
  p.sdb = dx.stride(0);
  p.sdc = dx.stride(1);
  p.sdh = dx.stride(2);
  p.sdw = dx.stride(3);
  p.x_cfast = p.C > 1 && dx.stride(1) == 1;
  cudaError_t err = cudaSuccess;
  dispatch2(features.scalar_type(), masks.scalar_type(), [&](auto xt, auto mt) {
    err = mp::launch_dx<decltype(xt), decltype(mt)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
}

// Soft-mode mask grad of the backward: writes dm (contiguous, the masks' shape and dtype). u: fp32 [B, Q],
// sum_c dout * out / denom; rlo, rhi, clo, chi: reference.adjoint_ranges for source tiles of kDmI x kDmJ (8 x 8);
// thr: the threshold.
void mask_pool_bwd_dmask(const at::Tensor& dout, const at::Tensor& denom, const at::Tensor& u,
                         const at::Tensor& features, const at::Tensor& masks, const at::Tensor& h0,
                         const at::Tensor& h1, const at::Tensor& lh, const at::Tensor& w0, const at::Tensor& w1,
                         const at::Tensor& lw, const at::Tensor& rlo, const at::Tensor& rhi, const at::Tensor& clo,
                         const at::Tensor& chi, at::Tensor& dm, double thr) {
  const char* const fn = "mask_pool_bwd_dmask";
  mp::Params p = setup(features, masks, h0, h1, lh, w0, w1, lw, 2, thr, fn);
  set_grad_inputs(p, dout, denom, features, fn);
  check_bq(u, "u", p.B, p.Q, features, fn);
  const int64_t n_ib = (p.Hm + mp::kDmI - 1) / mp::kDmI, n_jb = (p.Wm + mp::kDmJ - 1) / mp::kDmJ;
  check_table(rlo, "rlo", at::kInt, n_ib, features, fn);
  check_table(rhi, "rhi", at::kInt, n_ib, features, fn);
  check_table(clo, "clo", at::kInt, n_jb, features, fn);
  check_table(chi, "chi", at::kInt, n_jb, features, fn);
  check_cuda(dm, "dm");
  check_same_device(features, "features", dm, "dm");
  MMK_CHECK(dm.scalar_type() == masks.scalar_type() && dm.sizes() == masks.sizes() && dm.is_contiguous(), fn,
            ": argument 'dm' must be a contiguous tensor of the masks' shape and dtype");
  if (dm.numel() == 0) return;
  if (static_cast<int64_t>(p.Hf) * p.Wf == 0 || p.C == 0) {
    dm.zero_();
    return;
  }
  MMK_CHECK((p.Q + mp::kDmQ - 1) / mp::kDmQ <= kGridYZ && n_ib * n_jb <= kIntMax, fn, ": grid too large");
  const c10::cuda::CUDAGuard guard(features.device());
  p.u = u.data_ptr<float>();
  p.rlo = rlo.data_ptr<int>();
  p.rhi = rhi.data_ptr<int>();
  p.clo = clo.data_ptr<int>();
  p.chi = chi.data_ptr<int>();
  p.dm = dm.data_ptr();
  p.n_jb = static_cast<int>(n_jb);
  cudaError_t err = cudaSuccess;
  dispatch2(features.scalar_type(), masks.scalar_type(), [&](auto xt, auto mt) {
    err = mp::launch_dmask<decltype(xt), decltype(mt)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
}

}  // namespace mmk

#endif  // __CUDA_ARCH__
