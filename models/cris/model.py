"""CRIS: CLIP-driven referring image segmentation, the official architecture on open_clip and mmkernels attention.

Read top to bottom: the CLIP backbone (open_clip's ModifiedResNet and text transformer, plus CRIS's dense attention
pool with its ``connect`` branch), the FPN neck that fuses the sentence feature into the visual pyramid, the
vision-language decoder, and the projector whose text-generated 3x3 kernel turns the decoder map into mask logits.
Every module keeps the official attribute names, so the state dict is the official one (spec §7); the official code,
not the paper, decides every detail (spec §2 lists where they differ).

Layouts: images [B, 3, S, S] (CLIP-normalized, S = config.input_size, 416 officially); tokens [B, word_len] int64
(0 = padding); logits [B, 1, S/4, S/4].

Attention: the attention pool and the decoder's self-attention run on :func:`mmkernels.joint_attention` (one stream,
no norm, no RoPE). Where the official model applies dropout to attention probabilities (the decoder in training with
dropout > 0) and for the decoder's cross-attention with its text padding mask, the math runs through
``F.scaled_dot_product_attention``, which has both; the results are the same attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import mmkernels
from models.cris.config import CRISConfig


# ---------------------------------------------------------------------------------------------------------------
# Backbone


def _open_clip_model(cfg):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = cfg.clip
    vision = CLIPVisionCfg(layers=tuple(c.vision_layers), width=c.vision_width, image_size=c.image_resolution,
                           head_width=64)
    text = CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                       heads=c.text_heads, layers=c.text_layers)
    return CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> ReLU: keys 0.weight, 1.{weight, bias, running_*}."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, dropout: float = 0.0,
              key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, L, heads*D] projections -> [B, Lq, heads*D].

    mmkernels.joint_attention when there is neither dropout nor a padding mask (it supports neither); SDPA
    otherwise. key_padding_mask: [B, Lk] bool, True = ignore (nn.MultiheadAttention's convention).
    """
    if dropout == 0.0 and key_padding_mask is None and q.shape[1] == k.shape[1]:
        return mmkernels.joint_attention([q], [k], [v], num_heads=heads, num_kv_heads=heads)[0]
    B, Lq, E = q.shape
    D = E // heads
    qh, kh, vh = (t.view(B, t.shape[1], heads, D).transpose(1, 2) for t in (q, k, v))
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(B, Lq, E)


class CLIPBackbone(nn.Module):
    """The CLIP of CRIS: open_clip's RN CLIP (keys identical to OpenAI's) + ``visual.attnpool.connect``.

    ``encode_image`` returns (v3, v4, v5): layer2 and layer3 outputs and the dense attention pool of layer4;
    ``encode_text`` returns (word features [B, L, width] after ln_final, sentence state [B, embed_dim]).
    """

    def __init__(self, cfg: CRISConfig):
        super().__init__()
        model = _open_clip_model(cfg)
        # Adopt the CLIP's modules and parameters as our own (same names: backbone.visual.*, backbone.transformer.*).
        self.positional_embedding = model.positional_embedding
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale  # unused, kept for the official key set
        self.visual = model.visual
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.ln_final = model.ln_final
        embed = cfg.clip.embed_dim
        self.visual.attnpool.connect = nn.Sequential(
            nn.Conv2d(cfg.clip.vision_width * 32, embed, 1, bias=False), nn.BatchNorm2d(embed))
        L = cfg.word_len
        self.register_buffer("causal_mask", torch.full((L, L), float("-inf")).triu(1), persistent=False)
        self.vision_heads = cfg.clip.vision_heads

    def _dense_attnpool(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.visual.attnpool
        B, C, h, w = x.shape
        residual = pool.connect(x)
        grid = pool.positional_embedding[1:]  # the class-token row is dropped
        side = int(math.isqrt(grid.shape[0]))
        pe = grid.t().reshape(1, C, side, side)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False).reshape(C, h * w)
        tokens = (x.flatten(2) + pe.to(x.dtype)).transpose(1, 2)  # [B, hw, C]
        q, k, v = pool.q_proj(tokens), pool.k_proj(tokens), pool.v_proj(tokens)
        out = pool.c_proj(attention(q, k, v, self.vision_heads))  # [B, hw, embed]
        return F.relu(out.transpose(1, 2).reshape(B, -1, h, w) + residual)

    def encode_image(self, img: torch.Tensor):
        v = self.visual
        x = v.stem(img) if hasattr(v, "stem") else self._stem(img)
        x = v.layer1(x)
        v3 = v.layer2(x)
        v4 = v.layer3(v3)
        v5 = self._dense_attnpool(v.layer4(v4))
        return v3, v4, v5

    def _stem(self, x):
        v = self.visual
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        return v.avgpool(x)

    def encode_text(self, tokens: torch.Tensor):
        L = tokens.shape[1]
        if L != self.causal_mask.shape[0]:
            raise ValueError(f"CRIS: tokens must have word_len = {self.causal_mask.shape[0]} positions (the text "
                             f"causal mask is fixed at construction, as official), got {L}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L].to(self.token_embedding.weight.dtype)
        mask = self.causal_mask.to(x.dtype)
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask) if self.transformer.batch_first else \
                block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        words = self.ln_final(x)
        state = words[torch.arange(words.shape[0], device=words.device), tokens.argmax(-1)] @ self.text_projection
        return words, state


