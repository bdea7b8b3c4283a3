"""models/unpair_seg/mask_decoder.py against an independent plain-PyTorch composition of spec §5 written here from the
state dict: sequence-first like the official nn.MultiheadAttention layers, explicit per-head (q / sqrt(d)) k^T with
the official bool mask (True = blocked, [N*heads, Q*K, hw], index n*heads + head) filled with -inf, softmax, @ v;
hand-written bilinear content sampling and LayerNorm. Random weights (not the inits) and random inputs on an
awkward, non-square canvas; outputs, every aux head and parameter gradients are compared. Also: chunk / batch
invariance, a case that re-opens fully blocked rows, bf16 autocast, argument checks, and the official key / parameter
counts on the meta device (spec §9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.mask_decoder import MultiScaleMaskDecoder

CFG = UnpairSegConfig.tiny(image_size=128)  # hidden 32, 4 heads, dec_layers 4 (3 layers, one per level)
N, Q = 2, 3
LEVEL_SIZES = [(3, 5), (6, 9), (12, 19)]  # s32, s16, s8: odd, non-square, not a stride pyramid of each other
MASK_SIZE = (23, 37)


# ---------------------------------------------------------------------------------------------------------------------
# the reference


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _mha(sd, prefix, query, key, value, heads, blocked=None):
    """Sequence-first nn.MultiheadAttention: query [L, B, C], key/value [S, B, C], blocked [B*heads, L, S]."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    c = query.shape[-1]
    d = c // heads
    q = query @ w[:c].T + b[:c]
    k = key @ w[c:2 * c].T + b[c:2 * c]
    v = value @ w[2 * c:].T + b[2 * c:]
    outs = []
    for bi in range(query.shape[1]):
        per_head = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = (q[:, bi, sl] / math.sqrt(d)) @ k[:, bi, sl].T
            if blocked is not None:
                scores = scores.masked_fill(blocked[bi * heads + h], float("-inf"))
            per_head.append(torch.softmax(scores, dim=-1) @ v[:, bi, sl])
        outs.append(torch.cat(per_head, dim=-1))
    o = torch.stack(outs, dim=1)
    return o @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def _mlp(sd, prefix, x):
    for i in range(3):
        x = x @ sd[f"{prefix}layers.{i}.weight"].T + sd[f"{prefix}layers.{i}.bias"]
        if i < 2:
            x = torch.relu(x)
    return x


def _fourier(g, u, v):
    """u, v: coordinates in [0, 1] (any shape) -> [..., 2F]."""
    z = 2 * math.pi * ((2 * u - 1)[..., None] * g[0] + (2 * v - 1)[..., None] * g[1])
    return torch.cat([torch.sin(z), torch.cos(z)], dim=-1)


def _bilinear(fmap, cx, cy):
    """fmap [C, H, W], (cx, cy) in [0, 1] canvas fractions -> [C]; align_corners False, zeros outside."""
    _, hh, ww = fmap.shape
    ix, iy = cx * ww - 0.5, cy * hh - 0.5
    x0, y0 = math.floor(ix), math.floor(iy)
    out = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
        for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
            if 0 <= yy < hh and 0 <= xx < ww:
                out = out + wy * wx * fmap[:, yy, xx]
    return out


