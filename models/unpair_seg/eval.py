"""Unpair-Seg open-vocabulary inference and evaluation (spec §6, §11.9; thesis ch. 3).

Open-vocabulary prediction of one image (:func:`open_vocab_predict`)::

    image uint8 [H, W, 3] -> canvas (preprocess.prepare: longest side S, padded with 128)
      -> UnpairSegS1 grid inference (cfg.pts_per_side points over the ORIGINAL extent, score filter, mask NMS)
         with the output size set to the canvas, so the proposals come back as canvas-aligned logits [K', S, S]
      -> region.region_embeddings(backbone, canvas, proposals at stride ``mask_stride``, scales, adapter) [K', E]
      -> classify.fcclip_logits(regions, text, logit_scale, num_templates) [K', K]
      -> proposals resized to (max(H, W),) * 2 and cropped to [:H, :W] (the official sem_seg_postprocess)
      -> panoptic.semantic_labels / panoptic.panoptic_inference (Mask2Former, 0.7 / 0.4)

Decisions where the official code is silent (stage 2 is unreleased, spec §11.9):

* The logit scale is CLIP's own ``logit_scale`` (exp, clamped at 100, as FC-CLIP); it sets the softmax temperature,
  so the 0.7 object threshold of the panoptic assembly depends on it.
* No void class, no in-/out-of-vocabulary geometric ensemble, no use of the stage-1 IoU scores in the assembly (the
  class probabilities alone rank and filter, as Mask2Former); the proposals keep the NMS order (descending score),
  which is the assembly's query order.
* Region embeddings read the proposals at stride 4 of the canvas (the decoder's own resolution; stage 2 trains on
  the same, ``Stage2Config.proposal_stride``). Default scales: (7/8, 1, 9/8) x S, i.e. 896 / 1024 / 1152 at the
  official canvas (the thesis), 112 / 128 / 144 at the tiny one; with ``--stage2`` the adapter checkpoint's scales.
* An image without proposals is all class 0 in the semantic map (the argmax of zeros) and all VOID in the panoptic one.

Promptable segmentation (:func:`prompt_predict`): the 1-point oracle prompt (metrics.oracle_point: the pixel
farthest from the boundary; mapped to the canvas like the official grid, preprocess.to_canvas) gives ``num_masks``
outputs, the best IoU counts (``mIoU``; ``mIoU_top`` for the highest predicted IoU; ``--point-protocol grid``
instead prompts the config's point grid and takes each instance's best match among all its outputs, the thesis'
wording of 1-pt IoU); the 1-box prompt (the tight GT
box, pixel edges, scaled to the canvas by the resize factors as detectron2 transforms boxes) gives the box head's one
output. Predictions are the stride-4 logits upsampled to the canvas and post-processed to the original size as the
proposals are, binarised at logit >= 0.

CLI::

    python -m models.unpair_seg.eval --task semantic|panoptic|point|box --data ROOT [--classes FILE]
        --checkpoint stage1.pth [--stage2 adapter.safetensors] [--clip clip.safetensors] [--config official|tiny]
        [--split NAME] [--out DIR] [--limit N] [--random-init]

Data layouts (``ROOT``, ``--split`` default "val"):

* semantic: ``ROOT/images/<split>/`` and ``ROOT/annotations/<split>/`` (override with ``--image-dir`` /
  ``--label-dir``; e.g. ``ADEChallengeData2016 --split validation --preset ade20k_150_raw``), label conventions by
  ``--preset`` / ``--label-format`` (train/data/seg_eval.py); ``--classes`` default ``ROOT/classes.txt``.
* panoptic, point, box: the detectron2 COCO layout ``ROOT/annotations/panoptic_<split>.json``,
  ``ROOT/panoptic_<split>/``, ``ROOT/<split>/`` (e.g. ``coco --split val2017``); ``--classes`` optionally replaces
  the category names (one line per category, synonyms allowed). point / box prompt every non-crowd thing segment
  (``--segments all``: stuff too).

Writes ``<out>/<split>_<task>.json``: ``{"task", "split", "metrics": {...}, "provenance": {checkpoint, stage2,
clip, config, image_size, data, classes, templates, scales, logit_scale, thresholds, count, limit, random_init,
device, dtype, seconds}}`` (metrics as fractions, see models/unpair_seg/metrics.py). Weights come from local files
only; without ``--checkpoint`` the stage-1 model is random and the CLI refuses unless ``--random-init``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from models.unpair_seg import preprocess as pp
from models.unpair_seg.classify import fcclip_logits, text_classifier
from models.unpair_seg.panoptic import panoptic_inference, semantic_labels

TASKS = ("semantic", "panoptic", "point", "box")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
_UPSAMPLE_CHUNK = 8  # prompts whose canvas-size logits are materialised at once in prompt_predict


def default_scales(image_size: int) -> tuple[int, ...]:
    """(7/8, 1, 9/8) x the canvas side: the thesis' 896 / 1024 / 1152 at 1024."""
    s = int(image_size)
    return (round(s * 7 / 8), s, round(s * 9 / 8))


