"""Mask NMS Triton kernels: the ``triton`` backend. Semantics: reference.py.

Three kernels and one host sync (the size of the result):

1. ``_pack_kernel``, grid (N, word blocks): row r of the output is mask order[r] (visiting order). Each program
   computes BLOCK_K * 32 binary pixels: downsampled (the CUDA bilinear formula of reference.Plan, when fused) or
   read as they are, compared with the exact sigmoid threshold, packed 32 per int32 word; the row's area is an
   int32 atomic add (exact, so the order of the adds does not matter). With ``DENSE_OUT`` it also writes the pixels as
   fp16 0/1, the operand of the matmul variant.
2. ``_pairs_kernel``: the suppression matrix, bits [N, ceil(N/32)] int32, strictly upper triangular in visiting order: a program owns
   a [BLOCK_M, BLOCK_N] tile of (kept i, candidate j) pairs, skips tiles with no j > i, and computes the exact
   intersection counts in one of two ways (``INTERSECT``, the constexpr ``DOT``):

   * ``"popcount"``: AND of the packed words and popcount (``popc.b32`` on the GPU; a branch-free bit-trick
     popcount of the same int32 values under the CPU interpreter), summed in int32;
   * ``"dot"``: ``tl.dot`` of the fp16 0/1 pixels with fp32 accumulation on tensor cores. Exact: the products are 0
     or 1 and every partial sum is an integer below 2^24 (the backend caps the pixels at 2^23), which fp32 holds,
     and which the tensor cores' aligned, truncating accumulation keeps as well (no fraction bits to lose).

   The epilogue applies the fp32 formulas of reference.py with IEEE division (``tl.math.div_rn``: Triton's ``/`` is
   an approximate division on the GPU) and packs each row's 32-column groups into words. Each word belongs to one
   program: no atomics. Tiles below the diagonal are never written (the matrix is zero-initialized).
3. ``_scan_kernel``, one program: the greedy walk, 32 rows at a time, with the removed-bitmask in registers. For a
   block of 32 rows it resolves the block's own 32 x 32 diagonal word sequentially on scalars, then ORs the rows it
   kept into the removed-bitmask with one [32, ceil(N/32)] load: ceil(N/32) sequential steps, no host round trip.

Limits (``supports``): N <= 32768 (the scan's register bitmask) and Ho * Wo <= 2^23 pixels (areas and area sums
exact in fp32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmkernels import _backend
from mmkernels.ops.mask_nms import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MASKS = 32768
INTERSECTS = ("popcount", "dot")
# The intersection variant (see the module docstring): the tensor-core matmul by default, the popcount on request.
INTERSECT = os.environ.get("MMKERNELS_MASK_NMS_INTERSECT", "dot")
# Fuse the downsampling into the pack kernel for contiguous CUDA masks (reference.plan). False lets PyTorch's
# interpolate run first on every device (exact by construction, one more pass over 1/d^2 of the logits).
FUSE_DOWNSAMPLE = True

# Tile sizes. Tests shrink them (monkeypatch) to force several tiles and word blocks at tiny shapes.
PACK_WORDS = 32  # words per pack program (1024 pixels)
POPC_TILE = (32, 64, 4)  # BLOCK_M, BLOCK_N (a multiple of 32), words per step
DOT_TILE = (64, 64, 64)  # BLOCK_M, BLOCK_N (a multiple of 32), pixels per step


def supports(masks, scores, iou_threshold, coverage_threshold, combine, downsample) -> _backend.Reason:
    why = _backend.triton_supports_tensors(masks, dtypes=DTYPES)
    if why is None:
        why = reference.kernel_limits(masks, downsample, MAX_MASKS)
    return why


def _intersect() -> str:
    if INTERSECT not in INTERSECTS:
        raise ValueError(f"mmkernels.mask_nms: MMKERNELS_MASK_NMS_INTERSECT={INTERSECT!r} is not one of "
                         f"{', '.join(INTERSECTS)}")
    return INTERSECT


# ----------------------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _pack_kernel(X, ORDER, BITS, AREA, DENSE, sxn, sxh, sxw, out_w, n_pixels, n_words, threshold, lam0, lam1,
                 FACTOR: tl.constexpr, DENSE_OUT: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    words = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bit = tl.arange(0, 32)
    p = words[:, None] * 32 + bit[None, :]  # [BLOCK_K, 32] output pixel ids (< 2^23 + 2^10)
    valid = p < n_pixels
    oh = p // out_w
    ow = p % out_w
    base = X + tl.load(ORDER + row) * sxn  # int64 mask offset
    if FACTOR == 1:
        v = tl.load(base + oh.to(tl.int64) * sxh + ow.to(tl.int64) * sxw, mask=valid, other=0.0).to(tl.float32)
    else:
        # PyTorch's CUDA bilinear formula (reference.Plan): the 2x2 pixels at FACTOR*o + (FACTOR-1)//2 + {0, 1},
        # all in range for every output pixel (FACTOR*(Ho-1) + FACTOR//2 <= H - 1); rounded once to the dtype.
        off = (oh * FACTOR + (FACTOR - 1) // 2).to(tl.int64) * sxh + (ow * FACTOR + (FACTOR - 1) // 2).to(tl.int64) * sxw
        a = tl.load(base + off, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(base + off + sxw, mask=valid, other=0.0).to(tl.float32)
        c = tl.load(base + off + sxh, mask=valid, other=0.0).to(tl.float32)
        e = tl.load(base + off + sxh + sxw, mask=valid, other=0.0).to(tl.float32)
        v = lam0 * (lam0 * a + lam1 * b) + lam1 * (lam0 * c + lam1 * e)
        v = v.to(X.dtype.element_ty).to(tl.float32)
    on = ((v >= threshold) & valid).to(tl.int32)
    word = tl.reduce_or(on << bit[None, :], axis=1)
    row64 = row.to(tl.int64)
    tl.store(BITS + row64 * n_words + words, word, mask=words < n_words)
    tl.atomic_add(AREA + row, tl.sum(on))
    if DENSE_OUT:
        tl.store(DENSE + row64 * (n_words * 32) + p, on.to(tl.float16), mask=(words < n_words)[:, None])


@triton.jit
def _popc(x, INTERPRET: tl.constexpr):
    """Population count of int32 lanes."""
    if INTERPRET:
        # SWAR popcount; the masks make the arithmetic right shifts of negative words harmless.
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        out = x & 0x3F
    else:
        out = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _tile_has_pairs(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether this program's tile holds a pair with j > i (the largest column above the smallest row)."""
    return (tl.program_id(1) + 1) * BLOCK_N - 1 > tl.program_id(0) * BLOCK_M