def reference(sd, cfg, x, mask_features, boxes, prompt_type, stats=None):
    c, heads, m = cfg.hidden_dim, cfg.dec_heads, cfg.num_masks
    n_img, n_q = boxes.shape[:2]
    k = m + 3
    # levels, sequence-first [hw, N, C]
    src, pos, sizes = [], [], []
    g = sd["pe_layer.positional_encoding_gaussian_matrix"]
    for i in range(3):
        h, w = x[i].shape[-2:]
        sizes.append((h, w))
        src.append(x[i].flatten(2).permute(2, 0, 1) + sd["level_embed.weight"][i])
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pe = _fourier(g, (xx.flatten() + 0.5) / w, (yy.flatten() + 0.5) / h)  # [hw, C]
        pos.append(pe[:, None, :].expand(h * w, n_img, c))
    # prompt tokens (spec §4) with the content sampled at the centre
    pg = sd["prompt_encoder.pos_emb.positional_encoding_gaussian_matrix"]
    s = cfg.image_size
    tokens = torch.empty(n_img, n_q, k, c)
    for n in range(n_img):
        for q in range(n_q):
            x1, y1, x2, y2 = boxes[n, q]
            content = _bilinear(mask_features[n], float((x1 + x2) / 2 / s), float((y1 + y2) / 2 / s))
            for corner, (px, py) in enumerate(((x1, y1), (x2, y2))):
                t = _fourier(pg, px / s, py / s) + sd["prompt_encoder.corner_emb"][0, corner] + content
                if prompt_type == "point":
                    t = t + sd["prompt_encoder.point_emb"][0, 0] + sd["prompt_encoder.attr_emb.weight"][1]
                else:
                    t = t + sd["prompt_encoder.box_emb"][0, 0]
                tokens[n, q, corner] = t
            tokens[n, q, 2:] = sd["prompt_encoder.mask_emb"][0]
    feats = torch.einsum("oc,nchw->nohw", sd["feat_embed.weight"][:, :, 0, 0], mask_features) + \
        sd["feat_embed.bias"][None, :, None, None]

    def head(out, target):
        y = _ln(out, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
        ids = list(range(1, m + 1)) if prompt_type == "point" else [0]
        emb = torch.stack([_mlp(sd, f"mask_embed.{j}.", y[:, :, 2 + j]) for j in ids], dim=2)
        iou = torch.stack([_mlp(sd, f"iou_embed.{j}.", y[:, :, 2 + j]) for j in ids], dim=2)[..., 0]
        masks = torch.einsum("nqkc,nchw->nqkhw", emb, feats)
        kk = len(ids)
        r = F.interpolate(masks.reshape(n_img, n_q * kk, *masks.shape[-2:]), size=target, mode="bilinear",
                          align_corners=False).reshape(n_img, n_q, kk, -1)
        fg = (torch.sigmoid(r) >= 0.5).any(dim=2)  # [N, Q, hw]
        blocked = torch.zeros(n_img * heads, n_q * k, r.shape[-1], dtype=torch.bool)
        for n in range(n_img):
            for hd in range(heads):
                for q in range(n_q):
                    blocked[n * heads + hd, q * k:(q + 1) * k] = ~fg[n, q]
        return masks, torch.sigmoid(iou), blocked

    def self_layer(prefix, t, qpos):
        qk = t if qpos is None else t + qpos
        return _ln(t + _mha(sd, prefix + "self_attn.", qk, qk, t, heads), sd[prefix + "norm.weight"],
                   sd[prefix + "norm.bias"])

    out = self_layer("extra_self_attention_layer.", tokens.reshape(n_img * n_q, k, c).permute(1, 0, 2), None)
    out = out.permute(1, 0, 2).reshape(n_img, n_q, k, c)
    masks, ious, blocked = head(out, sizes[0])
    preds = [(masks, ious)]
    for i in range(cfg.dec_layers - 1):
        lvl = i % 3
        full = blocked.all(dim=-1)
        if stats is not None:
            stats.setdefault("reopened", 0)
            stats.setdefault("partial", 0)
            stats["reopened"] += int(full.sum())
            stats["partial"] += int((blocked.any(-1) & ~full).sum())
        blocked = blocked.clone()
        blocked[full] = False
        pre = f"transformer_cross_attention_layers.{i}."
        o = out.reshape(n_img, n_q * k, c).permute(1, 0, 2)
        qp = tokens.reshape(n_img, n_q * k, c).permute(1, 0, 2)
        o = _ln(o + _mha(sd, pre + "multihead_attn.", o + qp, src[lvl] + pos[lvl], src[lvl], heads, blocked),
                sd[pre + "norm.weight"], sd[pre + "norm.bias"])
        o = o.reshape(n_q, k, n_img, c).permute(1, 2, 0, 3).reshape(k, n_img * n_q, c)
        o = self_layer(f"transformer_self_attention_layers.{i}.", o,
                       tokens.reshape(n_img * n_q, k, c).permute(1, 0, 2))
        pre = f"transformer_ffn_layers.{i}."
        f = torch.relu(o @ sd[pre + "linear1.weight"].T + sd[pre + "linear1.bias"])
        f = f @ sd[pre + "linear2.weight"].T + sd[pre + "linear2.bias"]
        o = _ln(o + f, sd[pre + "norm.weight"], sd[pre + "norm.bias"])
        out = o.permute(1, 0, 2).reshape(n_img, n_q, k, c)
        masks, ious, blocked = head(out, sizes[(i + 1) % 3])
        preds.append((masks, ious))
    return preds


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


EMBEDDINGS = {"level_embed.weight", "prompt_encoder.corner_emb", "prompt_encoder.point_emb", "prompt_encoder.box_emb",
              "prompt_encoder.mask_emb", "prompt_encoder.attr_emb.weight"}


def _randomize(module, seed=0):
    """Random values for every parameter and buffer (the inits would hide e.g. a swapped bias): matrices
    N(0, 1 / fan_in), biases N(0, 0.04), norm weights 1 + N(0, 0.04), embeddings and PE matrices N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.dim() > 1 and name not in EMBEDDINGS and "positional_encoding" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return module


def _inputs(prompt_type, seed=1, n=N, q=Q):
    g = torch.Generator().manual_seed(seed)
    c = CFG.hidden_dim
    x = [torch.randn(n, c, *hw, generator=g) for hw in LEVEL_SIZES]
    mf = torch.randn(n, c, *MASK_SIZE, generator=g)
    if prompt_type == "point":
        centre = torch.rand(n, q, 2, generator=g) * 150 - 10  # some centres off the canvas: zero content
        boxes = torch.cat([centre - 2, centre + 2], dim=-1)
    else:
        xy = torch.rand(n, q, 2, generator=g) * 90
        boxes = torch.cat([xy, xy + 4 + torch.rand(n, q, 2, generator=g) * 50], dim=-1)
    return x, mf, boxes


def _decoder(seed=0):
    torch.manual_seed(seed)
    return _randomize(MultiScaleMaskDecoder(CFG), seed)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("prompt_type", ["point", "box"])
def test_forward_and_grads_match_reference(prompt_type):
    dec = _decoder()
    x, mf, boxes = _inputs(prompt_type)
    out = dec(x, mf, boxes, prompt_type)
    kk = CFG.num_masks if prompt_type == "point" else 1
    assert out["pred_masks"].shape == (N, Q, kk, *MASK_SIZE) and out["pred_ious"].shape == (N, Q, kk)
    assert len(out["aux_outputs"]) == CFG.dec_layers - 1

    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point() and "positional" not in k)
              for k, v in dec.state_dict().items()}
    stats = {}
    ref = reference(leaves, CFG, x, mf, boxes, prompt_type, stats)
    # the masks must actually restrict attention, or the mask path would go untested
    assert stats["partial"] > 0, stats
    ours = [(a["pred_masks"], a["pred_ious"]) for a in out["aux_outputs"]] + [(out["pred_masks"], out["pred_ious"])]
    assert len(ours) == len(ref)
    for j, ((m, s), (rm, rs)) in enumerate(zip(ours, ref)):
        assert _rel(m, rm) <= 1e-4, (j, _rel(m, rm))
        assert _rel(s, rs) <= 1e-4, (j, _rel(s, rs))
    # heads differ from each other (a head repeated or mis-indexed would show here as well)
    assert _rel(ours[0][0], ours[-1][0]) > 1e-2

    g = torch.Generator().manual_seed(5)
    weights = [(torch.randn(m.shape, generator=g), torch.randn(s.shape, generator=g)) for m, s in ours]

    def loss(preds):
        return sum((m * wm).sum() + (s * ws).sum() for (m, s), (wm, ws) in zip(preds, weights))

    loss(ours).backward()
    loss(ref).backward()
    named = dict(dec.named_parameters())
    unused = {"prompt_encoder.box_emb", "mask_embed.0", "iou_embed.0"} if prompt_type == "point" else \
        {"prompt_encoder.point_emb", "prompt_encoder.attr_emb", "mask_embed.1", "mask_embed.2", "mask_embed.3",
         "mask_embed.4", "iou_embed.1", "iou_embed.2", "iou_embed.3", "iou_embed.4"}
    checked = 0
    for name, p in named.items():
        if any(name.startswith(u + ".") or name == u for u in unused):
            assert p.grad is None or not p.grad.any(), name
            continue
        rg = leaves[name].grad
        assert p.grad is not None and rg is not None, name
        assert float((p.grad - rg).abs().max()) <= 1e-3 * float(rg.abs().max()) + 1e-6, name
        checked += 1
    assert checked > 50


def test_fully_blocked_rows_reopened():
    """feat_embed with a large negative bias pattern: many prompts see no foreground at some level and must attend
    everywhere (not produce NaN rows), while others stay partially masked."""
    dec = _decoder(seed=3)
    with torch.no_grad():
        dec.feat_embed.weight.mul_(0.5)
        dec.feat_embed.bias.normal_(generator=torch.Generator().manual_seed(0)).neg_()
    x, mf, boxes = _inputs("box", seed=4)
    out = dec(x, mf, boxes, "box")
    stats = {}
    ref = reference(dec.state_dict(), CFG, x, mf, boxes, "box", stats)
    assert stats["reopened"] > 0 and stats["partial"] > 0, stats
    assert torch.isfinite(out["pred_masks"]).all()
    assert _rel(out["pred_masks"], ref[-1][0]) <= 1e-4
    assert _rel(out["pred_ious"], ref[-1][1]) <= 1e-4


@pytest.mark.parametrize("prompt_type", ["point", "box"])
def test_chunk_and_batch_invariance(prompt_type):
    dec = _decoder()
    x, mf, boxes = _inputs(prompt_type, seed=7, q=5)
    with torch.no_grad():
        full = dec(x, mf, boxes, prompt_type)
        parts = [dec(x, mf, boxes[:, sl], prompt_type) for sl in (slice(0, 2), slice(2, 5))]
        singles = [dec([t[i:i + 1] for t in x], mf[i:i + 1], boxes[i:i + 1], prompt_type) for i in range(N)]
        lean = dec(x, mf, boxes, prompt_type, aux_outputs=False)
    for key in ("pred_masks", "pred_ious"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts], dim=1), full[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([p[key] for p in singles], dim=0), full[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lean[key], full[key], rtol=0, atol=0)
        for j in range(CFG.dec_layers - 1):
            torch.testing.assert_close(torch.cat([p["aux_outputs"][j][key] for p in parts], dim=1),
                                       full["aux_outputs"][j][key], rtol=1e-5, atol=1e-5)
    assert lean["aux_outputs"] == []


def test_empty_prompts_and_autocast():
    dec = _decoder()
    x, mf, boxes = _inputs("point")
    out = dec(x, mf, boxes[:, :0], "point")
    assert out["pred_masks"].shape == (N, 0, CFG.num_masks, *MASK_SIZE) and out["pred_ious"].shape == (N, 0, 4)
    assert len(out["aux_outputs"]) == CFG.dec_layers - 1
    with torch.no_grad():
        ref = dec(x, mf, boxes, "point")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = dec(x, mf, boxes, "point")
    assert low["pred_masks"].dtype == torch.bfloat16
    assert torch.isfinite(low["pred_masks"].float()).all()
    # bf16 matmuls may flip a few attention-mask pixels; the IoU scores stay close
    assert float((low["pred_ious"].float() - ref["pred_ious"]).abs().max()) < 0.1
    with torch.no_grad():  # bf16 pixel-decoder outputs into the fp32 decoder, outside autocast
        mixed = dec([t.bfloat16() for t in x], mf.bfloat16(), boxes, "point")
    assert mixed["pred_masks"].dtype == torch.float32
    assert float((mixed["pred_ious"] - ref["pred_ious"]).abs().max()) < 0.1


def test_bad_inputs():
    dec = MultiScaleMaskDecoder(CFG)
    x, mf, boxes = _inputs("box")
    with pytest.raises(ValueError, match="prompt_type"):
        dec(x, mf, boxes, "points")
    with pytest.raises(ValueError, match="boxes"):
        dec(x, mf, boxes[0], "box")
    with pytest.raises(ValueError, match="x must be a list of 3"):
        dec(x[:2], mf, boxes, "box")
    with pytest.raises(ValueError, match=r"x\[1\]"):
        dec([x[0], x[1][:, :8], x[2]], mf, boxes, "box")
    with pytest.raises(ValueError, match="mask_features"):
        dec(x, mf[:1], boxes, "box")
    with pytest.raises(TypeError, match="mask_features"):
        dec(x, mf.numpy(), boxes, "box")
    with pytest.raises(TypeError, match="cfg"):
        MultiScaleMaskDecoder(None)


def _official_shapes():
    """Spec §9's predictor keys (C 256, FFN 2048, 9 layers, 5 mask / IoU heads, PE [2, 128])."""
    c, ff = 256, 2048
    attn = {"in_proj_weight": (3 * c, c), "in_proj_bias": (3 * c,), "out_proj.weight": (c, c),
            "out_proj.bias": (c,)}
    norm = {"norm.weight": (c,), "norm.bias": (c,)}
    out = {"pe_layer.positional_encoding_gaussian_matrix": (2, 128), "feat_embed.weight": (c, c, 1, 1),
           "feat_embed.bias": (c,), "level_embed.weight": (3, c), "decoder_norm.weight": (c,),
           "decoder_norm.bias": (c,), "prompt_encoder.corner_emb": (1, 2, c), "prompt_encoder.point_emb": (1, 1, c),
           "prompt_encoder.box_emb": (1, 1, c), "prompt_encoder.mask_emb": (1, 5, c),
           "prompt_encoder.attr_emb.weight": (2, c),
           "prompt_encoder.pos_emb.positional_encoding_gaussian_matrix": (2, 128)}
    layers = [("extra_self_attention_layer", "self_attn")]
    layers += [(f"transformer_self_attention_layers.{i}", "self_attn") for i in range(9)]
    layers += [(f"transformer_cross_attention_layers.{i}", "multihead_attn") for i in range(9)]
    for prefix, attr in layers:
        out.update({f"{prefix}.{attr}.{k}": v for k, v in attn.items()})
        out.update({f"{prefix}.{k}": v for k, v in norm.items()})
    for i in range(9):
        p = f"transformer_ffn_layers.{i}"
        out.update({f"{p}.linear1.weight": (ff, c), f"{p}.linear1.bias": (ff,), f"{p}.linear2.weight": (c, ff),
                    f"{p}.linear2.bias": (c,), f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)})
    for j in range(5):
        for i in range(3):
            out[f"mask_embed.{j}.layers.{i}.weight"] = (c, c)
            out[f"mask_embed.{j}.layers.{i}.bias"] = (c,)
            out[f"iou_embed.{j}.layers.{i}.weight"] = (c, c) if i < 2 else (1, c)
            out[f"iou_embed.{j}.layers.{i}.bias"] = (c,) if i < 2 else (1,)
    return out