def _logit_scale(backbone, logit_scale):
    if isinstance(logit_scale, str):
        if logit_scale != "clip":
            raise ValueError(f"'logit_scale' must be 'clip', None, a float or a tensor, got {logit_scale!r}")
        return backbone.clip_model.logit_scale.detach().float()
    return logit_scale


def postprocess_canvas(canvas_logits: torch.Tensor, height: int, width: int,
                       chunk: int = _UPSAMPLE_CHUNK) -> torch.Tensor:
    """Canvas-aligned logits [Q, s, s] -> [Q, H, W] at the original size: bilinear to (max(H, W),) * 2 and crop
    (the official ``sem_seg_postprocess`` for a square canvas), ``chunk`` masks at a time."""
    side = max(int(height), int(width))
    out = []
    for i in range(0, canvas_logits.shape[0], chunk):
        m = F.interpolate(canvas_logits[i:i + chunk][None].float(), size=(side, side), mode="bilinear",
                          align_corners=False)[0]
        out.append(m[:, :height, :width])
    if not out:
        return canvas_logits.new_zeros((0, height, width), dtype=torch.float32)
    return torch.cat(out)


@torch.no_grad()
def canvas_proposals(s1_model, image: np.ndarray, max_proposals: Optional[int] = None) -> dict:
    """Stage-1 grid proposals of one original image as canvas-aligned logits.

    Returns ``{"canvas": uint8 [3, S, S], "proposal": [K', S, S] logits, "scores": [K'], "height": H,
    "width": W}``: the official inference with the grid of the original extent, but post-processed to the canvas
    size (height = width = S), so the masks cover the canvas as the decoder predicts it.
    """
    img = pp._check_image("image", image)
    h, w = img.shape[:2]
    s = s1_model.cfg.image_size
    entry = pp.prepare(img, s)
    n_x, n_y = s1_model.cfg.pts_per_side
    res = s1_model([{"image": entry["image"], "height": s, "width": s,
                     "points": pp.point_grid(n_x, n_y, h, w, s)}])[0]
    masks, scores = res["proposal"], res["scores"]
    if max_proposals is not None:
        masks, scores = masks[:max_proposals], scores[:max_proposals]
    return {"canvas": entry["image"], "proposal": masks, "scores": scores, "height": h, "width": w}


