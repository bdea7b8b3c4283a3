"""ShapesWorld referring expressions for CRIS: the embedded default data, and a writer of the original refer format.

Refs: every object ``j`` of a scene that has at least one unique referring expression (``Scene.expressions(j)``
non-empty; ambiguous objects are skipped) and a non-empty visible mask is a ref, with

* ``ref_id = 32 * scene + j`` (a scene has at most 24 objects), also its annotation id; the image id is the scene;
* sentences: the texts of ``Scene.expressions(j)`` in their order (attribute descriptions, shortest first, then
  superlatives, then relations), so sentence 0 is ``Scene.expression(j)``, the preferred one; with ``max_sentences``
  (default 3, about RefCOCO's 2.8 per ref) sentence 0 plus ``max_sentences - 1`` of the others, drawn without
  replacement from a generator seeded with (world seed, scene, j) and kept in grammar order; ``sent_id = 1000 * ref_id
  + k`` (an object has fewer than 1000 expressions);
* the mask: the object's visible (occluded) instance mask, 255 on the object, at the world's native size;
* the category: ``CATEGORIES.index + 1`` as the COCO-style id (the record's contiguous "cat" is then the index);
  the box: the tight mask box as COCO [x, y, w, h].

Splits are held-out scene ranges: split ``s`` uses scenes ``[k * 2**24, k * 2**24 + num_scenes)`` with ``k`` its
position in :data:`SPLITS` (train 0, val 1, testA 2, testB 3, test 4), so splits never share a scene whatever their
sizes (``num_scenes <= 2**24``).

Images are rendered at the world's own size (e.g. 64 x 96, any aspect) and letterboxed to ``size`` by the same
transforms as real data, so the inverse path (``M_inv``, ``ori_size``, ground truth at the native resolution) is
exercised exactly as on RefCOCO. The rendered float image is rounded to uint8 (``round(255 x)``) first, as if decoded
from a file.

:func:`write_refer` writes the same refs in the original refer layout (``<out_dir>/<dataset>/refs(<split_by>).p``
of plain containers, ``<out_dir>/<dataset>/instances.json`` with compressed-RLE segmentations, which are exact, and
PNG images ``<out_dir>/images/COCO_train2014_%012d.png``, lossless), so :class:`train.data.refer.ReferDataset` on
those files gives the very same items as :class:`ShapesReferDataset`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from models.cris.transforms import INPUT_SIZE

from .refer import _ReferItems, check_int, check_mode, coco_box, coco_category
from .shapes import CATEGORIES, Scene, ShapesWorld

SPLITS = ("train", "val", "testA", "testB", "test")
SPLIT_STRIDE = 2 ** 24
MAX_OBJECTS = 32  # ref_id = MAX_OBJECTS * scene + j; ShapesWorld has at most len(DEPTH_LEVELS) = 24 objects
SENTENCE_ID_STRIDE = 1000
_PICK_STREAM = 0x5EF

PathLike = Union[str, os.PathLike]


def split_scenes(split: str, num_scenes: int) -> range:
    """The scene indices of ``split`` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split_scenes: 'split' must be one of {SPLITS}, got {split!r}")
    n = check_int("num_scenes", "split_scenes", num_scenes, 1)
    if n > SPLIT_STRIDE:
        raise ValueError(f"split_scenes: 'num_scenes' must be <= {SPLIT_STRIDE} (the per-split range), got {n}")
    base = SPLITS.index(split) * SPLIT_STRIDE
    return range(base, base + n)


def image_name(scene_index: int) -> str:
    return "COCO_train2014_%012d.png" % scene_index


