"""``python -m train.lavin_dit --config train/configs/lavin_dit_tiny.yaml``: train LaVin-DiT with the shared trainer.

Two models, each trained by :class:`train.trainer.Trainer` runs in sub-directories of ``out_dir``:

1. ``vae/``: the ST-VAE (skipped when ``vae.weights`` names a checkpoint, e.g. the official stvae.pt), with the loss
   of the thesis (models/lavin_dit/vae_loss.py): MSE + LPIPS (when ``vae.lpips`` names local weights) + PatchGAN
   adversarial with the adaptive weight (from ``vae.disc_start`` on) + KL.

   * The trainer has one model and one optimizer, so it trains :class:`VAEGAN`, a module holding ``vae`` and
     ``disc`` (state-dict keys ``vae.*`` and ``disc.*``) whose forward computes loss_G + loss_D. One backward of
     that sum gives each part only its own gradients: the generator's adversarial term calls the discriminator with
     detached parameters (``vae_loss.vae_generator_loss``), and the discriminator's hinge loss sees
     ``recon.detach()`` (``VAELoss.discriminator_loss``). Both share the trainer's AdamW settings (taming/LDM also
     use one learning rate for both). The adaptive weight needs the decoder's full last-layer weight, so ZeRO 0-2
     only (not 3).
   * The thesis's two stages (``vae_loss.VAEStageSchedule``): steps [0, ``vae.stage1_steps``) draw image batches
     (T = 1); later steps interleave image batches and video batches of ``vae.video_frames`` frames, a fraction
     ``vae.video_fraction`` of them video, on a fixed schedule (all ranks draw the same kind at a step).
   * Data (:class:`VAEData`): sample ``i`` is one (input, target) pair of an in-context task, rendered when the step's
     kind is known: an image task's two images, or a video task's two clips (ShapesWorld's bouncing-object clips:
     frame prediction and video foreground masks; with ``data.manifest``, the manifest's image / video records).
     The trainer's items are just the indices, and rendering happens in the objective (in the training process, so
     ``num_workers`` does not parallelize it). Samples are functions of their index, so resume stays exact.
   * At the end, ``vae/stvae.pt`` holds the trained VAE in the official layout (``{"state_dict": ...}``, loadable as
     ``vae.weights``), and :func:`train_vae` returns the :class:`STVAE`.

2. ``dit/``: the J-DiT on the frozen VAE's latents, flow matching as the official transport (t logit-normal, t = 0
   noise, loss MSE + 0.1 L1 on the velocity), with ``uncond_ratio`` of the samples trained on the official
   unconditional context [zero frame, query]. With ``train.stages`` the DiT follows the thesis's resolution schedule
   (§4.4.1 implementation details: 100k steps at 256², then 20k at 512² with lr 5e-5, the rest kept): each stage is its
   own trainer run in ``dit/stage{n}/`` at its ``size``, starting from the previous stage's final weights (fp32
   master weights where the optimizer keeps them) and EMA. AdamW moments and the LR schedule start afresh per stage
   (the thesis says nothing of them). A finished stage leaves ``dit/stage{n}/final.pt`` ({"model", "ema", "steps",
   "size"}, written atomically); a later run skips every stage whose final.pt has its configured steps, and resumes
   the first unfinished one exactly from its checkpoints. Without ``stages`` there is one run in ``dit/``, at
   ``data.size``.

Data: :class:`train.data.lavin_tasks.InContextDataset` on ShapesWorld (``data.manifest`` switches to a JSONL manifest
of real images/videos, read by :class:`train.data.manifest.ManifestDataset`). DiT batches hold one (task, k) group.

The YAML has sections ``model`` (J-DiT preset and overrides), ``vae``, ``data``, ``flow`` and ``train``::

    vae:
      preset: tiny | official       weights: null | path     lpips: null | path(s) of local LPIPS weights
      kl_weight, perceptual_weight, disc_weight, disc_factor, disc_start, disc_loss, adaptive_eps, adaptive_max,
      sample_posterior               (VAELossConfig fields; LDM defaults)
      disc: {ndf, n_layers, norm}    (PatchGANConfig fields; default PatchGANConfig.tiny() for the tiny preset)
      stage1_steps: N                (default: half of train.steps)
      video_fraction: 0.5            video_frames: 17 (1 + 4k)
      seed: 0                        (initialization of the VAE and the discriminator)
      train: {TrainConfig fields}
    train:
      {TrainConfig fields}           (for every stage)
      stages:                        (optional) a list; each entry: size: [H, W] plus TrainConfig fields over the above
        - {size: [256, 256], steps: 100000}
        - {size: [512, 512], steps: 20000, lr: 5.0e-5}

See train/configs/lavin_dit_tiny.yaml.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import Dataset

from models.lavin_dit import flow
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.convert import load_official, ours_to_official
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.stvae import STVAE
from models.lavin_dit.vae_loss import (PatchDiscriminator, PatchGANConfig, VAELoss, VAELossConfig, VAEStageSchedule,
                                       unwrap, vae_generator_loss)
from train.data.lavin_tasks import IMAGE_TASKS, VIDEO_TASKS, InContextDataset, collate, make_pair, to_model
from train.data.shapes import ShapesWorld
from train.trainer import TrainConfig, Trainer

FINAL = "final.pt"
STVAE_FILE = "stvae.pt"
_VAE_STREAM = 0x5AE57A6E
_LOSS_KEYS = ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor", "disc_start", "disc_loss",
              "adaptive_eps", "adaptive_max", "sample_posterior")
_VAE_KEYS = frozenset(("preset", "weights", "lpips", "disc", "stage1_steps", "video_fraction", "video_frames", "seed",
                       "train") + _LOSS_KEYS)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _seeded(seed: int, fn):
    """fn() with the global CPU RNG seeded from ``seed`` and restored afterwards: model initializations that do not
    depend on what ran before (a resumed run builds the same models as an uninterrupted one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_dataset(cfg: dict, size=None):
    """The in-context dataset of ``cfg['data']``, at ``size`` (H, W) when given (a resolution stage), else at
    ``data.size``."""
    d = cfg.get("data", {})
    if d.get("manifest"):
        from train.data.manifest import ManifestDataset

        return ManifestDataset(d["manifest"], k=d.get("k", 2), size=tuple(size or d.get("size", (64, 64))))
    size = tuple(size or d.get("size", (32, 32)))
    world = ShapesWorld(seed=d.get("seed", 0), size=size)
    k = d.get("k", (1, 2))
    return InContextDataset(world, tasks=d.get("tasks"), k=tuple(k) if isinstance(k, list) else k,
                            length=d.get("length", 100_000), frames=d.get("frames", 5), seed=d.get("seed", 0))


def _clips(batch: dict) -> list[torch.Tensor]:
    """The visual sentence of a collated batch as [B, 3, T, H, W] clips: in_1, tgt_1, ..., in_k, tgt_k, query, answer."""
    ins, tgts = batch["inputs"], batch["targets"]  # [B, k, 3, T, H, W]
    out = []
    for j in range(ins.shape[1]):
        out += [ins[:, j], tgts[:, j]]
    return out + [batch["query"], batch["target"]]


# ---------------------------------------------------------------------------------------------------------------------
# ST-VAE stage


class VAEGAN(nn.Module):
    """The ST-VAE and its PatchGAN discriminator as one module for the trainer (one optimizer over both).

    forward(x, step, criterion, generator=None) -> (loss, logs): the whole VAE objective of ``x`` [B, 3, T, H, W] at
    ``step`` with a :class:`VAELoss`: loss_G (``vae_loss.vae_generator_loss``) plus, from ``disc_start`` on, loss_D
    (``VAELoss.discriminator_loss`` on the detached reconstruction); ``logs`` are detached scalars. The objective is
    computed inside the forward, so that under DeepSpeed only the final loss is an output of the engine: the engine
    hooks its outputs to start its backward bookkeeping, and the adaptive weight's ``torch.autograd.grad`` through
    the reconstruction must not trigger that.
    """

    def __init__(self, vae: STVAE, disc: PatchDiscriminator):
        super().__init__()
        self.vae, self.disc = vae, disc

    def forward(self, x: torch.Tensor, step: int, criterion: VAELoss, generator: Optional[torch.Generator] = None):
        loss, recon, logs = vae_generator_loss(self.vae, self.disc, x, step, criterion, generator)
        loss_d, logs_d = criterion.discriminator_loss(self.disc, x, recon, step)
        if loss_d is not None:
            loss = loss + loss_d
            logs.update(logs_d)
        return loss, logs

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for the adaptive GAN weight (``vae_loss.vae_generator_loss`` asks for it)."""
        return self.vae.last_layer()

    def stvae_state_dict(self) -> dict:
        """The VAE's weights in the official stvae.pt key layout."""
        return ours_to_official(self.vae.state_dict())


class VAEData(Dataset):
    """The ST-VAE stage's samples: sample ``i`` is one (input, target) pair, as images or as videos.

    Built from the in-context dataset of the run (ShapesWorld :class:`InContextDataset` or a ``ManifestDataset``):

    * image pairs: task ``image_tasks[i % n]`` (the run's image tasks; all of ``IMAGE_TASKS`` when it has none) on a
      scene drawn from (world seed, seed, i), as :func:`make_pair` renders it; T = 1.
    * video pairs: task ``video_tasks[i % n]`` (``VIDEO_TASKS`` unless the run names some) on a clip, T =
      ``video_frames``.
    * manifest: a record drawn from (seed, i) among the image-task records or the video-task records; videos are cut to
      their first ``video_frames`` frames (shorter ones raise).

    ``dataset[i]`` is ``{"index": i}`` (the trainer's sampler works on indices); :meth:`pairs` renders a batch of one
    kind, so the objective renders only what the step's schedule asks for.
    """

    def __init__(self, source, *, video_frames: int, length: Optional[int] = None, seed: int = 0,
                 need_video: bool = True):
        if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1 or \
                (video_frames - 1) % 4:
            raise ValueError(f"VAEData: 'video_frames' must be 1 + 4k, got {video_frames!r}")
        self.video_frames, self.seed = video_frames, int(seed)
        self.length = len(source) if length is None else int(length)
        if isinstance(source, InContextDataset):
            self.world, self.scenes = source.world, source.scenes
            self.image_tasks = tuple(t for t in source.tasks if t in IMAGE_TASKS) or IMAGE_TASKS
            self.video_tasks = tuple(t for t in source.tasks if t in VIDEO_TASKS) or VIDEO_TASKS
            self.manifest = None
        elif hasattr(source, "pools") and hasattr(source, "pair"):
            self.world, self.manifest = None, source
            self.image_records = [r for t, rs in source.pools.items() if t not in VIDEO_TASKS for r in rs]
            self.video_records = [r for t, rs in source.pools.items() if t in VIDEO_TASKS for r in rs]
            if not self.image_records:
                raise ValueError("VAEData: the manifest has no image-task records for the VAE's image batches")
            if need_video and not self.video_records:
                raise ValueError(f"VAEData: the manifest has no video-task records ({VIDEO_TASKS}) for the VAE's video "
                                 "batches; set vae.video_fraction: 0 or vae.stage1_steps >= the VAE steps")
        else:
            raise TypeError(f"VAEData: 'source' must be an InContextDataset or a ManifestDataset, got "
                            f"{type(source).__name__}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= int(i) < self.length:
            raise IndexError(f"VAEData: index {i} out of range for length {self.length}")
        return {"index": int(i)}

    def pair(self, i: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of sample ``i`` as ``kind`` ("image" or "video"): float32 [3, T, H, W] in [-1, 1]."""
        if kind not in ("image", "video"):
            raise ValueError(f"VAEData.pair: 'kind' must be 'image' or 'video', got {kind!r}")
        rng = np.random.default_rng(np.random.SeedSequence(
            [0 if self.world is None else self.world.seed, _VAE_STREAM, self.seed, int(i), kind == "video"]))
        if self.manifest is not None:
            pool = self.image_records if kind == "image" else self.video_records
            a, b = self.manifest.pair(pool[int(rng.integers(len(pool)))])
            if kind == "image":
                return a[:, :1], b[:, :1]
            T = self.video_frames
            if a.shape[1] < T or b.shape[1] < T:
                raise ValueError(f"VAEData: a manifest video has {min(a.shape[1], b.shape[1])} frames, fewer than "
                                 f"vae.video_frames={T}")
            return a[:, :T], b[:, :T]
        tasks = self.image_tasks if kind == "image" else self.video_tasks
        task = tasks[int(i) % len(tasks)]
        scene = int(rng.integers(*self.scenes))
        a, b = make_pair(self.world, task, scene, rng, self.video_frames)
        return to_model(a), to_model(b)

    def pairs(self, indices, kind: str) -> torch.Tensor:
        """[2B, 3, T, H, W]: input_0, target_0, input_1, target_1, ... of the samples ``indices``."""
        out = []
        for i in indices:
            out += list(self.pair(int(i), kind))
        return torch.stack(out)


class VAEObjective:
    """The ST-VAE stage's loss for the trainer: one micro-batch of the kind ``schedule`` assigns to the step.

    Returns loss_G + loss_D (loss_D from ``disc_start`` on); see the module docstring for why one backward of the sum
    gives the VAE exactly the generator loss's gradients and the discriminator exactly the hinge loss's. ``model`` is
    the engine around a :class:`VAEGAN` (or the module itself). Logged: mse, lpips, kl, rec, adv_g, adaptive_weight,
    loss_g, (loss_d, logits_real, logits_fake), frames (T of the batch) and video (1 for a video batch).
    """

    def __init__(self, loss_cfg: VAELossConfig, data: VAEData, schedule: VAEStageSchedule,
                 criterion: Optional[VAELoss] = None):
        self.criterion = criterion if criterion is not None else VAELoss(loss_cfg)
        self.data, self.schedule = data, schedule
        if data.video_frames != schedule.video_frames:
            raise ValueError(f"VAEObjective: the data's video_frames={data.video_frames} differ from the schedule's "
                             f"{schedule.video_frames}")

    def inputs(self, batch: dict, step: int) -> torch.Tensor:
        """The step's pixels [2B, 3, T, H, W] (float32, CPU)."""
        return self.data.pairs(batch["index"].tolist(), self.schedule.batch_kind(step))

    def __call__(self, model, batch, step):
        p0 = next(unwrap(model).parameters())
        x = self.inputs(batch, step).to(p0.device, p0.dtype)
        loss, logs = model(x, step, self.criterion)
        out = {k: float(v) for k, v in logs.items() if k != "kl_term"}
        out.update(frames=float(x.shape[2]), video=float(x.shape[2] > 1))
        return loss, out


def _vae_section(cfg: dict) -> dict:
    v = dict(cfg.get("vae", {}))
    unknown = sorted(set(v) - _VAE_KEYS)
    if unknown:
        raise ValueError(f"vae: unknown key(s) {unknown}; known: {sorted(_VAE_KEYS)}")
    return v


def vae_loss_config(v: dict) -> VAELossConfig:
    """The VAELossConfig of a ``vae:`` section (its loss keys; ``lpips`` is the weight path)."""
    kw = {k: v[k] for k in _LOSS_KEYS if k in v}
    return VAELossConfig(lpips_path=v.get("lpips"), **kw)


def vae_schedule(v: dict) -> VAEStageSchedule:
    steps = v.get("train", {}).get("steps", 0)
    return VAEStageSchedule(stage1_steps=int(v.get("stage1_steps", steps // 2)),
                            video_fraction=float(v.get("video_fraction", 0.5)),
                            video_frames=int(v.get("video_frames", 17)))


def build_vaegan(v: dict) -> VAEGAN:
    """The VAE (preset) and the discriminator (``disc`` over the preset's default), initialized from ``seed``."""
    tiny = v.get("preset", "tiny") == "tiny"
    vae_cfg = STVAEConfig.tiny() if tiny else STVAEConfig.official()
    base = PatchGANConfig.tiny() if tiny else PatchGANConfig()
    disc_cfg = dataclasses.replace(base, **dict(v.get("disc") or {}))
    return _seeded(int(v.get("seed", 0)), lambda: VAEGAN(STVAE(vae_cfg), PatchDiscriminator(disc_cfg)))


def train_vae(cfg: dict, out_dir: str, dataset) -> STVAE:
    """Stage ``vae/`` (see the module docstring); returns the trained STVAE (or the one loaded from ``vae.weights``).
    ``dataset``: the run's in-context dataset, the source of the VAE's pairs."""
    v = _vae_section(cfg)
    if v.get("weights"):
        from models.common import read_state_dict

        vae_cfg = STVAEConfig.tiny() if v.get("preset", "tiny") == "tiny" else STVAEConfig.official()
        return load_official(STVAE(vae_cfg), read_state_dict(v["weights"]))
    if "steps" not in v.get("train", {}):
        raise ValueError("vae.train.steps is required to train the VAE (or set vae.weights to a checkpoint)")
    tc = _train_config(v["train"], os.path.join(out_dir, "vae"))
    schedule = vae_schedule(v)
    data = VAEData(dataset, video_frames=schedule.video_frames, seed=int(getattr(dataset, "seed", 0)),
                   need_video=schedule.video_fraction > 0 and schedule.stage1_steps < tc.steps)
    objective = VAEObjective(vae_loss_config(v), data, schedule)
    trainer = Trainer(build_vaegan(v), objective, data, tc)
    trainer.train()
    gan = _final_weights(trainer)
    if trainer.rank == 0:
        _atomic_save({"state_dict": gan.stvae_state_dict()}, os.path.join(tc.out_dir, STVAE_FILE))
    _barrier()
    return gan.vae


def _train_config(section: dict, out_dir: str) -> TrainConfig:
    fields = dict(section)
    if "stages" in fields:
        raise ValueError("train.stages: a staged section has one TrainConfig per stage; use dit_stages(cfg, out_dir)")
    fields["out_dir"] = out_dir
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    return TrainConfig(**fields)


def _final_weights(trainer: Trainer):
    """The trained model, fp32, on every rank: the EMA weights when EMA is on, else the fp32 master weights
    (``Trainer.trained_model``: a copy of ``engine.module`` would hold bf16-rounded values under bf16). Both are
    built on rank 0 (fp32, eval mode, ``requires_grad=False``) and broadcast into a copy of the module elsewhere."""
    if trainer.config.ema_decay is None:
        model = trainer.trained_model()  # a collective: every rank calls it; None on ranks > 0
    else:
        model = trainer.ema_model() if trainer.rank == 0 else None
    if model is None:
        model = copy.deepcopy(trainer.engine.module).float().eval().requires_grad_(False)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# J-DiT stage


class FlowObjective:
    """DiT loss: flow matching of the answer's latent given the in-context latents, with CFG dropout."""

    def __init__(self, vae: STVAE, uncond_ratio: float = flow.UNCOND_RATIO, t_kind: str = "lognorm",
                 shift: float = 1.0):
        self.vae = vae.eval().requires_grad_(False)
        self.uncond_ratio, self.t_kind, self.shift = uncond_ratio, t_kind, shift

    @torch.no_grad()
    def latents(self, batch, device, dtype):
        """(cond [B, C, F_c, h, w], answer [B, C, F_x, h, w], query frames), DiT-normalized posterior samples."""
        lat = []
        for clip in _clips(batch):
            z = self.vae.encode(clip.to(device, next(self.vae.parameters()).dtype)).sample()
            lat.append(STVAE.to_dit_latent(z).to(dtype))
        return torch.cat(lat[:-1], 2), lat[-1], lat[-2].shape[2]

    def __call__(self, model, batch, step):
        net = unwrap(model)
        p0 = next(net.parameters())
        cond, x1, nq = self.latents(batch, p0.device, p0.dtype)
        B, p = x1.shape[0], net.config.patch_size
        t = flow.sample_t(B, kind=self.t_kind, shift=self.shift).to(p0.device)
        x0 = torch.randn_like(x1)
        xt, u = flow.interpolate(x0, x1, t)
        drop = flow.drop_mask(B, self.uncond_ratio).to(p0.device)
        null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -nq:]], dim=2)
        total = x1.new_zeros((), dtype=torch.float32)
        for mask, ctx in ((~drop, cond), (drop, null)):  # two sequence lengths: two passes
            n = int(mask.sum())
            if n == 0:
                continue
            v = model(patchify(xt[mask], p), t[mask], patchify(ctx[mask], p))
            total = total + flow.flow_loss(v, u[mask]) * (n / B)
        return total, {"uncond_frac": float(drop.float().mean())}


@dataclass(frozen=True)
class DiTStage:
    """One DiT trainer run: ``size`` (H, W) of its data (None: ``data.size``) and its TrainConfig (whose out_dir is
    the stage's directory)."""

    index: int
    size: Optional[tuple]
    config: TrainConfig

    @property
    def final_path(self) -> str:
        return os.path.join(self.config.out_dir, FINAL)


def dit_stages(cfg: dict, out_dir: str) -> list[DiTStage]:
    """The DiT runs of ``cfg['train']``: one in ``out_dir/dit`` without ``stages``, else ``out_dir/dit/stage{n}``
    (n = 1, 2, ...), each stage's keys over the section's shared ones."""
    section = dict(cfg.get("train", {}))
    stages = section.pop("stages", None)
    root = os.path.join(out_dir, "dit")
    if stages is None:
        return [DiTStage(0, None, _train_config(section, root))]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"train.stages must be a non-empty list of mappings, got {stages!r}")
    out = []
    for n, st in enumerate(stages):
        st = dict(st)
        size = st.pop("size", None)
        if size is not None:
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
                raise ValueError(f"train.stages[{n}].size must be [H, W] of positive ints, got {size!r}")
            size = (int(size[0]), int(size[1]))
        if "out_dir" in st:
            raise ValueError(f"train.stages[{n}]: out_dir is set per stage (dit/stage{n + 1})")
        fields = {**section, **st}
        if "steps" not in fields:
            raise ValueError(f"train.stages[{n}] needs 'steps'")
        out.append(DiTStage(n, size, _train_config(fields, os.path.join(root, f"stage{n + 1}"))))
    return out


def _read_final(stage: DiTStage) -> Optional[dict]:
    """The stage's final.pt when it holds the configured number of steps (the stage is done), else None."""
    if not os.path.isfile(stage.final_path):
        return None
    state = torch.load(stage.final_path, map_location="cpu", weights_only=True, mmap=True)
    if stage.size is not None and state.get("size") != list(stage.size):
        raise ValueError(f"train.stages[{stage.index}]: {stage.final_path} was trained at {state.get('size')}, the "
                         f"config says {list(stage.size)} (use a new out_dir)")
    return state if state.get("steps") == stage.config.steps else None


def train_dit(cfg: dict, out_dir: str, vae: STVAE, dataset=None) -> str:
    """The DiT stage(s) of ``cfg`` on the frozen ``vae`` (see the module docstring); returns the path of the last
    stage's final.pt (load it with :func:`load_final_dit`). ``dataset``: the in-context dataset of a single-stage
    run (built from ``cfg`` when None); staged runs build each stage's at its size."""
    stages = dit_stages(cfg, out_dir)
    fl = cfg.get("flow", {})
    objective = FlowObjective(vae, fl.get("uncond_ratio", flow.UNCOND_RATIO), fl.get("t_kind", "lognorm"),
                              fl.get("shift", 1.0))
    prev = None
    for stage in stages:
        done = _read_final(stage)
        if done is not None:  # finished earlier: its weights start the next stage
            prev = done
            continue
        tc = stage.config
        model = _seeded(tc.seed, lambda: build_dit(cfg))
        if prev is not None:
            model.load_state_dict(prev["model"])
        if stage.size is None and len(stages) == 1 and dataset is not None:
            ds = dataset
        else:
            ds = build_dataset(cfg, size=stage.size)
        trainer = Trainer(model, objective, ds, tc, collate_fn=collate, group_key=ds.key)
        objective.vae.to(next(trainer.engine.module.parameters()).device)  # the frozen VAE follows the DiT's device
        if prev is not None and prev.get("ema") is not None and tc.ema_decay is not None:
            trainer.load_ema_state_dict(prev["ema"])  # a resumed run then loads its own EMA over this
        trainer.train()
        full = trainer.full_state_dict()
        if trainer.rank == 0:
            _atomic_save({"model": full, "ema": trainer.ema_state_dict(), "steps": tc.steps,
                          "size": list(stage.size or ds.size or ())}, stage.final_path)
        _barrier()
        del trainer, model, full
        gc.collect()  # the engine of this stage (and its optimizer state) goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        prev = torch.load(stage.final_path, map_location="cpu", weights_only=True, mmap=True)
    return stages[-1].final_path


def load_final_dit(cfg: dict, path: str, ema: bool = True) -> JDiT:
    """The J-DiT of ``cfg`` with a stage's final.pt weights: its EMA when it has one and ``ema``, else the raw
    weights. fp32, eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_dit(cfg)
    model.load_state_dict(state["model"])
    if ema and state.get("ema") is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["ema"].items():
                params[n].copy_(t)
    return model.float().eval()


def build_dit_config(cfg: dict) -> JDiTConfig:
    m = dict(cfg.get("model", {}))
    preset = m.pop("preset", "tiny")
    return JDiTConfig.preset(preset, **m)


def build_dit(cfg: dict) -> JDiT:
    return JDiT(build_dit_config(cfg))


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out-dir", default=None, help="overrides the config's out_dir")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    out_dir = args.out_dir or cfg.get("out_dir", "runs/lavin_dit")
    dataset = build_dataset(cfg)
    vae = copy.deepcopy(train_vae(cfg, out_dir, dataset)).float()
    train_dit(cfg, out_dir, vae, dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
