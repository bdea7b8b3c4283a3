"""The open-vocabulary evaluation loaders on files written by the ShapesWorld writers and by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from models.unpair_seg.metrics import PanopticMetrics, SemanticMetrics
from train.data.seg_eval import (BACKGROUND_SEGMENT_ID, COCOPanopticDataset, SemanticSegDataset, id2rgb,
                                 read_class_file, read_label, rgb2id, write_class_file, write_shapes_panoptic,
                                 write_shapes_semantic)
from train.data.shapes import CATEGORIES, ShapesWorld

WORLD = ShapesWorld(seed=3, size=(32, 40), min_objects=2, max_objects=4)
INDICES = [0, 5, 7]


def _rgb(scene):
    return np.round(np.clip(scene.image, 0, 1) * 255).astype(np.uint8)


def test_semantic_writer_round_trip(tmp_path):
    root = write_shapes_semantic(WORLD, INDICES, tmp_path / "sem", split="val")
    ds = SemanticSegDataset(root / "images" / "val", root / "annotations" / "val", root / "classes.txt")
    assert ds.class_names == list(CATEGORIES) + ["background"] and ds.num_classes == 7 and ds.ignore_label == 255
    assert len(ds) == 3
    for item, i in zip(ds, INDICES):
        scene = WORLD.scene(i)
        expected = np.full((32, 40), 6, dtype=np.int64)
        for j, sp in enumerate(scene.specs):
            expected[scene.instance == j + 1] = CATEGORIES.index(sp.category)
        assert item["label"].dtype == np.int64 and np.array_equal(item["label"], expected)
        assert np.array_equal(item["image"], _rgb(scene))
        assert (item["height"], item["width"], item["file_name"]) == (32, 40, "shapes_%08d.png" % i)
    # Ground truth against itself: mIoU 1 over the classes present.
    m = SemanticMetrics(ds.num_classes, ds.ignore_label)
    for item in ds:
        m.update(item["label"], item["label"])
    assert m.compute()["mIoU"] == 1.0


def test_semantic_writer_background_ignored(tmp_path):
    root = write_shapes_semantic(WORLD, [0], tmp_path, split="test", background="ignore")
    ds = SemanticSegDataset(root / "images" / "test", root / "annotations" / "test", root / "classes.txt")
    assert ds.class_names == list(CATEGORIES)
    label = ds[0]["label"]
    assert np.array_equal(label == 255, WORLD.scene(0).instance == 0)
    with pytest.raises(ValueError, match="background"):
        write_shapes_semantic(WORLD, [0], tmp_path, background="drop")


def _make(tmp_path, names, labels, suffix=".png", image_suffix=".jpg", sub=""):
    img_dir, lab_dir = tmp_path / "img", tmp_path / "lab"
    for k, lab in enumerate(labels):
        (img_dir / sub).mkdir(parents=True, exist_ok=True)
        (lab_dir / sub).mkdir(parents=True, exist_ok=True)
        h, w = lab.shape
        Image.fromarray(np.full((h, w, 3), 40 * k, dtype=np.uint8)).save(img_dir / sub / f"im{k}{image_suffix}")
        Image.fromarray(lab).save(lab_dir / sub / f"im{k}{suffix}")
    write_class_file(tmp_path / "classes.txt", names)
    return img_dir, lab_dir, tmp_path / "classes.txt"


def test_label_conventions(tmp_path):
    rng = np.random.default_rng(0)
    # ADE20K-150 raw: 0 = ignore, v -> v - 1.
    raw = rng.integers(0, 4, (5, 6)).astype(np.uint8)
    img, lab, cls = _make(tmp_path / "ade", ["wall", "floor, flooring", "sky"], [raw])
    ds = SemanticSegDataset(img, lab, cls, preset="ade20k_150_raw")
    np.testing.assert_array_equal(ds[0]["label"], np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    assert ds.class_names[1] == "floor, flooring"
    # uint16 TIFF (ADE-847 / PASCAL-Context-459 style): 65535 = ignore; with K > 255 the items' ignore is 65535.
    raw16 = rng.integers(0, 300, (4, 5)).astype(np.uint16)
    raw16[0, :2] = 65535
    img, lab, cls = _make(tmp_path / "a847", [f"c{k}" for k in range(300)], [raw16], suffix=".tif")
    ds = SemanticSegDataset(img, lab, cls, preset="ade20k_847")
    assert read_label(lab / "im0.tif").dtype == np.uint16
    assert ds.ignore_label == 65535
    np.testing.assert_array_equal(ds[0]["label"], raw16.astype(np.int64))
    # Cityscapes suffixes, nested city folders.
    city = np.array([[0, 18, 255], [3, 4, 5]], dtype=np.uint8)
    img, lab, cls = _make(tmp_path / "city", [f"t{k}" for k in range(19)], [city], suffix="_gtFine_labelTrainIds.png",
                          image_suffix="_leftImg8bit.png", sub="frankfurt")
    ds = SemanticSegDataset(img, lab, cls, preset="cityscapes")
    assert ds[0]["file_name"] == "frankfurt/im0_leftImg8bit.png"
    np.testing.assert_array_equal(ds[0]["label"], city.astype(np.int64))


def test_semantic_loader_errors(tmp_path):
    bad = np.array([[0, 7]], dtype=np.uint8)
    img, lab, cls = _make(tmp_path, ["a", "b"], [bad])
    ds = SemanticSegDataset(img, lab, cls)
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        ds[0]
    (lab / "im0.png").unlink()
    with pytest.raises(FileNotFoundError, match="no label"):
        SemanticSegDataset(img, lab, cls)
    with pytest.raises(ValueError, match="preset"):
        SemanticSegDataset(img, lab, cls, preset="nope")
    with pytest.raises(ValueError, match="ignore_label"):
        SemanticSegDataset(img, lab, cls, ignore_label=1)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no class names"):
        read_class_file(tmp_path / "empty.txt")


def test_rgb2id_round_trip():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256 ** 3, (6, 7))
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    r, g, b = (rgb[..., c].astype(np.int64) for c in range(3))
    np.testing.assert_array_equal(r + 256 * g + 65536 * b, ids)


def test_panoptic_writer_round_trip(tmp_path):
    root = write_shapes_panoptic(WORLD, INDICES, tmp_path / "pan", split="val")
    js = json.loads((root / "annotations" / "panoptic_val.json").read_text())
    assert [c["id"] for c in js["categories"]] == list(range(1, len(CATEGORIES) + 2))
    ds = COCOPanopticDataset(root / "annotations" / "panoptic_val.json", root / "panoptic_val", root / "val")
    assert ds.class_names == list(CATEGORIES) + ["background"]
    assert ds.is_thing == [True] * len(CATEGORIES) + [False]
    assert len(ds) == 3
    metrics = PanopticMetrics(ds.categories)
    for item, i in zip(ds, INDICES):
        scene = WORLD.scene(i)
        expected = np.where(scene.instance > 0, scene.instance, BACKGROUND_SEGMENT_ID)
        np.testing.assert_array_equal(item["pan"], expected)
        np.testing.assert_array_equal(item["image"], _rgb(scene))
        segs = item["segments_info"]
        assert sorted(s["id"] for s in segs) == sorted(np.unique(item["pan"]).tolist())
        for s in segs:
            m = item["pan"] == s["id"]
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            assert s["area"] == int(m.sum())
            assert s["bbox"] == [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
            assert s["iscrowd"] == 0
            if s["id"] == BACKGROUND_SEGMENT_ID:
                assert s["category_id"] == len(CATEGORIES) + 1
            else:
                assert s["category_id"] == CATEGORIES.index(scene.specs[s["id"] - 1].category) + 1
        metrics.update(item["pan"], segs, item["pan"], segs)
    r = metrics.compute()
    assert r["PQ"] == pytest.approx(1.0) and r["n_st"] == 1


def test_panoptic_loader_class_file_and_errors(tmp_path):
    root = write_shapes_panoptic(WORLD, [0], tmp_path, split="s")
    names = [f"{c}, {c} shape" for c in CATEGORIES] + ["background, floor"]
    write_class_file(tmp_path / "names.txt", names)
    ds = COCOPanopticDataset(root / "annotations" / "panoptic_s.json", root / "panoptic_s", root / "s",
                             class_file=tmp_path / "names.txt")
    assert ds.class_names == names
    write_class_file(tmp_path / "short.txt", names[:2])
    with pytest.raises(ValueError, match="2 names for 7 categories"):
        COCOPanopticDataset(root / "annotations" / "panoptic_s.json", root / "panoptic_s", root / "s",
                            class_file=tmp_path / "short.txt")
    with pytest.raises(FileNotFoundError):
        COCOPanopticDataset(root / "missing.json", root / "panoptic_s", root / "s")
    with pytest.raises(ValueError, match="duplicates"):
        write_shapes_panoptic(WORLD, [1, 1], tmp_path)
    with pytest.raises(TypeError, match="ShapesWorld"):
        write_shapes_semantic(object(), [1], tmp_path)
