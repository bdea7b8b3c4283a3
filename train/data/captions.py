"""Image-caption manifests (JSONL) for Unpair-Seg stage 2: a loader and a ShapesWorld writer.

Record formats (one JSON object per line; blank lines are skipped)::

    {"image": "images/000001.png", "caption": "a dog on a bench."}                          plain
    {"id": "...", "image": "coco/train2017/x.jpg",                                           ShareGPT4V-style
     "conversations": [{"from": "human", "value": "<image>\\nDescribe ..."},
                       {"from": "gpt", "value": "The image shows ..."}]}

Either may carry ``"entities": [str, ...]`` (e.g. extracted offline by an LVLM, or exact ones from ShapesWorld),
which then take precedence over the extractor. In the ShareGPT4V style the caption is the first ``"gpt"`` turn
(ShareGPT4V's own ``"from"`` names; ``"assistant"`` is accepted too). ``"image"`` is absolute or relative to
``image_root`` (default: the manifest's folder).

Images are prepared as the official inference path (models/unpair_seg/preprocess.py, spec §7.1): RGB with the EXIF
orientation applied, the longest side resized to the canvas side (detectron2 sizes, PIL bilinear), content at the
top-left of a ``image_size``² canvas padded with 128.

Layout that :func:`write_shapes_captions` writes (paths in the manifest relative to it)::

    root/captions.jsonl            one record per scene: image, caption (Scene.caption()), entities (exact), scene
    root/images/<scene:06d>.png    the render (RGB, 8 bit)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.unpair_seg.entities import EntityExtractor, ShapesWorldEntities, get_extractor

PathLike = Union[str, os.PathLike]
MANIFEST = "captions.jsonl"
_GPT_ROLES = ("gpt", "assistant")

__all__ = ["CaptionDataset", "collate_captions", "read_manifest", "record_caption", "write_shapes_captions",
           "MANIFEST"]


def record_caption(record: dict, where: str = "record") -> str:
    """The caption of a manifest record, plain (``"caption"``) or ShareGPT4V-style (first ``"gpt"`` turn)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a caption record must be a JSON object, got {type(record).__name__}")
    if "caption" in record:
        cap = record["caption"]
        if not isinstance(cap, str):
            raise ValueError(f"{where}: 'caption' must be a string, got {type(cap).__name__}")
        return cap
    conv = record.get("conversations")
    if isinstance(conv, list):
        for turn in conv:
            if isinstance(turn, dict) and turn.get("from") in _GPT_ROLES:
                value = turn.get("value")
                if not isinstance(value, str):
                    raise ValueError(f"{where}: the 'gpt' turn's 'value' must be a string, got "
                                     f"{type(value).__name__}")
                return value
        raise ValueError(f"{where}: 'conversations' has no turn from 'gpt' (the caption)")
    raise ValueError(f"{where}: expected 'caption' (str) or ShareGPT4V-style 'conversations' with a 'gpt' turn; "
                     f"keys are {sorted(record)}")


def read_manifest(manifest: PathLike) -> list[dict]:
    """The records of a JSONL caption manifest, each checked: ``image`` (str), a caption (plain or ShareGPT4V), and
    ``entities`` (a list of str) when present. Errors name the file and line."""
    manifest = os.fspath(manifest)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"caption manifest {manifest!r} does not exist")
    out = []
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{manifest}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            record_caption(rec, where)
            if not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ValueError(f"{where}: 'image' must be a non-empty path string")
            ents = rec.get("entities")
            if ents is not None and (not isinstance(ents, list) or not all(isinstance(e, str) for e in ents)):
                raise ValueError(f"{where}: 'entities' must be a list of strings")
            out.append(rec)
    return out


