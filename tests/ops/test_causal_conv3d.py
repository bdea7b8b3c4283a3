"""mmkernels.causal_conv3d: torch and Triton backends against an official-style fp64 truth, forward and backward
(dx, dW, db, dcache); layouts; streaming with the cache; opcheck; compile; bad input."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.ops.causal_conv3d import reference
from mmkernels.testing import assert_close, backend_devices, dtypes_for, randn, triton_interpreted
from tests.ops.common import check_compiled

OP = "causal_conv3d"


def _pairs():
    # causal_conv3d has no cuda (mmkernels._C) backend: torch and triton only.
    return [(b, d) for b, d in backend_devices() if b != "cuda"]


def _backend_params():
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else []) for b, d in _pairs()]


def _backend_dtype_params():
    return [pytest.param(b, d, dt, id=f"{b}-{d}-{str(dt).replace('torch.', '')}",
                         marks=[pytest.mark.gpu] if d == "cuda" else [])
            for b, d in _pairs() for dt in dtypes_for(b, d)]


def official(x, weight, bias=None, stride=1, time_pad="replicate", cache=None):
    """The official module's arithmetic (specs/lavin_dit.md §2.2), written independently of the op: frame 0
    concatenated kt-1 times in front (or zeros, or the cache), F.pad zeros by k//2 on each side of H and W, conv3d
    with padding 0 and stride (stride, 1, 1)."""
    kt, kh, kw = weight.shape[2:]
    if cache is not None:
        front = [cache]
    elif time_pad == "replicate":
        front = [x[:, :, :1]] * (kt - 1)
    else:
        front = [torch.zeros_like(x[:, :, :1])] * (kt - 1)
    xp = torch.cat(front + [x], dim=2)
    xp = F.pad(xp, (kw // 2, kw // 2, kh // 2, kh // 2))
    return F.conv3d(xp, weight, bias, stride=(stride, 1, 1))


def _truth(x, w, b, cache, stride, time_pad, dy):
    """y and the grads of x, w, b, cache by fp64 autograd through the official-style arithmetic."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, cache)]
    y = official(leaves[0], leaves[1], leaves[2], stride, time_pad, leaves[3])
    y.backward(dy.double())
    return y, [t.grad if t is not None else None for t in leaves]


def _run(backend, x, w, b, cache, stride, time_pad, dy):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b, cache)]
    with use_backend(backend):
        y = mmkernels.causal_conv3d(leaves[0], leaves[1], leaves[2], stride=stride, time_pad=time_pad,
                                    cache=leaves[3])
        y.backward(dy)
    return y, [t.grad if t is not None else None for t in leaves]


def _check(backend, x, w, b, cache, stride, time_pad, dtype, dy=None):
    B, Cout, T_out, Ho, Wo = reference.output_shape(x, w, stride)
    dy = randn((B, Cout, T_out, Ho, Wo), dtype, x.device) if dy is None else dy
    y, grads = _run(backend, x, w, b, cache, stride, time_pad, dy)
    y_ref, grads_ref = _truth(x, w, b, cache, stride, time_pad, dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype=dtype, what="y")
    for name, g, g_ref, t in zip(("dx", "dweight", "dbias", "dcache"), grads, grads_ref, (x, w, b, cache)):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, g_ref, dtype=dtype, what=name)
    return y, grads


# (kernel (kt, kh, kw), stride, time_pad, with cache, with bias, T): every kernel size of the brief, odd T and T=1,
# strides 1 and 2 (with T_out rounding down), both paddings, caches (one with T < kt-1), an even spatial kernel
# (H and W grow by one, as in the official module).
CONFIGS = [
    ((3, 3, 3), 1, "replicate", False, True, 5),
    ((3, 3, 3), 2, "replicate", False, False, 5),
    ((3, 3, 3), 1, "zeros", True, True, 3),
    ((3, 3, 3), 2, "replicate", True, True, 1),
    ((1, 1, 1), 1, "replicate", False, True, 3),
    ((1, 3, 3), 2, "zeros", False, True, 4),
    ((3, 1, 1), 1, "replicate", False, False, 1),
    ((3, 1, 1), 2, "zeros", False, True, 6),
    ((2, 3, 3), 1, "replicate", False, True, 3),
    ((2, 3, 3), 2, "replicate", True, False, 4),
    ((3, 2, 2), 1, "zeros", False, True, 2),
]


