"""models/unpair_seg/prompt_encoder.py: point and box tokens against a plain composition of spec §4 written from the
state dict (random weights and inputs), the official key names / shapes, N(0, 1) inits, and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.prompt_encoder import PromptEncoder


def _reference_tokens(sd: dict, boxes: torch.Tensor, content: torch.Tensor, prompt_type: str,
                      image_size: int) -> torch.Tensor:
    """Spec §4 element by element: corner c of prompt (n, q) = PE(corner / image_size) + corner_emb[c] + type +
    content (+ attr_emb[1] for points); then the num_masks + 1 mask tokens."""
    g = sd["pos_emb.positional_encoding_gaussian_matrix"].double()  # [2, F]
    n_img, n_prompt = boxes.shape[:2]
    m1 = sd["mask_emb"].shape[1]
    c = g.shape[1] * 2
    out = torch.empty(n_img, n_prompt, 2 + m1, c, dtype=torch.float64)
    type_emb = sd["point_emb" if prompt_type == "point" else "box_emb"][0, 0].double()
    for n in range(n_img):
        for q in range(n_prompt):
            x1, y1, x2, y2 = (float(v) for v in boxes[n, q])
            for corner, (px, py) in enumerate(((x1, y1), (x2, y2))):
                u, v = 2 * (px / image_size) - 1, 2 * (py / image_size) - 1
                z = 2 * math.pi * (u * g[0] + v * g[1])
                tok = torch.cat([torch.sin(z), torch.cos(z)]) + sd["corner_emb"][0, corner].double() + type_emb
                tok = tok + content[n, q].double()
                if prompt_type == "point":
                    tok = tok + sd["attr_emb.weight"][1].double()
                out[n, q, corner] = tok
            out[n, q, 2:] = sd["mask_emb"][0].double()
    return out


def _randomized(cfg) -> PromptEncoder:
    torch.manual_seed(0)
    enc = PromptEncoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_()
        enc.pos_emb.positional_encoding_gaussian_matrix.normal_()
    return enc


@pytest.mark.parametrize("prompt_type", ["point", "box"])
def test_tokens_match_reference(prompt_type):
    cfg = UnpairSegConfig.tiny(image_size=128)
    enc = _randomized(cfg)
    g = torch.Generator().manual_seed(1)
    n, q, c = 2, 5, cfg.hidden_dim
    if prompt_type == "point":
        centre = torch.rand(n, q, 2, generator=g) * 150 - 10  # some outside the canvas
        boxes = torch.cat([centre - 2, centre + 2], dim=-1)
    else:
        xy = torch.rand(n, q, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + 4 + torch.rand(n, q, 2, generator=g) * 60], dim=-1)
    content = torch.randn(n, q, c, generator=g)
    tokens, pos = enc(boxes, content, prompt_type)
    assert tokens.shape == (n, q, cfg.num_masks + 3, c) and tokens.dtype == torch.float32
    assert torch.equal(tokens, pos)
    ref = _reference_tokens(enc.state_dict(), boxes, content, prompt_type, cfg.image_size)
    err = (tokens.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err
    # the two prompt types differ exactly by the type embeddings and attr_emb[1] on the corner tokens
    other, _ = enc(boxes, content, "box" if prompt_type == "point" else "point")
    diff = enc.point_emb + enc.attr_emb.weight[1] - enc.box_emb
    sign = 1 if prompt_type == "point" else -1
    torch.testing.assert_close(tokens[:, :, :2] - other[:, :, :2], sign * diff.expand(n, q, 2, c), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(tokens[:, :, 2:], other[:, :, 2:])


def test_integer_boxes_and_empty():
    cfg = UnpairSegConfig.tiny(image_size=64)
    enc = _randomized(cfg)
    boxes = torch.tensor([[[3, 7, 40, 50], [0, 0, 64, 64]]])
    content = torch.randn(1, 2, cfg.hidden_dim)
    tokens, _ = enc(boxes, content, "box")
    ref = _reference_tokens(enc.state_dict(), boxes, content, "box", 64)
    assert (tokens.double() - ref).abs().max() < 1e-4
    empty, _ = enc(torch.zeros(3, 0, 4), torch.zeros(3, 0, cfg.hidden_dim), "point")
    assert empty.shape == (3, 0, cfg.num_masks + 3, cfg.hidden_dim)


def test_official_keys_and_init():
    torch.manual_seed(0)
    enc = PromptEncoder(UnpairSegConfig.official())
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == {"corner_emb": (1, 2, 256), "point_emb": (1, 1, 256), "box_emb": (1, 1, 256),
                      "mask_emb": (1, 5, 256), "attr_emb.weight": (2, 256),
                      "pos_emb.positional_encoding_gaussian_matrix": (2, 128)}
    assert enc.image_size == (1024, 1024) and enc.num_tokens == 7
    allp = torch.cat([p.flatten() for p in enc.parameters()])
    assert abs(allp.mean()) < 0.1 and 0.9 < allp.std() < 1.1  # N(0, 1), not a uniform / zero init


def test_bad_inputs():
    cfg = UnpairSegConfig.tiny()
    enc = PromptEncoder(cfg)
    boxes, content = torch.rand(1, 2, 4), torch.randn(1, 2, cfg.hidden_dim)
    with pytest.raises(ValueError, match="prompt_type"):
        enc(boxes, content, "mask")
    with pytest.raises(ValueError, match="boxes"):
        enc(torch.rand(2, 4), content, "box")
    with pytest.raises(TypeError, match="boxes"):
        enc(boxes.tolist(), content, "box")
    with pytest.raises(ValueError, match="content"):
        enc(boxes, torch.randn(1, 3, cfg.hidden_dim), "box")
    with pytest.raises(TypeError, match="content"):
        enc(boxes, content.long(), "box")
    with pytest.raises(TypeError, match="cfg"):
        PromptEncoder({"hidden_dim": 32})
