"""RefCOCO, RefCOCO+ and G-Ref (RefCOCOg, UMD and Google splits) from the original ``refer`` files, for CRIS.

Files (the layout of the ``refer`` annotation zips; specs/cris.md §5.1)::

    <root>/<dataset>/refs(<split_by>).p    the refs: a pickled list of dicts (see below)
    <root>/<dataset>/instances.json        COCO-style {"images", "annotations", "categories"}
    <image_root>/<file_name>               the COCO train2014 images (file_name from instances.json; when an image
                                           record has none, COCO_train2014_%012d.jpg % image_id)

``dataset`` / ``split_by``: ``refcoco`` / ``unc``, ``refcoco+`` / ``unc``, ``refcocog`` / ``umd`` (the official
``refcocog_u``) or ``google`` (``refcocog_g``); any other folder in the same format works (e.g. ShapesWorld written by
``train.data.cris_data.write_refer``).

A ref is ``{"ref_id", "ann_id", "image_id", "category_id", "split", "sentences": [{"sent_id", "sent", "raw",
"tokens"}, ...], ...}``; only the first six keys and each sentence's ``"sent"`` (and ``"sent_id"``) are used.

Safety: the refs are a pickle, and unpickling can run arbitrary code. :func:`load_pickle` uses a restricted
unpickler whose ``find_class`` refuses every global, so only what the pickle opcodes build by themselves can come out:
dicts, lists, tuples, sets, str, bytes, int, float, bool and None (the refs files hold nothing else). The result is
then walked once to check that. A pickle naming any callable (``os.system`` through ``__reduce__``, a class, ...)
raises :class:`UnsafePickleError` before anything runs. Python 2 pickles (the released files) load too; their 8-bit
strings are decoded as UTF-8 (the official loader's default ASCII would fail on non-ASCII bytes, and gives the same
strings on ASCII ones).

Records and masks follow the official ``tools/data_process.py`` (spec §5.1):

* :meth:`Refer.record`: ``{"bbox": [x1, y1, x2, y2] (ints: int(x), int(y), int(x) + int(w), int(y) + int(h) of the
  COCO box), "cat": the official contiguous 0..79 category, "segment_id": ref_id, "img_name", "sentences": [{"idx",
  "sent_id", "sent": sent.strip()}], "sentences_num"}``;
* :meth:`Refer.mask`: uint8 [h, w] from the annotation's segmentation with pycocotools: polygons through
  ``frPyObjects``, RLE as is (uncompressed RLE through ``frPyObjects`` first), ``decode``, sum over the polygon axis,
  ``astype(uint8)``, times 255 in uint8 (so a pixel inside two overlapping polygons is 2 * 255 mod 256 = 254; still
  non-zero, which is all the ground truth uses);
* splits select refs by their ``"split"`` field like the official ``getRefIds``: ``train`` and ``val`` exactly,
  ``testA`` / ``testB`` / ``testC`` any split containing that letter after "test" (testAB counts for both),
  ``test`` every split containing "test"; refs keep the file's order.

:class:`ReferDataset` turns one split into CRIS items (letterboxed image, tokens, soft target, ground truth and the
inverse transform), with the official train / val / test sentence rules; :func:`collate` batches them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from models.cris.tokenize import tokenize
from models.cris.transforms import INPUT_SIZE, letterbox_image, letterbox_mask, letterbox_matrix

PathLike = Union[str, os.PathLike]
MODES = ("train", "val", "test")
WORD_LEN = {"refcoco": 17, "refcoco+": 17, "refcocog": 22}  # other datasets: 22 if the name starts "refcocog", else 17
_SENTENCE_STREAM = 0xC815
_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, int, float, bool, type(None))


# ---------------------------------------------------------------------------------------------------------------------
# Restricted unpickling


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain containers, strings and numbers."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that refuses every global (classes, functions), so no code can run while loading.

    ``find_class`` is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ and the extension
    registry all go through it); REDUCE, NEWOBJ and BUILD need such a callable or class on the stack first. Persistent
    ids are refused as well."""

    def __init__(self, file, source: str = "pickle"):
        super().__init__(file, fix_imports=True, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(f"{self.source}: refusing to load the global {module}.{name}; only plain containers "
                                "(dict, list, tuple, set), strings, numbers, bool and None are allowed, so that "
                                "loading cannot run code")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing a persistent id {pid!r} (not a plain-data pickle)")


def _check_plain(obj, source: str) -> None:
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if type(x) not in _PLAIN:
            raise UnsafePickleError(f"{source}: unexpected object of type {type(x).__name__} in a plain-data pickle")
        if isinstance(x, (dict, list, tuple, set, frozenset)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            stack.extend(x.keys() if isinstance(x, dict) else ())
            stack.extend(x.values() if isinstance(x, dict) else x)


def loads_pickle(data: bytes, source: str = "pickle"):
    """Unpickle plain data from bytes with :class:`RestrictedUnpickler` (see the module docstring)."""
    obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    _check_plain(obj, source)
    return obj


def load_pickle(path: PathLike):
    """Unpickle plain data from a file with :class:`RestrictedUnpickler`; :class:`UnsafePickleError` on anything
    else."""
    path = Path(path)
    with open(path, "rb") as f:
        return loads_pickle(f.read(), str(path))


# ---------------------------------------------------------------------------------------------------------------------
# The refer annotations


def coco_category(category_id: int) -> int:
    """The official ``cat_process``: COCO's 80 category ids (1..90 with gaps) -> contiguous 0..79; ids outside the
    COCO ranges pass unchanged (as official)."""
    for lo, hi, shift in ((1, 11, 1), (13, 25, 2), (27, 28, 3), (31, 44, 5), (46, 65, 6), (67, 67, 7), (70, 70, 9),
                          (72, 82, 10), (84, 90, 11)):
        if lo <= category_id <= hi:
            return category_id - shift
    return category_id


def coco_box(bbox: Sequence[float]) -> list[int]:
    """The official ``bbox_process``: COCO [x, y, w, h] -> [x1, y1, x2, y2] with each term truncated to int first."""
    x, y = int(bbox[0]), int(bbox[1])
    return [x, y, x + int(bbox[2]), y + int(bbox[3])]


def decode_segmentation(segmentation, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] mask of a COCO segmentation, exactly as the official ``getMask`` + ``* 255`` (module docstring).

    ``segmentation``: a list of polygons [x0, y0, x1, y1, ...], a compressed RLE {"size", "counts": str or bytes} or
    an uncompressed RLE {"size", "counts": [int, ...]}."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) for p in segmentation):
            raise ValueError(f"decode_segmentation: a polygon segmentation must be a non-empty list of lists, got "
                             f"{segmentation!r:.200}")
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [h, w]:
            raise ValueError(f"decode_segmentation: RLE size {segmentation['size']} differs from the image's {[h, w]}")
        counts = segmentation["counts"]
        rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(counts, list) else dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"decode_segmentation: unknown segmentation {segmentation!r:.200}")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 "__array__ copy" deprecation notice, harmless here
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
        m = mask_utils.decode(rle)
    if m.ndim == 2:  # a single RLE decodes to [h, w]; polygons to [h, w, n]
        m = m[:, :, None]
    # Sum over the polygons (uint64), cast to uint8 and scale in uint8: overlaps wrap (2 * 255 -> 254), as official.
    return np.sum(m, axis=2).astype(np.uint8) * np.uint8(255)


def _split_matches(query: str, split: str) -> bool:
    """The official ``getRefIds(split=...)`` rule."""
    if query in ("testA", "testB", "testC"):
        return query[-1] in split
    if query == "test":
        return "test" in split
    return split == query


class Refer:
    """The refs, annotations, images and categories of one ``<root>/<dataset>`` with ``refs(<split_by>).p``.

    Attributes: ``refs`` (list, file order), ``anns`` / ``imgs`` (by id), ``cats`` ({id: name}), ``splits`` (the
    distinct "split" values)."""

    def __init__(self, root: PathLike, dataset: str, split_by: str):
        for name, v in (("dataset", dataset), ("split_by", split_by)):
            if not isinstance(v, str) or not v:
                raise ValueError(f"Refer: '{name}' must be a non-empty str, got {v!r}")
        self.dataset, self.split_by = dataset, split_by
        self.dir = Path(root) / dataset
        refs_path, inst_path = self.dir / f"refs({split_by}).p", self.dir / "instances.json"
        for p in (refs_path, inst_path):
            if not p.is_file():
                raise FileNotFoundError(f"Refer: {p} does not exist (expected the refer layout "
                                        "<root>/<dataset>/refs(<split_by>).p and instances.json)")
        refs = load_pickle(refs_path)
        if not isinstance(refs, list):
            raise ValueError(f"Refer: {refs_path} must hold a list of refs, got {type(refs).__name__}")
        for k, ref in enumerate(refs):
            missing = [key for key in ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
                       if not isinstance(ref, dict) or key not in ref]
            if missing or not isinstance(ref["sentences"], list) or not all(
                    isinstance(s, dict) and isinstance(s.get("sent"), str) for s in ref["sentences"]):
                raise ValueError(f"Refer: {refs_path} ref #{k} must be a dict with 'ref_id', 'ann_id', 'image_id', "
                                 f"'category_id', 'split' and 'sentences' (dicts with a str 'sent'); missing "
                                 f"{missing or 'valid sentences'}")
        with open(inst_path) as f:
            inst = json.load(f)
        if not isinstance(inst, dict) or not all(k in inst for k in ("images", "annotations")):
            raise ValueError(f"Refer: {inst_path} must be a COCO-style dict with 'images' and 'annotations'")
        self.refs: list[dict] = refs
        self.anns = {a["id"]: a for a in inst["annotations"]}
        self.imgs = {im["id"]: im for im in inst["images"]}
        self.cats = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for ref in refs:
            if ref["ann_id"] not in self.anns or ref["image_id"] not in self.imgs:
                raise ValueError(f"Refer: ref {ref['ref_id']} names ann {ref['ann_id']} / image {ref['image_id']}, "
                                 f"not in {inst_path}")
        self.splits = tuple(dict.fromkeys(ref["split"] for ref in refs))

    def refs_in(self, split: str) -> list[dict]:
        """The refs of ``split`` (the official rule, module docstring), in file order; ValueError if none."""
        out = [ref for ref in self.refs if _split_matches(split, ref["split"])]
        if not out:
            raise ValueError(f"Refer: no refs of split {split!r} in {self.dir}/refs({self.split_by}).p (its splits: "
                             f"{self.splits})")
        return out

    def image_info(self, ref: dict) -> dict:
        return self.imgs[ref["image_id"]]

    def image_name(self, ref: dict) -> str:
        im = self.image_info(ref)
        return im.get("file_name") or "COCO_train2014_%012d.jpg" % ref["image_id"]

    def mask(self, ref: dict) -> np.ndarray:
        """uint8 [h, w] at the image's resolution (255 on the object; see :func:`decode_segmentation`)."""
        im = self.image_info(ref)
        return decode_segmentation(self.anns[ref["ann_id"]]["segmentation"], int(im["height"]), int(im["width"]))

    def record(self, ref: dict) -> dict:
        """The official per-ref JSON record (module docstring)."""
        sents = [{"idx": i, "sent_id": s.get("sent_id"), "sent": s["sent"].strip()}
                 for i, s in enumerate(ref["sentences"])]
        return {"bbox": coco_box(self.anns[ref["ann_id"]]["bbox"]), "cat": coco_category(int(ref["category_id"])),
                "segment_id": ref["ref_id"], "img_name": self.image_name(ref), "sentences": sents,
                "sentences_num": len(sents)}

    def records(self, split: str) -> list[dict]:
        return [self.record(ref) for ref in self.refs_in(split)]


# ---------------------------------------------------------------------------------------------------------------------
# Items shared by ReferDataset and ShapesReferDataset


def check_mode(mode, fn: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{fn}: 'mode' must be one of {MODES}, got {mode!r}")
    return mode


def check_int(name: str, fn: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{fn}: '{name}' must be an int >= {lo}, got {v!r}")
    return int(v)


def item_index(sentence_counts: Sequence[int], mode: str) -> list[tuple[int, int]]:
    """(ref position, sentence index) per item: train one per ref (sentence -1 = drawn per epoch), val sentence 0 of
    each ref, test every sentence of every ref. Refs without sentences are skipped."""
    if mode == "test":
        return [(r, k) for r, n in enumerate(sentence_counts) for k in range(n)]
    return [(r, -1 if mode == "train" else 0) for r, n in enumerate(sentence_counts) if n > 0]


def train_sentence(seed: int, epoch: int, index: int, n: int) -> int:
    """The train-mode sentence of item ``index`` in ``epoch``: uniform over the ref's ``n`` sentences, from a numpy
    generator seeded with (stream, seed, epoch, index), so it is the same in every worker and on every rerun."""
    rng = np.random.default_rng(np.random.SeedSequence([_SENTENCE_STREAM, seed, epoch, index]))
    return int(rng.integers(n))


def make_item(image: np.ndarray, mask: np.ndarray, sentence: str, ref_id: int, mode: str, size: int,
              word_len: int) -> dict:
    """One CRIS item from an RGB uint8 image [h, w, 3] and its uint8 mask [h, w] (see :class:`ReferDataset`)."""
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        raise ValueError(f"ref {ref_id}: mask {mask.shape} does not match the image {(h, w)}")
    M, M_inv = letterbox_matrix(h, w, size)
    item = {"image": letterbox_image(image, M, size), "tokens": tokenize(sentence, word_len)[0],
            "target": letterbox_mask(mask, M, size)[None], "inverse": torch.from_numpy(M_inv), "ori_size": (h, w),
            "sentence": sentence, "ref_id": int(ref_id)}
    if mode != "train":
        item["gt"] = torch.from_numpy(mask != 0)
    return item


STACKED = ("image", "tokens", "target")
LISTED = ("gt", "inverse", "ori_size", "sentence")


def collate(items: Sequence[dict]) -> dict:
    """Batch items: "image" [B, 3, S, S], "tokens" [B, L], "target" [B, 1, S, S] and "ref_id" int64 [B] stacked;
    "gt" (val / test), "inverse", "ori_size" and "sentence" kept as per-item lists (original sizes differ)."""
    if not items:
        raise ValueError("collate: 'items' is empty")
    out = {k: torch.stack([it[k] for it in items]) for k in STACKED}
    out["ref_id"] = torch.tensor([it["ref_id"] for it in items], dtype=torch.int64)
    for k in LISTED:
        if k in items[0]:
            out[k] = [it[k] for it in items]
    return out


def read_image(path: PathLike) -> np.ndarray:
    """RGB uint8 [h, w, 3] of an image file, decoded by OpenCV as the official loader (BGR -> RGB)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read the image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class _ReferItems(Dataset):
    """The sentence rules and epoch handling common to :class:`ReferDataset` and ``ShapesReferDataset``; a subclass
    sets ``self.sentences`` (one list of str per ref), ``self.ref_ids`` and implements ``_load(r) -> (image, mask)``."""

    mode: str
    size: int
    word_len: int
    seed: int
    sentences: list[list[str]]
    ref_ids: list[int]

    def _init_items(self) -> None:
        self.items = item_index([len(s) for s in self.sentences], self.mode)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Train mode draws each item's sentence from (seed, epoch, index): call this once per epoch."""
        self.epoch = check_int("epoch", f"{type(self).__name__}.set_epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{type(self).__name__}: index must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self.items):
            raise IndexError(f"{type(self).__name__}: index {i} out of range for length {len(self.items)}")
        r, k = self.items[int(i)]
        sents = self.sentences[r]
        if k < 0:
            k = train_sentence(self.seed, self.epoch, int(i), len(sents))
        image, mask = self._load(r)
        return make_item(image, mask, sents[k], self.ref_ids[r], self.mode, self.size, self.word_len)


class ReferDataset(_ReferItems):
    """CRIS items of one split of a refer dataset (module docstring for the files).

    Args:
        root: the folder holding ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        dataset, split_by: e.g. ("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google").
        split: "train", "val", "testA", "testB", "test", ... (the refs' "split" field, official matching rule).
        image_root: the folder of the images (COCO train2014).
        mode: "train": one item per ref, its sentence drawn uniformly per (epoch, index) from a generator seeded
            with ``seed`` (call :meth:`set_epoch` each epoch); "val": one item per ref with sentence 0 (the official
            training-time validation); "test": one item per sentence of every ref (the official test).
        size: the letterbox side (official 416).
        word_len: the token length (default 17 for refcoco / refcoco+, 22 for refcocog; for other names 22 when they
            start with "refcocog", else 17).
        seed: the train-mode sentence seed.

    Item dict: "image" float32 [3, S, S] (letterboxed, CLIP-normalised), "tokens" int64 [word_len], "target" float32
    [1, S, S] (the soft letterboxed mask in [0, 1]), "gt" bool [h, w] (val / test only: mask != 0 at the original
    resolution), "inverse" float64 [2, 3] (M_inv, letterbox -> original pixels), "ori_size" (h, w), "sentence" str,
    "ref_id" int. Refs without sentences give no items.
    """

    def __init__(self, root: PathLike, dataset: str, split_by: str, split: str, image_root: PathLike,
                 mode: str = "train", size: int = INPUT_SIZE, word_len: Optional[int] = None, seed: int = 0):
        fn = "ReferDataset"
        self.mode = check_mode(mode, fn)
        self.size = check_int("size", fn, size, 1)
        if word_len is None:
            word_len = WORD_LEN.get(dataset, 22 if str(dataset).startswith("refcocog") else 17)
        self.word_len = check_int("word_len", fn, word_len, 2)
        self.seed = check_int("seed", fn, seed, 0)
        if not isinstance(split, str):
            raise ValueError(f"{fn}: 'split' must be a str, got {split!r}")
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"{fn}: 'image_root' {self.image_root} is not a folder")
        self.refer = Refer(root, dataset, split_by)
        self.split = split
        self.refs = self.refer.refs_in(split)
        self.sentences = [[s["sent"].strip() for s in ref["sentences"]] for ref in self.refs]
        self.ref_ids = [int(ref["ref_id"]) for ref in self.refs]
        self._init_items()

    def records(self) -> list[dict]:
        """The official per-ref records of this split (:meth:`Refer.record`)."""
        return [self.refer.record(ref) for ref in self.refs]

    def _load(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        ref = self.refs[r]
        image = read_image(self.image_root / self.refer.image_name(ref))
        return image, self.refer.mask(ref)
