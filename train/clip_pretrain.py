"""``python -m train.clip_pretrain --config train/configs/clip_tiny.yaml --out DIR [--steps N]``: pretrain the tiny
open_clip ConvNeXt CLIP (:data:`models.unpair_seg.config.TINY_CLIP`) on ShapesWorld image-caption pairs with
open_clip's contrastive loss, on the shared trainer, and save it as a local checkpoint for Unpair-Seg's stage 2.

Why: no pretrained CLIP can be downloaded here, and stage 2 needs a CLIP whose *dense* res5 features, mask-pooled under
an object's mask and projected by ``trunk.head`` + ``visual.head`` (the backbone's ``visual_prediction_forward``),
classify the object zero-shot against text embeddings of "a photo of a {category}."-style prompts. Stage 2 holds some
category words out of its own training, so CLIP itself must know every category.

Model
-----
``open_clip.CLIP(**TINY_CLIP)`` (random init, never downloads), as :class:`TrainCLIP`: the same modules, keys and
forward, except that ``logit_scale`` (a 0-dim parameter in open_clip, which DeepSpeed cannot hold and the trainer
refuses) is a 1-element vector. It is trained like open_clip's (initialised to log(1/0.07), no weight decay); open_clip
clamps it in place to [0, log 100] after every optimizer step, which the trainer has no hook for, so the forward clamps
it instead (same values; above the bound its gradient is 0, as the clamped copy would not move either).
:meth:`TrainCLIP.clip_state_dict` gives it back 0-dim, so the checkpoint holds exactly the keys and shapes of
``open_clip.CLIP(**TINY_CLIP).state_dict()`` (loadable strictly as ``backbone.clip_model``).

Data: the mix (:class:`ShapesCaptionDataset`)
---------------------------------------------
Item ``i`` of the train set is one (image, caption) pair plus its region pairs. Its *kind* is drawn once from
``data.mix`` with the generator ``(data.seed, 1, i)``; its image is a ShapesWorld scene (fixed per item, rendered
once and cached as uint8); its captions are drawn per epoch (the trainer calls ``set_epoch``) with the generators
``(data.seed, 2 | 4, epoch, i)``, so every epoch shows new wordings of the same images:

* ``scene``: a ``data.image_size`` canvas of ``data.scene_objects`` objects (2-4 by default) with its ShapesWorld
  caption (:meth:`Scene.caption`, e.g. "three shapes: a large red circle in the top left, ... and a small blue star
  at the bottom.");
* ``object``: a one-object ``image_size`` canvas with its object caption ("a large red circle in the top left") or a
  :data:`TEMPLATES` template over a noun phrase of the category plus a random subset of its colour and size ("a
  photo of a red circle.", "There is a large star in the scene");
* ``crop``, ``category``, ``colour``: one object on a ``data.crop_size`` canvas at the pixel size it has on the
  ``image_size`` canvas (an object crop without resampling), captioned by a template over a noun phrase
  (``crop``), the category word alone (``category``: "a photo of a circle.", the zero-shot classifier's prompts) or
  "{colour} shape" (``colour``: "a photo of a red shape.", the prompts of the colour vocabulary,
  :func:`colour_class_names`). Crops are cheap (1/4 of the pixels) and put the object words on object-sized images.

Region pairs: every object of every item is also a (region, caption) pair: its coverage of each res5 cell
(:func:`cell_coverage`) weights an average of the trunk's res5 map, projected by the visual heads as stage 2's
region read-out does, against an object caption (a template over the category alone with probability
``data.region_category_p``, over "{colour} shape" with ``data.region_colour_p``, else over a noun phrase). The
read-out Unpair-Seg needs is exactly this mask-pooled dense feature, which a whole-image loss trains only through
the global pool.

Identical captions in one batch (two "a photo of a circle.") are kept: open_clip's loss treats them as negatives of
each other, a constant floor on the loss that does not change which text an image is closest to.

What it learns in the demo's budget (measured, 250 steps, 2 CPU threads, ~4 minutes): colour words, region accuracy
0.90 at 256 px over the 8 colours (chance 0.125); not shape words (0.13, chance 0.17). A from-scratch convnext_atto
did not learn the 6 shapes even as a supervised 6-way classifier on object crops in 400 steps (loss 1.79 -> ~1.6),
so the demo's open vocabulary is the colour words (train/unpair_seg_demo.py).

Images are 0..255 RGB normalised with Unpair-Seg's :data:`PIXEL_MEAN` / :data:`PIXEL_STD` (255 x OpenAI's CLIP
statistics), as the Unpair-Seg meta-arch feeds its backbone; texts are open_clip's BPE tokens (``open_clip.tokenize``,
context 77).

Recipe
------
``open_clip.loss.ClipLoss`` (symmetric InfoNCE with the learned scale; over several processes the features are
gathered with gradients, ``gather_with_grad=True``, as open_clip's ``--gather-with-grad``) on the images, plus
``objective.region_weight`` x ``ClipLoss`` on the region pairs (this process's regions only), on
:class:`train.trainer.Trainer` with AdamW (open_clip's betas 0.9 / 0.98, eps 1e-6), weight decay on tensors of >= 2
dims only (the trainer's default split, which is open_clip's rule for this model: no decay on biases, norms and the
logit scale), linear warmup then cosine, gradient clipping, no EMA, ZeRO-0. Precision: fp32 on the CPU, bf16 on CUDA
(the trainer's "auto"); the loss and its logits are computed in fp32 from the bf16 features. Seeds: the model
initialisation and the trainer's data order come from ``train.seed``, the data from ``data.seed``; on the CPU a run is
deterministic (bitwise, for a given thread count).

Outputs (``--out DIR``)
-----------------------
* ``DIR/clip.safetensors``: the open_clip CLIP state dict (fp32; under bf16 the optimizer's fp32 master weights).
* ``DIR/zeroshot.json``: the zero-shot metrics of the trained model (:func:`evaluate`), plus the training time and
  the resolved config.
* the trainer's files: ``metrics.jsonl``, ``config.json``, ``checkpoints/`` (a resume continues there).

Zero-shot metrics (:func:`evaluate`, on held-out scenes: indices from :data:`EVAL_OFFSET` on, never trained on)
-----------------------------------------------------------------------------------------------------------------
The class embeddings (:func:`text_classifier`) are the CLIP recipe: each ``eval.templates`` template filled with the
name, text features L2-normalised, averaged over templates and re-normalised.

* ``image``: whole-image category accuracy on ``eval.image_scenes`` single-object scenes (the global image embedding,
  cosine vs the 6 category classifiers).
* ``region``: for ``eval.region_scenes`` multi-object scenes, per visible object: the trunk's res5 map (stem ->
  stages -> norm_pre, i.e. ``clip_vis_dense``) is average-pooled under the object's GT mask (:func:`mask_pool_binary`:
  Unpair-Seg's MaskPooling with a binary mask and no sigmoid: bilinear resize to the res5 grid, >= 0.5, masked mean
  with eps 1e-8; a mask that misses every res5 cell centre pools to zeros, counted as ``empty`` and scored as
  predicted, as stage 2 would see it), then ``trunk.head`` (LayerNorm2d of the 1x1 map) -> ``visual.head`` (MLP),
  cosine vs the class embeddings -> accuracy (:func:`region_predictions`, :func:`region_accuracy`). Categories over
  the 6 category names; colour and joint accuracy over the 48 "{colour} {category}" classes (the colour of the best
  one); ``colour_vocab_accuracy`` over the 8 "{colour} shape" classes (the demo's vocabulary). Per scale in
  ``eval.scales`` (the canvas resized bilinearly before the trunk, as stage 2's multi-scale read-out does).

YAML (see train/configs/clip_tiny.yaml)::

    out_dir: runs/clip_tiny
    model: {clip: null | an open_clip config dict (embed_dim, vision_cfg, text_cfg) replacing TINY_CLIP}
    objective: {region_weight}
    data:  {seed, image_size, train_items, mix: {scene, object, crop, category, colour}, scene_objects: [min, max],
            crop_size, region_category_p, region_colour_p, categories, colours, sizes, supersample, cache}
    train: {TrainConfig fields: steps, micro_batch, lr, warmup_steps, schedule, ...}
    eval:  {image_scenes, region_scenes, region_objects: [min, max], templates, scales, batch_size}

``--set section.key=value`` overrides an entry (YAML value); ``--steps N`` is ``--set train.steps=N``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import open_clip
from models.unpair_seg.config import PIXEL_MEAN, PIXEL_STD, TINY_CLIP
from train.data.shapes import CATEGORIES, PALETTE, SIZES, Scene, ShapesWorld

SECTIONS = ("out_dir", "model", "data", "objective", "train", "eval")
KINDS = ("scene", "object", "crop", "category", "colour")
CROP_KINDS = ("crop", "category", "colour")  # rendered on the small crop canvas
GENERIC_NOUN = "shape"  # the noun of the colour vocabulary's class names ("red shape"), see colour_class_names
CHECKPOINT = "clip.safetensors"
METRICS = "zeroshot.json"
EVAL_OFFSET = 1 << 30  # held-out scenes: indices from here on (train items use 0 .. train_items - 1)
LOG_MAX_SCALE = math.log(100.0)  # open_clip's clamp of the learned logit scale

# Unpair-Seg's SIMPLE prompt templates (specs/unpair_seg.md §6), used for the caption mix and as the default
# zero-shot templates, so that whichever of them stage 2 / evaluation picks is a wording CLIP has seen.
TEMPLATES = ("a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
             "a photo of a {} in the scene")

DATA_DEFAULTS = {"seed": 0, "image_size": 128, "train_items": 4000,
                 "mix": {"scene": 0.35, "object": 0.15, "crop": 0.3, "category": 0.2}, "scene_objects": [2, 4],
                 "crop_size": 64, "region_category_p": 0.3, "region_colour_p": 0.4,
                 "categories": list(CATEGORIES), "colours": list(PALETTE), "sizes": list(SIZES), "supersample": 4,
                 "cache": True}
OBJECTIVE_DEFAULTS = {"region_weight": 1.0}
EVAL_DEFAULTS = {"image_scenes": 300, "region_scenes": 200, "region_objects": [2, 4], "templates": ["a photo of a {}."],
                 "scales": [128], "batch_size": 50}
TRAIN_DEFAULTS = {"steps": 400, "micro_batch": 32, "lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                  "weight_decay": 0.05, "warmup_steps": 40, "schedule": "cosine", "min_lr_ratio": 0.05,
                  "grad_clip": 1.0, "ema_decay": None, "zero_stage": 0, "precision": "auto", "seed": 0,
                  "log_every": 20, "keep_last": 1, "progress": True}


# ---------------------------------------------------------------------------------------------------------------------
# Config


def load_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """The YAML at ``path`` with ``overrides`` (``"section.key=value"``, values parsed as YAML) applied, and the
    defaults of every section filled in (unknown sections or keys raise ``ValueError``)."""
    from train.overrides import read_config

    return resolve_config(read_config(path, "a clip_pretrain", overrides), where=path)


def resolve_config(cfg: dict, where: str = "config") -> dict:
    """``cfg`` with the defaults filled in and validated (a copy)."""
    from train.trainer import TrainConfig

    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    out = {"out_dir": cfg.get("out_dir") or "runs/clip_tiny"}
    model = dict(cfg.get("model") or {})
    bad = sorted(set(model) - {"clip"})
    if bad:
        raise ValueError(f"{where}: model: unknown key(s) {bad}; known: ['clip']")
    if model.get("clip") is not None and not isinstance(model["clip"], dict):
        raise ValueError(f"{where}: model.clip must be null or an open_clip config dict, got {model['clip']!r}")
    out["model"] = {"clip": copy.deepcopy(model.get("clip"))}
    for name, defaults in (("data", DATA_DEFAULTS), ("objective", OBJECTIVE_DEFAULTS), ("eval", EVAL_DEFAULTS)):
        given = dict(cfg.get(name) or {})
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise ValueError(f"{where}: {name}: unknown key(s) {bad}; known: {sorted(defaults)}")
        out[name] = {**copy.deepcopy(defaults), **copy.deepcopy(given)}
    train = {**copy.deepcopy(TRAIN_DEFAULTS), **copy.deepcopy(dict(cfg.get("train") or {}))}
    known = set(TrainConfig.__dataclass_fields__) - {"out_dir"}
    bad = sorted(set(train) - known)
    if bad:
        raise ValueError(f"{where}: train: unknown key(s) {bad}; known: {sorted(known)}")
    out["train"] = train
    d, e = out["data"], out["eval"]
    mix = d["mix"]
    if (not isinstance(mix, dict) or set(mix) - set(KINDS)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in mix.values())
            or sum(mix.values()) <= 0):
        raise ValueError(f"{where}: data.mix must map some of {KINDS} to non-negative weights with a positive sum, "
                         f"got {mix!r}")
    for name, section in (("data.image_size", d["image_size"]), ("data.train_items", d["train_items"]),
                          ("eval.image_scenes", e["image_scenes"]), ("eval.region_scenes", e["region_scenes"]),
                          ("eval.batch_size", e["batch_size"])):
        if isinstance(section, bool) or not isinstance(section, int) or section < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {section!r}")
    c = d["crop_size"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 32 or c % 32 or c > d["image_size"]:
        raise ValueError(f"{where}: data.crop_size must be a multiple of 32 in [32, image_size], got {c!r}")
    if d["region_category_p"] + d["region_colour_p"] > 1:
        raise ValueError(f"{where}: data.region_category_p + data.region_colour_p must be <= 1, got "
                         f"{d['region_category_p']} + {d['region_colour_p']}")
    for name, v, hi in (("data.region_category_p", d["region_category_p"], 1.0),
                        ("data.region_colour_p", d["region_colour_p"], 1.0),
                        ("objective.region_weight", out["objective"]["region_weight"], math.inf)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
            raise ValueError(f"{where}: {name} must be a number in [0, {hi}], got {v!r}")
    if d["image_size"] % 32:
        raise ValueError(f"{where}: data.image_size must be a multiple of 32 (the res5 stride), got {d['image_size']}")
    for name, pair in (("data.scene_objects", d["scene_objects"]), ("eval.region_objects", e["region_objects"])):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(v, int) for v in pair)
                or not 1 <= pair[0] <= pair[1]):
            raise ValueError(f"{where}: {name} must be [min, max] object counts with 1 <= min <= max, got {pair!r}")
    if e["region_objects"][1] < 2:
        raise ValueError(f"{where}: eval.region_objects must allow multi-object scenes (max >= 2), got "
                         f"{e['region_objects']!r}")
    templates = e["templates"]
    if (not isinstance(templates, (list, tuple)) or not templates
            or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise ValueError(f"{where}: eval.templates must be a non-empty list of strings with one '{{}}' each, got "
                         f"{templates!r}")
    scales = e["scales"]
    if (not isinstance(scales, (list, tuple)) or not scales
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 and s % 32 == 0 for s in scales)):
        raise ValueError(f"{where}: eval.scales must be a non-empty list of multiples of 32, got {scales!r}")
    return out


def clip_config(cfg: dict) -> dict:
    """The open_clip config of ``cfg['model']['clip']`` (TINY_CLIP by default), a copy."""
    return copy.deepcopy((cfg.get("model") or {}).get("clip") or TINY_CLIP)


# ---------------------------------------------------------------------------------------------------------------------
# Model


class TrainCLIP(open_clip.CLIP):
    """``open_clip.CLIP`` for the trainer (see the module docstring): ``logit_scale`` is a 1-element vector (it keeps
    its place in the module, so key order is open_clip's). ``forward(image, text)`` -> (image features [B, E],
    text features [T, E], both L2-normalised, logit scale [1] = exp(clamp(logit_scale, 0, log 100)))."""

    def __init__(self, **clip_cfg):
        super().__init__(**clip_cfg)
        self.logit_scale = nn.Parameter(self.logit_scale.detach().reshape(1).clone())

    def forward(self, image: torch.Tensor, text: torch.Tensor, region_weights: Optional[torch.Tensor] = None,
                region_text: Optional[torch.Tensor] = None, region_valid: Optional[torch.Tensor] = None):
        """-> (image features [B, E], text features [T, E], logit scale [1]) and, when ``region_weights`` [B, R, h, w]
        (soft masks on the res5 grid), ``region_text`` [B, R, L] and ``region_valid`` [B, R] bool are given, also
        (region features [V, E], region text features [V, E]) of the V valid regions, in row-major (b, r) order.
        Every feature is L2-normalised. One trunk pass serves both: the image features are the trunk's own head on
        the same res5 map (= ``encode_image``)."""
        scale = self.logit_scale.clamp(0.0, LOG_MAX_SCALE).exp()
        text_features = self.encode_text(text, normalize=True)
        if region_weights is None:
            return self.encode_image(image, normalize=True), text_features, scale
        trunk = self.visual.trunk
        dense = trunk.forward_features(image)
        image_features = F.normalize(self.visual.head(trunk.forward_head(dense)), dim=-1)
        w = region_weights.float()
        pooled = torch.einsum("bchw,brhw->brc", dense.float(), w) / (w.sum((-1, -2)) + 1e-8)[..., None]
        pooled = pooled[region_valid].to(dense.dtype)
        region_features = F.normalize(visual_projection(self, pooled[None])[0], dim=-1)
        region_text_features = self.encode_text(region_text[region_valid], normalize=True)
        return image_features, text_features, scale, region_features, region_text_features

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of ``open_clip.CLIP`` (``logit_scale`` 0-dim again), fp32 CPU copies."""
        sd = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            sd[k] = v.reshape(()) if k == "logit_scale" else v
        return sd


