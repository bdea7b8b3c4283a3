"""SA-1B-format data for Unpair-Seg stage 1 (spec §8 INPUT rows, §11.1), and ShapesWorld written in that format.

Layout (the SA-1B release, one folder)::

    <root>/<id>.jpg    the image (the name comes from the JSON's image.file_name when present)
    <root>/<id>.json   {"image": {"image_id", "width", "height", "file_name"},
                        "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str} (COCO compressed RLE),
                                         "bbox": [x, y, w, h], "area", "point_coords": [[x, y]], "predicted_iou",
                                         "stability_score", "crop_box"}, ...]}

Masks are decoded with pycocotools; images are read as stored (no EXIF rotation: SA-1B masks index the stored pixel
array, and a size disagreement with the RLE raises).

Sample of :class:`SA1BDataset` (a pure function of (seed, epoch, index); the trainer calls :meth:`set_epoch`), in the
order its random numbers are drawn:

1. **Area filter** on the original annotations: keep masks whose area / (h w) lies in ``[min_area_ratio,
   max_area_ratio]`` (``INPUT.MIN/MAX_AREA_RATIO``, 1e-4 / 0.8 for stage 1); the JSON's ``area`` is used, else the
   RLE's.
2. **LSJ** (Mask2Former's large-scale jitter, the detectron2 transforms of the official mapper): horizontal flip with
   probability ``flip_prob`` (0.5); ``ResizeScale``: a scale ``s ~ U[min_scale, max_scale]`` (0.8 / 1.2) of the
   canvas, the image resized by ``min(s S / h, s S / w)`` to ``round(h f) x round(w f)`` (PIL bilinear for the image,
   nearest for masks, both with the pixel-centre convention); ``FixedSizeCrop``: a random crop to at most S x S
   (offset ``round(u * (size - S))``, one ``u ~ U[0, 1]`` for both axes, as detectron2), then padding bottom/right to
   S x S with 128 (the inference pad value) for the image and 0 for masks. ``augment=False`` gives the inference
   geometry (scale 1, no flip: longest side to S, top-left, padded).
3. **At most** ``max_instances`` (40) masks: the filtered annotations in a random order, decoded and transformed until
   ``max_instances`` of them are non-empty on the canvas (masks that the crop empties are dropped); the kept masks are
   then put back in annotation order.
4. **Point prompts**: the canvas is cut into a ``points_per_side`` (10 x 10 = ``OVSEG.PTS_PER_SIDE``, 100) grid of
   cells; in each cell one pixel is drawn uniformly among the cell's pixels that some kept mask covers (a jittered grid
   restricted to annotated pixels, so each prompt has >= 1 target; the official sampling is unknown); a cell with no
   covered pixel gives an invalid (padding) prompt. The prompt is the pixel centre ``(col + 0.5, row + 0.5)`` in
   canvas pixels; its targets are the masks containing that pixel (``point_targets``).
5. **Box prompts**: one per kept mask, its tight box on the canvas, xyxy with an exclusive end (x1 = last column + 1),
   recomputed from the transformed mask (SA-1B's bbox field is the same box on the original image).

Sample dict (S = ``image_size``, T kept masks, P = points per side product)::

    image          uint8 [3, S, S]     canvas (content top-left, padding 128)
    masks          bool  [T, S, S]
    boxes          int64 [T, 4]        xyxy canvas pixels, end-exclusive
    points         int64 [P, 2]        (col, row) of the prompt pixels (-1 for invalid prompts)
    point_valid    bool  [P]
    point_targets  bool  [P, T]        mask t contains point p
    ann_ids        int64 [T]           the annotations' "id"
    image_id       int64 []            image.image_id (else the index)
    size           int64 [2]           (h, w) of the content on the canvas after resizing (before cropping)

Coordinates stay integers so that the trainer's bf16 cast of floating tensors does not round them (bf16 steps are
8 px at 1024); :func:`prompt_points` and :func:`prompt_boxes` turn them into float prompts. :func:`collate` pads a
batch to the largest T (at least 1) and adds ``mask_valid`` [N, T], ``box_targets`` [N, T] (the box of mask t
prompts for mask t; -1 = padding) and zero-filled padding (``boxes`` of padding are ``(0, 0, 4, 4)``, a harmless
prompt whose outputs get no loss).

ShapesWorld in the SA-1B format (:func:`write_shapes_sa1b`)
-----------------------------------------------------------
Scene ``i`` of a world becomes ``sa_<i>.jpg`` (the render rounded to uint8, JPEG quality 95 without chroma
subsampling) and ``sa_<i>.json``. Granularity scheme, two nested levels so that the many-to-many matching is exercised:

* level 0: every object's visible instance mask (non-empty), id ``64 i + j`` for object ``j``;
* level 1: for every group of >= 2 objects whose visible masks touch (4-adjacent pixels; occluding objects always
  touch), i.e. every connected component of the touch graph with >= 2 members, the union of their masks, ids
  ``64 i + 32 + g`` in the order of each group's smallest object index.

So a point inside an object of a group has 2 targets (the object, the group), any other object point has 1. The
extra annotation key ``"shapes": {"level", "objects"}`` records this (the loader ignores it). ``point_coords`` is the
centre of the mask pixel farthest from the mask boundary, ``predicted_iou`` and ``stability_score`` are 1.
:func:`shapes_sa1b_cache` writes such a folder once (atomically, keyed by the world and the scene range) for the
embedded default data of ``python -m train.unpair_seg --stage 1`` without ``--data``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

PathLike = Union[str, os.PathLike]
PAD_VALUE = 128
ID_STRIDE = 64  # annotation ids 64 * scene + k (<= 24 objects, groups from 32)
GROUP_BASE = 32
CACHE_VERSION = 1
MANIFEST = ".manifest.json"  # a dotfile: the loader lists only visible <id>.json files


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"SA1BDataset: '{name}' must be an int >= {lo}, got {value!r}")
    return int(value)


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


def decode_rle(segmentation: dict) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": str | bytes}`` -> bool [h, w]."""
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ValueError(f"decode_rle: 'segmentation' must be a COCO RLE dict with 'size' and 'counts', got "
                         f"{type(segmentation).__name__}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        rle = _mask_utils().frPyObjects(segmentation, *segmentation["size"])
    else:
        rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools' Cython decoder trips numpy 2's __array__(copy=...) deprecation on every call; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _mask_utils().decode(rle).astype(bool)


def encode_rle(mask: np.ndarray) -> dict:
    """bool [h, w] -> the SA-1B segmentation dict (compressed RLE, counts as str)."""
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------------------------------
# LSJ geometry


@dataclasses.dataclass(frozen=True)
class LSJGeometry:
    """One draw of the LSJ transform of an (h, w) image onto an S x S canvas: ``flip``, the resized size
    (``new_h``, ``new_w``), the crop offset (``top``, ``left``) into the resized image; the content occupies canvas
    rows ``[0, min(new_h - top, S))`` and columns likewise."""

    height: int
    width: int
    canvas: int
    flip: bool
    new_h: int
    new_w: int
    top: int
    left: int

    @classmethod
    def draw(cls, height: int, width: int, canvas: int, rng: Optional[np.random.Generator], min_scale: float = 0.8,
             max_scale: float = 1.2, flip_prob: float = 0.5) -> "LSJGeometry":
        """The module docstring's LSJ with ``rng`` (None: the deterministic inference geometry)."""
        if rng is None:
            flip, scale, u = False, 1.0, 0.0
        else:
            flip = bool(rng.uniform() < flip_prob)
            scale = float(rng.uniform(min_scale, max_scale))
            u = None
        f = min(scale * canvas / height, scale * canvas / width)
        new_h, new_w = max(1, int(np.round(height * f))), max(1, int(np.round(width * f)))
        if u is None:
            u = float(rng.uniform(0.0, 1.0))
        top = int(np.round(max(new_h - canvas, 0) * u))
        left = int(np.round(max(new_w - canvas, 0) * u))
        return cls(height, width, canvas, flip, new_h, new_w, top, left)

    @property
    def content(self) -> tuple[int, int]:
        """(rows, cols) of the canvas the image covers."""
        return min(self.new_h - self.top, self.canvas), min(self.new_w - self.left, self.canvas)

    def source_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Nearest-neighbour source rows [rows] and columns [cols] of the content pixels (pixel centres: output pixel
        ``r`` of the resized image reads source row ``floor((r + 0.5) h / new_h)``, PIL's NEAREST up to its float
        rounding at exact ties), flip included."""
        rows_c, cols_c = self.content
        r = np.arange(self.top, self.top + rows_c)
        c = np.arange(self.left, self.left + cols_c)
        # Integer arithmetic: exact at ties, where PIL's float rounding picks either neighbour.
        src_r = np.minimum((2 * r + 1) * self.height // (2 * self.new_h), self.height - 1)
        src_c = np.minimum((2 * c + 1) * self.width // (2 * self.new_w), self.width - 1)
        if self.flip:
            src_c = self.width - 1 - src_c
        return src_r, src_c

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [h, w, 3] -> uint8 [S, S, 3]: flip, PIL bilinear resize, crop, pad 128."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"LSJGeometry.apply_image: expected an image of {(self.height, self.width)}, got "
                             f"{image.shape[:2]}")
        img = image[:, ::-1] if self.flip else image
        pil = Image.fromarray(np.ascontiguousarray(img))
        if (self.new_h, self.new_w) != (self.height, self.width):
            pil = pil.resize((self.new_w, self.new_h), Image.Resampling.BILINEAR)
        arr = np.asarray(pil)
        rows_c, cols_c = self.content
        out = np.full((self.canvas, self.canvas, 3), PAD_VALUE, dtype=np.uint8)
        out[:rows_c, :cols_c] = arr[self.top:self.top + rows_c, self.left:self.left + cols_c]
        return out

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        """bool [T, h, w] -> bool [T, S, S]: the same geometry with nearest-neighbour sampling, padding False."""
        if masks.shape[-2:] != (self.height, self.width):
            raise ValueError(f"LSJGeometry.apply_masks: expected masks of {(self.height, self.width)}, got "
                             f"{masks.shape[-2:]}")
        src_r, src_c = self.source_index()
        out = np.zeros((masks.shape[0], self.canvas, self.canvas), dtype=bool)
        out[:, :len(src_r), :len(src_c)] = masks[:, src_r][:, :, src_c]
        return out


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (end-exclusive) of bool masks [T, H, W] -> int64 [T, 4]; an empty mask gives (0, 0, 0, 0)."""
    t = masks.shape[0]
    out = np.zeros((t, 4), dtype=np.int64)
    if t == 0:
        return out
    rows, cols = masks.any(2), masks.any(1)
    for k in range(t):
        r, c = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        if len(r):
            out[k] = (c[0], r[0], c[-1] + 1, r[-1] + 1)
    return out


def grid_points(masks: np.ndarray, points_per_side: tuple[int, int],
                rng: Optional[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """The jittered, coverage-restricted point grid of the module docstring: bool masks [T, S, S] ->
    (points int64 [nx * ny, 2] (col, row), -1 where invalid; valid bool [nx * ny]); cells row-major (x fastest).
    ``rng`` None takes the covered pixel closest to each cell's centre (deterministic)."""
    nx, ny = points_per_side
    h, w = masks.shape[-2:]
    covered = masks.any(0) if masks.shape[0] else np.zeros((h, w), dtype=bool)
    pts = np.full((nx * ny, 2), -1, dtype=np.int64)
    valid = np.zeros(nx * ny, dtype=bool)
    ys, xs = np.linspace(0, h, ny + 1).astype(np.int64), np.linspace(0, w, nx + 1).astype(np.int64)
    for iy in range(ny):
        for ix in range(nx):
            cell = covered[ys[iy]:ys[iy + 1], xs[ix]:xs[ix + 1]]
            idx = np.flatnonzero(cell)
            if not len(idx):
                continue
            if rng is None:
                rr, cc = np.divmod(idx, cell.shape[1])
                d = (rr + 0.5 - cell.shape[0] / 2) ** 2 + (cc + 0.5 - cell.shape[1] / 2) ** 2
                pick = idx[int(np.argmin(d))]
            else:
                pick = idx[int(rng.integers(len(idx)))]
            r, c = divmod(int(pick), cell.shape[1])
            k = iy * nx + ix
            pts[k] = (xs[ix] + c, ys[iy] + r)
            valid[k] = True
    return pts, valid


# ---------------------------------------------------------------------------------------------------------------------
# Dataset


class SA1BDataset(torch.utils.data.Dataset):
    """SA-1B images + masks for stage-1 training (module docstring).

    Args:
        root: the folder of ``<id>.jpg`` + ``<id>.json`` files (every ``*.json`` in it, sorted by name, is an image).
        image_size: the canvas side S (1024 official).
        min_scale, max_scale, flip_prob: LSJ (0.8 / 1.2 / 0.5); ``augment=False`` disables LSJ (inference geometry).
        min_area_ratio, max_area_ratio: the mask area filter (1e-4 / 0.8, stage 1).
        max_instances: masks per image (40).
        points_per_side: the prompt grid (10, 10).
        seed: samples depend only on (seed, epoch, index).
        ids: optional list of ids (file stems) to use instead of every JSON in ``root``.
    """

    def __init__(self, root: PathLike, image_size: int = 1024, *, min_scale: float = 0.8, max_scale: float = 1.2,
                 flip_prob: float = 0.5, min_area_ratio: float = 1e-4, max_area_ratio: float = 0.8,
                 max_instances: int = 40, points_per_side: Sequence[int] = (10, 10), augment: bool = True,
                 seed: int = 0, ids: Optional[Sequence[str]] = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"SA1BDataset: 'root' must be a folder of SA-1B <id>.jpg + <id>.json files, got {root!r}")
        self.root = root
        self.image_size = _check_int("image_size", image_size, 8)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"SA1BDataset: need 0 < min_scale <= max_scale, got {min_scale!r}, {max_scale!r}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"SA1BDataset: 'flip_prob' must be in [0, 1], got {flip_prob!r}")
        if not 0 <= min_area_ratio <= max_area_ratio <= 1:
            raise ValueError(f"SA1BDataset: need 0 <= min_area_ratio <= max_area_ratio <= 1, got "
                             f"{min_area_ratio!r}, {max_area_ratio!r}")
        self.max_instances = _check_int("max_instances", max_instances, 1)
        pps = tuple(points_per_side)
        if len(pps) != 2:
            raise ValueError(f"SA1BDataset: 'points_per_side' must be two ints (nx, ny), got {points_per_side!r}")
        self.points_per_side = (_check_int("points_per_side", pps[0], 1), _check_int("points_per_side", pps[1], 1))
        self.min_scale, self.max_scale, self.flip_prob = float(min_scale), float(max_scale), float(flip_prob)
        self.min_area_ratio, self.max_area_ratio = float(min_area_ratio), float(max_area_ratio)
        self.augment = bool(augment)
        self.seed = _check_int("seed", seed, 0)
        if ids is None:
            ids = sorted(f[:-5] for f in os.listdir(root) if f.endswith(".json") and not f.startswith("."))
        self.ids = [str(i) for i in ids]
        if not self.ids:
            raise ValueError(f"SA1BDataset: no <id>.json annotation files in {root!r}")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Samples of epoch ``epoch`` (the trainer calls this before each epoch)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def read(self, index: int) -> tuple[np.ndarray, dict]:
        """(uint8 image [h, w, 3], the parsed JSON) of item ``index``."""
        stem = self.ids[index]
        with open(os.path.join(self.root, stem + ".json")) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or "annotations" not in meta:
            raise ValueError(f"SA1BDataset: {stem}.json must hold 'image' and 'annotations'")
        info = meta.get("image") or {}
        name = info.get("file_name") or stem + ".jpg"
        path = os.path.join(self.root, os.path.basename(name))
        if not os.path.isfile(path):
            raise ValueError(f"SA1BDataset: the image {path!r} of {stem}.json does not exist")
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = image.shape[:2]
        if ("height" in info and int(info["height"]) != h) or ("width" in info and int(info["width"]) != w):
            raise ValueError(f"SA1BDataset: {path!r} is {h} x {w} but {stem}.json says "
                             f"{info.get('height')} x {info.get('width')}")
        return image, meta

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index)]))

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise IndexError(f"SA1BDataset: index {index!r} out of range [0, {len(self)})")
        image, meta = self.read(int(index))
        h, w = image.shape[:2]
        rng = self.rng(int(index)) if self.augment else None
        S = self.image_size
        geo = LSJGeometry.draw(h, w, S, rng, self.min_scale, self.max_scale, self.flip_prob)
        anns = []
        for a in meta["annotations"]:
            seg = a.get("segmentation")
            if not isinstance(seg, dict) or list(seg.get("size", [])) != [h, w]:
                got = seg.get("size") if isinstance(seg, dict) else None
                raise ValueError(f"SA1BDataset: annotation {a.get('id')} of {self.ids[index]}.json must have a COCO "
                                 f"RLE of size [{h}, {w}], got {got}")
            area = a.get("area")
            if area is None:
                area = float(decode_rle(seg).sum())
            if self.min_area_ratio <= float(area) / (h * w) <= self.max_area_ratio:
                anns.append(a)
        order = rng.permutation(len(anns)) if rng is not None else np.arange(len(anns))
        kept, kept_masks = [], []
        for k in order:
            m = geo.apply_masks(decode_rle(anns[k]["segmentation"])[None])[0]
            if m.any():
                kept.append(int(k))
                kept_masks.append(m)
                if len(kept) == self.max_instances:
                    break
        back = np.argsort(kept, kind="stable")
        masks = np.stack([kept_masks[i] for i in back]) if kept else np.zeros((0, S, S), dtype=bool)
        ann_ids = np.array([int(anns[kept[i]].get("id", kept[i])) for i in back], dtype=np.int64)
        points, valid = grid_points(masks, self.points_per_side, rng)
        rows = np.where(valid, points[:, 1], 0)
        cols = np.where(valid, points[:, 0], 0)
        member = masks[:, rows, cols].T & valid[:, None] if len(masks) else np.zeros((len(points), 0), dtype=bool)
        img = geo.apply_image(image)
        info = meta.get("image") or {}
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "masks": torch.from_numpy(masks), "boxes": torch.from_numpy(mask_boxes(masks)),
                "points": torch.from_numpy(points), "point_valid": torch.from_numpy(valid),
                "point_targets": torch.from_numpy(np.ascontiguousarray(member)),
                "ann_ids": torch.from_numpy(ann_ids),
                "image_id": torch.tensor(int(info.get("image_id", index)), dtype=torch.long),
                "size": torch.tensor([geo.new_h, geo.new_w], dtype=torch.long)}


