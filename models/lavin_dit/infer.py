"""``python -m models.lavin_dit.infer``: answer image or video queries from a task directory of example pairs
(spec §4).

The task directory holds ``<name>_input`` / ``<name>_target`` pairs: PNG images (the official template layout;
ShapesWorld's ``write_manifest`` writes the same), or for video tasks frame folders or video files (``.mp4`` etc.,
read with PyAV). ``--num-prompt`` pairs are drawn with replacement (as the official code does), here from a generator
seeded by ``--seed``. Media are resized to ``--size`` with Pillow's bicubic filter (official: torchvision's
antialiased bicubic on uint8; the two differ by rounding) and scaled to [-1, 1]. A query is an image, a frame folder
or a video; ``--frames`` sets how many frames to predict for video queries (default: the query's).

``--batch-size`` answers that many queries per sampling run (queries of one shape; each keeps its own seed, so the
answers do not depend on the batching). Outputs per query: an image query gives ``<out>/<name>.png``, [query |
prediction] with 4-pixel black padding; a video query gives ``<out>/<name>.mp4`` (H.264, [query | prediction] side by
side) and the exact frames as ``<out>/<name>/NNNN.png``. ``<out>/results.json`` lists them.

Weights come from local files only: ``--vae`` (stvae.pt or .safetensors) and ``--dit`` (lavin_dit.safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.common.media import FRAME_SUFFIXES, VIDEO_SUFFIXES, is_medium, load_media, write_video
from models.common.media import to_uint8 as _frames_uint8
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.convert import load_jdit, load_stvae
from models.lavin_dit.pipeline import CFG_MODES, InContextPipeline, SampleConfig


def load_query(path: str, size: int) -> torch.Tensor:
    """An image [3, size, size], or a video (frame folder or video file) [3, T, size, size], in [-1, 1]."""
    x = load_media(path, (size, size))
    return x[:, 0] if x.shape[1] == 1 and not Path(path).is_dir() and Path(path).suffix.lower() in FRAME_SUFFIXES \
        else x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] image -> HWC uint8, truncating as the official output path does."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _stem(p: Path) -> str:
    name = p.name
    for suffix in FRAME_SUFFIXES + VIDEO_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def task_pairs(task_dir: str) -> list[tuple[str, str]]:
    """(input, target) paths of the task directory, sorted by name: ``X_input[.ext]`` with ``Y_target[.ext]``, the
    i-th input with the i-th target, which must share the prefix before the first "_" (the official check)."""
    entries = [p for p in sorted(Path(task_dir).iterdir()) if is_medium(p)] if Path(task_dir).is_dir() else []
    inputs = [str(p) for p in entries if _stem(p).endswith("_input")]
    targets = [str(p) for p in entries if _stem(p).endswith("_target")]
    if not inputs or len(inputs) != len(targets):
        raise ValueError(f"--task-dir {task_dir!r}: expected matching *_input / *_target images, frame folders or "
                         f"videos, found {len(inputs)} inputs and {len(targets)} targets")
    for a, b in zip(inputs, targets):
        if os.path.basename(a).split("_")[0] != os.path.basename(b).split("_")[0]:
            raise ValueError(f"--task-dir: {os.path.basename(a)} and {os.path.basename(b)} do not share a prefix")
    return list(zip(inputs, targets))


def _write(out_dir: str, name: str, query: torch.Tensor, pred: torch.Tensor, size: int) -> dict:
    """The output files of one answer; returns their paths."""
    if query.dim() == 3 and pred.dim() == 3:
        grid = np.zeros((size + 8, 2 * size + 12, 3), dtype=np.uint8)
        grid[4:4 + size, 4:4 + size] = to_uint8(query)
        grid[4:4 + size, 8 + size:8 + 2 * size] = to_uint8(pred)
        out_png = os.path.join(out_dir, f"{name}.png")
        Image.fromarray(grid).save(out_png)
        return {"output": out_png}
    frames = _frames_uint8(pred)
    frame_dir = Path(out_dir) / name
    frame_dir.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(frame_dir / f"{t:04d}.png")
    q = _frames_uint8(query)
    q = np.concatenate([q, np.repeat(q[-1:], max(0, len(frames) - len(q)), 0)])[:len(frames)]  # hold the last frame
    side = np.concatenate([q, np.zeros_like(frames[:, :, :4]), frames], axis=2)
    side = side[:, : side.shape[1] // 2 * 2, : side.shape[2] // 2 * 2]
    out_mp4 = write_video(os.path.join(out_dir, f"{name}.mp4"), side)
    return {"output": str(out_mp4), "frames": str(frame_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="ST-VAE weights (local file)")
    p.add_argument("--dit", required=True, help="J-DiT weights (local .safetensors)")
    p.add_argument("--vae-preset", default="official", choices=("official", "tiny"))
    p.add_argument("--dit-preset", default="3.4B", choices=("tiny", "0.1B", "1.0B", "3.4B", "default"))
    p.add_argument("--task-dir", required=True)
    p.add_argument("--query", required=True, nargs="+", help="query images, frame folders or videos")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--num-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--cfg-mode", default="two_pass", choices=CFG_MODES)
    p.add_argument("--frames", type=int, default=None, help="frames to predict for video queries (1 + 4m)")
    p.add_argument("--batch-size", type=int, default=1, help="queries per sampling run")
    p.add_argument("--compile", default=None, choices=("default", "reduce-overhead"),
                   help="torch.compile the denoising loop's DiT")
    p.add_argument("--posterior", default="sample", choices=("sample", "mean"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size must be a multiple of 16, got {args.size}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae_cfg = STVAEConfig.official() if args.vae_preset == "official" else STVAEConfig.tiny()
    vae = load_stvae(args.vae, vae_cfg, dtype=dtype, device=device).eval()
    dit = load_jdit(args.dit, JDiTConfig.preset(args.dit_preset), dtype=dtype, device=device).eval()
    pipe = InContextPipeline(vae, dit)
    pairs = task_pairs(args.task_dir)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    cfg = SampleConfig(steps=args.steps, cfg_scale=args.cfg_scale, posterior=args.posterior, seed=args.seed,
                       cfg_mode=args.cfg_mode, compile=args.compile)
    results = []
    for b0 in range(0, len(args.query), args.batch_size):
        paths = args.query[b0:b0 + args.batch_size]
        chosen = [rng.choices(pairs, k=args.num_prompt) for _ in paths]
        examples = [[(load_media(a, (args.size, args.size)), load_media(b, (args.size, args.size))) for a, b in c]
                    for c in chosen]
        queries = [load_query(q, args.size) for q in paths]
        t0 = time.perf_counter()
        preds = pipe.batch(examples, queries, cfg, target_frames=args.frames,
                           seeds=[args.seed + b0 + i for i in range(len(paths))])
        secs = time.perf_counter() - t0
        for qpath, c, q, pred in zip(paths, chosen, queries, preds):
            files = _write(args.out, _stem(Path(qpath)), q, pred, args.size)
            results.append({"query": qpath, **files, "pairs": [list(x) for x in c], "seconds": secs / len(paths),
                            "batch": len(paths)})
            print(f"{qpath} -> {files['output']} ({secs / len(paths):.2f} s)", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "device": str(device), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
