"""models/unpair_seg/backbone.py: the frozen ConvNeXt CLIP against plain-PyTorch compositions written here from its
state dict (trunk stages, region head, text tower), the official config's channel table and key layout (spec §1, §9)
on the meta device, freezing, and that nothing is downloaded."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from models.unpair_seg.backbone import CLIPBackbone
from models.unpair_seg.config import UnpairSegConfig
from tests.models.unpair_seg.common import randomize_


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bb = CLIPBackbone(UnpairSegConfig.tiny())
    randomize_(bb.clip_model)
    return bb


# ---------------------------------------------------------------------------------------------------------------------
# plain-PyTorch references, from the state dict


def _ln_channels(x, w, b, eps):
    """LayerNorm over dim 1 of [N, C, ...] with biased variance."""
    u = x.mean(1, keepdim=True)
    v = ((x - u) ** 2).mean(1, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - u) / torch.sqrt(v + eps) * w.view(shape) + b.view(shape)


def _ln_last(x, w, b, eps=1e-5):
    u = x.mean(-1, keepdim=True)
    v = ((x - u) ** 2).mean(-1, keepdim=True)
    return (x - u) / torch.sqrt(v + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _trunk_reference(sd: dict, x: torch.Tensor) -> dict:
    """ConvNeXt: 4x4/4 patch conv + LN; per stage (after the first) LN + 2x2/2 conv; blocks x + gamma * fc2(GELU(fc1(
    LN(dwconv7x7(x))))). 1x1-conv MLP weights ([4C, C, 1, 1], timm's conv_mlp) and Linear ones are the same map."""
    p = "visual.trunk."
    x = F.conv2d(x, sd[p + "stem.0.weight"], sd[p + "stem.0.bias"], stride=4)
    x = _ln_channels(x, sd[p + "stem.1.weight"], sd[p + "stem.1.bias"], 1e-6)
    out = {"stem": x}
    for s in range(4):
        q = f"{p}stages.{s}."
        if q + "downsample.0.weight" in sd:
            x = _ln_channels(x, sd[q + "downsample.0.weight"], sd[q + "downsample.0.bias"], 1e-6)
            x = F.conv2d(x, sd[q + "downsample.1.weight"], sd[q + "downsample.1.bias"], stride=2)
        j = 0
        while f"{q}blocks.{j}.gamma" in sd:
            r = f"{q}blocks.{j}."
            c = x.shape[1]
            y = F.conv2d(x, sd[r + "conv_dw.weight"], sd[r + "conv_dw.bias"], padding=3, groups=c)
            y = _ln_channels(y, sd[r + "norm.weight"], sd[r + "norm.bias"], 1e-6)
            w1 = sd[r + "mlp.fc1.weight"].reshape(4 * c, c)
            w2 = sd[r + "mlp.fc2.weight"].reshape(c, 4 * c)
            y = torch.einsum("oc,nchw->nohw", w1, y) + sd[r + "mlp.fc1.bias"].view(1, -1, 1, 1)
            y = _gelu(y)
            y = torch.einsum("oc,nchw->nohw", w2, y) + sd[r + "mlp.fc2.bias"].view(1, -1, 1, 1)
            x = x + sd[r + "gamma"].view(1, -1, 1, 1) * y
            j += 1
        out[f"res{s + 2}"] = x
    return out


def _text_reference(sd: dict, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIP text tower by hand: embeddings + positions, pre-LN blocks with causal multi-head attention and a GELU
    MLP, ln_final, the features at the highest token id (EOT), @ text_projection."""
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    T, n, d = x.shape[0], x.shape[1], x.shape[2]
    hd = d // heads
    causal = torch.full((n, n), float("-inf")).triu(1)
    j = 0
    while f"transformer.resblocks.{j}.ln_1.weight" in sd:
        r = f"transformer.resblocks.{j}."
        h = _ln_last(x, sd[r + "ln_1.weight"], sd[r + "ln_1.bias"])
        qkv = h @ sd[r + "attn.in_proj_weight"].T + sd[r + "attn.in_proj_bias"]
        q, k, v = (t.reshape(T, n, heads, hd).transpose(1, 2) for t in qkv.split(d, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1)
        o = (a @ v).transpose(1, 2).reshape(T, n, d)
        x = x + o @ sd[r + "attn.out_proj.weight"].T + sd[r + "attn.out_proj.bias"]
        h = _ln_last(x, sd[r + "ln_2.weight"], sd[r + "ln_2.bias"])
        h = _gelu(h @ sd[r + "mlp.c_fc.weight"].T + sd[r + "mlp.c_fc.bias"])
        x = x + h @ sd[r + "mlp.c_proj.weight"].T + sd[r + "mlp.c_proj.bias"]
        j += 1
    x = _ln_last(x, sd["ln_final.weight"], sd["ln_final.bias"])
    eot = tokens.argmax(-1)
    return x[torch.arange(T), eot] @ sd["text_projection"]


# ---------------------------------------------------------------------------------------------------------------------
# vision


def test_features_shapes_strides_and_trunk_reference(tiny):
    x = torch.randn(2, 3, 64, 96)
    feats = tiny(x)
    assert tiny.channels == {"stem": 40, "res2": 40, "res3": 80, "res4": 160, "res5": 320, "clip_vis_dense": 320}
    assert tiny.strides == {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32, "clip_vis_dense": 32}
    assert tiny.embed_dim == 64
    assert set(feats) == set(tiny.channels)
    for k, f in feats.items():
        assert f.shape == (2, tiny.channels[k], 64 // tiny.strides[k], 96 // tiny.strides[k]), k
        assert f.is_contiguous(), k
    ref = _trunk_reference(tiny.clip_model.state_dict(), x)
    for k in ("stem", "res2", "res3", "res4", "res5"):
        assert _rel(feats[k], ref[k]) < 1e-4, k
    assert torch.equal(feats["clip_vis_dense"], feats["res5"])


def test_frozen_forward_is_eval_and_no_grad(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.training
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    tiny.train()  # drop-path 0.1 would make forward random; forward re-calls eval() as officially
    try:
        a = tiny(x)
        assert not tiny.training
        b = tiny(x)
    finally:
        tiny.eval()
    assert all(not v.requires_grad for v in a.values())
    assert torch.equal(a["res5"], b["res5"])
    # extract_features keeps autograd for callers that need gradients through the frozen trunk
    g = tiny.extract_features(x)
    assert g["res5"].requires_grad
    g["res5"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_visual_prediction_forward_matches_head_and_passes_gradients(tiny):
    sd = tiny.clip_model.state_dict()
    x = torch.randn(2, 3, 320, requires_grad=True)
    y = tiny.visual_prediction_forward(x)
    assert y.shape == (2, 3, 64)
    h = _ln_last(x.detach(), sd["visual.trunk.head.norm.weight"], sd["visual.trunk.head.norm.bias"], 1e-6)
    h = _gelu(h @ sd["visual.head.mlp.fc1.weight"].T + sd["visual.head.mlp.fc1.bias"])
    ref = h @ sd["visual.head.mlp.fc2.weight"].T
    assert "visual.head.mlp.fc2.bias" not in sd
    assert _rel(y.detach(), ref) < 1e-5
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())
    with pytest.raises(ValueError, match="visual_prediction_forward: x must have shape"):
        tiny.visual_prediction_forward(torch.randn(2, 320))


def test_bad_image_inputs_raise(tiny):
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3, H, W\]"):
        tiny(torch.randn(1, 4, 64, 64))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        tiny(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# text


def test_tokenize_and_encode_text_match_reference(tiny):
    texts = ["a red circle", "two blue squares on the left of a big green triangle", "x"]
    tokens = tiny.tokenize(texts)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 77)
    assert (tokens[:, 0] == 49406).all()  # start-of-text
    assert (tokens.argmax(-1) == (tokens > 0).sum(-1) - 1).all()  # the end-of-text id is the largest, last
    assert (tokens.max(-1).values == 49407).all()
    emb = tiny.encode_text(tokens)
    assert emb.shape == (3, 64)
    ref = _text_reference(tiny.clip_model.state_dict(), tokens, heads=2)
    assert _rel(emb, ref) < 1e-4
    cls = tiny.get_text_classifier(texts)
    assert not cls.requires_grad
    assert torch.allclose(cls, emb, rtol=0, atol=1e-6)
    assert cls.norm(dim=-1).sub(1).abs().max() > 1e-2  # un-normalised, as officially
    with pytest.raises(TypeError, match="texts must be a list of str"):
        tiny.tokenize("a red circle")
    with pytest.raises(ValueError, match=r"tokens must have shape \[T, 77\]"):
        tiny.encode_text(tokens[:, :10])
    with pytest.raises(TypeError, match="tokens must be an int64"):
        tiny.encode_text(tokens.float())


# ---------------------------------------------------------------------------------------------------------------------
# the official config (meta device: no memory, no weights) and offline construction


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_official_config_channels_and_keys_on_meta(no_network):
    with torch.device("meta"):
        bb = CLIPBackbone(UnpairSegConfig.official())
    # the spec §1 table for "_large" (stem, res2..res5), read off the trunk
    assert [bb.channels[k] for k in ("stem", "res2", "res3", "res4", "res5")] == [192, 192, 384, 768, 1536]
    assert bb.channels["clip_vis_dense"] == 1536
    assert bb.strides == {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32, "clip_vis_dense": 32}
    assert bb.embed_dim == 768 and bb.context_length == 77
    sd = {f"backbone.clip_model.{k}": v for k, v in bb.clip_model.state_dict().items()}
    assert len(sd) == 543
    n = sum(v.numel() for v in sd.values())
    assert n == 351_772_609 and abs(n - 351.8e6) < 0.05e6
    p = "backbone.clip_model."
    t = p + "visual.trunk."
    expect = {
        t + "stem.0.weight": (192, 3, 4, 4), t + "stem.1.weight": (192,), t + "stem.1.bias": (192,),
        t + "stages.0.blocks.0.gamma": (192,), t + "stages.0.blocks.0.conv_dw.weight": (192, 1, 7, 7),
        t + "stages.2.blocks.26.mlp.fc1.weight": (3072, 768), t + "stages.2.blocks.26.mlp.fc2.weight": (768, 3072),
        t + "stages.3.blocks.2.norm.weight": (1536,),
        t + "stages.1.downsample.0.weight": (192,), t + "stages.1.downsample.1.weight": (384, 192, 2, 2),
        t + "stages.3.downsample.1.weight": (1536, 768, 2, 2),
        t + "head.norm.weight": (1536,), t + "head.norm.bias": (1536,),
        p + "visual.head.mlp.fc1.weight": (1536, 1536), p + "visual.head.mlp.fc1.bias": (1536,),
        p + "visual.head.mlp.fc2.weight": (768, 1536),
        p + "positional_embedding": (77, 768), p + "text_projection": (768, 768), p + "logit_scale": (),
        p + "token_embedding.weight": (49408, 768), p + "ln_final.weight": (768,),
        p + "transformer.resblocks.15.attn.in_proj_weight": (2304, 768),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert p + "visual.head.mlp.fc2.bias" not in sd
    assert p + "transformer.resblocks.16.ln_1.weight" not in sd
    assert [len([k for k in sd if k.startswith(f"{t}stages.{s}.blocks.") and k.endswith(".gamma")])
            for s in range(4)] == [3, 3, 27, 3]
    assert p + "attn_mask" not in sd  # non-persistent
    assert all(not q.requires_grad for q in bb.parameters())


def test_builds_and_tokenizes_offline(no_network):
    bb = CLIPBackbone(UnpairSegConfig.tiny())
    tokens = bb.tokenize(["a cat"])
    assert tokens.shape == (1, 77)
    with torch.device("meta"):
        off = CLIPBackbone(UnpairSegConfig.official())
    assert torch.equal(off.tokenize(["a cat"]), tokens)  # the same bundled BPE vocabulary, context 77


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="is not an open_clip model config"):
        CLIPBackbone(UnpairSegConfig(clip_model_name="convnext_does_not_exist"))
    cfg = UnpairSegConfig.tiny()
    bad = dict(cfg.clip_cfg, vision_cfg={"width": 64, "layers": 2, "patch_size": 16, "image_size": 64})
    with pytest.raises(ValueError, match="vision tower must be a timm ConvNeXt"):
        CLIPBackbone(UnpairSegConfig.tiny(clip_cfg=bad))
    with pytest.raises(TypeError, match="cfg must be an UnpairSegConfig"):
        CLIPBackbone({"clip_model_name": "convnext_large_d_320"})
