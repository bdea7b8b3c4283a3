"""The ST-VAE (models/lavin_dit/stvae.py) against the spec (../shared/specs/lavin_dit.md §2): key set, shapes, an
independent functional composition of the official math written here from the spec, streaming, tiling, loading."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmkernels.testing import assert_close
from models.lavin_dit.convert import load_stvae
from models.lavin_dit.stvae import LATENT_SCALE, LATENT_SHIFT, STVAE, DiagonalGaussian, STVAEConfig

TINY = STVAEConfig.tiny()


def _randomize(model, seed=0):
    """Random weights of a realistic scale (default inits leave biases small and norms at identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_layer.weight") or (p.dim() == 1 and "norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def _video(B, T, H, W, C=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, T, H, W, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# The official key set, written from the spec's tables (§2.2-2.7), independently of the model code.


def _official_keys(ch=(128, 256, 256, 512), layers=3, latent=16, cin=3, cout=3):
    keys = {}

    def conv(name, co, ci, k):
        keys[f"{name}.conv.weight"] = (co, ci, k, k, k)
        keys[f"{name}.conv.bias"] = (co,)

    def gn(name, c):
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    def spatial_norm(name, c):
        gn(f"{name}.norm_layer", c)
        conv(f"{name}.conv_y", c, latent, 1)
        conv(f"{name}.conv_b", c, latent, 1)

    def resnet(name, i, o, spatial):
        (spatial_norm if spatial else gn)(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        (spatial_norm if spatial else gn)(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            keys[f"{name}.conv_shortcut.weight"] = (o, i, 1, 1, 1)
            keys[f"{name}.conv_shortcut.bias"] = (o,)

    conv("encoder.conv_in", ch[0], cin, 3)
    prev = ch[0]
    for s, c in enumerate(ch):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{s}.resnets.{j}", prev if j == 0 else c, c, False)
        if s < len(ch) - 1:
            keys[f"encoder.down_blocks.{s}.downsamplers.0.conv.weight"] = (c, c, 3, 3)
            keys[f"encoder.down_blocks.{s}.downsamplers.0.conv.bias"] = (c,)
        prev = c
    for j in range(2):
        resnet(f"encoder.mid_block.resnets.{j}", ch[-1], ch[-1], False)
    gn("encoder.norm_out", ch[-1])
    conv("encoder.conv_out", 2 * latent, ch[-1], 3)

    rch = tuple(reversed(ch))
    conv("decoder.conv_in", rch[0], latent, 3)
    for j in range(2):
        resnet(f"decoder.mid_block.resnets.{j}", rch[0], rch[0], True)
    prev = rch[0]
    for s, c in enumerate(rch):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{s}.resnets.{j}", prev if j == 0 else c, c, True)
        if s < len(rch) - 1:
            keys[f"decoder.up_blocks.{s}.upsamplers.0.conv.weight"] = (c, c, 3, 3)
            keys[f"decoder.up_blocks.{s}.upsamplers.0.conv.bias"] = (c,)
        prev = c
    spatial_norm("decoder.norm_out", rch[-1])
    conv("decoder.conv_out", cout, rch[-1], 3)
    return keys


def test_official_key_set_and_size():
    with torch.device("meta"):
        model = STVAE(STVAEConfig.official())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == _official_keys()
    assert len(own) == 436  # spec §2.7
    total = sum(math.prod(s) for s in own.values())
    enc = sum(math.prod(s) for k, s in own.items() if k.startswith("encoder."))
    assert round(total / 1e6, 1) == 215.6 and round(enc / 1e6, 1) == 92.2


def test_tiny_key_set_follows_the_same_rules():
    own = {k: tuple(v.shape) for k, v in STVAE(TINY).state_dict().items()}
    assert own == _official_keys(TINY.block_out_channels, TINY.layers_per_block, TINY.latent_channels)


def test_strict_loading(tmp_path):
    src = _randomize(STVAE(TINY))
    sd = {f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}  # a DDP-wrapped export
    save_file(sd, tmp_path / "stvae.safetensors")
    model = load_stvae(tmp_path / "stvae.safetensors", TINY)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.save({"state_dict": src.state_dict()}, tmp_path / "stvae.pt")  # the official file layout
    model = load_stvae(tmp_path / "stvae.pt", TINY, dtype=torch.float64)
    assert model.encoder.conv_in.conv.weight.dtype == torch.float64
    bad = dict(src.state_dict())
    bad["decoder.up_blocks.0.resnets.0.norm1.conv_y.weight"] = bad.pop("decoder.up_blocks.0.resnets.0.norm1.conv_y.conv.weight")
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="missing.*conv_y.conv.weight.*unexpected"):
        load_stvae(tmp_path / "bad.safetensors", TINY)


# ---------------------------------------------------------------------------------------------------------------
# An independent functional composition of the official math (spec §2.2-2.7), on the state dict.


def _f_conv(sd, name, x, k):
    w, b = sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"]
    if k > 1:
        x = torch.cat([x[:, :, :1].expand(-1, -1, k - 1, -1, -1), x], dim=2)
    return F.conv3d(F.pad(x, [k // 2] * 4), w, b)


def _f_resize(zq, T, H, W):
    if T > 1 and T % 2 == 1:
        a = F.interpolate(zq[:, :, :1], size=(1, H, W), mode="nearest")
        b = F.interpolate(zq[:, :, 1:], size=(T - 1, H, W), mode="nearest")
        return torch.cat([a, b], 2)
    return F.interpolate(zq, size=(T, H, W), mode="nearest")


def _f_norm(sd, name, x, G, zq):
    if zq is None:
        return F.group_norm(x, G, sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)
    zq = _f_resize(zq, *x.shape[2:])
    n = F.group_norm(x, G, sd[f"{name}.norm_layer.weight"], sd[f"{name}.norm_layer.bias"], 1e-6)
    return n * _f_conv(sd, f"{name}.conv_y", zq, 1) + _f_conv(sd, f"{name}.conv_b", zq, 1)


def _f_resnet(sd, name, x, G, zq=None):
    h = _f_conv(sd, f"{name}.conv1", F.silu(_f_norm(sd, f"{name}.norm1", x, G, zq)), 3)
    h = _f_conv(sd, f"{name}.conv2", F.silu(_f_norm(sd, f"{name}.norm2", h, G, zq)), 3)
    if f"{name}.conv_shortcut.weight" in sd:
        x = F.conv3d(x, sd[f"{name}.conv_shortcut.weight"], sd[f"{name}.conv_shortcut.bias"])
    return x + h


def _f_frames(x, fn):
    B, C, T, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.reshape(B, T, *y.shape[1:]).transpose(1, 2)


def _f_encoder(sd, x, cfg):
    G, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = _f_conv(sd, "encoder.conv_in", x, 3)
    for s in range(n):
        for j in range(cfg.layers_per_block):
            x = _f_resnet(sd, f"encoder.down_blocks.{s}.resnets.{j}", x, G)
        if s < n - 1:
            if s < int(math.log2(cfg.temporal_compression_ratio)) and x.shape[2] > 1:
                B, C, T, H, W = x.shape  # the official (B*H*W, C, T) avg_pool1d
                seq = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, C, T)
                if T % 2:
                    seq = torch.cat([seq[..., :1], F.avg_pool1d(seq[..., 1:], 2, 2)], -1)
                else:
                    seq = F.avg_pool1d(seq, 2, 2)
                x = seq.reshape(B, H, W, C, -1).permute(0, 3, 4, 1, 2)
            w, b = sd[f"encoder.down_blocks.{s}.downsamplers.0.conv.weight"], sd[f"encoder.down_blocks.{s}.downsamplers.0.conv.bias"]
            x = _f_frames(x, lambda f, w=w, b=b: F.conv2d(F.pad(f, (0, 1, 0, 1)), w, b, stride=2))
    for j in range(2):
        x = _f_resnet(sd, f"encoder.mid_block.resnets.{j}", x, G)
    x = F.silu(F.group_norm(x, G, sd["encoder.norm_out.weight"], sd["encoder.norm_out.bias"], 1e-6))
    return _f_conv(sd, "encoder.conv_out", x, 3)


def _f_decoder(sd, z, cfg):
    G, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = _f_conv(sd, "decoder.conv_in", z, 3)
    for j in range(2):
        x = _f_resnet(sd, f"decoder.mid_block.resnets.{j}", x, G, z)
    for s in range(n):
        for j in range(cfg.layers_per_block + 1):
            x = _f_resnet(sd, f"decoder.up_blocks.{s}.resnets.{j}", x, G, z)
        if s < n - 1:
            if s < int(math.log2(cfg.temporal_compression_ratio)) and x.shape[2] > 1:
                x = torch.cat([F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2)),
                               F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2))], 2)
            else:
                x = F.interpolate(x, scale_factor=(1, 2, 2))
            w, b = sd[f"decoder.up_blocks.{s}.upsamplers.0.conv.weight"], sd[f"decoder.up_blocks.{s}.upsamplers.0.conv.bias"]
            x = _f_frames(x, lambda f, w=w, b=b: F.conv2d(f, w, b, padding=1))
    x = F.silu(_f_norm(sd, "decoder.norm_out", x, G, z))
    return _f_conv(sd, "decoder.conv_out", x, 3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "official"])
