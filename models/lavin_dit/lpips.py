"""LPIPS (Zhang et al., CVPR 2018, "The unreasonable effectiveness of deep features as a perceptual metric"), VGG16
variant, written here so that the ST-VAE perceptual loss needs neither torchvision nor the ``lpips`` package.

Definition (the ``lpips`` package's ``LPIPS(net="vgg", lpips=True)`` in eval mode):

    x_s = (x - shift) / scale                                     (ImageNet scaling layer, x in [-1, 1])
    f_k = VGG16 feature after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3        (k = 0..4, C_k = 64,128,256,512,512)
    n_k = f_k / (||f_k||_2 over channels + 1e-10)                 (unit-normalize every spatial position)
    d(x, y) = sum_k mean_{h,w} ( sum_c w_k[c] * (n_k(x) - n_k(y))[c, h, w]^2 )

with w_k the non-negative 1x1 conv weights of the five linear heads.

State dict (31 tensors), named so that the published weights load strictly:

* ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``: the conv layers of torchvision's
  ``vgg16().features`` with the same indices (ReLU and max-pool slots hold no parameters). The last max-pool
  (index 30) is not needed by LPIPS and is not built.
* ``lin{0..4}.model.1.weight`` [1, C_k, 1, 1]: the ``lpips`` package's ``NetLinLayer`` (index 0 is its Dropout, which
  is inactive in eval mode, the only mode in which LPIPS is used as a loss; here it is an Identity so the key index
  stays 1).
* The scaling-layer constants are non-persistent buffers: they are fixed numbers, not learned weights.

Weights are read only from local files given by the caller (:meth:`LPIPS.from_pretrained`); nothing downloads.
Accepted inputs, one or several files merged: a torchvision VGG16 state dict (its ``classifier.*`` head is dropped:
LPIPS does not use it), the ``lpips`` package's ``weights/v0.1/vgg.pth`` (the five ``lin*`` tensors), a full
``lpips.LPIPS`` module state dict (``net.slice{1..5}.{i}.*`` renamed to ``features.{i}.*``; ``scaling_layer.*`` checked
against the constants), or a single merged file in this module's own naming. Anything else raises.

Deviation from the ``lpips`` package (forward values are identical): the channel norm uses
``torch.linalg.vector_norm``, whose gradient at an all-zero feature vector is 0, where ``sqrt(sum(x**2))`` gives NaN.
ReLU features are exactly zero at many positions for small or flat images, so this matters for training.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Union

import torch
from torch import nn

from models.common.checkpoint import load_into, read_state_dict, strip_prefixes

PathLike = Union[str, os.PathLike]

# VGG16 configuration "D": conv widths, "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in vgg16().features of the ReLUs whose outputs LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's ScalingLayer: x in [-1, 1] -> (x - shift) / scale, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def _vgg16_features() -> nn.Sequential:
    """Modules 0..29 of torchvision's vgg16().features (same indices, so the same state-dict keys)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    assert len(layers) == TAPS[-1] + 1
    return nn.Sequential(*layers)


class _NetLin(nn.Module):
    """The lpips package's NetLinLayer: ``model`` = (Dropout, 1x1 conv C -> 1 without bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """f / (L2 norm over dim 1 + 1e-10), the lpips package's ``normalize_tensor`` with a NaN-free gradient."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG distance. Frozen (no parameter requires grad) and always in eval mode; gradients flow to the inputs.

    ``LPIPS()`` has randomly initialized weights (useful only for tests); use :meth:`from_pretrained` for the metric.

    forward(x, y): x, y [B, 3, H, W] RGB in [-1, 1], same shape (any float dtype; the network runs in the dtype of its
    weights, autocast applies). Returns the per-image distance [B] (fp32). Symmetric, 0 for identical inputs.
    H and W >= 16 keep every VGG stage non-empty (relu5_3 sits after four 2x2 max-pools).
    """

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _NetLin(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # A metric network: a parent's .train() must not switch it (the lpips package relies on eval-mode Dropout).
        return super().train(False)

    @classmethod
    def from_pretrained(cls, paths: Union[PathLike, Iterable[PathLike]]) -> "LPIPS":
        """An LPIPS network with weights read from local file(s) (safetensors, or torch.load(weights_only=True)).

        ``paths``: one path or several whose tensors are merged (e.g. a torchvision vgg16 state dict and the lpips
        ``vgg.pth``). The merged set must match this module's state dict exactly; see the module docstring for the
        accepted namings. Raises FileNotFoundError / ValueError on a missing file, a key seen twice, an unknown or
        missing key, or a shape mismatch.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise ValueError("LPIPS.from_pretrained: argument 'paths' is empty; give at least one local weight file")
        merged: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for p in paths:
            p = os.fspath(p)
            for k, v in lpips_state_dict(read_state_dict(p)).items():
                if k in merged:
                    raise ValueError(f"LPIPS.from_pretrained: key {k!r} appears in both {origin[k]!r} and {p!r}")
                merged[k], origin[k] = v, p
        model = cls()
        load_into(model, merged)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"LPIPS: argument '{name}' must be a floating-point tensor")
            if t.dim() != 4 or t.shape[1] != 3:
                raise ValueError(f"LPIPS: argument '{name}' must be [B, 3, H, W] RGB in [-1, 1], got {tuple(t.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: arguments 'x' and 'y' must have the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS: images must be at least 16x16 (four VGG max-pools), got {tuple(x.shape[-2:])}")
        B = x.shape[0]
        w = self.features[0].weight
        # One trunk pass over both images halves the number of kernel launches.
        h = (torch.cat([x, y]).to(w.dtype) - self.shift.to(w.dtype)) / self.scale.to(w.dtype)
        dist = x.new_zeros(B, dtype=torch.float32)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == TAPS[k]:
                fx, fy = h[:B], h[B:]
                d = (unit_normalize(fx) - unit_normalize(fy)) ** 2
                dist = dist + getattr(self, f"lin{k}")(d).float().mean(dim=(1, 2, 3))
                k += 1
                if k == len(TAPS):
                    break
        return dist


_LPIPS_FULL = re.compile(r"net\.slice[1-5]\.(\d+)\.(weight|bias)")


def lpips_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename one file's tensors into this module's naming (see the module docstring). Keys that are neither
    recognized nor dropped are passed through unchanged, so a strict load reports them."""
    out: dict[str, torch.Tensor] = {}
    for k, v in strip_prefixes(state_dict).items():
        if k.startswith("classifier."):  # torchvision vgg16's fully connected head: not part of LPIPS
            continue
        if k in ("scaling_layer.shift", "scaling_layer.scale"):
            ref = torch.tensor(SHIFT if k.endswith("shift") else SCALE)
            if v.numel() != 3 or not torch.allclose(v.float().flatten(), ref, atol=1e-6):
                raise ValueError(f"LPIPS: {k} = {v.flatten().tolist()} differs from the LPIPS constant {ref.tolist()}")
            continue
        m = _LPIPS_FULL.fullmatch(k)
        out[f"features.{m.group(1)}.{m.group(2)}" if m else k] = v
    return out
