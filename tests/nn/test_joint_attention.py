"""mmkernels.nn.JointAttention: loads the official LaVin-DiT ``joint_attn`` state dict and matches an independent
plain-PyTorch version of it (outputs and gradients), the 3B key set and shapes, the norm variants, autocast, custom
streams, every op backend, torch.compile, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
import mmkernels.nn as mnn
from mmkernels import use_backend
from mmkernels.testing import assert_close, randn
from tests.ops.common import backend_params

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ---------------------------------------------------------------------------------------------------------------
# An independent module, written from specs/lavin_dit.md §1.6-1.7 (the official blocks.py joint_attn) in plain torch.


class _PlainRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _plain_rope3d(x, grid, split, base=10000.0):
    """Rotate-half 3D RoPE of x [B, N, H, D] at the row-major (t, h, w) positions of ``grid``."""
    T, Hg, Wg = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hg), torch.arange(Wg), indexing="ij")
    out = []
    for coord, chunk, d in zip((t.flatten(), h.flatten(), w.flatten()), x.split(list(split), dim=-1), split):
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
        theta = coord.float()[:, None] * inv_freq[None, :]
        emb = torch.cat([theta, theta], dim=-1)
        cos, sin = emb.cos().to(x.dtype)[None, :, None, :], emb.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = chunk.chunk(2, dim=-1)
        out.append(chunk * cos + torch.cat([-x2, x1], dim=-1) * sin)
    return torch.cat(out, dim=-1)


class PlainJointAttention(nn.Module):
    """norm="full" with streams ("cond", "x") and bias=False is the official module."""

    def __init__(self, dim, nh, nkv, hd, norm="full", split=None, streams=("cond", "x"), bias=False, eps=1e-6):
        super().__init__()
        self.nh, self.nkv, self.hd, self.norm, self.streams = nh, nkv, hd, norm, streams
        self.split = split or (hd // 3,) * 3
        for s in streams:
            setattr(self, f"{s}_q", nn.Linear(dim, nh * hd, bias=bias))
            setattr(self, f"{s}_k", nn.Linear(dim, nkv * hd, bias=bias))
            setattr(self, f"{s}_v", nn.Linear(dim, nkv * hd, bias=bias))
            if norm is not None:
                setattr(self, f"{s}_qnorm", _PlainRMSNorm(nh * hd if norm == "full" else hd, eps))
                setattr(self, f"{s}_knorm", _PlainRMSNorm(nkv * hd if norm == "full" else hd, eps))
            setattr(self, f"{s}_proj", nn.Linear(nh * hd, dim, bias=bias))

    def _qk(self, s, which, x, heads):
        B, L, _ = x.shape
        norm = getattr(self, f"{s}_{which}norm", None)
        if self.norm == "full":
            x = norm(x)
        x = x.view(B, L, heads, self.hd)
        return norm(x) if self.norm == "head" else x

    def forward(self, *hs, grid=None):
        qs, ks, vs = [], [], []
        for s, h in zip(self.streams, hs):
            qs.append(self._qk(s, "q", getattr(self, f"{s}_q")(h), self.nh))
            ks.append(self._qk(s, "k", getattr(self, f"{s}_k")(h), self.nkv))
            vs.append(getattr(self, f"{s}_v")(h).view(h.shape[0], h.shape[1], self.nkv, self.hd))
        q, k, v = torch.cat(qs, dim=1), torch.cat(ks, dim=1), torch.cat(vs, dim=1)  # cond first
        if grid is not None:
            q, k = _plain_rope3d(q, grid, self.split), _plain_rope3d(k, grid, self.split)
        g = self.nh // self.nkv  # flash-attn GQA: query head j uses KV head j // g
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, dim=1),
                                           v.transpose(1, 2).repeat_interleave(g, dim=1), scale=self.hd ** -0.5)
        B, N = o.shape[0], o.shape[2]
        o = o.transpose(1, 2).reshape(B, N, self.nh * self.hd)
        outs = o.split([h.shape[1] for h in hs], dim=1)
        return tuple(getattr(self, f"{s}_proj")(x) for s, x in zip(self.streams, outs))


def _randomized(module, dtype=torch.float32, seed=0):
    """Random weights everywhere, norm weights around 1 (not all ones), biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(randn(p.shape, generator=g, scale=0.3, shift=1.0))
            else:
                p.copy_(randn(p.shape, generator=g, scale=p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1))
    return module.to(dtype)


