"""Evaluation data for open-vocabulary segmentation: label-PNG semantic datasets with a class-name file, COCO-panoptic
JSON + PNG, and ShapesWorld writers of both formats.

Semantic segmentation (:class:`SemanticSegDataset`)
---------------------------------------------------
Images in ``image_dir`` (searched recursively), one label file per image in ``label_dir`` at the same relative path,
with the image's ``image_suffix`` replaced by ``label_suffix``. The class-name file has one class per line, in label
order, synonyms separated by commas ("person, child, girl"); blank lines are skipped (:func:`read_class_file`).

Label conventions (``label_format``, values read from the file as stored: 8-bit "L"/"P" PNGs, 16-bit "I;16"
PNG/TIFF, 32-bit "I"):

* ``"index"``: a pixel holds its class index ``0..K-1``; ``file_ignore`` (default: 255 for 8-bit files, 65535 for
  16-bit ones) marks unlabelled pixels. This is the layout of detectron2's prepared datasets: ADE20K-150
  ``annotations_detectron2`` (uint8, 255), ADE20K-847 (``ADE20K_2021_17_01/annotations_detectron2``, uint16 ``.tif``,
  65535), PASCAL-Context-59 (uint8, 255) and -459 (uint16 ``.tif``, 65535), Cityscapes ``*_gtFine_labelTrainIds.png``
  (19 train ids, 255).
* ``"reduce_zero"``: the raw ADE20K-150 ``annotations/*.png`` (and other "0 = other" files): value 0 is ignored and
  ``v`` becomes class ``v - 1`` (mmseg's ``reduce_zero_label``; ``file_ignore`` stays ignored too).

``preset`` picks the suffixes and the convention of a known layout (:data:`PRESETS`); explicit arguments override it.
Items carry labels as int64 with ``dataset.ignore_label`` on unlabelled pixels: 255 when K <= 255, else 65535 (255 is
a class of ADE-847), unless given. A label outside ``0..K-1`` that is not ignored raises, naming the file.

COCO panoptic (:class:`COCOPanopticDataset`)
--------------------------------------------
``json_path`` (the ``panoptic_<split>.json`` with "images", "annotations", "categories"), ``png_dir`` (the segment-id
PNGs, id = R + 256 G + 256^2 B, :func:`rgb2id`) and ``image_dir``. Categories keep the JSON order, which defines the
contiguous class index; ``isthing`` per category. Items: the image, ``pan`` [H, W] int64 segment ids (0 = VOID), the
annotation's ``segments_info`` and ids.

ShapesWorld writers
-------------------
:func:`write_shapes_semantic`: semantic classes = the ShapesWorld categories in :data:`train.data.shapes.CATEGORIES`
order; ``background="class"`` (default) adds "background" as the last class (a stuff class, as ADE's "wall"/"sky":
every pixel is labelled, so the model must also find the background), ``background="ignore"`` labels it 255 (only the
shapes are scored). Layout::

    root/classes.txt                         one class per line
    root/images/<split>/<name>.png           RGB renders (round(255 x), lossless)
    root/annotations/<split>/<name>.png      uint8 "index" labels

:func:`write_shapes_panoptic`: things = the shape categories (ids 1..6, COCO-style 1-based), stuff = "background"
(id 7); every object with visible pixels is a thing segment (segment id = its instance id, object index + 1), the
background a stuff segment with id :data:`BACKGROUND_SEGMENT_ID`; no VOID, no crowd. The detectron2 COCO layout::

    root/annotations/panoptic_<split>.json   images, annotations (segments_info with area, bbox, iscrowd), categories
    root/panoptic_<split>/<name>.png         segment ids as RGB (id2rgb)
    root/<split>/<name>.png                  RGB renders

Names are ``shapes_<scene index:08d>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .shapes import CATEGORIES, Scene, ShapesWorld

PathLike = Union[str, os.PathLike]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
LABEL_FORMATS = ("index", "reduce_zero")
PRESETS = {
    "ade20k_150": {"label_format": "index", "label_suffix": ".png"},  # detectron2's annotations_detectron2
    "ade20k_150_raw": {"label_format": "reduce_zero", "label_suffix": ".png"},  # ADEChallengeData2016/annotations
    "ade20k_847": {"label_format": "index", "label_suffix": ".tif"},  # uint16, 65535 ignore
    "pascal_context_59": {"label_format": "index", "label_suffix": ".png"},
    "pascal_context_459": {"label_format": "index", "label_suffix": ".tif"},  # uint16, 65535 ignore
    "cityscapes": {"label_format": "index", "image_suffix": "_leftImg8bit.png",
                   "label_suffix": "_gtFine_labelTrainIds.png"},
}
BACKGROUND = "background"
BACKGROUND_SEGMENT_ID = 100  # above any ShapesWorld instance id (at most 24 objects)

__all__ = ["SemanticSegDataset", "COCOPanopticDataset", "read_class_file", "write_class_file", "read_label",
           "rgb2id", "id2rgb", "write_shapes_semantic", "write_shapes_panoptic", "shapes_semantic_classes",
           "shapes_panoptic_categories", "PRESETS", "LABEL_FORMATS", "BACKGROUND_SEGMENT_ID"]


# ---------------------------------------------------------------------------------------------------------------------
# Files


def read_class_file(path: PathLike) -> list[str]:
    """Class names, one per non-blank line, stripped (a line may hold comma-separated synonyms)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_class_file: {str(path)!r} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"read_class_file: {str(path)!r} holds no class names")
    for n in names:
        if not any(p.strip() for p in n.split(",")):
            raise ValueError(f"read_class_file: {str(path)!r} has a line with no name: {n!r}")
    return names


