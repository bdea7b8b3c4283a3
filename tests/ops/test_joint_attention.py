"""mmkernels.joint_attention: every backend against an fp64 autograd reference, forward and backward (streams, norms,
RoPE grids, GQA groups, head dims, odd lengths); the reference against the official-style path; LSE; strided and
expanded inputs; determinism; opcheck; compile; empty inputs; bad input."""

import pytest
import torch

import mmkernels
from mmkernels import BackendError, RoPE3DSpec, use_backend
from mmkernels.ops.joint_attention import reference
from mmkernels.testing import assert_close, randn
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

OP_BACKENDS = ("torch", "triton", "cuda")


def _only_op_backends(params):
    """The op's backends; the cuda backend's kernels are fp16/bf16 only, so its fp32 params are dropped."""
    return [p for p in params if p.values[0] in OP_BACKENDS
            and not (p.values[0] == "cuda" and len(p.values) > 2 and p.values[2] == torch.float32)]


def _dtype(backend):
    """The dtype of the tests that are not parametrized over dtypes: fp32, or fp16 for the fp16/bf16-only cuda."""
    return torch.float16 if backend == "cuda" else torch.float32


# (B, lens, Hq, Hkv, D, norm, grid, split): 1-3 streams, norm full/head/None, RoPE None or 3D, GQA groups
# 1/2/4/8, head dims 64/72/80/96/128, odd lengths (none a multiple of a block), a length-1 stream.
CASES = [
    (2, (13, 7), 4, 2, 72, "full", (2, 2, 5), None),
    (1, (17,), 2, 2, 64, "head", (1, 17, 1), (20, 22, 22)),
    (1, (5, 9, 11), 8, 1, 64, None, (25, 1, 1), (16, 24, 24)),
    (1, (19, 3), 4, 1, 128, "full", None, None),
    (1, (33,), 2, 1, 72, "head", (3, 11, 1), None),
    (2, (9, 1), 2, 2, 80, "full", (2, 1, 5), (28, 26, 26)),
    (1, (6, 12), 2, 2, 96, "head", (3, 2, 3), None),
]


def _ids(case):
    B, lens, hq, hkv, d, norm, grid, split = case
    return (f"B{B}-L{'_'.join(map(str, lens))}-H{hq}x{hkv}-D{d}-{norm or 'nonorm'}-"
            + ("rope" + "x".join(map(str, grid)) if grid else "norope"))


def _inputs(case, dtype, device, seed=0):
    B, lens, Hq, Hkv, D, norm, grid, split = case
    g = torch.Generator().manual_seed(seed)
    qs = [randn((B, L, Hq * D), dtype, device, g) for L in lens]
    ks = [randn((B, L, Hkv * D), dtype, device, g) for L in lens]
    vs = [randn((B, L, Hkv * D), dtype, device, g) for L in lens]
    if norm is None:
        qw = kw = None
    else:
        wq, wk = (Hq * D, Hkv * D) if norm == "full" else (D, D)
        qw = [randn((wq,), dtype, device, g, scale=0.3, shift=1.0) for _ in lens]
        kw = [randn((wk,), dtype, device, g, scale=0.3, shift=1.0) for _ in lens]
    rope = RoPE3DSpec(grid=grid, split=split) if grid else None
    dos = [randn((B, L, Hq * D), dtype, device, g) for L in lens]
    return qs, ks, vs, qw, kw, rope, dos


def _leaves(*groups):
    return [None if grp is None else [t.detach().clone().requires_grad_(True) for t in grp] for grp in groups]


def _grads(*groups):
    return [t.grad for grp in groups if grp is not None for t in grp]


def _reference(case, qs, ks, vs, qw, kw, dos, eps=1e-6):
    """fp64 outputs and grads by autograd through reference.attend (independent of every backward here)."""
    B, lens, Hq, Hkv, D, norm, grid, split = case
    qs, ks, vs, qw, kw = _leaves(*[None if g is None else [t.double() for t in g] for g in (qs, ks, vs, qw, kw)])
    if grid:
        rope = RoPE3DSpec(grid=grid, split=split).resolve("test", D, sum(lens))
    else:
        rope = ((), (), 10000.0, ())
    outs, lse = reference.attend(qs, ks, vs, qw or [], kw or [], eps, norm or "full", rope, Hq, Hkv, D ** -0.5)
    torch.autograd.backward(outs, [d.double() for d in dos])
    return outs, lse, _grads(qs, ks, vs, qw, kw)


