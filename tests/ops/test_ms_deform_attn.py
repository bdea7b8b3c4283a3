"""mmkernels.ms_deform_attn: the reference against a grid_sample formulation (fp64), every backend against the
reference forward and backward (value, locations, weights) in every dtype, locations in fp32 with half value,
awkward sizes (1x1 levels, locations outside [0, 1], Q not a multiple of any block, C not a power of two),
non-contiguous inputs and grads, the deterministic backward, opcheck, torch.compile, the module, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.nn import MSDeformAttn
from mmkernels.ops.ms_deform_attn import plan, reference
from mmkernels.testing import assert_close, randn, rel_err, triton_interpreted
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

BACKEND_DTYPES = backend_dtype_params()
BACKENDS = backend_params()


def grid_sample_msda(value, shapes, loc, attn):
    """Deformable-DETR's PyTorch formulation: grid_sample per level (written independently of reference.py)."""
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    samples, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * H, C, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    s = torch.stack(samples, -2).flatten(-2)  # [B*H, C, Q, L*P]
    a = attn.permute(0, 2, 1, 3, 4).reshape(B * H, 1, Q, L * P)
    return (s * a).sum(-1).view(B, H, C, Q).permute(0, 3, 1, 2).reshape(B, Q, H * C)


def _tables(shapes, device="cpu"):
    ss = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = ss[:, 0] * ss[:, 1]
    return ss, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def _inputs(B, Q, H, C, shapes, P, dtype, device, loc_dtype=None, spread=0.3, seed=0):
    """Random value, locations (mostly inside [0, 1], some outside by up to ``spread``), unnormalized weights."""
    g = torch.Generator().manual_seed(seed)
    ss, lsi, S = _tables(shapes, device)
    L = len(shapes)
    value = randn((B, S, H, C), dtype, device, generator=g)
    loc = (torch.rand((B, Q, H, L, P, 2), generator=g) * (1 + 2 * spread) - spread)
    loc = loc.to(device=device, dtype=loc_dtype or dtype)
    attn = randn((B, Q, H, L, P), loc_dtype or dtype, device, generator=g, scale=0.5, shift=0.3)
    return value, ss, lsi, loc, attn


# (id, B, Q, H, C, level shapes, P)
CASES = [
    ("unpair-like", 1, 37, 2, 8, [(8, 8), (4, 4), (2, 2)], 4),
    ("1x1-level", 2, 5, 3, 5, [(3, 7), (1, 1)], 3),
    ("one-level-P1", 1, 19, 1, 3, [(5, 9)], 1),
    ("C17-Q70", 1, 70, 2, 17, [(6, 5), (3, 3), (2, 1), (1, 2)], 2),
]


