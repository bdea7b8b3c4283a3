"""mmkernels: Triton and CUDA kernels for multi-modal vision models (CRIS, Unpair-Seg, LaVin-DiT).

Public ops (each with torch / Triton / CUDA backends, autograd, and torch.compile support):

* :func:`rms_norm` - RMSNorm over the last dim, fp32 statistics, apex rounding semantics.
* :func:`rope3d` - LaVin-DiT's 3D rotate-half rotary embedding over a (T, H, W) token grid.
* :func:`joint_attention` - QK RMSNorm + 3D RoPE (:class:`RoPE3DSpec`) + GQA flash attention over several streams.

Choose a backend with ``with mmkernels.use_backend("triton"): ...`` or ``MMKERNELS_BACKEND=triton``; ``auto``
(the default) picks the fastest validated backend for the inputs. ``python -m mmkernels`` lists what runs here.
"""

from mmkernels._backend import BackendError, use_backend
from mmkernels.ops.joint_attention import joint_attention
from mmkernels.ops.rms_norm import rms_norm
from mmkernels.ops.rope3d import RoPE3DSpec, rope3d

__version__ = "0.1.0"

__all__ = ["BackendError", "RoPE3DSpec", "joint_attention", "rms_norm", "rope3d", "use_backend", "__version__"]