def _run(backend, case, qs, ks, vs, qw, kw, rope, dos, **kw_args):
    B, lens, Hq, Hkv, D, norm, grid, split = case
    qs, ks, vs, qw, kw = _leaves(qs, ks, vs, qw, kw)
    with use_backend(backend):
        outs = mmkernels.joint_attention(qs, ks, vs, num_heads=Hq, num_kv_heads=Hkv, q_norm=qw, k_norm=kw,
                                         norm=norm or "full", rope=rope, **kw_args)
        torch.autograd.backward(outs, dos)
    return outs, _grads(qs, ks, vs, qw, kw)


@pytest.mark.parametrize("backend,device,dtype", _only_op_backends(backend_dtype_params()))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(backend, device, dtype, case):
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, dtype, device)
    outs, grads = _run(backend, case, qs, ks, vs, qw, kw, rope, dos)
    ref_outs, _, ref_grads = _reference(case, qs, ks, vs, qw, kw, dos)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == dtype and o.shape == r.shape and o.is_contiguous()
        assert_close(o, r, dtype=dtype, what=f"output of stream {i}")
    names = ([f"dq{i}" for i in range(len(qs))] + [f"dk{i}" for i in range(len(ks))]
             + [f"dv{i}" for i in range(len(vs))] + [f"dq_norm{i}" for i in range(len(qw or []))]
             + [f"dk_norm{i}" for i in range(len(kw or []))])
    assert len(grads) == len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None and g.dtype == dtype, name
        assert_close(g, r, dtype=dtype, what=name)


@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_lse_matches_reference(backend, device):
    case = CASES[0]
    B, lens, Hq, Hkv, D, norm, grid, split = case
    dtype = _dtype(backend)
    qs, ks, vs, qw, kw, rope, _ = _inputs(case, dtype, device)
    g, s, base, off = rope.resolve("test", D, sum(lens))
    _, lse = torch.ops.mmkernels.joint_attention_fwd(qs, ks, vs, qw, kw, 1e-6, norm, list(g), list(s), base,
                                                     list(off), Hq, Hkv, D ** -0.5, False, backend)
    _, ref_lse, _ = _reference(case, qs, ks, vs, qw, kw, [torch.zeros(B, L, Hq * D) for L in lens])
    assert lse.shape == (B, Hq, sum(lens)) and lse.dtype == torch.float32
    assert_close(lse, ref_lse, dtype=dtype, what="lse")


def test_reference_matches_official_style():
    """The reference (fp32 norm and RoPE, one rounding) against an independently written official-style path
    (apex-rounded norms per stream, head split, cat, split/cat RoPE in the input dtype, SDPA with expanded KV)."""
    case = (2, (10, 6), 4, 2, 72, "full", (4, 2, 2), None)
    B, lens, Hq, Hkv, D, norm, grid, split = case
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qs, ks, vs, qw, kw, rope, _ = _inputs(case, dtype, "cpu", seed=3)
        g, s, base, off = rope.resolve("test", D, sum(lens))
        ours, _ = reference.forward(qs, ks, vs, qw, kw, 1e-6, norm, (g, s, base, off), Hq, Hkv, D ** -0.5, False)
        official = reference.official_style(qs, ks, vs, qw, kw, 1e-6, g, s, Hq, Hkv, D ** -0.5)
        for o, r in zip(ours, official):
            assert_close(o, r, tol=tol, what=f"{dtype} reference vs official style")


