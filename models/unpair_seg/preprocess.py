"""Unpair-Seg pre-processing: the official demo's image path and point grid (../shared/specs/unpair_seg.md §7.1-7.2),
without detectron2.

Image path (the official ``demo/predictor.py`` + ``UniOVSeg_S1.preprosses_image``):

1. :func:`read_image`: PIL open, EXIF orientation applied, RGB, uint8 [H, W, 3] (detectron2 ``read_image(.., "RGB")``).
2. :func:`resize_longest`: detectron2 ``ResizeShortestEdge(size, max_size=size)``, i.e. the longest side becomes
   ``size`` (sizes from :func:`output_shape`, detectron2's float arithmetic), resized with PIL bilinear on uint8 (PIL
   antialiases when it downscales).
3. :func:`pad_to_canvas`: detectron2 ``FixedSizeCrop((size, size))`` on an image that is never larger than the canvas:
   the content at the top-left, the rest filled with 128 (its default pad value, before normalisation).
4. :func:`prepare`: the official ``batched_inputs`` entry ``{"image": uint8 [3, S, S], "height": H, "width": W}``
   with the ORIGINAL size (the model normalises, pads to ``size_divisibility`` and post-processes back to H x W).

Coordinates: prompts enter the model in canvas pixels. The official grid maps the original image's extent onto the
canvas with ``r = (S - 1) / max(W - 1, H - 1)`` (``scaled_sizes = (W - 1, H - 1) * r``, so the grid's last points sit
at pixel index ``W - 1`` / ``H - 1`` of the content, i.e. canvas ``(W - 1) * r <= S - 1``). :func:`to_canvas` /
:func:`from_canvas` use the same scale for user points and boxes given in original pixels, so a user point and the
grid point at the same place of the image become the same canvas point. (This is an "index" mapping, x_c = x * r; the
resize's own pixel-centre mapping, (x + 0.5) * S / max(W, H) - 0.5, differs from it by less than one canvas pixel.)
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"'{name}' must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"'{name}' must be >= 1, got {v}")
    return int(v)


def _check_image(name: str, img) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3] (numpy); torch uint8 [H, W, 3] tensors are accepted and converted."""
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    if not isinstance(img, np.ndarray):
        raise TypeError(f"'{name}' must be a numpy array (or tensor) uint8 [H, W, 3], got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"'{name}' must be uint8 [H, W, 3] (RGB 0..255), got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"'{name}' must have shape [H, W, 3] with H, W >= 1, got {tuple(img.shape)}")
    return img


# ---------------------------------------------------------------------------------------------------------------------
# Image path


def read_image(path: PathLike) -> np.ndarray:
    """The image at ``path`` as RGB uint8 [H, W, 3], its EXIF orientation applied (a rotated phone photo comes out
    upright, as detectron2's ``read_image`` returns it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_image: {path!r} does not exist")
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.array(im.convert("RGB"), dtype=np.uint8)


def output_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) of detectron2 ``ResizeShortestEdge(size, max_size=size)`` for an ``height`` x ``width``
    image: scale the short side to ``size``; if the long side then exceeds ``size``, rescale (the already scaled
    sizes) so that the long side is ``size``; round each with int(v + 0.5). Detectron2's exact float arithmetic,
    so the sizes match it bit for bit (the long side always comes out ``size``)."""
    h, w, s = _positive_int("height", height), _positive_int("width", width), _positive_int("size", size)
    scale = s * 1.0 / min(h, w)
    if h < w:
        newh, neww = s * 1.0, scale * w
    else:
        newh, neww = scale * h, s * 1.0
    if max(newh, neww) > s:
        scale = s * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_longest(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h', w', 3] with (h', w') = :func:`output_shape` (longest side ``size``), PIL
    bilinear on uint8 as detectron2's ResizeTransform (an image already at that size is returned as a copy)."""
    img = _check_image("img", img)
    newh, neww = output_shape(img.shape[0], img.shape[1], size)
    if (newh, neww) == img.shape[:2]:
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((neww, newh), Image.Resampling.BILINEAR), dtype=np.uint8)


def pad_to_canvas(img: np.ndarray, size: int, value: int = 128) -> np.ndarray:
    """uint8 [h, w, 3] with h, w <= ``size`` -> uint8 [size, size, 3]: ``img`` at the top-left, ``value`` elsewhere."""
    img = _check_image("img", img)
    size = _positive_int("size", size)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
        raise ValueError(f"'value' must be an int in 0..255, got {value!r}")
    h, w = img.shape[:2]
    if h > size or w > size:
        raise ValueError(f"pad_to_canvas: 'img' of {h}x{w} does not fit a {size}x{size} canvas (resize it first)")
    canvas = np.full((size, size, 3), int(value), dtype=np.uint8)
    canvas[:h, :w] = img
    return canvas


def prepare(img: np.ndarray, size: int) -> dict:
    """The official ``batched_inputs`` entry of an original RGB uint8 [H, W, 3] image: ``{"image": uint8 tensor
    [3, size, size] (resized, padded canvas), "height": H, "width": W}``."""
    img = _check_image("img", img)
    canvas = pad_to_canvas(resize_longest(img, size), size)
    return {"image": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))),
            "height": int(img.shape[0]), "width": int(img.shape[1])}


# ---------------------------------------------------------------------------------------------------------------------
# Coordinates


