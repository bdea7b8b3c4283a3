"""train/data/sa1b.py: the SA-1B loader on files that the ShapesWorld writer produces, and on hand-made SA-1B items.

* the writer: RLE round trip equals the scene masks, the group unions, boxes, areas, inner points;
* the loader: nested (many-to-many) point targets, the area filter, the instance cap, LSJ geometry (masks stay on
  the image content, against an independent nearest-neighbour reference), determinism by (seed, epoch, index),
  collate padding, and errors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from train.data import sa1b
from train.data.sa1b import SA1BDataset, collate, write_shapes_sa1b
from train.data.shapes import ShapesWorld

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
WORLD = ShapesWorld(seed=3, size=(48, 64), min_objects=3, max_objects=6)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b_shapes")
    ids = write_shapes_sa1b(WORLD, range(12), root)
    assert ids == [f"sa_{i}" for i in range(12)]
    assert SA1BDataset(root, 64).ids == sorted(ids)
    return root


def _groups_by_hand(instance: np.ndarray, n: int) -> list[set]:
    """Connected components of 4-adjacent different objects, by flood fill over the adjacency set."""
    adj = {j: set() for j in range(n)}
    h, w = instance.shape
    for y in range(h):
        for x in range(w):
            a = instance[y, x]
            for yy, xx in ((y + 1, x), (y, x + 1)):
                if yy < h and xx < w:
                    b = instance[yy, xx]
                    if a and b and a != b:
                        adj[a - 1].add(b - 1)
                        adj[b - 1].add(a - 1)
    seen, out = set(), []
    for j in range(n):
        if j in seen:
            continue
        comp, todo = set(), [j]
        while todo:
            k = todo.pop()
            if k not in comp:
                comp.add(k)
                todo.extend(adj[k] - comp)
        seen |= comp
        if len(comp) >= 2:
            out.append(comp)
    return out


def test_rle_round_trip_equals_the_scene_masks(shapes_root):
    groups_seen = 0
    for i in range(12):
        scene = WORLD.scene(i)
        meta = json.loads((shapes_root / f"sa_{i}.json").read_text())
        assert meta["image"] == {"image_id": i, "width": 64, "height": 48, "file_name": f"sa_{i}.jpg"}
        anns = meta["annotations"]
        objects = [a for a in anns if a["shapes"]["level"] == 0]
        groups = [a for a in anns if a["shapes"]["level"] == 1]
        assert [a["shapes"]["objects"] for a in objects] == [[j] for j in range(len(scene.specs))
                                                             if scene.masks[j].any()]
        want_groups = _groups_by_hand(scene.instance, len(scene.specs))
        assert [set(a["shapes"]["objects"]) for a in groups] == want_groups
        groups_seen += len(groups)
        for a in anns:
            rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
            m = mask_utils.decode(rle).astype(bool)
            want = scene.masks[a["shapes"]["objects"]].any(0)
            assert np.array_equal(m, want)
            assert np.array_equal(sa1b.decode_rle(a["segmentation"]), want)
            ys, xs = np.nonzero(want)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == int(want.sum())
            px, py = a["point_coords"][0]
            assert want[int(py), int(px)]  # the inner point lies in its mask
        assert len({a["id"] for a in anns}) == len(anns)
        img = np.asarray(Image.open(shapes_root / f"sa_{i}.jpg").convert("RGB")).astype(float)
        assert np.abs(img - np.round(scene.image * 255)).mean() < 3.0  # JPEG q95, 4:4:4
    assert groups_seen > 0  # the scenes do exercise the nested level


def test_nested_point_targets_without_augmentation(shapes_root):
    """Inference geometry (the long side 64 fills the canvas exactly): the loaded masks are the scene's, every valid
    point has as targets exactly the object containing it plus its group when the object has one."""
    ds = SA1BDataset(shapes_root, 64, augment=False, min_area_ratio=0.0, max_area_ratio=1.0)
    two = 0
    for idx in range(12):
        s = ds[idx]
        i = int(s["image_id"])  # the files are listed by name: sa_0, sa_1, sa_10, ...
        scene = WORLD.scene(i)
        meta = json.loads((shapes_root / f"sa_{i}.json").read_text())
        by_id = {a["id"]: a for a in meta["annotations"]}
        assert s["image"].shape == (3, 64, 64) and s["masks"].shape[1:] == (64, 64)
        assert bool((s["image"][:, 48:] == 128).all())  # padding below the 48-row content
        for k, aid in enumerate(s["ann_ids"].tolist()):
            want = np.zeros((64, 64), dtype=bool)
            want[:48] = scene.masks[by_id[aid]["shapes"]["objects"]].any(0)
            assert np.array_equal(s["masks"][k].numpy(), want)
            ys, xs = np.nonzero(want)
            assert s["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        groups = _groups_by_hand(scene.instance, len(scene.specs))
        for p in np.flatnonzero(s["point_valid"].numpy()):
            x, y = s["points"][p].tolist()
            obj = scene.instance[y, x] - 1
            assert obj >= 0  # every valid point lies on an annotated pixel
            want_objs = [{obj}] + [g for g in groups if obj in g]
            got = [set(by_id[aid]["shapes"]["objects"]) for aid, hit in
                   zip(s["ann_ids"].tolist(), s["point_targets"][p].tolist()) if hit]
            assert sorted(map(sorted, got)) == sorted(map(sorted, want_objs))
            two += len(got) == 2
        invalid = ~s["point_valid"]
        assert bool((s["points"][invalid] == -1).all()) and not bool(s["point_targets"][invalid].any())
    assert two > 0


def _write_item(root, stem: str, image: np.ndarray, masks: list, areas=None, ext: str = "png") -> None:
    h, w = image.shape[:2]
    Image.fromarray(image).save(os.path.join(root, f"{stem}.{ext}"))
    anns = []
    for k, m in enumerate(masks):
        a = {"id": 100 + k, "segmentation": sa1b.encode_rle(m), "bbox": [0, 0, 1, 1], "point_coords": [[0.5, 0.5]]}
        if areas is None or areas[k] is not None:
            a["area"] = int(m.sum()) if areas is None else areas[k]
        anns.append(a)
    meta = {"image": {"image_id": 7, "width": w, "height": h, "file_name": f"{stem}.{ext}"}, "annotations": anns}
    with open(os.path.join(root, f"{stem}.json"), "w") as f:
        json.dump(meta, f)


def test_area_filter_and_instance_cap(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 100, 100  # 10^4 pixels: area ratio 1e-4 = 1 pixel
    masks, areas = [], []
    for area in (1, 2, 500, 8000, 8001, 9999):
        m = np.zeros(h * w, dtype=bool)
        m[rng.choice(h * w, area, replace=False)] = True
        masks.append(m.reshape(h, w))
        areas.append(area)
    areas[2] = None  # no "area" field: the RLE's area is used
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    _write_item(tmp_path, "sa_1", img, masks, areas)
    ds = SA1BDataset(tmp_path, 100, augment=False)
    assert ds[0]["ann_ids"].tolist() == [100, 101, 102, 103]  # 1e-4 <= ratio <= 0.8 (inclusive), 0.8001 / 0.9999 out
    strict = SA1BDataset(tmp_path, 100, augment=False, min_area_ratio=2.5e-4, max_area_ratio=0.5)
    assert strict[0]["ann_ids"].tolist() == [102]
    capped = SA1BDataset(tmp_path, 100, max_instances=2, min_area_ratio=0.0, max_area_ratio=1.0)
    got = [tuple(capped[0]["ann_ids"].tolist()) for _ in range(1)]
    assert len(got[0]) == 2 and list(got[0]) == sorted(got[0])  # two of them, back in annotation order
    draws = {tuple(SA1BDataset(tmp_path, 100, max_instances=2, min_area_ratio=0.0, max_area_ratio=1.0,
                               seed=s)[0]["ann_ids"].tolist()) for s in range(8)}
    assert len(draws) > 1  # a random subset, by seed


def _colour_item(tmp_path, rng):
    """A 90 x 150 image whose colours ARE the masks: red rectangle A, blue disc B, grey elsewhere (lossless PNG)."""
    h, w = 90, 150
    a = np.zeros((h, w), dtype=bool)
    a[10:60, 20:90] = True
    yy, xx = np.mgrid[:h, :w]
    b = (yy - 50) ** 2 + (xx - 115) ** 2 < 25 ** 2
    b &= ~a
    img = np.full((h, w, 3), 90, dtype=np.uint8)
    img[a] = (250, 0, 0)
    img[b] = (0, 0, 250)
    _write_item(tmp_path, "sa_2", img, [a, b])
    return img, a, b


def _erode(m: np.ndarray, times: int = 1) -> np.ndarray:
    """3 x 3 (8-neighbour) erosion, ``times`` times."""
    h, w = m.shape
    for _ in range(times):
        p = np.pad(m, 1)
        m = np.logical_and.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return m


def test_lsj_keeps_masks_on_the_image_content(tmp_path):
    """Over many draws (flips, zoom-in crops, zoom-out pads): inside each transformed mask (eroded by the resize
    filter's reach, away from bilinear edge blending) the image has that mask's colour; the padding is 128 and
    mask-free; the masks equal an independent nearest-neighbour reference of the same geometry."""
    rng = np.random.default_rng(1)
    img, a, b = _colour_item(tmp_path, rng)
    ds = SA1BDataset(tmp_path, 96, min_scale=0.5, max_scale=2.0, min_area_ratio=0.0, max_area_ratio=1.0)
    flips, zoom_in, zoom_out = set(), 0, 0
    for epoch in range(24):
        ds.set_epoch(epoch)
        s = ds[0]
        g = sa1b.LSJGeometry.draw(90, 150, 96, ds.rng(0), 0.5, 2.0, 0.5)
        flips.add(g.flip)
        zoom_in += g.new_w > 96
        zoom_out += g.new_w < 96
        image = s["image"].permute(1, 2, 0).numpy().astype(int)
        for k, aid in enumerate(s["ann_ids"].tolist()):
            src = a if aid == 100 else b
            colour = (250, 0, 0) if aid == 100 else (0, 0, 250)
            # PIL's bilinear antialiases when shrinking: its support spans ~1 / scale source pixels
            inner = _erode(s["masks"][k].numpy(), int(np.ceil(150 / g.new_w)))
            assert inner.any()
            assert np.abs(image[inner] - colour).max() <= 2, (epoch, aid)
            # reference: flip, then for each output pixel the source pixel under its centre (exact rationals)
            ref = np.zeros((96, 96), dtype=bool)
            rows, cols = g.content
            for r in range(rows):
                sy = min(((2 * (r + g.top) + 1) * 90) // (2 * g.new_h), 89)
                for c in range(cols):
                    sx = min(((2 * (c + g.left) + 1) * 150) // (2 * g.new_w), 149)
                    ref[r, c] = src[sy, 149 - sx if g.flip else sx]
            assert np.array_equal(s["masks"][k].numpy(), ref), (epoch, aid)
        rows, cols = g.content
        pad = np.ones((96, 96), dtype=bool)
        pad[:rows, :cols] = False
        assert bool((image[pad] == 128).all()) and not bool(s["masks"][:, torch.from_numpy(pad)].any())
        assert s["size"].tolist() == [g.new_h, g.new_w]
        covered = s["masks"].any(0).numpy()
        if covered.any():
            # the boxes are the masks' tight boxes
            for k in range(len(s["masks"])):
                ys, xs = np.nonzero(s["masks"][k].numpy())
                assert s["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert flips == {True, False} and zoom_in > 0 and zoom_out > 0


def test_samples_are_a_function_of_seed_epoch_index(shapes_root):
    def sample(seed, epoch, index):
        ds = SA1BDataset(shapes_root, 64, seed=seed)
        ds.set_epoch(epoch)
        return ds[index]

    def same(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    ref = sample(0, 1, 5)
    assert same(ref, sample(0, 1, 5))
    ds = SA1BDataset(shapes_root, 64, seed=0)
    ds.set_epoch(1)
    _ = [ds[i] for i in range(12)]  # reading other items first changes nothing
    assert same(ref, ds[5])
    assert not same(ref, sample(0, 2, 5)) and not same(ref, sample(1, 1, 5))


def test_collate_pads_masks_and_builds_box_targets(shapes_root):
    ds = SA1BDataset(shapes_root, 64)
    samples = [ds[i] for i in range(4)]
    b = collate(samples)
    t = max(len(s["masks"]) for s in samples)
    assert b["masks"].shape == (4, t, 64, 64) and b["point_targets"].shape == (4, 100, t)
    for i, s in enumerate(samples):
        k = len(s["masks"])
        assert b["mask_valid"][i].tolist() == [True] * k + [False] * (t - k)
        assert b["box_targets"][i].tolist() == list(range(k)) + [-1] * (t - k)
        assert torch.equal(b["masks"][i, :k], s["masks"]) and not bool(b["masks"][i, k:].any())
        assert torch.equal(b["point_targets"][i, :, :k], s["point_targets"])
        assert bool((b["boxes"][i, k:] == torch.tensor([0, 0, 4, 4])).all())
    assert b["image"].dtype == torch.uint8 and b["points"].dtype == torch.int64  # nothing the bf16 cast rounds
    pts = sa1b.prompt_points(b["points"])
    assert pts.dtype == torch.float32 and torch.equal(pts[b["point_valid"]], b["points"][b["point_valid"]] + 0.5)
    empty = {k: v for k, v in samples[0].items()}
    empty.update(masks=torch.zeros(0, 64, 64, dtype=torch.bool), boxes=torch.zeros(0, 4, dtype=torch.long),
                 point_targets=torch.zeros(100, 0, dtype=torch.bool), ann_ids=torch.zeros(0, dtype=torch.long))
    e = collate([empty])
    assert e["masks"].shape == (1, 1, 64, 64) and e["box_targets"].tolist() == [[-1]]


def test_shapes_cache_is_written_once(tmp_path):
    root = tmp_path / "cache"
    sa1b.shapes_sa1b_cache(WORLD, range(3), root)
    stamp = os.path.getmtime(root / "sa_0.json")
    files = sorted(f"sa_{i}.{e}" for i in range(3) for e in ("jpg", "json"))
    assert sorted(os.listdir(root)) == [".manifest.json"] + files
    assert len(SA1BDataset(root, 64)) == 3
    sa1b.shapes_sa1b_cache(WORLD, range(3), root)
    assert os.path.getmtime(root / "sa_0.json") == stamp
    sa1b.shapes_sa1b_cache(WORLD, range(4), root)  # another scene range: rewritten
    assert (root / "sa_3.json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        SA1BDataset(tmp_path / "missing", 64)
    with pytest.raises(ValueError, match="no <id>.json"):
        SA1BDataset(tmp_path, 64)
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    _write_item(tmp_path, "sa_9", img, [np.ones((20, 30), dtype=bool)])
    meta = json.loads((tmp_path / "sa_9.json").read_text())
    meta["annotations"][0]["segmentation"]["size"] = [30, 20]
    (tmp_path / "sa_9.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="RLE of size"):
        SA1BDataset(tmp_path, 64)[0]
    meta["image"]["height"] = 21
    (tmp_path / "sa_9.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="says"):
        SA1BDataset(tmp_path, 64)[0]
    with pytest.raises(IndexError):
        SA1BDataset(tmp_path, 64)[1]
    for kw, match in (({"image_size": 4}, "image_size"), ({"min_scale": 2.0}, "min_scale"),
                      ({"max_instances": 0}, "max_instances"), ({"points_per_side": (10,)}, "points_per_side"),
                      ({"min_area_ratio": 0.9}, "min_area_ratio")):
        with pytest.raises(ValueError, match=match):
            SA1BDataset(tmp_path, **({"image_size": 64} | kw))
    with pytest.raises(ValueError, match="segmentation"):
        sa1b.decode_rle([1, 2])