def _pair(dim, nh, nkv, hd, dtype=torch.float32, **kw):
    """(plain official-style module with random weights, ours loaded from its state dict strictly)."""
    official = _randomized(PlainJointAttention(dim, nh, nkv, hd, split=kw.get("rope_split"),
                                               norm=kw.get("norm", "full") if kw.get("qk_norm", True) else None,
                                               streams=kw.get("streams", ("cond", "x")),
                                               bias=kw.get("bias", False)), dtype)
    ours = mnn.JointAttention(dim, nh, nkv, head_dim=hd, dtype=dtype, **kw)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


# (dim, nh, nkv, hd, T_c, T_x, H, W): GQA groups 2/2/1, head_dim != dim // nh in the last; odd stream lengths.
CONFIGS = [
    (96, 4, 2, 48, 3, 1, 3, 5),
    (144, 4, 2, 72, 1, 2, 1, 7),
    (64, 2, 1, 48, 2, 1, 5, 3),
]


def _inputs(dim, B, lens, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [randn((B, L, dim), dtype, generator=g) for L in lens]


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "dim{}-H{}x{}-D{}-T{}+{}-{}x{}".format(*c))
def test_matches_official_after_loading_its_state_dict(cfg, dtype):
    dim, nh, nkv, hd, Tc, Tx, H, W = cfg
    official, ours = _pair(dim, nh, nkv, hd, dtype)
    hs = _inputs(dim, 2, (Tc * H * W, Tx * H * W), dtype)
    grid = (Tc + Tx, H, W)
    for got, want, s in zip(ours(*hs, grid=grid), official(*hs, grid=grid), ("cond", "x")):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, tol=TOL[dtype], what=f"{s} stream")
    # Without RoPE too.
    for got, want in zip(ours(*hs), official(*hs)):
        assert_close(got, want, tol=TOL[dtype], what="no-RoPE output")
    # Rope must matter (the grid is really applied), and so does the GQA mapping (repeat, not interleave, differs).
    assert (ours(*hs, grid=grid)[1] - ours(*hs)[1]).abs().max() > 1e-3


def test_lavin_dit_3b_state_dict_keys_and_shapes():
    m = mnn.JointAttention(2304, 32, 8, device="meta")
    assert m.head_dim == 72 and m.rope_split == (24, 24, 24)
    expected = {}
    for s in ("cond", "x"):
        expected.update({f"{s}_q.weight": (2304, 2304), f"{s}_k.weight": (576, 2304), f"{s}_v.weight": (576, 2304),
                         f"{s}_qnorm.weight": (2304,), f"{s}_knorm.weight": (576,), f"{s}_proj.weight": (2304, 2304)})
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert list(m.named_buffers()) == []
    # Per block 153,968,256 parameters (spec §1.1) = this + SwiGLU MLPs 84,934,656 + modulations 42,485,760.
    assert sum(p.numel() for p in m.parameters()) == 26_547_840


def test_init_is_official():
    m = mnn.JointAttention(96, 4, 2, head_dim=48, bias=True)
    for name, p in m.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5  # xavier_uniform
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name


def test_gradients_match_official():
    dim, nh, nkv, hd, Tc, Tx, H, W = CONFIGS[0]
    dtype = torch.float64
    official, ours = _pair(dim, nh, nkv, hd, dtype)
    hs = _inputs(dim, 2, (Tc * H * W, Tx * H * W), dtype)
    g = torch.Generator().manual_seed(5)
    cots = [randn(h.shape, dtype, generator=g) for h in hs]
    grads = []
    for m in (official, ours):
        xs = [h.clone().requires_grad_(True) for h in hs]
        outs = m(*xs, grid=(Tc + Tx, H, W))
        sum((o * c).sum() for o, c in zip(outs, cots)).backward()
        grads.append(({n: p.grad for n, p in m.named_parameters()}, [x.grad for x in xs]))
    (want_p, want_x), (got_p, got_x) = grads
    assert got_p.keys() == want_p.keys()
    for name, gp in got_p.items():
        assert gp is not None and torch.isfinite(gp).all() and gp.abs().sum() > 0, name
        assert_close(gp, want_p[name], tol=1e-9, what=f"grad of {name}")
    for i, (a, b) in enumerate(zip(got_x, want_x)):
        assert_close(a, b, tol=1e-9, what=f"grad of hs[{i}]")


