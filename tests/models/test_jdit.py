"""J-DiT (models/lavin_dit/jdit.py) against the spec (../shared/specs/lavin_dit.md §1): key set and sizes, and an
independent plain-PyTorch composition of the official math (written here from the spec), forward and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmkernels.testing import assert_close
from models.lavin_dit.config import JDiTConfig
from models.lavin_dit.jdit import JDiT, patchify, unpatchify

TINY = JDiTConfig.preset("tiny")


def _official_keys(D, depth, nh, g, p=2, C=16):
    hd, nkv, inner = D // nh, nh // g, int((4 * D * 2 / 3) / 64) * 64
    keys = {}
    for e in ("cond_embedder", "x_embedder"):
        keys.update({f"{e}.0.weight": (D, p * p * C), f"{e}.0.bias": (D,), f"{e}.1.weight": (D,), f"{e}.1.bias": (D,)})
    keys.update({"prompt_embed": (1, D), "answer_embed": (1, D), "t_embedder.mlp.0.weight": (D, 256),
                 "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
                 "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
                 "final_layer.adaLN_modulation.1.weight": (D, D), "final_layer.adaLN_modulation.1.bias": (D,)})
    for i in range(depth):
        b = f"blocks.{i}"
        for s in ("cond", "x"):
            keys.update({f"{b}.joint_attn.{s}_q.weight": (nh * hd, D), f"{b}.joint_attn.{s}_k.weight": (nkv * hd, D),
                         f"{b}.joint_attn.{s}_v.weight": (nkv * hd, D), f"{b}.joint_attn.{s}_qnorm.weight": (nh * hd,),
                         f"{b}.joint_attn.{s}_knorm.weight": (nkv * hd,), f"{b}.joint_attn.{s}_proj.weight": (D, nh * hd),
                         f"{b}.{s}_mlp.gate_proj.weight": (inner, D), f"{b}.{s}_mlp.up_proj.weight": (inner, D),
                         f"{b}.{s}_mlp.down_proj.weight": (D, inner), f"{b}.{s}_modulation.1.weight": (4 * D, D),
                         f"{b}.{s}_modulation.1.bias": (4 * D,)})
    return keys


@pytest.mark.parametrize("name,params", [("3.4B", 3_398_976_064), ("default", 1_192_655_296),
                                         ("0.1B", 100_709_952), ("1.0B", 935_095_360)])
def test_official_key_set_and_size(name, params):
    cfg = JDiTConfig.preset(name)
    with torch.device("meta"):
        model = JDiT(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == _official_keys(cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.kv_group)
    assert sum(math.prod(s) for s in own.values()) == params
    if name == "3.4B":
        assert len(own) == 502


def test_config():
    assert JDiTConfig.preset("3.4B").resolved_rope_split() == (24, 24, 24)
    assert JDiTConfig.preset("0.1B").resolved_rope_split() == (20, 22, 22)
    assert JDiTConfig.from_official(hidden_size=2304, depth=22, num_heads=32, kv_group=4, patch_size=[2, 2],
                                    uncond_ratio=0.1) == JDiTConfig.preset("3.4B")
    with pytest.raises(ValueError, match="kv_group"):
        JDiTConfig(num_heads=16, kv_group=3)
    with pytest.raises(ValueError, match="rope_split"):
        JDiTConfig.preset("0.1B", rope_split=(21, 21, 22))
    with pytest.raises(ValueError, match="unknown argument"):
        JDiTConfig.from_official(mlp_ratio=4.0)
    with pytest.raises(ValueError, match="unknown preset"):
        JDiTConfig.preset("7B")


# ---------------------------------------------------------------------------------------------------------------
# The official math, written from the spec on the state dict (fp64).


def _rms(x, w=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _rope(x, grid, split, base=10000.0):
    """x [B, L, heads, hd], rotate-half per axis chunk; token n at (n // (H*W), (n // W) % H, n % W)."""
    T, H, W = grid
    n = torch.arange(x.shape[1])
    coords = (n // (H * W), (n // W) % H, n % W)
    out, start = [], 0
    for d, c in zip(split, coords):
        chunk = x[..., start:start + d]
        start += d
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        th = (c.double()[:, None] * inv[None])[None, :, None, :]
        a, b = chunk[..., :d // 2], chunk[..., d // 2:]
        out.append(torch.cat([a * th.cos() - b * th.sin(), b * th.cos() + a * th.sin()], -1))
    return torch.cat(out, -1)


def _f_forward(sd, cfg, x, t, cond):
    D, nh, nkv, hd, p, C = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.patch_size, 16
    B, Tx, H, W, _ = x.shape
    Tc = cond.shape[1]

    def lin(h, name, bias=True):
        return F.linear(h, sd[f"{name}.weight"], sd.get(f"{name}.bias") if bias else None)

    def embed(v, name):
        return F.layer_norm(lin(v.reshape(B, -1, p * p * C), f"{name}.0"), (D,), sd[f"{name}.1.weight"],
                            sd[f"{name}.1.bias"], 1e-5)

    c, h = embed(cond, "cond_embedder"), embed(x, "x_embedder")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([args.cos(), args.sin()], -1).double()
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    tc, tx = temb + sd["prompt_embed"], temb + sd["answer_embed"]
    grid = (Tc + Tx, H, W)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        mc = lin(F.silu(tc), f"{b}.cond_modulation.1").view(B, 4, 1, D)
        mx = lin(F.silu(tx), f"{b}.x_modulation.1").view(B, 4, 1, D)
        hs = {"cond": (1 + mc[:, 0]) * _rms(c), "x": (1 + mx[:, 0]) * _rms(h)}
        q = torch.cat([_rms(lin(hs[s], f"{b}.joint_attn.{s}_q"), sd[f"{b}.joint_attn.{s}_qnorm.weight"])
                       for s in ("cond", "x")], 1).view(B, -1, nh, hd)
        k = torch.cat([_rms(lin(hs[s], f"{b}.joint_attn.{s}_k"), sd[f"{b}.joint_attn.{s}_knorm.weight"])
                       for s in ("cond", "x")], 1).view(B, -1, nkv, hd)
        v = torch.cat([lin(hs[s], f"{b}.joint_attn.{s}_v") for s in ("cond", "x")], 1).view(B, -1, nkv, hd)
        split = cfg.resolved_rope_split()
        q, k = _rope(q, grid, split), _rope(k, grid, split)
        g = nh // nkv
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, -1, nh * hd)
        Lc = c.shape[1]
        ac, ax = lin(o[:, :Lc], f"{b}.joint_attn.cond_proj"), lin(o[:, Lc:], f"{b}.joint_attn.x_proj")
        c = c + torch.tanh(mc[:, 1]) * _rms(ac)
        h = h + torch.tanh(mx[:, 1]) * _rms(ax)
        for s, m in (("cond", mc), ("x", mx)):
            cur = c if s == "cond" else h
            hh = (1 + m[:, 2]) * _rms(cur)
            mlp = lin(F.silu(lin(hh, f"{b}.{s}_mlp.gate_proj")) * lin(hh, f"{b}.{s}_mlp.up_proj"),
                      f"{b}.{s}_mlp.down_proj")
            cur = cur + torch.tanh(m[:, 3]) * _rms(mlp)
            if s == "cond":
                c = cur
            else:
                h = cur
    scale = lin(F.silu(tx), "final_layer.adaLN_modulation.1").unsqueeze(1)
    out = lin((1 + scale) * _rms(h), "final_layer.linear")
    out = out.view(B, Tx, H, W, p, p, C).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, Tx, H * p, W * p)
    return out


def _randomized(cfg, seed=0):
    torch.manual_seed(seed)
    model = JDiT(cfg)
    with torch.no_grad():  # the official init zeroes modulations and the output: randomize everything
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("embedder.1.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


@pytest.mark.parametrize("Tc,Tx,H,W", [(3, 1, 2, 3), (1, 2, 3, 2)])
def test_matches_the_official_math_forward_and_grads(Tc, Tx, H, W):
    model = _randomized(TINY).double()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd_ref = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    B = 2
    x = torch.randn(B, Tx, H, W, TINY.patch_dim, dtype=torch.float64)
    cond = torch.randn(B, Tc, H, W, TINY.patch_dim, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64)
    out = model(x, t, cond)
    want = _f_forward(sd_ref, TINY, x, t, cond)
    assert out.dtype == torch.float32 and out.shape == (B, 16, Tx, 2 * H, 2 * W)
    assert_close(out.double(), want, dtype=torch.float32, what="velocity")
    dy = torch.randn_like(want)
    want.backward(dy)
    out.backward(dy.float())
    for name, p in model.named_parameters():
        ref = sd_ref[name].grad
        if ref is None:  # the last block's cond-stream update never reaches the output
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert_close(p.grad, ref, dtype=torch.float32, what=f"grad {name}")


def test_untrained_model_predicts_zero_and_patchify_round_trip():
    model = JDiT(TINY)
    lat = torch.randn(2, 16, 3, 6, 4)
    tok = patchify(lat, 2)
    assert tok.shape == (2, 3, 3, 2, 64)
    assert torch.equal(tok[0, 1, 2, 1, :16], lat[0, :, 1, 4, 2])  # (ph, pw, c) with c fastest
    assert torch.equal(unpatchify(tok.reshape(2, -1, 64), 3, 3, 2, 2, 16), lat)
    out = model(tok[:, 2:], torch.rand(2), tok[:, :2])
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialized final layer


def test_grad_checkpointing_and_drop_path():
    model = _randomized(TINY)
    x, cond, t = torch.randn(1, 1, 2, 2, 64), torch.randn(1, 2, 2, 2, 64), torch.rand(1)
    ref = model(x, t, cond)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x, t, cond)
    out.square().sum().backward()
    assert torch.equal(out, ref)
    for n, g in grads.items():
        assert_close(dict(model.named_parameters())[n].grad, g, dtype=torch.float32, what=n)
    dp = _randomized(JDiTConfig.preset("tiny", drop_path=0.5))
    dp.train()
    torch.manual_seed(3)
    a = dp(x.expand(8, -1, -1, -1, -1), t.expand(8), cond.expand(8, -1, -1, -1, -1))
    assert (a - a[:1]).flatten(1).abs().amax(1).max() > 1e-3  # identical samples, branches dropped differently
    dp.eval()
    b = dp(x.expand(8, -1, -1, -1, -1), t.expand(8), cond.expand(8, -1, -1, -1, -1))
    assert torch.allclose(b, b[:1].expand_as(b), atol=1e-6)  # eval: no stochastic depth


def test_bad_inputs():
    model = JDiT(TINY)
    x, cond, t = torch.randn(1, 1, 2, 2, 64), torch.randn(1, 2, 2, 2, 64), torch.rand(1)
    with pytest.raises(ValueError, match="'x' must be a patchified latent"):
        model(x[..., :32], t, cond)
    with pytest.raises(ValueError, match="share B, H and W"):
        model(x, t, cond[:, :, :1])
    with pytest.raises(ValueError, match="'t'"):
        model(x, torch.rand(2), cond)


def test_strict_loading_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from models.lavin_dit.convert import load_jdit

    src = _randomized(TINY)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "lavin_dit.safetensors")
    model = load_jdit(tmp_path / "lavin_dit.safetensors", TINY)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x, cond, t = torch.randn(1, 1, 2, 2, 64), torch.randn(1, 2, 2, 2, 64), torch.rand(1)
    assert torch.equal(model(x, t, cond), src(x, t, cond))
    sd = src.state_dict()
    sd["blocks.0.joint_attn.cond_qkv.weight"] = sd.pop("blocks.0.joint_attn.cond_q.weight")  # a fused-QKV export
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="missing.*cond_q.weight.*unexpected.*cond_qkv"):
        load_jdit(tmp_path / "bad.safetensors", TINY)


def test_model_on_the_triton_backend():
    """The whole J-DiT with its ops (adarn, joint attention) on the Triton backend (the CPU interpreter here) equals
    the torch backend, forward and input grads."""
    import mmkernels

    model = _randomized(TINY)
    x = torch.randn(1, 1, 2, 3, 64, requires_grad=True)
    cond = torch.randn(1, 2, 2, 3, 64)
    t = torch.rand(1)
    with mmkernels.use_backend("torch"):
        want = model(x, t, cond)
        (gw,) = torch.autograd.grad(want.square().sum(), x)
    with mmkernels.use_backend("triton"):
        out = model(x, t, cond)
        (g,) = torch.autograd.grad(out.square().sum(), x)
    assert_close(out, want, dtype=torch.float32, what="velocity on triton")
    assert_close(g, gw, dtype=torch.float32, what="grad on triton")
