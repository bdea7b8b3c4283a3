"""mmkernels.causal_conv3d: every backend against an official-style fp64 truth, forward and backward (dx, dW, db,
dcache); layouts; streaming with the cache; opcheck; compile; bad input; both CUDA forward kernels."""

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
    return backend_devices()


def _backend_params():
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else []) for b, d in _pairs()]


def _backend_dtype_params():
    # The cuda backend's kernels are fp16/bf16 (its supports() leaves fp32 to Triton): its fp32 params are dropped.
    return [pytest.param(b, d, dt, id=f"{b}-{d}-{str(dt).replace('torch.', '')}",
                         marks=[pytest.mark.gpu] if d == "cuda" else [])
            for b, d in _pairs() for dt in dtypes_for(b, d) if not (b == "cuda" and dt == torch.float32)]


def _dt(backend, dtype=torch.float32):
    """The dtype a case runs in: the cuda backend runs the fp32 cases in fp16 (its kernels are fp16/bf16)."""
    return torch.float16 if backend == "cuda" and dtype == torch.float32 else dtype


def _ch(backend, c):
    """A case's channel count: the cuda kernels need multiples of 8, so they run the same case with c rounded up."""
    return -(-c // 8) * 8 if backend == "cuda" else c


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
    x, w, b, cache = _inputs(cfg, dtype, device, Cin=_ch(backend, 5), Cout=_ch(backend, 6))
    y, _ = _check(backend, x, w, b, cache, cfg[1], cfg[2], dtype)
    assert y.is_contiguous()
    if dtype == torch.float32:  # same rounding points as the reference backend
        assert_close(y, reference.forward(x, w, b, cache, cfg[1], cfg[2] == "replicate"), what="y vs reference")


@pytest.mark.parametrize("backend,device", _backend_params())
def test_layouts(backend, device):
    """channels_last_3d x (y and dx stay channels-last), a non-contiguous view of a wider tensor, and the stride-0
    upstream grad of y.sum().backward()."""
    dt = torch.float16
    ci, co = _ch(backend, 6), _ch(backend, 7)
    x = randn((2, ci, 3, 4, 5), dt, device).contiguous(memory_format=torch.channels_last_3d)
    w = randn((co, ci, 3, 3, 3), dt, device, scale=0.3)
    b = randn((co,), dt, device)
    y, (dx, *_) = _check(backend, x, w, b, None, 1, "replicate", dt)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last_3d)

    f32 = _dt(backend)
    big = randn((2, _ch(backend, 6) + 3, 4, 6, 11), f32, device)
    xv = big[:, 2:2 + _ch(backend, 6), 1:, 1:5, ::2]  # every stride differs from the contiguous one
    assert not xv.is_contiguous() and not xv.is_contiguous(memory_format=torch.channels_last_3d)
    wv = randn((_ch(backend, 5), _ch(backend, 6), 3, 3, 3), f32, device, scale=0.3)
    cache = randn((2, _ch(backend, 6), 5, 4, 6), f32, device)[:, :, 1:3]  # a strided cache
    y, _ = _check(backend, xv, wv, None, cache, 1, "replicate", f32)
    assert y.is_contiguous()

    xr = xv.detach().requires_grad_(True)
    with use_backend(backend):
        mmkernels.causal_conv3d(xr, wv, time_pad="zeros").sum().backward()
    _, (dx_ref, *_) = _truth(xv, wv, None, None, 1, "zeros",
                             torch.ones(reference.output_shape(xv, wv, 1), device=device))
    assert_close(xr.grad, dx_ref, dtype=f32, what="dx from a stride-0 grad")


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
    bitwise in fp32, within tolerance in fp16 (bitwise on the cuda backend, whose tiles never span two frames). With
    stride 2 every chunk but the last has an even length."""
    T = sum(sizes)
    ci, co = _ch(backend, 4), _ch(backend, 6)
    x = randn((2, ci, T, 4, 5), dtype, device)
    w = randn((co, ci, 3, 3, 3), dtype, device, scale=0.3)
    b = randn((co,), dtype, device)
    with use_backend(backend):
        whole = mmkernels.causal_conv3d(x, w, b, stride=stride, time_pad=time_pad)
    chunked, caches = _stream(backend, x, w, b, sizes, stride, time_pad)
    assert chunked.shape == whole.shape
    if dtype == torch.float32 or backend == "cuda":
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
    f32 = _dt(backend)
    x, w, b, cache = _inputs(((3, 3, 3), 1, "replicate", True, True, 3), f32, device, Cin=_ch(backend, 5),
                             Cout=_ch(backend, 6))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dy = randn(reference.output_shape(x, w, 1), f32, device)
    with use_backend(backend):
        mmkernels.causal_conv3d(xr, wr, b, cache=cache).backward(dy)
    _, (dx_ref, dw_ref, _, _) = _truth(x, w, b, cache, 1, "replicate", dy)
    assert_close(xr.grad, dx_ref, dtype=f32, what="dx")
    assert_close(wr.grad, dw_ref, dtype=f32, what="dweight")


@pytest.mark.parametrize("backend,device", _backend_params())
def test_return_cache(backend, device):
    """new_cache is a fresh tensor with the right frames (T >= kt-1, T < kt-1, kt = 1) and carries gradients."""
    f32, ci, co = _dt(backend), _ch(backend, 3), _ch(backend, 2)
    x = randn((1, ci, 4, 2, 3), f32, device)
    w3 = randn((co, ci, 3, 1, 1), f32, device)
    with use_backend(backend):
        _, c = mmkernels.causal_conv3d(x, w3, return_cache=True)
        assert torch.equal(c, x[:, :, 2:]) and c.data_ptr() != x[:, :, 2:].data_ptr()
        _, c1 = mmkernels.causal_conv3d(x[:, :, :1], w3, time_pad="zeros", return_cache=True)
        assert torch.equal(c1, torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :1]], dim=2))
        prev = randn((1, ci, 2, 2, 3), f32, device)
        _, c2 = mmkernels.causal_conv3d(x[:, :, 1:2], w3, cache=prev, return_cache=True)
        assert torch.equal(c2, torch.cat([prev[:, :, 1:], x[:, :, 1:2]], dim=2))
        y1, c3 = mmkernels.causal_conv3d(x, randn((co, ci, 1, 3, 3), f32, device), return_cache=True)
        assert c3.shape == (1, ci, 0, 2, 3)

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
    f32, ci, co = _dt(backend), _ch(backend, 3), _ch(backend, 4)
    w = randn((co, ci, 3, 3, 3), f32, device)
    b = randn((co,), f32, device)
    x = torch.empty((0, ci, 5, 4, 4), dtype=f32, device=device, requires_grad=True)
    wr = w.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True)
    with use_backend(backend):
        y = mmkernels.causal_conv3d(x, wr, br)
        assert y.shape == (0, co, 5, 4, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(wr.grad, torch.zeros_like(w))
        assert torch.equal(br.grad, torch.zeros_like(b))
        cache = randn((2, ci, 2, 4, 4), f32, device)
        y0, c0 = mmkernels.causal_conv3d(torch.empty((2, ci, 0, 4, 4), dtype=f32, device=device), w, cache=cache,
                                         return_cache=True)
        assert y0.shape == (2, co, 0, 4, 4) and torch.equal(c0, cache) and c0.data_ptr() != cache.data_ptr()
        y1 = mmkernels.causal_conv3d(torch.empty((2, ci, 0, 4, 4), dtype=f32, device=device), w, time_pad="zeros")
        assert y1.shape == (2, co, 0, 4, 4)


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
    f32, ci, co = _dt(backend), _ch(backend, 3), _ch(backend, 4)
    x = randn((2, ci, 3, 4, 5), f32, device)
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    w = randn((co, ci, 3, 3, 3), f32, device)
    b = randn((co,), f32, device)
    cache = randn((2, ci, 2, 4, 5), f32, device)
    fwd = torch.ops.mmkernels.causal_conv3d_fwd.default
    torch.library.opcheck(fwd, (x, w, b, None, 1, True, backend))
    torch.library.opcheck(fwd, (xl, w, None, cache, 2, False, backend))
    dy = randn((2, co, 3, 4, 5), f32, device)
    bwd = torch.ops.mmkernels.causal_conv3d_bwd.default
    torch.library.opcheck(bwd, (dy, x, w, cache, 1, True, [True, True, True, True], backend))
    torch.library.opcheck(bwd, (dy, xl, w, None, 1, True, [True, False, True, False], backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", _backend_params())
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, w, b, cache):
        y, new_cache = mmkernels.causal_conv3d(x * 2.0, w, b, cache=cache, return_cache=True)
        # An fp32 loss (a no-op cast for fp32): check_compiled compares at the fp32 tolerance.
        return y.float().square().mean() + new_cache.float().sum()

    f32, ci, co = _dt(backend), _ch(backend, 3), _ch(backend, 4)
    inputs = (randn((1, ci, 3, 3, 4), f32, device), randn((co, ci, 3, 3, 3), f32, device),
              randn((co,), f32, device), randn((1, ci, 2, 3, 4), f32, device))
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

    def test_cuda_backend_refuses_cpu_tensors(self):
        # No GPU, no _C, or CPU tensors: whichever applies, a named backend never falls back silently.
        with use_backend("cuda"), pytest.raises(BackendError, match="backend 'cuda' was requested"):
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


# ----------------------------------------------------------------------------------------------------------------
# The cuda backend's two forward kernels (MMKERNELS_CONV3D_CUDA_KERNEL=sm80|sm90) and its Python glue.

# (B, Cin, Cout, T, H, W, (kt, kh, kw), stride, time_pad, cache, bias, layout): Cin = 8 (every K tile spans several
# taps), several M tiles with a tail (20 x 24 = 480 positions), N tiles with an 8-channel tail (136), a K that is not
# a multiple of the K tile (27 * 24), caches, zero padding, stride 2, even kernels (H+1, W+1), a 1x1x1 conv, T = 1,
# NCDHW and channels-last x.
KERNEL_CASES = [
    (1, 8, 8, 3, 5, 7, (3, 3, 3), 1, "replicate", False, True, "cl"),
    (2, 64, 136, 5, 20, 24, (3, 3, 3), 1, "replicate", False, True, "cl"),
    (1, 24, 40, 4, 9, 11, (3, 3, 3), 2, "zeros", True, False, "ncdhw"),
    (2, 16, 16, 5, 6, 6, (3, 3, 3), 2, "zeros", False, True, "cl"),
    (1, 128, 64, 3, 16, 16, (1, 1, 1), 1, "replicate", False, True, "cl"),
    (1, 40, 24, 3, 7, 6, (2, 2, 2), 1, "replicate", True, True, "ncdhw"),
    (1, 32, 32, 1, 33, 31, (3, 3, 3), 1, "replicate", False, False, "cl"),
]


def _kernel_case_id(case):
    B, ci, co, T, H, W, k, s, tp, cache, bias, layout = case
    return f"B{B}-c{ci}x{co}-{T}x{H}x{W}-k{''.join(map(str, k))}-s{s}-{tp[:3]}" + ("-cache" if cache else "") + \
        f"-{layout}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel", ["sm80", "sm90"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_kernel_case_id)
def test_cuda_forward_kernels_match_official(kernel, dtype, case, monkeypatch):
    """Each CUDA forward kernel, picked through MMKERNELS_CONV3D_CUDA_KERNEL, against the fp64 official-style truth
    (forward only: the backward is Triton's, tested above). sm90 is skipped (with the reason) off Hopper or without
    9.0a in the build."""
    from mmkernels import _ext
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    if kernel == "sm90":
        try:
            conv_cuda.select_kernel("sm90", torch.cuda.get_device_capability(), _ext.compiled_archs())
        except RuntimeError as e:
            pytest.skip(f"the sm_90a kernel cannot run here: {e}")
    monkeypatch.setenv(conv_cuda.KERNEL_ENV, kernel)
    expected_fn = _ext.C.causal_conv3d_fwd_sm90 if kernel == "sm90" else _ext.C.causal_conv3d_fwd
    assert conv_cuda._forward_fn(torch.device("cuda")) is expected_fn
    B, ci, co, T, H, W, (kt, kh, kw), stride, time_pad, with_cache, with_bias, layout = case
    x = randn((B, ci, T, H, W), dtype, "cuda")
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = randn((co, ci, kt, kh, kw), dtype, "cuda", scale=(ci * kt * kh * kw) ** -0.5)
    b = randn((co,), dtype, "cuda") if with_bias else None
    cache = randn((B, ci, kt - 1, H, W), dtype, "cuda") if with_cache else None
    with use_backend("cuda"):
        y = mmkernels.causal_conv3d(x, w, b, stride=stride, time_pad=time_pad, cache=cache)
        again = mmkernels.causal_conv3d(x, w, b, stride=stride, time_pad=time_pad, cache=cache)
    truth = official(*(t.double() if t is not None else None for t in (x, w, b)), stride, time_pad,
                     cache.double() if cache is not None else None)
    assert y.dtype == dtype and y.shape == truth.shape
    assert y.is_contiguous(memory_format=torch.channels_last_3d if layout == "cl" else torch.contiguous_format)
    assert_close(y, truth, dtype=dtype, what=f"{kernel} y")
    assert torch.equal(y, again)  # deterministic


@pytest.mark.gpu
def test_cuda_sm90_kernel_is_refused_off_hopper(monkeypatch):
    """Off Hopper, asking for the sm_90a kernel is a clear error (from the Python selection and from _C itself)."""
    from mmkernels import _ext

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    if torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("this GPU is a Hopper: the sm_90a kernel is allowed here")
    x = randn((1, 8, 2, 4, 4), torch.float16, "cuda").contiguous(memory_format=torch.channels_last_3d)
    w = randn((8, 8, 3, 3, 3), torch.float16, "cuda")
    monkeypatch.setenv("MMKERNELS_CONV3D_CUDA_KERNEL", "sm90")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="CONV3D_CUDA_KERNEL=sm90.*compute capability"):
        mmkernels.causal_conv3d(x, w)
    with pytest.raises(ValueError, match="runs only on Hopper"):
        _ext.C.causal_conv3d_fwd_sm90(x, w.permute(0, 2, 3, 4, 1).contiguous(), None, None, 1, True)


@pytest.mark.parametrize("choice,capability,archs,expected", [
    ("auto", (9, 0), ["8.0", "9.0a"], "sm90"),
    ("", (9, 0), ["8.0", "9.0a"], "sm90"),
    ("auto", (9, 0), ["8.0"], "sm80"),  # no sm_90a image: the sm_80 cubin runs on Hopper
    ("auto", (8, 0), ["8.0", "9.0a"], "sm80"),
    ("auto", (10, 0), ["8.0", "9.0a"], "sm80"),
    (" SM80 ", (9, 0), ["8.0", "9.0a"], "sm80"),
    ("sm90", (9, 0), ["9.0a"], "sm90"),
])
def test_cuda_kernel_selection(choice, capability, archs, expected):
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    assert conv_cuda.select_kernel(choice, capability, archs) == expected


@pytest.mark.parametrize("choice,capability,archs,exc,match", [
    ("sm75", (9, 0), ["8.0", "9.0a"], ValueError,
     r"MMKERNELS_CONV3D_CUDA_KERNEL='sm75' is not one of auto, sm80, sm90"),
    ("sm90", (8, 0), ["8.0", "9.0a"], RuntimeError, r"sm90.*compute capability 8\.0"),
    ("sm90", (9, 0), ["8.0"], RuntimeError, "without 9.0a"),
])
def test_cuda_kernel_selection_rejects_clearly(choice, capability, archs, exc, match):
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    with pytest.raises(exc, match=match):
        conv_cuda.select_kernel(choice, capability, archs)


def test_cuda_supports_says_why(monkeypatch):
    """The cuda backend's own limits, past the device checks (patched out so that they can be checked here): fp32,
    channel counts that are not multiples of 8, no Triton for the backward."""
    from mmkernels import _backend
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    monkeypatch.setattr(_backend, "cuda_supports_tensors", lambda *tensors, dtypes=None: None)
    monkeypatch.setattr(_backend, "triton_available", lambda: None)
    x = torch.empty((1, 16, 3, 4, 4), dtype=torch.float16, device="meta")
    w = torch.empty((24, 16, 3, 3, 3), dtype=torch.float16, device="meta")
    assert conv_cuda.supports(x, w) is None
    assert "multiples of 8" in conv_cuda.supports(x[:, :12], w[:, :12])
    assert "multiples of 8" in conv_cuda.supports(x, w[:20])
    assert "Triton backend" in conv_cuda.supports(x.float(), w.float())
    monkeypatch.setattr(_backend, "triton_available", lambda: "triton is not importable")
    assert "Triton backward" in conv_cuda.supports(x, w)


def test_cuda_glue_layouts():
    """The weight reorder ([Cout, kt, kh, kw, Cin], no copy when the weight already has that memory order) and the
    channels-last input rule (no copy for an aligned channels_last_3d tensor, one copy otherwise)."""
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    w = randn((24, 16, 3, 2, 1))
    r = conv_cuda.reordered_weight(w)
    assert r.is_contiguous() and torch.equal(r, w.permute(0, 2, 3, 4, 1))
    w_cl = w.contiguous(memory_format=torch.channels_last_3d)
    assert conv_cuda.reordered_weight(w_cl).data_ptr() == w_cl.data_ptr()

    x = randn((2, 8, 3, 4, 5), torch.float16)
    for t in (x, x[:, :, :, :, 1:]):  # NCDHW and a view: copied
        c = conv_cuda._channels_last(t)
        assert c.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(c, t)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    assert conv_cuda._channels_last(x_cl) is x_cl
    storage = torch.empty(x.numel() + 1, dtype=torch.float16)
    shifted = storage[1:].as_strided(x_cl.shape, x_cl.stride())  # channels-last, start 2 bytes past 16-byte alignment
    shifted.copy_(x_cl)
    c = conv_cuda._channels_last(shifted)
    assert c.data_ptr() % 16 == 0 and c.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(c, x)
