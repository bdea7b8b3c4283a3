"""Unpair-Seg masked-attention mask decoder (``sem_seg_head.predictor``, class ``MultiScaleMaskDecoder``, spec §5).

Data flow for N images with Q prompts each (C = hidden_dim, K = num_masks + 3 tokens per prompt, levels
``x = [s32, s16, s8]`` of the pixel decoder, ``mask_features`` [N, C, H4, W4] at stride 4):

1. Per level l: ``src_l = flatten(x_l) + level_embed[l]`` [N, h_l w_l, C] and ``pos_l`` = the random-Fourier grid
   encoding of ``pe_layer`` [h_l w_l, C] (``input_proj`` is three empty Sequentials: the maps enter unprojected).
2. Content: the box centre / image_size, bilinearly sampled (``grid_sample``, align_corners False, zero padding) from
   ``mask_features`` BEFORE ``feat_embed`` (spec §12.4) -> [N, Q, C]; the prompt encoder makes the tokens
   T [N, Q, K, C], which are both the decoder state and the query positional embedding.
3. ``extra_self_attention_layer``: self-attention among the K tokens of each prompt (no positional embedding).
4. Prediction head (run ``dec_layers`` times: once before any layer and after each layer):
   ``decoder_norm``, then point prompts use mask tokens 1..num_masks with ``mask_embed[1..]`` / ``iou_embed[1..]``
   (K_ = num_masks outputs), box prompts mask token 0 with ``mask_embed[0]`` / ``iou_embed[0]`` (K_ = 1);
   masks = einsum(token embedding, ``feat_embed(mask_features)``) [N, Q, K_, H4, W4]; IoU = sigmoid(MLP) [N, Q, K_].
   The attention mask of the next layer: the mask logits bilinearly resized (align_corners False) to the next level,
   foreground = sigmoid >= 0.5, the union over the prompt's K_ outputs, shared by its K tokens and all heads.
5. Layer i = 0 .. dec_layers - 2 at level i % 3 (s32, s16, s8, s32, ...): a prompt whose mask has no foreground at
   that level attends everywhere (fully blocked rows re-opened); masked cross-attention of all Q*K tokens to the
   level, then self-attention among each prompt's K tokens (query_pos = T), then the FFN (all post-norm).

Prompts never interact: each prompt's tokens attend only to pixels and to the prompt's own tokens, so decoding the
prompts in chunks gives the same result.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on ``nn.MultiheadAttention``'s packed
parameters (``in_proj_weight`` [3C, C], ``in_proj_bias``, ``out_proj``): the official layers are sequence-first
``nn.MultiheadAttention`` with a bool mask (True = blocked) of [N*heads, Q*K, hw]; here the mask is the SDPA
convention (True = allowed) [N, 1, Q*K, hw], broadcast over heads, and no [heads, Q*K, hw] score tensor is built
by this module.

Decisions where the official code is silent (numerically identical to it unless noted):

* ``feat_embed(mask_features)`` is computed once per forward instead of once per head (same values).
* The last head's attention mask (unused officially) is not computed.
* ``mask_embed`` / ``iou_embed`` hold ``num_masks + 1`` heads (officially a literal 5 = NUM_MASKS + 1).
* Box centres are computed in at least fp32 and content is sampled from fp32 features even when ``mask_features``
  is bf16 (the official pixel decoder always yields fp32, and autocast runs ``grid_sample`` in fp32).
* Outside autocast, ``mask_features`` of another dtype than ``feat_embed`` (a bf16 pixel decoder) is cast to the
  weights' dtype for the masks (under autocast, autocast decides, as officially).
* ``forward(..., aux_outputs=False)`` (keyword-only, not official) returns an empty ``aux_outputs`` list, so
  inference does not keep ``dec_layers - 1`` extra full-resolution mask tensors.
* No prompts (N * Q == 0): empty outputs of the documented shapes, without running the layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.layers import MLP, PositionEmbeddingRandom
from models.unpair_seg.prompt_encoder import PromptEncoder, check_boxes, check_prompt_type

NUM_FEATURE_LEVELS = 3


def _xavier_matrices(module: nn.Module) -> None:
    """Mask2Former's layer init: xavier-uniform on every parameter with more than one dimension."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class PackedAttention(nn.Module):
    """``nn.MultiheadAttention(embed_dim, num_heads)`` (bias, no dropout) with the same parameter names, computed with
    ``scaled_dot_product_attention`` on batch-first tensors.

    forward(query [B, L, C], key [B, S, C], value [B, S, C], allowed None | bool [B or 1, 1, L, S] (True = may
    attend; every row must allow at least one key)) -> [B, L, C].
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # nn.MultiheadAttention's own init
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, l, _ = t.shape
        return t.view(b, l, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        b, _, l, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, l, self.embed_dim))


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention: ``norm(tgt + attn(q = k = tgt + query_pos, v = tgt))``; tgt [B, L, C]."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = PackedAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        qk = tgt if query_pos is None else tgt + query_pos
        return self.norm(tgt + self.self_attn(qk, qk, tgt))


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention: ``norm(tgt + attn(q = tgt + query_pos, k = memory + pos, v = memory))``.

    tgt [N, L, C]; memory [N, S, C]; pos [S, C] or [N, S, C]; allowed bool [N, 1, L, S] (True = may attend).
    """

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = PackedAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = tgt if query_pos is None else tgt + query_pos
        k = memory if pos is None else memory + pos
        return self.norm(tgt + self.multihead_attn(q, k, memory, allowed))


