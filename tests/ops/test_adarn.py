"""mmkernels.adarn: every backend against the reference (fp64 autograd as ground truth), forward and backward; the
official bf16/fp16 composition (bitwise / ulp); layouts; opcheck; compile; bad input."""

import itertools

import pytest
import torch
import triton
import triton.language as tl

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.ops.adarn import reference
from mmkernels.ops.adarn.triton import _tanh_portable
from mmkernels.testing import assert_close, randn, triton_interpreted
from tests.ops.common import backend_dtype_params, backend_params, check_compiled


def _no_cuda_backend(params):
    # adarn has torch and triton backends only (no mmkernels._C kernels).
    return [p for p in params if p.values[0] != "cuda"]


BACKEND_DTYPES = _no_cuda_backend(backend_dtype_params())
BACKENDS = _no_cuda_backend(backend_params())

# [B, *tokens, D]: 2-D/3-D/4-D, a 1-D x (one token), width 1 and awkward widths (72, 100, 2304 at few tokens).
SHAPES = [(2, 5, 72), (3, 100), (2, 2, 3, 40), (1, 3, 2304), (7,), (3, 16, 1)]
# (scale, gate, residual) present or absent: all 8 combinations.
COMBOS = list(itertools.product((False, True), repeat=3))


def _combo_id(c):
    return "".join(n for n, on in zip(("s", "g", "r"), c) if on) or "none"


def _eps(shape):
    # At width 1, RMSNorm is x/|x| and its gradient exists only through eps; a large eps keeps it well-conditioned.
    return 0.5 if shape[-1] == 1 else 1e-6


def _vec_shape(shape):
    """The per-sample vector shape for x of ``shape``: [B, 1, ..., 1, D] (x.ndim dims), or [D] for a 1-D x."""
    return (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],) if len(shape) >= 2 else shape


def _inputs(shape, dtype, device, combo, vec_shape=None):
    vs = vec_shape or _vec_shape(shape)
    x = randn(shape, dtype, device)
    s = randn(vs, dtype, device, scale=0.5) if combo[0] else None
    g = randn(vs, dtype, device) if combo[1] else None
    r = randn(shape, dtype, device) if combo[2] else None
    return x, s, g, r


def _run(backend, x, s, g, r, eps, dy):
    ins = [t.detach().requires_grad_(True) if t is not None else None for t in (x, s, g, r)]
    with use_backend(backend):
        y = mmkernels.adarn(*ins, eps=eps)
        y.backward(dy)
    return y, [t.grad if t is not None else None for t in ins]


def _truth(x, s, g, r, eps, dy, fn=reference.adarn):
    """y and the grads of (x, scale, gate, residual) by fp64 autograd through ``fn``: independent of every
    backend's closed-form backward."""
    ins = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, s, g, r)]
    y = fn(*ins, eps=eps)
    y.backward(dy.double())
    return y, [t.grad if t is not None else None for t in ins]


def _check_all(y, grads, y_ref, grads_ref, dtype):
    assert_close(y, y_ref, dtype=dtype, what="y")
    for name, a, e in zip(("dx", "dscale", "dgate", "dresidual"), grads, grads_ref):
        if e is None:
            assert a is None, name
        else:
            assert a.dtype == dtype and a.shape == e.shape, (name, a.dtype, a.shape)
            assert_close(a, e, dtype=dtype, what=name)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_matches_reference(backend, device, dtype, shape, combo):
    x, s, g, r = _inputs(shape, dtype, device, combo)
    dy = randn(shape, dtype, device)
    eps = _eps(shape)
    y, grads = _run(backend, x, s, g, r, eps, dy)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    same = reference.adarn(x, s, g, r, eps)  # the same rounding points in the same dtype
    if backend == "torch":
        assert torch.equal(y, same)
    else:
        assert_close(y, same, dtype=dtype, what="y vs same-dtype reference")
    _check_all(y, grads, *_truth(x, s, g, r, eps, dy), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_wider_than_one_tile(backend, device, dtype):
    """D = 9000 > MAX_TILE_D: the Triton kernels' looped column path, per-sample scale and gate."""
    x, s, g, r = _inputs((2, 3, 9000), dtype, device, (True, True, True))
    dy = randn(x.shape, dtype, device)
    y, grads = _run(backend, x, s, g, r, 1e-6, dy)
    _check_all(y, grads, *_truth(x, s, g, r, 1e-6, dy), dtype)


def _per_sample(x, s, g, r, eps):
    """The definition of "scale/gate index x's first dim", written independently of the op: a loop over samples
    b, each using its own vector (or the one shared vector), composed of plain ops."""
    def pick(v, b):
        return v.reshape(-1, x.shape[-1])[b if v.dim() > 1 and v.shape[0] > 1 else 0]

    outs = []
    for b in range(x.shape[0]):
        xb = x[b]
        y = (xb * torch.rsqrt(xb.square().mean(-1, keepdim=True) + eps))
        if s is not None:
            y = y * (1 + pick(s, b))
        if g is not None:
            y = torch.tanh(pick(g, b)) * y
        if r is not None:
            y = r[b] + y
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,vec", [((2, 5, 24), (2, 1, 24)), ((2, 5, 24), (2, 24)), ((2, 5, 24), (24,)),
                                       ((2, 5, 24), (1, 1, 24)), ((3, 2, 4, 24), (3, 1, 1, 24)),
                                       ((3, 2, 4, 24), (3, 1, 24)), ((3, 2, 4, 24), (3, 24)), ((4, 24), (4, 24)),
                                       ((4, 24), (1, 24)), ((24,), (1, 24))],
                         ids=lambda v: "x".join(map(str, v)))