def test_reference_equals_grid_sample_fp64():
    for _, B, Q, H, C, shapes, P in CASES:
        value, ss, lsi, loc, attn = _inputs(B, Q, H, C, shapes, P, torch.float64, "cpu", spread=0.5)
        # Include samples exactly on pixel centres (a kink of the interpolant: only where loc * W - 0.5 is exact
        # in both formulations, i.e. power-of-two level sizes) and on the map edges.
        for lvl, (h, w) in enumerate(shapes):
            if h & (h - 1) == 0 and w & (w - 1) == 0:
                loc[0, 0, 0, lvl, 0] = torch.tensor([1.5 / w, 0.5 / h], dtype=torch.float64)
        loc[0, 1 % Q, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
        for t in (value, loc, attn):
            t.requires_grad_(True)
        theirs = grid_sample_msda(value, shapes, loc, attn)
        assert_close(reference.forward(value, ss, lsi, loc, attn), theirs, tol=1e-12, what="reference forward")
        assert_close(reference.gather_forward(value, ss, lsi, loc, attn), theirs, tol=1e-12,
                     what="reference gather formulation vs grid_sample")
        g = torch.randn_like(theirs)
        expected = torch.autograd.grad(theirs, (value, loc, attn), g)
        for det in (False, True):
            got = reference.backward(g, value, ss, lsi, loc, attn, det)
            for name, a, e in zip(("value", "loc", "attn"), got, expected):
                assert_close(a, e, tol=1e-12, what=f"reference grad {name} (deterministic={det})")


def _check_backend(backend, device, dtype, case, loc_dtype=None, deterministic=False):
    _, B, Q, H, C, shapes, P = case
    value, ss, lsi, loc, attn = _inputs(B, Q, H, C, shapes, P, dtype, device, loc_dtype)
    # The reference on the same (rounded) inputs, in fp64.
    ref_in = [t.detach().double().cpu().requires_grad_(True) for t in (value, loc, attn)]
    expected = reference.forward(ref_in[0], ss.cpu(), lsi.cpu(), ref_in[1], ref_in[2])
    g = randn(expected.shape, dtype, device)
    exp_grads = torch.autograd.grad(expected, ref_in, g.double().cpu())
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    with use_backend(backend):
        out = mmkernels.ms_deform_attn(inputs[0], ss, lsi, inputs[1], inputs[2], deterministic=deterministic)
        out.backward(g)
    assert out.dtype == dtype and out.shape == (B, Q, H * C)
    assert_close(out, expected, dtype=dtype, what="output")
    for name, t, e in zip(("value", "sampling_locations", "attention_weights"), inputs, exp_grads):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, e, dtype=t.dtype, what=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_reference(backend, device, dtype, case):
    _check_backend(backend, device, dtype, case)


@pytest.mark.parametrize("backend,device,dtype", [p for p in BACKEND_DTYPES if p.values[2] != torch.float32])
def test_fp32_locations_with_half_value(backend, device, dtype):
    _check_backend(backend, device, dtype, CASES[0], loc_dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_backward(backend, device):
    """deterministic=True: bitwise equal across runs, and equal to the atomic backward within fp32 tolerance."""
    case = ("dense", 2, 45, 2, 6, [(4, 4), (2, 3), (1, 1)], 4)
    _check_backend(backend, device, torch.float32, case, deterministic=True)
    value, ss, lsi, loc, attn = _inputs(2, 45, 2, 6, case[5], 4, torch.float32, device, spread=0.1)
    g = randn((2, 45, 12), torch.float32, device)
    runs = []
    for det in (True, True, True, False):
        ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
        with use_backend(backend):
            mmkernels.ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2], deterministic=det).backward(g)
        runs.append([t.grad for t in ins])
    for later in runs[1:3]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[3]):
        assert_close(a, b, dtype=torch.float32, what="deterministic vs atomic")


def _non_finite_inputs(device):
    """fp32 inputs with one sample of each kind of non-finite input in its own (query, head): a NaN x, a +inf x, a
    -inf y, a NaN weight on a location outside the map, and a NaN weight inside it. The rest is finite."""
    shapes = [(3, 4), (2, 2)]
    value, ss, lsi, loc, attn = _inputs(1, 7, 2, 5, shapes, 2, torch.float32, "cpu", spread=0.2, seed=4)
    loc[0, 0, 0, 0, 1, 0] = math.nan
    loc[0, 1, 1, 1, 0, 0] = math.inf
    loc[0, 2, 0, 1, 1, 1] = -math.inf
    loc[0, 3, 1, 0, 0] = torch.tensor([1.6, 0.5])
    attn[0, 3, 1, 0, 0] = math.nan
    loc[0, 4, 0, 0, 0] = torch.tensor([0.4, 0.6])
    attn[0, 4, 0, 0, 0] = math.nan
    return [t.to(device) for t in (value, ss, lsi, loc, attn)]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_inputs_give_nan_where_the_reference_does(backend, device):
    """A NaN or infinite location, or a NaN weight, makes the output of its (query, head) NaN, and its grad_loc and
    grad_attn entries NaN exactly where reference.backward's are (an infinite x leaves d/dx finite); every other
    entry stays finite and correct, and a sample outside every map adds nothing to grad_value (deterministic or
    not). A kernel that skips out-of-map samples would give 0 instead: silent zeros hiding a NaN."""
    value, ss, lsi, loc, attn = _non_finite_inputs(device)
    ref_in = [t.detach().double().cpu() for t in (value, loc, attn)]
    want = reference.forward(ref_in[0], ss.cpu(), lsi.cpu(), ref_in[1], ref_in[2])
    g = randn(want.shape, torch.float32, "cpu", generator=torch.Generator().manual_seed(9))
    want_grads = reference.backward(g.double(), ref_in[0], ss.cpu(), lsi.cpu(), ref_in[1], ref_in[2], False)
    det_grads = reference.backward(g.double(), ref_in[0], ss.cpu(), lsi.cpu(), ref_in[1], ref_in[2], True)
    nan_rows = want.view(1, 7, 2, 5).isnan().all(-1)
    assert nan_rows[0, :5].tolist() == [[True, False], [False, True], [True, False], [False, True], [True, False]]
    assert not want.view(1, 7, 2, 5)[~nan_rows].isnan().any()
    # grad_value: NaN only in the 4 corner rows (x 5 channels, head 0) of the NaN weight inside the map.
    assert want_grads[0].isnan().sum() == 20 and want_grads[0][:, :, 0].isnan().sum() == 20
    for a, b in zip(want_grads, det_grads):
        torch.testing.assert_close(a, b, equal_nan=True)
    for det in (False, True):
        ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
        with use_backend(backend):
            out = mmkernels.ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2], deterministic=det)
            out.backward(g.to(device))
        torch.testing.assert_close(out.double().cpu(), want, equal_nan=True, rtol=1e-5, atol=1e-5)
        for name, t, e in zip(("value", "sampling_locations", "attention_weights"), ins, want_grads):
            torch.testing.assert_close(t.grad.double().cpu(), e, equal_nan=True, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, det=det: f"grad {name} (deterministic={det}): {m}")


