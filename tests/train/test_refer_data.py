"""CRIS data: the refer-format loader (train/data/refer.py) with its restricted unpickler, and ShapesWorld referring
expressions (train/data/cris_data.py), checked against each other, pycocotools and the official rules."""

import copyreg
import json
import os
import pickle
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from models.cris.tokenize import tokenize
from models.cris.transforms import letterbox_image, letterbox_mask, letterbox_matrix, unletterbox_prob
from train.data import cris_data as cd
from train.data import refer as rf
from train.data.shapes import ShapesWorld

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2

S = 96
WORLD = ShapesWorld(seed=2, size=(48, 64), max_objects=5)
# Identical objects: only superlatives and relations can tell them apart, so some objects are ambiguous.
TWINS = ShapesWorld(seed=0, size=(48, 64), min_objects=3, max_objects=5, categories=("circle",), colours=("red",),
                    sizes=("small",))


def _equal_items(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_refer")
    return cd.write_refer(WORLD, out, 4, splits=("train", "val", "testA"))


# ---------------------------------------------------------------------------------------------------------------------
# Restricted unpickling


@dataclass
class _Point:
    x: int


def test_malicious_pickle_is_rejected_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps([{"ref_id": 1, "sentences": [Evil()]}], protocol=protocol)
        with pytest.raises(rf.UnsafePickleError, match=r"refusing to load the global (posix|os|nt)\.system"):
            rf.loads_pickle(payload)
        assert not marker.exists()
    # The payload is real: the stock unpickler runs it.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    # Through the dataset: a refer folder whose refs pickle carries the payload.
    d = tmp_path / "root" / "refcoco"
    d.mkdir(parents=True)
    (d / "refs(unc).p").write_bytes(payload)
    (d / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (tmp_path / "img").mkdir()
    with pytest.raises(rf.UnsafePickleError, match=r"refs\(unc\)\.p: refusing"):
        rf.ReferDataset(tmp_path / "root", "refcoco", "unc", "train", tmp_path / "img")
    assert not marker.exists()


def test_other_unsafe_pickles_are_rejected():
    with pytest.raises(rf.UnsafePickleError, match="builtins.eval"):
        rf.loads_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0, GLOBAL + REDUCE
    with pytest.raises(rf.UnsafePickleError, match="_Point"):
        rf.loads_pickle(pickle.dumps({"a": _Point(3)}, protocol=4))  # a class instance
    with pytest.raises(rf.UnsafePickleError, match="persistent id"):
        rf.loads_pickle(b"\x80\x02X\x01\x00\x00\x00aQ.")  # BINPERSID
    with pytest.raises(rf.UnsafePickleError, match="set"):
        rf.loads_pickle(pickle.dumps({1, 2}, protocol=2))  # protocol 2 builds sets through builtins.set
    copyreg.add_extension(os.system.__module__, "system", 0x7ABC)  # the extension registry (EXT2) path
    try:
        payload = pickle.dumps(os.system, protocol=2)
        assert b"system" not in payload
        with pytest.raises(rf.UnsafePickleError, match="system"):
            rf.loads_pickle(payload)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 0x7ABC)


def test_plain_pickles_load():
    data = {"refs": [{"ref_id": 1, "split": "train", "box": (1.5, 2.0), "ok": True, "none": None, "n": 2 ** 70,
                      "sents": [{"sent": "the dog", "tokens": ["the", "dog"]}], "raw": b"\x00\xff", "ids": {1, 2},
                      "f": frozenset({3})}]}
    for protocol in range(4, pickle.HIGHEST_PROTOCOL + 1):  # sets have their own opcodes from protocol 4
        assert rf.loads_pickle(pickle.dumps(data, protocol=protocol)) == data
    no_sets = {"refs": [{k: v for k, v in data["refs"][0].items() if k not in ("ids", "f")}]}
    assert rf.loads_pickle(pickle.dumps(no_sets, protocol=3)) == no_sets  # bytes need protocol 3
    lst = [1, 2]
    lst.append(lst)  # self-reference through the memo
    back = rf.loads_pickle(pickle.dumps(lst, protocol=2))
    assert back[2] is back
    # A Python 2 pickle (SHORT_BINSTRING 8-bit strings, as in the released refs files) decodes as UTF-8.
    assert rf.loads_pickle(b"\x80\x02]q\x00(U\x05caf\xc3\xa9q\x01K\x07e.") == ["caf\u00e9", 7]


# ---------------------------------------------------------------------------------------------------------------------
# The refer format, on a hand-made folder


def _official_mask(seg, h, w):
    """The official getMask + * 255, written out (polygons only, as refer.py handles them)."""
    rle = mask_utils.frPyObjects(seg, h, w)
    return np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    d, img_dir = root / "refcoco", root / "images"
    d.mkdir()
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    img7 = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    img8 = rng.integers(0, 256, (20, 25, 3), dtype=np.uint8)
    cv2.imwrite(str(img_dir / "COCO_train2014_000000000007.jpg"), img7)  # BGR on disk
    cv2.imwrite(str(img_dir / "other.png"), img8)
    polys = [[2, 2, 20, 2, 20, 20, 2, 20], [10, 10, 30, 10, 30, 25, 10, 25]]  # overlapping squares
    m101 = np.zeros((30, 40), np.uint8)
    m101[5:9, 3:30] = 1
    m102 = np.zeros((20, 25), np.uint8)
    m102[2:15, 4:6] = 1
    m102[10, :] = 1
    u = mask_utils.encode(np.asfortranarray(m101))
    unc_counts, cur, run = [], 0, 0  # uncompressed COCO RLE: column-major run lengths, zeros first
    for v in m101.T.ravel():
        if v == cur:
            run += 1
        else:
            unc_counts.append(run)
            cur, run = v, 1
    unc_counts.append(run)
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects({"size": [30, 40], "counts": unc_counts}, 30, 40)),
                          m101)
    assert np.array_equal(mask_utils.decode(u), m101)
    c102 = mask_utils.encode(np.asfortranarray(m102))
    inst = {"images": [{"id": 7, "height": 30, "width": 40}, {"id": 8, "height": 20, "width": 25,
                                                                "file_name": "other.png"}],
            "annotations": [
                {"id": 100, "image_id": 7, "category_id": 13, "segmentation": polys, "bbox": [2.7, 2.2, 28.9, 23.5]},
                {"id": 101, "image_id": 7, "category_id": 1, "segmentation": {"size": [30, 40], "counts": unc_counts},
                 "bbox": [3, 5, 27, 4]},
                {"id": 102, "image_id": 8, "category_id": 90,
                 "segmentation": {"size": [20, 25], "counts": c102["counts"].decode("ascii")}, "bbox": [0, 2, 25, 13]}],
            "categories": [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}, {"id": 90, "name": "brush"}]}
    (d / "instances.json").write_text(json.dumps(inst))

    def ref(rid, ann, img, cat, split, sents):
        return {"ref_id": rid, "ann_id": ann, "image_id": img, "category_id": cat, "split": split,
                "sentences": [{"sent_id": 10 * rid + k, "sent": s, "raw": s, "tokens": s.split()}
                              for k, s in enumerate(sents)]}

    refs = [ref(1, 100, 7, 13, "train", ["  the stop sign ", "red sign"]), ref(2, 101, 7, 1, "testA", ["a bar"]),
            ref(3, 102, 8, 90, "testAB", ["the cross", "a plus", "thing"]), ref(4, 100, 7, 13, "val", []),
            ref(5, 102, 8, 90, "testB", ["brush"])]
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return {"root": root, "images": img_dir, "img7": img7[..., ::-1].copy(), "img8": img8[..., ::-1].copy(),
            "polys": polys, "m101": m101, "m102": m102}