def build_model(cfg: dict, seed: int = 0) -> TrainCLIP:
    """The randomly initialised :class:`TrainCLIP` of ``cfg`` (from ``seed``: every rank and resume builds the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TrainCLIP(**clip_config(cfg))


def load_clip(path: str, clip_cfg: Optional[dict] = None) -> open_clip.CLIP:
    """A plain ``open_clip.CLIP(**clip_cfg)`` (TINY_CLIP by default) with the weights of a checkpoint this module
    saved (strict; the file is read without running code), in eval mode."""
    from models.common.checkpoint import load_into, read_state_dict

    model = open_clip.CLIP(**copy.deepcopy(clip_cfg or TINY_CLIP))
    load_into(model, read_state_dict(path))
    return model.eval()


def tokenize(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """open_clip's BPE tokens of ``texts``: LongTensor [T, model.context_length]."""
    return open_clip.tokenize(list(texts), context_length=int(model.context_length))


# ---------------------------------------------------------------------------------------------------------------------
# Data


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """A ShapesWorld image (float [H, W, 3] in [0, 1], or uint8 0..255) -> the normalised CLIP input [3, H, W]
    (0..255 RGB minus PIXEL_MEAN, over PIXEL_STD; as the Unpair-Seg meta-arch normalises)."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def object_phrase(spec, rng: np.random.Generator, size_word: bool = True) -> str:
    """The category of ``spec`` (an ObjectSpec) with a random subset of its colour and (when ``size_word``) size
    words: "large red circle", "red circle", "large circle", "circle"."""
    words = [spec.size if size_word and rng.random() < 0.5 else None, spec.colour if rng.random() < 0.6 else None,
             spec.category]
    return " ".join(w for w in words if w)


def cell_coverage(masks: np.ndarray, stride: int = 32) -> np.ndarray:
    """bool masks [N, H, W] -> float32 [N, H / stride, W / stride]: the fraction of each res5 cell an object covers
    (the soft pooling weights of the region pairs)."""
    n, h, w = masks.shape
    return masks.reshape(n, h // stride, stride, w // stride, stride).mean(axis=(2, 4), dtype=np.float32)


class ShapesCaptionDataset(torch.utils.data.Dataset):
    """The caption mix of the module docstring. Item ``i`` ->

    * ``image`` float32 [3, S, S] normalised, ``text`` int64 [L] (its caption's tokens), ``kind`` int64 (in KINDS);
    * its region pairs, padded to ``R = max(data.scene_objects[1], 1)`` slots: ``region_weights`` float32
      [R, S/32, S/32] (each visible object's coverage of the res5 cells, :func:`cell_coverage`; zeros in padding),
      ``region_text`` int64 [R, L] (object captions), ``region_valid`` bool [R].

    Args:
        data: the resolved ``data`` section.
        context_length: the text tower's (token rows are padded / truncated to it).
        length: items (default ``data["train_items"]``).
    """

    def __init__(self, data: dict, context_length: int, length: Optional[int] = None):
        self.data = dict(data)
        self.length = int(length if length is not None else data["train_items"])
        if self.length < 1:
            raise ValueError(f"ShapesCaptionDataset: 'length' must be >= 1, got {self.length}")
        self.context_length = int(context_length)
        self.seed = int(data["seed"])
        self.epoch = 0
        self.size = int(data["image_size"])
        common = dict(seed=self.seed, size=self.size, categories=tuple(data["categories"]),
                      colours=tuple(data["colours"]), sizes=tuple(data["sizes"]), supersample=int(data["supersample"]))
        lo, hi = data["scene_objects"]
        self.scenes = ShapesWorld(min_objects=int(lo), max_objects=int(hi), **common)
        self.singles = ShapesWorld(min_objects=1, max_objects=1, **common)
        self.crops = self.singles.resized(int(data["crop_size"]))
        self.slots = max(int(hi), 1)
        names = [k for k in KINDS if data["mix"].get(k, 0) > 0]
        weights = np.array([float(data["mix"][k]) for k in names])
        self._kind_names, self._kind_p = names, weights / weights.sum()
        self._cache: Optional[dict] = {} if data.get("cache", True) else None
        self._tokens: dict[str, torch.Tensor] = {}  # caption -> tokens (BPE is slow; template captions repeat)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def kind(self, i: int) -> str:
        return self._kind_names[int(_rng(self.seed, 1, i).choice(len(self._kind_names), p=self._kind_p))]

    def group(self, i: int) -> int:
        """The side of item ``i``'s image (``image_size``, or ``crop_size`` for crop and category items): the
        trainer's ``group_key``, so that a micro-batch holds one image size."""
        return int(self.data["crop_size"]) if self.kind(i) in CROP_KINDS else self.size

    def scene(self, i: int) -> Scene:
        """Item ``i``'s rendered scene: a multi-object canvas (``scene``), a single-object canvas (``object``), or
        (``crop``, ``category``) a single-object scene's object on a ``crop_size`` canvas at the pixel size it has on
        the ``image_size`` canvas (radius x image_size / crop_size, at most half the side), anywhere ShapesWorld
        would place it: an object crop without resampling."""
        kind = self.kind(i)
        if kind == "scene":
            return self.scenes.scene(i)
        scene = self.singles.scene(i)
        if kind not in CROP_KINDS:
            return scene
        rng = _rng(self.seed, 3, i)
        sp = scene.specs[0]
        radius = min(0.5, sp.radius * self.size / int(self.data["crop_size"]))
        # Centres keep 0.8 radii from the border, as ShapesWorld places objects.
        lo, hi = 0.8 * radius, 1.0 - 0.8 * radius
        centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        return self.crops.render([dataclasses.replace(sp, radius=radius, center=centre)], scene.background)

    def caption(self, i: int, scene: Scene, epoch: int) -> str:
        """Item ``i``'s (whole-image) caption in ``epoch`` (the module docstring's mix)."""
        kind, rng = self.kind(i), _rng(self.seed, 2, epoch, i)
        if kind == "scene":
            return scene.caption()
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        if kind == "category":
            return template.format(scene.specs[0].category)
        if kind == "colour":
            return template.format(f"{scene.specs[0].colour} {GENERIC_NOUN}")
        if kind == "object" and rng.random() < 0.25:
            return scene.object_caption(0)
        return template.format(object_phrase(scene.specs[0], rng))

    def region_captions(self, i: int, scene: Scene, epoch: int) -> list[str]:
        """Item ``i``'s object captions in ``epoch``, one per object: a template over the category alone
        (probability ``data.region_category_p``), over "{colour} shape" (``data.region_colour_p``) or over
        :func:`object_phrase`."""
        rng = _rng(self.seed, 4, epoch, i)
        p_cat, p_col = float(self.data["region_category_p"]), float(self.data["region_colour_p"])
        out = []
        for sp in scene.specs:
            template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            u = rng.random()
            if u < p_cat:
                out.append(template.format(sp.category))
            elif u < p_cat + p_col:
                out.append(template.format(f"{sp.colour} {GENERIC_NOUN}"))
            else:
                out.append(template.format(object_phrase(sp, rng)))
        return out

    def _render(self, i: int) -> tuple[np.ndarray, Scene, np.ndarray]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        scene = self.scene(i)
        # Only what the captions read is kept with the pixels: a full Scene holds per-object float maps.
        item = (_to_uint8(scene.image), _caption_scene(scene), cell_coverage(scene.masks))
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _tokenize(self, caption: str) -> torch.Tensor:
        text = self._tokens.get(caption)
        if text is None:
            text = open_clip.tokenize([caption], context_length=self.context_length)[0]
            if self._cache is not None:
                self._tokens[caption] = text
        return text

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.length:
            raise IndexError(f"ShapesCaptionDataset: index {i!r} out of range [0, {self.length})")
        i = int(i)
        image, scene, coverage = self._render(i)
        g = self.group(i) // 32
        weights = torch.zeros(self.slots, g, g, dtype=torch.float32)
        region_text = torch.zeros(self.slots, self.context_length, dtype=torch.int64)
        valid = torch.zeros(self.slots, dtype=torch.bool)
        for j, caption in enumerate(self.region_captions(i, scene, self.epoch)[:self.slots]):
            weights[j] = torch.from_numpy(coverage[j])
            region_text[j] = self._tokenize(caption)
            valid[j] = bool(coverage[j].sum() > 0)
        return {"image": normalize_image(image), "text": self._tokenize(self.caption(i, scene, self.epoch)),
                "kind": torch.tensor(KINDS.index(self.kind(i)), dtype=torch.int64), "region_weights": weights,
                "region_text": region_text, "region_valid": valid}


def _caption_scene(scene: Scene) -> Scene:
    """``scene`` without its pixel maps: what its captions read (specs, size), small enough to cache per item."""
    return Scene(size=scene.size, specs=scene.specs, background=scene.background,
                 image=np.empty((0, 0, 3), np.float32), coverage=np.empty((0, 0, 0), np.float32),
                 amodal=np.empty((0, 0, 0), np.float32), instance=np.empty((0, 0), np.int32),
                 depth=np.empty((0, 0), np.float32), edges=np.empty((0, 0), bool))


# ---------------------------------------------------------------------------------------------------------------------
# Loss


class ContrastiveObjective:
    """The trainer's ``loss_fn``: ``open_clip.loss.ClipLoss`` on the whole images and their captions (features
    gathered over ranks), plus ``region_weight`` x ``ClipLoss`` on the batch's region pairs (mask-pooled res5
    features through the visual heads vs object captions; negatives from this process's batch only, since region
    counts differ between ranks), both with the learned logit scale, in fp32.

    Metrics: ``loss_image``, ``loss_region``, ``i2t_acc`` (fraction of images whose own caption scores highest among
    the batch's; duplicate captions count as misses), ``region_acc`` (the same for regions), ``logit_scale``."""

    def __init__(self, rank: int = 0, world_size: int = 1, region_weight: float = 1.0):
        self.image_loss = open_clip.loss.ClipLoss(local_loss=False, gather_with_grad=world_size > 1,
                                                  cache_labels=True, rank=rank, world_size=world_size)
        self.region_loss = open_clip.loss.ClipLoss()
        self.region_weight = float(region_weight)

    @staticmethod
    def _hits(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((a @ b.T).argmax(1) == torch.arange(len(a), device=a.device)).float().mean())

    def __call__(self, model, batch: dict, step: int):
        del step
        regions = self.region_weight > 0
        out = model(batch["image"], batch["text"], *((batch["region_weights"], batch["region_text"],
                                                      batch["region_valid"]) if regions else ()))
        img, txt, scale = (t.float() for t in out[:3])
        loss_image = self.image_loss(img, txt, scale)
        metrics = {"loss_image": float(loss_image.detach()), "i2t_acc": self._hits(img, txt),
                   "logit_scale": float(scale.detach().reshape(-1)[0])}
        loss = loss_image
        if regions:
            reg, reg_txt = out[3].float(), out[4].float()
            if len(reg) > 1:
                loss_region = self.region_loss(reg, reg_txt, scale)
                loss = loss + self.region_weight * loss_region
                metrics.update(loss_region=float(loss_region.detach()), region_acc=self._hits(reg, reg_txt))
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot read-outs


@torch.no_grad()
def text_classifier(model: open_clip.CLIP, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[K, E] unit class embeddings: per name, the L2-normalised text features of every template filled with it,
    averaged and re-normalised (CLIP's zero-shot recipe)."""
    if not names or not templates:
        raise ValueError("text_classifier: 'names' and 'templates' must be non-empty")
    device = next(model.parameters()).device
    texts = [t.format(n) for n in names for t in templates]
    feats = F.normalize(model.encode_text(tokenize(model, texts).to(device)).float(), dim=-1)
    return F.normalize(feats.view(len(names), len(templates), -1).mean(1), dim=-1)


def colour_class_names(colours: Sequence[str]) -> list[str]:
    """The colour vocabulary's class names: "{colour} shape" per colour (the words the ``colour`` kind teaches)."""
    return [f"{c} {GENERIC_NOUN}" for c in colours]


def dense_features(model: open_clip.CLIP, images: torch.Tensor) -> torch.Tensor:
    """The trunk's res5 map ``clip_vis_dense`` [N, C5, H/32, W/32]: stem -> stages -> norm_pre of the timm trunk
    (``images``: normalised [N, 3, H, W])."""
    trunk = model.visual.trunk
    return trunk.norm_pre(trunk.stages(trunk.stem(images)))


def mask_pool_binary(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Unpair-Seg's MaskPooling with binary masks and no sigmoid: ``masks`` [N, Q, Hm, Wm] (bool or 0/1) bilinearly
    resized to the features' grid (align_corners=False; skipped at equal size), ``>= 0.5``, then the masked mean of
    ``features`` [N, C, H, W] with ``eps`` added to each mask's count -> [N, Q, C] (zeros for a mask that covers no
    cell)."""
    if features.dim() != 4 or masks.dim() != 4 or masks.shape[0] != features.shape[0]:
        raise ValueError(f"mask_pool_binary: expected features [N, C, H, W] and masks [N, Q, Hm, Wm] with the same N, "
                         f"got {tuple(features.shape)} and {tuple(masks.shape)}")
    m = masks.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(features.shape[-2:]):
        m = F.interpolate(m, size=features.shape[-2:], mode="bilinear", align_corners=False)
    m = (m >= 0.5).to(torch.float32)
    return torch.einsum("nchw,nqhw->nqc", features.float(), m) / (m.sum((-1, -2)) + eps)[..., None]


def visual_projection(model: open_clip.CLIP, pooled: torch.Tensor) -> torch.Tensor:
    """``visual_prediction_forward``: pooled res5 features [B, Q, C5] -> ``trunk.head`` on the 1x1 maps (its average
    pool is the identity there; LayerNorm2d; fc Identity) -> ``visual.head`` -> [B, Q, E] (un-normalised)."""
    b, q, c = pooled.shape
    x = model.visual.trunk.head(pooled.reshape(b * q, c, 1, 1))
    return model.visual.head(x).reshape(b, q, -1)


@torch.no_grad()
def region_predictions(model: open_clip.CLIP, images: torch.Tensor, masks: torch.Tensor,
                       classifier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot class of every masked region: ``images`` normalised [N, 3, H, W], ``masks`` [N, Q, Hm, Wm] (bool,
    canvas-aligned), ``classifier`` [K, E] unit class embeddings -> (argmax class [N, Q] int64, empty [N, Q] bool:
    the mask covers no res5 cell, so its region embedding is that of a zero vector)."""
    emb, empty = region_embeddings(model, images, masks)
    return (emb @ classifier.float().T).argmax(-1), empty


@torch.no_grad()
def region_embeddings(model: open_clip.CLIP, images: torch.Tensor,
                      masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit region embeddings [N, Q, E] (fp32) behind :func:`region_predictions`, and its ``empty`` [N, Q]."""
    feats = dense_features(model, images)
    pooled = mask_pool_binary(feats, masks)
    emb = F.normalize(visual_projection(model, pooled.to(feats.dtype)).float(), dim=-1)
    m = masks.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(feats.shape[-2:]):
        m = F.interpolate(m, size=feats.shape[-2:], mode="bilinear", align_corners=False)
    return emb, (m >= 0.5).sum((-1, -2)) == 0


def _per_class(pred: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict:
    out = {}
    for k, name in enumerate(names):
        sel = labels == k
        if int(sel.sum()):
            out[name] = {"accuracy": float((pred[sel] == k).float().mean()), "count": int(sel.sum())}
    return out


def region_accuracy(model: open_clip.CLIP, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    classifier: torch.Tensor, names: Optional[Sequence[str]] = None) -> dict:
    """Region zero-shot accuracy (:func:`region_predictions`) over the regions whose ``labels`` [N, Q] (class index in
    ``classifier``'s rows) are >= 0 (``-1`` marks padding). -> {"accuracy", "count", "empty" (regions that pool to
    zeros), "per_class": {name: {"accuracy", "count"}} (names default to the class indices)}."""
    if labels.shape != masks.shape[:2]:
        raise ValueError(f"region_accuracy: 'labels' must be [N, Q] = {tuple(masks.shape[:2])}, got "
                         f"{tuple(labels.shape)}")
    pred, empty = region_predictions(model, images, masks, classifier)
    valid = labels.to(pred.device) >= 0
    lab = labels.to(pred.device)[valid]
    p = pred[valid]
    names = list(names) if names is not None else [str(k) for k in range(classifier.shape[0])]
    return {"accuracy": float((p == lab).float().mean()) if lab.numel() else float("nan"), "count": int(lab.numel()),
            "empty": int(empty[valid].sum()), "per_class": _per_class(p, lab, names)}


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _resize(images: torch.Tensor, scale: int) -> torch.Tensor:
    if images.shape[-1] == scale and images.shape[-2] == scale:
        return images
    return F.interpolate(images, size=(scale, scale), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model: open_clip.CLIP, cfg: dict, device: Optional[torch.device] = None) -> dict:
    """The zero-shot metrics of the module docstring on the held-out scenes of ``cfg`` (resolved), in fp32.

    -> {"image": {"accuracy", "count", "per_category"}, "region": {"<scale>": {"accuracy", "count", "empty",
    "per_category", "colour_accuracy", "joint_accuracy", "per_colour"}}, "chance": 1 / #categories}."""
    d, e = cfg["data"], cfg["eval"]
    device = device or next(model.parameters()).device
    was_training = model.training
    model = model.eval()
    cats, colours = list(d["categories"]), list(d["colours"])
    templates = list(e["templates"])
    cat_cls = text_classifier(model, cats, templates)
    joint_names = [f"{c} {k}" for k in cats for c in colours]  # class index = cat * len(colours) + colour
    joint_cls = text_classifier(model, joint_names, templates)
    colour_cls = text_classifier(model, colour_class_names(colours), templates)
    common = dict(seed=int(d["seed"]), size=int(d["image_size"]), categories=tuple(cats), colours=tuple(colours),
                  sizes=tuple(d["sizes"]), supersample=int(d["supersample"]))
    bs = int(e["batch_size"])

    singles = ShapesWorld(min_objects=1, max_objects=1, **common)
    preds, labels = [], []
    for s, t in _batches(int(e["image_scenes"]), bs):
        scenes = [singles.scene(EVAL_OFFSET + k) for k in range(s, t)]
        x = torch.stack([normalize_image(_to_uint8(sc.image)) for sc in scenes]).to(device)
        f = F.normalize(model.encode_image(x).float(), dim=-1)
        preds.append((f @ cat_cls.T).argmax(-1).cpu())
        labels.append(torch.tensor([cats.index(sc.specs[0].category) for sc in scenes]))
    pred, lab = torch.cat(preds), torch.cat(labels)
    image = {"accuracy": float((pred == lab).float().mean()), "count": int(lab.numel()),
             "per_category": _per_class(pred, lab, cats)}

    lo, hi = e["region_objects"]
    multi = ShapesWorld(min_objects=int(lo), max_objects=int(hi), **common)
    scenes = [multi.scene(EVAL_OFFSET + k) for k in range(int(e["region_scenes"]))]
    region = {}
    for scale in e["scales"]:
        acc = {"cat_pred": [], "cat": [], "joint_pred": [], "colour": [], "empty": [], "colour_pred": []}
        for s, t in _batches(len(scenes), bs):
            chunk = scenes[s:t]
            q = max(len(sc.specs) for sc in chunk)
            x = _resize(torch.stack([normalize_image(_to_uint8(sc.image)) for sc in chunk]), int(scale)).to(device)
            h, w = chunk[0].size
            masks = torch.zeros(len(chunk), q, h, w, dtype=torch.bool)
            cat = torch.full((len(chunk), q), -1, dtype=torch.int64)
            col = torch.full((len(chunk), q), -1, dtype=torch.int64)
            for n, sc in enumerate(chunk):
                masks[n, :len(sc.specs)] = torch.from_numpy(sc.masks)
                for j, sp in enumerate(sc.specs):
                    cat[n, j], col[n, j] = cats.index(sp.category), colours.index(sp.colour)
            masks = masks.to(device)
            emb, empty = region_embeddings(model, x, masks)  # one trunk pass, scored against each vocabulary
            cp, jp, vp = ((emb @ cls.float().T).argmax(-1) for cls in (cat_cls, joint_cls, colour_cls))
            acc["colour_pred"].append(vp.cpu()[cat >= 0])
            valid = cat >= 0
            acc["cat_pred"].append(cp.cpu()[valid])
            acc["cat"].append(cat[valid])
            acc["joint_pred"].append(jp.cpu()[valid])
            acc["colour"].append(col[valid])
            acc["empty"].append(empty.cpu()[valid])
        cp, cl = torch.cat(acc["cat_pred"]), torch.cat(acc["cat"])
        jp, co = torch.cat(acc["joint_pred"]), torch.cat(acc["colour"])
        jp_cat, jp_col = jp // len(colours), jp % len(colours)
        region[str(scale)] = {
            "accuracy": float((cp == cl).float().mean()), "count": int(cl.numel()),
            "empty": int(torch.cat(acc["empty"]).sum()), "per_category": _per_class(cp, cl, cats),
            "colour_accuracy": float((jp_col == co).float().mean()),
            "joint_accuracy": float(((jp_cat == cl) & (jp_col == co)).float().mean()),
            "per_colour": _per_class(jp_col, co, colours),
            "colour_vocab_accuracy": float((torch.cat(acc["colour_pred"]) == co).float().mean()),
            "per_colour_vocab": _per_class(torch.cat(acc["colour_pred"]), co, colours)}
    model.train(was_training)
    return {"image": image, "region": region, "chance": 1.0 / len(cats), "templates": templates}


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _fp32_state_dict(trainer, model: TrainCLIP) -> dict[str, torch.Tensor]:
    """The trained weights as open_clip's fp32 state dict: under bf16/fp16 or ZeRO-3 the optimizer's fp32 master
    copies (DeepSpeed's ``safe_get_full_fp32_param``, a collective under ZeRO-3: every rank calls it), else the
    module's own fp32 weights."""
    if trainer.dtype == torch.float32 and trainer.zero_stage != 3:
        return model.clip_state_dict()
    from deepspeed.utils import safe_get_full_fp32_param

    sd = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty partition in p itself
        full = p.detach() if full is None else full.detach()
        sd[name] = full.to("cpu", torch.float32, copy=True).reshape(() if name == "logit_scale" else shape)
    for name, b in model.named_buffers():
        if name in model.state_dict():
            sd[name] = b.detach().to("cpu", torch.float32 if b.is_floating_point() else b.dtype, copy=True)
    return {k: sd[k] for k in model.state_dict()}


def save_checkpoint(state_dict: dict, path: str) -> None:
    """``state_dict`` as safetensors (contiguous CPU tensors), written to a temporary file and renamed."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp.{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def train(cfg: dict, out_dir: Optional[str] = None) -> dict:
    """Pretrain per ``cfg`` (resolved; resuming from ``out_dir``'s checkpoints) and write the outputs of the module
    docstring. Returns {"out_dir", "records", "metrics" (zeroshot.json's content, rank 0; None elsewhere),
    "state_dict" (the saved one), "train_time_s", "model" (the trained :class:`TrainCLIP`, fp32, CPU, eval mode)}."""
    from train.launch import init_distributed
    from train.trainer import TrainConfig, Trainer

    cfg = resolve_config(cfg)
    out_dir = out_dir or cfg["out_dir"]
    info = init_distributed()
    t = dict(cfg["train"])
    tc = TrainConfig(out_dir=out_dir, save_every=int(t.pop("save_every", t["steps"])), **t)
    model = build_model(cfg, seed=tc.seed)
    dataset = ShapesCaptionDataset(cfg["data"], model.context_length)
    objective = ContrastiveObjective(info.rank, info.world_size, cfg["objective"]["region_weight"])
    trainer = Trainer(model, objective, dataset, tc, group_key=dataset.group)
    t0 = time.perf_counter()
    records = trainer.train()
    train_time = time.perf_counter() - t0
    sd = _fp32_state_dict(trainer, trainer.engine.module)
    metrics = None
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(sd, os.path.join(out_dir, CHECKPOINT))
        clip = open_clip.CLIP(**clip_config(cfg))
        clip.load_state_dict(sd, strict=True)
        t1 = time.perf_counter()
        metrics = evaluate(clip.to(info.device), cfg, info.device)
        metrics.update(eval_time_s=time.perf_counter() - t1, train_time_s=train_time, steps=tc.steps,
                       samples=tc.steps * tc.micro_batch * tc.grad_accum * info.world_size,
                       world_size=info.world_size, device=str(info.device), torch_threads=torch.get_num_threads(),
                       final_loss=next((r["loss"] for r in reversed(records) if "loss" in r), None), config=cfg)
        tmp = os.path.join(out_dir, METRICS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, METRICS))
    if dist.is_initialized() and info.world_size > 1:
        dist.barrier()
    if trainer.zero_stage == 3:  # the engine's module holds partitions: rebuild the trained model from the weights
        trained = TrainCLIP(**clip_config(cfg))
        trained.load_state_dict({k: v.reshape(1) if k == "logit_scale" else v for k, v in sd.items()})
    else:
        trained = copy.deepcopy(trainer.engine.module).float().cpu()
    return {"out_dir": out_dir, "records": records, "metrics": metrics, "state_dict": sd, "train_time_s": train_time,
            "model": trained.eval()}


def _summary(m: dict) -> str:
    lines = [f"image accuracy {m['image']['accuracy']:.3f} over {m['image']['count']} single-object scenes (chance "
             f"{m['chance']:.3f}): " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in m['image']['per_category'].items())]
    for scale, r in m["region"].items():
        lines.append(f"region accuracy @{scale}px {r['accuracy']:.3f} over {r['count']} objects ({r['empty']} empty "
                     f"at res5), colour {r['colour_accuracy']:.3f}, joint {r['joint_accuracy']:.3f}, colour vocabulary "
                     f"{r['colour_vocab_accuracy']:.3f}: "
                     + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in r['per_category'].items()))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default=None, help="output directory (overrides the config's out_dir)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides train.steps)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config entry (YAML value); repeatable")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(args.config, overrides)
    out = train(cfg, args.out)
    if out["metrics"] is not None:
        print(f"clip_pretrain: {out['train_time_s']:.1f} s of training; "
              f"{os.path.join(out['out_dir'], CHECKPOINT)}\n{_summary(out['metrics'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
