"""The frozen open_clip ConvNeXt CLIP of Unpair-Seg (``backbone``; ../shared/specs/unpair_seg.md §1).

Layouts (N images, B batches of Q regions, T texts, ctx = the text context length, E = ``embed_dim``)::

    extract_features / forward   x [N, 3, H, W] normalised RGB  ->  {"stem":  [N, C_stem, H/4,  W/4],
                                                                      "res2":  [N, C2, H/4,  W/4],
                                                                      "res3":  [N, C3, H/8,  W/8],
                                                                      "res4":  [N, C4, H/16, W/16],
                                                                      "res5":  [N, C5, H/32, W/32],
                                                                      "clip_vis_dense": [N, C5, H/32, W/32]}
    visual_prediction_forward    [B, Q, C5] (mask-pooled res5)  ->  [B, Q, E] CLIP region embeddings (un-normalised)
    tokenize                     list of T str                  ->  [T, ctx] int64 (open_clip's BPE, offline)
    encode_text                  [T, ctx] int64                 ->  [T, E] (un-normalised)

The module holds the whole open_clip ``CLIP`` (vision and text towers) as ``clip_model``, so its state-dict keys are
the official ``backbone.clip_model.*``. It is built with random weights and never downloads anything: the named
config (``open_clip.get_model_config``) or a config dict is handed to ``open_clip.CLIP`` directly (this also works
under ``with torch.device("meta"):``, which ``open_clip.create_model`` does not); the weights come from a checkpoint
(convert.py). The timm trunk is created with ``timm_model_pretrained`` as the config says (False for every ConvNeXt
CLIP config of open_clip and for ``TINY_CLIP``).

Frozen as officially: every parameter has ``requires_grad=False``, the module is put in eval mode at construction,
and ``forward`` runs under ``torch.no_grad`` and re-calls ``eval()`` (drop-path off) every time. ``extract_features``
is the same computation without those two guards (for callers that need gradients through the frozen trunk, e.g.
stage-2 adapters); ``visual_prediction_forward`` is never under no_grad (its gradient flows to its input).

Text goes through open_clip's own ``CLIP.encode_text`` (spec §1 / §12.14: the official code permutes to
sequence-first before ``transformer``, which is wrong for open_clip's batch-first transformer; the math of
``encode_text`` is the intended one).

Checked with open_clip 3.3.0, timm 1.0.31, torch 2.14.1 (key names and the ConvNeXt module layout depend on the
timm / open_clip versions; pin them when loading the official checkpoint).
"""

from __future__ import annotations

import copy
from typing import Sequence

import open_clip
import torch
from torch import nn

from models.unpair_seg.config import UnpairSegConfig

FEATURE_NAMES = ("stem", "res2", "res3", "res4", "res5", "clip_vis_dense")


def clip_model_config(cfg: UnpairSegConfig) -> dict:
    """The open_clip model config of ``cfg``: ``cfg.clip_cfg`` if given, else the named config of
    ``cfg.clip_model_name`` (a deep copy; ValueError if open_clip does not know the name)."""
    if cfg.clip_cfg is not None:
        model_cfg = copy.deepcopy(dict(cfg.clip_cfg))
    else:
        model_cfg = open_clip.get_model_config(cfg.clip_model_name)
        if model_cfg is None:
            raise ValueError(f"CLIPBackbone: cfg.clip_model_name {cfg.clip_model_name!r} is not an open_clip model "
                             f"config (see open_clip.list_models())")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ValueError(f"CLIPBackbone: the open_clip model config must have {key!r}, got keys "
                             f"{sorted(model_cfg)}")
    if model_cfg.pop("custom_text", False):
        raise ValueError("CLIPBackbone: custom_text open_clip configs (CustomTextCLIP, keys text.*) do not have the "
                         "official key layout backbone.clip_model.{token_embedding,transformer,...}")
    if "timm_model_name" not in model_cfg["vision_cfg"] or "convnext" not in model_cfg["vision_cfg"][
            "timm_model_name"]:
        raise ValueError(f"CLIPBackbone: the vision tower must be a timm ConvNeXt (vision_cfg.timm_model_name "
                         f"'convnext_*'), got vision_cfg {model_cfg['vision_cfg']!r}")
    if model_cfg["text_cfg"].get("hf_tokenizer_name") or model_cfg["text_cfg"].get("hf_model_name"):
        raise ValueError("CLIPBackbone: Hugging Face text towers / tokenizers need downloads; only open_clip's own "
                         "text transformer with its bundled BPE tokenizer is supported")
    return model_cfg