def _cfg_id(cfg):
    k, s, tp, cache, bias, T = cfg
    return f"k{''.join(map(str, k))}-s{s}-{tp[:3]}" + ("-cache" if cache else "") + ("-bias" if bias else "") + f"-T{T}"


def _inputs(cfg, dtype, device, B=2, Cin=5, Cout=6, H=4, W=5):
    (kt, kh, kw), _, _, with_cache, with_bias, T = cfg
    x = randn((B, Cin, T, H, W), dtype, device)
    w = randn((Cout, Cin, kt, kh, kw), dtype, device, scale=0.3)
    b = randn((Cout,), dtype, device) if with_bias else None
    cache = randn((B, Cin, kt - 1, H, W), dtype, device) if with_cache else None
    return x, w, b, cache


@pytest.mark.parametrize("backend,device,dtype", _backend_dtype_params())
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_matches_official(backend, device, dtype, cfg):
    x, w, b, cache = _inputs(cfg, dtype, device)
    y, _ = _check(backend, x, w, b, cache, cfg[1], cfg[2], dtype)
    assert y.is_contiguous()
    if dtype == torch.float32:  # same rounding points as the reference backend
        assert_close(y, reference.forward(x, w, b, cache, cfg[1], cfg[2] == "replicate"), what="y vs reference")


@pytest.mark.parametrize("backend,device", _backend_params())
def test_layouts(backend, device):
    """channels_last_3d x (y and dx stay channels-last), a non-contiguous view of a wider tensor, and the stride-0
    upstream grad of y.sum().backward()."""
    dt = torch.float16
    x = randn((2, 6, 3, 4, 5), dt, device).contiguous(memory_format=torch.channels_last_3d)
    w = randn((7, 6, 3, 3, 3), dt, device, scale=0.3)
    b = randn((7,), dt, device)
    y, (dx, *_) = _check(backend, x, w, b, None, 1, "replicate", dt)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last_3d)

    big = randn((2, 9, 4, 6, 11), torch.float32, device)
    xv = big[:, 2:8, 1:, 1:5, ::2]  # every stride differs from the contiguous one
    assert not xv.is_contiguous() and not xv.is_contiguous(memory_format=torch.channels_last_3d)
    wv = randn((5, 6, 3, 3, 3), torch.float32, device, scale=0.3)
    cache = randn((2, 6, 5, 4, 6), torch.float32, device)[:, :, 1:3]  # a strided cache
    y, _ = _check(backend, xv, wv, None, cache, 1, "replicate", torch.float32)
    assert y.is_contiguous()

    xr = xv.detach().requires_grad_(True)
    with use_backend(backend):
        mmkernels.causal_conv3d(xr, wv, time_pad="zeros").sum().backward()
    _, (dx_ref, *_) = _truth(xv, wv, None, None, 1, "zeros",
                             torch.ones(reference.output_shape(xv, wv, 1), device=device))
    assert_close(xr.grad, dx_ref, dtype=torch.float32, what="dx from a stride-0 grad")


@pytest.mark.parametrize("cin,cout,blocks", [(20, 18, "16,16,16,4,1"),
                                             (32, 16, "32,16,16,4,1;16,32,16,4,1;16,16,32,4,1")],
                         ids=["flat", "aligned"])
