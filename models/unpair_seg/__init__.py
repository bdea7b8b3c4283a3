"""Unpair-Seg on mmkernels (semantics: ../shared/specs/unpair_seg.md; thesis ch. 3).

Stage 1, the promptable mask generator (official checkpoint ``stage1.pth``):

* ``config``: :class:`UnpairSegConfig` (presets ``official``, ``tiny``; ``from_official``).
* ``backbone``: the frozen open_clip ConvNeXt CLIP (res2..res5, ``clip_vis_dense``, region and text embeddings).
* ``pixel_decoder``: the MSDeformAttn pixel decoder on ``mmkernels.nn.MSDeformAttn``.
* ``prompt_encoder``, ``mask_decoder``: point and box prompts, masked cross-attention, 10 prediction heads.
* ``model``: :class:`UnpairSegS1` (the official meta-architecture, pre- and post-processing), ``convert`` (strict
  official checkpoint loading), ``preprocess``, ``infer`` (CLI), ``official_style`` (the official-style oracle and
  benchmark baseline: grid_sample deformable attention, upsample-then-filter, dense NMS, interpolate + einsum pooling).

Stage 2, mask-entity alignment, and open-vocabulary inference: ``entities``, ``region``, ``adapter``, ``alignment``,
``stage2``, ``templates``, ``classify``, ``panoptic``, ``metrics``, ``eval``.
"""

from models.unpair_seg.config import TINY_CLIP, UnpairSegConfig

__all__ = ["UnpairSegConfig", "UnpairSegS1", "UnpairSegS2", "TINY_CLIP"]


def __getattr__(name):
    # The models (open_clip, mmkernels) load on first use, so the data and metric modules stay light to import.
    if name == "UnpairSegS1":
        from models.unpair_seg.model import UnpairSegS1

        return UnpairSegS1
    if name == "UnpairSegS2":
        from models.unpair_seg.stage2 import UnpairSegS2

        return UnpairSegS2
    raise AttributeError(f"module 'models.unpair_seg' has no attribute {name!r}")
