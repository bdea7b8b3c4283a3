"""mmkernels.mask_pool: the reference against a literal transcription of Unpair-Seg's MaskPooling; every backend
against the reference (forward) and fp64 autograd (forward and every grad: features in every mode, masks in soft
mode) in every mode and dtype, at down-, up-, equal- and non-integer-ratio resizes, channels-last and strided
inputs, mixed dtypes, empty cases; the tap tables and adjoint ranges; split and multi-block kernel paths;
determinism; opcheck; torch.compile; the nn module; bad input; GPU-only peak memory and benchmark-shape checks."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.nn import MaskPooling
from mmkernels.ops.mask_pool import reference
from mmkernels.testing import assert_close, randn, triton_interpreted
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND_DTYPES = backend_dtype_params()
BACKENDS = backend_params()
CL = torch.channels_last


def official_mask_pooling(x, mask, thres=0.5):
    """Unpair-Seg's MaskPooling.forward (use_sigmoid=True), transcribed literally (spec §6)."""
    if not x.shape[-2:] == mask.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        mask = mask.detach()
        mask = mask.sigmoid()
        mask = (mask >= thres).to(mask.dtype)
        denorm = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", x, mask / denorm)


def _official_binary(x, mask, thres=0.5):
    if not x.shape[-2:] == mask.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return mask.sigmoid() >= thres


def _features(shape, dtype, device, layout):
    """features [B, C, H, W]: "nchw" (contiguous), "cl" (channels_last) or "view" (every other W of a wider one)."""
    if layout == "cl":
        return randn(shape, dtype, device).to(memory_format=CL)
    if layout == "view":
        return randn(shape[:3] + (2 * shape[3] + 1,), dtype, device)[..., 1::2]
    return randn(shape, dtype, device)


def _masks(shape, dtype, device, layout):
    """logits [B, Q, h, w] (about half positive): contiguous, or "t" (h and w transposed in memory)."""
    if layout == "t":
        return randn(shape[:2] + (shape[3], shape[2]), dtype, device, scale=2.0, shift=0.3).transpose(2, 3)
    return randn(shape, dtype, device, scale=2.0, shift=0.3)


# (id, features [B, C, Hf, Wf], masks [Q, Hm, Wm], features layout, masks layout)
CASES = [
    ("down4", (2, 24, 8, 8), (5, 32, 32), "nchw", "c"),       # the official 4x downsample (256 -> 64 shape)
    ("nonint-cl", (1, 20, 6, 7), (7, 13, 9), "cl", "c"),     # non-integer ratios, channels_last features
    ("up-view", (2, 17, 9, 10), (3, 4, 3), "view", "t"),     # upsample, strided features, transposed masks
    ("equal", (1, 16, 5, 6), (4, 5, 6), "view", "c"),        # equal sizes: no resize
    ("mixed-axes", (1, 9, 6, 12), (3, 6, 5), "nchw", "t"),   # rows equal, columns upsampled
    ("to1x1", (1, 1, 1, 1), (1, 3, 3), "nchw", "c"),         # C = Q = 1, one feature pixel
    ("from1x1", (1, 5, 4, 3), (2, 1, 1), "cl", "c"),         # a 1x1 mask spread over the grid
]
MODES = [("official", 0.0), ("official", 0.4), ("hard", 0.25), ("soft", -0.3)]


def _inputs(case, dtype, device, mdtype=None):
    _, fshape, (Q, Hm, Wm), fl, ml = case
    x = _features(fshape, dtype, device, fl)
    m = _masks((fshape[0], Q, Hm, Wm), mdtype or dtype, device, ml)
    return x, m


def _tol(*dtypes):
    return max(mmkernels.testing.tolerance(d) for d in dtypes)


def _truth(x, m, mode, thr, eps, dout):
    """out and the grads by autograd in fp64: official/hard weights as the reference defines them (fp32 resize,
    the masks' dtype rounding), then every sum and product in fp64; soft weights differentiable in fp64."""
    xd = x.detach().double().requires_grad_(True)
    size = x.shape[-2:]
    if mode == "soft":
        md = m.detach().double().requires_grad_(True)
        w = reference.weights(md, size, mode, thr, torch.float64)
    else:
        md = None
        w = reference.weights(m, size, mode, thr, torch.float32).double()
    out = torch.einsum("bchw,bqhw->bqc", xd, w) / (w.sum((-1, -2)) + eps)[..., None]
    out.backward(dout.double())
    return out, xd.grad, None if md is None else md.grad


