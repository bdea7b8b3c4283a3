"""mmkernels.rms_norm: every backend against the reference, forward and backward; opcheck; compile; bad input."""

import pytest
import torch

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.ops.rms_norm import reference
from mmkernels.testing import assert_close, randn, triton_interpreted
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

# Leading shapes x widths: widths around tile edges (1, 7, 72, 300, 576, 2304) and one wider than a single Triton
# tile (9000 > 8192: the looped path), plus widths that take the CUDA kernels' mid-width and streaming paths
# (20000, 100000). Leading dims are not multiples of any block size.
SHAPES = [(3, 1), (5, 7), (2, 3, 72), (37, 300), (1, 576), (4, 2304), (3, 9000), (2, 20000), (2, 100000)]


def _eps(shape):
    # At width 1, y = x/|x| and its gradient exists only through eps; a large eps keeps dx well-conditioned.
    return 0.5 if shape[-1] == 1 else 1e-6


def _truth(x, w, eps, dy):
    """y, dx, dw by autograd through the reference in fp64: independent of every backend's closed-form backward."""
    xd = x.detach().double().requires_grad_(True)
    wd = w.detach().double().requires_grad_(True) if w is not None else None
    y = reference.rms_norm(xd, wd, eps)
    y.backward(dy.double())
    return y, xd.grad, (wd.grad if wd is not None else None)


def _run(backend, x, w, eps, dy):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True) if w is not None else None
    with use_backend(backend):
        y = mmkernels.rms_norm(x, w, eps)
        y.backward(dy)
    return y, x.grad, (w.grad if w is not None else None)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "noweight"])
def test_matches_reference(backend, device, dtype, shape, affine):
    x = randn(shape, dtype, device)
    w = randn(shape[-1:], dtype, device, shift=1.0) if affine else None
    dy = randn(shape, dtype, device)
    eps = _eps(shape)
    y, dx, dw = _run(backend, x, w, eps, dy)
    y_ref, dx_ref, dw_ref = _truth(x, w, eps, dy)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    # The forward also matches the reference in the same dtype (same rounding points).
    assert_close(y, reference.rms_norm(x, w, eps), dtype=dtype, what="y vs same-dtype reference")
    assert_close(y, y_ref, dtype=dtype, what="y")
    assert_close(dx, dx_ref, dtype=dtype, what="dx")
    if affine:
        assert dw.dtype == dtype
        assert_close(dw, dw_ref, dtype=dtype, what="dw")


@pytest.mark.parametrize("backend,device", backend_params())
def test_layouts_and_grads(backend, device):
    """Row-strided input (a slice of a wider projection), a transposed input, a stride-0 upstream grad from
    y.sum().backward(), fp32 weight with fp16 x, and eps that matters."""
    wide = randn((6, 40), torch.float16, device)
    x = wide[:, 5:29]  # row stride 40, width 24
    w = randn((24,), torch.float32, device, shift=1.0)
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    with use_backend(backend):
        y = mmkernels.rms_norm(xr, wr, eps=0.5)
        y.float().sum().backward()
    y_ref, dx_ref, dw_ref = _truth(x, w, 0.5, torch.ones_like(x))
    assert_close(y, y_ref, dtype=torch.float16, what="y")
    assert_close(xr.grad, dx_ref, dtype=torch.float16, what="dx")
    assert wr.grad.dtype == torch.float32
    assert_close(wr.grad, dw_ref, dtype=torch.float16, what="dw (fp32 weight)")

    xt = randn((24, 9), torch.float32, device).t()  # column stride 9
    with use_backend(backend):
        yt = mmkernels.rms_norm(xt)
    assert_close(yt, reference.rms_norm(xt.double()), dtype=torch.float32, what="transposed x")