@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_strided_views_and_expanded_grads(backend, device):
    """q/k/v as column slices of one fused projection output, one stream with a non-unit last stride, and the
    stride-0 grads that ``out.sum().backward()`` produces."""
    B, lens, Hq, Hkv, D = 1, (11, 6), 2, 1, 64
    case = (B, lens, Hq, Hkv, D, "full", (17, 1, 1), (20, 22, 22))
    dtype = _dtype(backend)
    fused = [randn((B, L, (Hq + 2 * Hkv) * D), dtype, device) for L in lens]
    qs = [f[..., :Hq * D] for f in fused]
    ks = [f[..., Hq * D:(Hq + Hkv) * D] for f in fused]
    vs = [f[..., (Hq + Hkv) * D:] for f in fused]
    ks[1] = randn((B, 2 * Hkv * D, lens[1]), dtype, device).transpose(1, 2)[..., ::2]
    assert not qs[0].is_contiguous() and ks[1].stride(-1) != 1
    _, _, _, qw, kw, rope, _ = _inputs(case, dtype, device)
    ref_outs, _, ref_grads = _reference(case, qs, ks, vs, qw, kw, [torch.ones(B, L, Hq * D) for L in lens])
    qs_l, ks_l, vs_l = _leaves(qs, ks, vs)
    with use_backend(backend):
        outs = mmkernels.joint_attention(qs_l, ks_l, vs_l, num_heads=Hq, num_kv_heads=Hkv, q_norm=qw, k_norm=kw,
                                         rope=rope)
        sum(o.sum() for o in outs).backward()
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, dtype=dtype, what="output")
    for g, r in zip(_grads(qs_l, ks_l, vs_l), ref_grads):
        assert_close(g, r, dtype=dtype, what="grad")


@pytest.mark.parametrize("norm", ["full", "head"])
@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_zero_eps(backend, device, norm):
    """norm_eps=0 is allowed: the padded token slots of a kernel tile (rsqrt(0) = inf there) must not leak NaN
    into the norm-weight gradients. Lengths 5 and 3 leave padding in every tile."""
    case = (1, (5, 3), 2, 1, 64, norm, (8, 1, 1), (20, 22, 22))
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, _dtype(backend), device)
    outs, grads = _run(backend, case, qs, ks, vs, qw, kw, rope, dos, norm_eps=0.0)
    ref_outs, _, ref_grads = _reference(case, qs, ks, vs, qw, kw, dos, eps=0.0)
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, dtype=_dtype(backend), what="output")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype=_dtype(backend), what="grad")


@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_deterministic_grads_are_bitwise_equal(backend, device):
    case = CASES[0]
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, _dtype(backend), device)
    first = _run(backend, case, qs, ks, vs, qw, kw, rope, dos, deterministic=True)[1]
    second = _run(backend, case, qs, ks, vs, qw, kw, rope, dos, deterministic=True)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_empty_streams_and_batch(backend, device):
    Hq, Hkv, D = 2, 1, 64
    # A zero-length stream between two others: its output and grads are empty, the others unaffected.
    lens = (5, 0, 4)
    case = (1, lens, Hq, Hkv, D, "full", (9, 1, 1), (20, 22, 22))
    dtype = _dtype(backend)
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, dtype, device)
    outs, grads = _run(backend, case, qs, ks, vs, qw, kw, rope, dos)
    ref_outs, _, ref_grads = _reference(case, qs, ks, vs, qw, kw, dos)
    assert outs[1].shape == (1, 0, Hq * D)
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, dtype=dtype, what="output")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype=dtype, what="grad")
    # B = 0.
    q, k = randn((0, 3, Hq * D), dtype, device), randn((0, 3, Hkv * D), dtype, device)
    with use_backend(backend):
        (o,) = mmkernels.joint_attention([q], [k], [k], num_heads=Hq, num_kv_heads=Hkv)
    assert o.shape == (0, 3, Hq * D)