def scene_rgb(scene: Scene) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a rendered scene: round(255 x)."""
    return np.round(np.clip(scene.image, 0.0, 1.0) * 255.0).astype(np.uint8)


def scene_refs(world: ShapesWorld, scene: Scene, scene_index: int, max_sentences: Optional[int] = 3) -> list[dict]:
    """The refs of one scene (module docstring): dicts with "ref_id", "object", "category_id", "bbox" (COCO xywh),
    "sentences" (list of str)."""
    out = []
    for j in range(len(scene.specs)):
        mask = scene.masks[j]
        exprs = scene.expressions(j)
        if not exprs or not mask.any():
            continue
        texts = list(dict.fromkeys(e.text for e in exprs))
        if max_sentences is not None and len(texts) > max_sentences:
            rng = np.random.default_rng(np.random.SeedSequence([world.seed, _PICK_STREAM, scene_index, j]))
            keep = sorted(rng.choice(np.arange(1, len(texts)), size=max_sentences - 1, replace=False).tolist())
            texts = [texts[0]] + [texts[k] for k in keep]
        x0, y0, x1, y1 = (int(v) for v in scene.boxes[j])
        out.append({"ref_id": MAX_OBJECTS * scene_index + j, "object": j,
                    "category_id": CATEGORIES.index(scene.specs[j].category) + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "sentences": texts})
    return out


def _check_world(world, fn: str) -> ShapesWorld:
    if not isinstance(world, ShapesWorld):
        raise TypeError(f"{fn}: 'world' must be a ShapesWorld, got {type(world).__name__}")
    return world


def _check_max_sentences(v, fn: str) -> Optional[int]:
    return None if v is None else check_int("max_sentences", fn, v, 1)


class ShapesReferDataset(_ReferItems):
    """CRIS items on ShapesWorld referring expressions; the same item dict and sentence rules as
    :class:`train.data.refer.ReferDataset` (see there), over the refs of the module docstring.

    Args:
        world: the ShapesWorld; scenes are rendered at its size (the native resolution).
        split: one of :data:`SPLITS` (held-out scene ranges).
        num_scenes: scenes in the split (its first ``num_scenes``).
        size: the letterbox side.
        word_len: the token length (17 as RefCOCO; the longest ShapesWorld expression has 10 words).
        mode: "train" (one item per ref, a random sentence per (epoch, index)), "val" (sentence 0 of each ref) or
            "test" (every sentence).
        max_sentences: sentences kept per ref (None: all).
        seed: the train-mode sentence seed.

    Building the index renders every scene once (to find the unambiguous objects); items render their scene again
    (the last scene is cached, so the consecutive items of one scene in test mode render it once).
    """

    def __init__(self, world: ShapesWorld, split: str, num_scenes: int, size: int = INPUT_SIZE, word_len: int = 17,
                 mode: str = "train", max_sentences: Optional[int] = 3, seed: int = 0):
        fn = "ShapesReferDataset"
        self.world = _check_world(world, fn)
        self.scenes = split_scenes(split, num_scenes)
        self.split, self.mode = split, check_mode(mode, fn)
        self.size = check_int("size", fn, size, 1)
        self.word_len = check_int("word_len", fn, word_len, 2)
        self.seed = check_int("seed", fn, seed, 0)
        self.max_sentences = _check_max_sentences(max_sentences, fn)
        self.refs: list[dict] = []
        for s in self.scenes:
            for ref in scene_refs(world, world.scene(s), s, self.max_sentences):
                ref["scene"] = s
                self.refs.append(ref)
        if not self.refs:
            raise ValueError(f"{fn}: the {num_scenes} scenes of split {split!r} have no unambiguous object")
        self.sentences = [ref["sentences"] for ref in self.refs]
        self.ref_ids = [ref["ref_id"] for ref in self.refs]
        self._cache: tuple[int, Optional[Scene]] = (-1, None)
        self._init_items()

    def scene(self, s: int) -> Scene:
        if self._cache[0] != s:
            self._cache = (s, self.world.scene(s))
        return self._cache[1]

    def records(self) -> list[dict]:
        """The official per-ref records (as :meth:`train.data.refer.Refer.record` gives for the written files)."""
        return [{"bbox": coco_box(ref["bbox"]), "cat": coco_category(ref["category_id"]), "segment_id": ref["ref_id"],
                 "img_name": image_name(ref["scene"]),
                 "sentences": [{"idx": k, "sent_id": SENTENCE_ID_STRIDE * ref["ref_id"] + k, "sent": t}
                               for k, t in enumerate(ref["sentences"])],
                 "sentences_num": len(ref["sentences"])} for ref in self.refs]

    def _load(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        ref = self.refs[r]
        scene = self.scene(ref["scene"])
        return scene_rgb(scene), scene.masks[ref["object"]].astype(np.uint8) * np.uint8(255)


def write_refer(world: ShapesWorld, out_dir: PathLike, num_scenes: int, dataset: str = "shapes_refer",
                split_by: str = "unc", splits: Sequence[str] = ("train", "val", "testA", "testB"),
                max_sentences: Optional[int] = 3) -> Path:
    """Write the first ``num_scenes`` scenes of each of ``splits`` in the refer format (module docstring).

    Returns ``out_dir``; read it back with ``ReferDataset(out_dir, dataset, split_by, split, out_dir / "images")``.
    The refs pickle (protocol 2, like the released files) holds only dicts, lists, str and ints; it and
    instances.json are written last, through temporary files and renames, so a complete pair never names a missing
    image. Note the official split rule when reading: split "test" selects every split containing "test" (testA
    and testB too)."""
    fn = "write_refer"
    world = _check_world(world, fn)
    max_sentences = _check_max_sentences(max_sentences, fn)
    for name, v in (("dataset", dataset), ("split_by", split_by)):
        if not isinstance(v, str) or not v or "/" in v or v in (".", ".."):
            raise ValueError(f"{fn}: '{name}' must be a plain folder / file name part, got {v!r}")
    if isinstance(splits, str) or not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"{fn}: 'splits' must be distinct names from {SPLITS}, got {splits!r}")
    from pycocotools import mask as mask_utils
    import cv2

    out = Path(out_dir)
    ann_dir, img_dir = out / dataset, out / "images"
    ann_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    refs, images, anns = [], [], []
    for split in splits:
        for s in split_scenes(split, num_scenes):
            scene = world.scene(s)
            h, w = scene.size
            name = image_name(s)
            if not cv2.imwrite(str(img_dir / name), cv2.cvtColor(scene_rgb(scene), cv2.COLOR_RGB2BGR)):
                raise OSError(f"{fn}: could not write {img_dir / name}")
            images.append({"id": s, "file_name": name, "height": h, "width": w})
            for ref in scene_refs(world, scene, s, max_sentences):
                rid, mask = ref["ref_id"], scene.masks[ref["object"]]
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                anns.append({"id": rid, "image_id": s, "category_id": ref["category_id"],
                             "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                             "area": int(mask.sum()), "bbox": ref["bbox"], "iscrowd": 0})
                sents = [{"sent_id": SENTENCE_ID_STRIDE * rid + k, "sent": t, "raw": t, "tokens": t.split()}
                         for k, t in enumerate(ref["sentences"])]
                refs.append({"ref_id": rid, "ann_id": rid, "image_id": s, "category_id": ref["category_id"],
                             "split": split, "sentences": sents, "sent_ids": [x["sent_id"] for x in sents],
                             "file_name": f"{Path(name).stem}_{rid}.png"})
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)]
    inst_tmp, refs_tmp = ann_dir / "instances.json.tmp", ann_dir / f"refs({split_by}).p.tmp"
    inst_tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    with open(refs_tmp, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    os.replace(inst_tmp, ann_dir / "instances.json")
    os.replace(refs_tmp, ann_dir / f"refs({split_by}).p")
    return out
