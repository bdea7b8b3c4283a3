"""models/unpair_seg/pixel_decoder.py: forward_features against a plain-PyTorch composition of spec §2 / §3 written
here from the state dict (explicit LayerNorm2d / LayerNorm / GroupNorm, random-Fourier PE, pixel-centre reference
points, the deformable core by grid_sample per §3.2) on random weights; the official key layout and parameter
count (§9) on the meta device; the §3.1 / §2 initialisation; the fp32 regime under an outer autocast; bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.pixel_decoder import MSDeformAttnPixelDecoder

TINY_SHAPE = {"stem": (40, 4), "res2": (40, 4), "res3": (80, 8), "res4": (160, 16), "res5": (320, 32),
              "clip_vis_dense": (320, 32)}
OFFICIAL_SHAPE = {"res2": (192, 4), "res3": (384, 8), "res4": (768, 16), "res5": (1536, 32)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _features(n: int, h: int, w: int, shape=TINY_SHAPE, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, c, h // s, w // s, generator=g) for k, (c, s) in shape.items()}


def _randomize(dec: torch.nn.Module, seed: int = 1, offset_scale: float = 0.3) -> None:
    """Perturb every parameter; the zero-initialised offset and attention projections get full random weights
    (offset_scale 0.3: offsets of a few pixels, non-uniform attention) so that sampling errors cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.copy_(offset_scale * noise)
            else:
                p.add_(0.1 * noise)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = UnpairSegConfig.tiny()
    dec = MSDeformAttnPixelDecoder(cfg, TINY_SHAPE)
    _randomize(dec)
    return dec


# ---------------------------------------------------------------------------------------------------------------------
# the reference


