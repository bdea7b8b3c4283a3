"""CRIS configuration: the official architecture (../shared/specs/cris.md), named presets, and ``from_official``."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPResNetConfig:
    """An OpenAI CLIP with a ModifiedResNet image tower (the shapes openai/CLIP's ``build_model`` infers)."""

    vision_layers: tuple = (3, 4, 6, 3)
    vision_width: int = 64
    image_resolution: int = 224  # sets the attention pool's positional grid: (image_resolution // 32)^2 + 1 rows
    embed_dim: int = 1024
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12

    @property
    def vision_heads(self) -> int:
        return self.vision_width * 32 // 64

    @property
    def channels(self) -> tuple[int, int, int]:
        """Channels of (layer2, layer3, attnpool) outputs: the v3, v4, v5 features the neck reads."""
        return (self.vision_width * 8, self.vision_width * 16, self.embed_dim)


CLIP_RN50 = CLIPResNetConfig()
CLIP_RN101 = CLIPResNetConfig(vision_layers=(3, 4, 23, 3), embed_dim=512)


@dataclass(frozen=True)
class CRISConfig:
    """Hyper-parameters of CRIS (defaults: the official RN50 RefCOCO config)."""

    clip: CLIPResNetConfig = CLIP_RN50
    word_len: int = 17
    fpn_out: tuple = (256, 512, 1024)
    vis_dim: int = 512
    num_layers: int = 3
    num_head: int = 8
    dim_ffn: int = 2048
    dropout: float = 0.1
    input_size: int = 416

    def __post_init__(self):
        object.__setattr__(self, "fpn_out", tuple(self.fpn_out))
        if self.fpn_out[1] != self.vis_dim:
            raise ValueError(f"CRISConfig: fpn_out[1] ({self.fpn_out[1]}) must equal vis_dim ({self.vis_dim}): the neck's "
                             "fused map is the decoder's input")
        if self.clip.text_width != self.vis_dim:
            raise ValueError(f"CRISConfig: the CLIP text width ({self.clip.text_width}) must equal vis_dim "
                             f"({self.vis_dim}): word features are the cross-attention keys")
        if self.vis_dim % self.num_head:
            raise ValueError(f"CRISConfig: vis_dim {self.vis_dim} is not divisible by num_head {self.num_head}")
        if self.input_size % 32:
            raise ValueError(f"CRISConfig: input_size must be a multiple of 32 (the backbone stride), got "
                             f"{self.input_size}")
        if not 1 <= self.word_len <= self.clip.context_length:
            raise ValueError(f"CRISConfig: word_len must be in [1, {self.clip.context_length}], got {self.word_len}")

    @property
    def fpn_in(self) -> tuple[int, int, int]:
        return self.clip.channels

    @property
    def word_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def output_size(self) -> int:
        """Side of the predicted logit map (stride 4)."""
        return self.input_size // 4

    @classmethod
    def cris_r50(cls, word_len: int = 17) -> "CRISConfig":
        return cls(clip=CLIP_RN50, word_len=word_len)

    @classmethod
    def cris_r101(cls, word_len: int = 17) -> "CRISConfig":
        return cls(clip=CLIP_RN101, word_len=word_len)

    @classmethod
    def tiny(cls, word_len: int = 17, input_size: int = 128) -> "CRISConfig":
        """The official structure at a small width (tests and the CPU demo): one block per stage, 64-d text."""
        clip = CLIPResNetConfig(vision_layers=(1, 1, 1, 1), vision_width=16, image_resolution=64, embed_dim=64,
                                text_width=64, text_heads=2, text_layers=2)
        return cls(clip=clip, word_len=word_len, fpn_out=(32, 64, 128), vis_dim=64, num_head=4, dim_ffn=128,
                   input_size=input_size)

    @classmethod
    def from_official(cls, **kwargs) -> "CRISConfig":
        """The config for the official cfg fields (config/<dataset>/cris_r50.yaml / cris_r101.yaml).

        The CLIP architecture comes from ``clip_pretrain``'s file name (RN50 / RN101, as the official code infers it
        from the weights). Fields that do not change the architecture (paths, optimizer and data settings) are
        ignored; architecture fields that contradict the CLIP (fpn_in, word_dim) raise.
        """
        kw = dict(kwargs)
        name = os.path.basename(str(kw.pop("clip_pretrain", "RN50.pt")))
        clip = {"RN50.pt": CLIP_RN50, "RN101.pt": CLIP_RN101}.get(name)
        if clip is None:
            raise ValueError(f"CRISConfig.from_official: clip_pretrain must name RN50.pt or RN101.pt (the only "
                             f"backbones the neck supports), got {name!r}")
        fpn_in, word_dim = kw.pop("fpn_in", None), kw.pop("word_dim", None)
        if fpn_in is not None and tuple(fpn_in) != clip.channels:
            raise ValueError(f"CRISConfig.from_official: fpn_in {list(fpn_in)} does not match {name} "
                             f"({list(clip.channels)})")
        if word_dim is not None and word_dim != clip.embed_dim:
            raise ValueError(f"CRISConfig.from_official: word_dim {word_dim} does not match {name} ({clip.embed_dim})")
        if kw.pop("intermediate", False):
            raise ValueError("CRISConfig.from_official: intermediate=True (per-layer decoder outputs) is unused by the "
                             "official model and not supported")
        fields = set(cls.__dataclass_fields__) - {"clip"}
        arch = {k: kw.pop(k) for k in list(kw) if k in fields}
        return cls(clip=clip, **arch)