def canvas_scale(height: int, width: int, size: int = 1024) -> float:
    """The official ratio r = (size - 1) / max(W - 1, H - 1) from original pixels to canvas pixels, rounded as the
    official code computes it: ``1023.0 / sizes.amax()`` on an int64 tensor is ``Tensor.__rdiv__``, i.e.
    ``reciprocal() * 1023.0``, two float32 roundings (a direct fp32 division differs by one ulp for ~1 in 4 sizes).
    Needs max(H, W) >= 2."""
    h, w, s = _positive_int("height", height), _positive_int("width", width), _positive_int("size", size)
    if max(h, w) < 2:
        raise ValueError(f"canvas_scale: a {h}x{w} image has no extent (max(H, W) must be >= 2: the official ratio "
                         f"(size - 1) / max(W - 1, H - 1) divides by zero)")
    return float(torch.tensor(max(w, h) - 1, dtype=torch.int64).reciprocal() * float(s - 1))


def _scaled_sizes(height: int, width: int, size: int) -> torch.Tensor:
    """float32 [2]: (W - 1, H - 1) * r, the official ``scaled_sizes`` (int64 sizes times a float32 ratio)."""
    r = torch.tensor(canvas_scale(height, width, size), dtype=torch.float32)
    return torch.tensor([width - 1, height - 1], dtype=torch.int64) * r


def point_grid(n_x: int, n_y: int, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """The official inference grid in canvas pixels: float32 [n_x * n_y, 2] (x, y), x varying fastest.

    Per axis ``linspace(1/(2n), 1 - 1/(2n), n)`` (float32), meshgrid with "xy" indexing, times the official
    ``scaled_sizes = (W - 1, H - 1) * (size - 1) / max(W - 1, H - 1)`` of the ORIGINAL image (``height`` x
    ``width``), so the grid covers the image content and not the padding (spec §7.2, §12.7).
    """
    n_x, n_y = _positive_int("n_x", n_x), _positive_int("n_y", n_y)
    scaled = _scaled_sizes(height, width, size)
    ox, oy = 1 / (2 * n_x), 1 / (2 * n_y)
    xs = torch.linspace(ox, 1 - ox, n_x)
    ys = torch.linspace(oy, 1 - oy, n_y)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")  # [n_y, n_x] each
    grid = torch.stack([gx, gy], dim=-1).reshape(-1, 2)
    return grid * scaled


def _check_coords(name: str, coords) -> torch.Tensor:
    if isinstance(coords, np.ndarray):
        coords = torch.from_numpy(coords)
    if isinstance(coords, (list, tuple)):
        coords = torch.tensor(coords, dtype=torch.float32)
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"'{name}' must be a tensor [..., 2] (x, y) or [..., 4] (x0, y0, x1, y1), got "
                        f"{type(coords).__name__}")
    if coords.dim() < 1 or coords.shape[-1] not in (2, 4):
        raise ValueError(f"'{name}' must have last dim 2 (x, y) or 4 (x0, y0, x1, y1), got shape "
                         f"{tuple(coords.shape)}")
    if not (coords.is_floating_point() or coords.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"'{name}' must be a real (float or int) tensor, got {coords.dtype}")
    coords = coords.to(torch.float32) if not coords.is_floating_point() else coords
    if not bool(torch.isfinite(coords).all()):
        raise ValueError(f"'{name}' must be finite")
    return coords


def to_canvas(coords, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """Points [..., 2] (x, y) or boxes [..., 4] (x0, y0, x1, y1) in pixels of the ORIGINAL ``height`` x ``width``
    image -> canvas pixels (times :func:`canvas_scale`, the grid's scale; module docstring). Float, same shape."""
    coords = _check_coords("coords", coords)
    return coords * canvas_scale(height, width, size)


def from_canvas(coords, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """The inverse of :func:`to_canvas`: canvas pixels -> pixels of the original image."""
    coords = _check_coords("coords", coords)
    return coords / canvas_scale(height, width, size)


def check_boxes(name: str, boxes: torch.Tensor) -> torch.Tensor:
    """Boxes [..., 4] xyxy with x1 >= x0 and y1 >= y0 (degenerate boxes are allowed; the official encoder accepts
    them), else ValueError."""
    boxes = _check_coords(name, boxes)
    if boxes.shape[-1] != 4:
        raise ValueError(f"'{name}' must be boxes [..., 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    if bool((boxes[..., 2] < boxes[..., 0]).any() | (boxes[..., 3] < boxes[..., 1]).any()):
        raise ValueError(f"'{name}' must be xyxy boxes with x1 >= x0 and y1 >= y0")
    return boxes


def parse_pairs(text: str, arity: int, name: str) -> list[Sequence[float]]:
    """"x,y;x,y" (arity 2) or "x0,y0,x1,y1;..." (arity 4) -> list of float tuples (for the CLI)."""
    out = []
    for item in str(text).replace(" ", "").split(";"):
        if not item:
            continue
        parts = item.split(",")
        if len(parts) != arity:
            raise ValueError(f"{name}: expected {arity} comma-separated numbers per item, got {item!r}")
        try:
            out.append(tuple(float(p) for p in parts))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not {arity} numbers") from None
    if not out:
        raise ValueError(f"{name}: no items in {text!r}")
    return out
