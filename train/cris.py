"""``python -m train.cris --config train/configs/cris_r50.yaml``: train CRIS with the official recipe on the shared
trainer (specs/cris.md §4, §6; issue 7).

Recipe (spec §6), through :class:`train.trainer.Trainer`:

* ``torch.optim.Adam`` (betas 0.9 / 0.999, eps 1e-8, weight decay 0), no gradient clipping, no EMA, no warmup.
* Two parameter groups by parameter name (:func:`param_groups`): "backbone" = every name starting with
  ``backbone`` that does not contain ``positional_embedding`` (RN50: 325 tensors, including the token embedding, the
  unused ``logit_scale``, a buffer here (:class:`TrainCRIS`), and the fresh ``attnpool.connect``), at
  ``base_lr * backbone_lr_mult`` (1e-5); "head" = everything else, the neck, decoder and projector **and** both CLIP
  positional embeddings, at ``base_lr`` (1e-4).
* The official ``MultiStepLR(milestones=[35], gamma=0.1)`` stepped per epoch, as the trainer's "multistep" schedule
  counted in optimizer steps: the milestone epoch ``e`` is step ``e * steps_per_epoch``, so epochs 36-50 run at a
  tenth. 50 epochs; ``steps_per_epoch`` = the trainer's (``len(train set) // micro_batch // (world * grad_accum)``,
  the last partial batch dropped as the official ``drop_last``).
* **The epoch-1 quirk** (spec §6 table, gotcha 1): the official groups pass ``initial_lr`` but no ``lr``, so the
  backbone group runs its first epoch at the head's 1e-4 and only then drops to 1e-5. The issue asks for the
  intended schedule, which is the default here: the backbone is at 1e-5 from the first step. ``optim.epoch1_quirk:
  true`` reproduces the official table instead (backbone x 1 / backbone_lr_mult during the first epoch,
  :class:`EpochOneQuirk`).
* Batch 64 global at 416^2 (``train.global_batch``; per process ``64 / (world_size * grad_accum)``, which must divide
  evenly, as the official per-GPU split); the official 8 GPUs run 8 per GPU.
* SyncBatchNorm across ranks when ``world_size > 1`` (the official ``convert_sync_batchnorm`` on the whole model):
  ``torch.nn.SyncBatchNorm`` on CUDA; on the CPU (gloo), where torch's SyncBatchNorm refuses to run,
  :class:`AllReduceBatchNorm`, the same statistics through differentiable all-reduces. State-dict keys do not change.
* Precision: the trainer's bf16 on CUDA (DeepSpeed keeps fp32 master weights; module and activations in bf16), fp32 on
  the CPU. The official code uses fp16 autocast with a GradScaler; bf16 needs no loss scaling and has fp32's range.
  The loss (BCE with logits) is computed in fp32 on the bf16 logits, as autocast runs it in fp32 (:class:`TrainCRIS`).
  BatchNorm running statistics are then held in bf16 (a deviation from autocast, which keeps them fp32); evaluation
  runs in fp32 (``eval.dtype``), as the official validation.
* Validation after every epoch (the trainer's ``eval_fn`` at each save point, ``save_every = steps_per_epoch``) with
  :func:`models.cris.evaluate.evaluate` on the val split in "val" mode (sentence 0 of every ref, as the official
  training-time validation; every ref exactly once, without the official DistributedSampler padding): mIoU, oIoU,
  Pr@50..90 go into ``metrics.jsonl`` as ``eval/<name>``. ``last_model.pth`` and, when the val mIoU is >= the best so
  far, ``best_model.pth`` are written in the official checkpoint layout (``{"epoch", "cur_iou", "best_iou", "prec",
  "state_dict": {"module.<key>": ...}}``, loadable by ``models.cris.convert.load_official``, the evaluate and infer
  CLIs, and the official test.py); ``best.json`` records the best epoch.
* Training-time metrics per logged step: ``loss``, ``iou`` and ``prec50`` (the official ``trainMetricGPU`` at the
  logits' resolution, fractions).

Weights: ``backbone.clip`` names a local OpenAI ``RN50.pt`` / ``RN101.pt`` (``models.cris.convert.load_clip``); when
it is null or the file does not exist the backbone stays randomly initialised, with a warning. ``model.weights``
names a checkpoint in the official layout (``load_official``, strict), loaded over everything.

Data: ShapesWorld referring expressions (:class:`train.data.cris_data.ShapesReferDataset`) unless
``data.refer_root`` is set; then RefCOCO / RefCOCO+ / G-Ref from the original refer files
(:class:`train.data.refer.ReferDataset`: ``data.refer_root``, ``data.image_root``, ``data.dataset``,
``data.split_by``; ``data.train_split`` / ``data.val_split``; the official RefCOCO+ configs validate on ``testB``).
Train items draw their sentence per epoch (the trainer calls ``dataset.set_epoch``), so resume stays exact.

YAML sections (see train/configs/cris_*.yaml)::

    out_dir: runs/cris_r50
    model:    {preset: cris_r50 | cris_r101 | tiny, weights: null | path, <CRISConfig fields: word_len, input_size,
               dropout, ...>}
    backbone: {clip: null | path}
    data:     {refer_root, image_root, dataset, split_by, train_split, val_split, seed,
               shapes: {seed, size, train_scenes, val_scenes, test_scenes, min_objects, max_objects, categories,
                        colours, sizes, max_sentences}}
    optim:    {base_lr, backbone_lr_mult, epochs, milestones (epochs), gamma, betas, eps, weight_decay,
               epoch1_quirk}
    train:    {global_batch | micro_batch, grad_accum, steps (cap for smoke runs), seed, zero_stage, precision,
               num_workers, log_every, keep_last, progress, ...}   (TrainConfig fields; the recipe's own are set here)
    eval:     {batch_size, dtype: fp32 | bf16, every_epochs}

``--set section.key=value`` overrides any entry (the value parsed as YAML), like the official ``--opts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.cris.config import CRISConfig
from models.cris.metrics import PR_KEYS, train_metric
from models.cris.model import CRIS
from train.data.refer import collate
from train.overrides import read_config

PRESETS = {"cris_r50": CRISConfig.cris_r50, "cris_r101": CRISConfig.cris_r101, "tiny": CRISConfig.tiny}
SECTIONS = ("out_dir", "model", "backbone", "data", "optim", "train", "eval")
OPTIM_DEFAULTS = {"base_lr": 1e-4, "backbone_lr_mult": 0.1, "epochs": 50, "milestones": [35], "gamma": 0.1,
                  "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "epoch1_quirk": False}
# TrainConfig fields the recipe sets itself (from the optim section and the data size).
RECIPE_FIELDS = ("out_dir", "lr", "betas", "eps", "weight_decay", "optimizer", "schedule", "milestones", "gamma",
                 "warmup_steps", "min_lr_ratio", "grad_clip", "ema_decay", "save_every")
EVAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BEST, LAST, BEST_JSON = "best_model.pth", "last_model.pth", "best.json"


# ---------------------------------------------------------------------------------------------------------------------
# Config


def load_config(path: str, overrides=()) -> dict:
    """The YAML at ``path`` with ``overrides`` (``"section.key=value"`` strings, values parsed as YAML) applied."""
    cfg = read_config(path, "a CRIS", overrides)
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    return cfg


def model_config(cfg: dict) -> CRISConfig:
    """The CRISConfig of ``cfg['model']``: its preset with the CRISConfig fields it sets (word_len defaults to the
    dataset's: 22 for G-Ref, else 17)."""
    m = dict(cfg.get("model") or {})
    preset = m.pop("preset", "cris_r50")
    m.pop("weights", None)
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]()
    fields = set(CRISConfig.__dataclass_fields__) - {"clip"}
    unknown = sorted(set(m) - fields)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}; known: preset, weights, {sorted(fields)}")
    if "word_len" not in m:
        dataset = (cfg.get("data") or {}).get("dataset", "")
        if (cfg.get("data") or {}).get("refer_root") and str(dataset).startswith("refcocog"):
            m["word_len"] = 22
    return dataclasses.replace(base, **m)