class CaptionDataset(Dataset):
    """Canvas images and their entities from a caption manifest (module docstring).

    Args:
        manifest: the JSONL file.
        image_size: the canvas side S (``UnpairSegConfig.image_size``).
        extractor: caption -> entities for records without ``"entities"`` (an :class:`EntityExtractor`, a name for
            :func:`models.unpair_seg.entities.get_extractor`, or None for the rule-based default).
        image_root: the folder relative image paths start from (default: the manifest's folder).
        use_manifest_entities: False ignores stored entities and always runs the extractor.

    Item ``i``: ``{"image": uint8 [3, S, S] (RGB canvas), "entities": list[str], "caption": str,
    "size": int64 [2] (h, w) of the content on the canvas, "orig_size": int64 [2] (H, W) of the file,
    "index": int}``. Batch with :func:`collate_captions`.
    """

    def __init__(self, manifest: PathLike, image_size: int, extractor: Union[EntityExtractor, str, None] = None,
                 image_root: Optional[PathLike] = None, use_manifest_entities: bool = True):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"CaptionDataset: 'image_size' must be a positive int, got {image_size!r}")
        self.manifest = os.fspath(manifest)
        self.records = read_manifest(self.manifest)
        self.image_size = image_size
        self.extractor = get_extractor(extractor)
        self.image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(
            os.path.abspath(self.manifest))
        self.use_manifest_entities = bool(use_manifest_entities)

    def __len__(self) -> int:
        return len(self.records)

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"CaptionDataset: index must be an int, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"CaptionDataset: index {i} out of range for {len(self)} records")
        return int(i) % len(self)

    def image_path(self, i: int) -> str:
        p = self.records[self._index(i)]["image"]
        return p if os.path.isabs(p) else os.path.join(self.image_root, p)

    def caption(self, i: int) -> str:
        return record_caption(self.records[self._index(i)])

    def entities(self, i: int) -> list[str]:
        """Record ``i``'s entities: the stored list when present (and allowed), else the extractor's."""
        rec = self.records[self._index(i)]
        if self.use_manifest_entities and rec.get("entities") is not None:
            return list(rec["entities"])
        return list(self.extractor(record_caption(rec)))

    def __getitem__(self, i) -> dict:
        from models.unpair_seg.preprocess import pad_to_canvas, read_image, resize_longest

        i = self._index(i)
        img = read_image(self.image_path(i))
        resized = resize_longest(img, self.image_size)
        canvas = pad_to_canvas(resized, self.image_size)
        return {"image": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))),
                "entities": self.entities(i), "caption": self.caption(i),
                "size": torch.tensor(resized.shape[:2], dtype=torch.int64),
                "orig_size": torch.tensor(img.shape[:2], dtype=torch.int64), "index": i}


def collate_captions(items: Sequence[dict]) -> dict:
    """Items of :class:`CaptionDataset` -> ``{"image": uint8 [N, 3, S, S], "entities": list[list[str]],
    "caption": list[str], "size": int64 [N, 2], "orig_size": int64 [N, 2], "index": int64 [N]}``."""
    if not items:
        raise ValueError("collate_captions: empty batch")
    return {"image": torch.stack([it["image"] for it in items]),
            "entities": [list(it["entities"]) for it in items],
            "caption": [it["caption"] for it in items],
            "size": torch.stack([it["size"] for it in items]),
            "orig_size": torch.stack([it["orig_size"] for it in items]),
            "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64)}


def write_shapes_captions(world, indices: Sequence[int], root: PathLike, *, style: str = "plain",
                          entities: bool = True, manifest_name: str = MANIFEST) -> Path:
    """Render ShapesWorld scenes ``indices`` of ``world`` to ``root/images/<scene:06d>.png`` and write the manifest
    ``root/<manifest_name>`` (module docstring). Returns the manifest path.

    Args:
        style: "plain" (``"caption"``) or "sharegpt4v" (a human instruction turn and the caption as the gpt turn).
        entities: store the exact entities (:class:`ShapesWorldEntities`, size + colour + category) in every record;
            False leaves them to the loader's extractor (which gives the same list on these captions).

    The manifest is written last, through a temporary file and a rename, so a complete manifest never lists a
    missing image.
    """
    if style not in ("plain", "sharegpt4v"):
        raise ValueError(f"write_shapes_captions: 'style' must be 'plain' or 'sharegpt4v', got {style!r}")
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("write_shapes_captions: 'indices' is empty")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    exact = ShapesWorldEntities()
    lines = []
    for i in indices:
        scene = world.scene(i)
        rel = f"images/{i:06d}.png"
        img = np.clip(np.rint(scene.image * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / rel, compress_level=1)
        cap = scene.caption()
        rec: dict = {"id": f"shapes-{world.seed}-{i}", "image": rel}
        if style == "plain":
            rec["caption"] = cap
        else:
            rec["conversations"] = [{"from": "human", "value": "<image>\nDescribe this image in detail."},
                                    {"from": "gpt", "value": cap}]
        if entities:
            rec["entities"] = exact.from_scene(scene)
        rec["scene"] = i
        lines.append(json.dumps(rec))
    path = root / manifest_name
    tmp = root / f".{manifest_name}.tmp.{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
