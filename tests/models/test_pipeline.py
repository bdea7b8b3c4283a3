"""In-context inference (models/lavin_dit/pipeline.py, infer.py): the official two-pass CFG Euler loop recomputed
by hand, determinism, image and video queries, and the CLI on a ShapesWorld task directory."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mmkernels.testing import assert_close
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.pipeline import InContextPipeline, SampleConfig
from models.lavin_dit.sampler import time_grid
from models.lavin_dit.stvae import STVAE


def _models():
    torch.manual_seed(0)
    vae = STVAE(STVAEConfig.tiny()).eval()
    dit = JDiT(JDiTConfig.preset("tiny")).eval()
    with torch.no_grad():  # the official init zeroes the output layer: randomize so predictions depend on inputs
        for p in dit.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return vae, dit


def _img(seed, T=None, size=32):
    g = torch.Generator().manual_seed(seed)
    shape = (3, size, size) if T is None else (3, T, size, size)
    return torch.rand(shape, generator=g) * 2 - 1


def test_two_pass_cfg_euler_by_hand():
    vae, dit = _models()
    pipe = InContextPipeline(vae, dit)
    pairs = [(_img(1), _img(2)), (_img(3), _img(4))]
    query = _img(5)
    cfg = SampleConfig(steps=20, cfg_scale=1.5, seed=7)
    out = pipe(pairs, query, cfg)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # By hand: one CPU generator draws each posterior sample in order, then the noise.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        lat = [(vae.encode(x[:, None][None]).sample(g) - 0.032470703125) * 1.08936170213
               for x in [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1], query]]
        cond = torch.cat(lat, 2)
        null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -1:]], 2)
        y = torch.randn(1, 16, 1, 4, 4, generator=g)
        grid = time_grid(20)
        for k in range(19):
            t = grid[k].expand(1)
            vc = dit(patchify(y, 2), t, patchify(cond, 2))
            vu = dit(patchify(y, 2), t, patchify(null, 2))
            y = y + (grid[k + 1] - grid[k]) * (vu + 1.5 * (vc - vu))
        want = vae.decode(y / 1.08936170213 + 0.032470703125)[0, :, 0].clamp(-1, 1)
    assert_close(out, want, dtype=torch.float32, what="prediction")
    assert torch.equal(pipe(pairs, query, cfg), out)  # seeded: reproducible
    assert not torch.equal(pipe(pairs, query, SampleConfig(seed=8)), out)


def test_batched_cfg_equals_two_pass():
    """cfg_mode="batched" (one packed pass per step) gives the official two-pass result: on the model (several
    samples, different t, a video target) and through the whole pipeline."""
    vae, dit = _models()
    pd = dit.config.patch_dim
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, 5, pd, generator=g)
    cond, null = torch.randn(2, 5, 3, 5, pd, generator=g), torch.randn(2, 3, 3, 5, pd, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        two = dit.forward_with_cfg(x, t, cond, null, 1.5, batched=False)
        one = dit.forward_with_cfg(x, t, cond, null, 1.5, batched=True)
        v_c, v_u = dit(x, t, cond), dit(x, t, null)
    assert two.shape == (2, 16, 2, 6, 10)
    assert_close(two, v_u + 1.5 * (v_c - v_u), tol=1e-6, what="two-pass guidance")
    assert_close(one, two, tol=1e-5, what="batched guidance")
    assert (v_c - v_u).norm() > 0.1 * v_c.norm()  # the two contexts really differ

    pipe = InContextPipeline(vae, dit)
    pairs = [(_img(1), _img(2)), (_img(3), _img(4))]
    outs = [pipe(pairs, _img(5), SampleConfig(steps=6, seed=2, cfg_mode=m)) for m in ("two_pass", "batched")]
    assert_close(outs[1], outs[0], tol=1e-5, what="batched-CFG prediction")
    with pytest.raises(ValueError, match="cfg_mode must be one of"):
        SampleConfig(cfg_mode="packed")
    with pytest.raises(ValueError, match="'cond_null'.*must share B, H and W"):
        dit.forward_with_cfg(x, t, cond, null[:1], 1.5)


@pytest.mark.slow
def test_compiled_denoising_loop_matches_eager():
    """SampleConfig.compile runs the loop's DiT through torch.compile (here the aot_eager backend, which traces
    the same graph inductor would compile, fullgraph through our custom ops) and gives the eager result."""
    vae, dit = _models()
    pipe = InContextPipeline(vae, dit)
    pairs = [(_img(1), _img(2))]
    eager = pipe(pairs, _img(5), SampleConfig(steps=4, seed=1, cfg_mode="batched"))
    torch._dynamo.reset()
    compiled = pipe(pairs, _img(5), SampleConfig(steps=4, seed=1, cfg_mode="batched", compile="default",
                                                  compile_backend="aot_eager"))
    assert_close(compiled, eager, tol=1e-5, what="compiled loop")
    assert len(pipe._compiled) == 1
    with pytest.raises(ValueError, match="compile must be None or one of"):
        SampleConfig(compile="fast")


def test_video_query_and_bad_inputs():
    vae, dit = _models()
    pipe = InContextPipeline(vae, dit)
    pairs = [(_img(1, T=5), _img(2, T=5))]
    out = pipe(pairs, _img(3, T=5), SampleConfig(steps=3, posterior="mean"))
    assert out.shape == (3, 5, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="size"):
        pipe([(_img(1), _img(2, size=16))], _img(3))
    with pytest.raises(ValueError, match="target_frames"):
        pipe(pairs, _img(3, T=5), target_frames=4)
    with pytest.raises(ValueError, match="at least one"):
        pipe([], _img(3))
    with pytest.raises(ValueError, match="posterior"):
        pipe(pairs, _img(3, T=5), SampleConfig(posterior="mode"))


def test_cli_on_a_shapesworld_task_dir(tmp_path):
    from models.lavin_dit import infer
    from train.data.lavin_tasks import InContextDataset
    from train.data.manifest import write_manifest
    from train.data.shapes import ShapesWorld

    vae, dit = _models()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, tmp_path / "dit.safetensors")
    data = InContextDataset(ShapesWorld(seed=0, size=(32, 32)), tasks=["depth_estimation"], k=2, length=4)
    write_manifest(tmp_path / "data", data, 2)
    task_dir = tmp_path / "data" / "depth_estimation"
    query = sorted(task_dir.glob("*_input.png"))[0]
    rc = infer.main(["--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "dit.safetensors"),
                     "--vae-preset", "tiny", "--dit-preset", "tiny", "--task-dir", str(task_dir), "--query",
                     str(query), "--out", str(tmp_path / "out"), "--size", "32", "--num-prompt", "2", "--steps", "3",
                     "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    from PIL import Image

    png = Image.open(res["results"][0]["output"])
    assert png.size == (2 * 32 + 12, 32 + 8) and len(res["results"][0]["pairs"]) == 2


def test_batch_of_queries_equals_single_calls():
    """pipe.batch answers each query as a single call with its seed does; mismatched shapes are refused."""
    vae, dit = _models()
    pipe = InContextPipeline(vae, dit)
    pairs = [[(_img(1), _img(2))], [(_img(3), _img(4))]]
    queries = [_img(5), _img(6)]
    cfg = SampleConfig(steps=4, seed=11, cfg_mode="batched")
    outs = pipe.batch(pairs, queries, cfg)
    for i in range(2):
        single = pipe(pairs[i], queries[i], SampleConfig(steps=4, seed=11 + i, cfg_mode="batched"))
        assert_close(outs[i], single, tol=1e-5, what=f"batched query {i}")
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(ValueError, match="batch only queries of one shape"):
        pipe.batch([pairs[0], pairs[0] * 2], queries, cfg)
    with pytest.raises(ValueError, match="one list of pairs per query"):
        pipe.batch(pairs[:1], queries, cfg)


def test_cli_video_task_dir_writes_mp4(tmp_path):
    """A video task directory (frame-folder pairs, as write_manifest stores video tasks), a video query given as an
    MP4 file, two queries in one batch: an MP4 and exact PNG frames per query, and results.json."""
    from models.common.media import load_media, write_video, to_uint8
    from models.lavin_dit import infer
    from train.data.lavin_tasks import InContextDataset
    from train.data.manifest import write_manifest
    from train.data.shapes import ShapesWorld

    vae, dit = _models()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, tmp_path / "dit.safetensors")
    data = InContextDataset(ShapesWorld(seed=0, size=(32, 32)), tasks=["video_frame_prediction"], k=1, length=2, frames=5)
    write_manifest(tmp_path / "data", data, 2)
    task_dir = tmp_path / "data" / "video_frame_prediction"
    assert len(infer.task_pairs(str(task_dir))) == 4
    folder_query = sorted(p for p in task_dir.iterdir() if p.name.endswith("_input"))[0]
    mp4_query = write_video(tmp_path / "q.mp4", to_uint8(load_media(folder_query)))
    rc = infer.main(["--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "dit.safetensors"),
                     "--vae-preset", "tiny", "--dit-preset", "tiny", "--task-dir", str(task_dir), "--query",
                     str(folder_query), str(mp4_query), "--out", str(tmp_path / "out"), "--size", "32",
                     "--num-prompt", "1", "--steps", "3", "--batch-size", "2", "--cfg-mode", "batched",
                     "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["batch"] for r in res] == [2, 2]
    for r in res:
        assert r["output"].endswith(".mp4")
        video = load_media(r["output"])
        frames = load_media(r["frames"])
        assert frames.shape == (3, 5, 32, 32)
        assert video.shape[:2] == (3, 5) and video.shape[-1] == 2 * 32 + 4
        # The right part of the MP4 is the prediction: H.264 with 4:2:0 chroma is lossy on these noisy random-model
        # frames, so compare structure (correlation), not values; the PNG frames are the exact output.
        right = video[..., 36:]
        corr = torch.corrcoef(torch.stack([right.flatten(), frames.flatten()]))[0, 1]
        assert corr > 0.8, corr


def test_write_video_round_trip_and_bad_input(tmp_path):
    """write_video -> load_media: a smooth moving pattern survives H.264 at the near-lossless setting; odd sizes and
    wrong dtypes are refused."""
    from models.common.media import load_media, to_uint8, write_video

    T, H, W = 6, 32, 48
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    clip = torch.stack([torch.sin((x + 3 * t) / 7.0), torch.cos((y - 2 * t) / 9.0), torch.sin((x + y) / 11.0)]) * 0.8
    path = write_video(tmp_path / "v.mp4", to_uint8(clip))
    back = load_media(path)
    assert back.shape == (3, T, H, W)
    assert (back - clip).abs().mean() < 0.04  # 4:2:0 chroma: about 3/255 on this colour pattern
    with pytest.raises(ValueError, match="even H, W"):
        write_video(tmp_path / "odd.mp4", to_uint8(clip[:, :, :31]))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", to_uint8(clip).astype("float32"))
