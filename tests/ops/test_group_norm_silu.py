"""mmkernels.group_norm_silu: every backend against the reference (fp64 autograd as ground truth), forward and
backward for every differentiable input; the official nearest-resize rules; SpatialNorm equivalence; opcheck;
torch.compile; determinism; bad input."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.ops.group_norm_silu import reference
from mmkernels.testing import assert_close, randn, triton_interpreted
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

CL3D = torch.channels_last_3d


# Every backend (torch, Triton, and the cuda backend's kernels on a GPU) runs every case.
BACKEND_DTYPES = backend_dtype_params()
BACKENDS = backend_params()


def _x(shape, dtype, device, layout):
    """x in the named layout: "ncdhw" (contiguous), "cl" (channels_last_3d), "view" (a strided slice of a
    larger tensor, neither contiguous nor channels-last) or "perm" (dense, spatial dims 0 and 1 transposed)."""
    if layout == "perm":
        swapped = shape[:2] + (shape[3], shape[2]) + shape[4:]
        return randn(swapped, dtype, device, scale=2.0, shift=0.5).transpose(2, 3)
    if layout == "cl":
        return randn(shape, dtype, device, scale=2.0, shift=0.5).to(memory_format=CL3D)
    if layout == "view":
        big = randn(shape[:-1] + (2 * shape[-1] + 1,), dtype, device, scale=2.0, shift=0.5)
        return big[..., 1::2]
    return randn(shape, dtype, device, scale=2.0, shift=0.5)


def _mod(kind, shape, dtype, device):
    """scale/shift per case kind: None, ("src", small spatial), ("expand", base spatial, expanded spatial)."""
    if kind is None:
        return None
    if kind[0] == "src":
        return randn(shape[:2] + tuple(kind[1]), dtype, device, shift=1.0)
    return randn(shape[:2] + tuple(kind[1]), dtype, device, shift=1.0).expand(shape[:2] + tuple(kind[2]))


# (id, x shape, groups, layout, scale kind, shift kind, silu, weight, bias)
CASES = [
    # ST-VAE decoder-like: T 9 from 3 (first-frame rule, factor 4), H and W x2; channels_last_3d.
    ("T9from3-cl", (2, 12, 9, 6, 4), 4, "cl", ("src", (3, 3, 2)), ("src", (3, 3, 2)), True, True, True),
    # T 5 from 2: odd T, frames 1..4 all read latent frame 1 (f = 4); H and W x4; no SiLU; weight only.
    ("T5from2-x4", (1, 6, 5, 8, 8), 3, "ncdhw", ("src", (2, 2, 2)), ("src", (2, 2, 2)), False, True, False),
    # Full resolution, odd sizes, bias only.
    ("fullres-cl", (2, 6, 3, 5, 7), 2, "cl", ("src", (3, 5, 7)), ("src", (3, 5, 7)), True, False, True),
    # T = 1 (an image), W x3 (a factor that is not a power of two), H broadcast from 1; scale only.
    ("T1-w3", (2, 8, 1, 4, 6), 4, "ncdhw", ("src", (1, 1, 2)), None, True, True, True),
    # Even T (plain factor 2), shift only, strided x.
    ("evenT-view", (1, 6, 4, 4, 6), 3, "view", None, ("src", (2, 2, 3)), True, True, True),
    # Broadcast by expand (stride 0): [B, C, 1, 2, 2] expanded in time, then read at latent resolution.
    ("expand", (2, 4, 5, 4, 4), 2, "ncdhw", ("expand", (1, 2, 2), (3, 2, 2)), ("expand", (1, 2, 2), (3, 2, 2)),
     True, True, True),
    # Plain GroupNorm + SiLU.
    ("plain-5d", (2, 12, 3, 5, 7), 4, "ncdhw", None, None, True, True, True),
    ("plain-5d-cl-noaffine", (1, 12, 3, 3, 5), 1, "cl", None, None, True, False, False),
    # 4-D, 3-D and 2-D x (spatial maps are plain factors; no time rule).
    ("4d", (2, 6, 7, 5), 3, "ncdhw", ("src", (1, 5)), ("src", (1, 5)), True, True, True),
    ("3d", (3, 12, 11), 12, "view", ("src", (11,)), ("src", (11,)), False, True, True),
    ("2d", (4, 6), 2, "ncdhw", ("src", ()), ("src", ()), True, True, True),
    # More than three spatial dims: merged by the Triton launcher, or (permuted) copied once and written back.
    ("6d", (1, 4, 2, 3, 2, 3), 2, "ncdhw", None, None, True, True, True),
    ("6d-perm", (1, 4, 2, 3, 2, 3), 2, "perm", None, None, True, True, False),
]


def _inputs(case, dtype, device):
    _, shape, G, layout, sk, hk, silu, has_w, has_b = case
    x = _x(shape, dtype, device, layout)
    C = shape[1]
    w = randn((C,), dtype, device, shift=1.0) if has_w else None
    b = randn((C,), dtype, device) if has_b else None
    return x, G, w, b, _mod(sk, shape, dtype, device), _mod(hk, shape, dtype, device), silu


def _leaves(ts):
    return [t.detach().requires_grad_(True) if t is not None else None for t in ts]


def _truth(x, G, w, b, sc, sh, silu, dy):
    """y and grads by autograd through the reference in fp64: independent of every backend's closed-form backward."""
    ins = _leaves([t.double() if t is not None else None for t in (x, w, b, sc, sh)])
    y = reference.group_norm_silu(ins[0], G, ins[1], ins[2], 1e-6, scale=ins[3], shift=ins[4], silu=silu)
    y.backward(dy.double())
    return [y] + [t.grad if t is not None else None for t in ins]


