"""mmkernels.mask_nms: every backend returns exactly the kept indices of the literal official loop
(reference.mask_nms_official) on random blob proposals (both criteria fire), odd sizes, downsample 1-4, ties,
empty masks, N = 0 / 1 / not a multiple of 32, the binarization boundary; each kernel stage against the reference
stage; the fused downsampling against PyTorch's CUDA formula; opcheck; torch.compile; bad input."""

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from bench.ops.mask_nms import blob_masks
from mmkernels import BackendError, use_backend
from mmkernels.ops.mask_nms import reference
from tests.ops.common import backend_dtype_params, backend_params

BACKEND_DTYPES = backend_dtype_params()
BACKENDS = backend_params()


def _blobs(n, h, w, dtype, device, seed=0, group=4):
    return blob_masks(n, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype, device=device,
                      group=group)


def _official(masks, scores, iou=0.5, cov=0.7, combine="or", downsample=2):
    return reference.mask_nms_official(masks, scores, iou_threshold=iou, coverage_threshold=cov, combine=combine,
                                       downsample=downsample)


def _ours(backend, masks, scores, iou=0.5, cov=0.7, combine="or", downsample=2):
    with use_backend(backend):
        return mmkernels.mask_nms(masks, scores, iou_threshold=iou, coverage_threshold=cov, combine=combine,
                                  downsample=downsample)


def _assert_same(got, want, masks):
    assert got.dtype == torch.int64 and got.device == masks.device
    assert torch.equal(got.cpu(), want.cpu()), f"kept {got.tolist()} != official {want.tolist()}"


def _stage_modules(backend):
    if backend == "triton":
        from mmkernels.ops.mask_nms import triton as mod
    elif backend == "cuda":
        from mmkernels.ops.mask_nms import cuda as mod
    else:
        return None
    return mod


# ----------------------------------------------------------------------------------------------------------------
# Every backend against the official loop.

# (id, N, H, W, downsample, combine, iou, coverage): odd sizes, N not a multiple of 32, every downsample parity.
CASES = [
    ("n37-odd-d2-or", 37, 21, 27, 2, "or", 0.5, 0.7),
    ("n70-d1-and", 70, 12, 14, 1, "and", 0.3, 0.5),
    ("n33-d3-or", 33, 25, 19, 3, "or", 0.4, 0.6),
    ("n64-d4-or-strict", 64, 18, 22, 4, "or", 0.8, 0.95),
]


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_official(backend, device, dtype, case):
    _, n, h, w, d, combine, iou, cov = case
    masks, scores = _blobs(n, h, w, dtype, device, seed=n)
    want = _official(masks, scores, iou, cov, combine, d)
    assert 1 < want.numel() < n  # something is kept and something removed
    _assert_same(_ours(backend, masks, scores, iou, cov, combine, d), want, masks)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_triton_popcount_variant(backend, device, monkeypatch):
    """The popcount intersection variant (the default is the matmul) gives the same indices."""
    from mmkernels.ops.mask_nms import triton as nms_triton

    monkeypatch.setattr(nms_triton, "INTERSECT", "popcount")
    for n, h, w, d, combine in ((45, 20, 17, 2, "or"), (40, 9, 11, 1, "and")):
        masks, scores = _blobs(n, h, w, torch.float32, device, seed=3)
        _assert_same(_ours(backend, masks, scores, combine=combine, downsample=d),
                     _official(masks, scores, combine=combine, downsample=d), masks)


