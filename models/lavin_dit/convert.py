"""Official LaVin-DiT checkpoints <-> our models, loaded strictly and without running code (design.md §6).

The official code loads ``stvae.pt`` with ``torch.load(...)["state_dict"]`` and ``strict=False`` (spec §2.11), so a
key mismatch silently gives garbage. Here files are read with safetensors or ``torch.load(weights_only=True)``
(models/common/checkpoint.py), one wrapper level ({"state_dict": ...}) and DDP/compile prefixes are removed, and the
load is strict: any missing, unexpected or mis-shaped key raises one error listing them all.

Both models keep the official parameter names and shapes (ST-VAE conv weights stay 5-D/4-D as in the official
nn.Conv3d/nn.Conv2d; J-DiT keeps separate q/k/v and gate/up Linears), so the key maps are the identity up to wrapper
prefixes, and a state dict saved from our models loads into the official ones.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from models.common import load_into, read_state_dict, strip_prefixes
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.jdit import JDiT
from models.lavin_dit.stvae import STVAE

StateDict = dict[str, torch.Tensor]
PathOrStateDict = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official ST-VAE or J-DiT state dict -> ours (wrapper prefixes such as ``module.`` removed)."""
    return strip_prefixes(state_dict)


def ours_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our ST-VAE or J-DiT state dict -> the official key layout (loadable by AutoencoderKLSTVAE / LaVinDiT)."""
    return strip_prefixes(state_dict)


def load_official(model: nn.Module, path_or_state_dict: PathOrStateDict) -> nn.Module:
    """Load official weights (a local file or a state dict) into ``model`` strictly; returns the model."""
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
    else:
        state = read_state_dict(path_or_state_dict)
    if not isinstance(model, (STVAE, JDiT)):
        raise TypeError(f"load_official: expected an STVAE or a JDiT, got {type(model).__name__}")
    load_into(model, official_to_ours(state))
    return model


def load_stvae(path: Union[str, os.PathLike], config: Optional[STVAEConfig] = None, *, fused: bool = True,
               dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> STVAE:
    """A new :class:`STVAE` (official architecture unless ``config`` says otherwise) holding the weights of the
    official ``stvae.pt`` (or a .safetensors export of it), moved to ``device``/``dtype`` (the official inference runs
    the VAE in bf16)."""
    model = load_official(STVAE(config or STVAEConfig.official(), fused=fused), path)
    return model.to(device=device, dtype=dtype)


def load_jdit(path: Union[str, os.PathLike], config: Optional[JDiTConfig] = None, *,
              dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> JDiT:
    """A new :class:`JDiT` (the released 3.4B ``LaVinDiT_3B_2`` unless ``config`` says otherwise) holding the weights
    of the official ``lavin_dit.safetensors``, moved to ``device``/``dtype`` (the official inference uses bf16)."""
    with torch.device("meta"):  # no point initializing 3.4B parameters that the checkpoint overwrites
        model = JDiT(config or JDiTConfig.preset("3.4B"))
    model = model.to_empty(device="cpu")
    return load_official(model, path).to(device=device, dtype=dtype)
