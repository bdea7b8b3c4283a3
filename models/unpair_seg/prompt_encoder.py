"""Unpair-Seg prompt encoder (``sem_seg_head.predictor.prompt_encoder``, spec §4).

Every prompt is an xyxy box in canvas pixels (a point (x, y) arrives as the 4x4 box (x-2, y-2, x+2, y+2), built by
the meta-architecture). A prompt becomes ``K = num_masks + 3`` tokens of width C, in the order
``[corner0, corner1, mask0, mask1 .. mask_num_masks]``:

* corner tokens ``c`` in {0 (top-left), 1 (bottom-right)}:
  ``PE(corner_c / image_size) + corner_emb[c] + type + content`` (+ ``attr_emb[1]`` for points), where PE is the
  random-Fourier encoding of ``pos_emb``, ``type`` is ``point_emb`` or ``box_emb``, and ``content`` is the mask
  feature sampled at the box centre (computed by the mask decoder, spec §12.4) shared by both corners;
* mask tokens: the ``num_masks + 1`` learned ``mask_emb`` rows, identical for every prompt.

The same tensor is returned twice (decoder input and query positional embedding), as officially.

Decisions where the official code is silent or inconsistent:

* Boxes are plain tensors, so the official ``+0.5`` shift (applied only to detectron2 ``Boxes``) never happens
  (spec §4, §12.13).
* The multi-point path (``_embed_point2``) is not implemented: it is unused at inference and inconsistent with the
  decoder's token slicing (spec §12.13).
* Corner coordinates are encoded in the dtype of ``pos_emb``'s buffer (fp32 unless the module was cast), never in
  the dtype of ``content``, so bf16 features cannot quantise canvas positions; the tokens have the promoted dtype of
  the encoding, the parameters and ``content``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.layers import PositionEmbeddingRandom

PROMPT_TYPES = ("point", "box")


def check_prompt_type(prompt_type) -> str:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"prompt_type must be 'point' or 'box', got {prompt_type!r}")
    return prompt_type


def check_boxes(boxes, name: str = "boxes") -> torch.Tensor:
    """``boxes`` must be a real-valued tensor [N, Q, 4] (xyxy canvas pixels)."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, Q, 4] (xyxy canvas pixels), got {type(boxes).__name__}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, Q, 4] (xyxy canvas pixels), got {tuple(boxes.shape)}")
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {boxes.dtype}")
    return boxes


class PromptEncoder(nn.Module):
    """Point / box prompt tokens (spec §4). Parameters (all N(0, 1) at init, as officially):

    * ``pos_emb``: :class:`PositionEmbeddingRandom` with ``hidden_dim // 2`` frequencies (buffer [2, C/2]);
    * ``corner_emb`` [1, 2, C] (top-left, bottom-right); ``point_emb``, ``box_emb`` [1, 1, C];
    * ``attr_emb``: Embedding(2, C) (0 negative, 1 positive; only row 1 is used);
    * ``mask_emb`` [1, num_masks + 1, C].
    """

    def __init__(self, cfg: UnpairSegConfig):
        super().__init__()
        if not isinstance(cfg, UnpairSegConfig):
            raise TypeError(f"cfg must be an UnpairSegConfig, got {type(cfg).__name__}")
        c = cfg.hidden_dim
        self.embed_dim = c
        self.num_masks = cfg.num_masks
        self.image_size = (cfg.image_size, cfg.image_size)  # (h, w), the official [CROP_SIZE, CROP_SIZE]
        self.pos_emb = PositionEmbeddingRandom(cfg.pe_features)
        self.corner_emb = nn.Parameter(torch.empty(1, 2, c))
        self.point_emb = nn.Parameter(torch.empty(1, 1, c))
        self.box_emb = nn.Parameter(torch.empty(1, 1, c))
        self.attr_emb = nn.Embedding(2, c)
        self.mask_emb = nn.Parameter(torch.empty(1, cfg.num_masks + 1, c))
        for p in (self.corner_emb, self.point_emb, self.box_emb, self.attr_emb.weight, self.mask_emb):
            nn.init.normal_(p)

    @property
    def num_tokens(self) -> int:
        """Tokens per prompt: 2 corners + ``num_masks + 1`` mask tokens."""
        return self.num_masks + 3

    def forward(self, boxes: torch.Tensor, content: torch.Tensor,
                prompt_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens.

        Args:
            boxes: [N, Q, 4] xyxy in canvas pixels (points already turned into +-2 px boxes).
            content: [N, Q, C] the mask feature at each box centre (shared by both corner tokens).
            prompt_type: ``"point"`` (adds ``point_emb`` and ``attr_emb[1]``) or ``"box"`` (adds ``box_emb``).

        Returns:
            ``(tokens, tokens)``, tokens [N, Q, num_masks + 3, C] ordered ``[corner0, corner1, mask0 .. mask_M]``.
        """
        check_prompt_type(prompt_type)
        check_boxes(boxes)
        if not isinstance(content, torch.Tensor):
            raise TypeError(f"content must be a torch.Tensor [N, Q, C], got {type(content).__name__}")
        n, q = boxes.shape[:2]
        if content.dim() != 3 or tuple(content.shape) != (n, q, self.embed_dim):
            raise ValueError(f"content must have shape [N, Q, C] = {(n, q, self.embed_dim)} (N, Q from boxes), got "
                             f"{tuple(content.shape)}")
        if not content.is_floating_point():
            raise TypeError(f"content must be floating point, got dtype {content.dtype}")
        g_dtype = self.pos_emb.positional_encoding_gaussian_matrix.dtype
        corners = boxes.to(g_dtype).reshape(n, q, 2, 2)  # [N, Q, corner, (x, y)]
        pe = self.pos_emb.forward_with_coords(corners, self.image_size)  # [N, Q, 2, C]
        type_emb = self.point_emb if prompt_type == "point" else self.box_emb
        corner_tokens = pe + self.corner_emb + type_emb + content.unsqueeze(2)
        if prompt_type == "point":
            corner_tokens = corner_tokens + self.attr_emb.weight[1]
        mask_tokens = self.mask_emb.to(corner_tokens.dtype).expand(n, q, -1, -1)
        tokens = torch.cat([corner_tokens, mask_tokens], dim=2)
        return tokens, tokens