class TrainCRIS(CRIS):
    """CRIS for the trainer, with the same modules, state-dict keys, shapes and order, and the same eval forward:

    * the training forward computes the BCE in fp32 (the official model under fp16 autocast does, since autocast runs
      ``binary_cross_entropy_with_logits`` in fp32; under DeepSpeed bf16 the module itself is bf16); in fp32 it equals
      CRIS's;
    * ``backbone.logit_scale`` (CLIP's, unused by CRIS: it never gets a gradient, so the official Adam never changes
      it) is a buffer instead of a parameter, because DeepSpeed cannot hold 0-dim parameters. Training is the same;
      the backbone group then has 324 tensors where the official one lists 325.
    """

    def __init__(self, cfg: CRISConfig):
        super().__init__(cfg)
        scale = self.backbone.logit_scale.detach().clone()
        del self.backbone.logit_scale
        self.backbone.register_buffer("logit_scale", scale)

    def forward(self, img: torch.Tensor, word: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if not self.training:
            return super().forward(img, word)
        if mask is None:
            raise ValueError("CRIS.forward: training mode needs 'mask' [B, 1, S, S] (the soft target)")
        pred = self.logits(img, word)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        target = F.interpolate(mask.float(), pred.shape[-2:], mode="nearest").detach()
        return pred.detach(), target, F.binary_cross_entropy_with_logits(pred.float(), target)


def build_model(cfg: dict, seed: int = 0, *, model_cls=TrainCRIS) -> CRIS:
    """The CRIS of ``cfg`` (initialised from ``seed``, so every rank and every resume builds the same one), with the
    CLIP weights of ``backbone.clip`` and then the checkpoint of ``model.weights`` when set (module docstring)."""
    from models.cris.convert import load_clip, load_official

    mcfg = model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(mcfg)
    clip = (cfg.get("backbone") or {}).get("clip")
    if clip and os.path.isfile(clip):
        load_clip(model, clip)
    else:
        why = "backbone.clip is not set" if not clip else f"backbone.clip {clip!r} does not exist"
        warnings.warn(f"CRIS: {why}: the CLIP backbone is randomly initialised (fine for ShapesWorld; RefCOCO "
                      "training needs OpenAI's RN50.pt / RN101.pt)", stacklevel=2)
    weights = (cfg.get("model") or {}).get("weights")
    if weights:
        load_official(model, weights)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Data


def _shapes_world(d: dict):
    from train.data.shapes import ShapesWorld

    s = dict(d.get("shapes") or {})
    kw = {k: s[k] for k in ("min_objects", "max_objects", "supersample", "min_visible") if k in s}
    for k in ("categories", "colours", "sizes"):
        if s.get(k):
            kw[k] = tuple(s[k])
    size = s.get("size", [64, 64])
    return ShapesWorld(seed=int(s.get("seed", 0)), size=tuple(size) if isinstance(size, list) else size, **kw), s


def build_dataset(cfg: dict, split: str, mode: str):
    """The dataset of ``split`` in ``mode`` ("train", "val": sentence 0 per ref, "test": every sentence), at the
    model's input size and word length."""
    d = cfg.get("data") or {}
    mcfg = model_config(cfg)
    seed = int(d.get("seed", 0))
    if d.get("refer_root"):
        from train.data.refer import ReferDataset

        missing = [k for k in ("image_root", "dataset", "split_by") if not d.get(k)]
        if missing:
            raise ValueError(f"data: with refer_root, set {missing} too (e.g. dataset: refcoco, split_by: unc)")
        return ReferDataset(d["refer_root"], d["dataset"], d["split_by"], split, d["image_root"], mode=mode,
                            size=mcfg.input_size, word_len=mcfg.word_len, seed=seed)
    from train.data.cris_data import ShapesReferDataset

    world, s = _shapes_world(d)
    if split == "train":
        n = int(s.get("train_scenes", 2000))
    elif split == "val":
        n = int(s.get("val_scenes", 200))
    else:  # testA, testB, test: their own held-out ranges
        n = int(s.get("test_scenes", s.get("val_scenes", 200)))
    return ShapesReferDataset(world, split, n, size=mcfg.input_size, word_len=mcfg.word_len, mode=mode,
                              max_sentences=s.get("max_sentences", 3), seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer groups, schedule, recipe


def is_backbone_param(name: str) -> bool:
    """The official rule: the "backbone" group (lr x backbone_lr_mult) holds every parameter whose name starts with
    ``backbone`` and does not contain ``positional_embedding``."""
    name = name[len("module."):] if name.startswith("module.") else name
    return name.startswith("backbone") and "positional_embedding" not in name


class EpochOneQuirk:
    """The official epoch-1 backbone lr (gotcha 1) as a group ``lr_fn``: ``1 / backbone_lr_mult`` during the first
    ``steps_per_epoch`` optimizer steps (so the backbone runs at base_lr), 1 afterwards."""

    def __init__(self, steps_per_epoch: int, backbone_lr_mult: float):
        self.steps_per_epoch, self.factor = int(steps_per_epoch), 1.0 / float(backbone_lr_mult)

    def __call__(self, step: int) -> float:
        return self.factor if step < self.steps_per_epoch else 1.0


def param_groups(backbone_lr_mult: float = 0.1, quirk: Optional[EpochOneQuirk] = None):
    """The trainer's ``param_groups`` callable of the official recipe: [backbone (lr x backbone_lr_mult, the quirk's
    lr_fn when given), head]."""

    def make(named):
        bb = [p for n, p in named if is_backbone_param(n)]
        head = [p for n, p in named if not is_backbone_param(n)]
        backbone = {"name": "backbone", "params": bb, "lr_mult": backbone_lr_mult}
        if quirk is not None:
            backbone["lr_fn"] = quirk
        return [backbone, {"name": "head", "params": head, "lr_mult": 1.0}]

    return make


def optim_section(cfg: dict) -> dict:
    o = dict(OPTIM_DEFAULTS)
    given = dict(cfg.get("optim") or {})
    unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
    if unknown:
        raise ValueError(f"optim: unknown key(s) {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
    o.update(given)
    if isinstance(o["epochs"], bool) or not isinstance(o["epochs"], int) or o["epochs"] < 1:
        raise ValueError(f"optim.epochs must be an int >= 1, got {o['epochs']!r}")
    if not isinstance(o["backbone_lr_mult"], (int, float)) or not 0 < o["backbone_lr_mult"] <= 1e6:
        raise ValueError(f"optim.backbone_lr_mult must be a positive number, got {o['backbone_lr_mult']!r}")
    if not isinstance(o["epoch1_quirk"], bool):
        raise ValueError(f"optim.epoch1_quirk must be true or false, got {o['epoch1_quirk']!r}")
    return o


def recipe(cfg: dict, out_dir: str, dataset_len: int, world_size: int):
    """(TrainConfig, steps_per_epoch, optim section) of the official recipe for a train set of ``dataset_len``
    items on ``world_size`` processes (module docstring)."""
    from train.trainer import TrainConfig, micro_batch

    o = optim_section(cfg)
    t = dict(cfg.get("train") or {})
    clash = sorted(set(t) & set(RECIPE_FIELDS))
    if clash:
        raise ValueError(f"train: {clash} are set by the CRIS recipe (use the optim / eval sections)")
    mb = micro_batch(t, world_size)
    t.pop("global_batch", None)
    t["micro_batch"] = mb
    ga = int(t.get("grad_accum", 1))
    spe = (dataset_len // mb) // (world_size * ga)
    if spe < 1:
        raise ValueError(f"CRIS: the train set ({dataset_len} items) is smaller than one global batch "
                         f"({mb} x {world_size} x {ga})")
    ev = cfg.get("eval") or {}
    every = int(ev.get("every_epochs", 1))
    steps = int(t.pop("steps", o["epochs"] * spe))
    tc = TrainConfig(out_dir=out_dir, steps=steps, lr=float(o["base_lr"]), betas=tuple(o["betas"]),
                     eps=float(o["eps"]), weight_decay=float(o["weight_decay"]), optimizer="adam",
                     schedule="multistep", milestones=tuple(int(m) * spe for m in o["milestones"]),
                     gamma=float(o["gamma"]), warmup_steps=0, grad_clip=0.0, ema_decay=None,
                     save_every=max(1, every * spe), **{k: v for k, v in t.items()})
    return tc, spe, o


def lr_table(o: dict, steps_per_epoch: int) -> list[tuple[int, float, float]]:
    """[(epoch (1-based), backbone lr, head lr)] of the recipe, from the trainer's own schedule function: for tests
    and the run's config.json."""
    from train.trainer import lr_factor

    quirk = EpochOneQuirk(steps_per_epoch, o["backbone_lr_mult"]) if o["epoch1_quirk"] else None
    out = []
    for e in range(o["epochs"]):
        s = e * steps_per_epoch
        f = lr_factor(s, steps=o["epochs"] * steps_per_epoch, warmup_steps=0, schedule="multistep", min_lr_ratio=0.0,
                      milestones=tuple(m * steps_per_epoch for m in o["milestones"]), gamma=o["gamma"])
        bb = o["base_lr"] * o["backbone_lr_mult"] * f * (quirk(s) if quirk else 1.0)
        out.append((e + 1, bb, o["base_lr"] * f))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# SyncBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the default process group; the gradient of every rank's copy is the sum of all ranks' gradients
    (each rank's loss depends on the reduced value of every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank (torch's SyncBatchNorm semantics) for process groups whose
    tensors live on the CPU, where ``nn.SyncBatchNorm`` refuses to run.

    In training with more than one process: per-channel mean = all-reduced sum / all-reduced count, then variance =
    all-reduced sum of squared deviations / count (two passes, not E[x^2] - mean^2, which cancels badly), both
    through an all-reduce whose backward all-reduces the gradients (:class:`_AllReduceSum`), so every
    rank's loss reaches every rank's inputs as in one big batch. Running statistics as torch's: the biased variance
    normalises, the unbiased one (count / (count - 1)) enters ``running_var``; momentum None means a cumulative mean.
    Otherwise (eval, one process, no group) it is plain BatchNorm. Computes in fp32; any input rank >= 2."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"AllReduceBatchNorm: expected an input of rank >= 2 ([N, C, ...]), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        sync = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not sync:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        C = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, C] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // max(C, 1))])
        total = all_reduce(local)
        n = total[C]
        mean = total[:C] / n
        dev = xf - mean.view(shape)
        var = all_reduce(dev.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)
        y = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm{1,2,3}d of ``module`` synchronised over the default process group: ``nn.SyncBatchNorm`` when
    ``cuda``, :class:`AllReduceBatchNorm` otherwise (same parameters, buffers and keys; in place where possible)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, cuda))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loss and per-epoch validation


def loss_fn(model, batch: dict, step: int):
    """The trainer's objective: the official BCE (mean over the 104^2 pixels) and trainMetricGPU's IoU / Prec@50."""
    del step
    pred, target, loss = model(batch["image"], batch["tokens"], batch["target"])
    iou, prec = train_metric(pred, target)
    return loss, {"iou": float(iou), "prec50": float(prec)}


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def official_checkpoint(model: nn.Module, epoch: int, metrics: dict, best_iou: float) -> dict:
    """The official best_model.pth / last_model.pth layout (spec §6): epoch (1-based), cur_iou, best_iou (the previous
    best), prec {Pr@50..}, state_dict with the DDP ``module.`` prefix (fp32, CPU)."""
    from models.cris.convert import ours_to_official

    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
          for k, v in model.state_dict().items()}
    return {"epoch": int(epoch), "cur_iou": float(metrics["mIoU"]), "best_iou": float(best_iou),
            "prec": {k: float(metrics[k]) for k in PR_KEYS}, "state_dict": ours_to_official(sd)}


