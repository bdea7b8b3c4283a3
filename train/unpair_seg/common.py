"""Config helpers shared by the Unpair-Seg training stages: YAML sections with ``--set`` overrides, the model's
:class:`UnpairSegConfig`, the trainer's :class:`TrainConfig` (a global batch split over the processes), ShapesWorld
from a config section, AdamW parameter groups without weight decay on norm and embedding parameters, and the
DeepSpeed fix-up of CLIP's 0-dim ``logit_scale``.

Section ``model``: ``preset`` (``official`` | ``tiny``) plus any :class:`UnpairSegConfig` field (``image_size`` sizes
the tiny preset's canvas); lists become tuples. Section ``train``: ``global_batch`` (split evenly:
``micro_batch = global_batch / (world_size * grad_accum)``) or ``micro_batch``, plus any :class:`TrainConfig` field
(``betas`` / ``milestones`` lists become tuples) over a stage's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
from torch import nn

from train.overrides import apply_overrides, read_config  # noqa: F401  (apply_overrides: part of this module's API)

SHAPES_KEYS = ("seed", "size", "min_objects", "max_objects", "categories", "colours", "sizes", "supersample",
               "min_visible")


def load_config(path: str, overrides: Iterable[str] = (), sections: Optional[Iterable[str]] = None) -> dict:
    """The YAML mapping at ``path`` with ``overrides`` applied; with ``sections``, unknown top-level keys raise."""
    cfg = read_config(path, "an Unpair-Seg", overrides)
    if sections is not None:
        unknown = sorted(set(cfg) - set(sections))
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; known: {list(sections)}")
    return cfg


def model_config(cfg: dict):
    """The UnpairSegConfig of ``cfg['model']`` (preset ``official`` (default) or ``tiny``, plus fields)."""
    from models.unpair_seg.config import UnpairSegConfig

    m = dict(cfg.get("model") or {})
    preset = m.pop("preset", "official")
    fields = {f.name for f in dataclasses.fields(UnpairSegConfig)} - {"extra"}
    unknown = sorted(set(m) - fields)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}; known: preset, {sorted(fields)}")
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
    if preset == "official":
        return UnpairSegConfig.official(**m)
    if preset == "tiny":
        return UnpairSegConfig.tiny(**m)
    raise ValueError(f"model.preset must be 'official' or 'tiny', got {preset!r}")


def train_config(cfg: dict, out_dir: str, world_size: int, defaults: Optional[dict] = None):
    """The TrainConfig of ``cfg['train']`` over ``defaults`` (a given ``micro_batch`` replaces a default
    ``global_batch``)."""
    from train.trainer import TrainConfig, micro_batch

    t = dict(defaults or {})
    given = dict(cfg.get("train") or {})
    if "micro_batch" in given and "global_batch" not in given:
        t.pop("global_batch", None)
    t.update(given)
    t["micro_batch"] = micro_batch(t, world_size)
    t.pop("global_batch", None)
    for k in ("betas", "milestones"):
        if isinstance(t.get(k), list):
            t[k] = tuple(t[k])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(t) - fields)
    if unknown:
        raise ValueError(f"train: unknown key(s) {unknown}; known: global_batch, {sorted(fields - {'out_dir'})}")
    t["out_dir"] = out_dir
    return TrainConfig(**t)


def shapes_world(section: Optional[dict], defaults: Optional[dict] = None):
    """A ShapesWorld from a config section (keys :data:`SHAPES_KEYS`; vocabulary lists as tuples, null = all)."""
    from train.data.shapes import ShapesWorld

    s = dict(defaults or {})
    s.update(section or {})
    kw = {}
    for k in SHAPES_KEYS:
        v = s.get(k)
        if v is None:
            continue
        kw[k] = tuple(v) if isinstance(v, list) else v
    return ShapesWorld(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer groups


_TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                nn.modules.instancenorm._InstanceNorm)


def is_norm(module: nn.Module) -> bool:
    """torch's norm layers (detectron2's ``norm_module_types``) and any other class named ``*Norm*`` (channel
    LayerNorm2d of our layers, timm's and open_clip's norms)."""
    return isinstance(module, _TORCH_NORMS) or "Norm" in type(module).__name__


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names without weight decay: every parameter of a norm module (:func:`is_norm`) and of an
    ``nn.Embedding`` (detectron2's WEIGHT_DECAY_NORM / WEIGHT_DECAY_EMBED = 0, as Mask2Former's optimizer); biases and
    plain ``nn.Parameter`` embeddings keep the decay there, and so here."""
    out = set()
    for mod_name, mod in model.named_modules():
        if is_norm(mod) or isinstance(mod, nn.Embedding):
            for name, _ in mod.named_parameters(recurse=False):
                out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_mult: float = 0.1):
    """The trainer's ``param_groups`` callable: a ``weight_decay`` group and a no-decay group
    (:func:`no_decay_names`), and the same two for backbone parameters at lr x ``backbone_lr_mult``
    (SOLVER.BACKBONE_MULTIPLIER 0.1; empty, hence dropped by the trainer, while the backbone is frozen)."""
    exempt = no_decay_names(model)

    def make(named):
        groups = {(bb, nd): [] for bb in (False, True) for nd in (False, True)}
        for n, p in named:
            name = n[len("module."):] if n.startswith("module.") else n
            groups[(name.startswith("backbone."), name in exempt)].append(p)
        out = []
        for (bb, nd), params in groups.items():
            g = {"params": params, "weight_decay": 0.0 if nd else float(weight_decay)}
            if bb:
                g["lr_mult"] = float(backbone_lr_mult)
            out.append(g)
        return out

    return make


def frozen_scalars_to_buffers(module: nn.Module) -> list[str]:
    """Every 0-dim parameter of ``module`` that does not train (CLIP's ``logit_scale``) made a persistent buffer of the
    same name, value and dtype: DeepSpeed cannot hold 0-dim parameters, and the state-dict keys stay the same.
    Returns the names."""
    names = []
    for mod_name, mod in module.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0 and not p.requires_grad:
                value = p.detach().clone()
                delattr(mod, name)
                mod.register_buffer(name, value)
                names.append(f"{mod_name}.{name}" if mod_name else name)
    return names


def load_clip_weights(clip_model: nn.Module, path: str) -> None:
    """An open_clip CLIP state dict file (safetensors or torch; keys optionally under ``backbone.clip_model.`` /
    ``clip_model.``, wrappers such as ``module.`` stripped) into ``clip_model``, strictly."""
    import os

    from models.common.checkpoint import load_into, read_state_dict, strip_prefixes

    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights {path!r} do not exist (weights are never downloaded)")
    sd = strip_prefixes(read_state_dict(path))
    for prefix in ("backbone.clip_model.", "clip_model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    own = dict(clip_model.named_buffers())
    for k, v in list(sd.items()):  # a 0-dim parameter saved before frozen_scalars_to_buffers keeps its shape
        if k in own and own[k].dim() == 0 and v.dim() == 1 and v.numel() == 1:
            sd[k] = v.reshape(())
    load_into(clip_model, sd)


def unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of ``model.state_dict()`` (for the final checkpoint)."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            for k, v in model.state_dict().items()}
