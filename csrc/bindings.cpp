// mmkernels._C: the compiled CUDA kernels. Python reaches them through mmkernels/ops/<op>/cuda.py only.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#ifndef MMKERNELS_CUDA_ARCHS
#define MMKERNELS_CUDA_ARCHS "unknown"
#endif

namespace mmk {
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps);
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd);
at::Tensor rope3d(const at::Tensor& x, const at::Tensor& inv_freq, std::vector<int64_t> grid,
                  std::vector<int64_t> split, std::vector<int64_t> offsets, bool inverse);
void joint_attention_fwd(const at::Tensor& q, const std::optional<at::Tensor>& q_weight,
                         const std::optional<at::Tensor>& q_rstd, const std::optional<at::Tensor>& inv_freq,
                         const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t tok_off,
                         int64_t norm_mode, double eps, std::vector<int64_t> rope, double scale);
void joint_attention_fwd_sm90(const at::Tensor& q, const std::optional<at::Tensor>& q_weight,
                              const std::optional<at::Tensor>& q_rstd, const std::optional<at::Tensor>& inv_freq,
                              const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                              int64_t tok_off, int64_t norm_mode, double eps, std::vector<int64_t> rope, double scale);
at::Tensor causal_conv3d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& cache, int64_t stride, bool replicate);
at::Tensor causal_conv3d_fwd_sm90(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cache,
                                  int64_t stride, bool replicate);
void group_norm_silu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd,
                         int64_t num_groups, double eps, bool silu, std::vector<int64_t> factors, bool first,
                         std::vector<int64_t> tuning);
std::vector<at::Tensor> group_norm_silu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                                            const at::Tensor& rstd, at::Tensor& dx,
                                            const std::optional<at::Tensor>& dscale,
                                            const std::optional<at::Tensor>& dshift, int64_t num_groups, bool silu,
                                            std::vector<int64_t> factors, bool first, std::vector<int64_t> tuning);
}  // namespace mmk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels CUDA kernels (see mmkernels/ops/*/cuda.py for the Python side)";
  m.def("cuda_archs", [] { return std::string(MMKERNELS_CUDA_ARCHS); },
        "The TORCH_CUDA_ARCH_LIST this extension was compiled for, e.g. '8.0;9.0a'.");
  m.def("compiled_ops", [] {
          return std::vector<std::string>{"causal_conv3d", "group_norm_silu", "joint_attention", "rms_norm", "rope3d"};
        },
        "Names of the ops whose CUDA kernels are compiled into this extension.");
  m.def("rms_norm_fwd", &mmk::rms_norm_fwd, "RMSNorm forward over the last dim of a 2-D [M, N] view.",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_bwd", &mmk::rms_norm_bwd, "RMSNorm backward: (dx, dw partial sums [P, N] fp32 or empty).",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"));
  m.def("rope3d", &mmk::rope3d, "3D rotate-half RoPE of x [B, L, H, D] (inverse=True rotates by -theta).",
        py::arg("x"), py::arg("inv_freq"), py::arg("grid"), py::arg("split"), py::arg("offsets"), py::arg("inverse"));
  m.def("joint_attention_fwd", &mmk::joint_attention_fwd,
        "Joint attention forward of one stream (fp16/bf16, D in 64/72/80/96/128, sm_80+): writes out [B, L, Hq*D] "
        "and lse[:, :, tok_off:tok_off+L] from raw q [B, L, Hq*D] (norm + RoPE in the prologue) and the joint "
        "k, v [B, Hkv, Ltot, D]. norm_mode 0/1 (full, needs q_rstd [B, L])/2 (head); rope = [] or [grid_h, grid_w, "
        "off_t, off_h, off_w, pairs_t, pairs_h]. Layouts: csrc/joint_attention/joint_attention.cu.",
        py::arg("q"), py::arg("q_weight"), py::arg("q_rstd"), py::arg("inv_freq"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("tok_off"), py::arg("norm_mode"), py::arg("eps"), py::arg("rope"),
        py::arg("scale"));
  m.def("joint_attention_fwd_sm90", &mmk::joint_attention_fwd_sm90,
        "joint_attention_fwd computed by the sm_90a kernel (wgmma, TMA, warp specialization): same arguments and "
        "outputs; Hopper only, and only in builds with 9.0a in TORCH_CUDA_ARCH_LIST.",
        py::arg("q"), py::arg("q_weight"), py::arg("q_rstd"), py::arg("inv_freq"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("tok_off"), py::arg("norm_mode"), py::arg("eps"), py::arg("rope"),
        py::arg("scale"));
  m.def("causal_conv3d_fwd", &mmk::causal_conv3d_fwd,
        "Causal 3D convolution forward (sm_80 mma.sync kernel, fp16/bf16): y [B, Cout, T_out, Ho, Wo] channels_last_3d "
        "from x [B, Cin, T, H, W] channels_last_3d, the weight reordered to a contiguous [Cout, kt, kh, kw, Cin], "
        "bias [Cout] or None, cache [B, Cin, kt-1, H, W] channels_last_3d or None; Cin, Cout multiples of 8. "
        "Layouts: csrc/causal_conv3d/conv.h.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("cache"), py::arg("stride"), py::arg("replicate"));
  m.def("causal_conv3d_fwd_sm90", &mmk::causal_conv3d_fwd_sm90,
        "causal_conv3d_fwd computed by the sm_90a kernel (wgmma): same arguments and output; Hopper only, and only "
        "in builds with 9.0a in TORCH_CUDA_ARCH_LIST.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("cache"), py::arg("stride"), py::arg("replicate"));
  m.def("group_norm_silu_fwd", &mmk::group_norm_silu_fwd,
        "GroupNorm [* scale + shift] [SiLU] forward on [B, C, D0, D1, D2] views: writes y, mean and rstd [B, G] "
        "fp32. weight/bias fp32 [C] or None; scale/shift [B, C, Q0, Q1, Q2] or None, read through the nearest map "
        "(factors [F0, F1, F2], first); tuning [block_threads, target_programs] (0: defaults). "
        "Layouts: csrc/group_norm_silu/gn.h.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("eps"), py::arg("silu"), py::arg("factors"),
        py::arg("first"), py::arg("tuning"));
  m.def("group_norm_silu_bwd", &mmk::group_norm_silu_bwd,
        "GroupNorm [* scale + shift] [SiLU] backward: writes dx and dscale/dshift (when scale/shift are given), "
        "returns (sa, sb) fp32 [B, C], the per-(batch, channel) sums whose batch sums are dbias and dweight.",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dscale"), py::arg("dshift"), py::arg("num_groups"),
        py::arg("silu"), py::arg("factors"), py::arg("first"), py::arg("tuning"));
}
