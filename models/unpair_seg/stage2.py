"""Unpair-Seg stage 2: mask-entity alignment (thesis §3.3, Fig. 3.2 / 3.5, eqs. 3.5-3.8; spec §11.2-11.7).

:class:`UnpairSegS2` holds a frozen stage-1 model (``s1``, :class:`UnpairSegS1`, which includes the frozen CLIP) and
the only trainable part, the semantic ``adapter`` (:class:`SemanticAdapter`). One training forward, per image:

1. **Proposals** (:meth:`UnpairSegS2.proposals`, no grad): the stage-1 grid inference (``cfg.pts_per_side`` points
   over the image's original extent, the official score filter and mask NMS, spec §7.3; the thesis trains stage 2
   with a 20 x 20 grid), at most ``max_proposals`` masks by score, as canvas-aligned logits at stride
   ``proposal_stride`` (the decoder's own resolution is stride 4; the canvas-size logits are bilinearly resized down).
2. **Entities** (:meth:`UnpairSegS2.entity_embeddings`, no grad): each entity (minus the held-out words) filled into
   every template, CLIP text tower (``get_text_classifier``), L2-normalised, averaged over the templates and
   re-normalised (the CLIP zero-shot recipe).
3. **Matching** on the frozen multi-scale region embeddings (region.py; no grad): Hungarian on the configured cost,
   confident pairs by probability >= threshold (alignment.py).
4. **Loss** (eq. 3.8): 1 - cos between the adapter's region embedding (multi-scale, ``adapter_scales``) and the
   matched entity's embedding, averaged over the confident pairs of the batch, times ``loss_weight``.

The frozen path (backbone, stage-1 heads, text tower) stays in eval mode whatever ``train()`` is called with;
``eval()`` merges the adapter's LoRA weights (exactly undone by ``train()``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.unpair_seg.adapter import SemanticAdapter
from models.unpair_seg.alignment import (AXES, COSTS, ENSEMBLES, Match, MatchConfig, batch_loss,
                                         match_multiscale)
from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.entities import filter_holdout
from models.unpair_seg.region import check_scales, multiscale_region_embeddings

__all__ = ["Stage2Config", "UnpairSegS2", "save_adapter", "load_adapter", "entity_text_embeddings"]

_OFF = -1.0e4  # logit of padded (invalid) proposal slots: empty under every mask threshold


@dataclass(frozen=True)
class Stage2Config:
    """Stage-2 hyper-parameters (defaults: the thesis recipe where it gives one; the rest is documented design).

    Region embeddings: ``scales`` (images sides of the multi-scale ensemble; thesis 896/1024/1152),
        ``adapter_scales`` (the scales of the adapter's embedding in the loss and at inference; None = ``scales``).
    Adapter (adapter.py): ``adapter_features`` (backbone maps adapted and fused), ``adapter_rank`` (8) and
        ``adapter_alpha`` (1) of the LoRA factors (the official config), ``adapter_hidden`` (fusion MLP width).
    Matching (alignment.py): ``cost`` ("prob" | "literal"), ``softmax_axis`` ("entities" | "regions"),
        ``temperature`` (0.01 = 1 / CLIP's clamped logit scale), ``threshold`` (0.7), ``ensemble`` ("embedding" |
        "cost").
    Text: ``templates`` (a set name of templates.py or format strings; "vild", FC-CLIP's set).
    Data: ``holdout`` (entity words never trained on: entities containing one are dropped before matching).
    Proposals: ``max_proposals`` per image (by score), ``proposal_stride`` of the logits kept.
    Loss: ``loss_weight`` (MaskTextAlignCriterion's 1.0).
    """

    scales: tuple = (896, 1024, 1152)
    adapter_scales: Optional[tuple] = None
    adapter_features: tuple = ("res2", "res3", "res4", "clip_vis_dense")
    adapter_rank: int = 8
    adapter_alpha: float = 1.0
    adapter_hidden: int = 256
    cost: str = "prob"
    softmax_axis: str = "entities"
    temperature: float = 0.01
    threshold: float = 0.7
    ensemble: str = "embedding"
    templates: Union[str, tuple] = "vild"
    holdout: tuple = ()
    max_proposals: int = 100
    proposal_stride: int = 4
    loss_weight: float = 1.0
    text_cache_size: int = 65536
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        from models.unpair_seg.templates import get_templates

        object.__setattr__(self, "scales", check_scales(self.scales))
        if self.adapter_scales is not None:
            object.__setattr__(self, "adapter_scales", check_scales(self.adapter_scales))
        object.__setattr__(self, "adapter_features", tuple(self.adapter_features))
        t = self.templates
        object.__setattr__(self, "templates", t if isinstance(t, str) else tuple(t))
        get_templates(self.templates)  # validates
        hold = self.holdout
        if isinstance(hold, str):
            raise ValueError(f"Stage2Config: 'holdout' must be a list of words, got the string {hold!r}")
        hold = tuple(hold)
        if not all(isinstance(h, str) and h.strip() for h in hold):
            raise ValueError(f"Stage2Config: 'holdout' entries must be non-empty strings, got {hold!r}")
        object.__setattr__(self, "holdout", hold)
        for name in ("adapter_rank", "adapter_hidden", "max_proposals", "proposal_stride", "text_cache_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Stage2Config: '{name}' must be a positive int, got {v!r}")
        for name, allowed in (("cost", COSTS), ("softmax_axis", AXES), ("ensemble", ENSEMBLES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Stage2Config: '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.loss_weight, (int, float)) or isinstance(self.loss_weight, bool) \
                or self.loss_weight < 0:
            raise ValueError(f"Stage2Config: 'loss_weight' must be a number >= 0, got {self.loss_weight!r}")
        self.match_config()  # validates temperature and threshold

    def match_config(self) -> MatchConfig:
        return MatchConfig(cost=self.cost, axis=self.softmax_axis, temperature=self.temperature,
                           threshold=self.threshold, ensemble=self.ensemble)

    @property
    def loss_scales(self) -> tuple:
        return self.scales if self.adapter_scales is None else self.adapter_scales

    @classmethod
    def official(cls, **overrides) -> "Stage2Config":
        """The thesis recipe: scales 896 / 1024 / 1152, rank 8, threshold 0.7, VILD templates."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, image_size: int = 128, **overrides) -> "Stage2Config":
        """CPU-sized: scales at the official ratios of the canvas (7/8, 1, 9/8: 112 / 128 / 144 for 128), a 32-wide
        fusion MLP, the SIMPLE templates (those the tiny CLIP is pretrained on, train/clip_pretrain.py)."""
        kw = dict(scales=(round(image_size * 7 / 8), image_size, round(image_size * 9 / 8)), adapter_hidden=32,
                  templates="simple", max_proposals=32)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Config":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Stage2Config: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def build_adapter(backbone: nn.Module, s2cfg: Stage2Config) -> SemanticAdapter:
    """The semantic adapter of ``s2cfg`` on ``backbone``'s channels."""
    return SemanticAdapter(backbone.channels, s2cfg.adapter_features, "clip_vis_dense", s2cfg.adapter_rank,
                           s2cfg.adapter_alpha, s2cfg.adapter_hidden)


def entity_text_embeddings(backbone: nn.Module, entities: Sequence[str], templates) -> torch.Tensor:
    """[T, E] unit text embeddings of ``entities``: every template filled in, CLIP text tower (un-normalised,
    ``get_text_classifier``), L2-normalised, mean over templates, re-normalised. No grad."""
    from models.unpair_seg.templates import get_templates

    templates = get_templates(templates)
    ents = list(entities)
    if not ents:
        return torch.zeros(0, int(backbone.embed_dim), device=next(backbone.parameters()).device)
    prompts = [t.format(e) for e in ents for t in templates]
    emb = F.normalize(backbone.get_text_classifier(prompts).float(), dim=-1)
    emb = emb.view(len(ents), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


class UnpairSegS2(nn.Module):
    """A frozen :class:`UnpairSegS1` (``s1``) plus the trainable semantic ``adapter`` (module docstring).

    Args:
        cfg: the stage-1 config (ignored when ``s1`` is given, whose ``cfg`` is used).
        s2cfg: the stage-2 config (default :meth:`Stage2Config.official`).
        s1: an existing stage-1 model (e.g. with loaded weights); it is frozen in place.
    """

    def __init__(self, cfg: Optional[UnpairSegConfig] = None, s2cfg: Optional[Stage2Config] = None, *,
                 s1: Optional[nn.Module] = None):
        super().__init__()
        from models.unpair_seg.model import UnpairSegS1

        if s1 is None:
            if not isinstance(cfg, UnpairSegConfig):
                raise TypeError(f"UnpairSegS2: cfg must be an UnpairSegConfig (or pass s1=), got "
                                f"{type(cfg).__name__}")
            s1 = UnpairSegS1(cfg)
        elif not isinstance(s1, UnpairSegS1):
            raise TypeError(f"UnpairSegS2: s1 must be an UnpairSegS1, got {type(s1).__name__}")
        s2cfg = Stage2Config.official() if s2cfg is None else s2cfg
        if not isinstance(s2cfg, Stage2Config):
            raise TypeError(f"UnpairSegS2: s2cfg must be a Stage2Config, got {type(s2cfg).__name__}")
        self.s1 = s1
        for p in self.s1.parameters():
            p.requires_grad_(False)
        self.s1.eval()
        self.s2cfg = s2cfg
        self.adapter = build_adapter(self.s1.backbone, s2cfg)
        self._text_cache: OrderedDict = OrderedDict()

    @property
    def cfg(self) -> UnpairSegConfig:
        return self.s1.cfg

    @property
    def backbone(self) -> nn.Module:
        return self.s1.backbone

    def train(self, mode: bool = True) -> "UnpairSegS2":
        super().train(mode)
        self.s1.eval()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._text_cache.clear()  # new text-tower weights invalidate cached entity embeddings
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- stage 1: proposals -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def proposals(self, images: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> dict:
        """Stage-1 grid proposals of canvases [N, 3, S, S] (0..255).

        Args:
            sizes: int [N, 2] (H, W) of the original images (the grid covers their extent, as officially); None
                means the full canvas.

        Returns {"masks": [N, Qmax, S/stride, S/stride] canvas-aligned logits (padding slots -1e4), "valid": bool
        [N, Qmax], "scores": [N, Qmax] (0 in padding)}, Qmax = the largest proposal count of the batch
        (<= max_proposals).
        """
        from models.unpair_seg import preprocess as pp

        s1, S = self.s1, self.cfg.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"UnpairSegS2.proposals: 'images' must be canvases [N, 3, {S}, {S}], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        n = images.shape[0]
        if sizes is not None and (not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (n, 2)):
            raise ValueError(f"UnpairSegS2.proposals: 'sizes' must be a tensor [{n}, 2] (H, W), got "
                             f"{getattr(sizes, 'shape', type(sizes).__name__)}")
        n_x, n_y = self.cfg.pts_per_side
        entries = []
        for i in range(n):
            h, w = (S, S) if sizes is None else (int(sizes[i, 0]), int(sizes[i, 1]))
            # height = width = S: the post-processing then returns canvas-aligned S x S proposals.
            entries.append({"image": images[i], "height": S, "width": S,
                            "points": pp.point_grid(n_x, n_y, h, w, S)})
        results = s1.inference(entries)
        side = S // self.s2cfg.proposal_stride
        masks, scores = [], []
        for r in results:
            m, sc = r["proposal"][: self.s2cfg.max_proposals], r["scores"][: self.s2cfg.max_proposals]
            if m.shape[0] and side != S:
                m = F.interpolate(m[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0]
            elif not m.shape[0]:  # no proposal: interpolate refuses empty inputs, keep the [0, side, side] shape
                m = m.new_zeros((0, side, side))
            masks.append(m.float())
            scores.append(sc.float())
        q = max(m.shape[0] for m in masks)
        out_masks = images.new_full((n, q, side, side), _OFF, dtype=torch.float32)
        valid = torch.zeros(n, q, dtype=torch.bool, device=images.device)
        out_scores = torch.zeros(n, q, dtype=torch.float32, device=images.device)
        for i, (m, sc) in enumerate(zip(masks, scores)):
            k = m.shape[0]
            out_masks[i, :k] = m.to(out_masks.device)
            valid[i, :k] = True
            out_scores[i, :k] = sc.to(out_scores.device)
        return {"masks": out_masks, "valid": valid, "scores": out_scores}

    # -- embeddings ---------------------------------------------------------------------------------------------------

    def region_embeddings(self, images: torch.Tensor, masks: torch.Tensor, adapter: bool = True) -> torch.Tensor:
        """[N, Q, E] unit region embeddings of canvas-aligned mask logits [N, Q, h, w]: the adapter's
        (``adapter_scales``) or the frozen CLIP's (``scales``)."""
        stats = {"pixel_mean": self.cfg.pixel_mean, "pixel_std": self.cfg.pixel_std}
        if adapter:
            return multiscale_region_embeddings(self.backbone, images, masks, self.s2cfg.loss_scales, self.adapter,
                                                frozen=False, **stats)["adapted"]
        return multiscale_region_embeddings(self.backbone, images, masks, self.s2cfg.scales, **stats)["frozen"]

    @torch.no_grad()
    def entity_embeddings(self, entities: Sequence[str]) -> torch.Tensor:
        """[T, E] unit text embeddings (fp32) of ``entities`` (template ensemble; cached per entity, LRU)."""
        if isinstance(entities, str):
            raise TypeError("UnpairSegS2.entity_embeddings: 'entities' must be a list of str, got a str")
        device = next(self.backbone.parameters()).device
        missing = [e for e in dict.fromkeys(entities) if e not in self._text_cache]
        if missing:
            emb = entity_text_embeddings(self.backbone, missing, self.s2cfg.templates).cpu()
            for e, v in zip(missing, emb):
                self._text_cache[e] = v
        out = []
        for e in entities:
            self._text_cache.move_to_end(e)
            out.append(self._text_cache[e])
        while len(self._text_cache) > self.s2cfg.text_cache_size:
            self._text_cache.popitem(last=False)
        if not out:
            return torch.zeros(0, int(self.backbone.embed_dim), device=device)
        return torch.stack(out).to(device)

    def training_entities(self, entities: Sequence[str]) -> list[str]:
        """``entities`` deduplicated, without the held-out ones (``holdout``)."""
        return filter_holdout(list(dict.fromkeys(entities)), self.s2cfg.holdout)

    # -- matching and loss --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def match(self, per_scale: torch.Tensor, valid: torch.Tensor, entity_embeddings: Sequence[torch.Tensor]) \
            -> list[Match]:
        """Per image, the confident pairs of the frozen per-scale region embeddings [S, N, Q, E] (valid [N, Q])
        with that image's entity embeddings [T_n, E]."""
        cfg = self.s2cfg.match_config()
        return [match_multiscale(per_scale[:, n], entity_embeddings[n], cfg, valid[n])
                for n in range(per_scale.shape[1])]

    def forward(self, images: torch.Tensor, entities: Sequence[Sequence[str]], masks: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None) -> dict:
        """The training forward (module docstring).

        Args:
            images: canvases [N, 3, S, S], RGB 0..255.
            entities: per image, its entity strings (the held-out ones are dropped here).
            masks: optional canvas-aligned mask logits [N, Q, h, w] to use instead of the stage-1 proposals
                (``valid`` bool [N, Q] then marks real masks; default all).
            sizes: optional int [N, 2] original (H, W) for the proposal grid.

        Returns {"loss": weighted alignment loss (0-dim), "loss_align": the unweighted loss, "pairs": confident pairs
        in the batch, "entities": entities used, "proposals": valid masks, "confidence": mean confidence of the
        pairs (0 without pairs)} (the counts as float tensors).
        """
        if isinstance(entities, (str, bytes)) or len(entities) != images.shape[0]:
            raise ValueError(f"UnpairSegS2.forward: 'entities' must hold one list of str per image "
                             f"({images.shape[0]}), got {type(entities).__name__} of length "
                             f"{len(entities) if hasattr(entities, '__len__') else '?'}")
        if masks is None:
            prop = self.proposals(images, sizes)
            masks, valid = prop["masks"], prop["valid"]
        else:
            if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or masks.shape[0] != images.shape[0]:
                raise ValueError(f"UnpairSegS2.forward: 'masks' must be mask logits [N, Q, h, w] with N = "
                                 f"{images.shape[0]}, got {getattr(masks, 'shape', type(masks).__name__)}")
            if valid is None:
                valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
            masks = masks.float()
        ents = [self.training_entities(e) for e in entities]
        text = [self.entity_embeddings(e) for e in ents]
        scales, loss_scales = self.s2cfg.scales, self.s2cfg.loss_scales
        emb = multiscale_region_embeddings(self.backbone, images, masks, scales, self.adapter,
                                           adapter_scales=loss_scales, pixel_mean=self.cfg.pixel_mean,
                                           pixel_std=self.cfg.pixel_std)
        matches = self.match(emb["per_scale"], valid, text)
        loss, pairs = batch_loss(emb["adapted"], text, matches)
        if torch.is_grad_enabled() and not loss.requires_grad:
            # No mask in the whole batch (Q = 0): a zero still connected to every trainable parameter, so that
            # backward works and data-parallel ranks reduce the same (zero) gradients.
            loss = loss + 0.0 * sum(p.sum() for p in self.adapter.parameters() if p.requires_grad)
        conf = torch.cat([m.confidence for m in matches]) if pairs else loss.new_zeros(1)
        dev = loss.device
        return {"loss": loss * float(self.s2cfg.loss_weight), "loss_align": loss.detach(),
                "pairs": torch.tensor(float(pairs), device=dev),
                "entities": torch.tensor(float(sum(len(e) for e in ents)), device=dev),
                "proposals": valid.sum().float().to(dev), "confidence": conf.float().mean().detach().to(dev)}


# ---------------------------------------------------------------------------------------------------------------------
# Adapter checkpoints


def save_adapter(model: Union[UnpairSegS2, SemanticAdapter], path: Union[str, os.PathLike],
                 s2cfg: Optional[Stage2Config] = None) -> None:
    """Write the adapter's state dict (un-merged weights, fp32, keys without prefix) to a ``.safetensors`` file,
    with the Stage2Config as JSON metadata (``"stage2_config"``). Atomic (temporary file + rename)."""
    from safetensors.torch import save_file

    if isinstance(model, UnpairSegS2):
        adapter, s2cfg = model.adapter, model.s2cfg
    elif isinstance(model, SemanticAdapter):
        adapter = model
        if s2cfg is None:
            raise ValueError("save_adapter: give 's2cfg' with a bare SemanticAdapter")
    else:
        raise TypeError(f"save_adapter: expected an UnpairSegS2 or a SemanticAdapter, got {type(model).__name__}")
    path = os.fspath(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
    meta = {"stage2_config": json.dumps(s2cfg.to_dict())}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def load_adapter(path: Union[str, os.PathLike], backbone: nn.Module,
                 s2cfg: Optional[Stage2Config] = None) -> tuple[SemanticAdapter, Stage2Config]:
    """(adapter, Stage2Config) from a :func:`save_adapter` file, built on ``backbone``'s channels and loaded
    strictly; ``s2cfg`` overrides the file's config (its adapter fields must match the weights)."""
    from safetensors import safe_open

    from models.common.checkpoint import load_into, read_state_dict

    path = os.fspath(path)
    state = read_state_dict(path)
    if s2cfg is None:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "stage2_config" not in meta:
            raise ValueError(f"load_adapter: {path!r} has no 'stage2_config' metadata; pass s2cfg=")
        s2cfg = Stage2Config.from_dict(_tuples(json.loads(meta["stage2_config"])))
    adapter = build_adapter(backbone, s2cfg)
    device = next(backbone.parameters()).device
    load_into(adapter, state)
    return adapter.to(device), s2cfg


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