def test_official_state_dict_on_meta():
    with torch.device("meta"):
        dec = MultiScaleMaskDecoder(UnpairSegConfig.official())
    sd = dec.state_dict()
    assert len(sd) == 240
    assert {k: tuple(v.shape) for k, v in sd.items()} == _official_shapes()
    assert sum(p.numel() for p in dec.parameters()) == 16_188_421
    assert sum(b.numel() for b in dec.buffers()) == 512
    assert all(v.is_meta for v in sd.values())


def test_official_inits():
    """Xavier-uniform matrices in the attention / FFN layers with zero attention biases (Mask2Former +
    nn.MultiheadAttention), N(0, 1) level embedding."""
    torch.manual_seed(0)
    dec = MultiScaleMaskDecoder(UnpairSegConfig.tiny(image_size=128, hidden_dim=64, conv_dim=64, mask_dim=64,
                                                     dim_feedforward=256))
    w = dec.transformer_ffn_layers[0].linear1.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    ipw = dec.transformer_cross_attention_layers[1].multihead_attn.in_proj_weight
    bound = math.sqrt(6 / (ipw.shape[0] + ipw.shape[1]))
    assert ipw.abs().max() <= bound and ipw.abs().max() > 0.9 * bound
    attn = dec.extra_self_attention_layer.self_attn
    assert not attn.in_proj_bias.any() and not attn.out_proj.bias.any()
    assert 0.8 < float(dec.level_embed.weight.detach().std()) < 1.2