class CLIPBackbone(nn.Module):
    """The frozen ConvNeXt CLIP (see the module docstring for layouts).

    Attributes:
        cfg: the :class:`UnpairSegConfig` it was built from (its pixel_mean / pixel_std normalise images for it).
        clip_model: the ``open_clip.CLIP`` (keys ``clip_model.*``).
        channels, strides: per feature name (``stem``, ``res2``..``res5``, ``clip_vis_dense``), read off the trunk.
        embed_dim: CLIP embedding width (768 for convnext_large_d_320, 64 for ``TINY_CLIP``).
        context_length: text tokens per prompt.
    """

    def __init__(self, cfg: UnpairSegConfig):
        super().__init__()
        if not isinstance(cfg, UnpairSegConfig):
            raise TypeError(f"CLIPBackbone: cfg must be an UnpairSegConfig, got {type(cfg).__name__}")
        model_cfg = clip_model_config(cfg)
        self.cfg = cfg
        self._named = cfg.clip_cfg is None
        self._model_name = cfg.clip_model_name
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        self._tokenizer_kwargs = dict(model_cfg["text_cfg"].get("tokenizer_kwargs", {}))
        self._tokenizer = None  # built on first use: loading the BPE vocabulary takes ~1 s
        self.clip_model = open_clip.CLIP(**model_cfg)
        self.embed_dim = int(model_cfg["embed_dim"])

        trunk = self.clip_model.visual.trunk
        if len(trunk.stages) != 4:
            raise ValueError(f"CLIPBackbone: the ConvNeXt trunk must have 4 stages (res2..res5), got "
                             f"{len(trunk.stages)}")
        stem_convs = [m for m in trunk.stem.modules() if isinstance(m, nn.Conv2d)]
        stem_stride = 1
        for m in stem_convs:
            stem_stride *= int(m.stride[0])
        self.channels = {"stem": int(stem_convs[-1].out_channels)}
        self.strides = {"stem": stem_stride}
        for i, info in enumerate(trunk.feature_info):
            self.channels[f"res{i + 2}"] = int(info["num_chs"])
            self.strides[f"res{i + 2}"] = int(info["reduction"])
        self.channels["clip_vis_dense"] = self.channels["res5"]
        self.strides["clip_vis_dense"] = self.strides["res5"]

        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- vision ---------------------------------------------------------------------------------------------------

    def extract_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trunk features of normalised images x [N, 3, H, W] (see the module docstring; all contiguous):
        stem -> stages[0..3] (res2..res5) -> trunk.norm_pre on res5 (clip_vis_dense). Runs in the current
        train/eval mode and grad mode (``forward`` is the official, frozen call)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"CLIPBackbone.extract_features: x must be a floating tensor [N, 3, H, W], got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CLIPBackbone.extract_features: x must have shape [N, 3, H, W], got {tuple(x.shape)}")
        trunk = self.clip_model.visual.trunk
        out = {}
        x = trunk.stem(x)
        out["stem"] = x.contiguous()
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            out[f"res{i + 2}"] = x.contiguous()
        out["clip_vis_dense"] = trunk.norm_pre(x).contiguous()
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official frozen call: ``extract_features`` under no_grad, in eval mode (re-set every call)."""
        with torch.no_grad():
            self.eval()
            return self.extract_features(x)

    def visual_prediction_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Region features [B, Q, C5] (e.g. mask-pooled clip_vis_dense) -> CLIP embeddings [B, Q, E]:
        trunk.head (average pool of a 1x1 map, LayerNorm2d, flatten, fc = Identity) then visual.head (the MLP
        projection). Not under no_grad: gradients flow to x through the frozen head."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("CLIPBackbone.visual_prediction_forward: x must be a floating tensor [B, Q, C]")
        if x.dim() != 3 or x.shape[-1] != self.channels["res5"]:
            raise ValueError(f"CLIPBackbone.visual_prediction_forward: x must have shape [B, Q, "
                             f"{self.channels['res5']}], got {tuple(x.shape)}")
        b, q, c = x.shape
        y = self.clip_model.visual.trunk.head(x.reshape(b * q, c, 1, 1))
        y = self.clip_model.visual.head(y)
        return y.reshape(b, q, y.shape[-1])

    # -- text -----------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """open_clip's tokenizer of the config (BPE ``SimpleTokenizer``, bundled with open_clip: no download)."""
        if self._tokenizer is None:
            if self._named:
                self._tokenizer = open_clip.get_tokenizer(self._model_name)
            else:
                self._tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length,
                                                            **self._tokenizer_kwargs)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: a list (or tuple) of T strings -> tokens [T, context_length] int64 on the CPU."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"CLIPBackbone.tokenize: texts must be a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"CLIPBackbone.tokenize: texts[{i}] must be a str, got {type(t).__name__}")
        tokens = self.tokenizer(list(texts))
        if tokens.shape[-1] != self.context_length:
            raise ValueError(f"CLIPBackbone.tokenize: the tokenizer made {tokens.shape[-1]} tokens per text, the text "
                             f"tower takes {self.context_length}")
        return tokens.long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, context_length] int -> un-normalised text embeddings [T, E] (open_clip's encode_text: token
        + positional embedding, causal transformer, ln_final, the EOT (argmax id) position, @ text_projection)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("CLIPBackbone.encode_text: tokens must be an int64 (or int32) tensor [T, context_length]")
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"CLIPBackbone.encode_text: tokens must have shape [T, {self.context_length}], got "
                             f"{tuple(tokens.shape)}")
        device = self.clip_model.token_embedding.weight.device
        return self.clip_model.encode_text(tokens.to(device=device, dtype=torch.int64), normalize=False)

    def get_text_classifier(self, texts: Sequence[str]) -> torch.Tensor:
        """tokenize + encode_text without gradients: [T, E], un-normalised (no templates, as officially)."""
        with torch.no_grad():
            return self.encode_text(self.tokenize(texts))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.strides}, embed_dim={self.embed_dim}"


__all__ = ["CLIPBackbone", "FEATURE_NAMES", "clip_model_config"]