@pytest.mark.parametrize("T", [1, 5, 9])
def test_matches_the_functional_official_math(fused, T):
    model = _randomize(STVAE(TINY, fused=fused)).double()
    sd = model.state_dict()
    x = _video(2, T, 16, 24).double()
    moments = _f_encoder(sd, x, TINY)
    post = model.encode(x)
    assert post.mean.shape == (2, 16, 1 + (T - 1) // 4, 2, 3)
    mean, logvar = moments.chunk(2, dim=1)
    assert_close(post.mean, mean, dtype=torch.float64, what="mean")
    assert_close(post.logvar, logvar.clamp(-30, 20), dtype=torch.float64, what="logvar")
    z = torch.randn(2, 16, 1 + (T - 1) // 4, 2, 3, dtype=torch.float64)
    out = model.decode(z)
    assert out.shape == (2, 3, T, 16, 24)
    assert_close(out, _f_decoder(sd, z, TINY), dtype=torch.float64, what="decoded")


def test_fused_equals_official_path_fp32():
    fused = _randomize(STVAE(TINY, fused=True))
    official = STVAE(TINY, fused=False)
    official.load_state_dict(fused.state_dict())
    x = _video(1, 5, 16, 16)
    rec_f, post_f = fused(x, sample_posterior=False)
    rec_o, post_o = official(x, sample_posterior=False)
    assert_close(post_f.mean, post_o.mean, dtype=torch.float32, what="mean")
    assert_close(rec_f, rec_o, dtype=torch.float32, what="reconstruction")


def test_shape_contract_and_bad_inputs():
    model = STVAE(TINY)
    for T, t in ((1, 1), (5, 2), (13, 4)):
        post = model.encode(_video(1, T, 8, 16))
        assert post.mean.shape == (1, 16, t, 1, 2)
        assert model.decode(post.mode()).shape == (1, 3, T, 8, 16)
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        model.encode(_video(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(_video(1, 1, 12, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        model.encode(torch.randn(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        model.decode(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="chunk_frames"):
        model.encode(_video(1, 9, 8, 8), chunk_frames=3)
    with pytest.raises(ValueError, match="norm_stats"):
        model.encode(_video(1, 9, 8, 8), chunk_frames=4, norm_stats="global")


def test_image_and_video_round_trip_batched():
    model = _randomize(STVAE(TINY))
    x = _video(3, 9, 16, 16)
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    # Each batch item is independent: the batched pass equals per-item passes (images too).
    for i in range(3):
        assert_close(model.decode(post.mode()[i:i + 1]), model.decode(post.mode())[i:i + 1], dtype=torch.float32,
                     what=f"batch item {i}")
    img = x[:, :, :1]
    assert model.decode(model.encode(img).mode()).shape == img.shape


def test_posterior():
    moments = torch.randn(2, 8, 3, 2, 2) * 3
    moments[:, 4:, 0] = 50.0  # clamped to 20
    p = DiagonalGaussian(moments)
    assert p.logvar.max() == 20.0
    torch.manual_seed(5)
    a = p.sample()
    torch.manual_seed(5)
    eps = torch.randn(p.mean.shape)  # the official draw: CPU, global generator
    assert torch.equal(a, p.mean + p.std * eps)
    kl = 0.5 * (p.mean ** 2 + p.var - 1 - p.logvar).sum(dim=(1, 2, 3, 4))
    assert_close(p.kl(), kl, dtype=torch.float32, what="kl over every non-batch dim")


def test_latent_normalization_round_trip():
    z = torch.randn(2, 16, 1, 4, 4)
    lat = STVAE.to_dit_latent(z)
    assert_close(lat, (z - LATENT_SHIFT) * LATENT_SCALE, dtype=torch.float32, what="to_dit_latent")
    assert_close(STVAE.from_dit_latent(lat), z, dtype=torch.float32, what="round trip")


@pytest.mark.parametrize("chunk", [4, 8])
def test_streaming_encode_equals_full_pass(chunk):
    model = _randomize(STVAE(TINY)).double()
    x = _video(2, 13, 16, 16).double()
    full = model.encode(x)
    streamed = model.encode(x, chunk_frames=chunk)
    assert_close(streamed.mean, full.mean, dtype=torch.float64, what="streamed mean")
    assert_close(streamed.logvar, full.logvar, dtype=torch.float64, what="streamed logvar")
    # One chunk holding every frame is the full pass, also with per-chunk statistics.
    one = model.encode(x, chunk_frames=12, norm_stats="chunk")
    assert_close(one.mean, full.mean, dtype=torch.float64, what="single chunk")


@pytest.mark.parametrize("chunk", [1, 2])
def test_streaming_decode_equals_full_pass(chunk):
    model = _randomize(STVAE(TINY)).double()
    z = torch.randn(1, 16, 4, 2, 2, dtype=torch.float64)
    full = model.decode(z)
    assert_close(model.decode(z, chunk_frames=chunk), full, dtype=torch.float64, what="streamed decode")
    approx = model.decode(z, chunk_frames=chunk, norm_stats="chunk")
    assert approx.shape == full.shape and not torch.allclose(approx, full)  # per-chunk statistics do differ


def _blend_rows(tiles, extent, limit):
    """The official blending, written out with explicit loops over rows and columns (in place, as diffusers)."""
    rows = [[t.clone() for t in row] for row in tiles]
    out = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                above = rows[i - 1][j]
                e = min(above.shape[-2], tile.shape[-2], extent)
                for y in range(e):
                    tile[..., y, :] = above[..., -e + y, :] * (1 - y / e) + tile[..., y, :] * (y / e)
            if j > 0:
                left = row[j - 1]
                e = min(left.shape[-1], tile.shape[-1], extent)
                for x in range(e):
                    tile[..., x] = left[..., -e + x] * (1 - x / e) + tile[..., x] * (x / e)
            parts.append(tile[..., :limit, :limit])
        out.append(torch.cat(parts, -1))
    return torch.cat(out, -2)


def test_spatial_tiling_blends_as_official():
    model = _randomize(STVAE(TINY)).double()
    x = _video(1, 5, 40, 56).double()
    model.enable_tiling(32)  # stride 24, latent tile 4, blend extent 1 on encode
    tiled = model.encode(x)
    model.disable_tiling()
    tiles = [[model._run(model.encoder, x[..., i:i + 32, j:j + 32], None, 4, "exact") for j in range(0, 56, 24)]
             for i in range(0, 40, 24)]
    want = DiagonalGaussian(_blend_rows(tiles, extent=1, limit=3))
    assert_close(tiled.mean, want.mean, dtype=torch.float64, what="tiled encode mean")
    assert_close(tiled.logvar, want.logvar, dtype=torch.float64, what="tiled encode logvar")
    model.enable_tiling(32)
    z = torch.randn(1, 16, 2, 7, 5, dtype=torch.float64)
    dec = model.decode(z)  # latent tile 4 at stride 3, blend extent 8, crop 24
    model.disable_tiling()
    dtiles = [[model.decode(z[..., i:i + 4, j:j + 4]) for j in range(0, 5, 3)] for i in range(0, 7, 3)]
    assert_close(dec, _blend_rows(dtiles, extent=8, limit=24), dtype=torch.float64, what="tiled decode")
    untiled = model.decode(z)
    assert dec.shape == untiled.shape
    with pytest.raises(ValueError, match="multiple of 8"):
        model.enable_tiling(20)


def test_config_from_official_kwargs():
    # inference.py's constructor call; every architecture field at its official value.
    cfg = STVAEConfig.from_official(tile_sample_min_size=512, tile_sample_min_size_t=129, load_path="/x/stvae.pt")
    assert cfg == STVAEConfig.official()
    small = STVAEConfig.from_official(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                                      temporal_compression_ratio=2, act_fn="silu", use_quant_conv=False)
    assert small.block_out_channels == (16, 32) and small.spatial_ratio == 2 and small.time_stages == 1
    with pytest.raises(ValueError, match="act_fn"):
        STVAEConfig.from_official(act_fn="relu")
    with pytest.raises(ValueError, match="use_quant_conv"):
        STVAEConfig.from_official(use_quant_conv=True)
    with pytest.raises(ValueError, match="unknown argument"):
        STVAEConfig.from_official(latent_dim=8)
    with pytest.raises(ValueError, match="norm_num_groups"):
        STVAEConfig(block_out_channels=(16, 24), norm_num_groups=16)
    with pytest.raises(ValueError, match="temporal_compression_ratio"):
        STVAEConfig(block_out_channels=(16, 16), norm_num_groups=8, temporal_compression_ratio=4)


def test_convert_round_trip_and_load_from_state_dict():
    from models.lavin_dit.convert import load_official, official_to_ours, ours_to_official

    src = _randomize(STVAE(TINY))
    official = ours_to_official(src.state_dict())
    assert set(official) == set(_official_keys(TINY.block_out_channels, TINY.layers_per_block))
    back = official_to_ours({f"module._orig_mod.{k}": v for k, v in official.items()})
    dst = load_official(STVAE(TINY), back)
    x = _video(1, 1, 8, 8)
    assert torch.equal(dst.encode(x).mean, src.encode(x).mean)
    with pytest.raises(TypeError, match="STVAE"):
        load_official(torch.nn.Linear(2, 2), back)


def test_fused_model_on_the_triton_backend():
    """The whole fused model with its ops on the Triton backend (the CPU interpreter here) equals the torch backend."""
    import mmkernels

    model = _randomize(STVAE(TINY))
    x = _video(1, 5, 16, 16)
    z = torch.randn(1, 16, 2, 2, 2)
    with mmkernels.use_backend("torch"):
        want_mean, want_dec = model.encode(x).mean, model.decode(z)
    with mmkernels.use_backend("triton"):
        mean, dec = model.encode(x).mean, model.decode(z)
    assert_close(mean, want_mean, dtype=torch.float32, what="encode on triton")
    assert_close(dec, want_dec, dtype=torch.float32, what="decode on triton")
