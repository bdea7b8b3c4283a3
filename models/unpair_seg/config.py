"""Unpair-Seg configuration: the official stage-1 architecture (../shared/specs/unpair_seg.md §8), named presets, and
``from_official``.

Every field keeps the official meaning; the presets differ only in widths and depths, never in structure, so the
state-dict key *pattern* of every preset is the official one (``backbone.clip_model.*``,
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Optional

# 255 x OpenAI's CLIP statistics, RGB, applied to 0..255 pixels (spec §1).
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)

# A ConvNeXt CLIP small enough for CPU tests and the demo: timm's convnext_atto trunk (widths 40/80/160/320,
# depths 2/2/6/2) with open_clip's MLP projection, and a 2-layer 64-wide text tower on the standard BPE vocabulary.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class UnpairSegConfig:
    """Hyper-parameters of Unpair-Seg stage 1 (defaults: the official ``S1_point_seg.yaml``).

    Backbone:
        clip_model_name: open_clip model name (official: ``convnext_large_d_320``); must be a ConvNeXt CLIP.
        clip_cfg: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) that replaces the named
            config (small models for tests and the demo); None uses open_clip's config of ``clip_model_name``.
    Pixel decoder (spec §2): conv_dim, mask_dim, enc_heads, enc_layers, enc_dim_feedforward (hard-coded 1024 in the
        official code), enc_points, common_stride; GroupNorm(norm_groups) in the FPN convs.
    Prompt encoder and mask decoder (spec §§4-5): hidden_dim, dec_heads, dim_feedforward, dec_layers (10 = 9
        layers + the initial prediction head), num_masks (granularity outputs per point; num_masks + 1 mask tokens),
        image_size (the square canvas side: prompt coordinates are normalised by it).
    Inference (spec §7): size_divisibility, pts_per_side, points_per_batch (prompts per decoder chunk),
        score_threshold (on the double-sigmoid IoU), nms_iou / nms_coverage / nms_downsample (inner-NMS).
    Precision: pixel_decoder_dtype "fp32" (official: the pixel decoder always runs in fp32) or "bf16" (our
        deformable attention kernel supports it; fp32 accumulation).
    """

    clip_model_name: str = "convnext_large_d_320"
    clip_cfg: Optional[dict] = None
    pixel_mean: tuple = PIXEL_MEAN
    pixel_std: tuple = PIXEL_STD
    # pixel decoder
    conv_dim: int = 256
    mask_dim: int = 256
    enc_heads: int = 8
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    enc_points: int = 4
    common_stride: int = 4
    norm_groups: int = 32
    # prompt encoder + mask decoder
    hidden_dim: int = 256
    dec_heads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 10
    num_masks: int = 4
    image_size: int = 1024
    # inference
    size_divisibility: int = 32
    pts_per_side: tuple = (20, 20)
    points_per_batch: int = 100
    score_threshold: float = 0.65
    nms_iou: float = 0.5
    nms_coverage: float = 0.7
    nms_downsample: int = 2
    pixel_decoder_dtype: str = "fp32"
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unrecognised official fields, kept

    def __post_init__(self):
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        object.__setattr__(self, "pts_per_side", tuple(int(v) for v in self.pts_per_side))
        if self.clip_cfg is not None:
            object.__setattr__(self, "clip_cfg", copy.deepcopy(dict(self.clip_cfg)))
        if "convnext" not in self.clip_model_name and self.clip_cfg is None:
            raise ValueError(f"UnpairSegConfig: clip_model_name must name a ConvNeXt CLIP (the official code accepts "
                             f"only 'convnext_*'), got {self.clip_model_name!r}")
        for name in ("conv_dim", "mask_dim", "enc_heads", "enc_layers", "enc_dim_feedforward", "enc_points",
                     "common_stride", "norm_groups", "hidden_dim", "dec_heads", "dim_feedforward", "num_masks",
                     "image_size", "size_divisibility", "points_per_batch", "nms_downsample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UnpairSegConfig: {name} must be a positive int, got {v!r}")
        if self.dec_layers < 2:
            raise ValueError(f"UnpairSegConfig: dec_layers must be >= 2 (the initial head plus >= 1 layer), got "
                             f"{self.dec_layers}")
        if self.conv_dim % self.enc_heads or self.hidden_dim % self.dec_heads:
            raise ValueError(f"UnpairSegConfig: conv_dim ({self.conv_dim}) must be divisible by enc_heads "
                             f"({self.enc_heads}) and hidden_dim ({self.hidden_dim}) by dec_heads ({self.dec_heads})")
        if self.conv_dim % self.norm_groups:
            raise ValueError(f"UnpairSegConfig: conv_dim ({self.conv_dim}) must be divisible by norm_groups "
                             f"({self.norm_groups})")
        if self.conv_dim % 2 or self.hidden_dim % 2:
            raise ValueError("UnpairSegConfig: conv_dim and hidden_dim must be even (random-Fourier encodings are "
                             "half sines, half cosines)")
        if self.mask_dim != self.hidden_dim or self.conv_dim != self.hidden_dim:
            raise ValueError(f"UnpairSegConfig: the official decoder reads the pixel decoder's maps unprojected, so "
                             f"conv_dim ({self.conv_dim}), mask_dim ({self.mask_dim}) and hidden_dim "
                             f"({self.hidden_dim}) must be equal")
        if len(self.pts_per_side) != 2 or min(self.pts_per_side) < 1:
            raise ValueError(f"UnpairSegConfig: pts_per_side must be two positive ints, got {self.pts_per_side!r}")
        if self.image_size % self.size_divisibility:
            raise ValueError(f"UnpairSegConfig: image_size ({self.image_size}) must be a multiple of "
                             f"size_divisibility ({self.size_divisibility})")
        for name in ("score_threshold", "nms_iou", "nms_coverage"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"UnpairSegConfig: {name} must be in [0, 1], got {v!r}")
        if self.pixel_decoder_dtype not in ("fp32", "bf16"):
            raise ValueError(f"UnpairSegConfig: pixel_decoder_dtype must be 'fp32' or 'bf16', got "
                             f"{self.pixel_decoder_dtype!r}")

    @property
    def num_decoder_layers(self) -> int:
        """Masked-attention layers (the official ``num_layers = DEC_LAYERS - 1``)."""
        return self.dec_layers - 1

    @property
    def pe_features(self) -> int:
        """Columns of each random-Fourier matrix ``[2, pe_features]`` (128 officially)."""
        return self.hidden_dim // 2

    # -- presets ------------------------------------------------------------------------------------------------------

    @classmethod
    def official(cls, **overrides) -> "UnpairSegConfig":
        """The released model: ConvNeXt-L CLIP (``convnext_large_d_320``), 1024² canvas."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, image_size: int = 128, **overrides) -> "UnpairSegConfig":
        """The official structure at a small width for CPU tests and the demo: a convnext_atto CLIP, 32-wide heads,
        2 encoder layers, 4 decoder heads (3 masked-attention layers, one per level)."""
        kw = dict(clip_model_name="convnext_atto_tiny", clip_cfg=TINY_CLIP, conv_dim=32, mask_dim=32, enc_heads=4,
                  enc_layers=2, enc_dim_feedforward=64, enc_points=2, norm_groups=8, hidden_dim=32, dec_heads=4,
                  dim_feedforward=64, dec_layers=4, image_size=image_size, pts_per_side=(8, 8), points_per_batch=16)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_official(cls, **kwargs) -> "UnpairSegConfig":
        """The config for the official cfg's ``MODEL.OVSEG`` / ``INPUT`` / ``MODEL`` fields, by their YAML names
        (``CLIP_MODEL_NAME``, ``CONVS_DIM``, ``MASK_DIM``, ``EMBED_DIM``, ``NHEADS``, ``DIM_FEEDFORWARD``,
        ``DEC_LAYERS``, ``TRANSFORMER_ENC_LAYERS``, ``NUM_MASKS``, ``SIZE_DIVISIBILITY``, ``COMMON_STRIDE``,
        ``PTS_PER_SIDE`` (the TEST one), ``CROP_SIZE``, ``PIXEL_MEAN``, ``PIXEL_STD``). ``NHEADS`` sets both the
        pixel-decoder and the mask-decoder heads, as officially; ``DIM_FEEDFORWARD`` only the mask decoder (the pixel
        decoder's 1024 is hard-coded). Unknown fields are kept in ``extra``; ``DROPOUT`` != 0 and ``PRE_NORM`` true
        raise, since the released architecture has neither."""
        kw = {str(k).upper(): v for k, v in kwargs.items()}
        table = {"CLIP_MODEL_NAME": "clip_model_name", "CONVS_DIM": "conv_dim", "MASK_DIM": "mask_dim",
                 "EMBED_DIM": "hidden_dim", "DIM_FEEDFORWARD": "dim_feedforward", "DEC_LAYERS": "dec_layers",
                 "TRANSFORMER_ENC_LAYERS": "enc_layers", "NUM_MASKS": "num_masks",
                 "SIZE_DIVISIBILITY": "size_divisibility", "COMMON_STRIDE": "common_stride",
                 "PTS_PER_SIDE": "pts_per_side", "CROP_SIZE": "image_size", "PIXEL_MEAN": "pixel_mean",
                 "PIXEL_STD": "pixel_std"}
        out, extra = {}, {}
        if float(kw.pop("DROPOUT", 0.0)) != 0.0:
            raise ValueError("UnpairSegConfig.from_official: DROPOUT != 0 is not the released architecture")
        if bool(kw.pop("PRE_NORM", False)):
            raise ValueError("UnpairSegConfig.from_official: PRE_NORM true is not the released architecture")
        if "NHEADS" in kw:
            heads = int(kw.pop("NHEADS"))
            out["enc_heads"] = out["dec_heads"] = heads
        for k, v in kw.items():
            if k in table:
                out[table[k]] = v
            else:
                extra[k] = v
        if "image_size" in out and isinstance(out["image_size"], (list, tuple)):
            sizes = tuple(out["image_size"])
            if len(set(sizes)) != 1:
                raise ValueError(f"UnpairSegConfig.from_official: CROP_SIZE must be square, got {sizes}")
            out["image_size"] = int(sizes[0])
        return cls(**out, extra=extra)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
