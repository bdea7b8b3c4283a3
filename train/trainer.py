"""The shared DeepSpeed trainer: one loop for every model of the project, knowing nothing about any of them.

Interface
---------
::

    cfg = TrainConfig(out_dir="runs/x", steps=1000, micro_batch=4, lr=1e-4, warmup_steps=100, schedule="cosine")
    trainer = Trainer(model, loss_fn, dataset, cfg, collate_fn=None, group_key=None, eval_fn=None,
                      param_groups=None)
    records = trainer.train()        # resumes from cfg.out_dir when it holds a checkpoint
    ema = trainer.ema_model()        # rank 0: an fp32 copy of the model with the EMA weights
    model = trainer.trained_model()  # every rank calls it; rank 0: an fp32 copy with the fp32 master weights

``TrainConfig`` fields (each validated; a bad value raises ``ValueError`` naming the field)::

    out_dir: str                      # checkpoints/, metrics.jsonl, config.json (the resolved config)
    steps: int                        # optimizer steps in total
    micro_batch: int = 1              # samples per micro-batch per process
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-4                  # peak learning rate
    betas: tuple = (0.9, 0.95)        # AdamW / Adam
    weight_decay: float = 0.01        # on parameters with ndim >= 2 (AdamW: decoupled; Adam: L2, added to the grad)
    warmup_steps: int = 0             # linear warmup
    schedule: str = "constant"        # or "cosine" (to min_lr_ratio * lr at the last step), or "multistep"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0            # global-norm clipping; 0 disables it
    ema_decay: float | None = 0.9999  # None: no EMA
    zero_stage: int = 2               # 0..3
    precision: str = "auto"           # auto: bf16 on CUDA, fp32 on CPU; or "bf16" / "fp32"
    autocast: bool = False            # bf16 as torch autocast over fp32 weights instead of bf16 weights
    seed: int = 0                     # data order and the per-rank RNG seeds of a fresh run
    log_every: int = 10               # metrics.jsonl record interval (and the last step)
    save_every: int = 100             # checkpoint interval, plus a final save
    keep_last: int = 2                # checkpoints kept
    ds_config: dict | str | None = None  # DeepSpeed JSON (dict, path, or name in train/configs/) over the generated
    num_workers: int = 0              # DataLoader workers
    progress: bool = True             # tqdm bar on rank 0
    optimizer: str = "adamw"          # or "adam" (torch.optim.Adam, e.g. CRIS's official recipe)
    eps: float = 1e-8                 # AdamW / Adam epsilon
    milestones: tuple = ()            # "multistep": 0-based optimizer steps from which the lr is multiplied by gamma
    gamma: float = 0.1                # "multistep": the factor per milestone passed

* ``model``: an ``nn.Module`` whose parameters with ``requires_grad`` are trained (frozen ones stay as they are).
  Gradient checkpointing is the model's own switch.
* ``loss_fn(model, batch, step) -> (loss, {name: float})``: ``model`` is the DeepSpeed engine, so calling it runs the
  module's forward through DeepSpeed's hooks (ZeRO-3 parameter gathering); ``loss`` is a scalar tensor of this
  micro-batch; ``step`` is the 0-based index of the optimizer step being computed (the number of steps completed
  before it). The named floats are averaged over micro-batches and ranks into the metrics file (a name that only some
  micro-batches report is averaged over those). The batch arrives on the training device, and under bf16/fp16 its
  floating-point tensors are cast to that dtype, because the engine's module then holds parameters of that dtype;
  ``loss_fn`` upcasts where it needs fp32.
* ``dataset``: map-style (``__len__`` and ``__getitem__``); ``collate_fn`` defaults to torch's ``default_collate``.
* ``group_key(i) -> hashable`` (optional): every micro-batch holds indices of one key only (shape or task groups).
* ``param_groups(named_params) -> [group, ...]`` (optional): the optimizer's parameter groups, from the list of
  ``(name, parameter)`` of the trainable parameters. A group is a dict with ``"params"`` (a list of those parameters;
  every trainable parameter in exactly one group) and optionally ``"name"`` (str: its lr is then logged as
  ``lr/<name>``), ``"lr_mult"`` (float, default 1: the group's lr is ``lr * lr_mult * f(s)``), ``"weight_decay"``
  (default ``TrainConfig.weight_decay``, on every parameter of the group) and ``"lr_fn"`` (a callable ``step -> float``
  multiplying that group's schedule factor, e.g. a group-specific first epoch; make it a module-level function or a
  callable object, as ``LambdaLR`` keeps it by reference). Empty groups are dropped. Without ``param_groups`` the
  groups are the weight-decay split below.
* ``eval_fn(model, step) -> {name: float}`` (optional): runs on rank 0 at every save point, under ``torch.no_grad``,
  on the EMA model when EMA is on and on the raw model otherwise (in eval mode; an fp32 copy of it under bf16 or
  ZeRO-3). Its results are written as a line
  ``{"step": N, "eval/<name>": value, ...}``. The RNG states are restored after it, so evaluation that draws random
  numbers does not change the training run.

Steps, data order and schedule
------------------------------
A step is one optimizer step over ``micro_batch * grad_accum`` samples per rank. The data order is fixed by
(``seed``, epoch): each epoch permutes the indices (``numpy.random.default_rng([seed, epoch])``); without
``group_key`` the permutation is cut into micro-batches in order; with it, indices are grouped by key in permutation
order, each group is cut into micro-batches (the remainder of a group that does not fill one is dropped), and the
micro-batches are shuffled by the same generator. Consecutive runs of ``world_size * grad_accum`` micro-batches form
the steps; rank ``r`` takes micro-batches ``r*grad_accum .. (r+1)*grad_accum - 1`` of each. Micro-batches that do not
fill a last step are dropped, so every epoch has the same number of steps. The position (epoch, step within epoch) is
part of the checkpoint. Each epoch gets a fresh ``DataLoader`` over these micro-batches (``num_workers`` worker
processes, seeded from (seed, epoch, position, rank)); before it is made, ``dataset.set_epoch(epoch)`` is called
when the dataset has that method (0-based epochs, as ``DistributedSampler.set_epoch``), so a dataset can vary its
samples per epoch (e.g. a randomly chosen sentence) and still resume exactly. Random numbers a dataset draws in
``__getitem__`` resume exactly only with ``num_workers=0`` (they come from the restored global RNG); with workers, make
samples a function of their index (as ShapesWorld's are).

The learning rate of step ``s`` (0-based) is ``lr * f(s)`` with, for ``W = warmup_steps`` and ``T = steps``::

    f(s) = (s + 1) / W                                   if s < W
    f(s) = 1                                             if schedule == "constant"
    f(s) = m + (1 - m) * (1 + cos(pi * p)) / 2,  p = min(1, (s - W) / max(1, T - 1 - W)),  m = min_lr_ratio
    f(s) = gamma ** #{k in milestones : s >= k}          if schedule == "multistep"

so cosine reaches ``min_lr_ratio * lr`` at the last step, and "multistep" is ``MultiStepLR`` counted in optimizer
steps (an epoch milestone ``e`` is the step ``e * steps_per_epoch``). It is a ``LambdaLR`` (one function per parameter
group: ``f`` times the group's ``lr_fn``, on a base lr of ``lr * lr_mult``) that DeepSpeed steps after every
optimizer step and saves in its checkpoint (:func:`lr_factor`). The optimizer is ``torch.optim.AdamW`` (deterministic
on CPU), or ``torch.optim.Adam`` with ``optimizer="adam"``, by default with ``weight_decay`` on parameters of two or
more dimensions and none on biases and norm scales (``param_groups`` replaces that split).

DeepSpeed
---------
The DeepSpeed config is generated from the :class:`TrainConfig` (micro batch, accumulation, ``gradient_clipping``,
ZeRO stage, ``bf16``), and the JSON in ``train/configs/zero{stage}.json`` (or ``ds_config``: a dict, a path, or a file
name in ``train/configs/``) is merged over it, its keys winning, also over the stage and the precision (the resolved
config goes into ``out_dir/config.json``). Only the batch keys must agree with ``micro_batch`` and ``grad_accum``,
because the sampler uses them: a disagreement raises. When the merged config has an ``"optimizer"`` or
``"scheduler"`` section, DeepSpeed builds that one instead of ours. ``precision="auto"`` is bf16 on CUDA and fp32 on
CPU. ``autocast=True`` makes bf16 DeepSpeed's ``torch_autocast`` in bf16 over fp32 weights (mixed precision as
``torch.autocast``, for models written for it, e.g. with an fp32 part that disables autocast; an outer
``torch.autocast`` in the loss does not work, DeepSpeed's forward switches it off) instead of bf16 weights with fp32
master copies. Under bf16 weights the module's floating buffers are cast to bf16 as well
(``data_types.buffer_dtype``, which DeepSpeed 0.19 otherwise leaves at fp32), as ``module.bfloat16()`` would.
``grad_clip=0`` disables clipping; ``grad_norm`` in the metrics is the global gradient norm before clipping: the
engine's, or, where DeepSpeed computes none (ZeRO-0 in fp32), the trainer's own from ``p.grad`` before the step.
DeepSpeed cannot hold 0-dim parameters (its broadcast, clipping and mixed-precision copies fail on them), so a model
with one is refused with a ``ValueError`` naming it: make it a buffer if it is not trained, or a 1-element vector.

EMA
---
An fp32 shadow of the trainable parameters, kept on rank 0 only, on the training device, initialised from the weights
at the start and updated after every optimizer step as ``ema += (1 - ema_decay) * (param - ema)``. Under bf16 it reads
the bf16 module weights (the fp32 master weights are partitioned inside the optimizer). Under ZeRO-3 every rank takes
part in gathering the partitioned parameters for the update (in buckets of ``EMA_GATHER_NUMEL`` elements), a
collective per step; :meth:`Trainer.ema_model` then builds the model from a CPU copy of the model taken on rank 0 before
DeepSpeed partitioned it (so under ZeRO-3 pass a model with real weights, not one made under ``zero.Init``).

Checkpoints and resume
----------------------
``out_dir/checkpoints/step_{N}/`` holds DeepSpeed's files (module, optimizer with ZeRO partitions, LR scheduler) plus
``trainer_state.pt`` (step, data position, EMA, config, elapsed time; written by rank 0) and ``rank_{r}.pt`` (the
python/numpy/torch CPU/CUDA RNG states and metric accumulators of rank ``r``). A save writes everything into
``checkpoints/.tmp-step_{N}``, fsyncs every file and the directory, renames it to ``step_{N}`` and then replaces the
``latest`` pointer (text ``step_{N}``, DeepSpeed's own convention) by writing a temporary file and ``os.replace``.
Only then are checkpoints beyond ``keep_last`` removed (renamed away first, then deleted). A kill at any point leaves
``latest`` naming a complete checkpoint. ``train()`` removes leftover temporary directories, loads the ``latest``
checkpoint (or the highest complete ``step_*`` if there is no pointer yet), truncates ``metrics.jsonl`` to the steps it
covers, and continues. On CPU the continuation is bitwise identical to an uninterrupted run (the tests check losses
and final weights); on GPU that also needs deterministic kernels, which the trainer does not switch on. Resuming
requires the same world size, ``micro_batch``, ``grad_accum``, ``seed`` and dataset length (a ``ValueError`` says
which differs); ``steps`` may grow. Multi-node jobs need ``out_dir`` on a file system every node sees.

Metrics and logging
-------------------
Every ``log_every`` steps and at the last step, rank 0 appends to ``out_dir/metrics.jsonl``:
``{"step", "loss", "lr", "grad_norm", "samples", "time", "step_time", ...loss_fn metrics}`` where ``step`` counts
completed optimizer steps (1-based), ``loss`` and the metrics are means over the micro-batches of every rank since the
previous record, ``lr`` (the first parameter group's; named groups add ``lr/<name>``) and ``grad_norm`` belong to the
recorded step, ``samples`` counts samples seen by all ranks,
``time`` is training wall time in seconds over all runs and ``step_time`` the mean seconds per step of the window.
A tqdm bar runs on rank 0 (``progress=False`` hides it), and TensorBoard scalars go to ``out_dir/tensorboard`` when
``torch.utils.tensorboard`` imports.

Launch
------
Under ``torchrun`` or the ``deepspeed`` launcher, or as one plain process (a one-process gloo/NCCL group on a free
port is set up; see ``train/launch.py``). CPU jobs use gloo. The first DeepSpeed use on CPU JIT-builds its
shared-memory comm op into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), once per machine.

Fault injection (for tests)
---------------------------
``MMKERNELS_TRAIN_FAULT=exit_after_step:K`` makes every rank ``os._exit(FAULT_EXIT_CODE)`` once step ``K`` is done
(after its record and save); ``exit_in_save:K`` does so inside the save of step ``K``, after the temporary checkpoint is
written and fsynced and before it is renamed.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, default_collate

from .launch import init_distributed

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAULT_ENV = "MMKERNELS_TRAIN_FAULT"
FAULT_EXIT_CODE = 17
EMA_GATHER_NUMEL = 1 << 26  # ZeRO-3 EMA update: gather at most this many elements at once
STATE_FILE = "trainer_state.pt"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_RESERVED = ("step", "loss", "lr", "grad_norm", "samples", "time", "step_time")
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


# ---------------------------------------------------------------------------------------------------------------------
# Config


def _int_field(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"TrainConfig.{name} must be an int >= {lo}, got {value!r}")


def _float_field(name, value, lo, hi, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"TrainConfig.{name} must be a finite number in {rng}, got {value!r}")


def resolve_ds_config_path(name: str) -> str:
    """A DeepSpeed JSON by path, or by name in ``train/configs/`` (``"zero3"`` or ``"zero3.json"``)."""
    candidates = [name, os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".json")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    known = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise ValueError(f"TrainConfig.ds_config: {name!r} is neither a file nor one of train/configs/{known}")


@dataclass
class TrainConfig:
    """Training hyper-parameters; see the module docstring for what each one does. Invalid values raise a
    ``ValueError`` naming the field."""

    out_dir: str
    steps: int
    micro_batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: Optional[float] = 0.9999
    zero_stage: int = 2
    precision: str = "auto"
    autocast: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    ds_config: Any = None
    num_workers: int = 0
    progress: bool = True
    optimizer: str = "adamw"
    eps: float = 1e-8
    milestones: tuple = ()
    gamma: float = 0.1

    def __post_init__(self):
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"TrainConfig.out_dir must be a non-empty path, got {self.out_dir!r}")
        _int_field("steps", self.steps, 1)
        _int_field("micro_batch", self.micro_batch, 1)
        _int_field("grad_accum", self.grad_accum, 1)
        _float_field("lr", self.lr, 0.0, math.inf, lo_open=True, hi_open=True)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _float_field(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
        _float_field("weight_decay", self.weight_decay, 0.0, math.inf, hi_open=True)
        _int_field("warmup_steps", self.warmup_steps, 0)
        if self.schedule not in ("constant", "cosine", "multistep"):
            raise ValueError(f"TrainConfig.schedule must be 'constant', 'cosine' or 'multistep', got "
                             f"{self.schedule!r}")
        _float_field("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float_field("grad_clip", self.grad_clip, 0.0, math.inf, hi_open=True)
        if self.ema_decay is not None:
            _float_field("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"TrainConfig.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        _int_field("seed", self.seed, 0)
        _int_field("log_every", self.log_every, 1)
        _int_field("save_every", self.save_every, 1)
        _int_field("keep_last", self.keep_last, 1)
        if isinstance(self.ds_config, os.PathLike):
            self.ds_config = os.fspath(self.ds_config)
        if isinstance(self.ds_config, str):
            resolve_ds_config_path(self.ds_config)
        elif self.ds_config is not None and not isinstance(self.ds_config, dict):
            raise ValueError(f"TrainConfig.ds_config must be None, a dict, or a path/name of a DeepSpeed JSON, "
                             f"got {type(self.ds_config).__name__}")
        _int_field("num_workers", self.num_workers, 0)
        if not isinstance(self.autocast, bool):
            raise ValueError(f"TrainConfig.autocast must be a bool, got {self.autocast!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress must be a bool, got {self.progress!r}")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        _float_field("eps", self.eps, 0.0, math.inf, lo_open=True, hi_open=True)
        if isinstance(self.milestones, list):
            self.milestones = tuple(self.milestones)
        if not isinstance(self.milestones, tuple):
            raise ValueError(f"TrainConfig.milestones must be a list of optimizer steps, got {self.milestones!r}")
        for i, m in enumerate(self.milestones):
            _int_field(f"milestones[{i}]", m, 0)
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"TrainConfig.milestones must be in increasing order, got {list(self.milestones)}")
        _float_field("gamma", self.gamma, 0.0, 1.0, lo_open=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["milestones"] = list(self.milestones)
        return d


def micro_batch(train: dict, world_size: int) -> int:
    """A config section's per-process micro batch: ``train["micro_batch"]``, or ``global_batch / (world_size *
    grad_accum)`` when ``train["global_batch"]`` is given (it must divide evenly; both given must agree)."""
    ga = int(train.get("grad_accum", 1))
    if "global_batch" not in train:
        return int(train.get("micro_batch", 1))
    gb = train["global_batch"]
    if isinstance(gb, bool) or not isinstance(gb, int) or gb < 1 or gb % (world_size * ga):
        raise ValueError(f"train.global_batch={gb!r} must be a positive multiple of world_size x grad_accum = "
                         f"{world_size} x {ga} (the batch is split evenly over the processes)")
    mb = gb // (world_size * ga)
    if "micro_batch" in train and int(train["micro_batch"]) != mb:
        raise ValueError(f"train.micro_batch={train['micro_batch']} contradicts global_batch={gb} over "
                         f"{world_size} process(es) x grad_accum {ga} (= {mb}); set one of them")
    return mb


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float,
              milestones: tuple = (), gamma: float = 0.1) -> float:
    """The LR multiplier of optimizer step ``step`` (0-based); the formula is in the module docstring."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(1 for m in milestones if step >= m)
    p = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(config: TrainConfig, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config: generated from ``config``, with ``config.ds_config`` (or ``configs/zero{stage}.json``)
    merged over it. Raises ``ValueError`` when a batch key disagrees with ``micro_batch``/``grad_accum``."""
    gen = {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch * config.grad_accum * world_size,
        "gradient_clipping": float(config.grad_clip),
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10 ** 9,  # our own logging replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision == "bf16" and config.autocast:
        gen["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16":
        gen["bf16"] = {"enabled": True}
    src = config.ds_config
    if src is None:
        default = os.path.join(CONFIG_DIR, f"zero{config.zero_stage}.json")
        src = default if os.path.isfile(default) else {}
    if isinstance(src, str):
        with open(resolve_ds_config_path(src)) as f:
            src = json.load(f)
    merged = _merge(gen, src)
    for key in _BATCH_KEYS:
        if merged[key] != gen[key]:
            field = "grad_accum" if key == "gradient_accumulation_steps" else "micro_batch"
            raise ValueError(f"TrainConfig.ds_config sets {key}={merged[key]!r}, but micro_batch={config.micro_batch},"
                             f" grad_accum={config.grad_accum} and world size {world_size} give {gen[key]}: set "
                             f"TrainConfig.{field} instead (the data sampler uses it)")
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"TrainConfig.ds_config: zero_optimization.stage must be 0..3, got {stage!r}")
    # DeepSpeed >= 0.19 casts only the parameters to bf16/fp16 and keeps buffers in their dtype unless
    # data_types.buffer_dtype is set (it used to call module.bfloat16()). The models rely on the old behaviour
    # (buffers in the module's dtype: BatchNorm running stats next to bf16 weights, Unpair-Seg's pixel_mean/std deciding
    # the dtype of the backbone input), and fail with dtype mismatches otherwise. A ds_config that sets the key wins.
    dtype = _compute_dtype(merged)
    if dtype != torch.float32 and "buffer_dtype" not in (merged.get("data_types") or {}):
        merged["data_types"] = {**(merged.get("data_types") or {}),
                                "buffer_dtype": "bf16" if dtype == torch.bfloat16 else "fp16"}
    return merged


def _compute_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Data order


class StepSampler:
    """The deterministic, distributed, optionally grouped data order (module docstring, "Steps, data order").

    ``plan(epoch)`` lists this rank's steps of that epoch, each a list of ``grad_accum`` micro-batches of
    ``micro_batch`` dataset indices. Every rank computes the same global order and takes its own share."""

    def __init__(self, n: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 group_key: Optional[Callable[[int], Any]] = None):
        self.n, self.micro_batch, self.grad_accum = n, micro_batch, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.keys = None if group_key is None else [group_key(i) for i in range(n)]
        if self.keys is None:
            chunks = n // micro_batch
        else:
            counts: dict = {}
            for k in self.keys:
                counts[k] = counts.get(k, 0) + 1
            chunks = sum(c // micro_batch for c in counts.values())
        self.steps_per_epoch = chunks // (world_size * grad_accum)
        if self.steps_per_epoch == 0:
            what = "per group_key group " if self.keys is not None else ""
            raise ValueError(f"Trainer: the dataset ({n} samples) is too small for one step of micro_batch="
                             f"{micro_batch} x grad_accum={grad_accum} x world_size={world_size} "
                             f"(micro-batches are cut {what}and partial ones dropped)")

    def plan(self, epoch: int) -> list[list[list[int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n).tolist()
        mb = self.micro_batch
        if self.keys is None:
            chunks = [order[i:i + mb] for i in range(0, len(order) - mb + 1, mb)]
        else:
            groups: dict = {}
            for i in order:
                groups.setdefault(self.keys[i], []).append(i)
            chunks = [g[i:i + mb] for g in groups.values() for i in range(0, len(g) - mb + 1, mb)]
            chunks = [chunks[j] for j in rng.permutation(len(chunks)).tolist()]
        per_step = self.world_size * self.grad_accum
        lo, hi = self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum
        return [chunks[s * per_step:(s + 1) * per_step][lo:hi] for s in range(self.steps_per_epoch)]


# ---------------------------------------------------------------------------------------------------------------------
# RNG states and files


def _get_rng() -> dict:
    st = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def _atomic_write_text(path: str, text: str) -> None:
    # The temporary name starts with TMP_PREFIX so that a resume clears one a kill left in checkpoints/.
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def _step_of(name: str) -> Optional[int]:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def _parse_fault() -> tuple[Optional[str], int]:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None, -1
    kind, _, k = spec.partition(":")
    if kind not in ("exit_after_step", "exit_in_save") or not k.isdigit():
        raise ValueError(f"{FAULT_ENV} must be 'exit_after_step:K' or 'exit_in_save:K', got {spec!r}")
    return kind, int(k)


# ---------------------------------------------------------------------------------------------------------------------
# Parameter groups


def _group_factor(schedule: Callable[[int], float], lr_fn: Callable[[int], float]) -> Callable[[int], float]:
    """``schedule(step) * lr_fn(step)``: one parameter group's LambdaLR function. A plain function on purpose:
    LambdaLR saves the ``__dict__`` of callable objects into the checkpoint but nothing of functions, and both parts
    are rebuilt by the code on resume, so nothing needs restoring."""

    def factor(step: int) -> float:
        return schedule(step) * float(lr_fn(step))

    return factor


_GROUP_KEYS = {"params", "name", "lr_mult", "weight_decay", "lr_fn"}


def _custom_groups(out, named, config: TrainConfig):
    """Validate what a ``param_groups`` callable returned (module docstring) -> (optimizer groups with their
    ``lr`` = ``config.lr * lr_mult`` and ``weight_decay``, names, lr_fns), empty groups dropped."""
    if not isinstance(out, (list, tuple)) or not all(isinstance(g, dict) for g in out):
        raise TypeError(f"Trainer: 'param_groups' must return a list of dicts, got {type(out).__name__}")
    names_of = {id(p): n for n, p in named}
    seen: dict[int, int] = {}
    groups, names, fns = [], [], []
    for k, g in enumerate(out):
        unknown = sorted(set(g) - _GROUP_KEYS)
        if unknown:
            raise ValueError(f"Trainer: param_groups group {k} has unknown key(s) {unknown}; known: "
                             f"{sorted(_GROUP_KEYS)}")
        params = list(g.get("params", []))
        for p in params:
            if id(p) not in names_of:
                raise ValueError(f"Trainer: param_groups group {k} holds a tensor that is not a trainable parameter "
                                 "of the model")
            if id(p) in seen:
                raise ValueError(f"Trainer: param_groups puts {names_of[id(p)]} in groups {seen[id(p)]} and {k}")
            seen[id(p)] = k
        mult = g.get("lr_mult", 1.0)
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
            raise ValueError(f"Trainer: param_groups group {k}: 'lr_mult' must be a finite number >= 0, got {mult!r}")
        wd = g.get("weight_decay", config.weight_decay)
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"Trainer: param_groups group {k}: 'weight_decay' must be a finite number >= 0, got "
                             f"{wd!r}")
        name = g.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Trainer: param_groups group {k}: 'name' must be a non-empty str, got {name!r}")
        if name is not None and name in names:
            raise ValueError(f"Trainer: param_groups has two groups named {name!r}")
        lr_fn = g.get("lr_fn")
        if lr_fn is not None and not callable(lr_fn):
            raise TypeError(f"Trainer: param_groups group {k}: 'lr_fn' must be callable, got {type(lr_fn).__name__}")
        if params:
            groups.append({"params": params, "lr": config.lr * float(mult), "weight_decay": float(wd)})
            names.append(name)
            fns.append(lr_fn)
    missing = [n for n, p in named if id(p) not in seen]
    if missing:
        raise ValueError(f"Trainer: param_groups leaves {len(missing)} trainable parameter(s) out of every group, "
                         f"e.g. {missing[:5]}")
    return groups, names, fns


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """DeepSpeed training loop with exact save/resume; see the module docstring.

    Attributes after construction: ``engine`` (the DeepSpeed engine), ``optimizer``, ``lr_scheduler``,
    ``ds_config`` (the resolved DeepSpeed config), ``zero_stage``, ``dtype`` (compute dtype), ``rank``,
    ``world_size``, ``device``, ``sampler`` (:class:`StepSampler`)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, dataset, config: TrainConfig, *,
                 collate_fn: Optional[Callable] = None, group_key: Optional[Callable[[int], Any]] = None,
                 eval_fn: Optional[Callable] = None, param_groups: Optional[Callable] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: 'config' must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trainer: 'model' must be a torch.nn.Module, got {type(model).__name__}")
        for name, fn in (("loss_fn", loss_fn), ("collate_fn", collate_fn), ("group_key", group_key),
                         ("eval_fn", eval_fn), ("param_groups", param_groups)):
            if fn is not None and not callable(fn):
                raise TypeError(f"Trainer: '{name}' must be callable, got {type(fn).__name__}")
        if loss_fn is None:
            raise TypeError("Trainer: 'loss_fn' is required")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("Trainer: 'dataset' must be a map-style dataset (__getitem__ and __len__)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("Trainer: 'model' has no parameters with requires_grad=True")

        self.config, self.loss_fn, self.dataset = config, loss_fn, dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.eval_fn = eval_fn
        info = init_distributed()
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device
        self.ds_config = build_ds_config(config, self.world_size, self.device.type == "cuda")
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.dtype = _compute_dtype(self.ds_config)
        if self.rank == 0 and self.zero_stage != config.zero_stage:
            warnings.warn(f"Trainer: ds_config sets ZeRO stage {self.zero_stage} over zero_stage="
                          f"{config.zero_stage}", stacklevel=2)
        self.sampler = StepSampler(len(dataset), config.micro_batch, config.grad_accum, self.world_size, self.rank,
                                   config.seed, group_key)
        # Under ZeRO-3 the engine's parameters become partitions, so rank 0 keeps a CPU copy of the model as the
        # skeleton that ema_model(), trained_model() and eval fill with full weights.
        self._template = copy.deepcopy(model).cpu() if self.zero_stage == 3 and self.rank == 0 else None

        if param_groups is None:
            decay = [p for _, p in named if p.ndim >= 2]
            no_decay = [p for _, p in named if p.ndim < 2]
            groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
            self.group_names: list[Optional[str]] = [None] * len(groups)
            lr_fns: list[Optional[Callable]] = [None] * len(groups)
        else:
            groups, self.group_names, lr_fns = _custom_groups(param_groups(list(named)), named, config)
        optimizer = None
        if "optimizer" not in self.ds_config:
            opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
            optimizer = opt_cls(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
        scheduler = None
        if "scheduler" not in self.ds_config:
            fn = functools.partial(lr_factor, steps=config.steps, warmup_steps=config.warmup_steps,
                                   schedule=config.schedule, min_lr_ratio=config.min_lr_ratio,
                                   milestones=config.milestones, gamma=config.gamma)
            fns = [fn if g is None else _group_factor(fn, g) for g in lr_fns]

            def scheduler(opt):
                if len(opt.param_groups) != len(fns):  # a DeepSpeed "optimizer" section made its own groups
                    return torch.optim.lr_scheduler.LambdaLR(opt, fn)
                return torch.optim.lr_scheduler.LambdaLR(opt, fns if any(lr_fns) else fn)

        import deepspeed

        # DeepSpeed (0.19.8) assumes parameters have a dimension: its initial broadcast views each one as bytes, its
        # ZeRO-0 clipping and mixed-precision copies reshape them. Say so here instead of failing inside it.
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:
            raise ValueError(f"Trainer: 0-dim parameters are not supported by DeepSpeed: {scalars[:5]}; make them "
                             "buffers (when they are not trained) or 1-element vectors")
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler, config=copy.deepcopy(self.ds_config))
        self._named_trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self._ema: Optional[dict[str, torch.Tensor]] = None
        if config.ema_decay is not None:
            self._ema_init()
        self.global_batch = config.micro_batch * config.grad_accum * self.world_size
        self.step = 0
        self._epoch, self._offset = 0, 0
        self._acc: dict[str, list[float]] = {}
        self._window_time, self._window_steps, self._elapsed = 0.0, 0, 0.0
        self._tb = None
        self._fault: tuple[Optional[str], int] = (None, -1)

    # ----- paths --------------------------------------------------------------------------------------------------

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.config.out_dir, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.config.out_dir, "metrics.jsonl")

    # ----- EMA ----------------------------------------------------------------------------------------------------

    def _gathered(self):
        """Yields lists of (name, param) whose full data is readable inside the iteration (ZeRO-3: gathered on every
        rank in buckets; other stages: the parameters themselves, all at once)."""
        if self.zero_stage != 3:
            yield self._named_trainable
            return
        import deepspeed

        bucket, numel = [], 0
        for n, p in self._named_trainable + [(None, None)]:
            if p is not None:
                bucket.append((n, p))
                numel += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            if bucket and (p is None or numel >= EMA_GATHER_NUMEL):
                with deepspeed.zero.GatheredParameters([q for _, q in bucket], modifier_rank=None):
                    yield bucket
                bucket, numel = [], 0

    @torch.no_grad()
    def _ema_init(self) -> None:
        ema = {}
        for bucket in self._gathered():
            if self.rank == 0:
                for n, p in bucket:
                    ema[n] = p.detach().to(torch.float32, copy=True)
        self._ema = ema if self.rank == 0 else None

    @torch.no_grad()
    def _ema_update(self) -> None:
        w = 1.0 - self.config.ema_decay
        for bucket in self._gathered():
            if self.rank == 0:
                shadows = [self._ema[n] for n, _ in bucket]
                params = [p.detach() if p.dtype == torch.float32 else p.detach().float() for _, p in bucket]
                torch._foreach_lerp_(shadows, params, w)

    def full_state_dict(self) -> Optional[dict]:
        """Rank 0: the module's whole state dict as fp32 CPU tensors (None on the other ranks), parameters from the
        optimizer's fp32 master copies where DeepSpeed keeps them (bf16/fp16 under ZeRO 1-3; gathered from the
        partitions under ZeRO-3), else the module's own (ZeRO-0 bf16 keeps no per-parameter master: its bf16
        values); buffers as they are, floating ones in fp32. A collective under ZeRO: every rank calls it."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = dict(module.named_parameters())
        out = {}
        for name, t in module.state_dict(keep_vars=True).items():
            p = params.get(name)
            full = safe_get_full_fp32_param(p) if p is not None and p.requires_grad else None
            if full is None and p is not None and self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().to("cpu", torch.float32, copy=True)
            if full is None:
                full = t.detach()
            if self.rank == 0:
                full = full.detach().to("cpu", copy=True)
                out[name] = full.float() if full.is_floating_point() else full
        return out if self.rank == 0 else None

    def trained_model(self) -> Optional[torch.nn.Module]:
        """Rank 0: an fp32 eval-mode copy of the model (on the training device, ``requires_grad=False``) holding
        :meth:`full_state_dict` (the fp32 master weights under bf16, the gathered ones under ZeRO-3, where a copy of
        ``engine.module`` would hold bf16-rounded values or empty partitions); None elsewhere. A collective."""
        full = self.full_state_dict()
        if self.rank != 0:
            return None
        model = self._model_copy(None)
        model.load_state_dict(full)
        return model

    def _model_copy(self, weights: Optional[dict]) -> torch.nn.Module:
        """Rank 0: an fp32 eval-mode copy of the module with ``weights`` (name -> tensor) over its parameters."""
        if self.zero_stage == 3:
            model = copy.deepcopy(self._template)
            # Buffers are not partitioned by ZeRO-3: take the current ones.
            current = dict(self.engine.module.named_buffers())
            for n, b in model.named_buffers():
                if n in current:
                    b.data = current[n].detach().to("cpu", copy=True)
        else:
            model = copy.deepcopy(self.engine.module)
        model = model.to(self.device).float()
        if weights:
            params = dict(model.named_parameters())
            for n, w in weights.items():
                params[n].data.copy_(w)
        for p in model.parameters():
            p.grad = None
        return model.eval().requires_grad_(False)

    def ema_model(self) -> torch.nn.Module:
        """Rank 0: a copy of the model (fp32, eval mode, on the training device, ``requires_grad=False``) whose
        trainable parameters hold the EMA weights; frozen parameters and buffers are the current ones."""
        if self.config.ema_decay is None:
            raise RuntimeError("Trainer.ema_model: EMA is off (TrainConfig.ema_decay=None)")
        if self.rank != 0:
            raise RuntimeError("Trainer.ema_model: the EMA lives on rank 0 only")
        return self._model_copy(self._ema)

    def ema_state_dict(self) -> Optional[dict]:
        """Rank 0: the EMA shadow (name -> fp32 tensor, a copy); None elsewhere or when EMA is off."""
        return None if self._ema is None else {n: t.detach().clone() for n, t in self._ema.items()}

    @torch.no_grad()
    def load_ema_state_dict(self, state: dict) -> None:
        """Replace the EMA shadow with ``state`` (name -> tensor, as :meth:`ema_state_dict` gives: the same
        trainable parameters, cast to fp32 on the training device), e.g. to continue a previous run's average in a new
        stage. Only rank 0 holds the EMA; elsewhere this is a no-op. A later resume from a checkpoint loads the
        checkpoint's EMA over it."""
        if self.config.ema_decay is None:
            raise RuntimeError("Trainer.load_ema_state_dict: EMA is off (TrainConfig.ema_decay=None)")
        if self._ema is None:
            return
        if set(state) != set(self._ema):
            missing, extra = sorted(set(self._ema) - set(state)), sorted(set(state) - set(self._ema))
            raise ValueError(f"Trainer.load_ema_state_dict: keys differ from the trainable parameters: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        for n, t in self._ema.items():
            if tuple(state[n].shape) != tuple(t.shape):
                raise ValueError(f"Trainer.load_ema_state_dict: {n} has shape {tuple(state[n].shape)}, expected "
                                 f"{tuple(t.shape)}")
            t.copy_(state[n].to(t.device, t.dtype))

    # ----- checkpoints --------------------------------------------------------------------------------------------

    def _latest_tag(self) -> Optional[str]:
        root = self.ckpt_root
        if not os.path.isdir(root):
            return None
        path = os.path.join(root, LATEST)
        if os.path.isfile(path):
            with open(path) as f:
                tag = f.read().strip()
            if os.path.isfile(os.path.join(root, tag, STATE_FILE)):
                return tag
            warnings.warn(f"Trainer: {path} names {tag!r}, which is not a complete checkpoint; using the highest "
                          "complete step_* instead", stacklevel=3)
        complete = [(s, d) for d in os.listdir(root) if (s := _step_of(d)) is not None
                    and os.path.isfile(os.path.join(root, d, STATE_FILE))]
        return max(complete)[1] if complete else None

    def _save(self) -> None:
        step, root, cfg = self.step, self.ckpt_root, self.config
        tag = f"step_{step}"
        tmp_tag = TMP_PREFIX + tag
        tmp, final = os.path.join(root, tmp_tag), os.path.join(root, tag)
        if self.rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        dist.barrier()
        self.engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
        torch.save({"rng": _get_rng(), "acc": self._acc, "window_time": self._window_time,
                    "window_steps": self._window_steps}, os.path.join(tmp, f"rank_{self.rank}.pt"))
        if self.rank == 0:
            state = {"step": step, "epoch": self._epoch, "offset": self._offset, "elapsed": self._elapsed,
                     "world_size": self.world_size, "dataset_len": self.sampler.n,
                     "config": json.dumps(cfg.to_dict(), default=str),
                     "ema": None if self._ema is None else {n: t.cpu() for n, t in self._ema.items()}}
            torch.save(state, os.path.join(tmp, STATE_FILE))
        dist.barrier()
        # Every rank fsyncs the whole directory: on a shared file system only the writer's fsync is sure to reach
        # the disk, and ranks do not know which of DeepSpeed's files they wrote (syncing a clean file is cheap).
        _fsync_tree(tmp)
        dist.barrier()
        if self.rank == 0:
            _fsync_path(root)
        if self._fault == ("exit_in_save", step):
            os._exit(FAULT_EXIT_CODE)
        if self.rank == 0:
            if os.path.exists(final):
                # A step_N left by a killed run after its rename but before `latest` moved to it (`latest` names an
                # older step): this save replaces it.
                trash = os.path.join(root, TRASH_PREFIX + tag)
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(final, trash)
                shutil.rmtree(trash)
            os.rename(tmp, final)
            _fsync_path(root)
            _atomic_write_text(os.path.join(root, LATEST), tag)
            self._prune(step)
        dist.barrier()

    def _prune(self, step: int) -> None:
        root = self.ckpt_root
        older = sorted((s for d in os.listdir(root) if (s := _step_of(d)) is not None and s < step), reverse=True)
        keep = set(older[:self.config.keep_last - 1]) | {step}
        for d in os.listdir(root):
            s = _step_of(d)
            if s is not None and s not in keep:
                # Renamed first: a kill mid-delete must not leave a half-deleted step_* that looks like a checkpoint.
                trash = os.path.join(root, TRASH_PREFIX + d)
                os.rename(os.path.join(root, d), trash)
                shutil.rmtree(trash)

    def _resume(self) -> int:
        root = self.ckpt_root
        if self.rank == 0 and os.path.isdir(root):
            for d in os.listdir(root):
                if d.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    p = os.path.join(root, d)
                    if os.path.isdir(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.remove(p)
        box = [self._latest_tag() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
        if tag is None:
            return 0
        path = os.path.join(root, tag)
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        cfg = self.config
        for field, now, then in (("world size", self.world_size, state["world_size"]),
                                 ("micro_batch", cfg.micro_batch, saved["micro_batch"]),
                                 ("grad_accum", cfg.grad_accum, saved["grad_accum"]),
                                 ("seed", cfg.seed, saved["seed"]),
                                 ("dataset length", self.sampler.n, state["dataset_len"])):
            if now != then:
                raise ValueError(f"Trainer: cannot resume {path} exactly: it was saved with {field}={then!r}, this run "
                                 f"has {now!r} (use a new out_dir, or the same {field})")
        load_path, _ = self.engine.load_checkpoint(root, tag=tag)
        if load_path is None:
            raise RuntimeError(f"Trainer: DeepSpeed could not load the checkpoint {path}")
        mine = torch.load(os.path.join(path, f"rank_{self.rank}.pt"), map_location="cpu", weights_only=True)
        _set_rng(mine["rng"])
        self._acc = {k: list(v) for k, v in mine["acc"].items()}
        self._window_time, self._window_steps = mine["window_time"], mine["window_steps"]
        self._epoch, self._offset, self._elapsed = state["epoch"], state["offset"], state["elapsed"]
        if self.rank == 0 and cfg.ema_decay is not None:
            if state["ema"] is None:
                raise ValueError(f"Trainer: {path} has no EMA, but TrainConfig.ema_decay={cfg.ema_decay}")
            self._ema = {n: t.to(self.device, torch.float32) for n, t in state["ema"].items()}
        return int(state["step"])

    # ----- metrics ------------------------------------------------------------------------------------------------

    def _truncate_metrics(self, step: int) -> None:
        path = self.metrics_path
        if not os.path.exists(path):
            return
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("step", math.inf) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        _atomic_write_text(path, "".join(keep))

    def _write_record(self, rec: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, rec["step"])

    def _reduce_window(self) -> dict:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, self._acc)
        total: dict[str, list[float]] = {}
        for part in parts:  # rank order: the same sums on every rank and in every run
            for k, (s, c) in part.items():
                t = total.setdefault(k, [0.0, 0])
                t[0] += s
                t[1] += c
        return {k: s / c for k, (s, c) in total.items()}

    def _accumulate(self, loss: float, metrics: dict) -> None:
        for k, v in (("loss", loss), *metrics.items()):
            a = self._acc.setdefault(k, [0.0, 0])
            a[0] += float(v)
            a[1] += 1

    # ----- the loop -----------------------------------------------------------------------------------------------

    def _param_grad_norm(self) -> Optional[float]:
        """Global L2 norm of the trainable parameters' gradients, read after the accumulation boundary's backward
        (so after DeepSpeed's all-reduce, identical on every rank) and before the step clips and zeroes them.

        Only for ZeRO-0, whose engine leaves the gradients in ``p.grad`` but, in fp32, computes no norm of its own
        (``get_global_grad_norm()`` is None there with or without clipping: DeepSpeed clips with torch's
        ``clip_grad_norm_`` and drops its result). None when no parameter holds a gradient (an engine that keeps
        them elsewhere reports its own norm instead)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _group_lrs(self) -> dict:
        """{"lr/<name>": lr} of the named parameter groups (empty without names, or when DeepSpeed's own optimizer
        section made other groups)."""
        pgs = self.engine.optimizer.param_groups
        if len(pgs) != len(self.group_names):
            return {}
        return {f"lr/{n}": float(g["lr"]) for n, g in zip(self.group_names, pgs) if n is not None}

    def _batches(self):
        epoch, offset = self._epoch, self._offset
        while True:
            if callable(getattr(self.dataset, "set_epoch", None)):
                self.dataset.set_epoch(epoch)  # before the DataLoader (its workers copy the dataset)
            flat = [mb for st in self.sampler.plan(epoch)[offset:] for mb in st]
            # A dedicated generator: DataLoader draws its worker base seed from it, not from the global RNG, so the
            # global RNG stream does not depend on where an epoch's iterator was created (resume mid-epoch).
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.config.seed, epoch, offset, self.rank]).generate_state(1)[0]))
            loader = DataLoader(self.dataset, batch_sampler=flat, collate_fn=self.collate_fn,
                                num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                                generator=g)
            yield from loader
            epoch, offset = epoch + 1, 0

    def _to_device(self, obj):
        if isinstance(obj, torch.Tensor):
            obj = obj.to(self.device, non_blocking=True)
            if obj.is_floating_point() and self.dtype != torch.float32:
                obj = obj.to(self.dtype)
            return obj
        if isinstance(obj, dict):
            return {k: self._to_device(v) for k, v in obj.items()}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(self._to_device(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_device(v) for v in obj)
        return obj

    def _seed_fresh(self) -> None:
        s = int(np.random.SeedSequence([self.config.seed, self.rank]).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def _evaluate(self) -> Optional[dict]:
        if self.eval_fn is None:
            return None
        if self.config.ema_decay is not None:
            model = self.ema_model() if self.rank == 0 else None
        elif self.zero_stage == 3 or self.dtype != torch.float32:
            # Partitioned (ZeRO-3) or bf16 weights: evaluate an fp32 copy with the full (master) weights, as with EMA,
            # so that one eval_fn works in every configuration (fp32 inputs on the raw bf16 module failed with
            # "mat1 and mat2 must have the same dtype").
            model = self.trained_model()
        else:
            model = self.engine.module if self.rank == 0 else None
        if self.rank != 0:
            return None
        rng = _get_rng()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = self.eval_fn(model, self.step)
        finally:
            model.train(was_training)
            _set_rng(rng)
        if not isinstance(out, dict):
            raise TypeError(f"Trainer: eval_fn must return a dict of floats, got {type(out).__name__}")
        return {"step": self.step, **{f"eval/{k}": float(v) for k, v in out.items()}}

    def train(self) -> list[dict]:
        """Train to ``config.steps`` optimizer steps, resuming from ``out_dir`` when it holds a checkpoint. Returns
        this run's metric records: on rank 0 all of them (eval lines included), elsewhere the training records (their
        values are reduced over ranks, so they are the same)."""
        cfg = self.config
        self._fault = _parse_fault()
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
        dist.barrier()
        self.step = self._resume()
        if self.step == 0:
            self._seed_fresh()
            self._epoch, self._offset, self._acc = 0, 0, {}
            self._window_time, self._window_steps, self._elapsed = 0.0, 0, 0.0
        if self.rank == 0:
            self._truncate_metrics(self.step)
            resolved = {"train": cfg.to_dict(), "deepspeed": self.ds_config, "world_size": self.world_size,
                        "resumed_from_step": self.step}
            _atomic_write_text(os.path.join(cfg.out_dir, "config.json"), json.dumps(resolved, indent=2, default=str))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=self.step or None)
            except ImportError:
                self._tb = None
        records: list[dict] = []
        if self.step >= cfg.steps:
            return records

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.rank == 0),
                   dynamic_ncols=True, desc="train")
        batches = self._batches()
        self.engine.train()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                lr = float(self.engine.optimizer.param_groups[0]["lr"])
                group_lrs = self._group_lrs()
                logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
                own_norm = None
                for micro in range(cfg.grad_accum):
                    batch = self._to_device(next(batches))
                    out = self.loss_fn(self.engine, batch, self.step)
                    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                            and isinstance(out[1], dict)):
                        raise TypeError("Trainer: loss_fn must return (loss_tensor, {name: float})")
                    loss, metrics = out
                    if loss.numel() != 1:
                        raise ValueError(f"Trainer: loss_fn's loss must be a scalar, got shape {tuple(loss.shape)}")
                    clash = (set(metrics) & set(_RESERVED)) | {k for k in metrics if str(k).startswith("lr/")}
                    if clash:
                        raise ValueError(f"Trainer: loss_fn metric names {sorted(clash)} are reserved")
                    self.engine.backward(loss)
                    if logged and self.zero_stage == 0 and micro == cfg.grad_accum - 1:
                        own_norm = self._param_grad_norm()
                    self.engine.step()
                    self._accumulate(loss.detach().float().item(), metrics)
                self.step += 1
                self._offset += 1
                if self._offset == self.sampler.steps_per_epoch:
                    self._epoch, self._offset = self._epoch + 1, 0
                if cfg.ema_decay is not None:
                    self._ema_update()
                dt = time.perf_counter() - t0
                self._elapsed += dt
                self._window_time += dt
                self._window_steps += 1
                bar.update(1)

                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    gn = self.engine.get_global_grad_norm()
                    if gn is None:
                        gn = own_norm
                    rec = {"step": self.step, **self._reduce_window()}
                    rec.update(lr=lr, grad_norm=None if gn is None else float(gn),
                               samples=self.step * self.global_batch, time=self._elapsed,
                               step_time=self._window_time / max(1, self._window_steps), **group_lrs)
                    order = ["step", "loss", "lr", "grad_norm", "samples", "time", "step_time"]
                    rec = {**{k: rec[k] for k in order}, **{k: v for k, v in rec.items() if k not in order}}
                    self._acc, self._window_time, self._window_steps = {}, 0.0, 0
                    records.append(rec)
                    if self.rank == 0:
                        self._write_record(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.3g}")

                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self._save()
                    ev = self._evaluate()
                    if ev is not None:
                        records.append(ev)
                        self._write_record(ev)
                if self._fault == ("exit_after_step", self.step):
                    os._exit(FAULT_EXIT_CODE)
        finally:
            batches.close()
            bar.close()
            if self._tb is not None:
                self._tb.flush()
        return records
