"""The Unpair-Seg pixel decoder (``sem_seg_head.pixel_decoder``; ../shared/specs/unpair_seg.md §2, §3.1, §10).

Mask2Former's ``MSDeformAttnPixelDecoder`` with Unpair-Seg's changes: ``input_proj`` normalises with LayerNorm2d
(eps 1e-6) instead of GroupNorm, the positional encoding is SAM's random-Fourier one (``pe_layer``), and the
FFN width is its own field (``cfg.enc_dim_feedforward``, hard-coded 1024 officially). Attribute names are the
official state-dict paths::

    input_proj.{i}.0 (Conv2d 1x1, bias) .1 (LayerNorm2d)     i = 0, 1, 2 <- res5, res4, res3
    pe_layer.positional_encoding_gaussian_matrix            [2, conv_dim / 2] (persistent, random: load it)
    transformer.level_embed                                 [3, conv_dim]
    transformer.encoder.layers.{j}.{self_attn, norm1, linear1, linear2, norm2}    (post-norm, ReLU FFN)
    adapter_1 (Conv2d 1x1, no bias, norm GN), layer_1 (Conv2d 3x3, no bias, norm GN, ReLU)     (res2 FPN level)
    mask_features (Conv2d 1x1, bias)

Data flow (N images of H x W, H and W multiples of 32; C = conv_dim)::

    res5, res4, res3 -> input_proj -> src_l [N, C, h_l, w_l];  pos_l = PE(h_l, w_l) + level_embed[l]
    flatten levels in the order (res5, res4, res3) -> [N, S, C];  6 x (MSDeformAttn(src + pos, ref, src) -> +, LN
        -> FFN -> +, LN)  (reference points = pixel centres of every level, shared by all levels)
    split back -> out = [s32, s16, s8] [N, C, h_l, w_l]
    y = layer_1(adapter_1(res2) + bilinear(s8 -> H/4 x W/4, align_corners=False));  out.append(y)
    returns (mask_features(y) [N, mask_dim, H/4, W/4], out[0] = s32, [s32, s16, s8])

Precision (``cfg.pixel_decoder_dtype``):
    "fp32" (official): autocast disabled, features cast to fp32, everything in fp32.
    "bf16": convolutions and linears (the encoder's projections and FFN, the FPN convs) under bf16 autocast, with
        the residual stream, the LayerNorms, the positional encodings and the reference points kept in fp32; the
        deformable sampling gets bf16 values and fp32 locations (mmkernels.ms_deform_attn accumulates in fp32).
    All three outputs are fp32 in both modes, so downstream modules see one dtype whatever the option.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.nn import MSDeformAttn
from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.layers import Conv2d, LayerNorm2d, PositionEmbeddingRandom, c2_xavier_fill

# The official IN_FEATURES and DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES (spec §8).
IN_FEATURES = ("res2", "res3", "res4", "res5")
TRANSFORMER_IN_FEATURES = ("res3", "res4", "res5")


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm deformable self-attention layer: x = LN1(x + attn(x + pos, ref, x)); x = LN2(x + FFN(x)).
    (Dropout is 0.0 in the released config, so there are no dropout modules; they hold no state.)"""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> torch.Tensor:
        """src, pos [N, S, C]; reference_points [N, S, L, 2] -> [N, S, C] (in src's dtype)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + attn.to(src.dtype))
        ffn = self.linear2(F.relu(self.linear1(src)))
        return self.norm2(src + ffn.to(src.dtype))


class MSDeformAttnEncoder(nn.Module):
    """``layers``: the stack of :class:`MSDeformAttnEncoderLayer`."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device) -> torch.Tensor:
        """Pixel centres ((j + 0.5) / W_l, (i + 0.5) / H_l) of every level, concatenated in level order and
        repeated for every level (valid ratios are 1: no padding masks): [batch, S, L, 2] fp32."""
        refs = []
        for h, w in spatial_shapes:
            # linspace as officially (its rounding differs from (arange + 0.5) / n in the last ulp)
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            refs.append(torch.stack([ref_x.reshape(-1) / w, ref_y.reshape(-1) / h], -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """``level_embed`` [L, C] and ``encoder``; official init: xavier_uniform on every >1-D parameter, then each
    MSDeformAttn's own reset, then level_embed ~ N(0, 1)."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int,
                 num_feature_levels: int, enc_n_points: int):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(num_encoder_layers, d_model=d_model, d_ffn=dim_feedforward,
                                           n_levels=num_feature_levels, n_heads=nhead, n_points=enc_n_points)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """srcs [N, C, h_l, w_l] (fp32), pos_embeds [C, h_l, w_l] (fp32) per level ->
        (memory [N, S, C], spatial_shapes [L, 2] int64, level_start_index [L] int64, shapes as ints)."""
        n = srcs[0].shape[0]
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([(p.flatten(1).transpose(0, 1) + self.level_embed[lvl].to(p.dtype))
                              for lvl, p in enumerate(pos_embeds)], 0)[None]
        device = src_flat.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        with torch.autocast(device.type, enabled=False):
            ref = MSDeformAttnEncoder.reference_points(shapes, n, device)
        memory = self.encoder(src_flat, pos_flat.expand(n, -1, -1), ref, spatial_shapes, level_start_index)
        return memory, spatial_shapes, level_start_index, shapes


def _shape_entry(name: str, v) -> tuple[int, int]:
    if hasattr(v, "channels") and hasattr(v, "stride"):
        v = (v.channels, v.stride)
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in v):
        raise TypeError(f"MSDeformAttnPixelDecoder: input_shape[{name!r}] must be a (channels, stride) pair of ints, "
                        f"got {v!r}")
    if v[0] < 1 or v[1] < 1:
        raise ValueError(f"MSDeformAttnPixelDecoder: input_shape[{name!r}] must be positive, got {v!r}")
    return int(v[0]), int(v[1])


class MSDeformAttnPixelDecoder(nn.Module):
    """The pixel decoder (see the module docstring).

    Args:
        cfg: conv_dim, mask_dim, enc_heads, enc_layers, enc_dim_feedforward, enc_points, norm_groups, common_stride,
            pixel_decoder_dtype.
        input_shape: {name: (channels, stride)} of the backbone features; res2..res5 are used (the official
            IN_FEATURES; other names such as ``stem`` / ``clip_vis_dense`` are ignored), res3..res5 feed the
            deformable encoder, the features of stride below 8 down to ``common_stride`` (res2) the FPN levels.
    """

    def __init__(self, cfg: UnpairSegConfig, input_shape: Mapping[str, tuple[int, int]]):
        super().__init__()
        if not isinstance(cfg, UnpairSegConfig):
            raise TypeError(f"MSDeformAttnPixelDecoder: cfg must be an UnpairSegConfig, got {type(cfg).__name__}")
        if not isinstance(input_shape, Mapping):
            raise TypeError(f"MSDeformAttnPixelDecoder: input_shape must be a dict name -> (channels, stride), got "
                            f"{type(input_shape).__name__}")
        missing = [k for k in IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(f"MSDeformAttnPixelDecoder: input_shape lacks {missing} (needs {list(IN_FEATURES)})")
        shapes = {k: _shape_entry(k, input_shape[k]) for k in IN_FEATURES}
        self.cfg = cfg
        self.in_features = sorted(IN_FEATURES, key=lambda k: shapes[k][1])
        self.feature_channels = [shapes[k][0] for k in self.in_features]
        self.feature_strides = [shapes[k][1] for k in self.in_features]
        self.transformer_in_features = sorted(TRANSFORMER_IN_FEATURES, key=lambda k: shapes[k][1])
        t_channels = [shapes[k][0] for k in self.transformer_in_features]
        self.transformer_feature_strides = [shapes[k][1] for k in self.transformer_in_features]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        conv_dim = cfg.conv_dim

        # low to high resolution: input_proj[0] projects res5
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), LayerNorm2d(conv_dim, eps=1e-6))
            for c in t_channels[::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=cfg.enc_heads, num_encoder_layers=cfg.enc_layers,
            dim_feedforward=cfg.enc_dim_feedforward, num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=cfg.enc_points)
        self.pe_layer = PositionEmbeddingRandom(conv_dim // 2)

        self.mask_dim = cfg.mask_dim
        self.mask_features = Conv2d(conv_dim, cfg.mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3
        self.common_stride = cfg.common_stride
        min_stride = min(self.transformer_feature_strides)
        levels = math.log2(min_stride) - math.log2(cfg.common_stride)
        if levels < 0 or levels != int(levels):
            raise ValueError(f"MSDeformAttnPixelDecoder: common_stride ({cfg.common_stride}) must be a power-of-two "
                             f"divisor of the smallest encoder stride ({min_stride})")
        self.num_fpn_levels = int(levels)
        fpn_channels = self.feature_channels[:self.num_fpn_levels]
        if len(fpn_channels) < self.num_fpn_levels or any(
                s >= min_stride for s in self.feature_strides[:self.num_fpn_levels]):
            raise ValueError(f"MSDeformAttnPixelDecoder: common_stride {cfg.common_stride} needs "
                             f"{self.num_fpn_levels} feature(s) finer than stride {min_stride}; strides are "
                             f"{dict(zip(self.in_features, self.feature_strides))}")
        for idx, c in enumerate(fpn_channels):
            # GN makes a conv bias redundant (detectron2: bias only without a norm)
            lateral = Conv2d(c, conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(cfg.norm_groups, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=False,
                            norm=nn.GroupNorm(cfg.norm_groups, conv_dim), activation=F.relu)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)

    def _fpn_convs(self, idx: int) -> tuple[Conv2d, Conv2d]:
        """(lateral, output) conv of the idx-th FPN level counted from the coarsest (officially lateral_convs[::-1])."""
        k = self.num_fpn_levels - idx
        return getattr(self, f"adapter_{k}"), getattr(self, f"layer_{k}")

    def _check_features(self, features) -> None:
        if not isinstance(features, Mapping):
            raise TypeError(f"MSDeformAttnPixelDecoder.forward_features: features must be a dict name -> tensor, got "
                            f"{type(features).__name__}")
        n = None
        for k, c, s in zip(self.in_features, self.feature_channels, self.feature_strides):
            if k not in features:
                raise ValueError(f"MSDeformAttnPixelDecoder.forward_features: features lacks {k!r} (needs "
                                 f"{self.in_features})")
            f = features[k]
            if not isinstance(f, torch.Tensor) or not f.is_floating_point():
                raise TypeError(f"MSDeformAttnPixelDecoder.forward_features: features[{k!r}] must be a floating "
                                f"tensor [N, {c}, H/{s}, W/{s}]")
            if f.dim() != 4 or f.shape[1] != c or (n is not None and f.shape[0] != n):
                raise ValueError(f"MSDeformAttnPixelDecoder.forward_features: features[{k!r}] must have shape "
                                 f"[N, {c}, H/{s}, W/{s}] with one N for all features, got {tuple(f.shape)}")
            n = f.shape[0]

    def forward_features(self, features: dict[str, torch.Tensor]):
        """features {res2..res5: [N, C_k, H/s_k, W/s_k]} -> (mask_features [N, mask_dim, H/4, W/4],
        out0 [N, conv_dim, H/32, W/32], [s32, s16, s8] each [N, conv_dim, h, w]); all fp32."""
        self._check_features(features)
        device = features[self.in_features[0]].device
        bf16 = self.cfg.pixel_decoder_dtype == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            srcs, pos = [], []
            for idx, name in enumerate(self.transformer_in_features[::-1]):
                x = features[name].float()
                conv, norm = self.input_proj[idx]
                # the LayerNorm always sees fp32 (under CPU autocast its elementwise statistics would be bf16)
                srcs.append(norm(conv(x).float()))
                with torch.autocast(device.type, enabled=False):
                    pos.append(self.pe_layer((x.shape[2], x.shape[3])))
            memory, _, _, shapes = self.transformer(srcs, pos)
            n = memory.shape[0]
            sizes = [h * w for h, w in shapes]
            out = [z.transpose(1, 2).reshape(n, -1, h, w).float()
                   for z, (h, w) in zip(torch.split(memory, sizes, dim=1), shapes)]
            for idx, name in enumerate(self.in_features[:self.num_fpn_levels][::-1]):
                lateral, output = self._fpn_convs(idx)
                cur = lateral(features[name].float()).float()
                y = cur + F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False).float()
                out.append(output(y).float())
            mask_features = self.mask_features(out[-1]).float()
        multi_scale = out[:self.maskformer_num_feature_levels]
        return mask_features, out[0], multi_scale

    def forward(self, features: dict[str, torch.Tensor]):
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)


__all__ = ["MSDeformAttnPixelDecoder", "MSDeformAttnTransformerEncoderOnly", "MSDeformAttnEncoder",
           "MSDeformAttnEncoderLayer", "IN_FEATURES", "TRANSFORMER_IN_FEATURES"]