@torch.no_grad()
def open_vocab_predict(s1_model, backbone, image, text: torch.Tensor, num_templates: Sequence[int], adapter=None,
                       scales: Optional[Sequence[int]] = None, *, logit_scale: Union[str, float, torch.Tensor, None]
                       = "clip", tasks: Sequence[str] = ("semantic",), is_thing: Optional[Sequence[bool]] = None,
                       object_mask_threshold: float = 0.7, overlap_threshold: float = 0.4, mask_stride: int = 4,
                       max_proposals: Optional[int] = None, rows_per_chunk: Optional[int] = 64) -> dict:
    """Open-vocabulary segmentation of one image (module docstring).

    Args:
        s1_model: an :class:`UnpairSegS1` (eval inference path).
        backbone: the CLIP backbone for region embeddings (None: ``s1_model.backbone``).
        image: RGB uint8 [H, W, 3] at its original size.
        text, num_templates: the text classifier (:func:`models.unpair_seg.classify.text_classifier`).
        adapter: an optional stage-2 :class:`SemanticAdapter`.
        scales: region-embedding scales (default :func:`default_scales` of the canvas).
        logit_scale: "clip" (the backbone's CLIP logit scale), None (cosines), or a value (a log scale).
        tasks: any of "semantic", "panoptic".
        is_thing: K booleans (required for "panoptic").
        object_mask_threshold, overlap_threshold: the panoptic assembly's (Mask2Former 0.7 / 0.4).
        mask_stride: the canvas stride of the masks given to the region pooling.
        max_proposals: keep at most this many proposals (by score).
        rows_per_chunk: rows scored at once in the semantic argmax (memory bound for large K).

    Returns ``{"proposal": [K', H, W] logits, "scores": [K'], "class_logits": [K', K], "region_embeddings":
    [K', E], "sem_seg": int64 [H, W] (semantic), "panoptic_seg": int32 [H, W] and "segments_info" (panoptic;
    "category_id" = contiguous class index)}``.
    """
    from models.unpair_seg.region import region_embeddings

    tasks = tuple(tasks)
    if not tasks or any(t not in ("semantic", "panoptic") for t in tasks):
        raise ValueError(f"open_vocab_predict: 'tasks' must be a non-empty subset of ('semantic', 'panoptic'), got "
                         f"{tasks!r}")
    if "panoptic" in tasks and is_thing is None:
        raise ValueError("open_vocab_predict: 'is_thing' (one bool per class) is required for the panoptic task")
    if isinstance(mask_stride, bool) or not isinstance(mask_stride, int) or mask_stride < 1:
        raise ValueError(f"open_vocab_predict: 'mask_stride' must be a positive int, got {mask_stride!r}")
    backbone = s1_model.backbone if backbone is None else backbone
    s = s1_model.cfg.image_size
    scales = default_scales(s) if scales is None else tuple(scales)
    prop = canvas_proposals(s1_model, image, max_proposals)
    h, w = prop["height"], prop["width"]
    device = s1_model.device
    masks = prop["proposal"].float()
    side = max(1, s // mask_stride)
    if masks.shape[0]:
        small = masks if side == s else \
            F.interpolate(masks[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        canvas = prop["canvas"][None].to(device)
        emb = region_embeddings(backbone, canvas, small[None].to(device), scales, adapter)  # [1, K', E]
    else:  # no proposal: nothing to pool (and nothing to resize at scales off the stride)
        emb = torch.zeros((1, 0, int(backbone.embed_dim)), device=device)
    cls = fcclip_logits(emb.float(), text.to(device), _logit_scale(backbone, logit_scale), num_templates)[0]
    proposal = postprocess_canvas(masks, h, w)
    out = {"proposal": proposal, "scores": prop["scores"], "class_logits": cls, "region_embeddings": emb[0]}
    if "semantic" in tasks:
        out["sem_seg"] = semantic_labels(proposal, cls, rows_per_chunk=rows_per_chunk)
    if "panoptic" in tasks:
        out["panoptic_seg"], out["segments_info"] = panoptic_inference(
            proposal, cls, is_thing, object_mask_threshold, overlap_threshold)
    return out


def _canvas_prompts(prompts, prompt_type: str, height: int, width: int, size: int) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(prompts, dtype=np.float32))
    last = 2 if prompt_type == "point" else 4
    if p.ndim != 2 or p.shape[1] != last:
        raise ValueError(f"prompt_predict: {prompt_type} prompts must be [P, {last}], got {tuple(p.shape)}")
    if prompt_type == "point":
        return pp.to_canvas(p, height, width, size)
    nh, nw = pp.output_shape(height, width, size)
    return p * torch.tensor([nw / width, nh / height, nw / width, nh / height], dtype=torch.float32)


@torch.no_grad()
def iter_prompt_predictions(s1_model, image, prompts, prompt_type: str):
    """:func:`prompt_predict` chunk by chunk (``cfg.points_per_batch`` prompts; the image features once): yields
    ``(masks [p, K, H, W] fp32 logits, ious [p, K])``."""
    img = pp._check_image("image", image)
    if prompt_type not in ("point", "box"):
        raise ValueError(f"prompt_predict: 'prompt_type' must be 'point' or 'box', got {prompt_type!r}")
    h, w = img.shape[:2]
    cfg = s1_model.cfg
    s = cfg.image_size
    pc = _canvas_prompts(prompts, prompt_type, h, w, s)
    if pc.shape[0] == 0:
        return
    device = s1_model.device
    canvas = pp.prepare(img, s)["image"][None].to(device)
    mask_features, multi_scale = s1_model.image_features(canvas)
    for start in range(0, pc.shape[0], cfg.points_per_batch):
        part = pc[start:start + cfg.points_per_batch][None].to(device)
        out = s1_model.decode(mask_features, multi_scale, part, prompt_type, aux_outputs=False)
        pm, pi = out["pred_masks"][0].float(), out["pred_ious"][0].float()  # [q, K, h4, w4], [q, K]
        q, k = pm.shape[:2]
        flat, masks = pm.flatten(0, 1), []
        for i in range(0, flat.shape[0], _UPSAMPLE_CHUNK * k):
            up = F.interpolate(flat[i:i + _UPSAMPLE_CHUNK * k][None], size=(s, s), mode="bilinear",
                               align_corners=False)[0]
            masks.append(postprocess_canvas(up, h, w))
        yield torch.cat(masks).reshape(q, k, h, w), pi


@torch.no_grad()
def prompt_predict(s1_model, image, prompts, prompt_type: str) -> dict:
    """Promptable segmentation of one original image.

    Args:
        image: RGB uint8 [H, W, 3].
        prompts: points [P, 2] (x, y) pixel indices or boxes [P, 4] (x0, y0, x1, y1) pixel edges, in ORIGINAL
            pixels (module docstring for the canvas mapping).
        prompt_type: "point" (``num_masks`` outputs per prompt) or "box" (the box head's one output).

    Returns ``{"masks": [P, K, H, W] logits (fp32), "ious": [P, K] (the decoder's once-sigmoided IoU scores)}``.
    """
    chunks = list(iter_prompt_predictions(s1_model, image, prompts, prompt_type))
    if not chunks:
        k = s1_model.cfg.num_masks if prompt_type == "point" else 1
        h, w = np.asarray(image).shape[:2]
        return {"masks": torch.zeros((0, k, h, w)), "ious": torch.zeros((0, k))}
    return {"masks": torch.cat([m for m, _ in chunks]), "ious": torch.cat([i for _, i in chunks])}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation loops


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def evaluate_semantic(s1_model, dataset, text, num_templates, adapter=None, scales=None, logit_scale="clip",
                      dtype=None, **kw) -> dict:
    """SemanticMetrics (models/unpair_seg/metrics.py) of :func:`open_vocab_predict` over a SemanticSegDataset."""
    from models.unpair_seg.metrics import SemanticMetrics

    metrics = SemanticMetrics(dataset.num_classes, dataset.ignore_label, dataset.class_names)
    for item in dataset:
        with _autocast(s1_model.device, dtype):
            pred = open_vocab_predict(s1_model, None, item["image"], text, num_templates, adapter, scales,
                                      logit_scale=logit_scale, tasks=("semantic",), **kw)
        metrics.update(pred["sem_seg"].cpu().numpy(), item["label"])
    return metrics.compute()


def evaluate_panoptic(s1_model, dataset, text, num_templates, adapter=None, scales=None, logit_scale="clip",
                      dtype=None, object_mask_threshold=0.7, overlap_threshold=0.4, **kw) -> dict:
    """PanopticMetrics of :func:`open_vocab_predict` over a COCOPanopticDataset (segment categories mapped from
    contiguous indices to the dataset's ids)."""
    from models.unpair_seg.metrics import PanopticMetrics

    metrics = PanopticMetrics(dataset.categories)
    for item in dataset:
        with _autocast(s1_model.device, dtype):
            pred = open_vocab_predict(s1_model, None, item["image"], text, num_templates, adapter, scales,
                                      logit_scale=logit_scale, tasks=("panoptic",), is_thing=dataset.is_thing,
                                      object_mask_threshold=object_mask_threshold,
                                      overlap_threshold=overlap_threshold, **kw)
        segs = [{"id": s["id"], "category_id": dataset.cat_ids[s["category_id"]]} for s in pred["segments_info"]]
        metrics.update(item["pan"], item["segments_info"], pred["panoptic_seg"].cpu().numpy(), segs)
    out = metrics.compute()
    return out


def instance_masks(item: dict, is_thing: Sequence[bool], cat_id_to_index: dict, segments: str = "things") \
        -> np.ndarray:
    """bool [N, H, W]: the item's non-crowd, non-empty segments (things only, or ``segments="all"``)."""
    out = []
    for s in item["segments_info"]:
        if int(s.get("iscrowd", 0)) == 1:
            continue
        if segments == "things" and not is_thing[cat_id_to_index[int(s["category_id"])]]:
            continue
        m = item["pan"] == int(s["id"])
        if m.any():
            out.append(m)
    h, w = item["pan"].shape
    return np.stack(out) if out else np.zeros((0, h, w), dtype=bool)


def evaluate_prompts(s1_model, dataset, prompt_type: str, segments: str = "things", dtype=None,
                     protocol: str = "center") -> dict:
    """PromptMetrics of 1-point / 1-box oracle prompts over a COCOPanopticDataset's instances.

    ``protocol`` (points only): "center", one prompt per instance at metrics.oracle_point, the best of its K
    outputs; "grid", the ``cfg.pts_per_side`` grid over the image (the thesis' "uniform point grid as input
    prompts"), each instance's best IoU among all grid outputs (no score filter, no NMS)."""
    from models.unpair_seg.metrics import PromptMetrics, mask_box, oracle_point, pairwise_iou

    if segments not in ("things", "all"):
        raise ValueError(f"evaluate_prompts: 'segments' must be 'things' or 'all', got {segments!r}")
    if protocol not in ("center", "grid") or (protocol == "grid" and prompt_type != "point"):
        raise ValueError(f"evaluate_prompts: 'protocol' must be 'center', or 'grid' with point prompts, got "
                         f"{protocol!r} for {prompt_type!r}")
    metrics = PromptMetrics()
    images = 0
    cfg = s1_model.cfg
    for item in dataset:
        gt = instance_masks(item, dataset.is_thing, dataset.cat_id_to_index, segments)
        images += 1
        if gt.shape[0] == 0:
            continue
        if protocol == "grid":
            h, w = gt.shape[1:]
            grid = pp.from_canvas(pp.point_grid(*cfg.pts_per_side, h, w, cfg.image_size), h, w, cfg.image_size)
            best = np.zeros(gt.shape[0])
            with _autocast(s1_model.device, dtype):
                for masks, _ in iter_prompt_predictions(s1_model, item["image"], grid.numpy(), "point"):
                    cand = (masks >= 0).flatten(0, 1).cpu().numpy()
                    best = np.maximum(best, pairwise_iou(cand, gt).max(1))
            metrics.add(best)
            continue
        prompts = [oracle_point(m) if prompt_type == "point" else mask_box(m) for m in gt]
        with _autocast(s1_model.device, dtype):
            pred = prompt_predict(s1_model, item["image"], prompts, prompt_type)
        metrics.update(pred["masks"].cpu().numpy() >= 0, gt, pred["ious"].cpu().numpy())
    out = metrics.compute()
    out["images"] = images
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def _load_clip(backbone, path: str) -> None:
    from models.common.checkpoint import load_into, read_state_dict, strip_prefixes

    sd = strip_prefixes(read_state_dict(path), ("module.", "_orig_mod.", "backbone.clip_model.", "clip_model."))
    load_into(backbone.clip_model, sd)


def _resolve_semantic(args, ap):
    from train.data.seg_eval import SemanticSegDataset

    root = Path(args.data)
    image_dir = Path(args.image_dir) if args.image_dir else root / "images" / args.split
    label_dir = Path(args.label_dir) if args.label_dir else root / "annotations" / args.split
    classes = Path(args.classes) if args.classes else root / "classes.txt"
    for name, p in (("image dir", image_dir), ("label dir", label_dir)):
        if not p.is_dir():
            ap.error(f"{name} {str(p)!r} does not exist (use --image-dir / --label-dir)")
    if not classes.is_file():
        ap.error(f"class file {str(classes)!r} does not exist (give --classes)")
    ds = SemanticSegDataset(image_dir, label_dir, classes, label_format=args.label_format, preset=args.preset,
                            limit=args.limit)
    return ds, str(classes.resolve())


def _resolve_panoptic(args, ap):
    from train.data.seg_eval import COCOPanopticDataset

    root = Path(args.data)
    js = root / "annotations" / f"panoptic_{args.split}.json"
    if not js.is_file():
        ap.error(f"panoptic JSON {str(js)!r} does not exist (layout ROOT/annotations/panoptic_<split>.json, "
                 f"ROOT/panoptic_<split>/, ROOT/<split>/)")
    classes = args.classes if args.task == "panoptic" else None
    if classes and not os.path.isfile(classes):
        ap.error(f"--classes {classes!r} does not exist")
    ds = COCOPanopticDataset(js, root / f"panoptic_{args.split}", root / args.split, class_file=classes,
                             limit=args.limit)
    return ds, classes and os.path.abspath(classes)


def _abs(p):
    return p and os.path.abspath(p)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="Unpair-Seg open-vocabulary evaluation (semantic mIoU, panoptic PQ, "
                                             "1-point / 1-box oracle IoU)")
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--data", required=True, help="dataset root (module docstring for the layouts)")
    ap.add_argument("--classes", default=None, help="class-name file: one class per line, synonyms comma-separated")
    ap.add_argument("--checkpoint", default=None, help="stage-1 checkpoint (official stage1.pth layout)")
    ap.add_argument("--stage2", default=None, help="stage-2 adapter checkpoint (models.unpair_seg.stage2.save_adapter)")
    ap.add_argument("--clip", default=None, help="CLIP weights replacing the checkpoint's backbone.clip_model")
    ap.add_argument("--config", choices=("official", "tiny"), default="official")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default="unpair_seg_eval", help="output folder")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    ap.add_argument("--random-init", action="store_true", help="run without a stage-1 checkpoint (smoke tests)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init")
    ap.add_argument("--templates", default=None,
                    help="template set (simple|vild|openai_imagenet|openai_imagenet_vild); default: the stage-2 "
                         "checkpoint's, else vild (official) / simple (tiny, the tiny CLIP's pretraining set)")
    ap.add_argument("--scales", default=None, help="region-embedding scales, e.g. 896,1024,1152")
    ap.add_argument("--image-dir", default=None)
    ap.add_argument("--label-dir", default=None)
    ap.add_argument("--label-format", default=None, choices=("index", "reduce_zero"))
    ap.add_argument("--preset", default=None, help="a train.data.seg_eval.PRESETS key")
    ap.add_argument("--segments", choices=("things", "all"), default="things", help="point / box: which segments")
    ap.add_argument("--point-protocol", choices=("center", "grid"), default="center",
                    help="point: one prompt at each instance's farthest-from-boundary pixel (center), or the "
                         "config's grid with each instance's best match among all outputs (grid)")
    ap.add_argument("--object-mask-threshold", type=float, default=0.7)
    ap.add_argument("--overlap-threshold", type=float, default=0.4)
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="override the stage-1 threshold on the double-sigmoid IoU score (official 0.65)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)

    for name in ("checkpoint", "stage2", "clip"):
        v = getattr(args, name)
        if v and not os.path.isfile(v):
            ap.error(f"--{name} {v!r} does not exist (weights are read from local files only)")
    if not args.checkpoint and not args.random_init:
        ap.error("no --checkpoint: the stage-1 model would be random; give stage1.pth, or --random-init for a smoke "
                 "test")
    if args.point_protocol != "center" and args.task != "point":
        ap.error("--point-protocol grid applies to --task point only")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if not os.path.isdir(args.data):
        ap.error(f"--data {args.data!r} is not a folder")

    from models.unpair_seg.infer import build_config

    t0 = time.time()
    try:
        cfg = build_config(args.config, score_threshold=args.score_threshold)
        scales = tuple(int(v) for v in args.scales.split(",")) if args.scales else None
    except ValueError as e:
        ap.error(str(e))
    if args.task in ("semantic",):
        dataset, classes = _resolve_semantic(args, ap)
    else:
        dataset, classes = _resolve_panoptic(args, ap)

    from models.unpair_seg.convert import load_official
    from models.unpair_seg.model import UnpairSegS1

    torch.manual_seed(args.seed)
    model = UnpairSegS1(cfg)
    if args.checkpoint:
        load_official(model, args.checkpoint)
    if args.clip:
        _load_clip(model.backbone, args.clip)
    device = torch.device(args.device)
    model = model.to(device).eval()
    dtype = DTYPES[args.dtype]
    adapter, s2cfg = None, None
    if args.stage2:
        from models.unpair_seg.stage2 import load_adapter

        adapter, s2cfg = load_adapter(args.stage2, model.backbone)
        adapter = adapter.to(device).eval()
    templates = args.templates or (s2cfg.templates if s2cfg is not None else
                                   ("vild" if args.config == "official" else "simple"))
    if scales is None:
        scales = tuple(s2cfg.loss_scales) if s2cfg is not None else default_scales(cfg.image_size)
    provenance = {"checkpoint": _abs(args.checkpoint), "stage2": _abs(args.stage2), "clip": _abs(args.clip),
                  "config": args.config, "image_size": cfg.image_size, "data": os.path.abspath(args.data),
                  "classes": classes, "split": args.split, "limit": args.limit, "random_init": not args.checkpoint,
                  "device": args.device, "dtype": args.dtype, "score_threshold": cfg.score_threshold}
    if args.task in ("semantic", "panoptic"):
        text, num_templates = text_classifier(model.backbone, dataset.class_names, templates)
        logit_scale = float(torch.clamp(model.backbone.clip_model.logit_scale.detach().float().exp(), max=100))
        provenance.update({"templates": templates if isinstance(templates, str) else list(templates),
                           "num_classes": len(dataset.class_names), "scales": list(scales),
                           "logit_scale": logit_scale})
        if args.task == "semantic":
            metrics = evaluate_semantic(model, dataset, text, num_templates, adapter, scales, dtype=dtype)
        else:
            metrics = evaluate_panoptic(model, dataset, text, num_templates, adapter, scales, dtype=dtype,
                                        object_mask_threshold=args.object_mask_threshold,
                                        overlap_threshold=args.overlap_threshold)
            provenance["thresholds"] = {"object_mask": args.object_mask_threshold,
                                        "overlap": args.overlap_threshold}
    else:
        metrics = evaluate_prompts(model, dataset, args.task, args.segments, dtype=dtype,
                                   protocol=args.point_protocol)
        provenance["segments"] = args.segments
        if args.task == "point":
            provenance["point_protocol"] = args.point_protocol
    provenance["count"] = len(dataset)
    provenance["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.split}_{args.task}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"task": args.task, "split": args.split, "metrics": metrics, "provenance": provenance}, f,
                  indent=2)
    os.replace(tmp, path)
    headline = {"semantic": "mIoU", "panoptic": "PQ", "point": "mIoU", "box": "mIoU"}[args.task]
    value = metrics.get(headline)
    shown = "n/a" if value is None else f"{value:.4f}"
    print(f"Unpair-Seg {args.task} on {args.split}: {headline} {shown} ({len(dataset)} images, "
          f"{provenance['seconds']:.1f} s); wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
