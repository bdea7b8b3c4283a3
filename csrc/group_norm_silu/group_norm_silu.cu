// GroupNorm (+ SpatialNorm scale/shift) + SiLU, host side: argument checks, the thread tiling of gn.h, the partial-sum
// buffers, and the launches of kernels.cu. Python glue: mmkernels/ops/group_norm_silu/cuda.py, which hands over
// [B, C, D0, D1, D2] views (the Triton backend's canonical form), fp32 weight/bias and the nearest-map factors.
//
// Host code only: the whole file sits under #ifndef __CUDA_ARCH__, so nvcc's device passes (one per arch) see an
// empty translation unit instead of parsing ATen's headers once more per arch.
#ifndef __CUDA_ARCH__

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "group_norm_silu/gn.h"

namespace mmk {
namespace {

constexpr int64_t kIntMax = 2147483647;
constexpr int64_t kDimMax = int64_t{1} << 30;  // D0*D1 and D2: row and column sums in the kernels stay < 2**31
constexpr int64_t kGridYZ = 65535;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

gn::View5 view5(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// A 5-D tensor of x's dtype and device; `like` (when given) fixes its whole shape, else its batch and channels.
void check5(const at::Tensor& t, const char* name, const at::Tensor& x, const char* fn, bool full_shape) {
  check_cuda(t, name);
  check_same_device(x, "x", t, name);
  MMK_CHECK(t.dim() == 5, fn, ": argument '", name, "' must be a 5-D [B, C, D0, D1, D2] view, got shape ",
            t.sizes());
  MMK_CHECK(t.scalar_type() == x.scalar_type(), fn, ": argument '", name, "' must have x's dtype ", x.scalar_type(),
            ", got ", t.scalar_type());
  if (full_shape) {
    MMK_CHECK(t.sizes() == x.sizes(), fn, ": argument '", name, "' must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  } else {
    MMK_CHECK(t.size(0) == x.size(0) && t.size(1) == x.size(1), fn, ": argument '", name, "' must be [B, C, ...] = [",
              x.size(0), ", ", x.size(1), ", ...], got ", t.sizes());
  }
}

void check_vec_f32(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t n,
                   const char* fn) {
  if (!t.has_value()) return;
  check_cuda(*t, name);
  check_same_device(x, "x", *t, name);
  MMK_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n && t->is_contiguous(), fn,
            ": argument '", name, "' must be a contiguous float32 [", n, "] tensor, got ", t->scalar_type(),
            " of shape ", t->sizes());
}

void check_stats(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t B, int64_t G, const char* fn) {
  check_cuda(t, name);
  check_same_device(x, "x", t, name);
  MMK_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B && t.size(1) == G && t.is_contiguous(),
            fn, ": argument '", name, "' must be a contiguous float32 [B, G] = [", B, ", ", G, "] tensor");
}

// Whether t can be read in 16-byte vectors of `vec` channels: unit channel stride, every other stride of a dim
// longer than 1 a multiple of vec, 16-byte aligned start.
bool vec_ok(const at::Tensor& t, int64_t vec) {
  if (t.size(1) > 1 && t.stride(1) != 1) return false;
  for (int d : {0, 2, 3, 4}) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return aligned(t.data_ptr(), 16);
}

// Tiles of a pass over `cols` columns (gn.h: Tiles), with at most `threads` threads per block.
gn::Tiles make_tiles(bool cfast, int vec, int64_t C, int64_t cols, int64_t threads) {
  gn::Tiles tl{};
  if (cfast) {
    tl.bx = static_cast<int>(std::min<int64_t>({C / vec, 32, threads}));
    tl.by = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads / tl.bx, cols)));
    tl.tc = tl.bx * vec;
    tl.tw = tl.by;
  } else {
    tl.bx = static_cast<int>(std::min<int64_t>({cols, 32, threads}));
    tl.by = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads / tl.bx, C)));
    tl.tw = tl.bx;
    tl.tc = tl.by;
  }
  tl.n_ct = static_cast<int>(cdiv(C, tl.tc));
  tl.n_wt = static_cast<int>(cdiv(cols, tl.tw));
  return tl;
}

struct Common {
  gn::Params p{};
  int64_t threads = 0, target = 0;
};

