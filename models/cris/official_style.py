"""CRIS written as the official code computes it, over a state dict: sequence-first nn.MultiheadAttention math
(F.multi_head_attention_forward), unfused convolutions and batch norms, positional encodings from the spec's
formulas, the dynamic kernel as a per-sample convolution; eval mode (BN running statistics, no dropout), fp32.

It is the test oracle of models/cris/model.py (a literal composition of ../shared/specs/cris.md §1-§4, written
independently of the model's modules) and the official-style baseline of bench/models/cris.py (same weights).
``spec_cris(state_dict, img, tokens, cfg)`` -> logits [B, 1, S/4, S/4].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F



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
    mask = torch.empty(L, L, device=tokens.device).fill_(float("-inf")).triu_(1)
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
    state = words[torch.arange(words.shape[0], device=tokens.device), tokens.argmax(-1)] @ sd["backbone.text_projection"]
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
    xs = torch.linspace(-1, 1, W, device=fq.device).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = torch.linspace(-1, 1, H, device=fq.device).view(1, 1, H, 1).expand(B, 1, H, W)
    fq = _cbr(torch.cat([fq, xs, ys], 1), sd, p + "coordconv.0.conv1.", 1)
    return _cbr(fq, sd, p + "coordconv.1.", 1)


def _pe2d(C, H, W, device="cpu"):
    """[HW, 1, C]: channels 2k / 2k+1 = sin / cos(col * w_k) for the first C/2, then the row; w_k = 10000^(-2k/(C/2))."""
    d = C // 2
    w = 10000.0 ** (-2.0 * torch.arange(d // 2, dtype=torch.float32, device=device) / d)
    col = torch.arange(W, dtype=torch.float32, device=device)[:, None] * w  # [W, d/2]
    row = torch.arange(H, dtype=torch.float32, device=device)[:, None] * w
    pe = torch.zeros(C, H, W, device=device)
    pe[0:d:2] = col.sin().t()[:, None, :].expand(-1, H, -1)
    pe[1:d:2] = col.cos().t()[:, None, :].expand(-1, H, -1)
    pe[d::2] = row.sin().t()[:, :, None].expand(-1, -1, W)
    pe[d + 1::2] = row.cos().t()[:, :, None].expand(-1, -1, W)
    return pe.reshape(C, H * W).t().unsqueeze(1)


def _pe1d(D, L, device="cpu"):
    """[L, 1, D]: the standard sine encoding, channel 2k / 2k+1 = sin / cos(pos * 10000^(-2k/D))."""
    w = 10000.0 ** (-2.0 * torch.arange(D // 2, dtype=torch.float32, device=device) / D)
    pos = torch.arange(L, dtype=torch.float32, device=device)[:, None] * w
    pe = torch.zeros(L, D, device=device)
    pe[:, 0::2], pe[:, 1::2] = pos.sin(), pos.cos()
    return pe.unsqueeze(1)


def _spec_decoder(sd, fq, words, pad_mask, cfg):
    B, C, H, W = fq.shape
    vis = fq.reshape(B, C, H * W).permute(2, 0, 1)
    txt = words.permute(1, 0, 2)
    vpos, tpos = _pe2d(C, H, W, fq.device), _pe1d(C, txt.shape[0], fq.device)
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
    B, _, H, W = x.shape
    # One grouped convolution over the batch, as the official Projector.
    out = F.conv2d(x.reshape(1, B * C, H, W), t[:, :-1].reshape(B, C, 3, 3), t[:, -1], padding=1, groups=B)
    return out.transpose(0, 1)


def spec_cris(sd, img, tokens, cfg):
    v3, v4, v5 = _spec_image(sd, img, cfg)
    words, state = _spec_text(sd, tokens, cfg)
    fq = _spec_neck(sd, v3, v4, v5, state)
    fq = _spec_decoder(sd, fq, words, tokens == 0, cfg)
    return _spec_proj(sd, fq, state)
