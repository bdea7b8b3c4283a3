"""The cuda backend of mmkernels.ms_deform_attn (csrc/ms_deform_attn/): cases aimed at its kernels, against an
oracle written here (grid_sample per level in fp64, independent of reference.py and of the other test file).

On a GPU: every C of an awkward list (1, 3, 8, 17, 32, 64, 100, 256: scalar and 16-byte-vector lanes, one and
several channel chunks, partial groups) in fp32/fp16/bf16, forward and both backward modes; fp32 locations with
half value; the deterministic backward bitwise repeatable and close to the atomic one; non-contiguous inputs and
the stride-0 grad of y.sum(); misaligned value (the scalar fallback of the vector path); locations outside [0, 1],
on exact pixel centres and edges and on the x = -1 / x = W borders; levels of 1x1; many levels and points; and the
Unpair-Seg encoder shape with a batch large enough that the kernels' grid-stride loops run. On the CPU: supports()
answers with a reason (never an exception) and states its own limits."""

import types

import pytest
import torch
import torch.nn.functional as F

from mmkernels import _backend, _ext, use_backend
from mmkernels.ops.ms_deform_attn import cuda as msda_cuda
from mmkernels.ops.ms_deform_attn import ms_deform_attn
from mmkernels.testing import assert_close

DEV = "cuda"
CHANNELS = (1, 3, 8, 17, 32, 64, 100, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tables(shapes, device=None):
    ss = torch.tensor(shapes, dtype=torch.int64, device=device or DEV)
    sizes = ss[:, 0] * ss[:, 1]
    return ss, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def oracle(value, shapes, loc, attn):
    """out [B, Q, H*C] = sum_{l,p} attn * grid_sample(V_l, 2*loc - 1) (bilinear, zeros, align_corners=False), in the
    inputs' dtype (the tests pass fp64 copies): one grid_sample per level and head block, then a weighted sum."""
    B, S, H, C = value.shape
    Q, P = loc.shape[1], loc.shape[4]
    out = value.new_zeros(B, H, C, Q)
    start = 0
    for lvl, (hl, wl) in enumerate(shapes):
        v = value[:, start:start + hl * wl].reshape(B, hl, wl, H, C).permute(0, 3, 4, 1, 2)  # [B, H, C, hl, wl]
        start += hl * wl
        grid = loc[:, :, :, lvl].permute(0, 2, 1, 3, 4) * 2 - 1  # [B, H, Q, P, 2]
        s = F.grid_sample(v.reshape(B * H, C, hl, wl), grid.reshape(B * H, Q, P, 2), mode="bilinear",
                          padding_mode="zeros", align_corners=False).view(B, H, C, Q, P)
        out = out + torch.einsum("bhcqp,bhqp->bhcq", s, attn[:, :, :, lvl].permute(0, 2, 1, 3))
    return out.permute(0, 3, 1, 2).reshape(B, Q, H * C)


def _random(B, Q, H, C, shapes, P, dtype, loc_dtype=None, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, _, S = _tables(shapes, "cpu")
    L = len(shapes)
    value = torch.randn((B, S, H, C), generator=g).to(DEV, dtype)
    loc = (torch.rand((B, Q, H, L, P, 2), generator=g) * (1 + 2 * spread) - spread).to(DEV, loc_dtype or dtype)
    attn = (torch.randn((B, Q, H, L, P), generator=g) * 0.5 + 0.3).to(DEV, loc_dtype or dtype)
    return value, loc, attn


def _run(value, shapes, loc, attn, grad, deterministic):
    """Output and (value, loc, attn) grads of the cuda backend."""
    ss, lsi, _ = _tables(shapes)
    ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    with use_backend("cuda"):
        out = ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2], deterministic=deterministic)
        out.backward(grad)
    return out, [t.grad for t in ins]


def _expected(value, shapes, loc, attn, grad):
    """The oracle's output and grads in fp64, from the same (rounded) inputs."""
    ins = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
    out = oracle(ins[0], shapes, ins[1], ins[2])
    return out, torch.autograd.grad(out, ins, grad.double())