// Checks shared by both passes and the Params fields they determine.
Common setup(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups,
             bool silu, const std::vector<int64_t>& factors, bool first, const std::vector<int64_t>& tuning,
             const char* fn) {
  check_cuda(x, "x");
  check_float(x, "x");
  MMK_CHECK(x.dim() == 5, fn, ": argument 'x' must be a 5-D [B, C, D0, D1, D2] view, got shape ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), D0 = x.size(2), D1 = x.size(3), D2 = x.size(4);
  MMK_CHECK(num_groups >= 1 && C % num_groups == 0, fn, ": argument 'num_groups' must divide C = ", C, ", got ",
            num_groups);
  MMK_CHECK(B <= kGridYZ && C <= kIntMax && D0 * D1 < kDimMax && D2 < kDimMax && B * num_groups <= kIntMax, fn,
            ": x of shape ", x.sizes(), " is beyond the kernels' limits (B <= 65535, D0*D1 and D2 < 2**30, C < 2**31)");
  check_vec_f32(weight, "weight", x, C, fn);
  check_vec_f32(bias, "bias", x, C, fn);
  MMK_CHECK(factors.size() == 3 && factors[0] >= 1 && factors[1] >= 1 && factors[2] >= 1 && factors[0] <= kDimMax &&
                factors[1] <= kDimMax && factors[2] <= kDimMax,
            fn, ": argument 'factors' must be three integers in [1, 2**30] (the nearest map per spatial dim)");
  MMK_CHECK(tuning.size() == 2 && tuning[0] >= 0 && tuning[0] <= gn::kMaxThreads && tuning[1] >= 0, fn,
            ": argument 'tuning' must be [block_threads (0: default, at most 256), target_programs (0: default)]");
  const at::Tensor* mod = scale.has_value() ? &*scale : shift.has_value() ? &*shift : nullptr;
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    if (!t->has_value()) continue;
    check5(**t, name, x, fn, false);
    MMK_CHECK((**t).sizes() == mod->sizes(), fn, ": arguments 'scale' and 'shift' must have the same shape");
  }
  if (mod != nullptr && x.numel() > 0) {
    // The nearest map must cover x exactly (reference.py: resize_plan only makes such maps): the kernels read the
    // source through it, and the backward reduce walks, for each source element, exactly the positions mapped to it.
    const int64_t n[3] = {D0, D1, D2};
    for (int k = 0; k < 3; ++k) {
      const int64_t q = mod->size(2 + k), f = factors[k];
      const bool exact = first && k == 0 ? q >= 2 && n[k] - 1 == f * (q - 1) : q >= 1 && q * f == n[k];
      MMK_CHECK(exact, fn, ": scale/shift of shape ", mod->sizes(), " with factors [", factors[0], ", ", factors[1],
                ", ", factors[2], "] (first=", first, ") do not map onto x of shape ", x.sizes());
    }
  }
  Common cm;
  gn::Params& p = cm.p;
  p.x = view5(x);
  p.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (scale.has_value()) p.scale = view5(*scale);
  if (shift.has_value()) p.shift = view5(*shift);
  p.B = static_cast<int>(B);
  p.C = static_cast<int>(C);
  p.G = static_cast<int>(num_groups);
  p.cpg = static_cast<int>(C / num_groups);
  p.D0 = static_cast<int>(D0);
  p.D1 = static_cast<int>(D1);
  p.D2 = static_cast<int>(D2);
  p.F0 = static_cast<int>(factors[0]);
  p.F1 = static_cast<int>(factors[1]);
  p.F2 = static_cast<int>(factors[2]);
  p.first = first ? 1 : 0;
  p.has_w = weight.has_value();
  p.has_b = bias.has_value();
  p.has_scale = scale.has_value();
  p.has_shift = shift.has_value();
  p.silu = silu;
  p.inv_n = static_cast<float>(1.0 / (static_cast<double>(p.cpg) * D0 * D1 * D2));
  cm.threads = tuning[0] > 0 ? tuning[0] : gn::kMaxThreads;
  cm.target = tuning[1] > 0 ? tuning[1] : 8 * static_cast<int64_t>(sm_count(x.get_device()));
  return cm;
}