class FFNLayer(nn.Module):
    """Post-norm FFN: ``norm(tgt + linear2(relu(linear1(tgt))))``."""

    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MultiScaleMaskDecoder(nn.Module):
    """The official ``sem_seg_head.predictor`` (spec §5); see the module docstring for the computation.

    Attributes (state-dict paths): ``pe_layer``, ``transformer_self_attention_layers``,
    ``transformer_cross_attention_layers``, ``transformer_ffn_layers`` (``dec_layers - 1`` each),
    ``extra_self_attention_layer``, ``feat_embed``, ``prompt_encoder``, ``level_embed``, ``input_proj`` (no params),
    ``decoder_norm``, ``mask_embed``, ``iou_embed``.
    """

    def __init__(self, cfg: UnpairSegConfig):
        super().__init__()
        if not isinstance(cfg, UnpairSegConfig):
            raise TypeError(f"cfg must be an UnpairSegConfig, got {type(cfg).__name__}")
        c = cfg.hidden_dim
        self.hidden_dim = c
        self.num_heads = cfg.dec_heads
        self.num_layers = cfg.num_decoder_layers
        self.num_masks = cfg.num_masks
        self.num_feature_levels = NUM_FEATURE_LEVELS
        self.pe_layer = PositionEmbeddingRandom(cfg.pe_features)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(c, cfg.dec_heads) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(c, cfg.dec_heads) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(c, cfg.dim_feedforward) for _ in range(self.num_layers))
        self.extra_self_attention_layer = SelfAttentionLayer(c, cfg.dec_heads)
        self.feat_embed = nn.Conv2d(c, cfg.mask_dim, 1, bias=True)
        self.prompt_encoder = PromptEncoder(cfg)
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, c)
        self.input_proj = nn.ModuleList(nn.Sequential() for _ in range(NUM_FEATURE_LEVELS))
        self.decoder_norm = nn.LayerNorm(c)
        self.mask_embed = nn.ModuleList(MLP(c, c, cfg.mask_dim, 3) for _ in range(cfg.num_masks + 1))
        self.iou_embed = nn.ModuleList(MLP(c, c, 1, 3) for _ in range(cfg.num_masks + 1))

    # -- pieces -------------------------------------------------------------------------------------------------------

    def content_embedding(self, mask_features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The mask feature at each box centre: mask_features [N, C, H, W] (before ``feat_embed``), boxes [N, Q, 4]
        xyxy canvas px -> [N, Q, C] (bilinear, align_corners False, zero outside; at least fp32)."""
        h, w = self.prompt_encoder.image_size
        b = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
        centre = (b[..., :2] + b[..., 2:]) / 2 / b.new_tensor([w, h])  # x / image_size[1], y / image_size[0]
        feats = mask_features if mask_features.dtype in (torch.float32, torch.float64) else mask_features.float()
        grid = (2 * centre - 1).to(feats.dtype)[:, :, None, :]  # [N, Q, 1, 2]
        sampled = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return sampled[..., 0].transpose(1, 2)

    def _prediction_head(self, tokens: torch.Tensor, features: torch.Tensor, multimask: bool,
                         target_size: Optional[tuple[int, int]]):
        """tokens [N, Q, K, C], features = feat_embed(mask_features) [N, C, H, W] -> (mask logits [N, Q, K_, H, W],
        IoU scores [N, Q, K_] (sigmoid), allowed bool [N, 1, Q*K, h*w] at ``target_size`` or None)."""
        n, q, k, _ = tokens.shape
        y = self.decoder_norm(tokens)[:, :, 2:]  # the mask tokens
        if multimask:
            idx = range(1, self.num_masks + 1)
            emb = torch.stack([self.mask_embed[j](y[:, :, j]) for j in idx], dim=2)
            iou = torch.stack([self.iou_embed[j](y[:, :, j]) for j in idx], dim=2)
        else:
            emb = self.mask_embed[0](y[:, :, :1])
            iou = self.iou_embed[0](y[:, :, :1])
        masks = torch.einsum("nqkc,nchw->nqkhw", emb, features)
        ious = iou.squeeze(-1).sigmoid()
        if target_size is None:
            return masks, ious, None
        k_out = masks.shape[2]
        resized = F.interpolate(masks.detach().flatten(1, 2), size=target_size, mode="bilinear", align_corners=False)
        hw = resized.shape[-1] * resized.shape[-2]
        fg = resized.sigmoid().ge(0.5).view(n, q, k_out, hw).any(dim=2)  # [N, Q, hw], union over the outputs
        # a prompt with no foreground at this level would have an all-blocked row: official re-opens it entirely
        allowed = fg | ~fg.any(dim=-1, keepdim=True)
        allowed = allowed[:, :, None, :].expand(n, q, k, hw).reshape(n, 1, q * k, hw)
        return masks, ious, allowed

    def _check_inputs(self, x, mask_features, boxes, prompt_type):
        check_prompt_type(prompt_type)
        check_boxes(boxes)
        if not isinstance(mask_features, torch.Tensor):
            raise TypeError(f"mask_features must be a torch.Tensor [N, C, H, W], got {type(mask_features).__name__}")
        n = boxes.shape[0]
        c = self.hidden_dim
        if mask_features.dim() != 4 or mask_features.shape[0] != n or mask_features.shape[1] != c:
            raise ValueError(f"mask_features must have shape [N, C, H, W] with N = {n} (from boxes) and C = {c}, got "
                             f"{tuple(mask_features.shape)}")
        if not mask_features.is_floating_point():
            raise TypeError(f"mask_features must be floating point, got dtype {mask_features.dtype}")
        if not isinstance(x, Sequence) or isinstance(x, torch.Tensor) or len(x) != NUM_FEATURE_LEVELS:
            raise ValueError(f"x must be a list of {NUM_FEATURE_LEVELS} maps [s32, s16, s8], each [N, C, h, w], got "
                             f"{type(x).__name__}" + (f" of length {len(x)}" if isinstance(x, Sequence) else ""))
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != n or t.shape[1] != c:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"x[{i}] must have shape [N, C, h, w] with N = {n} (from boxes) and C = {c}, got "
                                 f"{got}")
            if not t.is_floating_point():
                raise TypeError(f"x[{i}] must be floating point, got dtype {t.dtype}")

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(self, x: list[torch.Tensor], mask_features: torch.Tensor, boxes: torch.Tensor, prompt_type: str,
                *, aux_outputs: bool = True) -> dict:
        """Decode Q prompts per image.

        Args:
            x: ``[s32, s16, s8]`` pixel-decoder maps, each [N, C, h, w].
            mask_features: [N, C, H4, W4] stride-4 mask features (before ``feat_embed``).
            boxes: [N, Q, 4] xyxy canvas px (a point is its +-2 px box).
            prompt_type: ``"point"`` (K_ = num_masks outputs, tokens/heads 1..num_masks) or ``"box"`` (K_ = 1,
                token/head 0).
            aux_outputs: keep the earlier heads' outputs (default, official); False returns an empty list.

        Returns:
            ``{"pred_masks": [N, Q, K_, H4, W4] logits, "pred_ious": [N, Q, K_] (one sigmoid applied),
            "aux_outputs": [{"pred_masks", "pred_ious"}] * (dec_layers - 1)}``, the first aux entry being the head
            run before any layer.
        """
        self._check_inputs(x, mask_features, boxes, prompt_type)
        multimask = prompt_type == "point"
        n, q = boxes.shape[:2]
        k_out = self.num_masks if multimask else 1
        c = self.hidden_dim
        if n * q == 0:
            masks = mask_features.new_zeros(n, q, k_out, *mask_features.shape[-2:])
            ious = mask_features.new_zeros(n, q, k_out)
            aux = [{"pred_masks": masks, "pred_ious": ious} for _ in range(self.num_layers)] if aux_outputs else []
            return {"pred_masks": masks, "pred_ious": ious, "aux_outputs": aux}

        sizes, src, pos = [], [], []
        for i in range(NUM_FEATURE_LEVELS):
            h_i, w_i = x[i].shape[-2:]
            sizes.append((h_i, w_i))
            src.append(self.input_proj[i](x[i]).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pos.append(self.pe_layer((h_i, w_i)).flatten(1).transpose(0, 1))  # [h w, C], shared by the batch

        content = self.content_embedding(mask_features, boxes)
        tokens, query_embed = self.prompt_encoder(boxes, content, prompt_type)
        k = tokens.shape[2]
        qpos_cross = query_embed.reshape(n, q * k, c)
        qpos_self = query_embed.reshape(n * q, k, c)
        w = self.feat_embed.weight
        if mask_features.dtype != w.dtype and not torch.is_autocast_enabled(mask_features.device.type):
            # e.g. a bf16 pixel decoder feeding an fp32 decoder outside autocast: conv needs one dtype
            mask_features = mask_features.to(w.dtype)
        features = self.feat_embed(mask_features)

        out = self.extra_self_attention_layer(tokens.reshape(n * q, k, c))
        masks, ious, allowed = self._prediction_head(out.view(n, q, k, c), features, multimask, sizes[0])
        preds = [(masks, ious)]
        for i in range(self.num_layers):
            level = i % NUM_FEATURE_LEVELS
            out = self.transformer_cross_attention_layers[i](out.reshape(n, q * k, c), src[level], allowed,
                                                             pos=pos[level], query_pos=qpos_cross)
            out = self.transformer_self_attention_layers[i](out.reshape(n * q, k, c), query_pos=qpos_self)
            out = self.transformer_ffn_layers[i](out)
            last = i == self.num_layers - 1
            target = None if last else sizes[(i + 1) % NUM_FEATURE_LEVELS]
            masks, ious, allowed = self._prediction_head(out.view(n, q, k, c), features, multimask, target)
            if aux_outputs:
                preds.append((masks, ious))
            elif last:
                preds = [(masks, ious)]
        aux = [{"pred_masks": m, "pred_ious": s} for m, s in preds[:-1]] if aux_outputs else []
        return {"pred_masks": preds[-1][0], "pred_ious": preds[-1][1], "aux_outputs": aux}