@pytest.mark.skipif(not triton_interpreted(), reason="forces interpreter block sizes (TRITON_INTERPRET=1)")
def test_triton_multi_tile(monkeypatch, cin, cout, blocks):
    """Small forced blocks: several M, N and K tiles with tails (H*W = 21, Cout = 18, Cin = 20: the flattened-K
    path), the tap-aligned path (Cin = 32, Cout = 16: whole K blocks per tap, and dW's aligned N), several dW
    splits; dW is deterministic (a second run is bitwise equal)."""
    monkeypatch.setenv("MMKERNELS_CONV3D_BLOCKS", blocks)
    x, w, b, _ = _inputs(((3, 3, 3), 2, "replicate", False, True, 3), torch.float32, "cpu", B=1, Cin=cin,
                         Cout=cout, H=3, W=7)
    dy = randn(reference.output_shape(x, w, 2), torch.float32)
    _, grads = _check("triton", x, w, b, None, 2, "replicate", torch.float32, dy=dy)
    if cin == 32:
        again = torch.ops.mmkernels.causal_conv3d_bwd(dy, x, w, None, 2, True, [False, True, False, False], "triton")
        assert torch.equal(again[1], grads[1])


def test_bad_block_env(monkeypatch):
    from mmkernels.ops.causal_conv3d import triton as conv_triton

    for bad in ("128,128,64,8", "100,128,64,8,3", "a,b,c,d,e", "16,16,16,4,1;16,16,16,4,1"):
        monkeypatch.setenv("MMKERNELS_CONV3D_BLOCKS", bad)
        with pytest.raises(ValueError, match="MMKERNELS_CONV3D_BLOCKS"):
            conv_triton.env_blocks()
    monkeypatch.setenv("MMKERNELS_CONV3D_BLOCKS", ";64,64,32,4,2;")
    assert conv_triton.env_blocks() == {"dx": (64, 64, 32, 4, 2)}


def _stream(backend, x, w, b, sizes, stride, time_pad):
    """Chunk by chunk with the cache: the concatenated outputs and the caches handed on."""
    ys, caches, cache, t0 = [], [], None, 0
    with use_backend(backend):
        for i, n in enumerate(sizes):
            last = i == len(sizes) - 1
            out = mmkernels.causal_conv3d(x[:, :, t0:t0 + n], w, b, stride=stride, time_pad=time_pad, cache=cache,
                                          return_cache=not last)
            if last:
                ys.append(out)
            else:
                ys.append(out[0])
                cache = out[1]
                caches.append(cache)
            t0 += n
    return torch.cat(ys, dim=2), caches


@pytest.mark.parametrize("backend,device,dtype", _backend_dtype_params())
@pytest.mark.parametrize("stride,sizes,time_pad", [(1, (1, 2, 5), "replicate"), (1, (5, 1, 2), "zeros"),
                                                   (2, (2, 4, 3), "replicate")], ids=["s1-1_2_5", "s1-5_1_2",
                                                                                      "s2-2_4_3"])
def test_streaming_equals_whole_video(backend, device, dtype, stride, sizes, time_pad):
    """Chunks of 1, 2, 5 frames (a chunk shorter than kt-1 included) with the cache give the whole-video output:
    bitwise in fp32, within tolerance in fp16. With stride 2 every chunk but the last has an even length."""
    T = sum(sizes)
    x = randn((2, 4, T, 4, 5), dtype, device)
    w = randn((6, 4, 3, 3, 3), dtype, device, scale=0.3)
    b = randn((6,), dtype, device)
    with use_backend(backend):
        whole = mmkernels.causal_conv3d(x, w, b, stride=stride, time_pad=time_pad)
    chunked, caches = _stream(backend, x, w, b, sizes, stride, time_pad)
    assert chunked.shape == whole.shape
    if dtype == torch.float32:
        assert torch.equal(chunked, whole)
    else:
        assert_close(chunked, whole, dtype=dtype, what="chunked vs whole")
    # Each cache holds the last kt-1 frames of [front ; everything so far].
    front = x[:, :, :1].expand(-1, -1, 2, -1, -1) if time_pad == "replicate" else torch.zeros_like(x[:, :, :2])
    padded = torch.cat([front, x], dim=2)
    t = 0
    for n, cache in zip(sizes, caches):
        t += n
        assert torch.equal(cache, padded[:, :, t:t + 2])


