"""Unpair-Seg stage-1 checkpoints: the official ``stage1.pth`` (detectron2 / fvcore format, spec §9) into
:class:`UnpairSegS1` and back, strictly and without running code.

Key mapping: our module tree uses the official attribute names (``backbone.clip_model.*``,
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``), so the mapping is the identity up to wrappers:

* official -> ours (:func:`official_to_ours`): drop non-tensor entries, strip ``module.`` (DDP) and ``_orig_mod.``
  (torch.compile) prefixes;
* ours -> official (:func:`ours_to_official`): the same keys, bare (detectron2 saves the unwrapped model).

Loading (:func:`load_official`): a path is read without unpickling code (``.safetensors`` with safetensors,
TorchScript archives with the code-free reader, anything else with ``torch.load(weights_only=True)``, which refuses
pickled objects); the detectron2 checkpointer's wrapper ``{"model": state_dict, "iteration": ..., ...}`` is
unwrapped (also ``{"state_dict": ...}``), non-tensor entries are ignored, and the load is strict: any missing,
unexpected or mis-shaped key raises one ValueError naming them (detectron2 would skip mis-shaped keys with a
warning and load the rest non-strictly). ``pixel_mean`` / ``pixel_std`` and open_clip's ``attn_mask`` are
non-persistent officially and here, so they are never in a checkpoint.

Saving (:func:`save_official`): ``torch.save({"model": state_dict})``, the layout ``DetectionCheckpointer`` reads.

:func:`official_key_set` lists every key and shape of a config's state dict (built on the meta device: no memory,
no weights), e.g. ~901 keys for the official config (backbone 543, pixel decoder 118, predictor 240).
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import torch
from torch import nn

from models.common import load_into, read_state_dict, strip_prefixes

StateDict = dict[str, torch.Tensor]
PathOrStateDict = Union[str, os.PathLike, Mapping]
_WRAPPERS = ("model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(obj, where: str) -> StateDict:
    """The tensors of a (possibly wrapped) checkpoint mapping; non-tensor entries are dropped."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{where}: holds no tensors (expected a state dict, or one under 'model')")
    return tensors


def official_to_ours(state_dict: Mapping) -> StateDict:
    """An official state dict (or detectron2 checkpoint dict) -> our keys: the identity up to wrappers (module
    docstring)."""
    return strip_prefixes(_unwrap(state_dict, "official_to_ours"), _PREFIXES)


def ours_to_official(state_dict: Mapping) -> StateDict:
    """Our state dict -> the official keys (the same names, bare)."""
    return strip_prefixes(_unwrap(state_dict, "ours_to_official"), _PREFIXES)


def read_official(path: Union[str, os.PathLike]) -> StateDict:
    """The tensors of an official checkpoint file (never unpickles code; module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (weights are never downloaded; give a local path)")
    from models.common.torchscript import is_torchscript

    if path.endswith(".safetensors") or is_torchscript(path):
        return read_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything beyond tensors and plain containers
        raise ValueError(f"checkpoint {path!r} could not be read safely with torch.load(weights_only=True): {e}") \
            from e
    return _unwrap(obj, f"checkpoint {path!r}")


def load_official(model: nn.Module, path_or_state_dict: PathOrStateDict) -> nn.Module:
    """Load an official stage-1 checkpoint (a path or a state dict / checkpoint dict) into ``model`` strictly;
    returns the model. Tensors are copied into the model's own parameters (dtype and device kept)."""
    from models.unpair_seg.model import UnpairSegS1

    if not isinstance(model, UnpairSegS1):
        raise TypeError(f"load_official: expected an UnpairSegS1, got {type(model).__name__}")
    if isinstance(path_or_state_dict, Mapping):
        state = official_to_ours(path_or_state_dict)
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        state = official_to_ours(read_official(path_or_state_dict))
    else:
        raise TypeError(f"load_official: expected a path or a state dict, got {type(path_or_state_dict).__name__}")
    load_into(model, state)
    return model


def save_official(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``{"model": ours_to_official(model.state_dict())}`` with torch.save (detectron2's layout)."""
    state = {k: v.detach().cpu().contiguous() for k, v in ours_to_official(model.state_dict()).items()}
    torch.save({"model": state}, os.fspath(path))


def official_key_set(cfg) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the state dict of ``UnpairSegS1(cfg)``, built on the meta device (no weights, no memory)."""
    from models.unpair_seg.model import UnpairSegS1

    with torch.device("meta"):
        model = UnpairSegS1(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


__all__ = ["official_to_ours", "ours_to_official", "load_official", "save_official", "read_official",
           "official_key_set"]