@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_opcheck(backend, device):
    case = (1, (5, 3), 2, 1, 64, "head", (2, 2, 2), (20, 22, 22))
    B, lens, Hq, Hkv, D, norm, grid, split = case
    qs, ks, vs, qw, kw, rope, _ = _inputs(case, _dtype(backend), device)
    g, s, base, off = rope.resolve("test", D, sum(lens))
    qs, ks, vs, qw, kw = _leaves(qs, ks, vs, qw, kw)
    torch.library.opcheck(torch.ops.mmkernels.joint_attention_fwd.default,
                          (qs, ks, vs, qw, kw, 1e-6, norm, list(g), list(s), base, list(off), Hq, Hkv, D ** -0.5,
                           False, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", _only_op_backends(backend_params()))
def test_compiles_fullgraph(backend, device, compiler):
    Hq, Hkv, D = 2, 1, 64
    dtype = _dtype(backend)
    rope = RoPE3DSpec(grid=(2, 2, 2), split=(20, 22, 22))
    qw = randn((Hq * D,), dtype, device, scale=0.3, shift=1.0)
    kw = randn((Hkv * D,), dtype, device, scale=0.3, shift=1.0)

    def fn(q0, q1, k0, k1, v0, v1):
        outs = mmkernels.joint_attention([q0, q1], [k0, k1], [v0, v1], num_heads=Hq, num_kv_heads=Hkv,
                                         q_norm=[qw, qw], k_norm=[kw, kw], rope=rope)
        o0, o1 = outs[0].float(), outs[1].float()  # an fp32 loss: check_compiled compares at fp32 tolerance
        return (o0 * o0).sum() + o1.sum()

    inputs = [randn((1, L, H * D), dtype, device) for H in (Hq, Hkv, Hkv) for L in (5, 3)]
    inputs = [inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5]]
    check_compiled(fn, inputs, backend, compiler)


# The cuda backend's two forward kernels (MMKERNELS_JA_CUDA_KERNEL=sm80|sm90): head dims 64/72/80/96/128, odd
# lengths, GQA, every norm, RoPE or none, plus lengths that span several 128-key tiles (the sm_90a kernel's 2-stage
# ring wraps around, its mbarrier phases flip), an exact multiple of 128 keys (no tail tile), a stream of 129 queries
# (a second CTA with one row), streams of <= 64 queries (the second consumer warpgroup has no valid row) and 1000
# keys over several full CTAs.
KERNEL_CASES = CASES + [
    (2, (190, 67), 4, 1, 72, "full", (257, 1, 1), None),
    (1, (300,), 2, 2, 128, "head", (3, 10, 10), None),
    (1, (129, 5), 2, 1, 96, None, None, None),
    (1, (64, 200), 8, 2, 80, "full", (4, 66, 1), None),
    (1, (256,), 2, 1, 64, "head", (4, 8, 8), None),
    (2, (700, 300), 8, 2, 72, "full", (10, 10, 10), None),  # 8 key tiles: the ring's phases are reused
]


def _kernel_params():
    return [pytest.param(k, dt, id=f"{k}-{str(dt).replace('torch.', '')}", marks=[pytest.mark.gpu])
            for k in ("sm80", "sm90") for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("kernel,dtype", _kernel_params())
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_ids)
def test_cuda_forward_kernels_match_reference(kernel, dtype, case, monkeypatch):
    """Each CUDA forward kernel, picked through MMKERNELS_JA_CUDA_KERNEL, against the fp64 reference: every stream's
    output and the LSE. sm90 is skipped (with the reason) off Hopper or without 9.0a in the build."""
    from mmkernels import _ext
    from mmkernels.ops.joint_attention import cuda as ja_cuda

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    device = torch.device("cuda")
    if kernel == "sm90":
        try:
            ja_cuda.select_kernel("sm90", torch.cuda.get_device_capability(device), _ext.compiled_archs())
        except RuntimeError as e:
            pytest.skip(f"the sm_90a kernel cannot run here: {e}")
    monkeypatch.setenv(ja_cuda.KERNEL_ENV, kernel)
    expected_fn = _ext.C.joint_attention_fwd_sm90 if kernel == "sm90" else _ext.C.joint_attention_fwd
    assert ja_cuda._forward_fn(device) is expected_fn
    B, lens, Hq, Hkv, D, norm, grid, split = case
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, dtype, "cuda")
    g, s, base, off = rope.resolve("test", D, sum(lens)) if rope else ((), (), 10000.0, ())
    outs, lse = torch.ops.mmkernels.joint_attention_fwd(qs, ks, vs, qw or [], kw or [], 1e-6, norm or "full", list(g),
                                                        list(s), base, list(off), Hq, Hkv, D ** -0.5, False, "cuda")
    ref_outs, ref_lse, _ = _reference(case, qs, ks, vs, qw, kw, dos)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == dtype and o.shape == r.shape and o.is_contiguous()
        assert_close(o, r, dtype=dtype, what=f"{kernel} output of stream {i}")
    assert_close(lse, ref_lse, dtype=dtype, what=f"{kernel} lse")


