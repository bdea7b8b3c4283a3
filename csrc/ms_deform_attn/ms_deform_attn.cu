// Multi-scale deformable attention, host side: argument checks, the thread mapping of msda.h (channel vector width,
// lanes per group, chunks), output allocation and the launches of msda_fwd.cu / msda_bwd.cu. Python glue:
// mmkernels/ops/ms_deform_attn/cuda.py, which hands over contiguous tensors.
//
// Host code only: the whole file sits under #ifndef __CUDA_ARCH__, so nvcc's device passes (one per arch) see an
// empty translation unit instead of parsing ATen's headers once more per arch.
#ifndef __CUDA_ARCH__

#include <algorithm>
#include <vector>

#include "common.h"
#include "ms_deform_attn/msda.h"

namespace mmk {
namespace {

constexpr int64_t kIndexMax = int64_t{1} << 30;  // bound of the int indices inside one batch element

void check_contiguous(const at::Tensor& t, const char* name, const char* fn) {
  MMK_CHECK(t.is_contiguous(), fn, ": argument '", name, "' must be contiguous (cuda.py makes it so), got strides ",
            t.strides());
}

void check_on(const at::Tensor& t, const char* name, const at::Tensor& value, const char* fn) {
  check_cuda(t, name);
  check_same_device(value, "value", t, name);
  check_contiguous(t, name, fn);
}

// Checks shared by every entry point, and the Params fields they fix.
msda::Params setup(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& loc, const at::Tensor& attn, const char* fn) {
  check_cuda(value, "value");
  check_float(value, "value");
  check_contiguous(value, "value", fn);
  MMK_CHECK(value.dim() == 4, fn, ": argument 'value' must be [B, S, H, C], got shape ", value.sizes());
  const int64_t B = value.size(0), S = value.size(1), H = value.size(2), C = value.size(3);
  for (const auto& [t, name] : {std::pair{&spatial_shapes, "spatial_shapes"},
                                std::pair{&level_start_index, "level_start_index"}}) {
    check_on(*t, name, value, fn);
    MMK_CHECK(t->scalar_type() == at::kLong, fn, ": argument '", name, "' must be int64, got ", t->scalar_type());
  }
  MMK_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, fn,
            ": argument 'spatial_shapes' must be [L, 2], got shape ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  MMK_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L, fn,
            ": argument 'level_start_index' must be [L] = [", L, "], got shape ", level_start_index.sizes());
  MMK_CHECK(L >= 1 && L <= msda::kMaxLevels, fn, ": the kernels take 1 to ", msda::kMaxLevels, " levels, got ", L);
  check_on(loc, "sampling_locations", value, fn);
  check_on(attn, "attention_weights", value, fn);
  MMK_CHECK(loc.dim() == 6 && loc.size(0) == B && loc.size(2) == H && loc.size(3) == L && loc.size(5) == 2, fn,
            ": argument 'sampling_locations' must be [B, Q, H, L, P, 2] with B = ", B, ", H = ", H, ", L = ", L,
            ", got shape ", loc.sizes());
  const int64_t Q = loc.size(1), P = loc.size(4);
  MMK_CHECK(attn.dim() == 5 && attn.sizes() == loc.sizes().slice(0, 5), fn,
            ": argument 'attention_weights' must be [B, Q, H, L, P] = ", loc.sizes().slice(0, 5), ", got shape ",
            attn.sizes());
  const auto ct = loc.scalar_type();
  MMK_CHECK(attn.scalar_type() == ct, fn, ": arguments 'sampling_locations' (", ct, ") and 'attention_weights' (",
            attn.scalar_type(), ") must have the same dtype");
  MMK_CHECK(ct == value.scalar_type() || ct == at::kFloat, fn, ": argument 'sampling_locations' must be float32 or ",
            "value's dtype ", value.scalar_type(), ", got ", ct);
  // Inside one batch the kernels index and loop in int (sample.cuh: grid_for): pixels and level starts (S), value
  // rows (S*H), query heads with their channels (Q*H*C) and sample coordinates (Q*H*L*P*2) stay below 2**30; the
  // batch is walked by gridDim.y (any B).
  MMK_CHECK(S * H < kIndexMax && Q * H * C < kIndexMax && Q * H * L * P * 2 < kIndexMax, fn,
            ": sizes S = ", S, ", H = ", H, ", C = ", C, ", Q = ", Q, ", L*P = ", L * P,
            " are beyond the kernels' limits (S*H, Q*H*C and Q*H*L*P*2 below 2**30)");

