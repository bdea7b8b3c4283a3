"""``python -m models.cris.infer --image X --text "..." --out DIR``: segment the object a sentence refers to.

Writes to ``DIR``:

* ``mask.png``: uint8 [h, w] at the image's own resolution, 255 on the predicted object, 0 elsewhere;
* ``overlay.png``: the image with the mask tinted red (half opacity) and its boundary drawn in solid red;
* ``prob.png``: the probability map at the original resolution (0..255);
* ``result.json``: the inputs (image, text, its tokens, weights, CLIP file, config, preset, device, dtype,
  threshold) and the outcome (original size, mask pixel count and fraction, seconds).

The prediction is the official one (spec §5.4): the image letterboxed to the model's input size (416 for the official
configs) and CLIP-normalised, the sentence tokenised to ``word_len`` (CLIP BPE), logits -> sigmoid -> bicubic
(align_corners=True) to the letterbox -> inverse letterbox warp (bicubic) -> ``prob > 0.35``.

Weights are read from local files only, nothing is downloaded: ``--weights`` a checkpoint in the official layout
(``best_model.pth`` of ``python -m train.cris`` or of the official code; default: the config's ``model.weights``),
``--clip`` OpenAI's ``RN50.pt`` / ``RN101.pt`` for the backbone alone (the head stays random). Without ``--weights``
the model's head is random and the output meaningless, so the CLI refuses to run unless ``--allow-random`` is given
(for smoke tests). ``--config`` is a train/configs/cris_*.yaml (its ``model`` section; default: the official RN50 at
416, word length 17).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0), alpha: float = 0.5) -> np.ndarray:
    """uint8 [h, w, 3]: ``image`` (RGB uint8 [h, w, 3]) with ``mask`` (bool [h, w]) tinted ``colour`` at ``alpha``
    and its inner boundary (mask pixels with a 4-neighbour outside it) in solid ``colour``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: 'image' must be uint8 [h, w, 3], got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"overlay: 'mask' {mask.shape} must match the image's {image.shape[:2]}")
    m = mask.astype(bool)
    out = image.astype(np.float32)
    c = np.asarray(colour, np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * c
    pad = np.pad(m, 1, constant_values=False)
    inner = m & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    out[inner] = c
    return np.round(out).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def predict(model, image: np.ndarray, text: str, device="cpu", dtype=torch.float32,
            threshold: float = 0.35) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(mask bool [h, w], probabilities float32 [h, w], tokens int64 [word_len]) of ``text`` on ``image`` (RGB uint8
    [h, w, 3]) with a CRIS ``model`` (eval mode, on ``device`` in ``dtype``)."""
    from models.cris.tokenize import tokenize
    from models.cris.transforms import letterbox_image, letterbox_matrix, unletterbox_prob

    if not isinstance(text, str) or not text.strip():
        raise ValueError("predict: 'text' must be a non-empty sentence")
    cfg = model.config
    h, w = image.shape[:2]
    M, M_inv = letterbox_matrix(h, w, cfg.input_size)
    img = letterbox_image(image, M, cfg.input_size)[None].to(device, dtype)
    tokens = tokenize(text, cfg.word_len)
    logits = model(img, tokens.to(device)).float()
    prob = unletterbox_prob(torch.sigmoid(logits[0, 0]), M_inv, (h, w), size=cfg.input_size).numpy()
    return prob > threshold, prob, tokens[0]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="CRIS referring segmentation of one image and one sentence")
    ap.add_argument("--image", required=True, help="an image file (read with OpenCV)")
    ap.add_argument("--text", required=True, help="the referring expression")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--weights", default=None, help="CRIS checkpoint in the official layout (local file)")
    ap.add_argument("--clip", default=None, help="OpenAI CLIP RN50.pt / RN101.pt for the backbone (local file)")
    ap.add_argument("--config", default=None, help="train/configs/cris_*.yaml (default: official RN50 at 416)")
    ap.add_argument("--allow-random", action="store_true", help="run without trained weights (smoke tests)")
    ap.add_argument("--threshold", type=float, default=0.35)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)

    from train.cris import build_model, load_config
    from train.data.refer import read_image
    from models.cris.model import CRIS

    cfg = load_config(args.config) if args.config else {"model": {"preset": "cris_r50"}}
    weights = args.weights or (cfg.get("model") or {}).get("weights")
    clip = args.clip or (cfg.get("backbone") or {}).get("clip")
    for flag, path in (("--weights", weights), ("--clip", clip)):
        if path and not os.path.isfile(path):
            ap.error(f"{flag} {path!r} does not exist (weights are read from local files only)")
    if not weights and not args.allow_random:
        ap.error("no --weights: the CRIS head would be random (and, without --clip, the backbone too); give a trained "
                 "checkpoint, or --allow-random for a smoke test")
    if not os.path.isfile(args.image):
        ap.error(f"--image {args.image!r} does not exist")
    cfg.setdefault("model", {})["weights"] = weights
    cfg.setdefault("backbone", {})["clip"] = None if weights else clip  # a checkpoint holds the backbone already
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CRIS: backbone.clip")
        model = build_model(cfg, model_cls=CRIS).to(args.device, DTYPES[args.dtype]).eval()
    image = read_image(args.image)
    mask, prob, tokens = predict(model, image, args.text, args.device, DTYPES[args.dtype], args.threshold)
    seconds = time.time() - t0

    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(args.out, "mask.png"))
    Image.fromarray(overlay(image, mask)).save(os.path.join(args.out, "overlay.png"))
    Image.fromarray(np.round(prob.clip(0, 1) * 255).astype(np.uint8)).save(os.path.join(args.out, "prob.png"))
    mcfg = model.config
    result = {"image": os.path.abspath(args.image), "text": args.text, "tokens": tokens.tolist(),
              "weights": weights and os.path.abspath(weights), "clip": None if weights else (clip and
                                                                                          os.path.abspath(clip)),
              "random_weights": not weights, "config": args.config and os.path.abspath(args.config),
              "preset": (cfg.get("model") or {}).get("preset", "cris_r50"), "input_size": mcfg.input_size,
              "word_len": mcfg.word_len, "threshold": args.threshold, "device": str(args.device),
              "dtype": args.dtype, "ori_size": list(image.shape[:2]), "mask_pixels": int(mask.sum()),
              "mask_fraction": float(mask.mean()), "seconds": seconds}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"CRIS: {int(mask.sum())} of {mask.size} pixels for {args.text!r}; wrote {args.out}/mask.png, overlay.png, "
          "prob.png, result.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
