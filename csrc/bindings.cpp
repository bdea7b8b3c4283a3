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
// mask_pool (csrc/mask_pool/mask_pool.cu)
void mask_pool_fwd(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& h0, const at::Tensor& h1,
                   const at::Tensor& lh, const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& lw,
                   at::Tensor& out, at::Tensor& denom, int64_t mode, double thr, double eps);
void mask_pool_bwd_dx(const at::Tensor& dout, const at::Tensor& denom, const at::Tensor& features,
                      const at::Tensor& masks, const at::Tensor& h0, const at::Tensor& h1, const at::Tensor& lh,
                      const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& lw, at::Tensor& dx, int64_t mode,
                      double thr);
void mask_pool_bwd_dmask(const at::Tensor& dout, const at::Tensor& denom, const at::Tensor& u,
                         const at::Tensor& features, const at::Tensor& masks, const at::Tensor& h0,
                         const at::Tensor& h1, const at::Tensor& lh, const at::Tensor& w0, const at::Tensor& w1,
                         const at::Tensor& lw, const at::Tensor& rlo, const at::Tensor& rhi, const at::Tensor& clo,
                         const at::Tensor& chi, at::Tensor& dm, double thr);
// ms_deform_attn (csrc/ms_deform_attn/ms_deform_attn.cu)
at::Tensor ms_deform_attn_fwd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights);
std::vector<at::Tensor> ms_deform_attn_bwd(const at::Tensor& grad_out, const at::Tensor& value,
                                           const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                           bool value_grad);
at::Tensor ms_deform_attn_bwd_value(const at::Tensor& grad_out, const at::Tensor& value,
                                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                    const at::Tensor& entries, const at::Tensor& offsets);
// mask_nms (csrc/mask_nms/mask_nms.cu)
std::vector<at::Tensor> mask_nms_pack(const at::Tensor& src, const at::Tensor& order, int64_t factor, double lam0,
                                      double lam1, int64_t out_h, int64_t out_w, double threshold);
at::Tensor mask_nms_suppress(const at::Tensor& bits, const at::Tensor& area, double iou_threshold,
                             double coverage_threshold, double eps, bool combine_and);
at::Tensor mask_nms_scan(const at::Tensor& sup);
}  // namespace mmk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels CUDA kernels (see mmkernels/ops/*/cuda.py for the Python side)";
  m.def("cuda_archs", [] { return std::string(MMKERNELS_CUDA_ARCHS); },
        "The TORCH_CUDA_ARCH_LIST this extension was compiled for, e.g. '8.0;9.0a'.");
  m.def("compiled_ops", [] {
          return std::vector<std::string>{"causal_conv3d", "group_norm_silu", "joint_attention", "mask_nms",
                                          "mask_pool", "ms_deform_attn", "rms_norm", "rope3d"};
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
  m.def("mask_pool_fwd", &mmk::mask_pool_fwd,
        "Mask pooling forward (fp32 FMA tiles): writes out [B, Q, C] (contiguous, features' dtype) and denom fp32 "
        "[B, Q] from features [B, C, Hf, Wf] and mask logits [B, Q, Hm, Wm] (any strides) resized through the tap "
        "tables h0, h1, lh, w0, w1, lw (mmkernels/ops/mask_pool/reference.py: taps); mode 0 official, 1 hard, "
        "2 soft. Layouts: csrc/mask_pool/mask_pool.h.",
        py::arg("features"), py::arg("masks"), py::arg("h0"), py::arg("h1"), py::arg("lh"), py::arg("w0"),
        py::arg("w1"), py::arg("lw"), py::arg("out"), py::arg("denom"), py::arg("mode"), py::arg("thr"),
        py::arg("eps"));
  m.def("mask_pool_bwd_dx", &mmk::mask_pool_bwd_dx,
        "Mask pooling backward for the features: writes dx (features' shape, any strides) = (w / denom)^T @ dout.",
        py::arg("dout"), py::arg("denom"), py::arg("features"), py::arg("masks"), py::arg("h0"), py::arg("h1"),
        py::arg("lh"), py::arg("w0"), py::arg("w1"), py::arg("lw"), py::arg("dx"), py::arg("mode"), py::arg("thr"));
  m.def("mask_pool_bwd_dmask", &mmk::mask_pool_bwd_dmask,
        "Mask pooling backward for the masks (soft mode): writes dm (contiguous, masks' shape) through the adjoint "
        "of the resize, gathered per 8x8 source tile over the feature ranges rlo, rhi, clo, chi.",
        py::arg("dout"), py::arg("denom"), py::arg("u"), py::arg("features"), py::arg("masks"), py::arg("h0"),
        py::arg("h1"), py::arg("lh"), py::arg("w0"), py::arg("w1"), py::arg("lw"), py::arg("rlo"), py::arg("rhi"),
        py::arg("clo"), py::arg("chi"), py::arg("dm"), py::arg("thr"));
  m.def("ms_deform_attn_fwd", &mmk::ms_deform_attn_fwd,
        "Multi-scale deformable attention forward: out [B, Q, H*C] (value's dtype) from value [B, S, H, C], "
        "spatial_shapes int64 [L, 2], level_start_index int64 [L], sampling_locations [B, Q, H, L, P, 2] and "
        "attention_weights [B, Q, H, L, P] (fp32 or value's dtype), all contiguous. Layouts: "
        "csrc/ms_deform_attn/msda.h.",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("ms_deform_attn_bwd", &mmk::ms_deform_attn_bwd,
        "Multi-scale deformable attention backward: [grad_value, grad_loc, grad_attn]; grad_value by fp32 atomics "
        "when value_grad, else an empty [0] tensor (see ms_deform_attn_bwd_value). grad_out [B, Q, H*C] contiguous.",
        py::arg("grad_out"), py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("value_grad"));
  m.def("ms_deform_attn_bwd_value", &mmk::ms_deform_attn_bwd_value,
        "Deterministic grad_value [B, S, H, C] (value's dtype): a gather over the CSR plan (entries int64 [E], "
        "offsets int64 [B*S*H + 1]) of mmkernels/ops/ms_deform_attn/plan.py: value_grad_csr.",
        py::arg("grad_out"), py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("entries"), py::arg("offsets"));
  m.def("mask_nms_pack", &mmk::mask_nms_pack,
        "Mask NMS stage 1: binary masks of src [N, H, W] (read through order int64 [N], downsampled by PyTorch's "
        "CUDA bilinear formula when factor > 1) packed 32 pixels per word: (bits int32 [N, ceil(Ho*Wo/32)], "
        "area int32 [N]). Layouts: csrc/mask_nms/mask_nms.cu.",
        py::arg("src"), py::arg("order"), py::arg("factor"), py::arg("lam0"), py::arg("lam1"), py::arg("out_h"),
        py::arg("out_w"), py::arg("threshold"));
  m.def("mask_nms_suppress", &mmk::mask_nms_suppress,
        "Mask NMS stage 2: the bit-packed suppression matrix int32 [N, ceil(N/32)] (popcount intersections, fp32 "
        "IoU/coverage decisions) of the packed masks.",
        py::arg("bits"), py::arg("area"), py::arg("iou_threshold"), py::arg("coverage_threshold"), py::arg("eps"),
        py::arg("combine_and"));
  m.def("mask_nms_scan", &mmk::mask_nms_scan,
        "Mask NMS stage 3: keep flags uint8 [N] of the greedy walk over the suppression matrix (one block).",
        py::arg("sup"));
}