def test_blobs_exercise_both_criteria():
    """On the test proposals, the official greedy removes candidates by IoU alone and by coverage alone (so the
    backend tests above check both criteria), and "and" keeps more than "or"."""
    masks, scores = _blobs(70, 24, 24, torch.float32, "cpu", seed=70)
    order = reference.sort_order(scores)
    bits = reference.binarize(masks, 2)[order].float()
    inter = bits @ bits.T
    area = bits.sum(1)
    iou = (inter + reference.EPS) / (area[:, None] + area[None, :] - inter + reference.EPS)
    cov = (inter + reference.EPS) / (area[None, :] + reference.EPS)
    keep = reference.greedy_scan(reference.suppression_matrix(bits.bool(), 0.5, 0.7, "or"))
    by_iou_only = by_cov_only = 0
    kept_rows = keep.nonzero().squeeze(1)
    for j in (~keep).nonzero().squeeze(1).tolist():
        i = next(i for i in kept_rows.tolist() if i < j and (iou[i, j] >= 0.5 or cov[i, j] >= 0.7))
        by_iou_only += bool(iou[i, j] >= 0.5 and cov[i, j] < 0.7)
        by_cov_only += bool(cov[i, j] >= 0.7 and iou[i, j] < 0.5)
    assert by_iou_only > 0 and by_cov_only > 0, (by_iou_only, by_cov_only)
    assert _official(masks, scores, combine="and").numel() > _official(masks, scores).numel()


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_ties_duplicates_and_empty_masks(backend, device, dtype):
    """Tied scores are visited lowest index first; exact duplicates (IoU 1) and empty masks (IoU 1 with each
    other, coverage 1 under anything) are removed as the formulas say; an empty mask that comes first is kept."""
    masks, _ = _blobs(40, 10, 12, torch.float32, "cpu", seed=5)
    masks[7] = masks[3]  # duplicate, tied score: 3 goes first
    masks[[11, 12, 30]] = -5.0  # empty masks
    scores = (torch.rand(40, generator=torch.Generator().manual_seed(1)) * 4).round() / 4  # 5 distinct values
    scores[3] = scores[7] = 1.5  # the tie right after the first
    scores[30] = 2.0  # an empty mask ranked first: it removes only the other empty masks
    masks, scores = masks.to(device, dtype), scores.to(device)
    want = _official(masks, scores)
    assert want[:2].tolist() == [30, 3] and 7 not in want.tolist()
    assert 11 not in want.tolist() and 12 not in want.tolist()
    _assert_same(_ours(backend, masks, scores), want, masks)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_and_one_mask(backend, device):
    empty = torch.randn(0, 8, 8, device=device)
    got = _ours(backend, empty, torch.randn(0, device=device))
    assert got.shape == (0,) and got.dtype == torch.int64 and got.device == empty.device
    for fill in (1.0, -1.0):  # one mask, non-empty or empty: always kept
        one = torch.full((1, 5, 7), fill, device=device)
        _assert_same(_ours(backend, one, torch.rand(1, device=device)), torch.tensor([0]), one)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_thresholds_compare_with_ge_in_fp32(backend, device):
    """Thresholds 1.0 still remove exact duplicates (IoU 1) and fully covered candidates (coverage 1): the test
    is >=. A threshold just above an IoU value in double but equal to it in fp32 removes (fp32 comparison)."""
    base = torch.full((3, 8, 8), -4.0)
    base[0, 1:6, 1:6] = 4.0
    base[1] = base[0]  # duplicate of 0
    base[2, 2:4, 2:4] = 4.0  # inside 0
    masks, scores = base.to(device), torch.tensor([0.9, 0.8, 0.7], device=device)
    _assert_same(_ours(backend, masks, scores, iou=1.0, cov=1.0, downsample=1), torch.tensor([0]), masks)
    # Two masks whose fp32 IoU is x; iou_threshold = x + (less than half an fp32 ulp) rounds to x.
    pair = torch.full((2, 8, 8), -4.0)
    pair[0, 0:4, 0:6] = 4.0
    pair[1, 1:5, 1:6] = 4.0
    b = reference.binarize(pair, 1).float()
    x = float(reference._pairwise_iou(b, b)[0, 1])
    thr = x + 0.25 * (float(torch.tensor(x).nextafter(torch.tensor(2.0))) - x)
    assert thr > x and float(torch.tensor(thr, dtype=torch.float32)) == x
    masks, scores = pair.to(device), torch.tensor([0.9, 0.8], device=device)
    want = _official(masks, scores, iou=thr, cov=1.0, downsample=1)
    assert want.tolist() == [0]
    _assert_same(_ours(backend, masks, scores, iou=thr, cov=1.0, downsample=1), want, masks)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_does_not_round_intersections(backend, device):
    """Two 1501-pixel masks sharing 1001 pixels: IoU 1001 / 2001 = 0.50025 >= 0.5 removes the second. Under bf16
    autocast a bf16 matmul would round the counts (1001 -> 1000: IoU 0.4995) and keep both; every backend counts
    exactly whatever the autocast state."""
    masks = torch.full((2, 40, 80), -4.0)
    flat = masks.view(2, -1)
    flat[0, :1501] = 4.0
    flat[1, 500:2001] = 4.0
    masks, scores = masks.to(device), torch.tensor([0.9, 0.8], device=device)
    assert _official(masks, scores, iou=0.5, cov=1.0, downsample=1).tolist() == [0]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = _ours(backend, masks, scores, iou=0.5, cov=1.0, downsample=1)
    _assert_same(got, torch.tensor([0]), masks)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs(backend, device):
    """Masks as a transposed view and as a strided slice (d = 1 reads them by strides, d = 2 through
    interpolate), scores as a strided slice."""
    masks, scores = _blobs(36, 14, 14, torch.float32, device, seed=9)
    views = [masks.transpose(1, 2), masks[:, 1::2, ::2], masks.transpose(1, 2)[:, 1:, 2:]]
    big_scores = torch.stack([scores, -scores], 1).reshape(-1)[::2]
    for m in views:
        for d in (1, 2):
            _assert_same(_ours(backend, m, big_scores, downsample=d), _official(m, big_scores, downsample=d), m)


