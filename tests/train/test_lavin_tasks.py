"""LaVin-DiT in-context tasks (train/data/lavin_tasks.py) and the JSONL manifest writer/loader (manifest.py)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import lavin_tasks as lt
from train.data.manifest import ManifestDataset, load_media, write_manifest
from train.data.shapes import ShapesWorld

WORLD = ShapesWorld(seed=1)
FRAMES = 5
MAGENTA = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1)


def _img(x: np.ndarray) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> [3, 1, H, W] in [-1, 1], computed here independently of to_model."""
    return torch.from_numpy(x).permute(2, 0, 1)[:, None] * 2 - 1


def _grey(m: np.ndarray) -> torch.Tensor:
    """[T, H, W] in [0, 1] -> [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(m, np.float32))[None].expand(3, -1, -1, -1) * 2 - 1


def check_pair(task: str, inp: torch.Tensor, tgt: torch.Tensor, index: int, world: ShapesWorld = WORLD) -> None:
    """The (input, target) relation of each task, re-derived from the scene / clip."""
    eq = torch.testing.assert_close
    if task == "video_frame_prediction":
        video = torch.from_numpy(world.clip(index, 2 * FRAMES).video).permute(3, 0, 1, 2) * 2 - 1
        eq(inp, video[:, :FRAMES], rtol=0, atol=1e-6)
        eq(tgt, video[:, FRAMES:], rtol=0, atol=1e-6)
        return
    if task == "video_foreground_segmentation":
        clip = world.clip(index, FRAMES)
        eq(inp, torch.from_numpy(clip.video).permute(3, 0, 1, 2) * 2 - 1, rtol=0, atol=1e-6)
        eq(tgt, _grey(clip.instance > 0), rtol=0, atol=0)
        return
    sc = world.scene(index)
    img = _img(sc.image)
    assert inp.shape == tgt.shape == img.shape
    if task == "foreground_segmentation":
        eq(inp, img, rtol=0, atol=1e-6)
        eq(tgt, _grey(sc.foreground[None]), rtol=0, atol=0)
    elif task == "depth_estimation":
        eq(inp, img, rtol=0, atol=1e-6)
        eq(tgt, _grey(1 - sc.depth[None]), rtol=0, atol=1e-6)
    elif task == "edge_detection":
        eq(inp, img, rtol=0, atol=1e-6)
        eq(tgt, _grey(sc.edges[None]), rtol=0, atol=0)
    elif task == "colorization":
        eq(tgt, img, rtol=0, atol=1e-6)
        assert torch.equal(inp[0], inp[1]) and torch.equal(inp[0], inp[2])
        luma = 0.299 * tgt[0] + 0.587 * tgt[1] + 0.114 * tgt[2]  # linear with weights summing to 1: [-1, 1] is fine
        eq(inp[0], luma, rtol=0, atol=1e-5)
    elif task == "inpainting":
        eq(tgt, img, rtol=0, atol=1e-6)
        hole = (inp == -1).all(0)[0]
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert hole[y0:y1, x0:x1].all() and hole.sum() == (y1 - y0) * (x1 - x0)  # one rectangle
        h, w = sc.size
        assert 0.25 * h - 1 <= y1 - y0 <= 0.5 * h + 1 and 0.25 * w - 1 <= x1 - x0 <= 0.5 * w + 1
        keep = ~hole
        eq(inp[:, 0][:, keep], tgt[:, 0][:, keep], rtol=0, atol=0)
    elif task == "denoising":
        eq(tgt, img, rtol=0, atol=1e-6)
        assert inp.min() >= -1 and inp.max() <= 1
        r = inp - tgt
        # A residual with |r| < 1 - |target| cannot have been clipped, and that window is symmetric, so the kept
        # residuals are zero-mean noise; their std is 2 * sigma (sigma in [0.05, 0.25] in [0, 1] units), shrunk
        # somewhat by the window.
        r = r[r.abs() < 1 - tgt.abs()]
        assert r.numel() > 1000 and abs(float(r.mean())) < 0.03
        assert 0.05 < float(r.std()) < 0.55
    elif task == "box_detection":
        eq(inp, img, rtol=0, atol=1e-6)
        outline = np.zeros(sc.size, bool)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            ring = np.zeros(sc.size, bool)
            ring[y0:y1, x0:x1] = True
            ring[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = False
            outline |= ring
            assert ring[y0, x0] and ring[y1 - 1, x1 - 1]
        changed = (tgt != inp).any(0)[0].numpy()
        assert not (changed & ~outline).any()  # only outline pixels change
        t = tgt[:, 0]
        assert (t[:, torch.from_numpy(outline)] == MAGENTA.view(3, 1)).all()
    else:
        raise AssertionError(task)


def test_every_task_relation_holds():
    ds = lt.InContextDataset(WORLD, k=(1, 2), length=2 * len(lt.TASKS), frames=FRAMES)
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        task, k = ds.key(i)
        seen.add(task)
        assert s["task"] == task and s["inputs"].shape[0] == k and s["index"] == i
        t = FRAMES if task in lt.VIDEO_TASKS else 1
        assert s["inputs"].shape == s["targets"].shape == (k, 3, t, 64, 64)
        assert s["query"].shape == s["target"].shape == (3, t, 64, 64)
        for name in ("inputs", "targets", "query", "target"):
            assert s[name].dtype == torch.float32 and s[name].min() >= -1 and s[name].max() <= 1
        scenes = s["scenes"].tolist()
        assert len(scenes) == k + 1 == len(set(scenes))
        pairs = list(zip(s["inputs"], s["targets"])) + [(s["query"], s["target"])]
        for (a, b), idx in zip(pairs, scenes):
            check_pair(task, a, b, idx)
    assert seen == set(lt.TASKS)


def test_determinism_and_seeds():
    ds = lt.InContextDataset(WORLD, tasks=["inpainting", "denoising"], k=3, length=4)
    a, b = ds[1], lt.InContextDataset(WORLD, tasks=["inpainting", "denoising"], k=3, length=4)[1]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in ("inputs", "targets", "query", "target", "scenes"))
    other_world = lt.InContextDataset(ShapesWorld(seed=2), tasks=["inpainting", "denoising"], k=3, length=4)[1]
    other_seed = lt.InContextDataset(WORLD, tasks=["inpainting", "denoising"], k=3, length=4, seed=1)[1]
    assert not torch.equal(a["inputs"], other_world["inputs"]) and not torch.equal(a["inputs"], other_seed["inputs"])
    # scene ranges keep train and validation scenes apart
    val = lt.InContextDataset(WORLD, k=2, length=6, scenes=(1000, 1010), tasks=["colorization"])
    assert all(1000 <= s < 1010 for i in range(6) for s in val[i]["scenes"].tolist())


def test_size_renders_the_same_scenes_larger():
    ds = lt.InContextDataset(WORLD, tasks=["foreground_segmentation"], k=1, size=(96, 96), length=2)
    s = ds[0]
    assert s["inputs"].shape == (1, 3, 1, 96, 96) and ds.size == (96, 96)
    check_pair("foreground_segmentation", s["query"], s["target"], int(s["scenes"][1]), WORLD.resized(96))


def test_schedule():
    ds = lt.InContextDataset(WORLD, k=(2, 4), length=100)
    nt = len(lt.TASKS)
    assert ds.ks == (2, 3, 4)
    for i in range(100):  # documented: round robin over tasks, then over k
        assert ds.key(i) == (lt.TASKS[i % nt], (2, 3, 4)[(i // nt) % 3])
    assert len({ds.key(i) for i in range(3 * nt)}) == 3 * nt  # every (task, k) once per cycle


def test_grouped_batches_and_collate():
    ds = lt.InContextDataset(WORLD, tasks=lt.IMAGE_TASKS[:3], k=(1, 2), length=23)
    sampler = lt.GroupedBatchSampler(ds, batch_size=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(len({ds.key(i) for i in b}) == 1 and 1 <= len(b) <= 3 for b in batches)
    assert batches == list(lt.GroupedBatchSampler(ds, batch_size=3, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    full = [b for b in lt.GroupedBatchSampler(ds, batch_size=3, drop_last=True, shuffle=False)]
    assert all(len(b) == 3 for b in full)
    b = next(b for b in batches if len(b) > 1)
    out = lt.collate([ds[i] for i in b])
    task, k = ds.key(b[0])
    assert out["task"] == task and out["inputs"].shape == (len(b), k, 3, 1, 64, 64)
    assert out["query"].shape == (len(b), 3, 1, 64, 64) and out["index"].tolist() == b
    assert out["scenes"].shape == (len(b), k + 1)
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=lt.collate)
        first = next(iter(loader))
    assert first["inputs"].dim() == 6
    with pytest.raises(ValueError, match="one task"):
        lt.collate([ds[0], ds[1]])
    with pytest.raises(ValueError, match="same k"):
        lt.collate([ds[0], ds[3]])  # same task, k = 1 and k = 2


def test_visual_sentence_order():
    k = 3
    inputs = torch.arange(k).float().view(k, 1, 1, 1, 1).expand(k, 3, 1, 2, 2)
    targets = 10 + inputs
    query = torch.full((3, 1, 2, 2), 99.0)
    sent = lt.visual_sentence(inputs, targets, query)
    assert sent.shape == (2 * k + 1, 3, 1, 2, 2)
    assert sent[:, 0, 0, 0, 0].tolist() == [0, 10, 1, 11, 2, 12, 99]
    batched = lt.visual_sentence(inputs[None].repeat(2, 1, 1, 1, 1, 1), targets[None].repeat(2, 1, 1, 1, 1, 1),
                                 query[None].repeat(2, 1, 1, 1, 1))
    assert torch.equal(batched[1], sent)
    with pytest.raises(ValueError, match="visual_sentence"):
        lt.visual_sentence(inputs, targets[:2], query)


def test_metrics():
    tgt = -torch.ones(2, 3, 1, 4, 4)
    tgt[:, :, :, :2, :] = 1  # top half foreground
    pred = tgt.clone()
    pred[1, :, :, :, :2] = 1  # sample 1 predicts 12 pixels for 8 true ones: IoU 8 / 12
    m = lt.task_metrics("foreground_segmentation", pred, tgt)
    assert m["iou"].tolist() == pytest.approx([1.0, 8 / 12])
    assert m["mse"][0] == 0 and m["psnr"][0] == float("inf")
    assert m["mse"][1] == pytest.approx(4 * 4 / 16)  # 4 pixels off by 2 in every channel
    empty = lt.task_metrics("edge_detection", -torch.ones(1, 3, 1, 4, 4), -torch.ones(1, 3, 1, 4, 4))
    assert empty["iou"].item() == 1.0
    m = lt.task_metrics("denoising", tgt + 0.1, tgt)
    assert "iou" not in m and m["psnr"].tolist() == pytest.approx([10 * np.log10(4 / 0.01)] * 2, rel=1e-5)
    with pytest.raises(ValueError, match="pred"):
        lt.task_metrics("denoising", tgt, tgt[0])
    with pytest.raises(ValueError, match="task"):
        lt.task_metrics("segment_anything", tgt, tgt)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tasks"):
        lt.InContextDataset(WORLD, tasks=["colourisation"])
    with pytest.raises(ValueError, match="frames"):
        lt.InContextDataset(WORLD, frames=4)
    with pytest.raises(ValueError, match="'k'"):
        lt.InContextDataset(WORLD, k=0)
    with pytest.raises(ValueError, match="'k'"):
        lt.InContextDataset(WORLD, k=(3, 2))
    with pytest.raises(ValueError, match="size"):
        lt.InContextDataset(WORLD, size=(64,))
    with pytest.raises(ValueError, match="scenes"):
        lt.InContextDataset(WORLD, k=4, scenes=(0, 3))
    with pytest.raises(TypeError, match="world"):
        lt.InContextDataset("shapes")
    ds = lt.InContextDataset(WORLD, length=3)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    with pytest.raises(ValueError, match="batch_size"):
        lt.GroupedBatchSampler(ds, batch_size=0)


# -- manifests ----------------------------------------------------------------------------------------------------------

MANIFEST_TASKS = ["foreground_segmentation", "depth_estimation", "box_detection", "video_foreground_segmentation"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest")
    ds = lt.InContextDataset(WORLD, tasks=MANIFEST_TASKS, k=(1, 2), length=8, frames=FRAMES)
    path = write_manifest(out, ds, len(ds))
    return out, path, ds, [ds[i] for i in range(len(ds))]


def test_manifest_round_trip(written):
    out, path, _, samples = written
    assert path == out / "manifest.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == sum(s["inputs"].shape[0] + 1 for s in samples)
    mds = ManifestDataset(out, k=(1, 2))
    assert mds.tasks == tuple(MANIFEST_TASKS) and len(mds) == len(records)
    step = 1 / 255 + 1e-6  # the rounding error of uint8 in [-1, 1] units (half of the 2/255 step)
    for r, rec in enumerate(records):
        s = samples[rec["sample"]]
        j, k = rec["slot"], s["inputs"].shape[0]
        want = (s["inputs"][j], s["targets"][j]) if j < k else (s["query"], s["target"])
        got = mds.pair(r)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == torch.float32
            assert (g - w).abs().max() <= step
        assert rec["scene"] == int(s["scenes"][j])
    for i in range(6):
        m = mds[i]
        task, k = mds.key(i)
        assert m["task"] == task and m["inputs"].shape[0] == k and m["index"] == i
        chosen = m["records"].tolist()
        assert len(set(chosen)) == k + 1 and all(records[r]["task"] == task for r in chosen)
        assert torch.equal(m["query"], mds.pair(chosen[-1])[0]) and torch.equal(m["targets"][0], mds.pair(chosen[0])[1])
        again = mds[i]
        assert torch.equal(again["records"], m["records"]) and torch.equal(again["inputs"], m["inputs"])
    assert any(not torch.equal(mds[i]["records"], ManifestDataset(out, k=(1, 2), seed=1)[i]["records"])
               for i in range(4))


def test_manifest_files_and_official_template_layout(written):
    out = written[0]
    video = out / "video_foreground_segmentation"
    frame_dirs = sorted(p for p in video.iterdir() if p.is_dir())
    assert frame_dirs and all(len(list(p.glob("*.png"))) == FRAMES for p in frame_dirs)
    # inference.py pairs sorted *_input.png with sorted *_target.png and asserts equal prefixes before the first "_".
    for task in MANIFEST_TASKS[:3]:
        ins = sorted((out / task).glob("*_input.png"))
        tgts = sorted((out / task).glob("*_target.png"))
        assert ins and len(ins) == len(tgts)
        assert all(a.name.split("_")[0] == b.name.split("_")[0] for a, b in zip(ins, tgts))
        with Image.open(ins[0]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)


def test_manifest_resize_is_bicubic_and_official_scaling(written):
    out, path, _, _ = written
    mds = ManifestDataset(path, k=1, size=(40, 48))
    rec = mds.records[0]
    got, _ = mds.pair(0)
    assert got.shape == (3, 1, 40, 48)
    with Image.open(out / rec["input"]) as im:
        ref = np.array(im.convert("RGB").resize((48, 40), Image.Resampling.BICUBIC))
    want = (torch.from_numpy(ref).permute(2, 0, 1).float() / 255 - 0.5) * 2
    assert torch.equal(got[:, 0], want)


def test_manifest_bad_inputs(tmp_path, written):
    out, _, _, _ = written
    with pytest.raises(FileNotFoundError, match="manifest"):
        ManifestDataset(tmp_path)
    with pytest.raises(ValueError, match="fewer than"):
        ManifestDataset(out, k=50)
    with pytest.raises(ValueError, match="not in the manifest"):
        ManifestDataset(out, k=1, tasks=["inpainting"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "x", "input": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="'target'"):
        ManifestDataset(bad, k=1)
    with pytest.raises(ValueError, match="exceeds"):
        write_manifest(tmp_path / "w", lt.InContextDataset(WORLD, length=1), 2)
    with pytest.raises(FileNotFoundError):
        load_media(tmp_path / "missing.png")


def test_video_file_needs_pyav(tmp_path, monkeypatch):
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImportError, match="PyAV"):
        load_media(f)


def test_video_file_via_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV not installed: the video-file path of load_media is not exercised")
    clip = (WORLD.clip(2, FRAMES).video * 255).round().astype(np.uint8)
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as c:  # FFV1 is lossless, so decoding gives the frames back exactly
        st = c.add_stream("ffv1", rate=8)
        st.width, st.height, st.pix_fmt = 64, 64, "bgr0"
        for fr in clip:
            for p in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    got = load_media(path)
    want = (torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 255 - 0.5) * 2
    assert got.shape == (3, FRAMES, 64, 64) and torch.equal(got, want)
    assert load_media(path, size=(32, 32)).shape == (3, FRAMES, 32, 32)
