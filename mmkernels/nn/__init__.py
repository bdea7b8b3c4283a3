"""nn.Module wrappers over mmkernels ops, state-dict compatible with the modules they replace."""

from mmkernels.nn.joint_attention import JointAttention, Segment
from mmkernels.nn.ms_deform_attn import MSDeformAttn
from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.nn.rope import RotaryEmbedding3D

__all__ = ["JointAttention", "MSDeformAttn", "RMSNorm", "RotaryEmbedding3D", "Segment"]