# ----------------------------------------------------------------------------------------------------------------
# Binarization: the exact sigmoid boundary.


def test_binarize_threshold_values():
    """The boundary of sigmoid(v) >= 0.5 (PyTorch's CPU sigmoid), and the threshold's equivalence on every
    fp16/bf16 value and on the fp32 values around the boundary."""
    assert reference.binarize_threshold("cpu", torch.float32) == -float.fromhex("0x1.7ffffcp-23")
    assert reference.binarize_threshold("cpu", torch.float16) == -2.0 ** -11
    assert reference.binarize_threshold("cpu", torch.bfloat16) == -2.0 ** -8
    for dtype in (torch.float16, torch.bfloat16):
        v = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
        t = reference.binarize_threshold("cpu", dtype)
        assert torch.equal(v.sigmoid().ge(0.5), v.float() >= t)
    t32 = torch.tensor(reference.binarize_threshold("cpu", torch.float32))
    around = [t32]
    for _ in range(64):
        around = [around[0].nextafter(torch.tensor(-1.0))] + around + [around[-1].nextafter(torch.tensor(1.0))]
    v = torch.stack(around)
    assert torch.equal(v.sigmoid().ge(0.5), v >= t32)
    assert not bool((v.sigmoid() >= 0.5).all()) and bool((v.sigmoid() >= 0.5).any())


def _boundary_masks(dtype, device):
    """Masks whose values sit on the binarization boundary: t, the next value below, 0, -0, and for d = 2 blocks
    whose exact 2x2 mean is t or just below it."""
    t = reference.binarize_threshold(device, dtype)
    tt = torch.tensor(t, dtype=dtype)
    below = float(tt.float().nextafter(torch.tensor(-1.0)).to(dtype)) if dtype == torch.float32 else \
        float((tt.view(torch.int16) + 1).view(dtype))  # negative: +1 on the bit pattern is one step down
    assert below < t
    vals = torch.tensor([t, below, 0.0, -0.0, 2 * t, t / 2, 1.0, -1.0])
    g = torch.Generator().manual_seed(2)
    masks = vals[torch.randint(0, len(vals), (40, 8, 10), generator=g)]
    # Blocks of four equal values: the 2x2 mean is the value itself.
    masks[20:] = masks[20:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2)
    return masks.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_binarization_boundary(backend, device, dtype):
    masks = _boundary_masks(dtype, device)
    scores = torch.rand(40, generator=torch.Generator().manual_seed(4)).to(device)
    mod = _stage_modules(backend)
    for d in (1, 2):
        ref_bits = reference.binarize(masks, d)
        assert ref_bits.any() and not ref_bits.all()
        if mod is not None:
            p = reference.plan(masks, scores, d, mod.fuse(masks))
            bits, area, _ = mod.pack(p)
            assert torch.equal(bits.cpu(), reference.pack_bits(ref_bits[p.order]).cpu())
        for iou, cov in ((0.5, 0.7), (0.3, 0.4)):
            _assert_same(_ours(backend, masks, scores, iou, cov, downsample=d),
                         _official(masks, scores, iou, cov, downsample=d), masks)