def test_gradients_fp32_and_deterministic_flag():
    dim, nh, nkv, hd, Tc, Tx, H, W = CONFIGS[1]
    official, ours = _pair(dim, nh, nkv, hd)
    hs = _inputs(dim, 1, (Tc * H * W, Tx * H * W), torch.float32)
    for m, det in ((official, None), (ours, True)):
        kw = {} if det is None else {"deterministic": det}
        sum(o.square().sum() for o in m(*hs, grid=(Tc + Tx, H, W), **kw)).backward()
    for name, p in ours.named_parameters():
        assert_close(p.grad, official.get_parameter(name).grad, tol=1e-4, what=f"fp32 grad of {name}")


@pytest.mark.parametrize("norm", ["head", None], ids=["head", "no_qk_norm"])
def test_norm_variants(norm):
    dim, nh, nkv, hd = 96, 4, 2, 48
    official, ours = _pair(dim, nh, nkv, hd, torch.float64, **({"norm": norm} if norm else {"qk_norm": False}))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if norm == "head":
        assert shapes["cond_qnorm.weight"] == (hd,) and shapes["x_knorm.weight"] == (hd,)
    else:
        assert not any("norm" in k for k in shapes) and len(shapes) == 8
    hs = _inputs(dim, 2, (9, 6), torch.float64)
    for got, want in zip(ours(*hs, grid=(5, 1, 3)), official(*hs, grid=(5, 1, 3))):
        assert_close(got, want, tol=1e-10, what=f"norm={norm}")
    sum(o.sum() for o in ours(*hs, grid=(5, 1, 3))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_custom_streams_bias_and_split():
    dim, nh, nkv, hd = 64, 2, 2, 64
    streams = ("a", "b", "c")
    official, ours = _pair(dim, nh, nkv, hd, torch.float64, streams=streams, bias=True, rope_split=(16, 24, 24))
    assert set(ours.state_dict()) == {f"{s}_{m}.{p}" for s in streams for m, p in
                                      [("q", "weight"), ("q", "bias"), ("k", "weight"), ("k", "bias"),
                                       ("v", "weight"), ("v", "bias"), ("qnorm", "weight"), ("knorm", "weight"),
                                       ("proj", "weight"), ("proj", "bias")]}
    hs = _inputs(dim, 2, (4, 1, 7), torch.float64)
    outs = ours(*hs, grid=(3, 2, 2))
    assert len(outs) == 3
    for got, want in zip(outs, official(*hs, grid=(3, 2, 2))):
        assert_close(got, want, tol=1e-10, what="3 streams")


def test_empty_stream():
    dim, nh, nkv, hd = 96, 4, 2, 48
    official, ours = _pair(dim, nh, nkv, hd, torch.float64)
    hs = [randn((2, 0, dim), torch.float64), randn((2, 10, dim), torch.float64)]
    got = ours(*hs, grid=(2, 1, 5))
    assert got[0].shape == (2, 0, dim)
    assert_close(got[1], official(*hs, grid=(2, 1, 5))[1], tol=1e-10)


def test_autocast():
    dim, nh, nkv, hd, Tc, Tx, H, W = CONFIGS[0]
    official, ours = _pair(dim, nh, nkv, hd)
    manual_m = mnn.JointAttention(dim, nh, nkv, head_dim=hd)
    manual_m.load_state_dict(ours.state_dict())
    hs = _inputs(dim, 2, (Tc * H * W, Tx * H * W), torch.float32)
    grid = (Tc + Tx, H, W)
    bf16 = torch.bfloat16
    with torch.autocast("cpu", dtype=bf16):
        outs = ours(*hs, grid=grid)
        # The same computation by hand: bf16 Linears, bf16 norm weights (as apex), the op outside autocast.
        m = manual_m
        qs = [getattr(m, f"{s}_q")(h) for s, h in zip(m.streams, hs)]
        ks = [getattr(m, f"{s}_k")(h) for s, h in zip(m.streams, hs)]
        vs = [getattr(m, f"{s}_v")(h) for s, h in zip(m.streams, hs)]
        qw = [getattr(m, f"{s}_qnorm").weight.to(bf16) for s in m.streams]
        kw = [getattr(m, f"{s}_knorm").weight.to(bf16) for s in m.streams]
    mid = mmkernels.joint_attention(qs, ks, vs, num_heads=nh, num_kv_heads=nkv, q_norm=qw, k_norm=kw,
                                    rope=mmkernels.RoPE3DSpec(grid))
    with torch.autocast("cpu", dtype=bf16):
        manual = [getattr(m, f"{s}_proj")(o) for s, o in zip(m.streams, mid)]
    for got, man, want in zip(outs, manual, official(*hs, grid=grid)):
        assert got.dtype == bf16
        assert torch.equal(got, man)
        assert_close(got, want, dtype=bf16, what="bf16 autocast vs fp32 official")
    # Gradients too: with autocast leaking into the op, its saved log-sum-exp would be a bf16 matmul's.
    sum(o.float().square().sum() for o in outs).backward()
    sum(o.float().square().sum() for o in manual).backward()
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, manual_m.get_parameter(name).grad), name


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("torch", "triton")])
def test_backends_match_official(backend, device):
    dim, nh, nkv, hd, Tc, Tx, H, W = CONFIGS[1]
    official, ours = _pair(dim, nh, nkv, hd)
    official, ours = official.to(device), ours.to(device)
    hs = [h.to(device) for h in _inputs(dim, 2, (Tc * H * W, Tx * H * W), torch.float32)]
    grid = (Tc + Tx, H, W)
    with use_backend(backend):
        outs = ours(*hs, grid=grid)
        sum(o.square().sum() for o in outs).backward()
    with torch.autocast(device, enabled=False):  # plain fp32 (SDPA may use TF32 only if the user enabled it)
        want = official(*hs, grid=grid)
        sum(o.square().sum() for o in want).backward()
    for got, w in zip(outs, want):
        assert_close(got, w, tol=1e-4, what=f"{backend}-{device} output")
    for name, p in ours.named_parameters():
        assert_close(p.grad, official.get_parameter(name).grad, tol=1e-3, what=f"{backend}-{device} grad of {name}")


