"""Configurations of the LaVin-DiT models, with named presets and constructors from the official keyword arguments
(design.md §6). Semantics: ../shared/specs/lavin_dit.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class STVAEConfig:
    """Architecture hyper-parameters (defaults: the official constructor, spec §2.1)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    # The official inference.py builds the VAE with 512 (the constructor default is 320); overlap factor 0.25.
    tile_sample_min_size: int = 512
    tile_overlap: float = 0.25

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("STVAEConfig.block_out_channels: expected at least one stage")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"STVAEConfig.block_out_channels: {c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        r = self.temporal_compression_ratio
        if r < 1 or r & (r - 1) or r > 2 ** (n - 1):
            raise ValueError(f"STVAEConfig.temporal_compression_ratio: expected a power of two <= 2**{n - 1}, got {r}")

    @classmethod
    def official(cls) -> "STVAEConfig":
        return cls()

    @classmethod
    def from_official(cls, **kwargs) -> "STVAEConfig":
        """The config for ``AutoencoderKLSTVAE(**kwargs)`` (the official constructor's keyword arguments).

        Arguments that do not change the architecture (load_path, use_checkpoint, tile_sample_min_size_t, the block
        type names) are accepted and ignored; variants the official code cannot build correctly are refused.
        """
        kw = dict(kwargs)
        act = kw.pop("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"STVAEConfig.from_official: act_fn {act!r} is not supported (the ST-VAE uses 'silu')")
        for flag in ("use_quant_conv", "use_post_quant_conv"):
            if kw.pop(flag, False):
                # The official quant_conv is built with 2*out_channels instead of 2*latent_channels (spec §2.10).
                raise ValueError(f"STVAEConfig.from_official: {flag}=True is not supported (the released model has "
                                 "none, and the official code builds quant_conv with the wrong width)")
        for ignored in ("load_path", "use_checkpoint", "tile_sample_min_size_t", "down_block_types", "up_block_types"):
            kw.pop(ignored, None)
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise ValueError(f"STVAEConfig.from_official: unknown argument(s) {', '.join(unknown)}")
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "STVAEConfig":
        """A small model with the official structure (for tests and CPU demos)."""
        return cls(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_stages(self) -> int:
        """How many of the first stages halve time (encoder) / double it (decoder)."""
        return int(math.log2(self.temporal_compression_ratio))




@dataclass(frozen=True)
class JDiTConfig:
    """J-DiT hyper-parameters (spec §1.1). Defaults: the official ``LaVinDiT()`` class defaults.

    ``kv_group`` is the number of query heads sharing one KV head (the official meaning): num_kv_heads =
    num_heads // kv_group. ``rope_split`` is the (t, h, w) split of the head dim; None picks it (see
    :meth:`resolved_rope_split`).
    """

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    kv_group: int = 1
    patch_size: int = 2
    in_channels: int = 16
    drop_path: float = 0.0
    rope_split: Optional[tuple] = None
    rope_base: float = 10000.0
    grad_checkpointing: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "depth", "num_heads", "kv_group", "patch_size", "in_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"JDiTConfig.{name}: expected a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"JDiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.num_heads % self.kv_group:
            raise ValueError(f"JDiTConfig: num_heads {self.num_heads} is not divisible by kv_group {self.kv_group}")
        if self.head_dim % 2:
            raise ValueError(f"JDiTConfig: head dim {self.head_dim} must be even (rotate-half RoPE)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"JDiTConfig.drop_path: expected a rate in [0, 1), got {self.drop_path}")
        split = self.rope_split
        if split is not None:
            split = tuple(split)
            if len(split) != 3 or any(p % 2 or p < 0 for p in split) or sum(split) != self.head_dim:
                raise ValueError(f"JDiTConfig.rope_split: expected 3 even parts summing to the head dim "
                                 f"{self.head_dim}, got {split}")
            object.__setattr__(self, "rope_split", split)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_group

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size: 8D/3 floored to a multiple of 64 (spec §1.1)."""
        return int((4 * self.hidden_size * 2 / 3) / 64) * 64

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def resolved_rope_split(self) -> tuple:
        """The (t, h, w) RoPE split. Official: head_dim // 3 per axis, which needs head_dim % 6 == 0 (72 -> 24 each).
        Otherwise (the thesis's head dim 64, which the official code cannot run), our choice: every axis gets the
        largest even share <= head_dim / 3, and the remainder goes to the spatial axes two channels at a time, h
        first (64 -> (20, 22, 22)): spatial grids are larger than the number of frames in every task, so spatial
        axes get the extra frequencies."""
        if self.rope_split is not None:
            return self.rope_split
        hd = self.head_dim
        base = (hd // 3) // 2 * 2
        parts = [base, base, base]
        rem, i = hd - 3 * base, 1
        while rem:
            parts[i] += 2
            rem -= 2
            i = 2 if i == 1 else 1
        return tuple(parts)

    # -- presets (thesis sizes; the 3.4B one is the released LaVinDiT_3B_2) -------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "JDiTConfig":
        presets = {
            "tiny": dict(hidden_size=128, depth=2, num_heads=4, kv_group=2),
            "0.1B": dict(hidden_size=512, depth=12, num_heads=8, kv_group=1),
            "1.0B": dict(hidden_size=1024, depth=28, num_heads=16, kv_group=1),
            "3.4B": dict(hidden_size=2304, depth=22, num_heads=32, kv_group=4),
            "default": {},
        }
        if name not in presets:
            raise ValueError(f"JDiTConfig.preset: unknown preset {name!r}; expected one of {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_official(cls, **kwargs) -> "JDiTConfig":
        """The config for ``LaVinDiT(**kwargs)`` (the official constructor's keyword arguments: hidden_size, depth,
        num_heads, kv_group, patch_size (an int or a square [p, p]), in_channels, drop_path, uncond_ratio (stored
        but unused by the official code, so ignored here))."""
        kw = dict(kwargs)
        kw.pop("uncond_ratio", None)
        if "patch_size" in kw and not isinstance(kw["patch_size"], int):
            p = tuple(kw["patch_size"])
            if len(p) != 2 or p[0] != p[1]:
                raise ValueError(f"JDiTConfig.from_official: patch_size must be square, got {list(p)}")
            kw["patch_size"] = p[0]
        unknown = sorted(set(kw) - {"hidden_size", "depth", "num_heads", "kv_group", "patch_size", "in_channels",
                                    "drop_path"})
        if unknown:
            raise ValueError(f"JDiTConfig.from_official: unknown argument(s) {', '.join(unknown)}")
        return cls(**kw)
