"""``python -m train.unpair_seg --stage 2 --config train/configs/unpair_seg_s2.yaml [--s1 stage1.pth]
[--clip clip.safetensors] [--data manifest.jsonl]``: Unpair-Seg stage 2, mask-entity alignment, on the shared
trainer (thesis §3.3-3.4; spec §11.2-11.7; models/unpair_seg/stage2.py for the model).

Recipe (thesis §3.4 "Training configuration": batch 32, lr 2e-5, a 20 x 20 point grid, 30k iterations; the rest is
not given and is documented here):

* Only the semantic adapter trains (``UnpairSegS2.adapter``); the stage-1 model and CLIP are frozen.
* AdamW (betas 0.9 / 0.999, weight decay 0.05 on tensors of >= 2 dims: stage 1's decay, thesis §3.4), constant lr
  2e-5, no warmup, gradient clipping 1.0, no EMA. ``train.global_batch`` 32 is split evenly over the processes
  (``micro_batch = global_batch / (world_size * grad_accum)``).
* Precision: bf16 on CUDA as bf16 autocast over fp32 weights, as the official demo runs stage 1 (the trainer's
  ``autocast: true``: its bf16 module cast would meet the fp32 pixel decoder), fp32 on the CPU.
* Data: a caption manifest (``--data`` / ``data.manifest``: plain or ShareGPT4V-style JSONL,
  train/data/captions.py) whose entities come from the manifest's ``"entities"`` or from ``data.extractor``
  (``noun_phrase`` by default, models/unpair_seg/entities.py); without a manifest, ShapesWorld scenes
  (``data.shapes``) are written once to ``out_dir/data/shapes`` (rank 0; captions.jsonl with exact entities) and
  read back through the same loader.
* Weights: ``--clip`` / ``weights.clip`` (an open_clip CLIP state dict, e.g. train/clip_pretrain.py's
  ``clip.safetensors``) into ``s1.backbone.clip_model``; then ``--s1`` / ``weights.s1`` (a stage-1 checkpoint in the
  official layout, ``models.unpair_seg.convert.load_official``, strict), which holds the backbone too and so wins
  (its decoder was trained on its own CLIP; a differing CLIP file is reported). Missing files fail; no weights at all
  warn (the smoke tests run on random weights).

Outputs in ``out_dir``: the trainer's ``metrics.jsonl`` (``loss``, ``align``, ``pairs``, ``proposals``,
``confidence`` per logged step), ``checkpoints/`` (resume), ``config.json``; and ``adapter.safetensors`` (the adapter
with its Stage2Config, ``models.unpair_seg.stage2.load_adapter``) and ``stage2.json`` (resolved config, summary).

YAML sections (train/configs/unpair_seg_s2*.yaml)::

    out_dir: runs/unpair_seg_s2
    model:   {preset: official | tiny, image_size (tiny), <UnpairSegConfig fields, e.g. pts_per_side, score_threshold>}
    stage2:  {preset: official | tiny, <Stage2Config fields: scales, threshold, holdout, templates, ...>}
    weights: {s1: null | path, clip: null | path}
    data:    {manifest: null | path, image_root, extractor: noun_phrase | shapes,
              shapes: {seed, size, scenes, offset, min_objects, max_objects, categories, colours, sizes,
                       supersample, min_visible, style}}
    train:   {global_batch | micro_batch, grad_accum, steps, lr, weight_decay, betas, schedule, warmup_steps,
              grad_clip, ema_decay, seed, zero_stage, precision, log_every, save_every, keep_last, progress, ...}

``--set section.key=value`` overrides any entry (the value parsed as YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from train.unpair_seg import common
from train.unpair_seg.common import frozen_scalars_to_buffers  # noqa: F401 (part of this module's API)

SECTIONS = ("out_dir", "model", "stage2", "weights", "data", "train")
TRAIN_DEFAULTS = {"global_batch": 32, "steps": 30000, "lr": 2e-5, "betas": [0.9, 0.999], "weight_decay": 0.05,
                  "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0, "ema_decay": None, "zero_stage": 0,
                  "save_every": 1000, "log_every": 20, "autocast": True}
SHAPES_DEFAULTS = {"seed": 0, "size": [64, 64], "scenes": 2000, "offset": 0, "min_objects": 1, "max_objects": 4,
                   "categories": None, "colours": None, "sizes": None, "supersample": None, "min_visible": None,
                   "style": "plain"}
_WRITER_KEYS = ("scenes", "offset", "style")
ADAPTER_FILE, SUMMARY_FILE = "adapter.safetensors", "stage2.json"


# ---------------------------------------------------------------------------------------------------------------------
# Config


def load_config(path: str, overrides=()) -> dict:
    """The YAML at ``path`` with ``overrides`` ("section.key=value", values parsed as YAML) applied; unknown sections
    raise (:func:`train.unpair_seg.common.load_config`)."""
    return common.load_config(path, overrides, SECTIONS)


def model_config(cfg: dict):
    """The UnpairSegConfig of ``cfg['model']``: preset ``official`` or ``tiny`` (with ``image_size``) plus fields
    (:func:`train.unpair_seg.common.model_config`)."""
    return common.model_config(cfg)


def stage2_config(cfg: dict):
    """The Stage2Config of ``cfg['stage2']``: preset ``official`` or ``tiny`` (sized to the model's canvas) plus
    fields."""
    from models.unpair_seg.stage2 import Stage2Config

    s = dict(cfg.get("stage2") or {})
    preset = s.pop("preset", "official")
    fields = {f.name for f in dataclasses.fields(Stage2Config)} - {"extra"}
    unknown = sorted(set(s) - fields)
    if unknown:
        raise ValueError(f"stage2: unknown key(s) {unknown}; known: preset, {sorted(fields)}")
    for k in ("scales", "adapter_scales", "adapter_features", "holdout"):
        if isinstance(s.get(k), list):
            s[k] = tuple(s[k])
    if isinstance(s.get("templates"), list):
        s["templates"] = tuple(s["templates"])
    if preset == "official":
        return Stage2Config.official(**s)
    if preset == "tiny":
        return Stage2Config.tiny(model_config(cfg).image_size, **s)
    raise ValueError(f"stage2.preset must be 'official' or 'tiny', got {preset!r}")


def train_config(cfg: dict, out_dir: str, world_size: int):
    """The TrainConfig of the recipe (module docstring): the ``train`` section over :data:`TRAIN_DEFAULTS`, the global
    batch split over the processes (:func:`train.unpair_seg.common.train_config`)."""
    return common.train_config(cfg, out_dir, world_size, TRAIN_DEFAULTS)


# ---------------------------------------------------------------------------------------------------------------------
# Model and weights


def load_weights(model, s1: Optional[str], clip: Optional[str]) -> None:
    """``clip`` into ``model.s1.backbone.clip_model``, then ``s1`` (strict) into ``model.s1`` (module docstring)."""
    from models.unpair_seg.convert import load_official, read_official

    for name, path in (("clip", clip), ("s1", s1)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"weights.{name}: {path!r} does not exist (weights are never downloaded)")
    if clip:
        common.load_clip_weights(model.s1.backbone.clip_model, clip)
    if s1:
        state = read_official(s1)
        if clip:
            own = model.s1.backbone.clip_model.state_dict()
            sub = {k[len("backbone.clip_model."):]: v for k, v in state.items()
                   if k.startswith("backbone.clip_model.")}
            if any(k in own and not torch.equal(own[k].cpu(), v.to(own[k].dtype)) for k, v in sub.items()):
                warnings.warn(f"stage 2: the stage-1 checkpoint {s1!r} holds a different CLIP than {clip!r}; the "
                              "stage-1 one is used (its decoder was trained on it)", stacklevel=2)
        load_official(model.s1, state)
    if not s1 and not clip:
        warnings.warn("stage 2: neither weights.s1 nor weights.clip is set: the stage-1 model and CLIP are randomly "
                      "initialised (fine for smoke tests only)", stacklevel=2)
    elif not s1:
        warnings.warn("stage 2: weights.s1 is not set: the stage-1 mask decoder is randomly initialised, so the "
                      "proposals are meaningless", stacklevel=2)


def build_model(cfg: dict, seed: int = 0):
    """The UnpairSegS2 of ``cfg`` (initialised from ``seed``: every rank and every resume builds the same one), with
    the weights of ``cfg['weights']``; the frozen 0-dim ``logit_scale`` becomes a buffer
    (:func:`frozen_scalars_to_buffers`)."""
    from models.unpair_seg.stage2 import UnpairSegS2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UnpairSegS2(model_config(cfg), stage2_config(cfg))
    w = cfg.get("weights") or {}
    load_weights(model, w.get("s1"), w.get("clip"))
    frozen_scalars_to_buffers(model.s1)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Data


def shapes_settings(d: dict) -> dict:
    s = dict(SHAPES_DEFAULTS)
    given = dict(d.get("shapes") or {})
    unknown = sorted(set(given) - set(SHAPES_DEFAULTS))
    if unknown:
        raise ValueError(f"data.shapes: unknown key(s) {unknown}; known: {sorted(SHAPES_DEFAULTS)}")
    s.update(given)
    return s


def write_shapes_data(d: dict, out_dir: str) -> str:
    """Write the ShapesWorld caption data of ``data.shapes`` under ``out_dir/data/shapes`` unless the same settings
    were written there already; returns the manifest path."""
    from train.data.captions import MANIFEST, write_shapes_captions

    s = shapes_settings(d)
    root = os.path.join(out_dir, "data", "shapes")
    manifest, spec_path = os.path.join(root, MANIFEST), os.path.join(root, "settings.json")
    if os.path.isfile(manifest) and os.path.isfile(spec_path):
        with open(spec_path) as f:
            if json.load(f) == s:
                return manifest
    world = common.shapes_world({k: v for k, v in s.items() if k not in _WRITER_KEYS})
    indices = range(int(s["offset"]), int(s["offset"]) + int(s["scenes"]))
    path = write_shapes_captions(world, indices, root, style=s["style"])
    tmp = spec_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(s, f)
    os.replace(tmp, spec_path)
    return str(path)


def build_dataset(cfg: dict, out_dir: str, rank: int, world_size: int):
    """The CaptionDataset of ``cfg['data']`` at the model's canvas (module docstring); ShapesWorld data is written
    by rank 0 while the others wait."""
    from train.data.captions import CaptionDataset

    d = dict(cfg.get("data") or {})
    known = {"manifest", "image_root", "extractor", "shapes"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; known: {sorted(known)}")
    manifest = d.get("manifest")
    if not manifest:
        if rank == 0:
            manifest = write_shapes_data(d, out_dir)
        if world_size > 1:
            dist.barrier()
        if rank != 0:
            manifest = write_shapes_data(d, out_dir)  # finds rank 0's files and returns their path
    return CaptionDataset(manifest, model_config(cfg).image_size, extractor=d.get("extractor") or "noun_phrase",
                          image_root=d.get("image_root"))


# ---------------------------------------------------------------------------------------------------------------------
# Loss and entry point


def loss_fn(model, batch: dict, step: int):
    """The trainer's objective: the weighted alignment loss, and per-step means of the alignment loss, confident
    pairs, proposals per image and pair confidence."""
    del step
    out = model(images=batch["image"], entities=batch["entities"], sizes=batch["orig_size"])
    n = max(1, int(batch["image"].shape[0]))
    return out["loss"], {"align": float(out["loss_align"]), "pairs": float(out["pairs"]) / n,
                         "proposals": float(out["proposals"]) / n, "confidence": float(out["confidence"])}


def collate(items):
    from train.data.captions import collate_captions

    return collate_captions(items)


def train(cfg: dict, out_dir: Optional[str] = None) -> dict:
    """Train stage 2 per ``cfg`` (resuming from ``out_dir``'s checkpoints); returns {"out_dir", "records",
    "model" (the trained UnpairSegS2, fp32, CPU, eval mode; None on ranks > 0)}."""

    from models.unpair_seg.stage2 import save_adapter
    from train.launch import init_distributed
    from train.trainer import Trainer

    out_dir = out_dir or cfg.get("out_dir") or "runs/unpair_seg_s2"
    info = init_distributed()
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    tc = train_config(cfg, out_dir, info.world_size)
    dataset = build_dataset(cfg, out_dir, info.rank, info.world_size)
    model = build_model(cfg, seed=tc.seed)
    trainer = Trainer(model, loss_fn, dataset, tc, collate_fn=collate)
    records = trainer.train()
    trained = trainer.trained_model()  # a collective (ZeRO); None on ranks > 0
    trained = trained.cpu() if trained is not None else None
    if info.rank == 0:
        save_adapter(trained, os.path.join(out_dir, ADAPTER_FILE))
        losses = [r["loss"] for r in records if "loss" in r]
        summary = {"steps": tc.steps, "micro_batch": tc.micro_batch, "world_size": info.world_size,
                   "dataset": len(dataset), "stage2": trained.s2cfg.to_dict(), "model": model_config(cfg).to_dict(),
                   "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        tmp = os.path.join(out_dir, SUMMARY_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, default=list)
        os.replace(tmp, os.path.join(out_dir, SUMMARY_FILE))
    return {"out_dir": out_dir, "records": records, "model": trained}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.unpair_seg --stage 2",
                                 description="Unpair-Seg stage 2: mask-entity alignment (train the semantic adapter).")
    ap.add_argument("--stage", type=int, default=2, help="must be 2 here (train.unpair_seg dispatches on it)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out-dir", default=None, help="overrides the config's out_dir")
    ap.add_argument("--s1", default=None, help="stage-1 checkpoint (official layout); overrides weights.s1")
    ap.add_argument("--clip", default=None, help="open_clip CLIP state dict; overrides weights.clip")
    ap.add_argument("--data", default=None, help="caption manifest (JSONL); overrides data.manifest")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config entry (YAML value); repeatable")
    args = ap.parse_args(argv)
    if args.stage != 2:
        ap.error(f"--stage must be 2 for train.unpair_seg.stage2, got {args.stage}")
    cfg = load_config(args.config, args.overrides)
    for flag, section, key in ((args.s1, "weights", "s1"), (args.clip, "weights", "clip"),
                               (args.data, "data", "manifest")):
        if flag is not None:
            cfg.setdefault(section, {})
            if cfg[section] is None:
                cfg[section] = {}
            cfg[section][key] = flag
    out = train(cfg, args.out_dir)
    recs = [r for r in out["records"] if "loss" in r]
    if recs:
        print(f"Unpair-Seg stage 2: {len(recs)} records, loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}; "
              f"{os.path.join(out['out_dir'], ADAPTER_FILE)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