# ----------------------------------------------------------------------------------------------------------------
# Kernel stages against the reference stages (tiny tiles: several tiles, word blocks and scan steps).


def _small_tiles(backend, monkeypatch):
    if backend == "triton":
        from mmkernels.ops.mask_nms import triton as nms_triton

        monkeypatch.setattr(nms_triton, "PACK_WORDS", 2)
        monkeypatch.setattr(nms_triton, "POPC_TILE", (16, 32, 2))
        monkeypatch.setattr(nms_triton, "DOT_TILE", (16, 32, 16))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_stages_match_reference(backend, device, monkeypatch):
    _small_tiles(backend, monkeypatch)
    mod = _stage_modules(backend)
    n = 70 if device == "cpu" else 333  # several 64-tiles for the cuda kernels
    masks, scores = _blobs(n, 17, 23, torch.float16, device, seed=11)
    for d, combine in ((2, "or"), (1, "and")):
        p = reference.plan(masks, scores, d, mod.fuse(masks))
        ref_bits = reference.binarize(masks, d)[p.order]
        bits, area, _ = mod.pack(p)
        assert torch.equal(bits.cpu(), reference.pack_bits(ref_bits).cpu())
        assert torch.equal(area.cpu(), ref_bits.sum(1).int().cpu())
        ref_sup = reference.suppression_matrix(ref_bits, 0.5, 0.7, combine)
        variants = [None]
        if backend == "triton":
            variants.append(mod.pack(p, dense=True)[2])
            assert torch.equal(variants[1][:, :ref_bits.shape[1]].cpu(), ref_bits.half().cpu())
            assert not variants[1][:, ref_bits.shape[1]:].any()
        for dense in variants:
            sup = mod.suppression(bits, area, 0.5, 0.7, combine, dense=dense)
            assert torch.equal(sup.cpu(), reference.pack_bits(ref_sup).cpu()), "dense" if dense is not None else ""
        keep = mod.scan(sup)
        assert torch.equal(keep.bool().cpu(), reference.greedy_scan(ref_sup))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_scan_dense_random_matrix(backend, device):
    """The scan on a random strictly-upper-triangular matrix (dense suppression, many kept rows per block and
    long chains), N not a multiple of 32."""
    mod = _stage_modules(backend)
    for n, density in ((97, 0.05), (64, 0.3), (1, 0.0), (33, 0.5)):
        g = torch.Generator().manual_seed(n)
        sup = (torch.rand(n, n, generator=g) < density).triu(1)
        keep = mod.scan(reference.pack_bits(sup).to(device))
        assert torch.equal(keep.bool().cpu(), reference.greedy_scan(sup))


def _cuda_formula(masks, d):
    """PyTorch's CUDA bilinear downsampling (upsample_bilinear2d_out_frame at scale 1/d), written in torch ops:
    fp32, the width pair inside, one rounding to the dtype."""
    h, w = masks.shape[1:]
    ho, wo = reference.output_size(h, w, d)
    off = (d - 1) // 2
    l1 = 0.5 if d % 2 == 0 else 0.0
    l0 = 1.0 - l1
    x = masks.float()
    r = (torch.arange(ho, device=x.device) * d + off)[:, None]
    c = (torch.arange(wo, device=x.device) * d + off)[None, :]
    v = l0 * (l0 * x[:, r, c] + l1 * x[:, r, c + 1]) + l1 * (l0 * x[:, r + 1, c] + l1 * x[:, r + 1, c + 1])
    return v.to(masks.dtype)