@triton.jit
def _decide_and_store(inter, rows, cols, AREA, SUP, n, n_sup_words, iou_t, cov_t, eps, AND: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fp32 decisions of reference.suppression_matrix for the tile's exact counts ``inter``, packed 32
    columns per word and stored (columns BLOCK_N * pid_n .. are words BLOCK_N / 32 * pid_n ..)."""
    rmask = rows < n
    cmask = cols < n
    ai = tl.load(AREA + rows, mask=rmask, other=0).to(tl.float32)
    aj = tl.load(AREA + cols, mask=cmask, other=0).to(tl.float32)
    f = inter.to(tl.float32)
    num = f + eps
    iou = tl.math.div_rn(num, ((ai[:, None] + aj[None, :]) - f) + eps)
    cov = tl.math.div_rn(num, aj[None, :] + eps)
    if AND:
        dec = (iou >= iou_t) & (cov >= cov_t)
    else:
        dec = (iou >= iou_t) | (cov >= cov_t)
    dec = dec & (cols[None, :] > rows[:, None]) & rmask[:, None] & cmask[None, :]
    grouped = tl.reshape(dec.to(tl.int32), [BLOCK_M, BLOCK_N // 32, 32])
    words = tl.reduce_or(grouped << tl.arange(0, 32)[None, None, :], axis=2)
    wcols = tl.program_id(1) * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
    tl.store(SUP + rows[:, None].to(tl.int64) * n_sup_words + wcols[None, :], words,
             mask=rmask[:, None] & (wcols < n_sup_words)[None, :])


@triton.jit
def _pairs_kernel(OPS, AREA, SUP, n, n_cols, n_sup_words, iou_t, cov_t, eps, AND: tl.constexpr,
                  DOT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the suppression matrix. OPS [N, n_cols]: the packed words (popcount,
    DOT False) or the fp16 0/1 pixels (tensor-core matmul, DOT True); BLOCK_K columns of OPS per step."""
    if _tile_has_pairs(BLOCK_M, BLOCK_N):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        a_ptr = OPS + rows[:, None].to(tl.int64) * n_cols
        b_ptr = OPS + cols[:, None].to(tl.int64) * n_cols
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, n_cols, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + ks[None, :], mask=(rows < n)[:, None] & (ks < n_cols)[None, :], other=0)
            b = tl.load(b_ptr + ks[None, :], mask=(cols < n)[:, None] & (ks < n_cols)[None, :], other=0)
            if DOT:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc += tl.sum(_popc(a[:, None, :] & b[None, :, :], INTERPRET), axis=2)
        _decide_and_store(acc, rows, cols, AREA, SUP, n, n_sup_words, iou_t, cov_t, eps, AND, BLOCK_M, BLOCK_N)


