"""CRIS checkpoints: OpenAI CLIP weights into a fresh CRIS, and checkpoints trained with the official code, loaded
strictly and without running code (design.md §6, spec §1.1 and §7).

* :func:`load_clip` reads OpenAI's ``RN50.pt`` / ``RN101.pt`` (TorchScript archives, read by the code-free reader of
  models/common/torchscript.py), a state dict of the same keys (``.pt`` via ``torch.load(weights_only=True)``, or
  ``.safetensors``), and loads it into ``model.backbone``. Exactly the official effect: every CLIP key must be
  present (the only backbone keys it may lack are CRIS's new ``visual.attnpool.connect.*``), the hyper-parameter
  entries and non-parameter tensors of the archive are dropped, and the tensors openai/CLIP's ``convert_weights``
  casts to fp16 (conv / linear weights and biases, attention in-projections, ``text_projection``) are rounded through
  fp16, including the fresh ``connect`` conv, as the official constructor's fp16 -> fp32 round trip does.
* :func:`load_official` loads a checkpoint trained with the official code (``{"state_dict": {"module.<key>": ...}}``
  or a bare state dict) strictly: any missing, unexpected or mis-shaped key raises one error listing them.
* :func:`ours_to_official` / :func:`save_official` write the official layout back (``module.`` prefix under
  ``state_dict``), loadable by the official test.py.
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import torch
from torch import nn

from models.common import load_into, read_state_dict, strip_prefixes
from models.cris.model import CRIS

StateDict = dict[str, torch.Tensor]
PathOrStateDict = Union[str, os.PathLike, Mapping[str, torch.Tensor]]
_CLIP_HPARAMS = ("input_resolution", "context_length", "vocab_size")


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official CRIS state dict (DDP ``module.`` / DataParallel prefixes allowed) -> ours (the same keys, bare)."""
    return strip_prefixes(state_dict)


def ours_to_official(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Our state dict -> the official checkpoint's keys (``module.`` prefixed, as DDP training saves them)."""
    return {prefix + k: v for k, v in strip_prefixes(state_dict).items()}


def save_official(model: CRIS, path: Union[str, os.PathLike]) -> None:
    """Write ``{"state_dict": ours_to_official(...)}``, the layout of the official best_model.pth."""
    torch.save({"state_dict": ours_to_official(model.state_dict())}, path)


def _state(path_or_state_dict: PathOrStateDict) -> StateDict:
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict)
    return read_state_dict(path_or_state_dict)


def load_official(model: nn.Module, path_or_state_dict: PathOrStateDict) -> nn.Module:
    """Load a checkpoint trained with the official CRIS code into ``model`` strictly; returns the model."""
    if not isinstance(model, CRIS):
        raise TypeError(f"load_official: expected a CRIS, got {type(model).__name__}")
    load_into(model, official_to_ours(_state(path_or_state_dict)))
    return model


def _fp16_round_trip(backbone: nn.Module) -> None:
    """openai/CLIP convert_weights (cast to fp16), then the official ``.float()``: the values become fp16's."""
    with torch.no_grad():
        for module in backbone.modules():
            tensors = []
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                tensors = [module.weight, module.bias]
            elif isinstance(module, nn.MultiheadAttention):
                tensors = [getattr(module, n, None) for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                              "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")]
            for t in tensors:
                if t is not None:
                    t.copy_(t.half().float())
        backbone.text_projection.copy_(backbone.text_projection.half().float())


def load_clip(model: CRIS, path_or_state_dict: PathOrStateDict) -> CRIS:
    """OpenAI CLIP RN50/RN101 weights into ``model.backbone`` (module docstring); returns the model."""
    if not isinstance(model, CRIS):
        raise TypeError(f"load_clip: expected a CRIS, got {type(model).__name__}")
    state = strip_prefixes(_state(path_or_state_dict))
    for key in _CLIP_HPARAMS:
        state.pop(key, None)
    own = model.backbone.state_dict()
    # Tensor attributes of the TorchScript module that eager CLIP does not keep as state (the text blocks' causal
    # attn_mask) are not weights.
    state = {k: v for k, v in state.items() if k in own or not k.endswith("attn_mask")}
    connect = {k for k in own if k.startswith("visual.attnpool.connect.")}
    for k in connect:
        if k not in state:
            state[k] = own[k]
    try:
        load_into(model.backbone, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
    except ValueError as e:
        raise ValueError(f"load_clip: the CLIP weights do not fit this CRIS backbone ({model.config.clip}): {e}") \
            from None
    _fp16_round_trip(model.backbone)
    return model