def test_apex_rounding_semantics():
    """The normalized value is rounded to x's dtype before the weight multiply (two roundings, as apex does)."""
    x = randn((64, 96), torch.bfloat16)
    w = randn((96,), torch.bfloat16, shift=1.0)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    expected = (normed.float() * w.float()).to(torch.bfloat16)
    with use_backend("torch"):
        assert torch.equal(mmkernels.rms_norm(x, w), expected)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_width_one(backend, device):
    with use_backend(backend):
        e = mmkernels.rms_norm(torch.empty(0, 16, device=device), torch.ones(16, device=device))
        assert e.shape == (0, 16)
        x = randn((5, 1), torch.float32, device)
        y = mmkernels.rms_norm(x, eps=0.0)
    # Width 1: x / |x|.
    assert torch.allclose(y.cpu(), torch.sign(x.cpu()), atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    x = randn((3, 5, 40), torch.float32, device)
    w = randn((40,), torch.float32, device)
    torch.library.opcheck(torch.ops.mmkernels.rms_norm_fwd.default, (x, w, 1e-6, backend))
    torch.library.opcheck(torch.ops.mmkernels.rms_norm_fwd.default, (x, None, 1e-5, backend))
    dy = randn((3, 5, 40), torch.float32, device)
    rstd = reference.forward(x, w, 1e-6)[1]
    torch.library.opcheck(torch.ops.mmkernels.rms_norm_bwd.default, (dy, x, w, rstd, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, w):
        return mmkernels.rms_norm(x * 2.0, w).sum(dim=-1).square().mean()

    check_compiled(block, (randn((4, 48), torch.float32, device), randn((48,), torch.float32, device, shift=1.0)),
                   backend, compiler)


def test_backend_is_passed_into_the_compiled_graph():
    """use_backend around a compiled call is honoured (dynamo guards on it), and a bad choice raises inside."""
    compiled = torch.compile(lambda x: mmkernels.rms_norm(x), fullgraph=True, backend="aot_eager")
    x = randn((2, 8), torch.float32)
    with use_backend("torch"):
        compiled(x)
    with use_backend("cuda"), pytest.raises(BackendError, match="cuda"):
        compiled(x)


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
            mmkernels.rms_norm([1.0, 2.0])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="'x' must be a floating-point tensor"):
            mmkernels.rms_norm(torch.ones(2, 3, dtype=torch.int32))

    def test_scalar(self):
        with pytest.raises(ValueError, match="at least 1 dims"):
            mmkernels.rms_norm(torch.tensor(1.0))

    def test_weight_width(self):
        with pytest.raises(ValueError, match=r"'weight' must have shape \[8\]"):
            mmkernels.rms_norm(torch.randn(2, 8), torch.randn(7))

    def test_weight_rank(self):
        with pytest.raises(ValueError, match="'weight' must have 1 dims"):
            mmkernels.rms_norm(torch.randn(2, 8), torch.randn(1, 8))

    def test_weight_dtype(self):
        with pytest.raises(TypeError, match="'weight' must be a floating-point"):
            mmkernels.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.int64))

    def test_devices(self):
        with pytest.raises(ValueError, match="'weight' is on meta but 'x' is on cpu"):
            mmkernels.rms_norm(torch.randn(2, 8), torch.randn(8, device="meta"))

    @pytest.mark.parametrize("eps", [-1e-6, float("nan"), "1e-6"])
    def test_eps(self, eps):
        with pytest.raises((ValueError, TypeError), match="'eps'"):
            mmkernels.rms_norm(torch.randn(2, 8), eps=eps)

    def test_cuda_backend_on_cpu_tensors(self):
        with use_backend("cuda"), pytest.raises(BackendError, match="backend 'cuda' was requested"):
            mmkernels.rms_norm(torch.randn(2, 8))

    def test_triton_backend_rejects_fp64(self):
        with use_backend("triton"), pytest.raises(BackendError, match="float64"):
            mmkernels.rms_norm(torch.randn(2, 8, dtype=torch.float64))

    @pytest.mark.skipif(not triton_interpreted(),
                        reason="the bf16 limit is the Triton CPU interpreter's; on a GPU bf16 runs")
    def test_triton_interpreter_rejects_bf16(self):
        with use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            mmkernels.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16))