def test_masks_are_decoded_as_official(hand):
    r = rf.Refer(hand["root"], "refcoco", "unc")
    refs = {ref["ref_id"]: ref for ref in r.refs}
    m = r.mask(refs[1])
    assert m.dtype == np.uint8 and m.shape == (30, 40)
    assert np.array_equal(m, _official_mask(hand["polys"], 30, 40))
    assert set(np.unique(m)) == {0, 254, 255} and m[15, 15] == 254  # the two polygons overlap there
    assert np.array_equal(r.mask(refs[2]), hand["m101"] * 255)  # uncompressed RLE
    assert np.array_equal(r.mask(refs[3]), hand["m102"] * 255)  # compressed RLE (str counts)
    assert np.array_equal(rf.decode_segmentation({"size": [20, 25], "counts": mask_utils.encode(
        np.asfortranarray(hand["m102"]))["counts"]}, 20, 25), hand["m102"] * 255)  # bytes counts
    with pytest.raises(ValueError, match="RLE size"):
        rf.decode_segmentation({"size": [20, 26], "counts": "abc"}, 20, 25)
    with pytest.raises(ValueError, match="unknown segmentation"):
        rf.decode_segmentation(7, 20, 25)


def test_records_splits_and_categories(hand):
    r = rf.Refer(hand["root"], "refcoco", "unc")
    assert r.splits == ("train", "testA", "testAB", "val", "testB")
    ids = lambda split: [ref["ref_id"] for ref in r.refs_in(split)]  # noqa: E731
    assert ids("train") == [1] and ids("val") == [4]
    assert ids("testA") == [2, 3] and ids("testB") == [3, 5] and ids("test") == [2, 3, 5]  # the official rule
    with pytest.raises(ValueError, match="no refs of split 'testC'"):
        r.refs_in("testC")
    rec = r.records("train")[0]
    assert rec == {"bbox": [2, 2, 30, 25], "cat": 11, "segment_id": 1, "img_name": "COCO_train2014_000000000007.jpg",
                   "sentences": [{"idx": 0, "sent_id": 10, "sent": "the stop sign"},
                                 {"idx": 1, "sent_id": 11, "sent": "red sign"}], "sentences_num": 2}
    assert r.records("testB")[1]["img_name"] == "other.png" and r.records("testB")[1]["cat"] == 79
    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert [rf.coco_category(i) for i in coco_ids] == list(range(80))
    assert rf.coco_box([10.7, 20.2, 30.9, 40.5]) == [10, 20, 40, 60]