def write_class_file(path: PathLike, names: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return path


def read_rgb(path: PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3], EXIF orientation applied (as the model's preprocess.read_image)."""
    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def read_label(path: PathLike) -> np.ndarray:
    """A label file's values as stored: [H, W] uint8 (L / P / 1), uint16 (I;16*) or int32 (I). RGB files raise."""
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
            raise ValueError(f"read_label: {os.fspath(path)!r} is a {im.mode} image, not a single-channel label map")
        a = np.array(im)
    if a.ndim != 2:
        raise ValueError(f"read_label: {os.fspath(path)!r} is not a 2-D label map (shape {a.shape})")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def rgb2id(color: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] int64 ids, ``R + 256 G + 256^2 B`` (panopticapi)."""
    c = np.asarray(color)
    if c.ndim != 3 or c.shape[2] != 3:
        raise ValueError(f"rgb2id: expected [H, W, 3], got shape {c.shape}")
    c = c.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] ids in [0, 256^3) -> [H, W, 3] uint8 (the inverse of :func:`rgb2id`)."""
    a = np.asarray(ids).astype(np.int64)
    if a.ndim != 2 or (a.size and (a.min() < 0 or a.max() >= 256 ** 3)):
        raise ValueError("id2rgb: expected [H, W] ids in [0, 256^3)")
    return np.stack([a % 256, (a // 256) % 256, a // (256 * 256)], -1).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Semantic segmentation


class SemanticSegDataset(Dataset):
    """Label-PNG semantic segmentation with a class-name file (module docstring).

    Args:
        image_dir, label_dir: the folders (searched recursively for images).
        class_file: the class names (one per line, comma-separated synonyms).
        label_format: "index" or "reduce_zero" (module docstring).
        image_suffix: the image name ending to pair on (e.g. "_leftImg8bit.png"); None: any of :data:`IMAGE_EXTS`,
            the label replacing the extension.
        label_suffix: the label name ending (default ".png").
        file_ignore: the file's "unlabelled" value (default 255 for 8-bit files, 65535 for 16-bit ones).
        ignore_label: the value items carry on unlabelled pixels (default 255 if K <= 255 else 65535).
        preset: a key of :data:`PRESETS` (defaults for the arguments above).
        limit: keep the first ``limit`` images (sorted by relative path).

    Items: ``{"image": uint8 [H, W, 3] RGB, "label": int64 [H, W], "file_name": relative image path, "height",
    "width"}``. Attributes: ``class_names`` (the file's lines), ``num_classes``, ``ignore_label``, ``files``.
    """

    def __init__(self, image_dir: PathLike, label_dir: PathLike, class_file: PathLike,
                 label_format: Optional[str] = None, image_suffix: Optional[str] = None,
                 label_suffix: Optional[str] = None, file_ignore: Optional[int] = None,
                 ignore_label: Optional[int] = None, preset: Optional[str] = None, limit: Optional[int] = None):
        fn = "SemanticSegDataset"
        opts = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"{fn}: unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
            opts.update(PRESETS[preset])
        for k, v in (("label_format", label_format), ("image_suffix", image_suffix), ("label_suffix", label_suffix)):
            if v is not None:
                opts[k] = v
        self.label_format = opts.get("label_format", "index")
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"{fn}: 'label_format' must be one of {LABEL_FORMATS}, got {self.label_format!r}")
        self.image_suffix = opts.get("image_suffix")
        self.label_suffix = opts.get("label_suffix", ".png")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for name, d in (("image_dir", self.image_dir), ("label_dir", self.label_dir)):
            if not d.is_dir():
                raise FileNotFoundError(f"{fn}: '{name}' {str(d)!r} is not a folder")
        self.class_names = read_class_file(class_file)
        self.num_classes = len(self.class_names)
        if file_ignore is not None and (isinstance(file_ignore, bool) or not isinstance(file_ignore, int)):
            raise TypeError(f"{fn}: 'file_ignore' must be an int, got {file_ignore!r}")
        self.file_ignore = file_ignore
        if ignore_label is None:
            ignore_label = 255 if self.num_classes <= 255 else 65535
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or 0 <= ignore_label < self.num_classes:
            raise ValueError(f"{fn}: 'ignore_label' must be an int outside the class indices 0..{self.num_classes - 1}"
                             f", got {ignore_label!r}")
        self.ignore_label = ignore_label
        files = []
        for p in sorted(self.image_dir.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.image_dir).as_posix()
            if self.image_suffix is not None:
                if not rel.endswith(self.image_suffix):
                    continue
                stem = rel[: -len(self.image_suffix)]
            elif p.suffix.lower() in IMAGE_EXTS:
                stem = rel[: -len(p.suffix)]
            else:
                continue
            label = self.label_dir / (stem + self.label_suffix)
            if not label.is_file():
                raise FileNotFoundError(f"{fn}: no label {str(label)!r} for image {str(p)!r}")
            files.append((rel, label))
        if not files:
            raise ValueError(f"{fn}: no images in {str(self.image_dir)!r} (suffix {self.image_suffix or IMAGE_EXTS})")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{fn}: 'limit' must be a positive int, got {limit!r}")
            files = files[:limit]
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def convert_label(self, raw: np.ndarray, where: str = "label") -> np.ndarray:
        """Stored values -> int64 class indices with ``ignore_label`` (module docstring)."""
        file_ignore = self.file_ignore
        if file_ignore is None:
            file_ignore = 65535 if raw.dtype == np.uint16 else 255
        raw = raw.astype(np.int64)
        ignored = raw == file_ignore
        if self.label_format == "reduce_zero":
            ignored |= raw == 0
            raw = raw - 1
        bad = ~ignored & ((raw < 0) | (raw >= self.num_classes))
        if bad.any():
            vals = sorted(set(np.unique(raw[bad]).tolist()))[:10]
            raise ValueError(f"SemanticSegDataset: {where} holds labels {vals} outside 0..{self.num_classes - 1} "
                             f"(format {self.label_format!r}, file ignore value {file_ignore})")
        return np.where(ignored, self.ignore_label, raw)

    def __getitem__(self, i: int) -> dict:
        rel, label_path = self.files[i]
        image = read_rgb(self.image_dir / rel)
        label = self.convert_label(read_label(label_path), str(label_path))
        if label.shape != image.shape[:2]:
            raise ValueError(f"SemanticSegDataset: label {str(label_path)!r} is {label.shape}, its image "
                             f"{image.shape[:2]}")
        return {"image": image, "label": label, "file_name": rel, "height": image.shape[0], "width": image.shape[1]}


# ---------------------------------------------------------------------------------------------------------------------
# COCO panoptic


class COCOPanopticDataset(Dataset):
    """COCO-panoptic JSON + PNG (module docstring).

    Args:
        json_path: the panoptic JSON.
        png_dir: the folder of the annotations' PNGs.
        image_dir: the folder of the images (the "images" entries' file names; else the PNG name as .jpg).
        class_file: optional names replacing the categories' (one line per category, JSON order, synonyms allowed).
        limit: keep the first ``limit`` annotations (JSON order).

    Items: ``{"image": uint8 [H, W, 3], "pan": int64 [H, W] segment ids, "segments_info": list of dicts,
    "image_id", "file_name" (the image's), "height", "width"}``. Attributes: ``categories`` (dicts with "id",
    "name", "isthing" bool), ``class_names``, ``is_thing``, ``cat_ids``, ``cat_id_to_index``.
    """

    def __init__(self, json_path: PathLike, png_dir: PathLike, image_dir: PathLike,
                 class_file: Optional[PathLike] = None, limit: Optional[int] = None):
        fn = "COCOPanopticDataset"
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"{fn}: 'json_path' {str(json_path)!r} does not exist")
        self.png_dir, self.image_dir = Path(png_dir), Path(image_dir)
        for name, d in (("png_dir", self.png_dir), ("image_dir", self.image_dir)):
            if not d.is_dir():
                raise FileNotFoundError(f"{fn}: '{name}' {str(d)!r} is not a folder")
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not {"annotations", "categories"} <= set(data):
            raise ValueError(f"{fn}: {str(json_path)!r} must be a JSON object with 'annotations' and 'categories'")
        cats = []
        for c in data["categories"]:
            if not isinstance(c, dict) or not {"id", "name", "isthing"} <= set(c):
                raise ValueError(f"{fn}: every category needs 'id', 'name' and 'isthing', got {c!r}")
            cats.append({"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(int(c["isthing"]))})
        if not cats:
            raise ValueError(f"{fn}: {str(json_path)!r} has no categories")
        self.categories = cats
        self.cat_ids = [c["id"] for c in cats]
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise ValueError(f"{fn}: duplicate category ids in {str(json_path)!r}")
        self.cat_id_to_index = {cid: k for k, cid in enumerate(self.cat_ids)}
        self.is_thing = [c["isthing"] for c in cats]
        if class_file is not None:
            names = read_class_file(class_file)
            if len(names) != len(cats):
                raise ValueError(f"{fn}: 'class_file' has {len(names)} names for {len(cats)} categories")
            self.class_names = names
        else:
            self.class_names = [c["name"] for c in cats]
        images = {int(im["id"]): im for im in data.get("images", [])}
        anns = list(data["annotations"])
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{fn}: 'limit' must be a positive int, got {limit!r}")
            anns = anns[:limit]
        self.annotations = []
        for a in anns:
            if not isinstance(a, dict) or not {"image_id", "file_name", "segments_info"} <= set(a):
                raise ValueError(f"{fn}: every annotation needs 'image_id', 'file_name' and 'segments_info'")
            for s in a["segments_info"]:
                if int(s["category_id"]) not in self.cat_id_to_index:
                    raise ValueError(f"{fn}: annotation {a['file_name']!r} has unknown category_id "
                                     f"{s['category_id']}")
            im = images.get(int(a["image_id"]))
            img_name = im["file_name"] if im is not None else Path(a["file_name"]).with_suffix(".jpg").name
            self.annotations.append({**a, "image_file": img_name})

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, i: int) -> dict:
        a = self.annotations[i]
        image = read_rgb(self.image_dir / a["image_file"])
        with Image.open(self.png_dir / a["file_name"]) as im:
            pan = rgb2id(np.array(im.convert("RGB")))
        if pan.shape != image.shape[:2]:
            raise ValueError(f"COCOPanopticDataset: {a['file_name']!r} is {pan.shape}, its image {image.shape[:2]}")
        return {"image": image, "pan": pan, "segments_info": [dict(s) for s in a["segments_info"]],
                "image_id": a["image_id"], "file_name": a["image_file"], "height": image.shape[0],
                "width": image.shape[1]}


# ---------------------------------------------------------------------------------------------------------------------
# ShapesWorld writers


def _check_world_indices(world, indices, fn: str) -> list[int]:
    if not isinstance(world, ShapesWorld):
        raise TypeError(f"{fn}: 'world' must be a ShapesWorld, got {type(world).__name__}")
    try:
        idx = list(indices)
    except TypeError:
        raise TypeError(f"{fn}: 'indices' must be an iterable of scene indices, got {type(indices).__name__}") from None
    if not idx:
        raise ValueError(f"{fn}: 'indices' is empty")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"{fn}: scene indices must be non-negative ints, got {i!r}")
    if len(set(int(i) for i in idx)) != len(idx):
        raise ValueError(f"{fn}: 'indices' has duplicates")
    return [int(i) for i in idx]


def _check_split(split, fn: str) -> str:
    if not isinstance(split, str) or not split or "/" in split or split in (".", ".."):
        raise ValueError(f"{fn}: 'split' must be a plain folder name, got {split!r}")
    return split


def _rgb(scene: Scene) -> np.ndarray:
    return np.round(np.clip(scene.image, 0.0, 1.0) * 255.0).astype(np.uint8)


def scene_name(index: int) -> str:
    return "shapes_%08d" % index


def shapes_semantic_classes(background: str = "class") -> list[str]:
    """The semantic classes of :func:`write_shapes_semantic`: CATEGORIES (+ "background" last for "class")."""
    if background not in ("class", "ignore"):
        raise ValueError(f"'background' must be 'class' or 'ignore', got {background!r}")
    return list(CATEGORIES) + ([BACKGROUND] if background == "class" else [])


def shapes_panoptic_categories() -> list[dict]:
    """COCO-style categories of :func:`write_shapes_panoptic`: shapes 1..6 (things), background 7 (stuff)."""
    cats = [{"id": k + 1, "name": c, "isthing": 1, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)]
    return cats + [{"id": len(CATEGORIES) + 1, "name": BACKGROUND, "isthing": 0, "supercategory": "background"}]


def write_shapes_semantic(world: ShapesWorld, indices: Iterable[int], root: PathLike, split: str = "val",
                          background: str = "class") -> Path:
    """Write scenes ``indices`` of ``world`` as a label-PNG semantic dataset (module docstring); returns ``root``.
    Read back with ``SemanticSegDataset(root/"images"/split, root/"annotations"/split, root/"classes.txt")``."""
    fn = "write_shapes_semantic"
    idx = _check_world_indices(world, indices, fn)
    split = _check_split(split, fn)
    classes = shapes_semantic_classes(background)
    root = Path(root)
    bg_value = len(CATEGORIES) if background == "class" else 255
    for i in idx:
        scene = world.scene(i)
        label = np.full(scene.size, bg_value, dtype=np.uint8)
        for j, spec in enumerate(scene.specs):
            label[scene.instance == j + 1] = CATEGORIES.index(spec.category)
        _write_png(root / "images" / split / f"{scene_name(i)}.png", _rgb(scene))
        _write_png(root / "annotations" / split / f"{scene_name(i)}.png", label)
    write_class_file(root / "classes.txt", classes)
    return root


def write_shapes_panoptic(world: ShapesWorld, indices: Iterable[int], root: PathLike, split: str = "val") -> Path:
    """Write scenes ``indices`` of ``world`` in the COCO panoptic layout (module docstring); returns ``root``. Read
    back with ``COCOPanopticDataset(root/"annotations"/f"panoptic_{split}.json", root/f"panoptic_{split}",
    root/split)``."""
    fn = "write_shapes_panoptic"
    idx = _check_world_indices(world, indices, fn)
    split = _check_split(split, fn)
    root = Path(root)
    cats = shapes_panoptic_categories()
    bg_cat = cats[-1]["id"]
    images, anns = [], []
    for i in idx:
        scene = world.scene(i)
        h, w = scene.size
        name = scene_name(i)
        pan = np.where(scene.instance > 0, scene.instance, BACKGROUND_SEGMENT_ID).astype(np.int64)
        segs = []
        for j, spec in enumerate(scene.specs):
            m = scene.instance == j + 1
            if not m.any():
                continue
            x0, y0, x1, y1 = (int(v) for v in scene.boxes[j])
            segs.append({"id": j + 1, "category_id": CATEGORIES.index(spec.category) + 1, "iscrowd": 0,
                         "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0]})
        bg = pan == BACKGROUND_SEGMENT_ID
        if bg.any():
            rows, cols = np.flatnonzero(bg.any(1)), np.flatnonzero(bg.any(0))
            segs.append({"id": BACKGROUND_SEGMENT_ID, "category_id": bg_cat, "iscrowd": 0, "area": int(bg.sum()),
                         "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                  int(rows[-1] - rows[0] + 1)]})
        _write_png(root / split / f"{name}.png", _rgb(scene))
        _write_png(root / f"panoptic_{split}" / f"{name}.png", id2rgb(pan))
        images.append({"id": i, "file_name": f"{name}.png", "height": h, "width": w})
        anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segs})
    js = root / "annotations" / f"panoptic_{split}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}), encoding="utf-8")
    os.replace(tmp, js)
    return root