def test_value_grad_plan():
    """Every in-range corner of every sample is listed once under its destination row, in ascending sample id."""
    shapes = [(3, 4), (2, 2)]
    value, ss, lsi, loc, attn = _inputs(2, 6, 2, 1, shapes, 3, torch.float32, "cpu", spread=0.4)
    S = value.shape[1]
    entries, offsets = plan.value_grad_csr(ss, lsi, loc, S)
    B, Q, H, L, P = attn.shape
    expected = {}
    for e in range(B * Q * H * L * P):
        p, lvl = e % P, (e // P) % L
        h, q, b = (e // (P * L)) % H, (e // (P * L * H)) % Q, e // (P * L * H * Q)
        hl, wl = shapes[lvl]
        x = loc[b, q, h, lvl, p, 0].item() * wl - 0.5
        y = loc[b, q, h, lvl, p, 1].item() * hl - 0.5
        for yc in (math.floor(y), math.floor(y) + 1):
            for xc in (math.floor(x), math.floor(x) + 1):
                if 0 <= xc < wl and 0 <= yc < hl:
                    s = int(lsi[lvl]) + yc * wl + xc
                    expected.setdefault((b * S + s) * H + h, []).append(e)
    assert offsets.shape == (B * S * H + 1,) and int(offsets[-1]) == entries.numel()
    for r in range(B * S * H):
        assert entries[offsets[r]:offsets[r + 1]].tolist() == expected.get(r, [])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noncontiguous_and_expanded_grad(backend, device):
    """value as a strided view of a wider tensor, locations/weights permuted copies, the expanded upstream grad of
    y.sum()."""
    shapes = [(4, 5), (2, 2)]
    ss, lsi, S = _tables(shapes, device)
    f32 = torch.float32
    wide = randn((2, S, 3, 10), f32, device)
    value = wide[..., ::2].detach().requires_grad_(True)  # [2, S, 3, 5], channel stride 2
    loc = torch.rand(2, 3, 9, 2, 2, 2).to(device).permute(0, 2, 1, 3, 4, 5).detach().requires_grad_(True)
    attn = randn((2, 3, 9, 2, 2), f32, device).transpose(1, 2).detach().requires_grad_(True)
    with use_backend(backend):
        out = mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
        out.sum().backward()
    ins = [t.detach().double().cpu().requires_grad_(True) for t in (value, loc, attn)]
    exp = reference.forward(ins[0], ss.cpu(), lsi.cpu(), ins[1], ins[2])
    exp.sum().backward()
    assert_close(out, exp, dtype=f32, what="output")
    for t, e in zip((value, loc, attn), ins):
        assert_close(t.grad, e.grad, dtype=f32, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tables_as_sequences_and_int32(backend, device):
    shapes = [(3, 3), (1, 2)]
    value, ss, lsi, loc, attn = _inputs(1, 4, 2, 4, shapes, 2, torch.float32, device)
    with use_backend(backend):
        a = mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
        b = mmkernels.ms_deform_attn(value, shapes, lsi.tolist(), loc, attn)
        c = mmkernels.ms_deform_attn(value, ss.int().cpu(), lsi.int().cpu(), loc, attn)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    shapes = [(2, 2)]
    value, ss, lsi, loc, attn = _inputs(2, 0, 2, 3, shapes, 2, torch.float32, device)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    with use_backend(backend):
        out = mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
        out.sum().backward()
    assert out.shape == (2, 0, 6)
    assert torch.equal(value.grad, torch.zeros_like(value))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    value, ss, lsi, loc, attn = _inputs(1, 6, 2, 3, [(3, 2), (1, 1)], 2, torch.float32, device)
    fwd, bwd = torch.ops.mmkernels.ms_deform_attn_fwd.default, torch.ops.mmkernels.ms_deform_attn_bwd.default
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(fwd, (value, ss, lsi, loc, attn, False, backend))
    torch.library.opcheck(fwd, (value, ss, lsi, loc, attn, True, backend))
    g = randn((1, 6, 6), torch.float32, device)
    for det in (False, True):
        torch.library.opcheck(bwd, (g, value.detach(), ss, lsi, loc.detach(), attn.detach(), det, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device, compiler):
    shapes = [(3, 4), (2, 2)]
    ss, lsi, S = _tables(shapes, device)

    def block(value, offsets, logits):
        ref = torch.full((1, 5, 1, 2, 1, 2), 0.5, device=value.device)
        loc = ref + offsets * 0.1
        attn = logits.softmax(-1).view(1, 5, 2, 2, 3)
        return mmkernels.ms_deform_attn(value * 2.0, ss, lsi, loc, attn).square().mean()

    f32 = torch.float32
    check_compiled(block, (randn((1, S, 2, 4), f32, device), randn((1, 5, 2, 2, 3, 2), f32, device),
                           randn((1, 5, 2, 6), f32, device)), backend, compiler)


def test_auto_and_named_backends_cpu():
    value, ss, lsi, loc, attn = _inputs(1, 3, 1, 2, [(2, 2)], 1, torch.float32, "cpu")
    with use_backend("auto"):
        out = mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
    assert_close(out, reference.forward(value, ss, lsi, loc, attn), dtype=torch.float32)
    with use_backend("cuda"), pytest.raises(BackendError):
        mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
    if triton_interpreted():
        with use_backend("triton"), pytest.raises(BackendError, match="one dtype"):
            mmkernels.ms_deform_attn(value.half(), ss, lsi, loc, attn.half())
        with use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            mmkernels.ms_deform_attn(value.bfloat16(), ss, lsi, loc, attn)
    # The torch backend takes any combination of float dtypes (fp64 locations with fp16 value).
    out = mmkernels.ms_deform_attn(value.half(), ss, lsi, loc.double(), attn)
    assert out.dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------------
# The module.


def test_module_init_and_keys():
    m = MSDeformAttn(256, 3, 8, 4)
    assert set(m.state_dict()) == {f"{n}.{p}" for n in ("sampling_offsets", "attention_weights", "value_proj",
                                                         "output_proj") for p in ("weight", "bias")}
    assert m.sampling_offsets.weight.shape == (192, 256) and m.attention_weights.weight.shape == (96, 256)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0 and torch.count_nonzero(m.attention_weights.bias) == 0
    bias = m.sampling_offsets.bias.view(8, 3, 4, 2)
    # Head 0 points along +x, head 2 along +y, head 4 along -x (directions scaled so the larger axis is 1);
    # point p sits at distance p + 1, the same on every level.
    assert torch.allclose(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6)
    assert torch.allclose(bias[4, 2, 0], torch.tensor([-1.0, 0.0]), atol=1e-6)
    assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    with pytest.warns(UserWarning, match="power of two"):
        MSDeformAttn(24, 2, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, 2, 4, 2)


def _official_module_forward(m, query, ref, src, ss, lsi, mask):
    """The official MSDeformAttn.forward, written out with grid_sample as its core."""
    B, Lq, _ = query.shape
    H, L, P = m.n_heads, m.n_levels, m.n_points
    value = m.value_proj(src)
    if mask is not None:
        value = value.masked_fill(mask[..., None], 0.0)
    value = value.view(B, src.shape[1], H, -1)
    off = m.sampling_offsets(query).view(B, Lq, H, L, P, 2)
    attn = F.softmax(m.attention_weights(query).view(B, Lq, H, L * P), -1).view(B, Lq, H, L, P)
    if ref.shape[-1] == 2:
        norm = torch.stack([ss[..., 1], ss[..., 0]], -1)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    return m.output_proj(grid_sample_msda(value, [tuple(r) for r in ss.tolist()], loc, attn))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_official(backend, device, ref_dim):
    torch.manual_seed(1)
    shapes = [(4, 4), (2, 3), (1, 1)]
    ss, lsi, S = _tables(shapes, device)
    m = MSDeformAttn(16, 3, 2, 3).to(device)
    with torch.no_grad():  # non-trivial offsets and attention (the init has zero weights)
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.3)
    q = randn((2, 7, 16), torch.float32, device)
    src = randn((2, S, 16), torch.float32, device)
    ref = torch.rand(2, 7, 3, ref_dim, device=device)
    mask = torch.zeros(2, S, dtype=torch.bool, device=device)
    mask[1, -3:] = True
    with use_backend(backend):
        ours = m(q, ref, src, ss, lsi, mask)
        ours.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    expected = _official_module_forward(m, q, ref, src, ss, lsi, mask)
    expected.square().sum().backward()
    assert_close(ours, expected, dtype=torch.float32, what="module output")
    for n, p in m.named_parameters():
        assert_close(grads[n], p.grad, dtype=torch.float32, what=f"grad {n}")


def test_module_fp32_sampling_under_bf16_autocast():
    """fp32_sampling keeps the offset and attention linears in fp32 under autocast (their grads still reach the
    parameters): the locations then equal the fp32 ones exactly, and the output error is that of bf16 values only."""
    torch.manual_seed(2)
    shapes = [(8, 8), (4, 4)]
    ss, lsi, S = _tables(shapes, "cpu")
    m = MSDeformAttn(16, 2, 2, 2)
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 2.0)  # offsets of several pixels: bf16 rounding moves them visibly
        m.attention_weights.weight.normal_(0, 0.3)
    q, src, ref = torch.randn(1, 9, 16), torch.randn(1, S, 16), torch.rand(1, 9, 2, 2)
    want = _official_module_forward(m, q, ref, src, ss, lsi, None)
    seen = {}
    real = mmkernels.ms_deform_attn

    def spy(value, shapes_, lsi_, loc, attn, **kw):
        seen["loc"], seen["attn"] = loc, attn
        return real(value, shapes_, lsi_, loc, attn, **kw)

    errs = {}
    for flag in (True, False):
        m.fp32_sampling = flag
        import mmkernels.nn.ms_deform_attn as mod
        mod.ms_deform_attn, saved = spy, mod.ms_deform_attn
        try:
            with use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(q, ref, src, ss, lsi)
            out.float().sum().backward()
        finally:
            mod.ms_deform_attn = saved
        assert m.sampling_offsets.weight.grad is not None and m.attention_weights.weight.grad is not None
        m.zero_grad()
        errs[flag] = rel_err(out.float(), want)
        if flag:
            assert seen["loc"].dtype == torch.float32 and seen["attn"].dtype == torch.float32
            off = (m.sampling_offsets(q).view(1, 9, 2, 2, 2, 2) / torch.tensor([[8.0, 8.0], [4.0, 4.0]])[None, None,
                                                                                                 None, :, None, :])
            assert torch.allclose(seen["loc"], ref[:, :, None, :, None, :] + off, atol=1e-6)
    assert errs[True] < 2e-2 and errs[True] < errs[False], errs


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


class TestBadInput:
    def _ok(self):
        return _inputs(1, 3, 2, 4, [(2, 3), (1, 1)], 2, torch.float32, "cpu")

    def test_levels_inconsistent_with_S(self):
        value, ss, lsi, loc, attn = self._ok()
        with pytest.raises(ValueError, match="sum to 6 .* S = 7"):
            mmkernels.ms_deform_attn(value, torch.tensor([[1, 3], [1, 3]]), torch.tensor([0, 3]), loc, attn)
        with pytest.raises(ValueError, match="sum to 8"):
            mmkernels.ms_deform_attn(value, torch.tensor([[2, 3], [1, 2]]), lsi, loc, attn)
        with pytest.raises(ValueError, match="exclusive cumulative sum"):
            mmkernels.ms_deform_attn(value, ss, torch.tensor([0, 5]), loc, attn)
        with pytest.raises(ValueError, match="H_l, W_l >= 1"):
            mmkernels.ms_deform_attn(value[:, :6], torch.tensor([[2, 3], [0, 5]]), torch.tensor([0, 6]),
                                     loc, attn)

    def test_shapes(self):
        value, ss, lsi, loc, attn = self._ok()
        with pytest.raises(ValueError, match="'value' must have 4 dims"):
            mmkernels.ms_deform_attn(value[0], ss, lsi, loc, attn)
        with pytest.raises(ValueError, match=r"'spatial_shapes' must have shape \[L, 2\]"):
            mmkernels.ms_deform_attn(value, torch.tensor([[2, 3, 1], [1, 1, 1]]), lsi, loc, attn)
        with pytest.raises(ValueError, match="'level_start_index' must have shape"):
            mmkernels.ms_deform_attn(value, ss, torch.tensor([0]), loc, attn)
        with pytest.raises(ValueError, match="end in a dim of 2"):
            mmkernels.ms_deform_attn(value, ss, lsi, torch.cat([loc, loc[..., :1]], -1), attn)
        with pytest.raises(ValueError, match=r"\[B, Q, H, L, P, 2\]"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc[:, :, :1], attn[:, :, :1])
        with pytest.raises(ValueError, match=r"\[B, Q, H, L, P, 2\]"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc[:, :, :, :1], attn[:, :, :, :1])
        with pytest.raises(ValueError, match="'attention_weights' must have shape"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc, attn[..., :1])
        with pytest.raises(ValueError, match="'sampling_locations' must have 6 dims"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc[0], attn)

    def test_types(self):
        value, ss, lsi, loc, attn = self._ok()
        with pytest.raises(TypeError, match="'spatial_shapes' must be an int64 or int32"):
            mmkernels.ms_deform_attn(value, ss.float(), lsi, loc, attn)
        with pytest.raises(TypeError, match="'level_start_index'"):
            mmkernels.ms_deform_attn(value, ss, [0.0, 6.5], loc, attn)
        with pytest.raises(TypeError, match="'value' must be a floating-point"):
            mmkernels.ms_deform_attn(value.int(), ss, lsi, loc, attn)
        with pytest.raises(TypeError, match="'deterministic' must be a bool"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc, attn, deterministic=1)
        with pytest.raises(TypeError, match="'attention_weights' must be a torch.Tensor"):
            mmkernels.ms_deform_attn(value, ss, lsi, loc, None)

    def test_unnormalized_weights_are_allowed(self):
        value, ss, lsi, loc, attn = self._ok()
        out = mmkernels.ms_deform_attn(value, ss, lsi, loc, attn * 7.0 - 3.0)
        assert_close(out, reference.forward(value, ss, lsi, loc, attn * 7.0 - 3.0), dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_table_checked_once_and_on_modification():
    value, ss, lsi, loc, attn = _inputs(1, 3, 2, 4, [(2, 3), (1, 1)], 2, torch.float32, "cuda")
    mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
    ss[1, 1] = 2  # in place: the cached check must not hide it
    with pytest.raises(ValueError, match="sum to 8"):
        mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)