@pytest.mark.slow
def test_compiles_fullgraph():
    dim, nh, nkv, hd, Tc, Tx, H, W = CONFIGS[0]
    _, ours = _pair(dim, nh, nkv, hd)
    hs = _inputs(dim, 2, (Tc * H * W, Tx * H * W), torch.float32)
    grid = (Tc + Tx, H, W)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for ac in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            got, want = compiled(*hs, grid=grid), ours(*hs, grid=grid)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            assert_close(a, b, tol=1e-5 if not ac else 1e-2, what=f"compiled (autocast={ac})")


def test_bad_input():
    m = mnn.JointAttention(96, 4, 2, head_dim=48)
    h = randn((1, 5, 96))
    with pytest.raises(ValueError, match=r"expected 2 stream tensors \(cond, x\).*got 1"):
        m(h)
    with pytest.raises(ValueError, match=r"expected 2 stream tensors.*got 3"):
        m(h, h, (2, 1, 5))  # the grid must be passed by keyword
    with pytest.raises(ValueError, match=r"'hs\[1\]' \(stream 'x'\) must be \[B, L, dim=96\], got shape \(1, 5, 64\)"):
        m(h, randn((1, 5, 64)))
    with pytest.raises(ValueError, match=r"'hs\[0\]'.*got shape \(5, 96\)"):
        m(randn((5, 96)), h)
    with pytest.raises(ValueError, match=r"'hs\[1\]'.*batch 2"):
        m(h, randn((2, 5, 96)))
    with pytest.raises(TypeError, match=r"'hs\[1\]'.*must be a torch.Tensor"):
        m(h, [1.0])
    with pytest.raises(ValueError, match="rope.grid"):
        m(h, h, grid=(3, 1, 5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=100, num_heads=3), "not divisible by num_heads"),
    (dict(dim=96, num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(dim=48, num_heads=4), "head_dim 12 is not supported"),
    (dict(dim=520, num_heads=1), "head_dim 520 is not supported"),
    (dict(dim=100, num_heads=5), "head_dim 20 is not supported"),
    (dict(dim=96, num_heads=2, head_dim=48, norm="layer"), "'norm' must be one of"),
    (dict(dim=96, num_heads=2, head_dim=48, streams=("x", "x")), "duplicate"),
    (dict(dim=96, num_heads=2, head_dim=48, streams=("cond.x",)), "identifiers"),
    (dict(dim=96, num_heads=2, head_dim=48, streams="x"), "'streams'"),
    (dict(dim=96, num_heads=2, head_dim=48, rope_split=(16, 16, 8)), "'rope_split'"),
    (dict(dim=96, num_heads=2, head_dim=48, rope_split=(15, 17, 16)), "'rope_split'"),
    (dict(dim=0, num_heads=2), "'dim'"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mnn.JointAttention(**kwargs)


def test_head_dim_64_needs_a_split_only_for_rope():
    m = mnn.JointAttention(128, 2)
    assert m.rope_split is None
    h = randn((1, 6, 128))
    assert m(h, h)[0].shape == (1, 6, 128)  # no RoPE: fine
    with pytest.raises(ValueError, match="divisible by 6"):
        m(h, h, grid=(2, 2, 3))


# ---------------------------------------------------------------------------------------------------------------
# Packed sequences (segments): each segment equals the official module run on it alone.


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("torch", "triton")])
def test_segments_equal_separate_calls(backend, device):
    """Three sequences packed along L (different cond lengths, one with an empty target part, each with its own
    grid) give, per segment, the official module's outputs and, summed over segments, its parameter gradients."""
    dim, nh, nkv, hd = 96, 4, 2, 48
    official, ours = _pair(dim, nh, nkv, hd)
    official, ours = official.to(device), ours.to(device)
    H, W = 2, 3
    plan = [(3, 1), (1, 1), (2, 0)]  # (T_c, T_x) of each sequence
    segs = [mnn.Segment((tc * H * W, tx * H * W), (tc + tx, H, W)) for tc, tx in plan]
    B = 2
    hs = [h.to(device) for h in _inputs(dim, B, (sum(s.lengths[0] for s in segs), sum(s.lengths[1] for s in segs)),
                                        torch.float32)]
    with use_backend(backend):
        outs = ours(*hs, segments=segs)
        sum((o * (1 + i)).square().sum() for i, o in enumerate(outs)).backward()
    offsets = [0, 0]
    want = [[], []]
    for seg in segs:
        parts = [h[:, o:o + n] for h, o, n in zip(hs, offsets, seg.lengths)]
        offsets = [o + n for o, n in zip(offsets, seg.lengths)]
        with torch.autocast(device, enabled=False):
            got = official(*parts, grid=seg.grid)
        for i, g in enumerate(got):
            want[i].append(g)
    want = [torch.cat(w, dim=1) for w in want]
    sum((w * (1 + i)).square().sum() for i, w in enumerate(want)).backward()
    tol = 1e-5 if backend == "torch" else 1e-4
    for got, w in zip(outs, want):
        assert got.shape == w.shape
        assert_close(got, w, tol=tol, what=f"{backend} segmented output")
    for name, p in ours.named_parameters():
        assert_close(p.grad, official.get_parameter(name).grad, tol=10 * tol, what=f"{backend} grad of {name}")


def test_segments_bad_input():
    m = mnn.JointAttention(96, 4, 2, head_dim=48)
    hs = (randn((1, 12, 96)), randn((1, 6, 96)))
    with pytest.raises(ValueError, match="either 'grid' or 'segments'"):
        m(*hs, grid=(3, 2, 3), segments=[mnn.Segment((12, 6), (3, 2, 3))])
    with pytest.raises(ValueError, match=r"sum to \[12, 5\] per stream.*\[12, 6\]"):
        m(*hs, segments=[mnn.Segment((6, 3)), mnn.Segment((6, 2))])
    with pytest.raises(ValueError, match=r"segments\[1\] must be a Segment with one length >= 0 per stream"):
        m(*hs, segments=[mnn.Segment((6, 3)), (6, 3)])
    with pytest.raises(ValueError, match=r"segments\[0\] must be a Segment"):
        m(*hs, segments=[mnn.Segment((6, -1))])
    with pytest.raises(ValueError, match="non-empty sequence of Segment"):
        m(*hs, segments=[])
    with pytest.raises(ValueError, match="rope.grid"):  # a segment's grid must cover exactly that segment
        m(*hs, segments=[mnn.Segment((12, 6), (2, 2, 3))])