// The layout decision (gn.h): threads along the channels unless the columns are the unit-stride axis, 16-byte
// vectors of channels when every tensor of the pass allows them.
void choose_layout(gn::Params& p, const at::Tensor& x, std::initializer_list<const at::Tensor*> dense) {
  const bool unit_c = p.C > 1 && x.stride(1) == 1;
  const bool unit_w = p.D2 > 1 && x.stride(4) == 1;
  p.cfast = unit_c || !unit_w;
  const int64_t vec = 16 / x.element_size();
  bool ok = p.cfast && p.C % vec == 0;
  for (const at::Tensor* t : dense) ok = ok && vec_ok(*t, vec);
  p.vec = ok ? static_cast<int>(vec) : 1;
}

// Row-tiled passes: tiles over (channels, D2) and chunks of D0*D1 rows sized for about `target` blocks.
void row_tiles(gn::Params& p, const Common& cm) {
  gn::Tiles tl = make_tiles(p.cfast, p.vec, p.C, p.D2, cm.threads);
  const int64_t n_rows = static_cast<int64_t>(p.D0) * p.D1;
  const int64_t work = n_rows * tl.n_wt * tl.n_ct * p.B;
  tl.rpp = static_cast<int>(std::clamp<int64_t>(cdiv(work, cm.target), 1, n_rows));
  tl.n_rc = static_cast<int>(cdiv(n_rows, tl.rpp));
  tl.np = static_cast<int64_t>(tl.n_wt) * tl.n_rc;
  MMK_CHECK(tl.np <= kIntMax && tl.n_ct <= kGridYZ, "group_norm_silu: grid of ", tl.np, " x ", tl.n_ct,
            " blocks is too large");
  p.rows = tl;
}

template <typename F>
void dispatch(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: MMK_CHECK(false, "group_norm_silu: unsupported dtype ", s);
  }
}

}  // namespace

// Forward of mmkernels/ops/group_norm_silu/reference.py on [B, C, D0, D1, D2] views: writes y (x's shape and dtype,
// any strides), mean and rstd (contiguous fp32 [B, G]). weight, bias: contiguous fp32 [C] or None. scale, shift:
// None or [B, C, Q0, Q1, Q2] views in x's dtype (either alone, the same shape when both) read through the nearest
// map given by `factors` (F0, F1, F2) and `first` (reference.py: resize_plan). tuning = [block_threads,
// target_programs], 0 for the defaults (256; 8 blocks per SM).
void group_norm_silu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd,
                         int64_t num_groups, double eps, bool silu, std::vector<int64_t> factors, bool first,
                         std::vector<int64_t> tuning) {
  const char* const fn = "group_norm_silu_fwd";
  Common cm = setup(x, weight, bias, scale, shift, num_groups, silu, factors, first, tuning, fn);
  gn::Params& p = cm.p;
  check5(y, "y", x, fn, true);
  check_stats(mean, "mean", x, p.B, p.G, fn);
  check_stats(rstd, "rstd", x, p.B, p.G, fn);
  MMK_CHECK(std::isfinite(eps) && eps >= 0, fn, ": argument 'eps' must be finite and >= 0, got ", eps);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  p.y = view5(y);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  choose_layout(p, x, {&x, &y});
  row_tiles(p, cm);
  auto partials = at::empty({3, p.B, p.C, p.rows.np}, x.options().dtype(at::kFloat));
  const int64_t slab = static_cast<int64_t>(p.B) * p.C * p.rows.np;
  p.pa = partials.data_ptr<float>();
  p.pb = p.pa + slab;
  p.pc = p.pb + slab;
  cudaError_t err = cudaSuccess;
  dispatch(x.scalar_type(), [&](auto tag) { err = gn::launch_forward<decltype(tag)>(p, current_stream()); });
  C10_CUDA_CHECK(err);
}

