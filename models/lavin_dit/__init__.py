"""LaVin-DiT on mmkernels (semantics: ../shared/specs/lavin_dit.md).

* ``config``: :class:`JDiTConfig` and :class:`STVAEConfig`, with presets and ``from_official``.
* ``jdit``: :class:`JDiT`, the joint diffusion transformer.
* ``stvae``: :class:`STVAE`, the causal 3D video autoencoder, with streaming and tiling.
* ``vae_loss``: the ST-VAE's training losses (MSE + LPIPS + PatchGAN + KL) and training step.
* ``convert``: official checkpoints, loaded strictly.
"""

from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.jdit import JDiT
from models.lavin_dit.stvae import STVAE

__all__ = ["JDiT", "JDiTConfig", "STVAE", "STVAEConfig"]
