"""CRIS evaluation as the official ``test.py`` / ``validate`` (spec §5.4, §6 "Evaluation metrics", gotchas 9, 10, 19).

:func:`evaluate` runs a model over a referring dataset (``train.data.refer.ReferDataset`` or
``train.data.cris_data.ShapesReferDataset``; "test" mode = every sentence of every ref as the official test, "val"
mode = sentence 0 of each ref as the training-time validation) and returns the split's metrics
(:mod:`models.cris.metrics`): ``mIoU`` (mean of per-expression IoUs, the number CRIS reports), ``oIoU``,
``Pr@50`` .. ``Pr@90`` (IoU strictly above each threshold) and ``count``. Per prediction, exactly the official
post-processing (:func:`models.cris.transforms.predict_mask`): ``sigmoid(logits)`` -> bicubic (align_corners=True)
to the letterbox size -> inverse letterbox warp (bicubic) to the original image -> ``prob > 0.35``, compared with
the ground truth ``mask != 0`` at the original resolution.

Batching: the official test runs one sentence at a time (batch 1); the model is in eval mode (BatchNorm on running
statistics, no dropout), so a batch of ``batch_size`` gives the same logits up to float rounding.

CLI (one JSON for all the splits asked for)::

    python -m models.cris.evaluate --config train/configs/cris_r50.yaml --weights best_model.pth \\
        --split val --split testA --out results.json [--mode test] [--batch-size 16] [--device cuda] [--dtype fp32]

The config's ``data`` section picks the dataset (ShapesWorld, or RefCOCO / RefCOCO+ / G-Ref with
``data.refer_root``); ``--weights`` (default: the config's ``model.weights``) is a checkpoint in the official layout
(``best_model.pth`` of train/cris.py or of the official code), loaded strictly. ``results.json``:
``{"config", "weights", "mode", "splits": {split: {"mIoU", "oIoU", "Pr@50", ..., "Pr@90", "count"}}}``, fractions in
[0, 1] (the official logs print them x 100).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from typing import Optional, Union

import torch
from torch import nn

from models.cris.metrics import ReferMetrics
from models.cris.transforms import predict_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 16, device: Union[str, torch.device, None] = None,
             dtype: torch.dtype = torch.float32, num_workers: int = 0) -> dict:
    """The metrics of ``model`` on every item of ``dataset`` (module docstring).

    Args:
        model: a CRIS (``model(img, tokens)`` in eval mode returns logits [B, 1, S/4, S/4]). It is put in eval mode
            for the call and back afterwards. When its parameters are not in ``dtype`` (or not on ``device``), a
            copy in that dtype / on that device is evaluated and the model itself is left as it is.
        dataset: items with "image", "tokens", "gt", "inverse", "ori_size" (val or test mode); its ``size`` must be
            the model's input size.
        batch_size: items per forward.
        device: where the model runs (default: where its parameters are).
        dtype: the compute dtype (official: fp32).
        num_workers: DataLoader workers for the items.

    Returns: ``{"mIoU", "oIoU", "Pr@50", ..., "Pr@90", "count"}``.
    """
    from torch.utils.data import DataLoader

    from train.data.refer import collate

    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate: 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: 'batch_size' must be an int >= 1, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"evaluate: 'dtype' must be a floating torch.dtype, got {dtype!r}")
    if getattr(dataset, "mode", "test") == "train":
        raise ValueError("evaluate: 'dataset' is in train mode (no ground truth at the original size); build it with "
                         "mode='test' (every sentence) or 'val' (sentence 0 of each ref)")
    if len(dataset) == 0:
        raise ValueError("evaluate: 'dataset' is empty")
    first = next(model.parameters())
    device = first.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" names the current device, as .to("cuda") does
        device = torch.device("cuda", torch.cuda.current_device())
    size = getattr(dataset, "size", None)
    expected = getattr(getattr(model, "config", None), "input_size", None)
    if size is not None and expected is not None and size != expected:
        raise ValueError(f"evaluate: the dataset letterboxes to {size}, the model was built for {expected}")
    net = model
    if _model_dtype(model) != dtype or first.device != device:
        net = copy.deepcopy(model).to(device=device, dtype=dtype)
    was_training = net.training
    net.eval()
    metrics = ReferMetrics()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    try:
        for batch in loader:
            img = batch["image"].to(device, dtype, non_blocking=True)
            logits = net(img, batch["tokens"].to(device))
            preds = predict_mask(logits.float(), batch["inverse"], batch["ori_size"], size=img.shape[-1])
            metrics.update(preds, batch["gt"], ids=batch["ref_id"].tolist())
    finally:
        net.train(was_training)
    return metrics.compute()


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate CRIS on referring-segmentation splits (official metrics)")
    ap.add_argument("--config", required=True, help="a train/configs/cris_*.yaml (model and data sections)")
    ap.add_argument("--weights", default=None, help="checkpoint in the official layout (default: model.weights)")
    ap.add_argument("--split", action="append", default=None, help="split(s) to evaluate (repeatable; default val)")
    ap.add_argument("--mode", choices=("test", "val"), default="test",
                    help="test: every sentence (official test.py); val: sentence 0 of each ref")
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--allow-random", action="store_true", help="evaluate without trained weights (smoke tests)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)

    from train.cris import build_dataset, build_model, load_config

    cfg = load_config(args.config, args.overrides)
    weights = args.weights or (cfg.get("model") or {}).get("weights")
    if not weights and not args.allow_random:
        ap.error("no --weights (and no model.weights in the config): refusing to evaluate random weights without "
                 "--allow-random")
    if weights and not os.path.isfile(weights):
        ap.error(f"--weights {weights!r} does not exist")
    cfg.setdefault("model", {})["weights"] = weights
    if weights:  # the checkpoint holds the backbone: do not read a CLIP file for it
        cfg.setdefault("backbone", {})["clip"] = None
    from models.cris.model import CRIS

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CRIS: backbone.clip")
        model = build_model(cfg, model_cls=CRIS).to(args.device).eval()
    results = {}
    for split in args.split or ["val"]:
        t0 = time.time()
        ds = build_dataset(cfg, split, args.mode)
        results[split] = evaluate(model, ds, args.batch_size, args.device, DTYPES[args.dtype], args.num_workers)
        r = results[split]
        print(f"{split}: mIoU {r['mIoU']:.4f} oIoU {r['oIoU']:.4f} " + " ".join(
            f"{k} {r[k]:.4f}" for k in r if k.startswith("Pr@")) + f" ({r['count']} expressions, "
              f"{time.time() - t0:.1f} s)", flush=True)
    out = {"config": os.path.abspath(args.config), "weights": weights and os.path.abspath(weights),
           "mode": args.mode, "dtype": args.dtype, "splits": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