  msda::Params p{};
  p.value = value.data_ptr();
  p.loc = loc.data_ptr();
  p.attn = attn.data_ptr();
  p.shapes = spatial_shapes.data_ptr<int64_t>();
  p.starts = level_start_index.data_ptr<int64_t>();
  p.B = B;
  p.S = S;
  p.Q = Q;
  p.H = static_cast<int>(H);
  p.C = static_cast<int>(C);
  p.L = static_cast<int>(L);
  p.P = static_cast<int>(P);
  p.sm_count = value.numel() > 0 ? sm_count(value.get_device()) : 1;
  return p;
}

// The channel mapping (msda.h): 16-byte vectors when C allows them and every channel-indexed buffer of the pass is
// 16-byte aligned; G = the power of two covering the vectors, at most a warp; chunks of G vectors.
void choose_mapping(msda::Params& p, int64_t elem_size, std::initializer_list<const void*> buffers) {
  const int vmax = static_cast<int>(16 / elem_size);
  bool vec = p.C % vmax == 0;
  for (const void* b : buffers) vec = vec && aligned(b, 16);
  p.vec = vec ? vmax : 1;
  p.nvec = p.C / p.vec;
  int G = 1;
  while (G < p.nvec && G < 32) G <<= 1;
  p.G = G;
  p.nch = (p.nvec + G - 1) / G;
}

template <typename F>
void dispatch(at::ScalarType vt, at::ScalarType ct, const char* fn, F&& f) {
  const bool f32 = ct == at::kFloat;
  switch (vt) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kHalf: f32 ? f(__half{}, float{}) : f(__half{}, __half{}); break;
    case at::kBFloat16: f32 ? f(__nv_bfloat16{}, float{}) : f(__nv_bfloat16{}, __nv_bfloat16{}); break;
    default: MMK_CHECK(false, fn, ": unsupported dtype ", vt);
  }
}

bool empty_problem(const msda::Params& p) { return p.B == 0 || p.S == 0 || p.Q == 0 || p.H == 0 || p.C == 0; }

}  // namespace