def _run(backend, x, G, w, b, sc, sh, silu, dy, eps=1e-6):
    ins = _leaves([x, w, b, sc, sh])
    with use_backend(backend):
        y = mmkernels.group_norm_silu(ins[0], G, ins[1], ins[2], eps, scale=ins[3], shift=ins[4], silu=silu)
    y.backward(dy)
    return [y] + [t.grad if t is not None else None for t in ins]


NAMES = ("y", "dx", "dweight", "dbias", "dscale", "dshift")


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(backend, device, dtype, case):
    x, G, w, b, sc, sh, silu = _inputs(case, dtype, device)
    dy = randn(x.shape, dtype, device)
    got = _run(backend, x, G, w, b, sc, sh, silu, dy)
    want = _truth(x, G, w, b, sc, sh, silu, dy)
    y = got[0]
    assert y.dtype == dtype and y.shape == x.shape
    # Same memory format as x (channels_last_3d stays channels_last_3d; a strided view gives a dense output).
    assert y.stride() == torch.empty_like(x).stride()
    # The forward matches the reference in the same dtype (same rounding points) ...
    assert_close(y, reference.group_norm_silu(x, G, w, b, scale=sc, shift=sh, silu=silu), dtype=dtype,
                 what="y vs same-dtype reference")
    # ... and everything matches fp64 autograd.
    for name, g, r, inp in zip(NAMES, got, want, (x, x, w, b, sc, sh)):
        if inp is None:
            assert g is None and r is None, name
            continue
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        assert_close(g, r, dtype=dtype, what=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_small_tiles_many_programs(backend, device, monkeypatch):
    """Tiny tiles and many programs: several channel blocks and W blocks with masked edges, several row ranges per
    channel (partial statistics combined by the finalize kernels with unequal counts); 64-bit in-row offsets."""
    if backend == "triton":
        from mmkernels.ops.group_norm_silu import triton as gn_triton

        monkeypatch.setattr(gn_triton, "TILE", 16)
        monkeypatch.setattr(gn_triton, "MAX_BLOCK_W", 4)
        monkeypatch.setattr(gn_triton, "MAX_BLOCK_C", 4)
        monkeypatch.setattr(gn_triton, "_target_programs", lambda device: 16)
        monkeypatch.setattr(gn_triton, "_off64", lambda *args: True)  # the 64-bit in-row offset path
    elif backend == "cuda":
        from mmkernels.ops.group_norm_silu import cuda as gn_cuda

        # 2-thread blocks: several channel tiles, several column tiles with a tail, one row per program.
        monkeypatch.setattr(gn_cuda, "BLOCK_THREADS", 2)
        monkeypatch.setattr(gn_cuda, "TARGET_PROGRAMS", 1 << 20)
    for layout in ("ncdhw", "cl"):
        case = ("", (1, 12, 5, 2, 7), 3, layout, ("src", (3, 1, 7)), ("src", (3, 1, 7)), True, True, True)
        x, G, w, b, sc, sh, silu = _inputs(case, torch.float32, device)
        dy = randn(x.shape, torch.float32, device)
        for name, g, r in zip(NAMES, _run(backend, x, G, w, b, sc, sh, silu, dy),
                              _truth(x, G, w, b, sc, sh, silu, dy)):
            assert_close(g, r, dtype=torch.float32, what=f"{layout} {name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_mean_statistics(backend, device):
    """Groups whose mean is 300x their spread keep fp32 accuracy (the Triton statistics: per-lane Welford, Chan
    combination), where E[x^2] - E[x]^2 in fp32 would lose about 3 digits."""
    x = randn((2, 8, 3, 4, 5), torch.float32, device, shift=300.0)
    w = randn((8,), torch.float32, device, shift=1.0)
    dy = randn(x.shape, torch.float32, device)
    got = _run(backend, x, 2, w, None, None, None, True, dy)
    want = _truth(x, 2, w, None, None, None, True, dy)
    assert_close(got[0], want[0], dtype=torch.float32, what="y")
    assert_close(got[1], want[1], dtype=torch.float32, what="dx")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_is_deterministic(backend, device):
    case = ("", (2, 8, 5, 4, 6), 4, "cl", ("src", (2, 2, 3)), ("src", (2, 2, 3)), True, True, True)
    x, G, w, b, sc, sh, silu = _inputs(case, torch.float32, device)
    dy = randn(x.shape, torch.float32, device)
    first = _run(backend, x, G, w, b, sc, sh, silu, dy)
    second = _run(backend, x, G, w, b, sc, sh, silu, dy)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_upstream_grad(backend, device):
    """y.sum().backward() hands the backward a stride-0 dy; a channels-last x with latent scale/shift."""
    case = ("", (1, 6, 5, 4, 4), 3, "cl", ("src", (2, 2, 2)), ("src", (2, 2, 2)), True, True, True)
    x, G, w, b, sc, sh, silu = _inputs(case, torch.float32, device)
    ins = _leaves([x, w, b, sc, sh])
    with use_backend(backend):
        mmkernels.group_norm_silu(ins[0], G, ins[1], ins[2], scale=ins[3], shift=ins[4]).sum().backward()
    want = _truth(x, G, w, b, sc, sh, silu, torch.ones(x.shape, device=device))
    for name, t, r in zip(NAMES[1:], ins, want[1:]):
        assert_close(t.grad, r, dtype=torch.float32, what=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    for shape in ((0, 4, 3, 2, 2), (2, 4, 0, 2, 2)):
        x = torch.zeros(shape, device=device, requires_grad=True)
        w = torch.ones(4, device=device, requires_grad=True)
        with use_backend(backend):
            y = mmkernels.group_norm_silu(x, 2, w)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape and torch.equal(w.grad, torch.zeros(4, device=device))


# ----------------------------------------------------------------------------------------------------------------
# The official rounding and resize semantics.


def test_bf16_rounding_points_match_official_modules():
    """The torch backend equals nn.GroupNorm -> official nearest resize -> mul -> add -> nn.SiLU, all in bf16,
    bit for bit on the CPU (fp16: all but a few elements, where nn.GroupNorm's own fp32 formula rounds
    differently); the Triton kernels round at the same points."""
    for dtype, min_equal in ((torch.bfloat16, 1.0), (torch.float16, 0.999)):
        gn = nn.GroupNorm(32, 64, eps=1e-6).to(dtype)
        with torch.no_grad():
            gn.weight.copy_(randn((64,), dtype, shift=1.0))
            gn.bias.copy_(randn((64,), dtype))
        x = randn((2, 64, 5, 16, 16), dtype, scale=3.0, shift=1.0)
        sc, sh = randn((2, 64, 2, 4, 4), dtype), randn((2, 64, 2, 4, 4), dtype)
        with torch.no_grad():
            official = nn.SiLU()(gn(x) * _official_resize(sc, (5, 16, 16)) + _official_resize(sh, (5, 16, 16)))
            with use_backend("torch"):
                ours = mmkernels.group_norm_silu(x, 32, gn.weight, gn.bias, scale=sc, shift=sh)
        assert (ours == official).float().mean().item() >= min_equal, dtype


def _official_resize(zq, size):
    """STVAESpatialNorm3D's resize, written as in the official module."""
    T = size[0]
    if T > 1 and T % 2 == 1 and zq.shape[2] > 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(zq[:, :, 1:], size=(T - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=size)


def test_official_nearest_index_emulation():
    """official_nearest_is_integer_map agrees with F.interpolate itself, including the factors where the float32
    index arithmetic of F.interpolate is not the integer map (41, 47, ...)."""
    seen_bad = []
    for src in (1, 2, 3, 7, 64):
        for k in (1, 2, 3, 4, 5, 7, 8, 16, 41, 47, 49, 53):
            dst = src * k
            a = torch.arange(src, dtype=torch.float32).view(1, 1, src)
            idx = F.interpolate(a, size=dst, mode="nearest").view(-1).long()
            exact = torch.equal(idx, torch.arange(dst) // k)
            assert reference.official_nearest_is_integer_map(src, dst) == exact, (src, k)
            if not exact:
                seen_bad.append((src, k))
    assert seen_bad  # the check is not vacuous
    assert not reference.official_nearest_is_integer_map(3, 7)


@pytest.mark.parametrize("size,src,plan", [
    ((9, 6, 4), (3, 3, 2), ((4, True), (2, False), (2, False))),
    ((5, 8, 8), (2, 2, 2), ((4, True), (4, False), (4, False))),
    ((17, 16, 16), (5, 2, 2), ((4, True), (8, False), (8, False))),
    ((9, 4, 4), (1, 1, 4), ((9, False), (4, False), (1, False))),
    ((9, 4, 4), (9, 4, 4), ((1, False),) * 3),
    ((8, 4, 6), (2, 2, 3), ((4, False), (2, False), (2, False))),
    ((1, 6, 9), (1, 2, 3), ((1, False), (3, False), (3, False))),
], ids=str)
def test_resize_plan_matches_official_interpolate(size, src, plan):
    """The plan's integer map equals the official SpatialNorm resize (F.interpolate, first frame separately)."""
    assert reference.resize_plan(size, src, time_rule=True) == plan
    zq = torch.arange(float(torch.Size(src).numel())).view(1, 1, *src)
    official = _official_resize(zq, size)
    mapped = zq
    for k, ((f, first), n) in enumerate(zip(plan, size)):
        mapped = mapped.index_select(2 + k, reference.source_index(n, f, first))
    assert torch.equal(official, mapped)
    assert torch.equal(reference.upsample(zq, size, plan), official)


@pytest.mark.parametrize("size,src,match", [
    ((9, 4, 4), (4, 4, 4), "frames 1.. \\(3 -> 8\\)"),  # odd T: (9-1)/(4-1) is not an integer
    ((6, 4, 4), (4, 4, 4), "not an integer factor"),
    ((5, 4, 4), (5, 3, 4), "spatial dim 1 size 3 but x has 4"),
    ((5, 4, 4), (5, 8, 4), "smaller than x"),
    ((1, 82, 4), (1, 2, 4), "float32 index arithmetic"),  # x41: F.interpolate maps index 41 to 0, not 1
], ids=str)
def test_resize_plan_rejects(size, src, match):
    with pytest.raises(ValueError, match=match):
        reference.resize_plan(size, src, time_rule=True)
    x = torch.randn(1, 2, *size)
    with pytest.raises(ValueError, match="'scale'"):
        mmkernels.group_norm_silu(x, 1, scale=torch.randn(1, 2, *src), shift=torch.randn(1, 2, *src))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_spatial_norm_equivalence(backend, device):
    """Official-style SpatialNorm (zq resized to f's size, 1x1 convs at full resolution) equals our op fed the 1x1
    convs at latent resolution, forward and every grad (f, zq, conv and norm parameters), up to fp32 rounding."""
    torch.manual_seed(1)
    C, Z = 8, 4
    norm = nn.GroupNorm(2, C, eps=1e-6).to(device)
    conv_y, conv_b = nn.Conv3d(Z, C, 1).to(device), nn.Conv3d(Z, C, 1).to(device)
    with torch.no_grad():
        norm.weight.copy_(randn((C,), device=device, shift=1.0))
        norm.bias.copy_(randn((C,), device=device))
    f = randn((2, C, 9, 8, 6), device=device).to(memory_format=CL3D)
    zq = randn((2, Z, 3, 2, 3), device=device)
    dy = randn(f.shape, device=device)
    params = [norm.weight, norm.bias, conv_y.weight, conv_y.bias, conv_b.weight, conv_b.bias]

    def grads(out, leaves):
        return torch.autograd.grad(out, leaves, dy)

    fo, zo = f.detach().requires_grad_(True), zq.detach().requires_grad_(True)
    up = _official_resize(zo, f.shape[2:])
    official = F.silu(norm(fo) * conv_y(up) + conv_b(up))
    want = [official] + list(grads(official, [fo, zo] + params))

    fr, zr = f.detach().requires_grad_(True), zq.detach().requires_grad_(True)
    with use_backend(backend):
        ours = mmkernels.group_norm_silu(fr, 2, norm.weight, norm.bias, norm.eps, scale=conv_y(zr),
                                         shift=conv_b(zr))
    got = [ours] + list(grads(ours, [fr, zr] + params))
    for i, (g, r) in enumerate(zip(got, want)):
        # The convs differ only in their resolution (cuDNN may pick another algorithm, summing in another order).
        assert_close(g, r, tol=1e-5 if device == "cpu" else 1e-4, what=f"output {i}")


# ----------------------------------------------------------------------------------------------------------------
# torch.library.


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    f32 = torch.float32
    x = randn((2, 6, 5, 4, 2), f32, device).to(memory_format=CL3D)
    w, b = randn((6,), f32, device, shift=1.0), randn((6,), f32, device)
    sc, sh = randn((2, 6, 2, 2, 1), f32, device), randn((2, 6, 2, 2, 1), f32, device)
    fwd, bwd = torch.ops.mmkernels.group_norm_silu_fwd.default, torch.ops.mmkernels.group_norm_silu_bwd.default
    torch.library.opcheck(fwd, (x, 3, w, b, 1e-6, sc, sh, True, backend))
    torch.library.opcheck(fwd, (x.contiguous(), 2, None, None, 1e-5, None, None, False, backend))
    _, mean, rstd = reference.forward(x, 3, w, b, 1e-6, sc, sh, True)
    dy = randn(x.shape, f32, device)
    torch.library.opcheck(bwd, (dy, x, 3, w, b, sc, sh, mean, rstd, True, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device, compiler):
    def block(x, w, b, zq):
        y = mmkernels.group_norm_silu(x * 2.0, 2, w, b, scale=zq * 0.5, shift=zq + 1.0)
        return y.sum(dim=1).square().mean()

    f32 = torch.float32
    check_compiled(block, (randn((2, 4, 5, 4, 2), f32, device), randn((4,), f32, device, shift=1.0),
                           randn((4,), f32, device), randn((2, 4, 2, 2, 1), f32, device)), backend, compiler)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


class TestBadInput:
    X = (1, 4, 3, 4, 4)

    def _call(self, *args, **kwargs):
        x = kwargs.pop("x", torch.randn(self.X))
        return mmkernels.group_norm_silu(x, *args, **kwargs)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
            mmkernels.group_norm_silu([1.0, 2.0], 1)

    def test_integer_x(self):
        with pytest.raises(TypeError, match="'x' must be a floating-point"):
            self._call(2, x=torch.ones(self.X, dtype=torch.int32))

    def test_one_dim_x(self):
        with pytest.raises(ValueError, match="'x' must have at least 2 dims"):
            self._call(1, x=torch.randn(4))

    @pytest.mark.parametrize("groups", [3, 0, -2])
    def test_groups_must_divide_channels(self, groups):
        with pytest.raises(ValueError, match="'num_groups' must be >= 1 and divide the channels"):
            self._call(groups)

    @pytest.mark.parametrize("groups", [2.0, True, "2"])
    def test_groups_type(self, groups):
        with pytest.raises(TypeError, match="'num_groups' must be an int"):
            self._call(groups)

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"'weight' must have shape \[4\]"):
            self._call(2, torch.randn(5))
        with pytest.raises(ValueError, match="'bias' must have 1 dims"):
            self._call(2, None, torch.randn(1, 4))

    def test_weight_device(self):
        with pytest.raises(ValueError, match="'bias' is on meta but 'x' is on cpu"):
            self._call(2, None, torch.randn(4, device="meta"))

    def test_scale_batch_channels(self):
        with pytest.raises(ValueError, match=r"'scale' must have shape \[B, C, ...\] = \[1, 4, ...\]"):
            self._call(2, scale=torch.randn(1, 3, 3, 4, 4))
        with pytest.raises(ValueError, match="'shift' must have 5 dims"):
            self._call(2, shift=torch.randn(1, 4, 4, 4))

    def test_scale_dtype_and_device(self):
        with pytest.raises(TypeError, match="'scale' must have x's dtype torch.float32"):
            self._call(2, scale=torch.randn(self.X, dtype=torch.float16))
        with pytest.raises(ValueError, match="'shift' is on meta"):
            self._call(2, shift=torch.randn(self.X, device="meta"))

    def test_scale_shift_shapes_differ(self):
        with pytest.raises(ValueError, match="'scale' and 'shift' must have the same shape"):
            self._call(2, scale=torch.randn(self.X), shift=torch.randn(1, 4, 1, 2, 2))

    def test_scale_size_not_an_integer_map(self):
        with pytest.raises(ValueError, match="'shift' has spatial dim 1 size 3 but x has 4"):
            self._call(2, shift=torch.randn(1, 4, 3, 3, 4))
        # T=3 from Ts=2 is an official first-frame map (frame 0 <- 0, frames 1, 2 <- 1): accepted.
        assert self._call(2, shift=torch.randn(1, 4, 2, 4, 4)).shape == self.X

    @pytest.mark.parametrize("eps", [-1e-6, float("nan"), "1e-6"])
    def test_eps(self, eps):
        with pytest.raises((ValueError, TypeError), match="'eps'"):
            self._call(2, eps=eps)

    def test_silu_flag(self):
        with pytest.raises(TypeError, match="'silu' must be a bool"):
            self._call(2, silu=1)

    def test_cuda_backend_refuses_cpu_tensors(self):
        # No GPU, no _C, or CPU tensors: whichever applies, a named backend never falls back silently.
        with use_backend("cuda"), pytest.raises(BackendError, match="backend 'cuda' was requested"):
            self._call(2)

    def test_triton_backend_rejects_fp64(self):
        with use_backend("triton"), pytest.raises(BackendError, match="float64"):
            self._call(2, x=torch.randn(self.X, dtype=torch.float64))

    @pytest.mark.skipif(not triton_interpreted(), reason="on a GPU the same limit holds; here it runs interpreted")
    def test_triton_rejects_modulation_beyond_three_spatial_dims(self):
        x = torch.randn(1, 4, 2, 2, 2, 2)
        with use_backend("triton"), pytest.raises(BackendError, match="more than 3 spatial dims"):
            mmkernels.group_norm_silu(x, 2, scale=torch.randn(1, 4, 2, 2, 2, 2))
        with use_backend("torch"):  # the reference maps any number of dims
            y = mmkernels.group_norm_silu(x, 2, scale=torch.randn(1, 4, 1, 2, 1, 2))
        assert y.shape == x.shape

    @pytest.mark.skipif(not triton_interpreted(),
                        reason="the bf16 limit is the Triton CPU interpreter's; on a GPU bf16 runs")
    def test_triton_interpreter_rejects_bf16(self):
        with use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            self._call(2, x=torch.randn(self.X, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------
# The cuda backend (csrc/group_norm_silu/).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["cl", "ncdhw"])
def test_cuda_decoder_sizes(dtype, layout):
    """The cuda kernels at ST-VAE-decoder-like sizes against fp64 autograd: C = 64 channels-last takes the 16-byte
    vector path (C a multiple of 16 bytes' worth of channels), NCDHW the coalesced scalar path; latent scale/shift
    with the first-frame rule (T 9 from 3) and H, W x8, then plain GroupNorm + SiLU (the virtual source grid of the
    backward); several row chunks and column tiles."""
    from mmkernels import _ext

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    for mod in (("src", (3, 4, 3)), None):
        case = ("", (2, 64, 9, 32, 24), 32, layout, mod, mod, True, True, True)
        x, G, w, b, sc, sh, silu = _inputs(case, dtype, "cuda")
        dy = randn(x.shape, dtype, "cuda")
        got = _run("cuda", x, G, w, b, sc, sh, silu, dy)
        want = _truth(x, G, w, b, sc, sh, silu, dy)
        assert got[0].stride() == x.stride()
        for name, g, r, inp in zip(NAMES, got, want, (x, x, w, b, sc, sh)):
            if inp is not None:
                assert_close(g, r, dtype=dtype, what=f"{name} (scale/shift: {mod is not None})")


def test_cuda_supports_says_why(monkeypatch):
    """The cuda backend's own limits, past the device checks (patched out so that they can be checked here)."""
    from mmkernels import _backend
    from mmkernels.ops.group_norm_silu import cuda as gn_cuda

    monkeypatch.setattr(_backend, "cuda_supports_tensors", lambda *tensors, dtypes=None: None)
    x = torch.empty((2, 4, 3, 4, 4), device="meta")
    assert gn_cuda.supports(x, 2, None, None, 1e-6, None, None, True) is None
    x6 = torch.empty((1, 4, 2, 2, 2, 2), device="meta")
    assert gn_cuda.supports(x6, 2, None, None, 1e-6, None, None, True) is None
    assert "more than 3 spatial dims" in gn_cuda.supports(x6, 2, None, None, 1e-6, x6, None, True)
    assert "batch of 65536" in gn_cuda.supports(torch.empty((65536, 4, 2), device="meta"), 2, None, None, 1e-6,
                                                None, None, True)
    # Broadcast modulation: one scale/shift element per channel read by every position would make the backward's
    # per-element serial walk as long as the volume; the ST-VAE's latent-resolution maps stay under the bound.
    big = torch.empty((1, 4, 17, 64, 64), device="meta")
    per_channel = torch.empty((1, 4, 1, 1, 1), device="meta")
    assert "69632 positions" in gn_cuda.supports(big, 2, None, None, 1e-6, per_channel, None, True)
    assert "69632 positions" in gn_cuda.supports(big, 2, None, None, 1e-6, None, per_channel, True)
    latent = torch.empty((1, 4, 5, 8, 8), device="meta")
    assert gn_cuda.supports(big, 2, None, None, 1e-6, latent, latent, True) is None