def _run(backend, x, m, mode, thr, eps, dout):
    xi = x.detach().requires_grad_(True)
    mi = m.detach().requires_grad_(True)
    with use_backend(backend):
        out = mmkernels.mask_pool(xi, mi, mode=mode, threshold=thr, eps=eps)
    out.backward(dout)
    return out, xi.grad, mi.grad


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("mode,thr", MODES, ids=[f"{m}{t}" for m, t in MODES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(backend, device, dtype, mode, thr, case):
    x, m = _inputs(case, dtype, device)
    B, C = x.shape[:2]
    dout = randn((B, m.shape[1], C), dtype, device)
    out, dx, dm = _run(backend, x, m, mode, thr, 1e-8, dout)
    assert out.shape == (B, m.shape[1], C) and out.dtype == dtype and out.is_contiguous()
    # The same-dtype reference: same weights, same rounding of the output.
    assert_close(out, reference.mask_pool(x, m, mode, thr), dtype=dtype, what="out vs same-dtype reference")
    want = _truth(x, m, mode, thr, 1e-8, dout)
    assert_close(out, want[0], dtype=dtype, what="out")
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
    assert_close(dx, want[1], dtype=dtype, what="dx")
    if mode == "soft":
        assert dm.dtype == dtype and dm.shape == m.shape
        if case[0] in ("to1x1", "from1x1"):
            # One feature pixel, or one weight for all of them: the output does not depend on the weight (up to
            # eps), so dmasks is ~0 and what remains is cancellation (u is computed from the output rounded to the
            # features' dtype), bounded relative to the natural size of the terms, |dout / denom| |x| sqrt(C).
            denom = reference.weights(m, x.shape[-2:], mode, thr, torch.float64).sum((-1, -2))
            scale = (dout.double().abs().amax(-1) / denom).max() * x.double().abs().max() * C ** 0.5
            assert (dm.double() - want[2]).abs().max() <= mmkernels.testing.tolerance(dtype) * scale
        else:
            assert_close(dm, want[2], dtype=dtype, what="dmasks")
    else:
        assert dm is None  # official and hard: no gradient to the masks, as the official no_grad


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("xdt,mdt", [(torch.float32, torch.float16), (torch.float16, torch.float32)],
                         ids=["x32-m16", "x16-m32"])
@pytest.mark.parametrize("mode", ["official", "soft"])
def test_mixed_dtypes(backend, device, xdt, mdt, mode):
    """Features and masks of different dtypes: the output (and dx) in the features', dmasks in the masks' dtype;
    official mode rounds the resized logits and their sigmoid to the masks' dtype."""
    case = ("", (2, 12, 7, 6), (6, 15, 11), "nchw", "c")
    x, m = _inputs(case, xdt, device, mdtype=mdt)
    dout = randn((2, 6, 12), xdt, device)
    out, dx, dm = _run(backend, x, m, mode, 0.0, 1e-8, dout)
    want = _truth(x, m, mode, 0.0, 1e-8, dout)
    tol = _tol(xdt, mdt)
    assert out.dtype == xdt and dx.dtype == xdt
    assert_close(out, want[0], tol=tol, what="out")
    assert_close(dx, want[1], tol=tol, what="dx")
    if mode == "soft":
        assert dm.dtype == mdt
        assert_close(dm, want[2], tol=tol, what="dmasks")


# ----------------------------------------------------------------------------------------------------------------
# The official semantics.


@pytest.mark.parametrize("shape", [((2, 16, 8, 8), (6, 32, 32)), ((1, 8, 7, 5), (4, 11, 13)),
                                   ((1, 8, 6, 6), (3, 6, 6)), ((1, 4, 9, 9), (2, 3, 4))], ids=str)
def test_reference_equals_official_module_fp32(shape):
    """fp32: the binary masks are identical to the official module's and the pooled output equal up to fp32
    rounding (the official divides the mask first, we divide the sum)."""
    (B, C, H, W), (Q, h, w) = shape
    x = randn((B, C, H, W))
    m = randn((B, Q, h, w), scale=2.0, shift=0.3)
    assert torch.equal(reference.weights(m, (H, W), "official", 0.0, torch.float32) == 1, _official_binary(x, m))
    official = official_mask_pooling(x, m)
    for backend in ("torch", "triton") if triton_interpreted() else ("torch",):
        with use_backend(backend):
            ours = mmkernels.mask_pool(x, m)
        assert_close(ours, official, tol=1e-6, what=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_rounds_like_official_module(dtype):
    """fp16/bf16 masks: the official module interpolates and takes the sigmoid in the masks' dtype; the reference's
    fp32-resize-then-round gives the same binary masks (PyTorch's CPU half resize may differ in the last bit of a
    rare value) and outputs within the dtype's tolerance."""
    x = randn((2, 32, 16, 16), dtype)
    m = randn((2, 40, 64, 64), dtype, scale=2.0, shift=0.3)
    ours = reference.weights(m, (16, 16), "official", 0.0, torch.float32) == 1
    assert (ours == _official_binary(x, m)).float().mean().item() >= 0.9999
    m_eq = randn((2, 40, 16, 16), dtype, scale=2.0)
    assert torch.equal(reference.weights(m_eq, (16, 16), "official", 0.0, torch.float32) == 1,
                       _official_binary(x, m_eq))
    assert_close(reference.mask_pool(x, m), official_mask_pooling(x, m), dtype=dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_official_rounding_of_small_negative_logits(backend, device):
    """Logits just below 0 whose sigmoid rounds to 0.5 in fp16 (-1e-4) count as inside the mask in official mode
    (as in the official module) but not in hard mode or in fp32; -1e-3 stays outside."""
    x = randn((1, 8, 4, 4), torch.float16, device)
    m = torch.full((1, 3, 4, 4), -1e-4, dtype=torch.float16, device=device)
    m[0, 1] = -1e-3
    m[0, 2, :2] = 1.0
    m[0, 2, 2:] = -1e-4
    with use_backend(backend):
        off = mmkernels.mask_pool(x, m)
        hard = mmkernels.mask_pool(x, m, mode="hard")
        off32 = mmkernels.mask_pool(x.float(), m.float())
    mean = x.float().mean((-1, -2))[0]
    assert_close(off[0, 0].float(), mean, dtype=torch.float16)  # all 16 pixels in
    assert torch.equal(off[0, 1], torch.zeros_like(off[0, 1]))  # empty mask -> zeros
    assert_close(off[0, 2].float(), mean, dtype=torch.float16)
    assert torch.equal(off32[0, 0], torch.zeros_like(off32[0, 0]))
    assert_close(hard[0, 2].float(), x.float()[0, :, :2].mean((-1, -2)), dtype=torch.float16)
    # The official module in fp16 itself: its +1e-8 underflows in fp16, so its empty mask (1) gives 0/0 = NaN.
    official = official_mask_pooling(x.cpu(), m.cpu())
    assert torch.isnan(official[0, 1]).all()
    assert_close(off.cpu()[0, ::2], official[0, ::2], dtype=torch.float16, what="vs official fp16")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_threshold_as_logit(backend, device):
    """official with threshold t keeps sigmoid(r) >= sigmoid(t), i.e. the official module with thres sigmoid(t)."""
    x, m = randn((1, 6, 8, 8), device=device), randn((1, 5, 16, 16), device=device, scale=2.0)
    with use_backend(backend):
        ours = mmkernels.mask_pool(x, m, threshold=0.7)
    assert_close(ours, official_mask_pooling(x, m, thres=float(torch.tensor(0.7).sigmoid())), tol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_masks_give_zeros(backend, device):
    x = randn((2, 8, 5, 5), device=device)
    m = torch.full((2, 3, 10, 10), -5.0, device=device)
    m[1, 2, 3:7, 2:9] = 4.0
    for mode in ("official", "hard"):
        with use_backend(backend):
            out = mmkernels.mask_pool(x, m, mode=mode)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
        assert out[1, 2].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Tap tables and adjoint ranges (what every kernel reads).


@pytest.mark.parametrize("n_in,n_out", [(256, 64), (13, 6), (3, 10), (7, 7), (1, 5), (5, 1), (64, 256), (9, 4)])
def test_taps_reproduce_interpolate(n_in, n_out):
    """The tap formula (the kernels' arithmetic) reproduces F.interpolate in fp32 (up to its summation order)."""
    m = torch.randn(2, 3, n_in, n_in + 2)
    h0, h1, lh = reference.taps(n_in, n_out)
    w0, w1, lw = reference.taps(n_in + 2, n_out + 1)
    a = m[:, :, h0.long()]
    b = m[:, :, h1.long()]
    row = lambda t: (1 - lw) * t[..., w0.long()] + lw * t[..., w1.long()]
    v = (1 - lh)[:, None] * row(a) + lh[:, None] * row(b)
    ref = F.interpolate(m, size=(n_out, n_out + 1), mode="bilinear", align_corners=False)
    assert (v - ref).abs().max().item() <= 4e-6 * max(1.0, ref.abs().max().item())
    assert h0.dtype == torch.int32 and int(h1.max()) < n_in and int(h0.min()) >= 0


@pytest.mark.parametrize("n_src,n_out,block", [(256, 64, 8), (13, 6, 4), (3, 10, 2), (7, 7, 4), (1, 5, 8),
                                               (64, 256, 8), (20, 3, 8), (9, 4, 1)])
def test_adjoint_ranges_are_exact(n_src, n_out, block):
    """touching() gives exactly the output positions whose taps fall in each source block."""
    i0, i1, _ = reference.taps(n_src, n_out)
    lo, hi = reference.touching(i0, i1, n_src, block)
    for k in range(len(lo)):
        s0, s1 = k * block, (k + 1) * block
        want = [h for h in range(n_out) if s0 <= int(i0[h]) < s1 or s0 <= int(i1[h]) < s1]
        got = list(range(int(lo[k]), int(hi[k])))
        assert got == want, (k, got, want)


def test_reference_soft_backward_is_the_adjoint():
    """The torch backend's closed-form soft backward equals autograd through F.interpolate and the sigmoid."""
    x = randn((2, 6, 7, 5)).double()
    m = randn((2, 4, 12, 9), scale=2.0).double().requires_grad_(True)
    dout = randn((2, 4, 6)).double()
    out, denom = reference.forward(x, m.detach(), "soft", 0.2, 1e-8)
    _, dm = reference.backward(dout, x, m.detach(), denom, out, "soft", 0.2, False, True)
    reference.mask_pool(x, m, "soft", 0.2).backward(dout)
    assert_close(dm, m.grad, tol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Kernel paths: many blocks, the split pixel loop, 64-bit offsets, expanded grads, determinism, empty inputs.


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_blocks_and_split(backend, device, monkeypatch):
    """Several q, c and p blocks with masked tails; the Triton forward's split pixel loop (partials summed by the
    finalize kernel) and 64-bit in-batch offsets; source tiles of the mask backward of another shape."""
    if backend == "triton":
        from mmkernels.ops.mask_pool import triton as mp_triton

        monkeypatch.setattr(mp_triton, "_target_programs", lambda device: 1000)
        monkeypatch.setattr(mp_triton, "_off64", lambda t: True)
        monkeypatch.setattr(mp_triton, "INTERP_TILE", (2, 16))
    x = randn((1, 40, 12, 13), device=device).to(memory_format=CL)
    m = randn((1, 20, 29, 23), device=device, scale=2.0)
    dout = randn((1, 20, 40), device=device)
    for mode in ("official", "soft"):
        got = _run(backend, x, m, mode, 0.0, 1e-8, dout)
        want = _truth(x, m, mode, 0.0, 1e-8, dout)
        for name, g, r in zip(("out", "dx", "dm"), got, want):
            if r is not None:
                assert_close(g, r, dtype=torch.float32, what=f"{mode} {name}")


def test_triton_splits_the_pixel_loop(monkeypatch):
    """The split path really runs (its launch grid has several splits) and the finalize kernel is launched."""
    if not triton_interpreted():
        pytest.skip("checked here under the interpreter")
    from mmkernels.ops.mask_pool import triton as mp_triton

    monkeypatch.setattr(mp_triton, "_target_programs", lambda device: 1000)
    launched = []
    original = mp_triton._finalize_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return original[grid]

    monkeypatch.setattr(mp_triton, "_finalize_kernel", Spy())
    x, m = randn((1, 16, 12, 12)), randn((1, 3, 24, 24))
    out, _ = mp_triton.forward(x, m, "official", 0.0, 1e-8)
    assert launched
    assert_close(out, reference.mask_pool(x, m), dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_upstream_grad(backend, device):
    """out.sum().backward() hands the backward a stride-0 dout."""
    x, m = randn((2, 6, 5, 4), device=device), randn((2, 3, 9, 7), device=device, scale=2.0)
    xi, mi = x.clone().requires_grad_(True), m.clone().requires_grad_(True)
    with use_backend(backend):
        mmkernels.mask_pool(xi, mi, mode="soft").sum().backward()
    want = _truth(x, m, "soft", 0.0, 1e-8, torch.ones((2, 3, 6), device=device))
    assert_close(xi.grad, want[1], dtype=torch.float32, what="dx")
    assert_close(mi.grad, want[2], dtype=torch.float32, what="dm")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_is_deterministic(backend, device):
    x, m = randn((1, 20, 9, 9), device=device), randn((1, 18, 20, 20), device=device, scale=2.0)
    dout = randn((1, 18, 20), device=device)
    first = _run(backend, x, m, "soft", 0.1, 1e-8, dout)
    second = _run(backend, x, m, "soft", 0.1, 1e-8, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fshape,mshape", [((2, 4, 5, 5), (2, 0, 7, 7)), ((0, 4, 5, 5), (0, 3, 7, 7)),
                                           ((2, 0, 5, 5), (2, 3, 7, 7)), ((1, 4, 0, 5), (1, 3, 7, 7)),
                                           ((1, 4, 0, 0), (1, 2, 0, 0))], ids=str)
def test_empty(backend, device, fshape, mshape):
    x = torch.randn(fshape, device=device, requires_grad=True)
    m = torch.randn(mshape, device=device, requires_grad=True)
    with use_backend(backend):
        out = mmkernels.mask_pool(x, m, mode="soft")
    assert out.shape == (fshape[0], mshape[1], fshape[1])
    assert torch.equal(out, torch.zeros_like(out))  # no feature pixels: a zero sum over eps
    out.sum().backward()
    assert x.grad.shape == x.shape and m.grad.shape == m.shape
    assert torch.equal(m.grad, torch.zeros_like(m))


# ----------------------------------------------------------------------------------------------------------------
# torch.library and torch.compile.


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x = randn((2, 6, 5, 7), device=device).to(memory_format=CL)
    m = randn((2, 4, 9, 11), device=device, scale=2.0)
    fwd, bwd = torch.ops.mmkernels.mask_pool_fwd.default, torch.ops.mmkernels.mask_pool_bwd.default
    for mode in ("official", "hard", "soft"):
        torch.library.opcheck(fwd, (x, m, mode, 0.1, 1e-8, backend))
    torch.library.opcheck(fwd, (x.contiguous(), m[:, :, :5, :7].contiguous(), "official", 0.0, 1e-8, backend))
    out, denom = reference.forward(x, m, "soft", 0.1, 1e-8)
    dout = randn(out.shape, device=device)
    torch.library.opcheck(bwd, (dout, x, m, denom, out, "soft", 0.1, True, True, backend))
    torch.library.opcheck(bwd, (dout, x, m, denom, out, "official", 0.0, True, False, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, m):
        a = mmkernels.mask_pool(x * 2.0, m, mode="official")
        b = mmkernels.mask_pool(x, m + 0.5, mode="soft", threshold=0.2)
        return (a + b).square().mean()

    check_compiled(block, (randn((2, 4, 6, 5), device=device), randn((2, 3, 11, 9), device=device, scale=2.0)),
                   backend, compiler)


# ----------------------------------------------------------------------------------------------------------------
# The nn module.


def test_module_matches_official_module():
    pool = MaskPooling()
    assert not list(pool.parameters()) and not pool.state_dict()
    x = randn((2, 16, 8, 8)).requires_grad_(True)
    m = randn((2, 5, 32, 32), scale=2.0).requires_grad_(True)
    ours = pool(x, m)
    xo = x.detach().requires_grad_(True)
    official = official_mask_pooling(xo, m)
    assert_close(ours, official, tol=1e-6)
    dout = randn(ours.shape)
    ours.backward(dout)
    official.backward(dout)
    assert_close(x.grad, xo.grad, tol=1e-6)
    assert m.grad is None
    assert "official" in repr(pool)


def test_module_under_autocast():
    """Under bf16 autocast the output has the autocast dtype and matches the official module under autocast."""
    pool = MaskPooling()
    x, m = randn((1, 16, 8, 8)), randn((1, 6, 32, 32), scale=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pool(x, m)
        official = official_mask_pooling(x, m)
    assert ours.dtype == torch.bfloat16
    assert_close(ours, official, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


class TestBadInput:
    def _call(self, x=None, m=None, **kw):
        x = torch.randn(1, 4, 5, 5) if x is None else x
        m = torch.randn(1, 3, 9, 9) if m is None else m
        return mmkernels.mask_pool(x, m, **kw)

    def test_not_tensors(self):
        with pytest.raises(TypeError, match="'features' must be a torch.Tensor"):
            mmkernels.mask_pool([1.0], torch.randn(1, 1, 2, 2))
        with pytest.raises(TypeError, match="'masks' must be a torch.Tensor"):
            mmkernels.mask_pool(torch.randn(1, 1, 2, 2), None)

    def test_integer_inputs(self):
        with pytest.raises(TypeError, match="'features' must be a floating-point"):
            self._call(x=torch.ones(1, 4, 5, 5, dtype=torch.int32))
        with pytest.raises(TypeError, match="'masks' must be a floating-point"):
            self._call(m=torch.ones(1, 3, 9, 9, dtype=torch.bool))

    def test_wrong_dims(self):
        with pytest.raises(ValueError, match="'features' must have 4 dims"):
            self._call(x=torch.randn(4, 5, 5))
        with pytest.raises(ValueError, match="'masks' must have 4 dims"):
            self._call(m=torch.randn(1, 3, 9, 9, 1))

    def test_batch_mismatch(self):
        with pytest.raises(ValueError, match="'masks' must have features' batch size 1"):
            self._call(m=torch.randn(2, 3, 9, 9))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="'masks' is on meta but 'features' is on cpu"):
            self._call(m=torch.randn(1, 3, 9, 9, device="meta"))

    def test_empty_mask_grid(self):
        with pytest.raises(ValueError, match="'masks' has an empty grid"):
            self._call(m=torch.randn(1, 3, 0, 9))

    def test_mode(self):
        with pytest.raises(ValueError, match="'mode' must be one of official, hard, soft, got 'sigmoid'"):
            self._call(mode="sigmoid")
        with pytest.raises(TypeError, match="'mode' must be a str"):
            self._call(mode=1)

    @pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-8, "1e-8", None])
    def test_eps(self, eps):
        with pytest.raises((ValueError, TypeError), match="'eps'"):
            self._call(eps=eps)

    @pytest.mark.parametrize("thr", [float("nan"), float("-inf"), "0.5", True])
    def test_threshold(self, thr):
        with pytest.raises((ValueError, TypeError), match="'threshold'"):
            self._call(threshold=thr)

    def test_module_bad_input(self):
        with pytest.raises(ValueError, match="'mode'"):
            MaskPooling(mode="avg")(torch.randn(1, 4, 5, 5), torch.randn(1, 3, 9, 9))

    def test_cuda_backend_refuses_cpu_tensors(self):
        with use_backend("cuda"), pytest.raises(BackendError, match="backend 'cuda' was requested"):
            self._call()

    def test_triton_backend_rejects_fp64(self):
        with use_backend("triton"), pytest.raises(BackendError, match="float64"):
            self._call(x=torch.randn(1, 4, 5, 5, dtype=torch.float64))

    @pytest.mark.skipif(not triton_interpreted(),
                        reason="the bf16 limit is the Triton CPU interpreter's; on a GPU bf16 runs")
    def test_triton_interpreter_rejects_bf16(self):
        with use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            self._call(m=torch.randn(1, 3, 9, 9, dtype=torch.bfloat16))

    def test_fp64_on_the_torch_backend(self):
        with use_backend("torch"):
            out = self._call(x=torch.randn(1, 4, 5, 5, dtype=torch.float64))
        assert out.dtype == torch.float64


def test_cuda_supports_says_why(monkeypatch):
    from mmkernels import _backend
    from mmkernels.ops.mask_pool import cuda as mp_cuda

    monkeypatch.setattr(_backend, "cuda_supports_tensors", lambda *tensors, dtypes=None: None)
    x, m = torch.empty((2, 4, 5, 5), device="meta"), torch.empty((2, 3, 9, 9), device="meta")
    assert mp_cuda.supports(x, m, "official", 0.0, 1e-8) is None
    big_b = torch.empty((65536, 4, 5, 5), device="meta")
    assert "B = 65536 is above" in mp_cuda.supports(big_b, torch.empty((65536, 3, 9, 9), device="meta"), "soft",
                                                    0.0, 0.0)
    many_q = torch.empty((1, 65535 * 16 + 1, 2, 2), device="meta")
    assert "Q = 1048561" in mp_cuda.supports(x[:1], many_q, "soft", 0.0, 0.0)
    wide = torch.empty((1, 1, 2**16, 2**16), device="meta")
    assert "int32 limit" in mp_cuda.supports(x[:1], wide, "soft", 0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Compiled Triton code (no GPU needed) and GPU-only checks.

_AOT = r"""
import json, os, subprocess, sys, tempfile
import triton
from tests.ops.triton_aot import compile_for
from mmkernels.ops.mask_pool import triton as mt
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
def types(xd, md):
    t = {n: "*i32" for n in ("H0", "H1", "W0", "W1", "RLO", "RHI", "CLO", "CHI")}
    t.update({n: "*fp32" for n in ("DEN", "PART", "PDEN", "LH", "LW", "U")})
    t.update({n: f"*{xd}" for n in ("X", "OUT", "DOUT", "DX")})
    t.update({"M": f"*{md}", "DM": f"*{md}", "thr": "fp32", "eps": "fp32"})
    return t
res = {}
tmp = tempfile.mkdtemp()
for arch in (90, 80):
    for xd, md, dt in (("bf16", "bf16", "bfloat16"), ("fp16", "fp32", "float16"), ("fp32", "bf16", "float32")):
        import torch
        dtype = getattr(torch, dt)
        pr = mt.prec(dtype)
        variants = []
        bq, bp, bc, w = mt.blocks("fwd", dtype)
        for mode in (0, 1, 2):
            for split in (False, True):
                variants.append((f"fwd-m{mode}-s{int(split)}", mt._fwd_kernel, dict(
                    MODE=mode, SAME_H=False, SAME_W=False, SPLIT=split, W_F32=mode == 2 and xd != "fp32",
                    OFF64=True, PREC=pr, BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc, num_warps=w)))
        fq, fc, fw = mt.FINALIZE_BLOCKS
        variants.append(("fwd-same", mt._fwd_kernel, dict(
            MODE=0, SAME_H=True, SAME_W=True, SPLIT=False, W_F32=False, OFF64=False, PREC=pr, BLOCK_Q=bq,
            BLOCK_P=bp, BLOCK_C=bc, num_warps=w)))
        variants.append(("finalize", mt._finalize_kernel, dict(BLOCK_Q=fq, BLOCK_C=fc, num_warps=fw)))
        bq, bp, bc, w = mt.blocks("dx", dtype)
        variants.append(("dx", mt._dx_kernel, dict(MODE=0, SAME_H=False, SAME_W=False, OFF64=True, PREC=pr,
                                                    BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc, num_warps=w)))
        bq, bp, bc, w = mt.blocks("dmask", dtype)
        for same in (False, True):
            variants.append((f"dmask-same{int(same)}", mt._dmask_kernel, dict(
                SAME_H=same, SAME_W=False, OFF64=not same, PREC=pr, PREC_A=pr, BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc,
                BLOCK_I=mt.DMASK_TILE[0], BLOCK_J=mt.DMASK_TILE[1], num_warps=w)))
        for name, kern, cx in variants:
            key = f"{name}-sm{arch}-{xd}-{md}"
            try:
                k = compile_for(kern, arch, types(xd, md), cx)
                path = os.path.join(tmp, "k.cubin")
                open(path, "wb").write(k.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
                stack = [int(l.split("STACK:")[1].split()[0]) for l in usage.splitlines() if "STACK:" in l]
                res[key] = {"ok": True, "stack": max(stack) if stack else None, "shared": k.metadata.shared}
            except Exception as e:
                res[key] = {"ok": False, "error": str(e)[-1500:]}
print(json.dumps(res))
"""


@pytest.mark.slow
def test_kernels_compile_without_spills():
    """Every Triton kernel variant compiles for sm_90 and sm_80 at the launchers' GPU block sizes, without register
    spills (cuobjdump's STACK 0) and within the shared-memory limits (the interpreter accepts code the compiler
    rejects, and a spill would be a silent slowdown)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {k: v["error"] for k, v in res.items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    spills = {k: v["stack"] for k, v in res.items() if v["stack"] is None or v["stack"] > 0}
    assert not spills, spills
    limit = {"sm90": 227 * 1024, "sm80": 163 * 1024}
    over = {k: v["shared"] for k, v in res.items() for a, lim in limit.items() if f"-{a}-" in k and v["shared"] > lim}
    assert not over, over


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_benchmark_shape_and_peak_memory(backend):
    """At the benchmark's shape (Q = 1200 masks of 256x256, features 64x64 x 1024, bf16) the result matches the
    reference, and the peak memory of a forward (and of a backward) stays far below one [Q, 64, 64] tensor: the
    resized masks are never materialized."""
    from mmkernels import _ext

    if backend == "cuda" and _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    dev = "cuda"
    Q, C = 1200, 1024
    x = randn((1, C, 64, 64), torch.bfloat16, dev)
    m = randn((1, Q, 256, 256), torch.bfloat16, dev, scale=2.0)
    with use_backend(backend):
        out = mmkernels.mask_pool(x, m)
    assert_close(out, reference.mask_pool(x, m), dtype=torch.bfloat16)
    resized_bytes = Q * 64 * 64 * 2
    for grad in (False, True):
        xi = x.detach().requires_grad_(grad)
        dout = randn((1, Q, C), torch.bfloat16, dev)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with use_backend(backend):
            y = mmkernels.mask_pool(xi, m)
            if grad:
                y.backward(dout)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        # out, denominators, fp32 split partials (at most 4 x [Q, C] fp32), dx when grad: all below the bound.
        bound = 4 * Q * C * 4 + 2 * x.numel() * 2 + 2**20
        assert peak <= bound and peak < 10 * resized_bytes, (peak, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_backend_larger_shapes(dtype):
    """The cuda kernels over many tiles (Q, C, pixels not multiples of the tiles), channels_last features, every
    mode, against fp64 autograd."""
    from mmkernels import _ext

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    x = randn((2, 200, 33, 47), dtype, "cuda").to(memory_format=CL)
    m = randn((2, 70, 130, 95), dtype, "cuda", scale=2.0)
    dout = randn((2, 70, 200), dtype, "cuda")
    for mode in ("official", "hard", "soft"):
        got = _run("cuda", x, m, mode, 0.1, 1e-8, dout)
        want = _truth(x, m, mode, 0.1, 1e-8, dout)
        for name, g, r in zip(("out", "dx", "dm"), got, want):
            if r is not None:
                assert_close(g, r, dtype=dtype, what=f"{mode} {name}")