def _rounding_masks(n, h, w):
    """fp32 logits whose 2x2 means are tiny sums of large cancelling values: the sign of the downsampled value, and
    so the pixel, depends on the order of the additions."""
    g = torch.Generator().manual_seed(6)
    big = 16.0 * torch.sign(torch.rand(n, h // 2, w // 2, generator=g) - 0.5)
    small = (torch.rand(n, h, w, generator=g) - 0.5) * 1e-6
    m = small.clone()
    m[:, 0::2, 0::2] += big
    m[:, 1::2, 0::2] -= big
    return m


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_fused_downsampling_is_cuda_formula(backend, device):
    """The pack kernels' fused downsampling (forced on, also for the CPU interpreter) equals PyTorch's CUDA formula bit
    for bit, d = 2..5, fp32 and fp16, on inputs where the order of additions decides pixels (the inputs tell the
    CUDA order from the CPU kernel's, so the check is not vacuous)."""
    mod = _stage_modules(backend)
    m32 = _rounding_masks(12, 20, 30)
    assert not torch.equal(reference.binarize(m32, 2), _cuda_formula(m32, 2).reshape(12, -1).sigmoid() >= 0.5)
    for dtype in (torch.float32, torch.float16):
        masks = (m32 if dtype == torch.float32 else _blobs(12, 20, 30, torch.float32, "cpu")[0]).to(device, dtype)
        scores = torch.rand(12, generator=torch.Generator().manual_seed(0)).to(device)
        for d in (2, 3, 4, 5):
            p = reference.plan(masks, scores, d, fuse=True)
            assert p.factor == d
            want = (_cuda_formula(masks, d).reshape(12, -1).sigmoid() >= 0.5)[p.order]
            bits, area, _ = mod.pack(p)
            assert torch.equal(bits.cpu(), reference.pack_bits(want).cpu()), (dtype, d)
            if device == "cuda":  # there the official interpolate is that formula
                assert torch.equal(want, reference.binarize(masks, d)[p.order])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_benchmark_shape(backend):
    """The benchmark's 1200 masks of 256^2 (bf16, fused downsampling): identical to the official loop."""
    masks, scores = _blobs(1200, 256, 256, torch.bfloat16, "cuda", seed=0)
    _assert_same(_ours(backend, masks, scores), _official(masks, scores), masks)


# ----------------------------------------------------------------------------------------------------------------
# Backend selection and limits.


def test_kernel_limits():
    from mmkernels.ops.mask_nms import triton as nms_triton

    many = torch.zeros(1, 1, 1).expand(40000, 2, 2)
    assert "40000 masks" in reference.kernel_limits(many, 1, nms_triton.MAX_MASKS)
    huge = torch.zeros(1, 1, 1).expand(2, 4100, 4100)
    assert "2^23" in reference.kernel_limits(huge, 1, 10)
    assert reference.kernel_limits(huge, 2, 10) is None
    with pytest.raises(BackendError, match="float64"):
        _ours("triton", torch.randn(3, 4, 4, dtype=torch.float64), torch.rand(3))


@pytest.mark.parametrize("value", ["matmul", ""])
def test_bad_intersect_variant(value, monkeypatch):
    from mmkernels.ops.mask_nms import triton as nms_triton

    monkeypatch.setattr(nms_triton, "INTERSECT", value)
    with pytest.raises(ValueError, match="MMKERNELS_MASK_NMS_INTERSECT"):
        nms_triton._intersect()


# ----------------------------------------------------------------------------------------------------------------
# torch.library.


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    masks, scores = _blobs(20, 9, 11, torch.float32, device, seed=1)
    op = torch.ops.mmkernels.mask_nms.default
    torch.library.opcheck(op, (masks, scores, 0.5, 0.7, "or", 2, backend))
    torch.library.opcheck(op, (masks[:, :, :8], scores, 0.3, 0.6, "and", 1, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device, compiler):
    def fn(logits, scores):
        keep = mmkernels.mask_nms(logits * 2.0, scores + 1.0, iou_threshold=0.5, coverage_threshold=0.7)
        return keep, logits[keep].sum()

    masks, scores = _blobs(24, 10, 12, torch.float32, device, seed=2)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    with use_backend(backend):
        keep, total = compiled(masks, scores)
        want = _official(masks * 2.0, scores + 1.0)
    _assert_same(keep, want, masks)
    torch.testing.assert_close(total, masks[want].sum())


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


class TestBadInput:
    def _call(self, masks=None, scores=None, **kw):
        masks = torch.randn(4, 6, 6) if masks is None else masks
        scores = torch.rand(masks.shape[0] if masks.dim() else 1) if scores is None else scores
        args = dict(iou_threshold=0.5, coverage_threshold=0.7)
        args.update(kw)
        return mmkernels.mask_nms(masks, scores, **args)

    def test_masks_type_and_shape(self):
        with pytest.raises(TypeError, match="'masks' must be a torch.Tensor"):
            self._call(masks=[[0.0]], scores=torch.rand(1))
        with pytest.raises(TypeError, match="'masks' must be a floating-point"):
            self._call(masks=torch.ones(2, 4, 4, dtype=torch.uint8), scores=torch.rand(2))
        with pytest.raises(ValueError, match="'masks' must have 3 dims"):
            self._call(masks=torch.randn(1, 2, 4, 4), scores=torch.rand(1))

    def test_scores(self):
        with pytest.raises(ValueError, match=r"'scores' must have shape \[4\]"):
            self._call(scores=torch.rand(5))
        with pytest.raises(ValueError, match="'scores' must have 1 dims"):
            self._call(scores=torch.rand(4, 1))
        with pytest.raises(TypeError, match="'scores' must be a floating-point"):
            self._call(scores=torch.arange(4))
        with pytest.raises(ValueError, match="'scores' is on meta but 'masks' is on cpu"):
            self._call(scores=torch.rand(4, device="meta"))

    @pytest.mark.parametrize("name", ["iou_threshold", "coverage_threshold"])
    def test_thresholds(self, name):
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match=f"'{name}' must be in \\[0, 1\\]"):
                self._call(**{name: bad})
        with pytest.raises(ValueError, match=f"'{name}' must be finite"):
            self._call(**{name: float("nan")})
        with pytest.raises(TypeError, match=f"'{name}' must be a float"):
            self._call(**{name: "0.5"})

    def test_combine(self):
        with pytest.raises(ValueError, match="'combine' must be one of or, and"):
            self._call(combine="xor")
        with pytest.raises(TypeError, match="'combine' must be a str"):
            self._call(combine=1)

    def test_downsample(self):
        with pytest.raises(TypeError, match="'downsample' must be an int"):
            self._call(downsample=0.5)
        with pytest.raises(TypeError, match="'downsample' must be an int"):
            self._call(downsample=True)
        with pytest.raises(ValueError, match="'downsample' must be >= 1"):
            self._call(downsample=0)
        with pytest.raises(ValueError, match="'masks' must have H and W >= downsample = 3"):
            self._call(masks=torch.randn(2, 2, 9), downsample=3)
        with pytest.raises(ValueError, match="'masks' must have H and W >= downsample = 1"):
            self._call(masks=torch.randn(2, 0, 9), downsample=1)

    def test_keyword_only(self):
        with pytest.raises(TypeError):
            mmkernels.mask_nms(torch.randn(2, 4, 4), torch.rand(2), 0.5, 0.7)


def test_official_downsample_is_2x2_mean():
    """d = 2 is the exact 2x2 mean (the official scale_factor 0.5), odd sizes drop the last row/column."""
    x = torch.randn(3, 9, 7, dtype=torch.float64)
    want = (x[:, 0:8:2, 0:6:2] + x[:, 0:8:2, 1:7:2] + x[:, 1:9:2, 0:6:2] + x[:, 1:9:2, 1:7:2]) / 4
    torch.testing.assert_close(reference.downsample_masks(x, 2), want, rtol=0, atol=1e-15)
    assert reference.output_size(9, 7, 2) == (4, 3)
    for h in range(1, 120):
        for d in range(1, 8):
            if h >= d:
                got = F.interpolate(torch.zeros(1, 1, h, d), scale_factor=1 / d, mode="bilinear").shape[2] \
                    if d > 1 else h
                assert reference.output_size(h, d, d)[0] == got == h // d
