"""``python -m train.unpair_seg --stage 1 --config train/configs/unpair_seg_s1.yaml [--data SA1B_ROOT]
[--init stage1.pth] [--clip clip.safetensors] [--out-dir DIR] [--set section.key=value ...]``: Unpair-Seg stage 1,
promptable mask generation, on the shared DeepSpeed trainer (spec §8, §11.1; thesis §3.3 "Mask generation").

The official repository has no training code; the recipe below is the config's (spec §8 SOLVER row) with each open
point decided and stated:

* Model: :class:`UnpairSegS1` of ``model`` (official or tiny preset), initialised from ``train.seed`` (every rank and
  every resume builds the same one); ``--init`` / ``weights.init``: a checkpoint in the official layout
  (``models.unpair_seg.convert.load_official``, strict); ``--clip`` / ``weights.clip``: an open_clip CLIP state dict
  (e.g. train/clip_pretrain.py's) into ``backbone.clip_model`` first (``--init`` wins, it holds the backbone too).
  The backbone stays frozen, as officially (no config trains it); CLIP's 0-dim ``logit_scale`` becomes a buffer of the
  same key (DeepSpeed cannot hold 0-dim parameters).
* Losses (models/unpair_seg/criterion.py): per image the 10 x 10 point prompts (many-to-many matching, 4 outputs)
  and the GT boxes (head 0) of the same batch, together through the engine in
  one ``model(images=..., prompts={"point": ..., "box": ...})`` call: the image encoder (backbone without grad, then
  the pixel decoder) runs once and both prompt sets decode on its features; the criterion's weighted losses of all
  heads are summed (weights ``criterion``: the config's 2 / 1 / 1 by default, ``preset: thesis`` for 2 / 1 / 5).
  There is no dropout anywhere, so this equals one encoder pass per prompt type with the gradients added.
* Optimizer: AdamW, lr 1e-4, betas (0.9, 0.999) (torch's / detectron2's default; the config does not set them),
  weight decay 0.05 except norm layers and ``nn.Embedding`` (train/unpair_seg/common.py ``param_groups``, as
  Mask2Former's optimizer), backbone lr x 0.1 (moot: frozen).
* Schedule: "multistep" x 0.1 at 93.5k and 104.5k of 110k iterations, linear warmup over 10 iterations (detectron2's
  WarmupMultiStepLR warms up from a factor; the trainer's warmup starts at 1/10: the same after 10 of 110k steps).
* Full-model gradient-norm clipping 1.0; no EMA; bf16 on CUDA as the official "AMP on": bf16 autocast over the fp32
  weights (the trainer's ``autocast: true``: the model is written for autocast, its pixel decoder runs in fp32 with
  autocast off, so the trainer's bf16 module cast fails at step 1), fp32 on the CPU.
* Batch 56 (``train.global_batch``, split evenly over the processes: 8 GPUs x 7); ZeRO stage 0 (DDP-like) by
  default, 1-2 allowed, 3 refused (nothing to partition at ~22 M trainable parameters).
* Data (train/data/sa1b.py): SA-1B from ``--data`` / ``data.root`` with LSJ (0.8-1.2), the stage-1 area filter
  (1e-4-0.8), at most 40 masks and the 10 x 10 point grid per image. Without a root, the embedded default: ShapesWorld
  scenes (``data.shapes``) written once in the SA-1B format to ``<out_dir>/data/shapes_sa1b`` (rank 0, the others wait)
  and read with the same loader. Samples depend only on (seed, epoch, index), so resume is exact.

Outputs in ``out_dir``: the trainer's ``metrics.jsonl`` (``loss`` plus the last head's ``loss_mask`` /
``loss_dice`` / ``loss_iou`` / ``loss_box_*``, ``aux`` (the weighted aux-head sum), ``pairs`` / ``box_pairs``
(matched per micro-batch) and ``match_iou`` / ``box_match_iou`` (mean IoU of the matched binarised predictions),
``checkpoints/``, ``config.json``; ``final_stage1.pth`` (official layout ``{"model": ...}``, fp32, loadable by
``load_official`` and the official code; under bf16 autocast the fp32 weights) and ``stage1.json``
(the resolved config and the last record).

YAML sections (train/configs/unpair_seg_s1*.yaml)::

    out_dir: runs/unpair_seg_s1
    model:     {preset: official | tiny, image_size, <UnpairSegConfig fields>}
    weights:   {init: null | path, clip: null | path}
    data:      {root: null | path, min_scale, max_scale, flip_prob, min_area_ratio, max_area_ratio, max_instances,
                points_per_side, seed,
                shapes: {seed, size, scenes, offset, min_objects, max_objects, categories, colours, sizes}}
    criterion: {preset: config | thesis, mask_weight, dice_weight, iou_weight, num_points, oversample_ratio,
                importance_sample_ratio, matcher_num_points, deep_supervision, box, chunk_points}
    optim:     {backbone_lr_mult}
    train:     {global_batch | micro_batch, grad_accum, steps, lr, betas, weight_decay, schedule, milestones, gamma,
                warmup_steps, grad_clip, ema_decay, zero_stage, precision, seed, num_workers, log_every, save_every,
                keep_last, progress}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from train.unpair_seg import common

SECTIONS = ("out_dir", "model", "weights", "data", "criterion", "optim", "train")
TRAIN_DEFAULTS = {"global_batch": 56, "steps": 110_000, "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.05,
                  "schedule": "multistep", "milestones": [93_500, 104_500], "gamma": 0.1, "warmup_steps": 10,
                  "grad_clip": 1.0, "ema_decay": None, "zero_stage": 0, "precision": "auto", "save_every": 5000,
                  "log_every": 20, "autocast": True}
DATA_DEFAULTS = {"root": None, "min_scale": 0.8, "max_scale": 1.2, "flip_prob": 0.5, "min_area_ratio": 1e-4,
                 "max_area_ratio": 0.8, "max_instances": 40, "points_per_side": [10, 10], "seed": 0}
SHAPES_DEFAULTS = {"seed": 0, "size": [96, 128], "scenes": 512, "offset": 0, "min_objects": 2, "max_objects": 6}
CRITERION_DEFAULTS = {"preset": "config", "num_points": 12544, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75,
                      "matcher_num_points": 6000, "deep_supervision": True, "box": True}
OPTIM_DEFAULTS = {"backbone_lr_mult": 0.1}
FINAL, SUMMARY = "final_stage1.pth", "stage1.json"
SHAPES_DIR = os.path.join("data", "shapes_sa1b")


def load_config(path: str, overrides=()) -> dict:
    """The stage-1 YAML at ``path`` with ``--set`` overrides (unknown sections raise)."""
    return common.load_config(path, overrides, SECTIONS)


_EXTRA_KEYS = {"criterion": ("mask_weight", "dice_weight", "iou_weight", "chunk_points"), "data": ("shapes",)}


def _section(cfg: dict, name: str, defaults: dict) -> dict:
    """``cfg[name]`` over ``defaults``; keys outside the defaults (and the section's optional extras) raise."""
    given = dict(cfg.get(name) or {})
    known = set(defaults) | set(_EXTRA_KEYS.get(name, ()))
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    out = dict(defaults)
    out.update(given)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def build_criterion(cfg: dict):
    """(Many2ManySetCriterion of ``cfg['criterion']``, whether box prompts are trained)."""
    from models.unpair_seg.criterion import Many2ManySetCriterion

    c = _section(cfg, "criterion", CRITERION_DEFAULTS)
    box = c.pop("box")
    if not isinstance(box, bool):
        raise ValueError(f"criterion.box must be true or false, got {box!r}")
    preset = c.pop("preset")
    num_masks = common.model_config(cfg).num_masks
    return Many2ManySetCriterion.from_preset(preset, num_masks=num_masks, **c), box


def build_model(cfg: dict, seed: int = 0, init: Optional[str] = None, clip: Optional[str] = None):
    """The UnpairSegS1 of ``cfg`` initialised from ``seed``, with the CLIP / stage-1 weights (module docstring),
    the backbone frozen and 0-dim parameters made buffers."""
    from models.unpair_seg.convert import load_official
    from models.unpair_seg.model import UnpairSegS1

    w = dict(cfg.get("weights") or {})
    unknown = sorted(set(w) - {"init", "clip"})
    if unknown:
        raise ValueError(f"weights: unknown key(s) {unknown}; known: ['clip', 'init']")
    init = init if init is not None else w.get("init")
    clip = clip if clip is not None else w.get("clip")
    for name, path in (("init", init), ("clip", clip)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"weights.{name}: {path!r} does not exist (weights are never downloaded)")
    mcfg = common.model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UnpairSegS1(mcfg)
    model.backbone.requires_grad_(False)
    common.frozen_scalars_to_buffers(model)
    if clip:
        common.load_clip_weights(model.backbone.clip_model, clip)
    if init:
        load_official(model, init)
    if not init and not clip:
        warnings.warn("stage 1: neither weights.init nor weights.clip is set: the frozen CLIP backbone is randomly "
                      "initialised (fine for ShapesWorld smoke runs; real training needs the CLIP weights)",
                      stacklevel=2)
    return model


def data_section(cfg: dict) -> dict:
    d = _section(cfg, "data", DATA_DEFAULTS)
    shapes = dict(SHAPES_DEFAULTS)
    shapes.update(d.pop("shapes", None) or {})
    d["shapes"] = shapes
    return d


def build_dataset(cfg: dict, out_dir: str, root: Optional[str] = None, rank: int = 0, world_size: int = 1):
    """The SA1BDataset of ``cfg`` (``root`` over ``data.root``); without one, the ShapesWorld SA-1B cache in
    ``out_dir`` (written by rank 0 while the others wait at a barrier)."""
    from train.data.sa1b import SA1BDataset, shapes_sa1b_cache

    d = data_section(cfg)
    root = root or d.pop("root")
    d.pop("root", None)
    shapes = d.pop("shapes")
    if not root:
        world = common.shapes_world(shapes)
        n, off = int(shapes.get("scenes", 512)), int(shapes.get("offset", 0))
        root = os.path.join(out_dir, SHAPES_DIR)
        if rank == 0:
            shapes_sa1b_cache(world, range(off, off + n), root)
        if world_size > 1 and dist.is_initialized():
            dist.barrier()
    elif not os.path.isdir(root):
        raise ValueError(f"data.root / --data: {root!r} is not a folder of SA-1B files")
    d["points_per_side"] = tuple(d["points_per_side"])
    return SA1BDataset(root, common.model_config(cfg).image_size, **d)


class Stage1Loss:
    """The trainer's ``loss_fn``: point prompts (and box prompts unless disabled) of the batch through the engine,
    the criterion's weighted total, and the logged parts (module docstring)."""

    def __init__(self, criterion, box: bool = True):
        self.criterion, self.box = criterion, box

    @staticmethod
    def targets(batch: dict) -> dict:
        return {"masks": batch["masks"], "mask_valid": batch["mask_valid"],
                "point_targets": batch["point_targets"] & batch["point_valid"][..., None],
                "box_targets": batch["box_targets"]}

    def __call__(self, model, batch: dict, step: int):
        from train.data.sa1b import prompt_boxes, prompt_points

        del step
        crit = self.criterion
        tg = self.targets(batch)
        prompts = {"point": prompt_points(batch["points"])}
        if self.box:
            prompts["box"] = prompt_boxes(batch["boxes"])
        out = model(images=batch["image"], prompts=prompts)
        losses = crit(out["point"], tg, "point")
        stats = {"pairs": crit.stats["point"]["pairs"], "match_iou": crit.stats["point"]["iou"]}
        if self.box:
            losses.update(crit(out["box"], tg, "box"))
            stats.update(box_pairs=crit.stats["box"]["pairs"], box_match_iou=crit.stats["box"]["iou"])
        total = crit.total(losses)
        last = {k: float(v.detach()) for k, v in losses.items() if not k.rsplit("_", 1)[-1].isdigit()}
        aux = float(sum(crit.weight_of(k) * float(v.detach()) for k, v in losses.items() if k not in last))
        return total, {**last, "aux": aux, **stats}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def _final_model(trainer) -> Optional[torch.nn.Module]:
    """Rank 0: an fp32 CPU eval-mode copy of the trained module (its full fp32 weights); None elsewhere. A
    collective: every rank calls it."""
    model = trainer.trained_model()
    return model.cpu() if model is not None else None


def train(cfg: dict, out_dir: Optional[str] = None, data: Optional[str] = None, init: Optional[str] = None,
          clip: Optional[str] = None) -> dict:
    """Train stage 1 per ``cfg`` (resuming from ``out_dir``'s checkpoints); returns {"out_dir", "records",
    "final" (path of final_stage1.pth, rank 0), "model" (the trained module, fp32 CPU, rank 0; else None)}."""
    from models.unpair_seg.convert import save_official
    from train.data.sa1b import collate
    from train.launch import init_distributed
    from train.trainer import Trainer

    out_dir = out_dir or cfg.get("out_dir") or "runs/unpair_seg_s1"
    info = init_distributed()
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    tc = common.train_config(cfg, out_dir, info.world_size, TRAIN_DEFAULTS)
    if tc.zero_stage == 3:
        raise ValueError("train.zero_stage: stage 1 supports ZeRO 0-2 (its ~22 M trainable parameters need no "
                         "parameter partitioning, and the final checkpoint is copied from the unpartitioned module)")
    dataset = build_dataset(cfg, out_dir, data, info.rank, info.world_size)
    criterion, box = build_criterion(cfg)
    model = build_model(cfg, seed=tc.seed, init=init, clip=clip)
    o = _section(cfg, "optim", OPTIM_DEFAULTS)
    groups = common.param_groups(model, tc.weight_decay, float(o["backbone_lr_mult"]))
    trainer = Trainer(model, Stage1Loss(criterion, box), dataset, tc, collate_fn=collate, param_groups=groups)
    records = trainer.train()
    final = _final_model(trainer)
    path = os.path.join(out_dir, FINAL)
    if info.rank == 0:
        tmp = path + f".tmp.{os.getpid()}"
        save_official(final, tmp)
        os.replace(tmp, path)
        summary = {"config": cfg, "train": {k: (list(v) if isinstance(v, tuple) else v)
                                            for k, v in vars(tc).items()},
                   "data_root": dataset.root, "items": len(dataset), "world_size": info.world_size,
                   "last": records[-1] if records else None, "final": path}
        with open(os.path.join(out_dir, SUMMARY), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return {"out_dir": out_dir, "records": records, "final": path if info.rank == 0 else None, "model": final}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.unpair_seg --stage 1", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "configs", "unpair_seg_s1.yaml"))
    ap.add_argument("--data", default=None, help="SA-1B folder (<id>.jpg + <id>.json); default: ShapesWorld")
    ap.add_argument("--init", default=None, help="a stage-1 checkpoint in the official layout to start from")
    ap.add_argument("--clip", default=None, help="an open_clip CLIP state dict for the frozen backbone")
    ap.add_argument("--out-dir", default=None, help="overrides the config's out_dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config entry (YAML value); repeatable")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = train(cfg, args.out_dir, args.data, args.init, args.clip)
    if out["final"]:
        last = out["records"][-1] if out["records"] else {}
        print(f"Unpair-Seg stage 1: {len(out['records'])} records, last loss {last.get('loss')}; {out['final']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