// out [B, Q, H*C] in value's dtype (mmkernels/ops/ms_deform_attn/reference.py: forward). value [B, S, H, C];
// spatial_shapes int64 [L, 2] (H_l, W_l); level_start_index int64 [L]; sampling_locations [B, Q, H, L, P, 2] and
// attention_weights [B, Q, H, L, P], both float32 or value's dtype; everything contiguous on one CUDA device.
at::Tensor ms_deform_attn_fwd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const char* const fn = "ms_deform_attn_fwd";
  msda::Params p = setup(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, fn);
  auto out = at::empty({p.B, p.Q, static_cast<int64_t>(p.H) * p.C}, value.options());
  if (empty_problem(p)) return out.zero_();
  const c10::cuda::CUDAGuard guard(value.device());
  p.out = out.data_ptr();
  choose_mapping(p, value.element_size(), {p.value, p.out});
  cudaError_t err = cudaSuccess;
  dispatch(value.scalar_type(), sampling_locations.scalar_type(), fn, [&](auto t, auto tc) {
    err = msda::launch_forward<decltype(t), decltype(tc)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
  return out;
}

// [grad_value, grad_loc, grad_attn]. grad_loc and grad_attn (shapes and dtypes of sampling_locations and
// attention_weights) are deterministic. grad_value (value's shape and dtype) is the fp32-atomic scatter when
// `value_grad` is true, else an empty tensor of shape [0] (the deterministic mode computes it with
// ms_deform_attn_bwd_value). grad_out: [B, Q, H*C] contiguous, value's dtype; other arguments as the forward's.
std::vector<at::Tensor> ms_deform_attn_bwd(const at::Tensor& grad_out, const at::Tensor& value,
                                           const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                           bool value_grad) {
  const char* const fn = "ms_deform_attn_bwd";
  msda::Params p = setup(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, fn);
  check_on(grad_out, "grad_out", value, fn);
  MMK_CHECK(grad_out.scalar_type() == value.scalar_type(), fn, ": argument 'grad_out' must have value's dtype ",
            value.scalar_type(), ", got ", grad_out.scalar_type());
  MMK_CHECK(grad_out.dim() == 3 && grad_out.size(0) == p.B && grad_out.size(1) == p.Q &&
                grad_out.size(2) == static_cast<int64_t>(p.H) * p.C,
            fn, ": argument 'grad_out' must be [B, Q, H*C] = [", p.B, ", ", p.Q, ", ",
            static_cast<int64_t>(p.H) * p.C, "], got shape ", grad_out.sizes());
  // Every element of grad_loc and grad_attn is written by the kernel (zeros for samples outside their map).
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  at::Tensor gv32 = value_grad ? at::zeros(value.sizes(), value.options().dtype(at::kFloat)) : at::Tensor();
  auto cast = [&]() {
    if (!value_grad) return at::empty({0}, value.options());
    return value.scalar_type() == at::kFloat ? gv32 : gv32.to(value.scalar_type());
  };
  if (empty_problem(p)) return {cast(), grad_loc.zero_(), grad_attn.zero_()};
  const c10::cuda::CUDAGuard guard(value.device());
  p.grad_out = grad_out.data_ptr();
  p.grad_loc = grad_loc.data_ptr();
  p.grad_attn = grad_attn.data_ptr();
  p.grad_value_f32 = value_grad ? gv32.data_ptr<float>() : nullptr;
  // The fp32 buffer's 16-byte alignment matters only for the sm_90 vector atomics of VEC % 4 == 0 channels.
  choose_mapping(p, value.element_size(), {p.value, p.grad_out, value_grad ? gv32.data_ptr() : p.value});
  cudaError_t err = cudaSuccess;
  dispatch(value.scalar_type(), sampling_locations.scalar_type(), fn, [&](auto t, auto tc) {
    err = msda::launch_backward<decltype(t), decltype(tc)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
  return {cast(), grad_loc, grad_attn};
}

// grad_value [B, S, H, C] in value's dtype, the deterministic gather over the CSR plan of
// mmkernels/ops/ms_deform_attn/plan.py: entries int64 [E] (sample ids), offsets int64 [B*S*H + 1] (row r =
// (b*S + s)*H + h owns entries[offsets[r]:offsets[r+1]], summed in that order). Other arguments as
// ms_deform_attn_bwd's. The plan is trusted to be value_grad_csr's for these inputs (checking its contents would
// cost a device-to-host copy): offsets non-decreasing up to E, every entry of row r a sample of r's batch.
at::Tensor ms_deform_attn_bwd_value(const at::Tensor& grad_out, const at::Tensor& value,
                                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                    const at::Tensor& entries, const at::Tensor& offsets) {
  const char* const fn = "ms_deform_attn_bwd_value";
  msda::Params p = setup(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, fn);
  check_on(grad_out, "grad_out", value, fn);
  MMK_CHECK(grad_out.scalar_type() == value.scalar_type() && grad_out.dim() == 3 && grad_out.size(0) == p.B &&
                grad_out.size(1) == p.Q && grad_out.size(2) == static_cast<int64_t>(p.H) * p.C,
            fn, ": argument 'grad_out' must be a ", value.scalar_type(), " [B, Q, H*C] = [", p.B, ", ", p.Q, ", ",
            static_cast<int64_t>(p.H) * p.C, "] tensor, got ", grad_out.scalar_type(), " ", grad_out.sizes());
  for (const auto& [t, name] : {std::pair{&entries, "entries"}, std::pair{&offsets, "offsets"}}) {
    check_on(*t, name, value, fn);
    MMK_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, fn, ": argument '", name,
              "' must be a 1-D int64 tensor, got ", t->scalar_type(), " of shape ", t->sizes());
  }
  const int64_t rows = p.B * p.S * p.H;
  MMK_CHECK(offsets.size(0) == rows + 1, fn, ": argument 'offsets' must have B*S*H + 1 = ", rows + 1,
            " elements, got ", offsets.size(0));
  auto grad_value = at::empty_like(value);
  if (empty_problem(p)) return grad_value.zero_();
  const c10::cuda::CUDAGuard guard(value.device());
  p.grad_out = grad_out.data_ptr();
  p.grad_value = grad_value.data_ptr();
  p.entries = entries.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  choose_mapping(p, value.element_size(), {p.grad_out, p.grad_value});
  cudaError_t err = cudaSuccess;
  dispatch(value.scalar_type(), sampling_locations.scalar_type(), fn, [&](auto t, auto tc) {
    err = msda::launch_value_grad_gather<decltype(t), decltype(tc)>(p, current_stream());
  });
  C10_CUDA_CHECK(err);
  return grad_value;
}

}  // namespace mmk

#endif  // __CUDA_ARCH__
