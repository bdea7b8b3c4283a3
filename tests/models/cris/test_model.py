"""CRIS model: against a plain-PyTorch composition of the spec written here from the state dict (sequence-first, as
the official code), the official key set and parameter counts, strict loading of official-layout checkpoints, the
CLIP loader (TorchScript archives read without running code), loss and shapes, bad input."""

import math
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from models.cris import CRIS, CRISConfig
from models.cris.convert import load_clip, load_official, ours_to_official, save_official
from models.common.torchscript import read_torchscript_state_dict
from mmkernels.testing import assert_close


def _randomize(model: CRIS, seed: int = 0) -> CRIS:
    """Random weights everywhere, including BN statistics (the default init has zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == torch.int64:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "1.weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / math.sqrt(max(1, t[0].numel() if t.dim() else 1))))
    return model


def _tokens(B, L, g):
    tok = torch.randint(1, 49406, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        tok[b, 0] = 49406
        tok[b, n - 1] = 49407
        tok[b, n:] = 0
    return tok


# ------------------------------------------------------------------------------------------------------------
# A literal composition of spec §1-§4 over the state dict (eval mode: BN with running statistics, no dropout).


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False,
                        0.0, 1e-5)


def _cbr(x, sd, p, pad):
    return F.relu(_bn(F.conv2d(x, sd[p + "0.weight"], padding=pad), sd, p + "1."))


def _bottleneck(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
    out = F.relu(_bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2."))
    if stride > 1:
        out = F.avg_pool2d(out, stride)
    out = _bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
    if p + "downsample.0.weight" in sd:
        idt = F.avg_pool2d(x, stride) if stride > 1 else x
        idt = _bn(F.conv2d(idt, sd[p + "downsample.0.weight"]), sd, p + "downsample.1.")
    else:
        idt = x
    return F.relu(out + idt)


def _spec_image(sd, img, cfg):
    p = "backbone.visual."
    x = F.relu(_bn(F.conv2d(img, sd[p + "conv1.weight"], stride=2, padding=1), sd, p + "bn1."))
    x = F.relu(_bn(F.conv2d(x, sd[p + "conv2.weight"], padding=1), sd, p + "bn2."))
    x = F.relu(_bn(F.conv2d(x, sd[p + "conv3.weight"], padding=1), sd, p + "bn3."))
    x = F.avg_pool2d(x, 2)
    feats = []
    for stage, n in enumerate(cfg.clip.vision_layers, start=1):
        for i in range(n):
            x = _bottleneck(x, sd, f"{p}layer{stage}.{i}.", 2 if (i == 0 and stage > 1) else 1)
        feats.append(x)
    x = feats[3]
    B, C, h, w = x.shape
    a = p + "attnpool."
    residual = _bn(F.conv2d(x, sd[a + "connect.0.weight"]), sd, a + "connect.1.")
    pe = sd[a + "positional_embedding"][1:]
    s = int(math.sqrt(pe.shape[0]))
    pe = F.interpolate(pe.permute(1, 0).reshape(1, C, s, s), (h, w), mode="bicubic", align_corners=False)
    tokens = (x.reshape(B, C, h * w) + pe.reshape(1, C, h * w)).permute(2, 0, 1)  # [hw, B, C]
    out, _ = F.multi_head_attention_forward(
        tokens, tokens, tokens, C, cfg.clip.vision_width * 32 // 64, None,
        torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]]), None, None, False, 0.0,
        sd[a + "c_proj.weight"], sd[a + "c_proj.bias"], use_separate_proj_weight=True,
        q_proj_weight=sd[a + "q_proj.weight"], k_proj_weight=sd[a + "k_proj.weight"],
        v_proj_weight=sd[a + "v_proj.weight"], training=False, need_weights=False)
    v5 = F.relu(out.permute(1, 2, 0).reshape(B, -1, h, w) + residual)
    return feats[1], feats[2], v5


def _spec_text(sd, tokens, cfg):
    L = tokens.shape[1]
    x = F.embedding(tokens, sd["backbone.token_embedding.weight"]) + sd["backbone.positional_embedding"][:L]
    x = x.permute(1, 0, 2)
    mask = torch.empty(L, L).fill_(float("-inf")).triu_(1)
    W = cfg.clip.text_width
    for i in range(cfg.clip.text_layers):
        p = f"backbone.transformer.resblocks.{i}."
        h = F.layer_norm(x, (W,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        h, _ = F.multi_head_attention_forward(h, h, h, W, cfg.clip.text_heads, sd[p + "attn.in_proj_weight"],
                                              sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
                                              training=False, need_weights=False, attn_mask=mask)
        x = x + h
        h = F.layer_norm(x, (W,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    words = F.layer_norm(x.permute(1, 0, 2), (W,), sd["backbone.ln_final.weight"], sd["backbone.ln_final.bias"], 1e-5)
    state = words[torch.arange(words.shape[0]), tokens.argmax(-1)] @ sd["backbone.text_projection"]
    return words, state


def _spec_neck(sd, v3, v4, v5, state):
    p = "neck."
    s = F.relu(F.batch_norm(state @ sd[p + "txt_proj.0.weight"].t(), sd[p + "txt_proj.1.running_mean"],
                            sd[p + "txt_proj.1.running_var"], sd[p + "txt_proj.1.weight"], sd[p + "txt_proj.1.bias"],
                            False, 0.0, 1e-5))[:, :, None, None]
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    f5 = F.relu(_bn(_cbr(v5, sd, p + "f1_v_proj.", 0) * s, sd, p + "norm_layer.0."))
    f4 = _cbr(torch.cat([_cbr(v4, sd, p + "f2_v_proj.", 1), up(f5)], 1), sd, p + "f2_cat.", 0)
    f3 = _cbr(torch.cat([F.avg_pool2d(_cbr(v3, sd, p + "f3_v_proj.", 1), 2, 2), f4], 1), sd, p + "f3_cat.", 0)
    fq = _cbr(torch.cat([_cbr(f3, sd, p + "f4_proj3.", 1), _cbr(f4, sd, p + "f4_proj4.", 1),
                         up(_cbr(f5, sd, p + "f4_proj5.", 1))], 1), sd, p + "aggr.", 0)
    B, _, H, W = fq.shape
    xs = torch.linspace(-1, 1, W).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = torch.linspace(-1, 1, H).view(1, 1, H, 1).expand(B, 1, H, W)
    fq = _cbr(torch.cat([fq, xs, ys], 1), sd, p + "coordconv.0.conv1.", 1)
    return _cbr(fq, sd, p + "coordconv.1.", 1)


def _pe2d(C, H, W):
    d = C // 2
    pe = torch.zeros(C, H, W)
    for k in range(d // 2):
        wk = 10000.0 ** (-2.0 * k / d)
        for col in range(W):
            pe[2 * k, :, col] = math.sin(col * wk)
            pe[2 * k + 1, :, col] = math.cos(col * wk)
        for row in range(H):
            pe[d + 2 * k, row, :] = math.sin(row * wk)
            pe[d + 2 * k + 1, row, :] = math.cos(row * wk)
    return pe.reshape(C, H * W).t().unsqueeze(1)  # [HW, 1, C]


def _pe1d(D, L):
    pe = torch.zeros(L, D)
    for pos in range(L):
        for k in range(D // 2):
            pe[pos, 2 * k] = math.sin(pos * 10000.0 ** (-2.0 * k / D))
            pe[pos, 2 * k + 1] = math.cos(pos * 10000.0 ** (-2.0 * k / D))
    return pe.unsqueeze(1)


def _spec_decoder(sd, fq, words, pad_mask, cfg):
    B, C, H, W = fq.shape
    vis = fq.reshape(B, C, H * W).permute(2, 0, 1)
    txt = words.permute(1, 0, 2)
    vpos, tpos = _pe2d(C, H, W), _pe1d(C, txt.shape[0])
    ln = lambda t, p: F.layer_norm(t, (t.shape[-1],), sd[p + "weight"], sd[p + "bias"], 1e-5)  # noqa: E731

    def mha(p, q, k, v, kpm=None):
        return F.multi_head_attention_forward(q, k, v, C, cfg.num_head, sd[p + "in_proj_weight"],
                                              sd[p + "in_proj_bias"], None, None, False, 0.0,
                                              sd[p + "out_proj.weight"], sd[p + "out_proj.bias"], training=False,
                                              key_padding_mask=kpm, need_weights=False)[0]

    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        a = ln(vis, p + "norm1.")
        vis = vis + ln(mha(p + "self_attn.", a + vpos, a + vpos, a), p + "self_attn_norm.")
        a = ln(vis, p + "norm2.")
        vis = vis + ln(mha(p + "multihead_attn.", a + vpos, txt + tpos, txt, pad_mask), p + "cross_attn_norm.")
        a = ln(vis, p + "norm3.")
        a = F.relu(F.linear(a, sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"]))
        a = F.linear(ln(a, p + "ffn.3."), sd[p + "ffn.4.weight"], sd[p + "ffn.4.bias"])
        vis = vis + a
    vis = ln(vis, "decoder.norm.")
    return vis.permute(1, 2, 0).reshape(B, C, H, W)


def _spec_proj(sd, x, state):
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    x = _cbr(up(x), sd, "proj.vis.1.", 1)
    x = _cbr(up(x), sd, "proj.vis.3.", 1)
    x = F.conv2d(x, sd["proj.vis.4.weight"], sd["proj.vis.4.bias"])
    t = F.linear(state, sd["proj.txt.weight"], sd["proj.txt.bias"])
    C = x.shape[1]
    outs = [F.conv2d(x[b:b + 1], t[b, :-1].reshape(1, C, 3, 3), t[b, -1:], padding=1) for b in range(x.shape[0])]
    return torch.cat(outs, 0)


def spec_cris(sd, img, tokens, cfg):
    v3, v4, v5 = _spec_image(sd, img, cfg)
    words, state = _spec_text(sd, tokens, cfg)
    fq = _spec_neck(sd, v3, v4, v5, state)
    fq = _spec_decoder(sd, fq, words, tokens == 0, cfg)
    return _spec_proj(sd, fq, state)


@pytest.mark.parametrize("input_size", [128, 96])
def test_matches_spec_composition(input_size):
    torch.manual_seed(0)
    cfg = CRISConfig.tiny(input_size=input_size)
    model = _randomize(CRIS(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, input_size, input_size, generator=g)
    tokens = _tokens(2, cfg.word_len, g)
    ours = model(img, tokens)
    assert ours.shape == (2, 1, input_size // 4, input_size // 4)
    expected = spec_cris({k: v.float() for k, v in model.state_dict().items()}, img, tokens, cfg)
    assert_close(ours, expected, dtype=torch.float32, tol=2e-4, what="CRIS logits")


def test_training_forward_loss_and_grads():
    cfg = CRISConfig.tiny(input_size=64)
    model = _randomize(CRIS(cfg)).train()
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 3, 64, 64, generator=g)
    tokens = _tokens(2, cfg.word_len, g)
    mask = torch.rand(2, 1, 64, 64, generator=g)
    pred, target, loss = model(img, tokens, mask)
    assert not pred.requires_grad and pred.shape == (2, 1, 16, 16)
    assert torch.equal(target, mask[:, :, ::4, ::4])  # nearest picks rows/cols 0, 4, 8, ...
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(pred, target))
    loss.backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == {"backbone.logit_scale"}  # as official: every other parameter trains
    with pytest.raises(ValueError, match="needs 'mask'"):
        model(img, tokens)


def test_official_key_set_and_shapes_rn50():
    model = CRIS(CRISConfig.cris_r50())
    sd = model.state_dict()
    counts = {}
    for k in sd:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    assert len(sd) == 662 and counts == {"backbone": 495, "neck": 77, "decoder": 74, "proj": 16}
    assert sum(p.numel() for p in model.parameters()) == 146_849_122
    assert list(sd)[:3] == ["backbone.positional_embedding", "backbone.text_projection", "backbone.logit_scale"]
    shapes = {  # spec §7
        "backbone.positional_embedding": (77, 512), "backbone.text_projection": (512, 1024),
        "backbone.logit_scale": (), "backbone.token_embedding.weight": (49408, 512),
        "backbone.transformer.resblocks.11.attn.in_proj_weight": (1536, 512),
        "backbone.transformer.resblocks.0.mlp.c_fc.weight": (2048, 512),
        "backbone.visual.conv1.weight": (32, 3, 3, 3), "backbone.visual.conv3.weight": (64, 32, 3, 3),
        "backbone.visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.visual.layer2.0.conv3.weight": (512, 128, 1, 1),
        "backbone.visual.attnpool.positional_embedding": (50, 2048),
        "backbone.visual.attnpool.q_proj.weight": (2048, 2048), "backbone.visual.attnpool.c_proj.weight": (1024, 2048),
        "backbone.visual.attnpool.connect.0.weight": (1024, 2048, 1, 1),
        "backbone.visual.attnpool.connect.1.num_batches_tracked": (),
        "neck.txt_proj.0.weight": (1024, 1024), "neck.f1_v_proj.0.weight": (1024, 1024, 1, 1),
        "neck.norm_layer.0.running_var": (1024,), "neck.f2_v_proj.0.weight": (512, 1024, 3, 3),
        "neck.f2_cat.0.weight": (512, 1536, 1, 1), "neck.f3_v_proj.0.weight": (256, 512, 3, 3),
        "neck.f3_cat.0.weight": (512, 768, 1, 1), "neck.f4_proj5.0.weight": (512, 1024, 3, 3),
        "neck.aggr.0.weight": (512, 1536, 1, 1), "neck.coordconv.0.conv1.0.weight": (512, 514, 3, 3),
        "neck.coordconv.1.0.weight": (512, 512, 3, 3),
        "decoder.layers.2.multihead_attn.in_proj_weight": (1536, 512),
        "decoder.layers.0.self_attn.out_proj.weight": (512, 512), "decoder.layers.1.ffn.3.weight": (2048,),
        "decoder.layers.1.ffn.4.weight": (512, 2048), "decoder.layers.0.cross_attn_norm.bias": (512,),
        "decoder.norm.weight": (512,), "proj.vis.1.0.weight": (512, 512, 3, 3), "proj.vis.3.1.running_mean": (256,),
        "proj.vis.4.bias": (256,), "proj.txt.weight": (2305, 1024),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_rn101_counts():
    model = CRIS(CRISConfig.cris_r101(word_len=22))
    assert len(model.state_dict()) == 968
    assert sum(p.numel() for p in model.parameters()) == 161_251_682
    assert model.state_dict()["proj.txt.weight"].shape == (2305, 512)


def test_load_official_checkpoint_strict(tmp_path):
    cfg = CRISConfig.tiny(input_size=64)
    src = _randomize(CRIS(cfg), seed=3)
    path = tmp_path / "best_model.pth"
    save_official(src, path)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    dst = load_official(CRIS(cfg), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    broken = ours_to_official(src.state_dict())
    broken.pop("module.neck.aggr.0.weight")
    broken["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing: neck.aggr.0.weight; 1 unexpected: extra.weight"):
        load_official(CRIS(cfg), broken)


def _clip_archive(cfg, path):
    """An OpenAI-style CLIP TorchScript archive (traced open_clip CLIP, the keys of OpenAI's RN models)."""
    from models.cris.model import _open_clip_model

    clip = _open_clip_model(cfg).eval()
    with torch.no_grad():
        for t in clip.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
    img = torch.randn(1, 3, cfg.clip.image_resolution, cfg.clip.image_resolution)
    text = torch.randint(0, 100, (1, cfg.clip.context_length))
    traced = torch.jit.trace(clip, (img, text), check_trace=False, strict=False)
    traced.save(str(path))
    return clip.state_dict()


def test_load_clip_from_torchscript_archive(tmp_path):
    cfg = CRISConfig.tiny(input_size=64)
    ref = _clip_archive(cfg, tmp_path / "RN50.pt")
    model = load_clip(CRIS(cfg), tmp_path / "RN50.pt")
    got = model.backbone.state_dict()
    for k, v in ref.items():
        if k == "attn_mask":
            continue
        fp16 = (k.endswith(("conv1.weight", "conv2.weight", "conv3.weight", "proj.weight", "proj.bias",
                            "in_proj_weight", "in_proj_bias", "c_fc.weight", "c_fc.bias", "0.weight"))
                or k == "text_projection") and "bn" not in k and "ln_" not in k
        expected = v.half().float() if fp16 and v.is_floating_point() else v
        assert torch.equal(got[k], expected), k
    w = model.backbone.visual.attnpool.connect[0].weight
    assert torch.equal(w, w.half().float())  # the fresh connect conv went through fp16 as well


def test_torchscript_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_torchscript_state_dict(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError):
        load_clip(CRIS(CRISConfig.tiny(input_size=64)), path)


def test_config_from_official():
    cfg = CRISConfig.from_official(clip_pretrain="pretrain/RN101.pt", word_len=22, word_dim=512,
                                   fpn_in=[512, 1024, 512], fpn_out=[256, 512, 1024], vis_dim=512, num_layers=3,
                                   num_head=8, dim_ffn=2048, dropout=0.1, intermediate=False, base_lr=1e-4,
                                   input_size=416)
    assert cfg == CRISConfig.cris_r101(word_len=22)
    with pytest.raises(ValueError, match="fpn_in"):
        CRISConfig.from_official(clip_pretrain="RN50.pt", fpn_in=[512, 1024, 512])
    with pytest.raises(ValueError, match="RN50.pt or RN101.pt"):
        CRISConfig.from_official(clip_pretrain="ViT-B-16.pt")


def test_bad_input():
    cfg = CRISConfig.tiny(input_size=64)
    model = CRIS(cfg).eval()
    img = torch.randn(1, 3, 64, 64)
    tok = _tokens(1, cfg.word_len, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="word_len = 17"):
        model(img, tok[:, :10])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 70, 64), tok)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(img, tok.repeat(2, 1))
    with pytest.raises(ValueError, match="'word' must be int64"):
        model(img, tok.float())
