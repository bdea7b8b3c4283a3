"""Unpair-Seg end to end (issue 10): stage-1 grid inference and the stage-2 region-embedding step, ours against an
official-style path with the same weights, in the same run.

Setting (GPU): the official config (ConvNeXt-L CLIP, 1024² canvas), seeded weights (the modules' own inits), one
ShapesWorld scene rendered at 768 x 1024 (letterboxed into the canvas as the official preprocessing does), the
20 x 20 point grid (400 prompts, 1600 masks), bf16 autocast as the official demo. With untrained weights the IoU
head would score every mask alike, so the last bias of each ``iou_embed`` is set so that about half of the masks pass
the 0.65 filter (a trained model's logs show tens to hundreds of proposals, spec §7.3); NMS then does real work.

Implementations (stage 1, the whole ``forward(batched_inputs)`` incl. pre-computed canvas, NMS and the resize back):
  * "mmkernels (bf16 autocast, fp32 pixel decoder)": UnpairSegS1 with the official precision regime (pixel decoder
    in fp32 on our deformable-attention kernel), score filter before upsampling, mmkernels.mask_nms;
  * "mmkernels (bf16, bf16 pixel decoder)": the same with ``pixel_decoder_dtype="bf16"``;
  * "official-style": models/unpair_seg/official_style.py: the grid_sample deformable attention in fp32, all 1600
    masks upsampled to 1024² before the filter, a dense-torch NMS (the official loop), prompts in chunks of 100.
Output check: the number of proposals and the mean IoU of the binarised proposals matched in order against the
official-style ones, computed once more with a stable sort so that tied scores are visited in mask_nms' order
(bf16 rounding may still flip a tie at the threshold; the record says so).
Stage 2: ``region_embeddings`` at scales 896/1024/1152 for 100 masks (stride-4 logits): ours pools with
mmkernels.mask_pool (no resized mask materialised), the official style with interpolate + einsum (spec §6).
Timing: wall clock of whole calls with device synchronisation, median of 5 after a warm-up (``--quick``: 2).
Bars (H200): stage-1 inference <= 0.1 s/image; >= 3x the official-style path; peak memory <= 0.5x of it.
CPU: the tiny preset at 128² with the 8 x 8 grid in fp32: a smoke run of the same code; the bars do not apply.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from bench.common import Context, Record
from bench.models import ModelRecord, bar_note, median, peak_mib, wall_seconds
from models.unpair_seg.config import UnpairSegConfig

LATENCY_BAR_S = 0.1
SPEEDUP_BAR = 3.0
MEMORY_BAR = 0.5
OFFICIAL = "official-style"
FIRST_SIGMOID_MIN = math.log(0.65 / 0.35)  # sigmoid(x) >= this  <=>  sigmoid(sigmoid(x)) >= 0.65


def _scene(height: int, width: int) -> np.ndarray:
    from train.data.shapes import ShapesWorld

    world = ShapesWorld(seed=0, size=(height, width), min_objects=4, max_objects=6, supersample=2)
    return (world.scene(0).image * 255).round().astype(np.uint8)


def build(cfg: UnpairSegConfig, seed: int = 0):
    """UnpairSegS1 with seeded default inits and ``iou_embed`` biases centred on the score threshold."""
    from models.unpair_seg.model import UnpairSegS1

    torch.manual_seed(seed)
    model = UnpairSegS1(cfg).eval()
    with torch.no_grad():
        for head in model.sem_seg_head.predictor.iou_embed:
            head.layers[-1].bias.fill_(float(math.log(FIRST_SIGMOID_MIN / (1 - FIRST_SIGMOID_MIN))))
    return model


def _binary_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 1.0 if a.shape[0] == b.shape[0] else 0.0
    x, y = a[:n] > 0, b[:n] > 0
    inter = (x & y).flatten(1).sum(1).float()
    union = (x | y).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def run(ctx: Context) -> list[Record]:
    from models.unpair_seg import preprocess as pp
    from models.unpair_seg.official_style import official_style_inference

    dev = ctx.device
    if ctx.cuda:
        cfg, autocast, h, w = UnpairSegConfig.official(), torch.bfloat16, 768, 1024
    else:
        cfg, autocast, h, w = UnpairSegConfig.tiny(), None, 96, 128
    reps = 2 if ctx.quick else 5
    S = cfg.image_size
    model = build(cfg).to(dev)
    model_bf16 = build(dataclasses.replace(cfg, pixel_decoder_dtype="bf16")).to(dev)
    model_bf16.load_state_dict(model.state_dict())
    entry = pp.prepare(_scene(h, w), S)
    inputs = [entry]
    dname = "bf16 autocast" if autocast is not None else "float32"

    def ours(m):
        def fn():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast is not None):
                return m(inputs)
        return fn

    fns = {"mmkernels (bf16 autocast, fp32 pixel decoder)" if ctx.cuda else "mmkernels (fp32)": ours(model)}
    if ctx.cuda:
        fns["mmkernels (bf16, bf16 pixel decoder)"] = ours(model_bf16)
    fns[OFFICIAL] = lambda: official_style_inference(model, inputs, autocast_dtype=autocast)
    records: list[Record] = []
    with torch.no_grad():
        outs = {label: fn() for label, fn in fns.items()}  # warm-up and the output check
        # The check's reference is the official-style path with a stable sort (ties lowest index first, the order
        # mmkernels.mask_nms promises). Under bf16 the centred IoU biases put hundreds of masks on the same bf16
        # score; the official unstable sort then orders the ties arbitrarily and NMS keeps other tied masks, so a
        # check against the timed (unstable) baseline reported DIFFERS for correct outputs (found on the CPU: mean
        # IoU 0.87 against the unstable run, 1.0 against the stable one). The timed baseline stays unstable.
        want = official_style_inference(model, inputs, autocast_dtype=autocast, stable=True)[0]
        times = {label: wall_seconds(fn, dev, reps) for label, fn in fns.items()}
        peaks = {label: peak_mib(fn, dev) for label, fn in fns.items()}
    t_off = median(times[OFFICIAL])
    n_prompts = cfg.pts_per_side[0] * cfg.pts_per_side[1]
    case = f"{'official' if ctx.cuda else 'tiny'} stage-1 grid {cfg.pts_per_side[0]}x{cfg.pts_per_side[1]} {S}^2"
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values()) + entry["image"].numel()
    for label in fns:
        secs = median(times[label])
        got = outs[label][0]
        extra = {"seconds_per_image": secs, "images_per_s": 1.0 / secs, "samples_s": times[label],
                 "peak_mib": peaks[label], "proposals": int(got["proposal"].shape[0]), "prompts": n_prompts}
        notes = []
        if label != OFFICIAL:
            speedup = t_off / secs
            miou = _binary_iou(got["proposal"], want["proposal"])
            extra.update(speedup_vs_official=speedup, proposals_official=int(want["proposal"].shape[0]),
                         proposal_iou_vs_official=miou)
            if abs(extra["proposals"] - extra["proposals_official"]) > 1 or miou < 0.9:
                notes.append(f"DIFFERS: {extra['proposals']} vs {extra['proposals_official']} proposals, "
                             f"mean IoU {miou:.3f}")
            if ctx.cuda:
                for what, value, bar, higher, unit, key in (
                        ("s/image", secs, LATENCY_BAR_S, False, " s", "latency"),
                        ("speedup vs official-style", speedup, SPEEDUP_BAR, True, "x", "speedup")):
                    n, ok = bar_note(what, value, bar, higher, unit)
                    notes.append(n)
                    extra[f"{key}_bar_met"] = ok
                if peaks[label] is not None and peaks[OFFICIAL]:
                    ratio = peaks[label] / peaks[OFFICIAL]
                    n, ok = bar_note("peak memory vs official-style", ratio, MEMORY_BAR, False, "x")
                    notes.append(n)
                    extra.update(memory_ratio=ratio, memory_bar_met=ok)
            else:
                notes.append(f"{speedup:.2f}x vs official-style (CPU smoke run; the bars are for the H200)")
        else:
            notes.append("the baseline; the output check uses its stable-sort rerun")
        records.append(ModelRecord("unpair_seg", case, f"[1, 3, {S}, {S}] + {n_prompts} points", dname, label,
                                   "inference", secs * 1e3, nbytes, 0, note="; ".join(notes), peak_mb=peaks[label],
                                   extra=extra).finish(ctx.copy_gbps))
    del outs, want
    records += _region_records(ctx, model, entry, autocast, reps)
    if ctx.cuda:
        torch.cuda.empty_cache()
    return records


def _region_records(ctx: Context, model, entry: dict, autocast, reps: int) -> list[Record]:
    import torch.nn.functional as F

    from models.unpair_seg import region
    from models.unpair_seg.official_style import mask_pooling

    dev = ctx.device
    S = model.cfg.image_size
    scales = (896, 1024, 1152) if ctx.cuda else (112, 128, 144)
    q = 100 if ctx.cuda else 12
    g = torch.Generator().manual_seed(5)
    masks = (torch.randn(1, q, S // 4, S // 4, generator=g) * 4).to(dev)
    images = entry["image"][None].to(dev)
    backbone = model.backbone

    def ours():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast is not None):
            return region.region_embeddings(backbone, images, masks, scales)

    def official():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast is not None):
            per = []
            for s in scales:
                feats, m = region.scale_features(backbone, images, masks, s)
                pooled = mask_pooling(feats["clip_vis_dense"], m)
                per.append(F.normalize(backbone.visual_prediction_forward(pooled), dim=-1))
            return F.normalize(torch.stack(per).mean(0), dim=-1)

    fns = {"mmkernels (mask_pool)": ours, OFFICIAL + " (interpolate + einsum)": official}
    with torch.no_grad():
        want = official().float()
        got = ours().float()
        cos = float(F.cosine_similarity(got, want, dim=-1).min())
        times = {label: wall_seconds(fn, dev, reps) for label, fn in fns.items()}
        peaks = {label: peak_mib(fn, dev) for label, fn in fns.items()}
    t_off = median(times[OFFICIAL + " (interpolate + einsum)"])
    records = []
    for label in fns:
        secs = median(times[label])
        extra = {"seconds": secs, "masks": q, "scales": list(scales), "peak_mib": peaks[label]}
        if label.startswith("mmkernels"):
            extra.update(speedup_vs_official=t_off / secs, min_cosine_vs_official=cos)
            note = f"{t_off / secs:.2f}x vs official-style; min cosine {cos:.4f}"
            if cos < 0.99:
                note += "; DIFFERS"
        else:
            note = "baseline"
        records.append(ModelRecord("unpair_seg", f"stage-2 region embeddings {q} masks x {len(scales)} scales",
                                   f"[1, 3, {S}, {S}] + [1, {q}, {S // 4}, {S // 4}]",
                                   "bf16 autocast" if autocast is not None else "float32", label, "inference",
                                   secs * 1e3, images.numel() + masks.numel() * 4, 0, note=note,
                                   peak_mb=peaks[label], extra=extra).finish(ctx.copy_gbps))
    return records
