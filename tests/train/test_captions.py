"""train/data/captions.py: JSONL caption manifests (plain and ShareGPT4V-style) read into canvas images + entity lists,
on files that ShapesWorld writes (exact entities, stored or extracted) and on hand-written manifests with non-square
images; the canvas against an independent PIL composition of the official preprocessing; errors name file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.unpair_seg.entities import ShapesWorldEntities
from train.data.captions import (CaptionDataset, collate_captions, read_manifest, record_caption,
                                 write_shapes_captions)
from train.data.shapes import ShapesWorld


def _canvas_ref(img: np.ndarray, size: int) -> np.ndarray:
    """Longest side -> size (detectron2 rounding int(x + 0.5)), PIL bilinear, pad 128 bottom/right."""
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR)) if (nh, nw) != (h, w) else img
    canvas = np.full((size, size, 3), 128, np.uint8)
    canvas[:nh, :nw] = out
    return canvas


@pytest.mark.parametrize("style", ["plain", "sharegpt4v"])
def test_shapes_world_manifest_round_trip(tmp_path, style):
    world = ShapesWorld(seed=2, size=(48, 48), max_objects=4)
    indices = [0, 3, 7, 11, 12]
    path = write_shapes_captions(world, indices, tmp_path, style=style)
    assert path == tmp_path / "captions.jsonl"
    recs = read_manifest(path)
    assert [r["scene"] for r in recs] == indices
    assert ("caption" in recs[0]) == (style == "plain") and ("conversations" in recs[0]) == (style != "plain")
    ds = CaptionDataset(path, 96)
    rule = CaptionDataset(path, 96, use_manifest_entities=False)  # the default rule-based extractor
    exact = CaptionDataset(path, 96, extractor="shapes", use_manifest_entities=False)
    assert len(ds) == 5
    for k, i in enumerate(indices):
        scene = world.scene(i)
        want = list(dict.fromkeys(f"{s.size} {s.colour} {s.category}" for s in scene.specs))
        item = ds[k]
        assert item["caption"] == scene.caption()
        assert item["entities"] == want == rule.entities(k) == exact.entities(k)
        pixels = np.clip(np.rint(scene.image * 255), 0, 255).astype(np.uint8)
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 96, 96)
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), _canvas_ref(pixels, 96))
        assert item["size"].tolist() == [96, 96] and item["orig_size"].tolist() == [48, 48] and item["index"] == k
    assert ShapesWorldEntities()(ds.caption(0)) == ds.entities(0)


def test_writer_without_entities_leaves_them_to_the_extractor(tmp_path):
    world = ShapesWorld(seed=5, size=(32, 32))
    path = write_shapes_captions(world, range(4), tmp_path, entities=False)
    assert all("entities" not in r for r in read_manifest(path))
    ds = CaptionDataset(path, 64)
    for i in range(4):
        assert ds.entities(i) == ShapesWorldEntities().from_scene(world.scene(i))


def test_hand_written_manifest_both_styles(tmp_path):
    g = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    wide = g.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    tall = g.integers(0, 256, (50, 20, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "img" / "wide.png")
    Image.fromarray(tall).save(tmp_path / "tall.png")
    recs = [
        {"image": "img/wide.png", "caption": "A black dog sleeps on a red sofa."},
        {"id": "x", "image": str(tmp_path / "tall.png"),
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                           {"from": "gpt", "value": "Two cats next to a window."}]},
        {"image": "img/wide.png", "caption": "ignored", "entities": ["lamp", "old table"]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:2]) + "\n\n" + json.dumps(recs[2]) + "\n")
    ds = CaptionDataset(tmp_path / "m.jsonl", 64)
    assert len(ds) == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert a["entities"] == ["black dog", "red sofa"] and b["entities"] == ["cat", "window"]
    assert c["entities"] == ["lamp", "old table"] and c["caption"] == "ignored"
    assert b["caption"] == "Two cats next to a window."
    assert a["orig_size"].tolist() == [40, 60] and a["size"].tolist() == [43, 64]
    assert b["orig_size"].tolist() == [50, 20] and b["size"].tolist() == [64, 26]
    assert np.array_equal(a["image"].permute(1, 2, 0).numpy(), _canvas_ref(wide, 64))
    assert np.array_equal(b["image"].permute(1, 2, 0).numpy(), _canvas_ref(tall, 64))
    assert int(b["image"][:, :, 26:].min()) == 128 == int(b["image"][:, :, 26:].max())  # the pad
    batch = collate_captions([a, b, c])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["entities"] == [a["entities"], b["entities"], c["entities"]]
    assert batch["size"].tolist() == [[43, 64], [64, 26], [43, 64]] and batch["index"].tolist() == [0, 1, 2]
    # image_root replaces the manifest's folder for relative paths.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "m.jsonl").write_text(json.dumps(recs[0]) + "\n")
    assert CaptionDataset(other / "m.jsonl", 64, image_root=tmp_path)[0]["orig_size"].tolist() == [40, 60]
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize("line,match", [
    ("{not json", r"m.jsonl:2: not valid JSON"),
    ('{"image": "a.png"}', r"m.jsonl:2: expected 'caption'"),
    ('{"image": "a.png", "caption": 3}', r"'caption' must be a string"),
    ('{"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}', r"no turn from 'gpt'"),
    ('{"caption": "a cat"}', r"'image' must be a non-empty path"),
    ('{"image": "a.png", "caption": "a cat", "entities": "cat"}', r"'entities' must be a list"),
    ("[1, 2]", r"must be a JSON object"),
])
def test_bad_manifests_name_file_and_line(tmp_path, line, match):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        CaptionDataset(tmp_path / "m.jsonl", 64)


def test_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CaptionDataset(tmp_path / "missing.jsonl", 64)
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n')
    with pytest.raises(ValueError, match="image_size"):
        CaptionDataset(tmp_path / "m.jsonl", 0)
    with pytest.raises(FileNotFoundError):
        CaptionDataset(tmp_path / "m.jsonl", 64)[0]  # the image file is missing
    with pytest.raises(ValueError, match="style"):
        write_shapes_captions(ShapesWorld(), [0], tmp_path, style="coco")
    with pytest.raises(ValueError, match="empty"):
        write_shapes_captions(ShapesWorld(), [], tmp_path)
    assert record_caption({"conversations": [{"from": "assistant", "value": "a"}]}) == "a"