@pytest.mark.parametrize("backend,device", _backend_params())
def test_cache_without_grad(backend, device):
    """A cache that needs no gradient (streaming inference): dx and dW only, and frame 0 gets only its own taps."""
    x, w, b, cache = _inputs(((3, 3, 3), 1, "replicate", True, True, 3), torch.float32, device)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dy = randn(reference.output_shape(x, w, 1), torch.float32, device)
    with use_backend(backend):
        mmkernels.causal_conv3d(xr, wr, b, cache=cache).backward(dy)
    _, (dx_ref, dw_ref, _, _) = _truth(x, w, b, cache, 1, "replicate", dy)
    assert_close(xr.grad, dx_ref, dtype=torch.float32, what="dx")
    assert_close(wr.grad, dw_ref, dtype=torch.float32, what="dweight")


@pytest.mark.parametrize("backend,device", _backend_params())
def test_return_cache(backend, device):
    """new_cache is a fresh tensor with the right frames (T >= kt-1, T < kt-1, kt = 1) and carries gradients."""
    x = randn((1, 3, 4, 2, 3), torch.float32, device)
    w3 = randn((2, 3, 3, 1, 1), torch.float32, device)
    with use_backend(backend):
        _, c = mmkernels.causal_conv3d(x, w3, return_cache=True)
        assert torch.equal(c, x[:, :, 2:]) and c.data_ptr() != x[:, :, 2:].data_ptr()
        _, c1 = mmkernels.causal_conv3d(x[:, :, :1], w3, time_pad="zeros", return_cache=True)
        assert torch.equal(c1, torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :1]], dim=2))
        prev = randn((1, 3, 2, 2, 3), torch.float32, device)
        _, c2 = mmkernels.causal_conv3d(x[:, :, 1:2], w3, cache=prev, return_cache=True)
        assert torch.equal(c2, torch.cat([prev[:, :, 1:], x[:, :, 1:2]], dim=2))
        y1, c3 = mmkernels.causal_conv3d(x, randn((2, 3, 1, 3, 3), torch.float32, device), return_cache=True)
        assert c3.shape == (1, 3, 0, 2, 3)

        xr = x[:, :, :1].clone().requires_grad_(True)
        _, c4 = mmkernels.causal_conv3d(xr, w3, return_cache=True)  # replicate: both cache frames are frame 0
        c4.sum().backward()
    assert torch.equal(xr.grad, torch.full_like(xr, 2.0))