@triton.jit
def _scan_kernel(SUP, KEEP, n, n_sup_words, WP: tl.constexpr):
    cols = tl.arange(0, WP)
    lanes = tl.arange(0, 32)
    removed = tl.zeros([WP], dtype=tl.int32)
    for blk in range(0, n_sup_words):
        row0 = blk * 32
        # The removed-word of this block's 32 rows (set by kept rows of earlier blocks).
        cur = tl.reduce_or(tl.where(cols == blk, removed, 0), axis=0)
        kept = cur & 0
        one = kept + 1
        # Within the block, in order: row t is kept unless removed; a kept row removes the rows its diagonal word
        # names (only later rows: the matrix is strictly upper triangular).
        for t in tl.static_range(32):
            diag = tl.load(SUP + (row0 + t).to(tl.int64) * n_sup_words + blk, mask=row0 + t < n, other=0)
            free = ((cur >> t) & 1) == 0
            cur = tl.where(free, cur | diag, cur)
            kept = tl.where(free, kept | (one << t), kept)
        rows = row0 + lanes
        keep_rows = (((kept >> lanes) & 1) != 0) & (rows < n)
        tile = tl.load(SUP + rows[:, None].to(tl.int64) * n_sup_words + cols[None, :],
                       mask=keep_rows[:, None] & (cols < n_sup_words)[None, :], other=0)
        removed = removed | tl.reduce_or(tile, axis=0)
        tl.store(KEEP + rows, keep_rows.to(tl.int8), mask=rows < n)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (the stages; tests compare each one with reference.py).


def _interpret() -> bool:
    return _backend.triton_interpreted()


def pack(p: reference.Plan, dense: bool = False):
    """(bits int32 [N, K], area int32 [N], dense fp16 [N, 32K] or None) in visiting order."""
    src = p.src
    n = src.shape[0]
    bits = torch.empty((n, p.words), dtype=torch.int32, device=src.device)
    area = torch.zeros(n, dtype=torch.int32, device=src.device)
    dense_t = torch.empty((n, p.words * 32), dtype=torch.float16, device=src.device) if dense else None
    grid = (n, triton.cdiv(p.words, PACK_WORDS))
    _pack_kernel[grid](src, p.order, bits, area, dense_t if dense else bits, src.stride(0), src.stride(1),
                       src.stride(2), p.out_w, p.pixels, p.words, p.threshold, p.lam0, p.lam1, FACTOR=p.factor,
                       DENSE_OUT=dense, BLOCK_K=PACK_WORDS, num_warps=4)
    return bits, area, dense_t


