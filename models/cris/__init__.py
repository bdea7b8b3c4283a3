"""CRIS on mmkernels (semantics: ../shared/specs/cris.md).

* ``config``: :class:`CRISConfig` (presets ``cris_r50``, ``cris_r101``, ``tiny``; ``from_official``).
* ``model``: :class:`CRIS`, the official architecture (open_clip CLIP RN backbone, FPN neck, vision-language
  decoder on mmkernels attention, text-generated dynamic-kernel projector).
* ``convert``: OpenAI CLIP weights (``load_clip``) and official checkpoints (``load_official``), strictly, no code run.
* ``transforms``, ``tokenize``, ``metrics``: the official letterbox, tokenization and evaluation.
"""

from models.cris.config import CLIPResNetConfig, CRISConfig

__all__ = ["CRIS", "CRISConfig", "CLIPResNetConfig"]


def __getattr__(name):
    # The model (open_clip, mmkernels) loads on first use, so the data and metric modules stay light to import.
    if name == "CRIS":
        from models.cris.model import CRIS

        return CRIS
    raise AttributeError(f"module 'models.cris' has no attribute {name!r}")