def test_stride_chunk_phase_is_checked():
    x, w = randn((1, 2, 3, 2, 2)), randn((2, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="divisible by the stride"):
        mmkernels.causal_conv3d(x, w, stride=2, return_cache=True)
    y, c = mmkernels.causal_conv3d(x[:, :, :2], w, stride=2, return_cache=True)  # aligned chunks are fine
    assert y.shape[2] == 1 and c.shape[2] == 2
    assert mmkernels.causal_conv3d(x, w, stride=2).shape[2] == 2  # the last chunk may have any length


@pytest.mark.parametrize("backend,device", _backend_params())
def test_empty(backend, device):
    """Empty batch (forward and backward); no frames with a cache or zero padding."""
    w = randn((4, 3, 3, 3, 3), torch.float32, device)
    b = randn((4,), torch.float32, device)
    x = torch.empty((0, 3, 5, 4, 4), device=device, requires_grad=True)
    wr = w.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True)
    with use_backend(backend):
        y = mmkernels.causal_conv3d(x, wr, br)
        assert y.shape == (0, 4, 5, 4, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(wr.grad, torch.zeros_like(w))
        assert torch.equal(br.grad, torch.zeros_like(b))
        cache = randn((2, 3, 2, 4, 4), torch.float32, device)
        y0, c0 = mmkernels.causal_conv3d(torch.empty((2, 3, 0, 4, 4), device=device), w, cache=cache,
                                         return_cache=True)
        assert y0.shape == (2, 4, 0, 4, 4) and torch.equal(c0, cache) and c0.data_ptr() != cache.data_ptr()
        y1 = mmkernels.causal_conv3d(torch.empty((2, 3, 0, 4, 4), device=device), w, time_pad="zeros")
        assert y1.shape == (2, 4, 0, 4, 4)


def test_official_module_equivalence():
    """An nn.Module written like the official STVAECausalConv3d (replicate by cat of frame 0, F.pad zeros,
    nn.Conv3d), fp32 on the CPU: same output as the op on both CPU paths, and for T = 1 the same as a 2-D conv
    with the temporal taps summed (the spec's consequence, up to rounding)."""

    class OfficialCausalConv3d(nn.Module):
        def __init__(self, cin, cout, k):
            super().__init__()
            self.k = k
            self.conv = nn.Conv3d(cin, cout, (k, k, k), stride=(1, 1, 1), padding=0, bias=True)

        def forward(self, x):
            x = torch.cat([x[:, :, :1]] * (self.k - 1) + [x], dim=2)
            x = F.pad(x, (self.k // 2,) * 4)
            return self.conv(x)

    torch.manual_seed(1)
    m = OfficialCausalConv3d(8, 16, 3)
    x = randn((2, 8, 5, 6, 7))
    expected = m(x)
    for backend in [b for b, d in _pairs() if d == "cpu"]:
        with use_backend(backend):
            got = mmkernels.causal_conv3d(x, m.conv.weight, m.conv.bias)
        assert_close(got, expected, what=f"{backend} vs official module")
    x1 = x[:, :, :1]
    conv2d = F.conv2d(x1[:, :, 0], m.conv.weight.sum(dim=2), m.conv.bias, padding=1)
    assert_close(mmkernels.causal_conv3d(x1, m.conv.weight, m.conv.bias)[:, :, 0], conv2d, what="T=1 as 2-D conv")


def test_fp64_and_autocast_on_torch_backend():
    """fp64 inputs run in fp64 (a ground truth); under CPU autocast the op keeps its own precision."""
    cfg = ((3, 3, 3), 1, "replicate", True, True, 3)
    x, w, b, cache = _inputs(cfg, torch.float64, "cpu")
    with use_backend("torch"):
        y = mmkernels.causal_conv3d(x, w, b, cache=cache)
    assert y.dtype == torch.float64
    assert_close(y, official(x, w, b, cache=cache), tol=1e-12, what="fp64")
    x, w, b, _ = _inputs(cfg, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mmkernels.causal_conv3d(x, w, b)
    assert y.dtype == torch.float32
    assert_close(y, official(x.double(), w.double(), b.double()), what="under autocast")


@pytest.mark.parametrize("backend,device", _backend_params())
def test_opcheck(backend, device):
    x = randn((2, 3, 3, 4, 5), torch.float32, device)
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    w = randn((4, 3, 3, 3, 3), torch.float32, device)
    b = randn((4,), torch.float32, device)
    cache = randn((2, 3, 2, 4, 5), torch.float32, device)
    fwd = torch.ops.mmkernels.causal_conv3d_fwd.default
    torch.library.opcheck(fwd, (x, w, b, None, 1, True, backend))
    torch.library.opcheck(fwd, (xl, w, None, cache, 2, False, backend))
    dy = randn((2, 4, 3, 4, 5), torch.float32, device)
    bwd = torch.ops.mmkernels.causal_conv3d_bwd.default
    torch.library.opcheck(bwd, (dy, x, w, cache, 1, True, [True, True, True, True], backend))
    torch.library.opcheck(bwd, (dy, xl, w, None, 1, True, [True, False, True, False], backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", _backend_params())
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, w, b, cache):
        y, new_cache = mmkernels.causal_conv3d(x * 2.0, w, b, cache=cache, return_cache=True)
        return y.square().mean() + new_cache.sum()

    inputs = (randn((1, 3, 3, 3, 4), torch.float32, device), randn((4, 3, 3, 3, 3), torch.float32, device),
              randn((4,), torch.float32, device), randn((1, 3, 2, 3, 4), torch.float32, device))
    check_compiled(block, inputs, backend, compiler)


class TestBadInput:
    x = randn((1, 3, 4, 5, 5))
    w = randn((2, 3, 3, 3, 3))

    def _call(self, *args, **kwargs):
        return mmkernels.causal_conv3d(*args, **kwargs)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
            self._call([1.0], self.w)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="'x' must be a floating-point tensor"):
            self._call(torch.ones(1, 3, 4, 5, 5, dtype=torch.int32), self.w)

    def test_x_ndim(self):
        with pytest.raises(ValueError, match="'x' must have 5 dims"):
            self._call(torch.randn(3, 4, 5, 5), self.w)

    def test_weight_ndim(self):
        with pytest.raises(ValueError, match="'weight' must have 5 dims"):
            self._call(self.x, torch.randn(2, 3, 3, 3))

    def test_cin_mismatch(self):
        with pytest.raises(ValueError, match="'weight' has 4 input channels"):
            self._call(self.x, torch.randn(2, 4, 3, 3, 3))

    def test_empty_kernel_or_channels(self):
        with pytest.raises(ValueError, match="'weight' must be"):
            self._call(self.x, torch.randn(0, 3, 3, 3, 3))
        with pytest.raises(ValueError, match="'x' must have Cin, H and W >= 1"):
            self._call(torch.randn(1, 3, 4, 0, 5), self.w)

    def test_bias(self):
        with pytest.raises(ValueError, match=r"'bias' must have shape \[2\]"):
            self._call(self.x, self.w, torch.randn(3))

    def test_dtype_mismatch(self):
        for kw in (dict(weight=self.w.half()), dict(bias=torch.randn(2, dtype=torch.float64)),
                   dict(cache=torch.randn(1, 3, 2, 5, 5).half())):
            name = next(iter(kw))
            args = dict(x=self.x, weight=self.w)
            args.update(kw)
            with pytest.raises(TypeError, match=f"'{name}' has dtype"):
                self._call(args.pop("x"), args.pop("weight"), **args)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="'weight' is on meta but 'x' is on cpu"):
            self._call(self.x, self.w.to("meta"))
        with pytest.raises(ValueError, match="'cache' is on meta"):
            self._call(self.x, self.w, cache=torch.empty(1, 3, 2, 5, 5, device="meta"))

    def test_cache_shape(self):
        with pytest.raises(ValueError, match=r"'cache' must have shape \[B, Cin, kt-1, H, W\] = \[1, 3, 2, 5, 5\]"):
            self._call(self.x, self.w, cache=torch.randn(1, 3, 3, 5, 5))

    @pytest.mark.parametrize("stride", [0, -1, 1.5, True, "2"])
    def test_stride(self, stride):
        with pytest.raises(ValueError, match="'stride' must be an int >= 1"):
            self._call(self.x, self.w, stride=stride)

    def test_time_pad(self):
        with pytest.raises(ValueError, match="'time_pad' must be one of"):
            self._call(self.x, self.w, time_pad="reflect")

    def test_return_cache(self):
        with pytest.raises(TypeError, match="'return_cache' must be a bool"):
            self._call(self.x, self.w, return_cache=1)

    def test_no_frame_to_replicate(self):
        with pytest.raises(ValueError, match="no frame 0 to replicate"):
            self._call(torch.randn(1, 3, 0, 5, 5), self.w)

    def test_triton_rejects_fp64(self):
        with use_backend("triton"), pytest.raises(BackendError, match="float64"):
            self._call(self.x.double(), self.w.double())

    def test_no_cuda_backend(self):
        with use_backend("cuda"), pytest.raises(BackendError, match="no 'cuda' backend"):
            self._call(self.x, self.w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
def test_gpu_tensor_core_sizes(dtype, layout):
    """Triton on the GPU at channel counts that take the tap-aligned, tensor-core path (C = 64, 128 -> 64) and a
    narrow conv_in (Cin = 3), against the fp64 official-style truth."""
    for cin, cout, T in ((64, 128, 5), (128, 64, 3), (3, 64, 5)):
        x = randn((2, cin, T, 20, 24), dtype, "cuda")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        w = randn((cout, cin, 3, 3, 3), dtype, "cuda", scale=(cin * 27) ** -0.5)
        b = randn((cout,), dtype, "cuda")
        _check("triton", x, w, b, None, 1, "replicate", dtype)