class Validator:
    """The trainer's ``eval_fn``: :func:`models.cris.evaluate.evaluate` on the val set after every epoch, and the
    official last / best checkpoints in ``out_dir`` (module docstring)."""

    def __init__(self, dataset, out_dir: str, steps_per_epoch: int, batch_size: int, dtype: torch.dtype):
        self.dataset, self.out_dir, self.spe = dataset, out_dir, steps_per_epoch
        self.batch_size, self.dtype = batch_size, dtype
        self.best = self._read_best()

    def _read_best(self) -> float:
        path = os.path.join(self.out_dir, BEST_JSON)
        if os.path.isfile(path):
            with open(path) as f:
                return float(json.load(f)["mIoU"])
        return -math.inf

    def __call__(self, model, step: int) -> dict:
        from models.cris.evaluate import evaluate

        device = next(model.parameters()).device
        metrics = evaluate(model, self.dataset, self.batch_size, device, self.dtype)
        epoch = -(-step // self.spe)  # the epoch this save point ends (1-based)
        prev = self.best if math.isfinite(self.best) else 0.0
        _atomic_torch_save(official_checkpoint(model, epoch, metrics, prev), os.path.join(self.out_dir, LAST))
        if metrics["mIoU"] >= self.best:  # ">=" as official
            self.best = metrics["mIoU"]
            _atomic_torch_save(official_checkpoint(model, epoch, metrics, prev), os.path.join(self.out_dir, BEST))
            tmp = os.path.join(self.out_dir, BEST_JSON + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"epoch": epoch, "step": step, **metrics}, f, indent=1)
            os.replace(tmp, os.path.join(self.out_dir, BEST_JSON))
        return {"epoch": float(epoch), **{k: v for k, v in metrics.items() if k != "count"}}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def train(cfg: dict, out_dir: Optional[str] = None) -> dict:
    """Train CRIS per ``cfg`` (resuming from ``out_dir``'s checkpoints); returns {"out_dir", "steps",
    "steps_per_epoch", "records", "best" (best.json's content or None), "model" (the trained module, fp32 master
    weights, on CPU; None on ranks > 0)}."""
    from train.launch import init_distributed
    from train.trainer import Trainer

    out_dir = out_dir or cfg.get("out_dir") or "runs/cris"
    info = init_distributed()
    train_set = build_dataset(cfg, (cfg.get("data") or {}).get("train_split", "train"), "train")
    tc, spe, o = recipe(cfg, out_dir, len(train_set), info.world_size)
    model = build_model(cfg, seed=tc.seed)
    if info.world_size > 1:
        model = convert_sync_batchnorm(model, info.device.type == "cuda")
    ev = dict(cfg.get("eval") or {})
    dtype = ev.get("dtype", "fp32")
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"eval.dtype must be one of {sorted(EVAL_DTYPES)}, got {dtype!r}")
    validator = None
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        val_set = build_dataset(cfg, (cfg.get("data") or {}).get("val_split", "val"), "val")
        validator = Validator(val_set, out_dir, spe, int(ev.get("batch_size", 16)), EVAL_DTYPES[dtype])
    quirk = EpochOneQuirk(spe, o["backbone_lr_mult"]) if o["epoch1_quirk"] else None
    trainer = Trainer(model, loss_fn, train_set, tc, collate_fn=collate, eval_fn=validator,
                      param_groups=param_groups(float(o["backbone_lr_mult"]), quirk))
    if info.rank == 0:
        with open(os.path.join(out_dir, "recipe.json"), "w") as f:
            json.dump({"steps_per_epoch": spe, "steps": tc.steps, "micro_batch": tc.micro_batch,
                       "world_size": info.world_size, "optim": o,
                       "lr_table": lr_table(o, spe)}, f, indent=1)
    records = trainer.train()
    best = None
    if info.rank == 0 and os.path.isfile(os.path.join(out_dir, BEST_JSON)):
        with open(os.path.join(out_dir, BEST_JSON)) as f:
            best = json.load(f)
    trained = trainer.trained_model()  # a collective (ZeRO); None on ranks > 0
    trained = trained.cpu() if trained is not None else None
    return {"out_dir": out_dir, "steps": tc.steps, "steps_per_epoch": spe, "records": records, "best": best,
            "model": trained}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out-dir", default=None, help="overrides the config's out_dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config entry (YAML value); repeatable")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = train(cfg, args.out_dir)
    if out["best"] is not None:
        b = out["best"]
        print(f"CRIS: best val mIoU {b['mIoU']:.4f} (oIoU {b['oIoU']:.4f}, Pr@50 {b['Pr@50']:.4f}) at epoch "
              f"{b['epoch']}; {os.path.join(out['out_dir'], BEST)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