@pytest.mark.gpu
def test_cuda_sm90_kernel_is_refused_off_hopper(monkeypatch):
    """Off Hopper, asking for the sm_90a kernel is a clear error (from the Python selection and from _C itself)."""
    from mmkernels import _ext

    if _ext.C is None:
        pytest.skip(f"mmkernels._C is not built: {_ext.C_ERROR}")
    if torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("this GPU is a Hopper: the sm_90a kernel is allowed here")
    case = CASES[1]
    qs, ks, vs, qw, kw, rope, _ = _inputs(case, torch.float16, "cuda")
    monkeypatch.setenv("MMKERNELS_JA_CUDA_KERNEL", "sm90")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="MMKERNELS_JA_CUDA_KERNEL=sm90.*compute capability"):
        mmkernels.joint_attention(qs, ks, vs, num_heads=2, num_kv_heads=2, q_norm=qw, k_norm=kw, norm="head",
                                  rope=rope)
    q = qs[0]
    k = torch.zeros(1, 2, q.shape[1], 64, dtype=q.dtype, device=q.device)
    out, lse = torch.empty_like(q), torch.empty(1, 2, q.shape[1], device=q.device)
    with pytest.raises(ValueError, match="runs only on Hopper"):
        _ext.C.joint_attention_fwd_sm90(q, None, None, None, k, k, out, lse, 0, 0, 1e-6, [], 0.125)


@pytest.mark.parametrize("choice,capability,archs,expected", [
    ("auto", (9, 0), ["8.0", "9.0a"], "sm90"),
    ("", (9, 0), ["8.0", "9.0a"], "sm90"),
    ("auto", (9, 0), ["8.0"], "sm80"),        # no sm_90a image: the sm_80 cubin runs on Hopper
    ("auto", (8, 0), ["8.0", "9.0a"], "sm80"),
    ("auto", (8, 9), ["8.0", "9.0a"], "sm80"),
    ("auto", (10, 0), ["8.0", "9.0a"], "sm80"),
    (" SM80 ", (9, 0), ["8.0", "9.0a"], "sm80"),
    ("sm90", (9, 0), ["8.0", "9.0a"], "sm90"),
    ("sm90", (9, 0), ["9.0a"], "sm90"),
])
def test_cuda_kernel_selection(choice, capability, archs, expected):
    from mmkernels.ops.joint_attention import cuda as ja_cuda

    assert ja_cuda.select_kernel(choice, capability, archs) == expected


@pytest.mark.parametrize("choice,capability,archs,exc,match", [
    ("sm75", (9, 0), ["8.0", "9.0a"], ValueError, r"MMKERNELS_JA_CUDA_KERNEL='sm75' is not one of auto, sm80, sm90"),
    ("hopper", (9, 0), ["8.0", "9.0a"], ValueError, "MMKERNELS_JA_CUDA_KERNEL"),
    ("sm90", (8, 0), ["8.0", "9.0a"], RuntimeError, r"sm90.*compute capability 8\.0"),
    ("sm90", (10, 0), ["8.0", "9.0a"], RuntimeError, r"compute capability 10\.0"),
    ("sm90", (9, 0), ["8.0"], RuntimeError, "without 9.0a"),
])
def test_cuda_kernel_selection_rejects_clearly(choice, capability, archs, exc, match):
    from mmkernels.ops.joint_attention import cuda as ja_cuda

    with pytest.raises(exc, match=match):
        ja_cuda.select_kernel(choice, capability, archs)