def _ln2d(x, w, b, eps):
    u = x.mean(1, keepdim=True)
    v = ((x - u) ** 2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(v + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _ln(x, w, b, eps=1e-5):
    u = x.mean(-1, keepdim=True)
    v = ((x - u) ** 2).mean(-1, keepdim=True)
    return (x - u) / torch.sqrt(v + eps) * w + b


def _gn(x, groups, w, b, eps=1e-5):
    n, c, h, ww = x.shape
    y = x.reshape(n, groups, -1)
    u = y.mean(-1, keepdim=True)
    v = ((y - u) ** 2).mean(-1, keepdim=True)
    y = ((y - u) / torch.sqrt(v + eps)).reshape(n, c, h, ww)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _pe(G, h, w):
    """[h*w, 2F] random-Fourier encoding at pixel centres: z = 2 pi (2 c - 1) @ G, (sin z, cos z)."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    c = torch.stack([xs.repeat(h), ys.repeat_interleave(w)], -1)
    z = 2 * math.pi * ((2 * c - 1) @ G.double())
    return torch.cat([z.sin(), z.cos()], -1).float()


def _deform_core(value, shapes, loc, attn):
    """value [N, S, M, D]; loc [N, Q, M, L, P, 2]; attn [N, Q, M, L, P] -> [N, Q, M*D] (spec §3.2)."""
    n, s, m, d = value.shape
    q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    start, sampled = 0, []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(n * m, q, P, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, -2).reshape(n * m, d, q, L * P)  # [N*M, D, Q, L*P]
    a = attn.permute(0, 2, 1, 3, 4).reshape(n * m, 1, q, L * P)
    return (sampled * a).sum(-1).reshape(n, m * d, q).transpose(1, 2)


def _reference(sd: dict, feats: dict, cfg: UnpairSegConfig):
    C, M, P = cfg.conv_dim, cfg.enc_heads, cfg.enc_points
    n = feats["res2"].shape[0]
    srcs, poss, shapes = [], [], []
    for lvl, name in enumerate(("res5", "res4", "res3")):
        x = F.conv2d(feats[name], sd[f"input_proj.{lvl}.0.weight"], sd[f"input_proj.{lvl}.0.bias"])
        x = _ln2d(x, sd[f"input_proj.{lvl}.1.weight"], sd[f"input_proj.{lvl}.1.bias"], 1e-6)
        h, w = x.shape[-2:]
        shapes.append((h, w))
        srcs.append(x.flatten(2).transpose(1, 2))
        poss.append(_pe(sd["pe_layer.positional_encoding_gaussian_matrix"], h, w) + sd["transformer.level_embed"][lvl])
    L = len(shapes)
    src, pos = torch.cat(srcs, 1), torch.cat(poss, 0)[None]
    ref = torch.cat([torch.stack([((torch.arange(w) + 0.5) / w).repeat(h),
                                  ((torch.arange(h) + 0.5) / h).repeat_interleave(w)], -1) for h, w in shapes], 0)
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (W_l, H_l)
    S = src.shape[1]
    j = 0
    while f"transformer.encoder.layers.{j}.norm1.weight" in sd:
        p = f"transformer.encoder.layers.{j}."
        q = src + pos
        value = (src @ sd[p + "self_attn.value_proj.weight"].T + sd[p + "self_attn.value_proj.bias"])
        off = q @ sd[p + "self_attn.sampling_offsets.weight"].T + sd[p + "self_attn.sampling_offsets.bias"]
        logit = q @ sd[p + "self_attn.attention_weights.weight"].T + sd[p + "self_attn.attention_weights.bias"]
        attn = torch.softmax(logit.reshape(n, S, M, L * P), -1).reshape(n, S, M, L, P)
        loc = ref[None, :, None, None, None, :] + off.reshape(n, S, M, L, P, 2) / norm[None, None, None, :, None, :]
        core = _deform_core(value.reshape(n, S, M, C // M), shapes, loc, attn)
        a = core @ sd[p + "self_attn.output_proj.weight"].T + sd[p + "self_attn.output_proj.bias"]
        src = _ln(src + a, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        f = torch.relu(src @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"])
        f = f @ sd[p + "linear2.weight"].T + sd[p + "linear2.bias"]
        src = _ln(src + f, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        j += 1
    out, start = [], 0
    for h, w in shapes:
        out.append(src[:, start:start + h * w].transpose(1, 2).reshape(n, C, h, w))
        start += h * w
    g = cfg.norm_groups
    lat = _gn(F.conv2d(feats["res2"], sd["adapter_1.weight"]), g, sd["adapter_1.norm.weight"],
              sd["adapter_1.norm.bias"])
    y = lat + F.interpolate(out[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
    y = torch.relu(_gn(F.conv2d(y, sd["layer_1.weight"], padding=1), g, sd["layer_1.norm.weight"],
                       sd["layer_1.norm.bias"]))
    mask = F.conv2d(y, sd["mask_features.weight"], sd["mask_features.bias"])
    return mask, out


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(128, 96), (64, 64)])
def test_forward_features_matches_reference(tiny, hw):
    h, w = hw
    feats = _features(2, h, w)
    with torch.no_grad():
        mask, out0, ms = tiny.forward_features(feats)
        ref_mask, ref_out = _reference(tiny.state_dict(), feats, tiny.cfg)
    C = tiny.cfg.conv_dim
    assert mask.shape == (2, tiny.cfg.mask_dim, h // 4, w // 4) and mask.dtype == torch.float32
    assert [tuple(t.shape) for t in ms] == [(2, C, h // 32, w // 32), (2, C, h // 16, w // 16), (2, C, h // 8, w // 8)]
    assert out0 is ms[0]
    assert _rel(mask, ref_mask) <= 1e-4
    for a, b in zip(ms, ref_out):
        assert _rel(a, b) <= 1e-4


def test_reference_sees_the_deformable_sampling(tiny):
    """The comparison is sensitive to the sampling: moving the offsets by a tenth of a pixel changes the output."""
    feats = _features(1, 128, 96)
    sd = dict(tiny.state_dict())
    with torch.no_grad():
        mask, _ = _reference(sd, feats, tiny.cfg)
        sd["transformer.encoder.layers.1.self_attn.sampling_offsets.bias"] = (
            sd["transformer.encoder.layers.1.self_attn.sampling_offsets.bias"] + 0.1)
        moved, _ = _reference(sd, feats, tiny.cfg)
    assert _rel(moved, mask) > 1e-3


def test_fp32_regime_ignores_outer_autocast_and_casts_features(tiny):
    feats = _features(1, 64, 96)
    with torch.no_grad():
        mask, _, ms = tiny.forward_features(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask_ac, _, ms_ac = tiny.forward_features({k: v.bfloat16() for k, v in feats.items()})
        ref_mask, _ = _reference(tiny.state_dict(), {k: v.bfloat16().float() for k, v in feats.items()}, tiny.cfg)
    assert mask_ac.dtype == torch.float32 and all(t.dtype == torch.float32 for t in ms_ac)
    assert _rel(mask_ac, ref_mask) <= 1e-4


def test_bf16_option_runs_and_is_close():
    """bf16 vs fp32 on the same weights. The offsets come out of a bf16 linear (as under any autocast), so their
    rounding (2^-9 of the offset) times the spatial gradient of the value map sets the error; on uncorrelated random
    features that is the dominant term, hence offsets of about a pixel here (offset_scale 0.1)."""
    fp32 = MSDeformAttnPixelDecoder(UnpairSegConfig.tiny(), TINY_SHAPE)
    _randomize(fp32, seed=2, offset_scale=0.1)
    dec = MSDeformAttnPixelDecoder(UnpairSegConfig.tiny(pixel_decoder_dtype="bf16"), TINY_SHAPE)
    dec.load_state_dict(fp32.state_dict())
    feats = _features(2, 128, 96)
    with torch.no_grad():
        mask32, _, ms32 = fp32.forward_features(feats)
        mask16, _, ms16 = dec.forward_features(feats)
    assert mask16.dtype == torch.float32 and all(t.dtype == torch.float32 for t in ms16)
    assert _rel(mask16, mask32) <= 3e-2
    for a, b in zip(ms16, ms32):
        assert _rel(a, b) <= 3e-2
    assert not torch.equal(mask16, mask32)  # it did run in a lower precision


def test_backward_reaches_every_parameter(tiny):
    feats = _features(1, 64, 64)
    mask, _, ms = tiny.forward_features(feats)
    g = torch.Generator().manual_seed(3)
    loss = (mask * torch.randn(mask.shape, generator=g)).sum() + sum(t.square().mean() for t in ms)
    tiny.zero_grad()
    loss.backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    tiny.zero_grad(set_to_none=True)


def test_official_keys_and_counts_on_meta():
    with torch.device("meta"):
        dec = MSDeformAttnPixelDecoder(UnpairSegConfig.official(), OFFICIAL_SHAPE)
    sd = dec.state_dict()
    assert len(sd) == 118
    assert sum(p.numel() for p in dec.parameters()) == 5_790_144
    assert sum(b.numel() for b in dec.buffers()) == 256
    expect = {"input_proj.0.0.weight": (256, 1536, 1, 1), "input_proj.1.0.weight": (256, 768, 1, 1),
              "input_proj.2.0.weight": (256, 384, 1, 1), "input_proj.2.0.bias": (256,),
              "input_proj.0.1.weight": (256,), "input_proj.0.1.bias": (256,), "transformer.level_embed": (3, 256),
              "pe_layer.positional_encoding_gaussian_matrix": (2, 128),
              "mask_features.weight": (256, 256, 1, 1), "mask_features.bias": (256,),
              "adapter_1.weight": (256, 192, 1, 1), "adapter_1.norm.weight": (256,), "adapter_1.norm.bias": (256,),
              "layer_1.weight": (256, 256, 3, 3), "layer_1.norm.weight": (256,), "layer_1.norm.bias": (256,)}
    for j in range(6):
        p = f"transformer.encoder.layers.{j}.self_attn."
        expect.update({p + "sampling_offsets.weight": (192, 256), p + "sampling_offsets.bias": (192,),
                       p + "attention_weights.weight": (96, 256), p + "attention_weights.bias": (96,),
                       p + "value_proj.weight": (256, 256), p + "output_proj.weight": (256, 256)})
        p = f"transformer.encoder.layers.{j}."
        expect.update({p + "norm1.weight": (256,), p + "norm2.bias": (256,), p + "linear1.weight": (1024, 256),
                       p + "linear2.weight": (256, 1024)})
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "adapter_1.bias" not in sd and "layer_1.bias" not in sd
    assert "transformer.encoder.layers.6.norm1.weight" not in sd and "adapter_2.weight" not in sd


def test_official_initialisation():
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(UnpairSegConfig.official(), OFFICIAL_SHAPE)
    # sampling_offsets bias: head h points along angle 2 pi h / 8 scaled to unit max-norm, point p at distance p + 1
    dirs = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    expect = dirs[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]
    expect = expect.expand(8, 3, 4, 2)
    for layer in dec.transformer.encoder.layers:
        attn = layer.self_attn
        assert torch.allclose(attn.sampling_offsets.bias.view(8, 3, 4, 2), expect, atol=1e-6)
        assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.bias) == 0
        assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0
        bound = math.sqrt(6.0 / (256 + 1024))  # xavier_uniform of the FFN
        assert layer.linear1.weight.abs().max() <= bound and layer.linear1.weight.std() > bound / 3
    assert abs(dec.transformer.level_embed.std().item() - 1.0) < 0.1  # N(0, 1)
    for i, c in enumerate((1536, 768, 384)):
        conv, norm = dec.input_proj[i]
        assert conv.in_channels == c and torch.count_nonzero(conv.bias) == 0
        assert conv.weight.abs().max() <= math.sqrt(6.0 / (c + 256))
        assert norm.eps == 1e-6
    for conv in (dec.adapter_1, dec.layer_1):
        assert conv.bias is None and isinstance(conv.norm, torch.nn.GroupNorm)
        assert conv.norm.num_groups == 32 and conv.norm.eps == 1e-5
    fan_in = 256 * 9  # c2_xavier_fill: kaiming_uniform(a=1) -> bound sqrt(3 / fan_in)
    assert dec.layer_1.weight.abs().max() <= math.sqrt(3.0 / fan_in)
    assert torch.count_nonzero(dec.mask_features.bias) == 0


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError, match="input_shape lacks"):
        MSDeformAttnPixelDecoder(UnpairSegConfig.tiny(), {"res3": (80, 8), "res4": (160, 16), "res5": (320, 32)})
    with pytest.raises(TypeError, match=r"input_shape\['res2'\] must be a \(channels, stride\) pair"):
        MSDeformAttnPixelDecoder(UnpairSegConfig.tiny(), dict(TINY_SHAPE, res2=40))
    feats = _features(1, 64, 64)
    with pytest.raises(ValueError, match="features lacks 'res2'"):
        tiny.forward_features({k: v for k, v in feats.items() if k != "res2"})
    with pytest.raises(ValueError, match=r"features\['res4'\] must have shape \[N, 160"):
        tiny.forward_features(dict(feats, res4=torch.randn(1, 80, 4, 4)))
