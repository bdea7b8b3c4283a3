"""mmkernels: Triton and CUDA kernels for multi-modal vision models (CRIS, Unpair-Seg, LaVin-DiT).

Public ops (each with torch / Triton / CUDA backends, autograd, and torch.compile support):

* :func:`rms_norm` - RMSNorm over the last dim, fp32 statistics, apex rounding semantics.
* :func:`rope3d` - LaVin-DiT's 3D rotate-half rotary embedding over a (T, H, W) token grid.
* :func:`joint_attention` - QK RMSNorm + 3D RoPE (:class:`RoPE3DSpec`) + GQA flash attention over several streams.
* :func:`group_norm_silu` - GroupNorm (+ SpatialNorm scale/shift read at latent resolution) + SiLU (torch / Triton).
* :func:`adarn` - LaVin-DiT's fused AdaRN: RMSNorm, (1 + scale), tanh(gate), residual add in one pass (torch / Triton).
* :func:`causal_conv3d` - ST-VAE's causal 3D conv (replicated first frame, stride, streaming cache) as an implicit
  GEMM with no padded copies (torch / Triton).
* :func:`ms_deform_attn` - multi-scale deformable attention (Deformable-DETR / Unpair-Seg), fp32 accumulation,
  bf16/fp16/fp32 I/O, deterministic backward option (torch / Triton).
* :func:`mask_pool` - Unpair-Seg's mask pooling: mask logits resized on the fly (never materialized) + masked mean.
* :func:`mask_nms` - Unpair-Seg's mask NMS by IoU and coverage: bit-packed masks, pairwise intersections and the
  greedy scan on the GPU, decisions identical to the official loop (no autograd: indices).

Choose a backend with ``with mmkernels.use_backend("triton"): ...`` or ``MMKERNELS_BACKEND=triton``; ``auto``
(the default) picks the fastest validated backend for the inputs. ``python -m mmkernels`` lists what runs here.
"""

from mmkernels._backend import BackendError, use_backend
from mmkernels.ops.adarn import adarn
from mmkernels.ops.causal_conv3d import causal_conv3d
from mmkernels.ops.group_norm_silu import group_norm_silu
from mmkernels.ops.joint_attention import joint_attention
from mmkernels.ops.mask_nms import mask_nms
from mmkernels.ops.mask_pool import mask_pool
from mmkernels.ops.ms_deform_attn import ms_deform_attn
from mmkernels.ops.rms_norm import rms_norm
from mmkernels.ops.rope3d import RoPE3DSpec, rope3d

__version__ = "0.1.0"

__all__ = ["BackendError", "RoPE3DSpec", "group_norm_silu", "joint_attention", "rms_norm", "rope3d", "use_backend",
           "adarn", "causal_conv3d", "ms_deform_attn", "mask_pool", "mask_nms",
           "__version__"]
