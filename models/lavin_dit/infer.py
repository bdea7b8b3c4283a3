"""``python -m models.lavin_dit.infer``: answer image queries from a task directory of example pairs (spec §4).

The task directory holds ``<name>_input.png`` / ``<name>_target.png`` pairs (the official template layout; ShapesWorld's
``write_manifest`` writes the same). ``--num-prompt`` pairs are drawn with replacement (as the official code does),
here from a generator seeded by ``--seed``. Images are resized to ``--size`` with Pillow's bicubic filter (official:
torchvision's antialiased bicubic on uint8; the two differ by rounding) and scaled to [-1, 1]. For each query it writes
``<out>/<query name>.png``: [query | prediction] with 4-pixel black padding, and ``<out>/results.json``.

Weights come from local files only: ``--vae`` (stvae.pt or .safetensors) and ``--dit`` (lavin_dit.safetensors).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.convert import load_jdit, load_stvae
from models.lavin_dit.pipeline import InContextPipeline, SampleConfig


def load_image(path: str, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: RGB, bicubic resize, /255, (x - 0.5) * 2."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) * 2


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] image -> HWC uint8, truncating as the official output path does."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def task_pairs(task_dir: str) -> list[tuple[str, str]]:
    inputs = sorted(glob.glob(os.path.join(task_dir, "*_input.png")))
    targets = sorted(glob.glob(os.path.join(task_dir, "*_target.png")))
    if not inputs or len(inputs) != len(targets):
        raise ValueError(f"--task-dir {task_dir!r}: expected matching *_input.png / *_target.png files, found "
                         f"{len(inputs)} inputs and {len(targets)} targets")
    for a, b in zip(inputs, targets):
        if os.path.basename(a).split("_")[0] != os.path.basename(b).split("_")[0]:
            raise ValueError(f"--task-dir: {os.path.basename(a)} and {os.path.basename(b)} do not share a prefix")
    return list(zip(inputs, targets))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="ST-VAE weights (local file)")
    p.add_argument("--dit", required=True, help="J-DiT weights (local .safetensors)")
    p.add_argument("--vae-preset", default="official", choices=("official", "tiny"))
    p.add_argument("--dit-preset", default="3.4B", choices=("tiny", "0.1B", "1.0B", "3.4B", "default"))
    p.add_argument("--task-dir", required=True)
    p.add_argument("--query", required=True, nargs="+", help="query image(s)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--num-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--posterior", default="sample", choices=("sample", "mean"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size must be a multiple of 16, got {args.size}")
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
    results = []
    for qi, qpath in enumerate(args.query):
        chosen = rng.choices(pairs, k=args.num_prompt)
        examples = [(load_image(a, args.size), load_image(b, args.size)) for a, b in chosen]
        query = load_image(qpath, args.size)
        t0 = time.perf_counter()
        pred = pipe(examples, query, SampleConfig(steps=args.steps, cfg_scale=args.cfg_scale,
                                                  posterior=args.posterior, seed=args.seed + qi))
        secs = time.perf_counter() - t0
        grid = np.zeros((args.size + 8, 2 * args.size + 12, 3), dtype=np.uint8)
        grid[4:4 + args.size, 4:4 + args.size] = to_uint8(query)
        grid[4:4 + args.size, 8 + args.size:8 + 2 * args.size] = to_uint8(pred)
        name = os.path.splitext(os.path.basename(qpath))[0]
        out_png = os.path.join(args.out, f"{name}.png")
        Image.fromarray(grid).save(out_png)
        results.append({"query": qpath, "output": out_png, "pairs": [list(c) for c in chosen], "seconds": secs})
        print(f"{qpath} -> {out_png} ({secs:.2f} s)", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "device": str(device), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