def suppression(bits, area, iou_threshold: float, coverage_threshold: float, combine: str, dense=None):
    """The bit-packed suppression matrix int32 [N, ceil(N/32)] (popcount of ``bits``, or the matmul of ``dense``
    when given)."""
    n = bits.shape[0]
    n_sup_words = reference.words_per_row(n)
    sup = torch.zeros((n, n_sup_words), dtype=torch.int32, device=bits.device)
    dot = dense is not None
    ops = dense if dot else bits
    bm, bn, bk = DOT_TILE if dot else POPC_TILE
    grid = (triton.cdiv(n, bm), triton.cdiv(n, bn))
    _pairs_kernel[grid](ops, area, sup, n, ops.shape[1], n_sup_words, float(iou_threshold),
                        float(coverage_threshold), reference.EPS, AND=combine == "and", DOT=dot,
                        INTERPRET=_interpret(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                        num_stages=3 if dot else 2)
    return sup


def scan(sup) -> torch.Tensor:
    """Keep flags int8 [N] (visiting order) of the greedy walk over the suppression matrix."""
    n, n_sup_words = sup.shape
    keep = torch.empty(n, dtype=torch.int8, device=sup.device)
    wp = max(32, triton.next_power_of_2(n_sup_words))
    _scan_kernel[(1,)](sup, keep, n, n_sup_words, WP=wp, num_warps=4 if wp <= 256 else 8)
    return keep


def fuse(masks: torch.Tensor) -> bool:
    return FUSE_DOWNSAMPLE and masks.is_cuda and masks.is_contiguous()


def mask_nms(masks, scores, iou_threshold, coverage_threshold, combine, downsample) -> torch.Tensor:
    p = reference.plan(masks, scores, downsample, fuse(masks))
    use_dot = _intersect() == "dot"
    bits, area, dense = pack(p, dense=use_dot)
    sup = suppression(bits, area, iou_threshold, coverage_threshold, combine, dense=dense)
    return p.order[scan(sup).bool()]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/ops/triton_aot.py).


def aot_cases(arch: int, dt: str):
    """(name, kernel, arch, types, constexprs) of every kernel variant the launchers pick: pack with and without
    the fused downsampling (even and odd factors share one variant each) and the dense output; both pair kernels
    with both combines; the scan at the 1200-mask benchmark and at the mask limit."""
    types = {"X": f"*{dt}", "ORDER": "*i64", "BITS": "*i32", "AREA": "*i32", "DENSE": "*fp16", "SUP": "*i32",
             "KEEP": "*i8", "sxn": "i64", "sxh": "i64", "sxw": "i64", "threshold": "fp32", "lam0": "fp32",
             "lam1": "fp32", "iou_t": "fp32", "cov_t": "fp32", "eps": "fp32"}
    tag = f"sm{arch}-{dt}"
    for factor in (1, 2, 3):
        for dense in (False, True):
            yield (f"mask_nms_pack-{tag}-f{factor}-dense{int(dense)}", _pack_kernel, arch, types,
                   dict(FACTOR=factor, DENSE_OUT=dense, BLOCK_K=PACK_WORDS, num_warps=4))
    if dt != "fp32":  # the pair and scan kernels do not depend on the masks' dtype
        return
    for combine_and in (False, True):
        for dot, (bm, bn, bk) in ((False, POPC_TILE), (True, DOT_TILE)):
            yield (f"mask_nms_{'dot' if dot else 'popcount'}-{tag}-and{int(combine_and)}", _pairs_kernel, arch,
                   dict(types, OPS="*fp16" if dot else "*i32"),
                   dict(AND=combine_and, DOT=dot, INTERPRET=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=4, num_stages=3 if dot else 2))
    for wp in (64, 1024):
        yield (f"mask_nms_scan-{tag}-wp{wp}", _scan_kernel, arch, types,
               dict(WP=wp, num_warps=4 if wp <= 256 else 8))