def test_refer_dataset_items(hand):
    ds = rf.ReferDataset(hand["root"], "refcoco", "unc", "test", hand["images"], mode="test", size=S)
    assert ds.word_len == 17 and len(ds) == 1 + 3 + 1  # every sentence of refs 2, 3, 5
    it = ds[1]
    assert it["ref_id"] == 3 and it["sentence"] == "the cross" and it["ori_size"] == (20, 25)
    M, Mi = letterbox_matrix(20, 25, S)
    assert torch.equal(it["image"], letterbox_image(hand["img8"], M, S))
    assert torch.equal(it["target"], letterbox_mask(hand["m102"] * 255, M, S)[None])
    assert torch.equal(it["gt"], torch.from_numpy(hand["m102"] == 1)) and it["gt"].dtype == torch.bool
    assert torch.equal(it["inverse"], torch.from_numpy(Mi)) and it["inverse"].dtype == torch.float64
    assert torch.equal(it["tokens"], tokenize("the cross", 17)[0])
    assert [ds[i]["sentence"] for i in range(len(ds))] == ["a bar", "the cross", "a plus", "thing", "brush"]
    # JPEG decoded by OpenCV, BGR -> RGB.
    tr = rf.ReferDataset(hand["root"], "refcoco", "unc", "train", hand["images"], mode="train", size=S)
    rgb = cv2.cvtColor(cv2.imread(str(hand["images"] / "COCO_train2014_000000000007.jpg")), cv2.COLOR_BGR2RGB)
    assert torch.equal(tr[0]["image"], letterbox_image(rgb, letterbox_matrix(30, 40, S)[0], S))
    assert "gt" not in tr[0] and tr[0]["sentence"] in ("the stop sign", "red sign")
    # A ref without sentences gives no item.
    assert len(rf.ReferDataset(hand["root"], "refcoco", "unc", "val", hand["images"], mode="val", size=S)) == 0


def test_train_sentence_draws(hand):
    ds = rf.ReferDataset(hand["root"], "refcoco", "unc", "testB", hand["images"], mode="train", size=S, seed=5)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        k = rf.train_sentence(5, epoch, 0, 3)
        assert ds[0]["sentence"] == ["the cross", "a plus", "thing"][k]
        seen.add(k)
    assert seen == {0, 1, 2}  # uniform over the ref's sentences
    again = rf.ReferDataset(hand["root"], "refcoco", "unc", "testB", hand["images"], mode="train", size=S, seed=5)
    again.set_epoch(11)
    assert again[0]["sentence"] == ds[0]["sentence"]  # reproducible
    val = rf.ReferDataset(hand["root"], "refcoco", "unc", "testB", hand["images"], mode="val", size=S)
    assert [val[i]["sentence"] for i in range(len(val))] == ["the cross", "brush"]  # sentence 0 of each ref