# ---------------------------------------------------------------------------------------------------------------
# Neck


class CoordConv(nn.Module):
    """Appends (x, y) coordinate channels in [-1, 1] (x along the width, first), then conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.conv1 = conv_bn_relu(cin + 2, cout, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
        return self.conv1(torch.cat([x, xs, ys], 1))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class FPN(nn.Module):
    """Cross-modal fusion of (v3, v4, v5) with the sentence state -> F_v [B, vis_dim, S/16, S/16] (spec §2)."""

    def __init__(self, in_channels: tuple, out_channels: tuple):
        super().__init__()
        i0, i1, i2 = in_channels
        o0, o1, o2 = out_channels
        self.txt_proj = nn.Sequential(nn.Linear(i2, o2, bias=False), nn.BatchNorm1d(o2), nn.ReLU(True))
        self.f1_v_proj = conv_bn_relu(i2, o2, 1)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(o2), nn.ReLU(True))
        self.f2_v_proj = conv_bn_relu(i1, o1, 3)
        self.f2_cat = conv_bn_relu(o2 + o1, o1, 1)
        self.f3_v_proj = conv_bn_relu(i0, o0, 3)
        self.f3_cat = conv_bn_relu(o0 + o1, o1, 1)
        self.f4_proj5 = conv_bn_relu(o2, o1, 3)
        self.f4_proj4 = conv_bn_relu(o1, o1, 3)
        self.f4_proj3 = conv_bn_relu(o1, o1, 3)
        self.aggr = conv_bn_relu(3 * o1, o1, 1)
        self.coordconv = nn.Sequential(CoordConv(o1, o1, 3), conv_bn_relu(o1, o1, 3))

    def forward(self, imgs, state: torch.Tensor) -> torch.Tensor:
        v3, v4, v5 = imgs
        s = self.txt_proj(state)[:, :, None, None]
        f5 = self.norm_layer(self.f1_v_proj(v5) * s)
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(v4), _up2(f5)], 1))
        f3 = self.f3_cat(torch.cat([F.avg_pool2d(self.f3_v_proj(v3), 2, 2), f4], 1))
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), _up2(self.f4_proj5(f5))], 1))
        return self.coordconv(fq)


# ---------------------------------------------------------------------------------------------------------------
# Decoder


def pos_encoding_2d(d_model: int, h: int, w: int, device) -> torch.Tensor:
    """[h*w, d_model] fixed sine encoding: channels [0, d/2) encode the column, [d/2, d) the row (sin/cos
    interleaved), integer positions, frequencies 10000^(-2k/(d/2))."""
    half = d_model // 2
    div = torch.exp(torch.arange(0.0, half, 2, device=device) * -(math.log(10000.0) / half))
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * div  # [w, half/2]
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * div
    pe_w = torch.stack([cols.sin(), cols.cos()], -1).flatten(1)  # [w, half]
    pe_h = torch.stack([rows.sin(), rows.cos()], -1).flatten(1)
    return torch.cat([pe_w[None, :, :].expand(h, w, half), pe_h[:, None, :].expand(h, w, half)], -1).reshape(h * w,
                                                                                                           d_model)


def pos_encoding_1d(d_model: int, length: int, device) -> torch.Tensor:
    """[length, d_model] the standard Transformer sine encoding."""
    div = torch.exp(torch.arange(0.0, d_model, 2, device=device) * -(math.log(10000.0) / d_model))
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None] * div
    return torch.stack([pos.sin(), pos.cos()], -1).flatten(1)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed ``in_proj_weight`` q, k, v; ``out_proj``) and math, batch-first,
    computed by :func:`attention`. Dropout on the attention probabilities as the official module."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        out = attention(q, k, v, self.heads, dropout=self.dropout if self.training else 0.0,
                        key_padding_mask=key_padding_mask)
        return self.out_proj(out)


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the words and FFN, each attention output layer-normed again."""

    def __init__(self, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_ffn), nn.ReLU(True), nn.Dropout(dropout), nn.LayerNorm(dim_ffn),
                                 nn.Linear(dim_ffn, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn_norm, self.cross_attn_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        a = self.norm1(vis)
        q = a + vis_pos
        vis = vis + self.dropout1(self.self_attn_norm(self.self_attn(q, q, a)))
        a = self.norm2(vis)
        a = self.multihead_attn(a + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask)
        vis = vis + self.dropout2(self.cross_attn_norm(a))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_ffn, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis: torch.Tensor, txt: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """vis [B, C, H, W], txt [B, L, C], pad_mask [B, L] (True = padding) -> [B, C, H*W]."""
        B, C, H, W = vis.shape
        vis_pos = pos_encoding_2d(C, H, W, vis.device).to(vis.dtype)
        txt_pos = pos_encoding_1d(txt.shape[-1], txt.shape[1], vis.device).to(txt.dtype)
        x = vis.flatten(2).transpose(1, 2)  # [B, HW, C], HW row-major
        for layer in self.layers:
            x = layer(x, txt, vis_pos, txt_pos, pad_mask)
        return self.norm(x).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Projector


class Projector(nn.Module):
    """Upsamples F_v 4x and correlates it with a 3x3 kernel (+ bias) generated from the sentence state."""

    def __init__(self, word_dim: int, in_dim: int, kernel_size: int = 3):
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        self.vis = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 conv_bn_relu(in_dim * 2, in_dim * 2, 3),
                                 nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 conv_bn_relu(in_dim * 2, in_dim, 3),
                                 nn.Conv2d(in_dim, in_dim, 1))
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)
        B, C, H, W = x.shape
        t = self.txt(state)
        k = self.kernel_size
        weight = t[:, :-1].reshape(B, C, k, k)
        out = F.conv2d(x.reshape(1, B * C, H, W), weight, bias=t[:, -1], padding=k // 2, groups=B)
        return out.transpose(0, 1)  # [B, 1, H, W]


# ---------------------------------------------------------------------------------------------------------------
# The model


class CRIS(nn.Module):
    """CRIS with the official forward: ``forward(img, word, mask=None)``.

    Eval: returns logits [B, 1, S/4, S/4] (detached, as official). Training (``mask`` [B, 1, S, S] soft targets
    required): returns (logits.detach(), the target resized to the logits by nearest, BCE-with-logits loss).
    """

    def __init__(self, cfg: CRISConfig):
        super().__init__()
        self.config = cfg
        self.backbone = CLIPBackbone(cfg)
        self.neck = FPN(cfg.fpn_in, cfg.fpn_out)
        self.decoder = TransformerDecoder(cfg.num_layers, cfg.vis_dim, cfg.num_head, cfg.dim_ffn, cfg.dropout)
        self.proj = Projector(cfg.word_dim, cfg.vis_dim // 2, 3)

    def logits(self, img: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Differentiable logits [B, 1, S/4, S/4] (the official forward detaches them)."""
        self._check(img, word)
        pad_mask = word == 0
        vis = self.backbone.encode_image(img)
        words, state = self.backbone.encode_text(word)
        fq = self.neck(vis, state)
        B, C, H, W = fq.shape
        fq = self.decoder(fq, words, pad_mask).reshape(B, C, H, W)
        return self.proj(fq, state)

    def forward(self, img: torch.Tensor, word: torch.Tensor, mask: Optional[torch.Tensor] = None):
        pred = self.logits(img, word)
        if not self.training:
            return pred.detach()
        if mask is None:
            raise ValueError("CRIS.forward: training mode needs 'mask' [B, 1, S, S] (the soft target)")
        loss, target = self.loss(pred, mask)
        return pred.detach(), target, loss

    @staticmethod
    def loss(pred: torch.Tensor, mask: torch.Tensor):
        """(BCE-with-logits mean over pixels, the target at the logits' size by nearest)."""
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        if pred.shape[-2:] != mask.shape[-2:]:
            mask = F.interpolate(mask, pred.shape[-2:], mode="nearest").detach()
        return F.binary_cross_entropy_with_logits(pred, mask.to(pred.dtype)), mask

    def _check(self, img: torch.Tensor, word: torch.Tensor) -> None:
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"CRIS: 'img' must be [B, 3, H, W], got {getattr(img, 'shape', type(img).__name__)}")
        if img.shape[-1] % 32 or img.shape[-2] % 32:
            raise ValueError(f"CRIS: image sides must be multiples of 32, got {tuple(img.shape[-2:])}")
        if not isinstance(word, torch.Tensor) or word.dim() != 2 or word.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CRIS: 'word' must be int64 token ids [B, word_len], got "
                             f"{getattr(word, 'dtype', type(word).__name__)} {tuple(getattr(word, 'shape', ()))}")
        if word.shape[0] != img.shape[0]:
            raise ValueError(f"CRIS: 'img' and 'word' batch sizes differ ({img.shape[0]} vs {word.shape[0]})")
