"""Mask NMS benchmark at Unpair-Seg's post-processing scale: 1200 mask logits of 256x256 (the 2x-downsampled
binary masks are 128x128), IoU threshold 0.5, coverage threshold 0.7, "or" (the official stage-1 settings).

The masks are random elliptical blobs with the overlap structure of a point-prompted model's proposals (see
``blob_masks``): groups of near-duplicates, parts and supersets of one object, so both criteria suppress.

Cost per call (N masks of H x W, s bytes per logit, downsampled to P = Ho * Wo pixels, K = ceil(P/32) words):
  bytes  N*H*W*s (the logits, read once) + 4*N*K (packed masks written) + 4*N*ceil(N/32) (suppression bits);
         the kernels re-read the packed masks (or the fp16 pixels of the matmul variant, 2*N*P bytes) from L2.
  FLOP   counted as 2 * P per pair of the upper triangle, N*(N-1)/2 pairs: an AND and an add per pixel pair for
         the popcount variant, a multiply-add for the matmul variant; 23.6 G at the benchmark shape.
Ceilings (H200): reading the logits 157 MB / 4.3 TB/s = 37 us; the pairs 23.6 GFLOP on fp16 tensor cores at
~790 TFLOP/s = 30 us, or 368 M word popcounts at 16 per clock per SM (4.2 T/s) = 88 us; the scan is
ceil(N/32) = 38 dependent steps. The anchor: the official loop over torch ops (two fp32 einsums of 47 GFLOP each
and one host sync per kept mask), and the vectorized torch reference, measured in the same run.
Bar (issue #6): >= 20x faster than the official loop on the H200. No claim without a GPU measurement.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from bench.common import Context, Record, time_ms
from mmkernels.ops.mask_nms import reference

IOU, COVERAGE = 0.5, 0.7
CASES = [("1200x256^2", 1200, 256, 256)]
QUICK = CASES
CPU = [("60x64^2", 60, 64, 64)]


def blob_masks(n: int, h: int, w: int, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32, device="cpu", group: int = 4):
    """(masks [n, h, w] logits, scores [n]) of random elliptical blobs in groups of ``group`` proposals per object:
    near-duplicates (IoU suppressions), shrunk parts and grown supersets (coverage suppressions), one in 16 groups
    far outside the image (empty masks). Logits are 8 * (1 - r^2) for the elliptic radius r plus noise, so edges
    are soft and binarization depends on the exact values. Made in fp32 on the CPU, then moved and cast."""
    g = generator
    objects = -(-n // group)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    cy, cx = u(objects) * h, u(objects) * w
    ry, rx = (0.05 + 0.3 * u(objects)) * h, (0.05 + 0.3 * u(objects)) * w
    theta = u(objects) * math.pi
    far = u(objects) < 1 / 16
    cy = torch.where(far, cy + 4.0 * h, cy)
    # Per proposal: its object, a scale (0.6 parts .. 1.4 supersets, many near 1) and a small jitter.
    obj = torch.arange(n) // group
    scale = torch.where(u(n) < 0.5, 1.0 + 0.06 * (u(n) - 0.5), 0.6 + 0.8 * u(n))
    jy, jx = (u(n) - 0.5) * 0.1 * ry[obj], (u(n) - 0.5) * 0.1 * rx[obj]
    yy = torch.arange(h, dtype=torch.float32)[None, :, None]
    xx = torch.arange(w, dtype=torch.float32)[None, None, :]
    dy = yy - (cy[obj] + jy)[:, None, None]
    dx = xx - (cx[obj] + jx)[:, None, None]
    c, s = torch.cos(theta[obj])[:, None, None], torch.sin(theta[obj])[:, None, None]
    r2 = ((c * dy + s * dx) / (ry[obj] * scale)[:, None, None]) ** 2 + \
        ((c * dx - s * dy) / (rx[obj] * scale)[:, None, None]) ** 2
    logits = 8.0 * (1.0 - r2) + 0.5 * torch.randn(n, h, w, generator=g)
    scores = u(n)
    return logits.to(device=device, dtype=dtype), scores.to(device)


def _impls(ctx: Context):
    """(label, fn(masks, scores), note): the official loop, the vectorized torch reference, and our backends (both
    intersection variants of the Triton backend)."""
    from mmkernels import _backend, mask_nms, use_backend
    from mmkernels.ops.mask_nms import triton as nms_triton

    def official(m, s):
        return reference.mask_nms_official(m, s, iou_threshold=IOU, coverage_threshold=COVERAGE)

    def vectorized(m, s):
        return reference.mask_nms(m, s, IOU, COVERAGE, "or", 2)

    def ours(backend, intersect=None):
        def run(m, s):
            saved = nms_triton.INTERSECT
            if intersect is not None:
                nms_triton.INTERSECT = intersect
            try:
                with use_backend(backend):
                    return mask_nms(m, s, iou_threshold=IOU, coverage_threshold=COVERAGE)
            finally:
                nms_triton.INTERSECT = saved
        return run

    out = [("official loop", official, ""), ("torch vectorized", vectorized, "")]
    if not ctx.cuda:
        return out + [("mmkernels[torch]", ours("torch"), "")]

    ops = _backend.OPS["mask_nms"].backends
    if ops["triton"].available() is None:
        out += [("mmkernels[triton]", ours("triton", "dot"), "(dot)"),
                ("mmkernels[triton]", ours("triton", "popcount"), "(popcount)")]
    if ops["cuda"].available() is None:
        out.append(("mmkernels[cuda]", ours("cuda"), "(experimental)" if ops["cuda"].experimental else ""))
    return out


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    records = []
    for name, n, h, w in (CPU if not ctx.cuda else (QUICK if ctx.quick else CASES)):
        gen = torch.Generator().manual_seed(0)
        masks, scores = blob_masks(n, h, w, generator=gen, dtype=dtype, device=ctx.device)
        ho, wo = reference.output_size(h, w, 2)
        words = -(-(ho * wo) // 32)
        nbytes = n * h * w * s + 4 * n * words + 4 * n * reference.words_per_row(n)
        flops = 2 * ho * wo * n * (n - 1) // 2
        expected = reference.mask_nms_official(masks, scores, iou_threshold=IOU, coverage_threshold=COVERAGE)
        for label, fn, note in _impls(ctx):
            got = fn(masks, scores)
            same = got.device == expected.device and torch.equal(got, expected)
            note_ = note if same else f"{note} WRONG: kept indices differ from the official loop".strip()
            ms = time_ms(lambda: fn(masks, scores), ctx.device, ctx.quick)
            records.append(Record("mask_nms", name, f"[{n}, {h}, {w}] kept {expected.numel()}",
                                  str(dtype).replace("torch.", ""), label, "fwd", ms, nbytes, flops, note=note_,
                                  rel_err=0.0 if same else 1.0).finish(ctx.copy_gbps))
    return records