def test_vector_shapes(backend, device, shape, vec):
    """[B, 1, D], [B, D], [D] and a leading-1 broadcast mean the same thing for 2-D/3-D/4-D x: one vector per
    sample x[b] (or one for all), with grads of the vector's own shape."""
    x, s, g, r = _inputs(shape, torch.float32, device, (True, True, True), vec_shape=vec)
    dy = randn(shape, torch.float32, device)
    y, grads = _run(backend, x, s, g, r, 1e-6, dy)
    xs = x.reshape(1, *x.shape) if x.dim() == 1 else x  # a 1-D x is one sample of one token
    y_ref, grads_ref = _truth(xs, s, g, r.reshape(xs.shape), 1e-6, dy.reshape(xs.shape), fn=_per_sample)
    grads_ref[0] = grads_ref[0].reshape(x.shape)
    grads_ref[3] = grads_ref[3].reshape(x.shape)
    _check_all(y, grads, y_ref.reshape(x.shape), grads_ref, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layouts_and_grads(backend, device):
    """x a slice of a wider tensor, residual transposed, scale/gate the chunks of a [B, 4D] modulation (strided
    views), a stride-0 upstream grad from y.sum().backward(), and an x whose last dim is not unit-stride."""
    b, l, d = 2, 6, 24
    wide = randn((b, l, 40), torch.float16, device)
    x = wide[..., 5:5 + d]  # row stride 40
    r = randn((b, d, l), torch.float16, device).transpose(1, 2)  # token stride 1, feature stride l
    mod = randn((b, 4 * d), torch.float16, device, scale=0.5).view(b, 4, d)
    s, g = mod[:, 0:1], mod[:, 1:2]  # [B, 1, D] with sample stride 4D
    ins = [t.detach().requires_grad_(True) for t in (x, s, g, r)]
    with use_backend(backend):
        y = mmkernels.adarn(*ins)
        y.float().sum().backward()
    y_ref, grads_ref = _truth(x, s, g, r, 1e-6, torch.ones(x.shape, dtype=torch.float16, device=device))
    _check_all(y, [t.grad for t in ins], y_ref, grads_ref, torch.float16)

    xt = randn((b, d, l), torch.float32, device).transpose(1, 2)  # last-dim stride l
    st = randn((d, b), torch.float32, device).t()  # [B, D] with last-dim stride b
    with use_backend(backend):
        yt = mmkernels.adarn(xt, scale=st)
    assert_close(yt, reference.adarn(xt.double(), st.double()), dtype=torch.float32, what="transposed x")


def _official(x, scale, gate, residual, eps=1e-6):
    """LaVin-DiT's composition in x's dtype (specs §1.5, §1.11): apex FusedRMSNorm (fp32 statistics, no affine,
    rounded to x's dtype), then (1 + scale) * h, tanh(gate) * h and the residual add as separate torch ops."""
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _official_chain(h, scale, gate, residual)


def _official_chain(h, scale, gate, residual):
    if scale is not None:
        h = (1 + scale) * h
    if gate is not None:
        h = torch.tanh(gate) * h
    if residual is not None:
        h = residual + h
    return h


def _ulps(a, b):
    """|a - b| in units in the last place of 16-bit floats (sign-magnitude bits mapped to ordered integers)."""
    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_torch_backend_is_the_official_composition_bitwise(dtype, combo):
    x, s, g, r = _inputs((2, 64, 72), dtype, "cpu", combo)
    x = x * 3
    with use_backend("torch"):
        y = mmkernels.adarn(x, s, g, r)
    assert torch.equal(y, _official(x, s, g, r))


def _kernel_official_params():
    out = []
    if triton_interpreted():
        out.append(pytest.param("cpu", torch.float16, id="triton-cpu-fp16"))
    return out + [pytest.param("cuda", dt, id=f"triton-cuda-{str(dt)[6:]}", marks=[pytest.mark.gpu])
                  for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device,dtype", _kernel_official_params())
def test_triton_matches_the_official_composition(device, dtype):
    """The kernels round at the official composition's points: given the kernel's own normalized value, the
    composition reproduces y bitwise (so (1 + scale), the products, tanh and the residual add match exactly). The
    normalized value itself is within 1 ulp, rarely off (the fp32 sum of squares runs in another order).
    Measured here (fp16, interpreter): 18 of 632,640 normalized values (2.8e-5) differ, by 1 ulp."""
    shape = (2, 96, 2304) if device == "cuda" else (2, 48, 100)
    x, s, g, r = _inputs(shape, dtype, device, (True, True, True))
    x = x * 3
    with use_backend("triton"):
        n = mmkernels.adarn(x)
        y = mmkernels.adarn(x, s, g, r)
        y_pre = mmkernels.adarn(x, scale=s)
    u = _ulps(n, _official(x, None, None, None))
    assert u.max().item() <= 1 and (u > 0).float().mean().item() < 1e-3, (u.max().item(), (u > 0).sum().item())
    assert torch.equal(y, _official_chain(n, s, g, r))
    assert torch.equal(y_pre, _official_chain(n, s, None, None))


@triton.jit
def _tanh_test_kernel(X, Y, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + o, _tanh_portable(tl.load(X + o, mask=o < N, other=0.0)), mask=o < N)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu])])
def test_portable_tanh(device):
    """The interpreter's tanh (the GPU uses libdevice's): rounded to fp16 or bf16 it equals torch.tanh for every
    finite value of those types; in fp32 it is within a few ulp of the exact value, and handles +-inf and nan."""
    if device == "cpu" and not triton_interpreted():
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1")

    def run(v):
        v = v.to(device=device, dtype=torch.float32).contiguous()
        out = torch.empty_like(v)
        _tanh_test_kernel[(triton.cdiv(v.numel(), 8192),)](v, out, v.numel(), BLOCK=8192)
        return out.cpu()

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dt in (torch.float16, torch.bfloat16):
        v = bits.view(dt)
        v = v[torch.isfinite(v)]
        assert torch.equal(run(v).to(dt), torch.tanh(v)), dt
    x = torch.cat([randn((20000,), scale=3.0), torch.logspace(-30, 1.5, 2000), -torch.logspace(-30, 1.5, 2000)])
    exact = torch.tanh(x.double())
    rel = (run(x).double() - exact).abs() / exact.abs()
    assert rel.max().item() < 5e-7
    special = run(torch.tensor([float("inf"), float("-inf"), float("nan"), 30.0, -30.0]))
    assert special[[0, 1, 3, 4]].tolist() == [1.0, -1.0, 1.0, -1.0] and special[2].isnan()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grads_are_deterministic(backend, device):
    """dscale/dgate come from fixed-order reductions of per-program partials: two runs agree bitwise."""
    x, s, g, r = _inputs((2, 37, 72), torch.float32, device, (True, True, True))
    dy = randn(x.shape, torch.float32, device)
    first = _run(backend, x, s, g, r, 1e-6, dy)[1]
    second = _run(backend, x, s, g, r, 1e-6, dy)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    with use_backend(backend):
        x = torch.empty(0, 5, 16, device=device, requires_grad=True)
        y = mmkernels.adarn(x, torch.ones(0, 1, 16, device=device), torch.ones(16, device=device),
                            torch.zeros(0, 5, 16, device=device))
        assert y.shape == (0, 5, 16)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert mmkernels.adarn(torch.empty(3, 0, device=device)).shape == (3, 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_is_fresh(backend, device):
    """With nothing to modulate and fp32 the output still never aliases x or residual."""
    x = randn((3, 8), torch.float32, device)
    with use_backend(backend):
        y = mmkernels.adarn(x)
    assert y.data_ptr() != x.data_ptr()
    assert_close(y, reference.adarn(x.double()), dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x = randn((2, 5, 40), torch.float32, device)
    v = randn((2, 40), torch.float32, device, scale=0.5)
    r = randn((2, 5, 40), torch.float32, device)
    fwd, bwd = torch.ops.mmkernels.adarn_fwd.default, torch.ops.mmkernels.adarn_bwd.default
    for s, g, res in ((v, v.flip(0), r), (None, None, None), (v, None, None), (None, v[:1], r)):
        torch.library.opcheck(fwd, (x, s, g, res, 1e-6, backend))
    dy = randn((2, 5, 40), torch.float32, device)
    for s, g in ((v, v.flip(0)), (None, None), (v[:1], None), (None, v)):
        rstd = reference.forward(x, s, g, None, 1e-6)[1]
        torch.library.opcheck(bwd, (dy, x, s, g, rstd, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, s, g, a):
        h = mmkernels.adarn(x, scale=s)  # pre-norm
        return mmkernels.adarn(h * a, gate=g, residual=x).square().mean()  # post-norm + gated residual

    inputs = (randn((2, 6, 48), torch.float32, device), randn((2, 1, 48), torch.float32, device, scale=0.5),
              randn((2, 48), torch.float32, device), randn((2, 6, 48), torch.float32, device))
    check_compiled(block, inputs, backend, compiler)


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
            mmkernels.adarn([1.0, 2.0])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="'x' must be a floating-point tensor"):
            mmkernels.adarn(torch.ones(2, 3, dtype=torch.int32))

    def test_scalar(self):
        with pytest.raises(ValueError, match="'x' must have at least 1 dims"):
            mmkernels.adarn(torch.tensor(1.0))

    @pytest.mark.parametrize("name", ["scale", "gate"])
    def test_vector_width(self, name):
        with pytest.raises(ValueError, match=rf"'{name}' must have last dim D = 8"):
            mmkernels.adarn(torch.randn(2, 3, 8), **{name: torch.randn(2, 1, 7)})

    @pytest.mark.parametrize("shape", [(3, 1, 8), (2, 2, 8), (2, 1, 1, 1, 8)])
    def test_vector_shape(self, shape):
        with pytest.raises(ValueError, match=r"'scale' must have shape \[D\], \[B, D\] or \[B, 1, \.\.\., 1, D\]"):
            mmkernels.adarn(torch.randn(2, 3, 8), scale=torch.randn(shape))

    def test_vector_dims_for_2d_x(self):
        with pytest.raises(ValueError, match=r"at most 2 dims"):
            mmkernels.adarn(torch.randn(2, 8), gate=torch.randn(2, 1, 8))

    def test_vector_dtype(self):
        with pytest.raises(TypeError, match=r"'gate' must have x's dtype torch.float32, got torch.float16"):
            mmkernels.adarn(torch.randn(2, 3, 8), gate=torch.randn(2, 1, 8, dtype=torch.float16))

    def test_vector_not_a_tensor(self):
        with pytest.raises(TypeError, match="'scale' must be a torch.Tensor"):
            mmkernels.adarn(torch.randn(2, 3, 8), scale=1.0)

    def test_vector_device(self):
        with pytest.raises(ValueError, match="'scale' is on meta but 'x' is on cpu"):
            mmkernels.adarn(torch.randn(2, 3, 8), scale=torch.randn(2, 1, 8, device="meta"))

    def test_residual_shape(self):
        with pytest.raises(ValueError, match=r"'residual' must have x's shape \(2, 3, 8\)"):
            mmkernels.adarn(torch.randn(2, 3, 8), residual=torch.randn(2, 1, 8))

    def test_residual_dtype(self):
        with pytest.raises(TypeError, match="'residual' must have x's dtype"):
            mmkernels.adarn(torch.randn(2, 3, 8), residual=torch.randn(2, 3, 8, dtype=torch.float64))

    def test_residual_device(self):
        with pytest.raises(ValueError, match="'residual' is on meta"):
            mmkernels.adarn(torch.randn(2, 3, 8), residual=torch.randn(2, 3, 8, device="meta"))

    @pytest.mark.parametrize("eps", [-1e-6, float("nan"), "1e-6"])
    def test_eps(self, eps):
        with pytest.raises((ValueError, TypeError), match="'eps'"):
            mmkernels.adarn(torch.randn(2, 8), eps=eps)

    def test_no_cuda_backend(self):
        with use_backend("cuda"), pytest.raises(BackendError, match="there is no 'cuda' backend"):
            mmkernels.adarn(torch.randn(2, 8))

    def test_triton_backend_rejects_fp64(self):
        with use_backend("triton"), pytest.raises(BackendError, match="float64"):
            mmkernels.adarn(torch.randn(2, 8, dtype=torch.float64))

    @pytest.mark.skipif(not triton_interpreted(),
                        reason="the bf16 limit is the Triton CPU interpreter's; on a GPU bf16 runs")
    def test_triton_interpreter_rejects_bf16(self):
        with use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            mmkernels.adarn(torch.randn(2, 8, dtype=torch.bfloat16))