def _check(value, shapes, loc, attn, grad=None, modes=(False, True), tol=None):
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=DEV).to(value.dtype) \
        if grad is None else grad
    exp_out, exp_grads = _expected(value, shapes, loc, attn, grad)
    for det in modes:
        out, grads = _run(value, shapes, loc, attn, grad, det)
        assert out.dtype == value.dtype and out.shape == exp_out.shape
        assert_close(out, exp_out, dtype=value.dtype, tol=tol, what=f"output (deterministic={det})")
        for name, t, got, e in zip(("value", "sampling_locations", "attention_weights"), (value, loc, attn), grads,
                                   exp_grads):
            assert got.dtype == t.dtype and got.shape == t.shape
            assert_close(got, e, dtype=t.dtype, tol=tol, what=f"grad {name} (deterministic={det})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("C", CHANNELS)
def test_every_channel_count(C, dtype):
    """Scalar lanes (C % VEC != 0), 16-byte vectors, partial groups (C / VEC not a power of two) and several
    channel chunks (C / VEC > 32); a 1x1 level and locations outside [0, 1]."""
    shapes = [(5, 7), (3, 3), (1, 1)]
    value, loc, attn = _random(2, 23, 3, C, shapes, 3, dtype)
    _check(value, shapes, loc, attn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
@pytest.mark.parametrize("C", (5, 32))
def test_fp32_locations_with_half_value(C, dtype):
    shapes = [(8, 8), (4, 4), (2, 2)]
    value, loc, attn = _random(1, 50, 8, C, shapes, 4, dtype, loc_dtype=torch.float32)
    _check(value, shapes, loc, attn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
@pytest.mark.parametrize("C", (3, 32))
def test_deterministic_backward_repeatable(C, dtype):
    """Many queries on small maps, so many samples add into each value row (the atomic order varies): the
    deterministic backward is bitwise equal over 3 runs and within tolerance of the atomic one."""
    shapes = [(4, 4), (2, 3), (1, 1)]
    value, loc, attn = _random(2, 300, 2, C, shapes, 4, dtype, spread=0.1, seed=1)
    grad = torch.randn(2, 300, 2 * C, device=DEV).to(dtype)
    runs = [_run(value, shapes, loc, attn, grad, True) for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)
    out, atomic = _run(value, shapes, loc, attn, grad, False)
    assert torch.equal(out, runs[0][0])
    # grad_loc and grad_attn come from one kernel in both modes: identical bits.
    assert torch.equal(atomic[1], runs[0][1][1]) and torch.equal(atomic[2], runs[0][1][2])
    assert_close(atomic[0], runs[0][1][0], dtype=dtype, what="atomic vs deterministic grad_value")
    _check(value, shapes, loc, attn, grad)


@pytest.mark.gpu
def test_noncontiguous_inputs_and_expanded_grad():
    """value a channel-strided view, locations/weights permuted, grad_out the stride-0 grad of y.sum() and a
    transposed one."""
    shapes = [(6, 5), (3, 2), (1, 1)]
    ss, lsi, S = _tables(shapes)
    wide = torch.randn(2, S, 4, 64, device=DEV)
    value = wide[..., ::2]  # [2, S, 4, 32], channel stride 2
    loc = torch.rand(2, 4, 11, 3, 2, 2, device=DEV).permute(0, 2, 1, 3, 4, 5)
    attn = torch.randn(2, 4, 11, 3, 2, device=DEV).transpose(1, 2)
    _, exp_grads = _expected(value, shapes, loc, attn, torch.ones(2, 11, 128, device=DEV))
    ins = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    with use_backend("cuda"):
        for det in (False, True):
            for t in ins:
                t.grad = None
            ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2], deterministic=det).sum().backward()
            for t, e in zip(ins, exp_grads):
                assert_close(t.grad, e, dtype=torch.float32, what=f"grad from y.sum() (deterministic={det})")
    grad_t = torch.randn(2, 128, 11, device=DEV).transpose(1, 2)  # [2, 11, 128], not contiguous
    _check(value, shapes, loc, attn, grad=grad_t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_misaligned_value_takes_the_scalar_path(dtype):
    """value starting one element past a 16-byte boundary (contiguous): the kernels fall back to scalar lanes."""
    shapes = [(4, 4), (2, 2)]
    _, _, S = _tables(shapes)
    buf = torch.randn(2 * S * 2 * 32 + 1, device=DEV).to(dtype)
    value = buf[1:].view(2, S, 2, 32)
    assert value.is_contiguous() and value.data_ptr() % 16 != 0
    _, loc, attn = _random(2, 17, 2, 32, shapes, 2, dtype)
    _check(value, shapes, loc, attn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_exact_centres_edges_and_borders(dtype):
    """Locations where x = loc*W - 0.5 (and y) are exact in fp32 and fp64 (power-of-two maps): pixel centres
    (x integer: lx = 0, a kink of the interpolant), pixel edges, the map edges 0 and 1, the borders x = -1 and
    x = W (the last positions with / first without an in-range corner), and points far outside."""
    shapes = [(8, 4), (2, 2), (1, 1)]
    B, Q, H, C, P = 1, 12, 2, 16, 4
    g = torch.Generator().manual_seed(3)
    L = len(shapes)
    loc = torch.empty(B, Q, H, L, P, 2)
    for lvl, (hl, wl) in enumerate(shapes):
        xs = [(i + 0.5) / wl for i in range(wl)] + [i / wl for i in range(wl + 1)] + [-0.5 / wl, (wl + 0.5) / wl]
        ys = [(i + 0.5) / hl for i in range(hl)] + [i / hl for i in range(hl + 1)] + [-0.5 / hl, (hl + 0.5) / hl]
        xs += [-3.0, 5.0, -0.75 / wl, (wl + 0.25) / wl]
        ys += [-2.0, 4.0, -0.75 / hl, (hl + 0.25) / hl]
        ix = torch.randint(len(xs), (B, Q, H, P), generator=g)
        iy = torch.randint(len(ys), (B, Q, H, P), generator=g)
        loc[:, :, :, lvl, :, 0] = torch.tensor(xs)[ix]
        loc[:, :, :, lvl, :, 1] = torch.tensor(ys)[iy]
    _, _, S = _tables(shapes)
    value = torch.randn(B, S, H, C, generator=g).to(DEV, dtype)
    attn = (torch.randn(B, Q, H, L, P, generator=g) + 0.5).to(DEV, dtype)
    _check(value, shapes, loc.to(DEV, dtype), attn)


@pytest.mark.gpu
def test_only_1x1_levels():
    shapes = [(1, 1), (1, 1), (1, 1)]
    value, loc, attn = _random(3, 9, 2, 8, shapes, 2, torch.float32, spread=1.0)
    _check(value, shapes, loc, attn)


@pytest.mark.gpu
@pytest.mark.parametrize("C", (4, 33))
def test_many_levels_and_points(C):
    """L = 9 and P = 17: the sample loops run on sizes no kernel unrolls."""
    shapes = [(7, 3), (5, 5), (4, 1), (1, 6), (3, 3), (2, 2), (1, 1), (9, 2), (2, 8)]
    value, loc, attn = _random(1, 13, 2, C, shapes, 17, torch.float32, seed=5)
    _check(value, shapes, loc, attn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,loc_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=("bf16-fp32coords", "fp32"))
def test_unpair_seg_encoder_shape(dtype, loc_dtype):
    """The Unpair-Seg encoder at 1024^2 (levels 32^2, 64^2, 128^2, Q = S = 21504, H = 8, C = 32, P = 4), batch 4:
    at this size each group of lanes loops over several query heads (the grid is capped), in both backward modes.
    Locations near reference points with pixel offsets, as the module produces them."""
    shapes = [(32, 32), (64, 64), (128, 128)]
    _, _, S = _tables(shapes)
    B, H, C, L, P = 4, 8, 32, 3, 4
    g = torch.Generator(device=DEV).manual_seed(7)
    ref = torch.rand(B, S, 1, 1, 1, 2, device=DEV, generator=g)
    wh = torch.tensor([[w, h] for h, w in shapes], device=DEV, dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    loc = (ref + torch.randn(B, S, H, L, P, 2, device=DEV, generator=g) * 2 / wh).to(loc_dtype)
    attn = torch.randn(B, S, H, L * P, device=DEV, generator=g).softmax(-1).view(B, S, H, L, P).to(loc_dtype)
    value = torch.randn(B, S, H, C, device=DEV, generator=g).to(dtype)
    _check(value, shapes, loc, attn)


# ------------------------------------------------------------------------------------------------------------------
# CPU: what supports() says.


def _cpu_inputs(C=8, L=2, dtype=torch.float32, loc_dtype=None, device="cpu"):
    value = torch.randn(1, 5 * L, 2, C, dtype=dtype, device=device)
    ss = torch.tensor([[1, 5]] * L, device=device)
    lsi = torch.arange(L, device=device) * 5
    loc = torch.rand(1, 3, 2, L, 2, 2, dtype=loc_dtype or dtype, device=device)
    attn = torch.rand(1, 3, 2, L, 2, dtype=loc_dtype or dtype, device=device)
    return value, ss, lsi, loc, attn


def test_supports_gives_a_reason_on_cpu_tensors():
    why = msda_cuda.supports(*_cpu_inputs())
    assert isinstance(why, str) and "CUDA tensors" in why


def test_supports_states_its_limits(monkeypatch):
    """The backend's own limits, past the device checks (patched out, with a stand-in for the extension)."""
    monkeypatch.setattr(_backend, "cuda_supports_tensors", lambda *tensors, dtypes=None: None)
    monkeypatch.setattr(msda_cuda, "C", types.SimpleNamespace(**{n: None for n in msda_cuda._ENTRY_POINTS}))
    assert msda_cuda.supports(*_cpu_inputs()) is None
    assert msda_cuda.supports(*_cpu_inputs(C=3, dtype=torch.bfloat16, loc_dtype=torch.float32)) is None
    assert "one dtype" in msda_cuda.supports(*_cpu_inputs(dtype=torch.bfloat16, loc_dtype=torch.float16))
    v, ss, lsi, loc, attn = _cpu_inputs()
    assert "one dtype" in msda_cuda.supports(v, ss, lsi, loc, attn.double())
    big = _cpu_inputs(L=1025, device="meta")
    assert "1 to 1024 levels" in msda_cuda.supports(*big)
    meta = dict(device="meta")
    value = torch.empty(1, 1 << 27, 8, 32, **meta)  # S*H = 2**30
    assert "S*H" in msda_cuda.supports(value, torch.empty(1, 2, dtype=torch.int64, **meta),
                                       torch.empty(1, dtype=torch.int64, **meta),
                                       torch.empty(1, 4, 8, 1, 4, 2, **meta), torch.empty(1, 4, 8, 1, 4, **meta))
    value = torch.empty(1, 64, 8, 32, **meta)
    loc, attn = torch.empty(1, 1 << 22, 8, 1, 4, 2, **meta), torch.empty(1, 1 << 22, 8, 1, 4, **meta)
    assert "Q*H*C" in msda_cuda.supports(value, torch.empty(1, 2, dtype=torch.int64, **meta),
                                         torch.empty(1, dtype=torch.int64, **meta), loc, attn)
    monkeypatch.setattr(msda_cuda, "C", None)
    assert "built without the ms_deform_attn kernels" in msda_cuda.supports(*_cpu_inputs())


@pytest.mark.skipif(_ext.C is None or not hasattr(_ext.C, "ms_deform_attn_fwd"),
                    reason="mmkernels._C is not built with the ms_deform_attn kernels")
def test_extension_rejects_cpu_tensors_clearly():
    v, ss, lsi, loc, attn = _cpu_inputs()
    g = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="argument 'value' must be a CUDA tensor"):
        _ext.C.ms_deform_attn_fwd(v, ss, lsi, loc, attn)
    with pytest.raises(ValueError, match="argument 'value' must be a CUDA tensor"):
        _ext.C.ms_deform_attn_bwd(g, v, ss, lsi, loc, attn, True)
    with pytest.raises(ValueError, match="argument 'value' must be a CUDA tensor"):
        _ext.C.ms_deform_attn_bwd_value(g, v, ss, lsi, loc, attn, lsi, lsi)
