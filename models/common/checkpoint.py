"""Checkpoint loading that never runs code and never loads silently wrong.

* :func:`read_state_dict` reads ``.safetensors`` with safetensors, TorchScript archives with the code-free reader of
  models/common/torchscript.py, anything else with ``torch.load(weights_only=True)`` (which refuses pickled code),
  and unwraps one level of a training checkpoint
  ({"state_dict": ...}, {"model": ...}, {"module": ...}).
* :func:`strip_prefixes` removes wrapper prefixes such as ``module.`` (DDP/DeepSpeed) and ``_orig_mod.``
  (torch.compile).
* :func:`load_into` loads strictly: any missing key, unexpected key or shape mismatch raises one error that lists
  them all. (The official LaVin-DiT code loads with strict=False, which turns a key mismatch into garbage output.)
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Union

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Tensors from a checkpoint file, on the CPU. Never unpickles code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (weights are never downloaded; give a local path)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    from models.common.torchscript import is_torchscript, read_torchscript_state_dict

    if is_torchscript(path):  # e.g. OpenAI's CLIP archives: tensors only, none of the archived code runs
        try:
            return read_torchscript_state_dict(path)
        except Exception as e:
            raise ValueError(f"checkpoint {path!r} (a TorchScript archive) could not be read safely: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses anything beyond tensors and plain containers
        raise ValueError(f"checkpoint {path!r} could not be read safely with torch.load(weights_only=True): {e}") from e
    return _unwrap(obj, path)


def _unwrap(obj, path: str) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return dict(tensors)
    raise ValueError(f"checkpoint {path!r} holds no state dict (a mapping of names to tensors), got {type(obj).__name__}")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor],
                   prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> StateDict:
    """Remove wrapper prefixes from every key (repeatedly, so ``module._orig_mod.x`` becomes ``x``)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` strictly; one error lists every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise ValueError(f"state dict does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
