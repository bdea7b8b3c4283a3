"""nn.Module wrappers over mmkernels ops, state-dict compatible with the modules they replace."""

from mmkernels.nn.joint_attention import JointAttention, Segment
from mmkernels.nn.mask_pooling import MaskPooling
from mmkernels.nn.ms_deform_attn import MSDeformAttn
from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.nn.rope import RotaryEmbedding3D

__all__ = ["JointAttention", "MaskPooling", "MSDeformAttn", "RMSNorm", "RotaryEmbedding3D", "Segment"]