// Backward of the same op: writes dx (x's shape and dtype, any strides) and, when scale/shift are given, dscale and
// dshift (their shapes); returns (sa, sb), fp32 [B, C]: the per-(b, c) sums of dg and dg * xhat (dbias and dweight
// are their sums over b). dy: x's shape (any strides, stride 0 included); mean, rstd: the forward's.
std::vector<at::Tensor> group_norm_silu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                                            const at::Tensor& rstd, at::Tensor& dx,
                                            const std::optional<at::Tensor>& dscale,
                                            const std::optional<at::Tensor>& dshift, int64_t num_groups, bool silu,
                                            std::vector<int64_t> factors, bool first, std::vector<int64_t> tuning) {
  const char* const fn = "group_norm_silu_bwd";
  Common cm = setup(x, weight, bias, scale, shift, num_groups, silu, factors, first, tuning, fn);
  gn::Params& p = cm.p;
  check5(dy, "dy", x, fn, true);
  check5(dx, "dx", x, fn, true);
  check_stats(mean, "mean", x, p.B, p.G, fn);
  check_stats(rstd, "rstd", x, p.B, p.G, fn);
  for (const auto& [g, t, name] : {std::tuple{&dscale, &scale, "dscale"}, std::tuple{&dshift, &shift, "dshift"}}) {
    MMK_CHECK(g->has_value() == t->has_value(), fn, ": argument '", name, "' must be given exactly when its input is");
    if (g->has_value()) {
      check5(**g, name, x, fn, false);
      MMK_CHECK((**g).sizes() == (**t).sizes(), fn, ": argument '", name, "' must have its input's shape ",
                (**t).sizes(), ", got ", (**g).sizes());
    }
  }
  auto sa = at::zeros({p.B, p.C}, x.options().dtype(at::kFloat));
  auto sb = at::zeros({p.B, p.C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    if (dscale.has_value()) dscale->zero_();
    if (dshift.has_value()) dshift->zero_();
    return {sa, sb};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  p.dy = view5(dy);
  p.dx = view5(dx);
  if (dscale.has_value()) p.dscale = view5(*dscale);
  if (dshift.has_value()) p.dshift = view5(*dshift);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.sa = sa.data_ptr<float>();
  p.sb = sb.data_ptr<float>();
  auto m12 = at::empty({2, p.B, p.G}, x.options().dtype(at::kFloat));
  p.m1 = m12.data_ptr<float>();
  p.m2 = p.m1 + static_cast<int64_t>(p.B) * p.G;
  choose_layout(p, x, {&x, &dy, &dx});
  row_tiles(p, cm);

  // The source-space pass: the modulation's own grid, or without one a virtual grid of whole rows (columns of D2,
  // chunks of D1 sized like the row passes' chunks).
  if (p.has_scale || p.has_shift) {
    const at::Tensor& mod = p.has_scale ? *scale : *shift;
    p.Q0 = static_cast<int>(mod.size(2));
    p.Q1 = static_cast<int>(mod.size(3));
    p.Q2 = static_cast<int>(mod.size(4));
    p.RF0 = p.F0;
    p.RF1 = p.F1;
    p.RF2 = p.F2;
    p.rfirst = p.first;
  } else {
    const gn::Tiles tl = make_tiles(p.cfast, p.vec, p.C, p.D2, cm.threads);
    const int64_t work = static_cast<int64_t>(p.D0) * p.D1 * tl.n_wt * tl.n_ct * p.B;
    const int64_t rpp_h = std::clamp<int64_t>(cdiv(work, cm.target), 1, p.D1);
    p.Q0 = p.D0;
    p.Q1 = static_cast<int>(cdiv(p.D1, rpp_h));
    p.Q2 = p.D2;
    p.RF0 = 1;
    p.RF1 = static_cast<int>(rpp_h);
    p.RF2 = 1;
    p.rfirst = 0;
  }
  gn::Tiles src = make_tiles(p.cfast, p.vec, p.C, p.Q2, cm.threads);
  src.np = static_cast<int64_t>(p.Q0) * p.Q1 * src.n_wt;
  MMK_CHECK(src.np <= kIntMax && src.n_ct <= kGridYZ, fn, ": grid of ", src.np, " x ", src.n_ct,
            " blocks is too large");
  p.src = src;
  auto partials = at::empty({2, p.B, p.C, src.np}, x.options().dtype(at::kFloat));
  p.pa = partials.data_ptr<float>();
  p.pb = p.pa + static_cast<int64_t>(p.B) * p.C * src.np;
  cudaError_t err = cudaSuccess;
  dispatch(x.scalar_type(), [&](auto tag) { err = gn::launch_backward<decltype(tag)>(p, current_stream()); });
  C10_CUDA_CHECK(err);
  return {sa, sb};
}

}  // namespace mmk

#endif  // __CUDA_ARCH__