def collate(samples: Sequence[dict]) -> dict:
    """Batch :class:`SA1BDataset` samples, padding masks to the largest T of the batch (at least 1): adds
    ``mask_valid`` [N, T] and ``box_targets`` [N, T] (t for a real mask, -1 for padding); see the module docstring."""
    if not samples:
        raise ValueError("collate: 'samples' must be a non-empty list of SA1BDataset samples")
    n = len(samples)
    S = samples[0]["image"].shape[-1]
    p = samples[0]["points"].shape[0]
    t = max(1, max(int(s["masks"].shape[0]) for s in samples))
    masks = torch.zeros(n, t, S, S, dtype=torch.bool)
    valid = torch.zeros(n, t, dtype=torch.bool)
    boxes = torch.tensor([0, 0, 4, 4], dtype=torch.long).repeat(n, t, 1)
    member = torch.zeros(n, p, t, dtype=torch.bool)
    ann_ids = torch.full((n, t), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        if s["image"].shape[-1] != S or s["points"].shape[0] != p:
            raise ValueError("collate: every sample must have the same canvas size and number of points")
        k = s["masks"].shape[0]
        masks[i, :k] = s["masks"]
        valid[i, :k] = True
        boxes[i, :k] = s["boxes"]
        member[i, :, :k] = s["point_targets"]
        ann_ids[i, :k] = s["ann_ids"]
    box_targets = torch.where(valid, torch.arange(t).expand(n, t), torch.full((n, t), -1, dtype=torch.long))
    return {"image": torch.stack([s["image"] for s in samples]), "masks": masks, "mask_valid": valid,
            "boxes": boxes, "box_targets": box_targets, "points": torch.stack([s["points"] for s in samples]),
            "point_valid": torch.stack([s["point_valid"] for s in samples]), "point_targets": member,
            "ann_ids": ann_ids, "image_id": torch.stack([s["image_id"] for s in samples]),
            "size": torch.stack([s["size"] for s in samples])}


def prompt_points(points: torch.Tensor) -> torch.Tensor:
    """Integer prompt pixels [..., 2] (col, row) -> float32 canvas coordinates of their centres (x + 0.5, y + 0.5);
    invalid (-1) entries become (0.5, 0.5), a harmless prompt whose outputs get no loss."""
    return points.clamp(min=0).float() + 0.5


def prompt_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Integer end-exclusive boxes [..., 4] -> float32 xyxy canvas coordinates (the pixel-edge box)."""
    return boxes.float()


# ---------------------------------------------------------------------------------------------------------------------
# ShapesWorld -> SA-1B


def _touch_groups(instance: np.ndarray, n: int) -> list[list[int]]:
    """Connected components (>= 2 objects) of the graph of objects whose visible masks are 4-adjacent; object
    indices 0-based, each group sorted, groups ordered by their smallest member."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in ((instance[:, :-1], instance[:, 1:]), (instance[:-1], instance[1:])):
        sel = (a > 0) & (b > 0) & (a != b)
        for x, y in set(zip(a[sel].tolist(), b[sel].tolist())):
            ra, rb = find(x - 1), find(y - 1)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for j in range(n):
        comps.setdefault(find(j), []).append(j)
    return sorted((sorted(c) for c in comps.values() if len(c) >= 2), key=lambda c: c[0])


def _inner_point(mask: np.ndarray) -> list[float]:
    import cv2

    d = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return [float(c) + 0.5, float(r) + 0.5]


def shapes_annotations(scene, index: int) -> list[dict]:
    """The SA-1B annotations of a ShapesWorld scene (granularity scheme of the module docstring)."""
    h, w = scene.height, scene.width
    out = []

    def add(ann_id: int, mask: np.ndarray, level: int, objects: list[int]):
        seg = encode_rle(mask)
        x0, y0, x1, y1 = mask_boxes(mask[None])[0].tolist()
        out.append({"id": int(ann_id), "segmentation": seg, "bbox": [float(x0), float(y0), float(x1 - x0),
                                                                         float(y1 - y0)],
                    "area": int(mask.sum()), "predicted_iou": 1.0, "stability_score": 1.0,
                    "point_coords": [_inner_point(mask)], "crop_box": [0.0, 0.0, float(w), float(h)],
                    "shapes": {"level": level, "objects": objects}})

    masks = scene.masks
    for j in range(len(scene.specs)):
        if masks[j].any():
            add(ID_STRIDE * index + j, masks[j], 0, [j])
    for g, group in enumerate(_touch_groups(scene.instance, len(scene.specs))):
        add(ID_STRIDE * index + GROUP_BASE + g, masks[group].any(0), 1, group)
    return out


def write_shapes_sa1b(world, indices: Sequence[int], root: PathLike, *, quality: int = 95) -> list[str]:
    """Write scenes ``indices`` of ShapesWorld ``world`` as SA-1B files ``sa_<i>.jpg`` + ``sa_<i>.json`` in ``root``
    (created); returns the ids written. See the module docstring for the masks."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    ids = []
    for i in indices:
        i = int(i)
        scene = world.scene(i)
        stem = f"sa_{i}"
        img = np.clip(np.round(scene.image * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, stem + ".jpg"), quality=quality, subsampling=0)
        meta = {"image": {"image_id": i, "width": scene.width, "height": scene.height, "file_name": stem + ".jpg"},
                "annotations": shapes_annotations(scene, i)}
        with open(os.path.join(root, stem + ".json"), "w") as f:
            json.dump(meta, f)
        ids.append(stem)
    return ids


def shapes_sa1b_cache(world, indices: Sequence[int], root: PathLike) -> str:
    """``root`` holding the SA-1B files of ``world``'s scenes ``indices``, written unless a complete copy for the same
    world and scenes is there (``.manifest.json``); the files are written to a temporary sibling folder and renamed,
    so a concurrent reader never sees a partial folder. Call on one process (rank 0) and synchronise."""
    root = os.fspath(root)
    key = {"version": CACHE_VERSION, "world": {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in dataclasses.asdict(world).items()},
           "indices": [int(i) for i in indices]}
    manifest = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f) == json.loads(json.dumps(key)):
                return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(root)}-{uuid.uuid4().hex[:8]}")
    write_shapes_sa1b(world, key["indices"], tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(key, f)
    if os.path.isdir(root):
        trash = os.path.join(parent, f".trash-{os.path.basename(root)}-{uuid.uuid4().hex[:8]}")
        os.replace(root, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, root)
    return root


__all__ = ["SA1BDataset", "collate", "LSJGeometry", "decode_rle", "encode_rle", "mask_boxes", "grid_points",
           "prompt_points", "prompt_boxes", "write_shapes_sa1b", "shapes_annotations", "shapes_sa1b_cache"]