def test_refer_dataset_bad_inputs(hand, tmp_path):
    root, images = hand["root"], hand["images"]
    with pytest.raises(ValueError, match="'mode'"):
        rf.ReferDataset(root, "refcoco", "unc", "train", images, mode="eval")
    with pytest.raises(ValueError, match="'size'"):
        rf.ReferDataset(root, "refcoco", "unc", "train", images, size=0)
    with pytest.raises(ValueError, match="'word_len'"):
        rf.ReferDataset(root, "refcoco", "unc", "train", images, word_len=1)
    with pytest.raises(ValueError, match="'seed'"):
        rf.ReferDataset(root, "refcoco", "unc", "train", images, seed=-1)
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        rf.ReferDataset(root, "refcoco", "google", "train", images)
    with pytest.raises(FileNotFoundError, match="'image_root'"):
        rf.ReferDataset(root, "refcoco", "unc", "train", tmp_path / "nope")
    with pytest.raises(ValueError, match="'split_by'"):
        rf.Refer(root, "refcoco", "")
    ds = rf.ReferDataset(root, "refcoco", "unc", "train", images, size=S)
    with pytest.raises(IndexError):
        ds[1]
    with pytest.raises(TypeError):
        ds[0.0]
    with pytest.raises(ValueError, match="'epoch'"):
        ds.set_epoch(-1)
    d = tmp_path / "r" / "refcoco"
    d.mkdir(parents=True)
    (d / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    (d / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="ref #0 must be a dict"):
        rf.Refer(tmp_path / "r", "refcoco", "unc")
    with pytest.raises(ValueError, match="'items' is empty"):
        rf.collate([])


# ---------------------------------------------------------------------------------------------------------------------
# ShapesWorld referring expressions and the writer


def test_refer_files_give_the_same_items(written):
    for split in ("train", "val", "testA"):
        for mode in rf.MODES:
            ours = cd.ShapesReferDataset(WORLD, split, 4, size=S, mode=mode)
            theirs = rf.ReferDataset(written, "shapes_refer", "unc", split, written / "images", mode=mode, size=S)
            assert len(ours) == len(theirs) > 0
            assert ours.records() == theirs.records()
            for epoch in (0, 3) if mode == "train" else (0,):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                for i in range(len(ours)):
                    assert _equal_items(ours[i], theirs[i]), (split, mode, epoch, i)
    # The written files are the real format: plain containers, RLE segmentations, COCO-like image names.
    refs = rf.load_pickle(written / "shapes_refer" / "refs(unc).p")
    assert {r["split"] for r in refs} == {"train", "val", "testA"} and "sent_ids" in refs[0]
    inst = json.loads((written / "shapes_refer" / "instances.json").read_text())
    assert inst["images"][0]["file_name"] == "COCO_train2014_000000000000.png"
    assert isinstance(inst["annotations"][0]["segmentation"]["counts"], str)
    assert not list((written / "shapes_refer").glob("*.tmp"))


def test_refs_skip_ambiguous_objects_and_resolve():
    skipped = 0
    ds = cd.ShapesReferDataset(TWINS, "train", 12, size=S, mode="test", max_sentences=None)
    by_scene = {}
    for ref in ds.refs:
        by_scene.setdefault(ref["scene"], []).append(ref)
    for s in cd.split_scenes("train", 12):
        scene = TWINS.scene(s)
        expect = [j for j in range(len(scene.specs)) if scene.expressions(j) and scene.masks[j].any()]
        skipped += len(scene.specs) - len(expect)
        got = by_scene.get(s, [])
        assert [r["object"] for r in got] == expect
        for r in got:
            j = r["object"]
            texts = {e.text: e for e in scene.expressions(j)}
            assert r["sentences"] == list(texts) and r["sentences"][0] == scene.expression(j).text
            assert all(scene.resolve(texts[t]) == [j] for t in r["sentences"])
            assert r["ref_id"] == 32 * s + j
    assert skipped > 0  # the twins world does have ambiguous objects
    assert len(ds) == sum(len(r["sentences"]) for r in ds.refs)
    # max_sentences keeps sentence 0 and a seeded subset in grammar order.
    few = cd.ShapesReferDataset(TWINS, "train", 12, size=S, mode="test", max_sentences=2)
    for a, b in zip(ds.refs, few.refs):
        assert b["sentences"][0] == a["sentences"][0] and len(b["sentences"]) == min(2, len(a["sentences"]))
        assert all(t in a["sentences"] for t in b["sentences"])
        assert [a["sentences"].index(t) for t in b["sentences"]] == sorted(a["sentences"].index(t)
                                                                             for t in b["sentences"])
    one = cd.ShapesReferDataset(TWINS, "train", 12, size=S, mode="test", max_sentences=1)
    assert len(one) == len(one.refs)


def test_shapes_items_and_inverse_path():
    ds = cd.ShapesReferDataset(WORLD, "val", 6, size=S, mode="val")
    M, Mi = letterbox_matrix(48, 64, S)
    ious = []
    for i in range(len(ds)):
        it, ref = ds[i], ds.refs[i]
        scene = WORLD.scene(ref["scene"])
        mask = scene.masks[ref["object"]]
        assert it["sentence"] == ref["sentences"][0] and it["ori_size"] == (48, 64) and it["ref_id"] == ref["ref_id"]
        assert torch.equal(it["gt"], torch.from_numpy(mask))
        assert torch.equal(it["image"], letterbox_image(cd.scene_rgb(scene), M, S))
        assert torch.equal(it["target"][0], letterbox_mask(mask, M, S))
        assert torch.equal(it["inverse"], torch.from_numpy(Mi))
        assert it["tokens"].shape == (17,) and it["tokens"].dtype == torch.int64
        back = unletterbox_prob(it["target"], it["inverse"], it["ori_size"], S).numpy() > 0.35
        ious.append((back & mask).sum() / (back | mask).sum())
    assert np.mean(ious) > 0.95  # the soft target, warped back, is the ground truth
    assert np.array_equal(cd.scene_rgb(WORLD.scene(0)), np.round(WORLD.scene(0).image * 255).astype(np.uint8))


def test_splits_are_disjoint_scene_ranges():
    assert cd.split_scenes("train", 5) == range(0, 5)
    assert cd.split_scenes("val", 3) == range(2 ** 24, 2 ** 24 + 3)
    assert cd.split_scenes("test", 1) == range(4 * 2 ** 24, 4 * 2 ** 24 + 1)
    a = cd.ShapesReferDataset(WORLD, "train", 5, size=S, mode="val")
    b = cd.ShapesReferDataset(WORLD, "testB", 5, size=S, mode="val")
    assert not {r["scene"] for r in a.refs} & {r["scene"] for r in b.refs}
    assert not set(a.ref_ids) & set(b.ref_ids)


def test_modes_collate_and_loader():
    tr = cd.ShapesReferDataset(WORLD, "train", 3, size=S, mode="train")
    assert len(tr) == len(tr.refs) and "gt" not in tr[0]
    tr.set_epoch(1)
    sents = [tr[i]["sentence"] for i in range(len(tr))]
    assert all(s in r["sentences"] for s, r in zip(sents, tr.refs))
    loader = DataLoader(cd.ShapesReferDataset(WORLD, "val", 3, size=S, mode="test"), batch_size=4,
                        collate_fn=rf.collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, S, S) and batch["tokens"].shape == (4, 17)
    assert batch["target"].shape == (4, 1, S, S) and batch["ref_id"].dtype == torch.int64
    assert len(batch["gt"]) == len(batch["inverse"]) == len(batch["ori_size"]) == len(batch["sentence"]) == 4
    assert batch["gt"][0].shape == (48, 64)
    tb = rf.collate([tr[0], tr[1]])
    assert "gt" not in tb and tb["image"].shape == (2, 3, S, S)


def test_word_len_defaults(tmp_path):
    cd.write_refer(WORLD, tmp_path, 1, dataset="refcocog", split_by="umd", splits=("train",))
    cd.write_refer(WORLD, tmp_path, 1, dataset="refcoco+", split_by="unc", splits=("train",))
    g = rf.ReferDataset(tmp_path, "refcocog", "umd", "train", tmp_path / "images", size=S)
    p = rf.ReferDataset(tmp_path, "refcoco+", "unc", "train", tmp_path / "images", size=S)
    n = rf.ReferDataset(tmp_path, "refcoco+", "unc", "train", tmp_path / "images", size=S, word_len=9)
    assert g[0]["tokens"].shape == (22,) and p[0]["tokens"].shape == (17,) and n[0]["tokens"].shape == (9,)


def test_shapes_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="'world'"):
        cd.ShapesReferDataset("world", "train", 2)
    with pytest.raises(ValueError, match="'split'"):
        cd.ShapesReferDataset(WORLD, "dev", 2)
    with pytest.raises(ValueError, match="'num_scenes'"):
        cd.ShapesReferDataset(WORLD, "train", 0)
    with pytest.raises(ValueError, match="'num_scenes'"):
        cd.split_scenes("train", 2 ** 24 + 1)
    with pytest.raises(ValueError, match="'mode'"):
        cd.ShapesReferDataset(WORLD, "train", 2, mode="dev")
    with pytest.raises(ValueError, match="'max_sentences'"):
        cd.ShapesReferDataset(WORLD, "train", 2, max_sentences=0)
    with pytest.raises(ValueError, match="'splits'"):
        cd.write_refer(WORLD, tmp_path, 1, splits="train")
    with pytest.raises(ValueError, match="'splits'"):
        cd.write_refer(WORLD, tmp_path, 1, splits=("train", "train"))
    with pytest.raises(ValueError, match="'dataset'"):
        cd.write_refer(WORLD, tmp_path, 1, dataset="../x")
    with pytest.raises(TypeError, match="'world'"):
        cd.write_refer(None, tmp_path, 1)