def test_triton_rejects_what_it_cannot_run():
    q = randn((1, 4, 64), torch.float64)
    with use_backend("triton"), pytest.raises(BackendError, match="triton"):
        mmkernels.joint_attention([q], [q], [q], num_heads=1, num_kv_heads=1)
    with use_backend("cuda"), pytest.raises(BackendError, match="backend 'cuda' was requested"):
        mmkernels.joint_attention([q], [q], [q], num_heads=1, num_kv_heads=1)


def _bad(**overrides):
    Hq, Hkv, D = 4, 2, 64
    args = dict(qs=[randn((2, 5, Hq * D)), randn((2, 3, Hq * D))],
                ks=[randn((2, 5, Hkv * D)), randn((2, 3, Hkv * D))],
                vs=[randn((2, 5, Hkv * D)), randn((2, 3, Hkv * D))],
                num_heads=Hq, num_kv_heads=Hkv)
    args.update(overrides)
    qs, ks, vs = args.pop("qs"), args.pop("ks"), args.pop("vs")
    return mmkernels.joint_attention(qs, ks, vs, **args)


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(qs=[randn((2, 5, 256)), randn((3, 3, 256))]), ValueError, r"qs\[1\].*batch 3"),
    (dict(ks=[randn((2, 5, 128)), randn((2, 3, 64))]), ValueError, r"ks\[1\].*width 2\*64"),
    (dict(vs=[randn((2, 5, 128)), randn((2, 4, 128))]), ValueError, r"vs\[1\].*4 tokens"),
    (dict(num_kv_heads=3), ValueError, "divisible by num_kv_heads"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(rope=RoPE3DSpec(grid=(2, 2, 3))), ValueError, r"rope.grid.*12 tokens.*8"),
    (dict(rope=RoPE3DSpec(grid=(8, 1, 1), split=(20, 20, 20))), ValueError, "rope.split"),
    (dict(rope=(8, 1, 1)), TypeError, "RoPE3DSpec"),
    (dict(qs=[randn((2, 5, 4 * 12)), randn((2, 3, 4 * 12))], ks=[randn((2, 5, 24)), randn((2, 3, 24))],
          vs=[randn((2, 5, 24)), randn((2, 3, 24))]), ValueError, "head dim 12"),
    (dict(qs=[randn((2, 5, 4 * 300)), randn((2, 3, 4 * 300))]), ValueError, "head dim 300"),
    (dict(q_norm=[randn((256,))]), TypeError, "q_norm.*2 weight"),
    (dict(k_norm=[randn((64,)), randn((64,))]), ValueError, r"k_norm\[0\].*\[128\]"),
    (dict(q_norm=[randn((64,)), randn((64,))], norm="per_head"), ValueError, "norm"),
    (dict(ks=[randn((2, 5, 128))]), ValueError, "same number of streams"),
    (dict(qs=[]), TypeError, "non-empty sequence"),
    (dict(qs=randn((2, 5, 256))), TypeError, "sequence of tensors"),
    (dict(qs=[randn((2, 5, 256)), randn((2, 3, 256), dtype=torch.float16)]), TypeError, "dtype"),
    (dict(qs=[randn((2, 5, 256)), randn((2, 256))]), ValueError, r"qs\[1\].*3 dims"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_clearly(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**overrides)


def test_autocast_does_not_leak_into_the_op():
    """Under autocast the op keeps its own precision: fp32 inputs give fp32 outputs, equal to those outside."""
    case = CASES[0]
    qs, ks, vs, qw, kw, rope, dos = _inputs(case, torch.float32, "cpu")
    B, lens, Hq, Hkv, D, norm, grid, split = case
    plain = _run("torch", case, qs, ks, vs, qw, kw, rope, dos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _run("torch", case, qs, ks, vs, qw, kw, rope, dos)
    for a, b in zip(plain[0] + plain[1], cast[0] + cast[1]):
        assert b.dtype == torch.float32 and torch.equal(a, b)
