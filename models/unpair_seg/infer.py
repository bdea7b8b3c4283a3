"""``python -m models.unpair_seg.infer --image X [--points "x,y;x,y" | --boxes "x0,y0,x1,y1;..." | --grid N]
--checkpoint stage1.pth --out DIR``: Unpair-Seg stage-1 mask proposals for one image.

Prompts are given in ORIGINAL image pixels (mapped to the canvas with the official grid scale, see
models/unpair_seg/preprocess.py); without any, the config's point grid (20 x 20 officially) is used. The model is the
official pipeline (spec §7): EXIF-transposed RGB, longest side resized to the canvas (PIL bilinear), padded with 128,
point prompts as +-2 px boxes, IoU-score filter, mask NMS, logits back at the original resolution; masks are the
logits' sigmoid >= 0.5 (the demo's binarisation; its stability-score and hole-filling filters are not applied).

Writes to ``DIR``:

* ``mask_000.png`` ...: uint8 [H, W], 255 on the proposal, in descending score order;
* ``masks.json``: ``{"image", "height", "width", "prompt_type", "annotations": [{"id", "score", "area", "bbox"
  [x, y, w, h], "segmentation": COCO RLE {"size": [H, W], "counts": str} (pycocotools, Fortran-ordered uint8),
  "prompt" (original px), "prompt_index", "mask_index", "png"}]}``;
* ``scores.json``: the scores, in the same order;
* ``overlay.png``: the image with every mask tinted (half opacity, a colour per mask, higher scores on top);
* ``result.json``: the inputs (image, prompts, checkpoint, config, device, dtype) and the outcome (original size,
  number of proposals, seconds).

Weights come from local files only (``--checkpoint``, the official ``stage1.pth`` or one written by
convert.save_official). Without ``--checkpoint`` the model is random and the output meaningless, so the CLI refuses
unless ``--random-init`` is given (smoke tests). ``--dtype bf16`` runs the model under bf16 autocast as the official
demo (the pixel decoder follows ``pixel_decoder_dtype``: fp32 officially).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

CONFIGS = ("official", "tiny")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_config(name: str, **overrides):
    """The UnpairSegConfig preset ``name`` ("official" | "tiny"), with non-None overrides applied."""
    from models.unpair_seg.config import UnpairSegConfig

    if name not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(CONFIGS)}, got {name!r}")
    cfg = UnpairSegConfig.official() if name == "official" else UnpairSegConfig.tiny()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def colours(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-ish RGB colours uint8 [n, 3] (fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(n, 3), dtype=np.int64).astype(np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` with bool ``masks`` [K, H, W] tinted at ``alpha``, mask K-1 first and mask 0 last
    (on top), each in its own colour."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: 'image' must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"overlay: 'masks' must be [K, {image.shape[0]}, {image.shape[1]}], got {masks.shape}")
    out = image.astype(np.float32)
    cols = colours(masks.shape[0]).astype(np.float32)
    for k in range(masks.shape[0] - 1, -1, -1):
        m = masks[k].astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * cols[k]
    return np.round(out).clip(0, 255).astype(np.uint8)


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a bool / uint8 [H, W] mask: {"size": [H, W], "counts": str} (pycocotools)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def _bbox(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _parse_grid(text: str) -> tuple[int, int]:
    parts = str(text).replace(" ", "").split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--grid: expected N or NX,NY (positive ints), got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise ValueError(f"--grid: expected N or NX,NY (positive ints), got {text!r}")
    return vals[0], vals[1]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="Unpair-Seg stage-1 mask proposals for one image")
    ap.add_argument("--image", required=True, help="an image file (EXIF orientation applied)")
    prompts = ap.add_mutually_exclusive_group()
    prompts.add_argument("--points", default=None, help='point prompts "x,y;x,y;..." in original pixels')
    prompts.add_argument("--boxes", default=None, help='box prompts "x0,y0,x1,y1;..." in original pixels')
    prompts.add_argument("--grid", default=None, help="a point grid N (N x N) or NX,NY (default: the config's)")
    ap.add_argument("--checkpoint", default=None, help="official stage-1 checkpoint (local file)")
    ap.add_argument("--config", choices=CONFIGS, default="official")
    ap.add_argument("--random-init", action="store_true", help="run without a checkpoint (smoke tests)")
    ap.add_argument("--out", default="unpair_seg_out", help="output folder")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="override the config's threshold on the double-sigmoid IoU score (official 0.65)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init (with --random-init)")
    args = ap.parse_args(argv)

    if args.checkpoint and not os.path.isfile(args.checkpoint):
        ap.error(f"--checkpoint {args.checkpoint!r} does not exist (weights are read from local files only)")
    if not args.checkpoint and not args.random_init:
        ap.error("no --checkpoint: the model would be random; give the official stage1.pth (or a checkpoint written "
                 "by models.unpair_seg.convert.save_official), or --random-init for a smoke test")
    if not os.path.isfile(args.image):
        ap.error(f"--image {args.image!r} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    from models.unpair_seg import preprocess as pp

    try:
        points = np.array(pp.parse_pairs(args.points, 2, "--points"), np.float32) if args.points else None
        boxes = np.array(pp.parse_pairs(args.boxes, 4, "--boxes"), np.float32) if args.boxes else None
        grid = _parse_grid(args.grid) if args.grid else None
        cfg = build_config(args.config, score_threshold=args.score_threshold)
    except ValueError as e:
        ap.error(str(e))

    from models.unpair_seg.convert import load_official
    from models.unpair_seg.model import UnpairSegS1

    t0 = time.time()
    torch.manual_seed(args.seed)
    model = UnpairSegS1(cfg)
    if args.checkpoint:
        load_official(model, args.checkpoint)
    model = model.to(args.device).eval()
    image = pp.read_image(args.image)
    h, w = image.shape[:2]
    dtype = DTYPES[args.dtype]
    with torch.autocast(torch.device(args.device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        res = model.predict(image, points=points, boxes=boxes, grid=grid)
    seconds = time.time() - t0

    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    masks = res["masks"].cpu().numpy()
    scores = [float(s) for s in res["scores"].float().cpu()]
    kind = "box" if "boxes" in res else "point"
    used = res["boxes" if kind == "box" else "points"].float().cpu().numpy()
    annotations = []
    for k in range(masks.shape[0]):
        name = f"mask_{k:03d}.png"
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(os.path.join(args.out, name))
        annotations.append({"id": k, "score": scores[k], "area": int(masks[k].sum()), "bbox": _bbox(masks[k]),
                            "segmentation": rle_encode(masks[k]), "prompt": [float(v) for v in used[k]],
                            "prompt_index": int(res["prompt_index"][k]), "mask_index": int(res["mask_index"][k]),
                            "png": name})
    with open(os.path.join(args.out, "masks.json"), "w") as f:
        json.dump({"image": os.path.abspath(args.image), "height": h, "width": w, "prompt_type": kind,
                   "annotations": annotations}, f)
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump(scores, f)
    Image.fromarray(overlay(image, masks)).save(os.path.join(args.out, "overlay.png"))
    given = "points" if points is not None else "boxes" if boxes is not None else "grid"
    result = {"image": os.path.abspath(args.image), "height": h, "width": w, "prompts": given,
              "points": points.tolist() if points is not None else None,
              "boxes": boxes.tolist() if boxes is not None else None,
              "grid": list(grid) if grid is not None else (list(cfg.pts_per_side) if given == "grid" else None),
              "checkpoint": args.checkpoint and os.path.abspath(args.checkpoint), "random_weights": not args.checkpoint,
              "config": args.config, "image_size": cfg.image_size, "score_threshold": cfg.score_threshold,
              "device": args.device, "dtype": args.dtype, "num_proposals": len(annotations), "seconds": seconds}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"Unpair-Seg: {len(annotations)} proposals for {args.image} ({w}x{h}); wrote {args.out}/mask_*.png, "
          "masks.json, scores.json, overlay.png, result.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
