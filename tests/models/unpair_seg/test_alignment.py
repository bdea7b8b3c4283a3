"""Stage-2 alignment pieces against independent references:

* alignment.py: the cost matrices (both readings of eq. 3.6, both softmax axes), Hungarian matching against brute
  force, the confidence threshold, padding masks, the multi-scale ensembles, the cosine loss (eq. 3.8) and its
  empty case, on hand-built cases;
* region.py: multi-scale region embeddings equal a plain composition of the spec (trunk -> interpolate + einsum
  MaskPooling (spec §6) -> LayerNorm + MLP head -> normalise -> mean) at every scale, including scales that are not
  multiples of 32;
* adapter.py: LoRALinear's maths, merge / un-merge (eval outputs unchanged to 1e-6, weights restored bit for bit,
  state dicts mode-independent), the SemanticAdapter against a hand composition and its zero-init identity.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models.unpair_seg.adapter import LoRALinear, SemanticAdapter, mark_only_lora_trainable
from models.unpair_seg.alignment import (Match, MatchConfig, batch_loss, cosine_alignment_loss, cosine_similarity,
                                         cost_matrix, hungarian, match, match_multiscale, match_probabilities)
from models.unpair_seg.backbone import CLIPBackbone
from models.unpair_seg.config import PIXEL_MEAN, PIXEL_STD, UnpairSegConfig
from models.unpair_seg.region import multiscale_region_embeddings, region_embeddings


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Cost, matching, threshold


def test_cost_matrix_both_readings_and_axes():
    cos = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.35, 0.0]])
    tau = 0.1
    e = torch.exp(cos / tau)
    p_rows = e / e.sum(1, keepdim=True)
    p_cols = e / e.sum(0, keepdim=True)
    torch.testing.assert_close(match_probabilities(cos, "entities", tau), p_rows)
    torch.testing.assert_close(match_probabilities(cos, "regions", tau), p_cols)
    torch.testing.assert_close(cost_matrix(cos, "prob", "entities", tau), 1 - p_rows)
    torch.testing.assert_close(cost_matrix(cos, "prob", "regions", tau), 1 - p_cols)
    d = torch.exp(1 - cos)  # eq. 3.6 as printed: exp(1 - cos) / sum_j exp(1 - cos)
    torch.testing.assert_close(cost_matrix(cos, "literal", "entities"), d / d.sum(1, keepdim=True))
    torch.testing.assert_close(cost_matrix(cos, "literal", "regions"), d / d.sum(0, keepdim=True))
    with pytest.raises(ValueError, match="cost"):
        cost_matrix(cos, "greedy")
    with pytest.raises(ValueError, match="axis"):
        cost_matrix(cos, "prob", "rows")


def test_cosine_similarity_normalises_both_sides():
    r, t = torch.randn(5, 8), torch.randn(3, 8)
    want = torch.tensor([[float(torch.dot(a, b) / (a.norm() * b.norm())) for b in t] for a in r])
    torch.testing.assert_close(cosine_similarity(3.0 * r, 0.5 * t), want)
    with pytest.raises(ValueError, match="same width"):
        cosine_similarity(r, torch.randn(3, 7))


def _brute_force(cost: torch.Tensor) -> float:
    q, t = cost.shape
    best = math.inf
    if q >= t:
        for rows in itertools.permutations(range(q), t):
            best = min(best, sum(float(cost[r, c]) for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(t), q):
            best = min(best, sum(float(cost[r, c]) for r, c in enumerate(cols)))
    return best


def test_hungarian_beats_greedy_and_matches_brute_force():
    # Greedy takes (0, 0) = 1 and then pays 10 for (1, 1); the optimum is (0, 1) + (1, 0) = 2 + 3.
    cost = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    rows, cols = hungarian(cost)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    g = torch.Generator().manual_seed(1)
    for q, t in [(4, 4), (5, 3), (2, 5), (1, 1), (6, 1)]:
        c = torch.rand(q, t, generator=g)
        rows, cols = hungarian(c)
        assert len(rows) == min(q, t) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert float(c[rows, cols].sum()) == pytest.approx(_brute_force(c), abs=1e-6)
    r0, c0 = hungarian(torch.zeros(0, 3))
    assert r0.numel() == 0 and c0.numel() == 0
    with pytest.raises(ValueError, match="finite"):
        hungarian(torch.tensor([[float("nan")]]))


def test_match_threshold_and_valid_rows():
    t = torch.eye(3, 6)  # three orthogonal entities
    # Mask 0 is entity 0 exactly, mask 1 sits between entities 1 and 2, mask 2 is entity 2 with a little of 1.
    r = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0, 0], [0, 0.1, 1.0, 0, 0, 0]])
    cfg = MatchConfig(temperature=0.1, threshold=0.7)
    cos = cosine_similarity(r, t)
    p = torch.softmax(cos / 0.1, dim=1)
    m = match(r, t, cfg)
    # Hungarian: 0 -> 0, 2 -> 2, 1 -> 1; mask 1's probability of entity 1 is 0.5 < 0.7: not confident.
    assert m.regions.tolist() == [0, 2] and m.entities.tolist() == [0, 2]
    torch.testing.assert_close(m.confidence, p[[0, 2], [0, 2]])
    assert float(p[1, 1]) == pytest.approx(0.5, abs=1e-3)
    everything = match(r, t, MatchConfig(temperature=0.1, threshold=0.0))
    assert everything.regions.tolist() == [0, 1, 2] and everything.entities.tolist() == [0, 1, 2]
    assert match(r, t, MatchConfig(temperature=0.1, threshold=1.0)).regions.numel() == 0
    # Padding rows never take part, and indices refer to the full rows.
    pad = torch.cat([torch.randn(2, 6), r])
    valid = torch.tensor([False, False, True, True, True])
    mv = match(pad, t, cfg, valid)
    assert mv.regions.tolist() == [2, 4] and mv.entities.tolist() == [0, 2]
    # The column softmax: each entity over the masks.
    pc = torch.softmax(cos / 0.1, dim=0)
    mc = match(r, t, MatchConfig(axis="regions", temperature=0.1, threshold=0.0))
    torch.testing.assert_close(mc.confidence, pc[mc.regions, mc.entities])
    with pytest.raises(ValueError, match="valid"):
        match(r, t, cfg, torch.ones(2, dtype=torch.bool))


def test_literal_cost_assignment_is_optimal():
    g = torch.Generator().manual_seed(4)
    r, t = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    cos = cosine_similarity(r, t)
    lit = match(r, t, MatchConfig(cost="literal", threshold=0.0))
    # eq. 3.6 as printed is a valid cost too: the assignment minimises it (brute force over every assignment).
    c = cost_matrix(cos, "literal")
    assert float(c[lit.regions, lit.entities].sum()) == pytest.approx(_brute_force(c), abs=1e-6)


def test_match_multiscale_ensembles():
    per_scale = torch.stack([_unit(6, 8, seed=s) for s in range(3)])
    t = _unit(4, 8, seed=9)
    cfg = MatchConfig(temperature=0.05, threshold=0.0)
    mean = F.normalize(per_scale.mean(0), dim=-1)
    want = match(mean, t, cfg)
    got = match_multiscale(per_scale, t, cfg)
    assert got.regions.tolist() == want.regions.tolist() and got.entities.tolist() == want.entities.tolist()
    torch.testing.assert_close(got.confidence, want.confidence)
    # "cost": mean over scales of the per-scale probabilities and costs.
    cc = MatchConfig(temperature=0.05, threshold=0.0, ensemble="cost")
    probs = torch.stack([torch.softmax((F.normalize(s, dim=-1) @ t.T) / 0.05, 1) for s in per_scale]).mean(0)
    rows, cols = hungarian(1 - probs)
    got = match_multiscale(per_scale, t, cc)
    assert got.regions.tolist() == rows.tolist() and got.entities.tolist() == cols.tolist()
    torch.testing.assert_close(got.confidence, probs[rows, cols])
    valid = torch.tensor([True, False, True, True, False, True])
    got = match_multiscale(per_scale, t, cfg, valid)
    want = match(mean[valid], t, cfg)
    idx = torch.nonzero(valid).squeeze(1)
    assert got.regions.tolist() == idx[want.regions].tolist()


def test_match_config_validation():
    for kw in ({"cost": "x"}, {"axis": "x"}, {"ensemble": "x"}, {"temperature": 0.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            MatchConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def test_cosine_alignment_loss_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # pairs: (0, 0) cos 1 -> 0; (1, 0) cos 0 -> 1; (2, 1) cos 0 -> 1; mean 2 / 3.
    loss = cosine_alignment_loss(a, t, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]))
    assert float(loss.detach()) == pytest.approx(2 / 3)
    # opposite vectors: 2.
    assert float(cosine_alignment_loss(torch.tensor([[-1.0, 0.0]]), t[:1])) == pytest.approx(2.0)
    loss.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    # No pair: a zero that still reaches every input (zero gradients, not None).
    b = torch.randn(3, 2, requires_grad=True)
    empty = cosine_alignment_loss(b, t, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(b.grad, torch.zeros_like(b))
    with pytest.raises(ValueError, match="both"):
        cosine_alignment_loss(a, t, torch.tensor([0]))
    with pytest.raises(ValueError, match="same length"):
        cosine_alignment_loss(a, t, torch.tensor([0, 1]), torch.tensor([0]))


def test_batch_loss_is_the_mean_over_all_pairs():
    g = torch.Generator().manual_seed(2)
    adapted = torch.randn(2, 4, 8, generator=g)
    ents = [torch.randn(3, 8, generator=g), torch.randn(1, 8, generator=g)]
    matches = [Match(torch.tensor([0, 3]), torch.tensor([2, 0]), torch.ones(2)),
               Match(torch.tensor([1]), torch.tensor([0]), torch.ones(1))]
    loss, n = batch_loss(adapted, ents, matches)
    terms = [1 - F.cosine_similarity(adapted[0, 0], ents[0][2], dim=0),
             1 - F.cosine_similarity(adapted[0, 3], ents[0][0], dim=0),
             1 - F.cosine_similarity(adapted[1, 1], ents[1][0], dim=0)]
    assert n == 3 and float(loss) == pytest.approx(float(sum(terms) / 3), abs=1e-6)
    none = [Match(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))] * 2
    loss0, n0 = batch_loss(adapted, ents, none)
    assert n0 == 0 and float(loss0) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Region embeddings against the spec's composition


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    b = CLIPBackbone(UnpairSegConfig.tiny())
    with torch.no_grad():  # non-trivial LayerNorm affine parameters in the head
        b.clip_model.visual.trunk.head.norm.weight.uniform_(0.5, 1.5)
        b.clip_model.visual.trunk.head.norm.bias.normal_(0, 0.1)
    return b


def _ref_res5(b, x):
    trunk = b.clip_model.visual.trunk
    y = trunk.stem(x)
    for st in trunk.stages:
        y = st(y)
    return trunk.norm_pre(y)


def _ref_pool(x, m):
    """Spec §6 MaskPooling: bilinear resize of the logits, sigmoid >= 0.5, masked mean (+1e-8) by einsum."""
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
    m = (m.sigmoid() >= 0.5).to(x.dtype)
    return torch.einsum("bchw,bqhw->bqc", x, m / (m.sum((-1, -2), keepdim=True) + 1e-8))


def _ref_head(b, p):
    norm = b.clip_model.visual.trunk.head.norm
    mlp = b.clip_model.visual.head.mlp
    y = F.layer_norm(p, (p.shape[-1],), norm.weight, norm.bias, eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight)
    return F.normalize(y, dim=-1)


def _ref_scale(b, images, masks, s, pool=None):
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    x = images.float()
    if s != images.shape[-1]:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    x = (x - mean) / std
    pad = (-s) % 32
    m = masks
    if pad:
        x = F.pad(x, (0, pad, 0, pad))
        m = F.pad(F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False), (0, pad, 0, pad),
                  value=-1e4)
    return x, m


@pytest.mark.parametrize("scales", [(96, 128, 160), (112, 128, 144)])
def test_region_embeddings_equal_the_spec_composition(backbone, scales):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    masks = torch.randn(2, 5, 32, 32, generator=g) * 4
    masks[0, 4] = -10.0  # an empty mask pools to zeros
    per_scale = []
    with torch.no_grad():
        for s in scales:
            x, m = _ref_scale(backbone, images, masks, s)
            per_scale.append(_ref_head(backbone, _ref_pool(_ref_res5(backbone, x), m)))
    want = F.normalize(torch.stack(per_scale).mean(0), dim=-1)
    out = multiscale_region_embeddings(backbone, images, masks, scales)
    for k, s in enumerate(scales):
        torch.testing.assert_close(out["per_scale"][k], per_scale[k], atol=2e-5, rtol=1e-4, msg=f"scale {s}")
    torch.testing.assert_close(out["frozen"], want, atol=2e-5, rtol=1e-4)
    got = region_embeddings(backbone, images, masks, scales)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2, 5), atol=1e-5) and not got.requires_grad
    if scales[0] == 96:  # explicit statistics: the defaults are CLIP's; others change the input
        same = region_embeddings(backbone, images, masks, scales, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
        assert torch.equal(same, got)
        other = region_embeddings(backbone, images, masks, scales, pixel_mean=(0.0, 0.0, 0.0),
                                  pixel_std=(255.0, 255.0, 255.0))
        assert not torch.allclose(other, got, atol=1e-3)


def test_region_embeddings_bad_inputs(backbone):
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scales"):
        region_embeddings(backbone, images, torch.zeros(1, 2, 16, 16), scales=())
    with pytest.raises(ValueError, match="scales"):
        region_embeddings(backbone, images, torch.zeros(1, 2, 16, 16), scales=(64.0,))
    with pytest.raises(ValueError, match="images"):
        region_embeddings(backbone, images[:, :2], torch.zeros(1, 2, 16, 16), scales=(64,))
    with pytest.raises(ValueError, match="batch"):
        region_embeddings(backbone, images, torch.zeros(2, 2, 16, 16), scales=(64,))
    with pytest.raises(TypeError, match="float"):
        region_embeddings(backbone, images, torch.zeros(1, 2, 16, 16, dtype=torch.int64), scales=(64,))
    assert region_embeddings(backbone, images, torch.zeros(1, 0, 16, 16), scales=(64,)).shape == (1, 0, 64)
    # no masks at scales that are not multiples of 32 either (the masks are resized and padded there)
    assert region_embeddings(backbone, images, torch.zeros(1, 0, 16, 16), scales=(56, 72)).shape == (1, 0, 64)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_linear_maths_init_and_freezing():
    torch.manual_seed(0)
    lin = LoRALinear(12, 7, r=8, lora_alpha=1.0)
    assert lin.scaling == 1 / 8 and not lin.weight.requires_grad and not lin.bias.requires_grad
    assert lin.lora_A.requires_grad and lin.lora_B.requires_grad
    assert torch.equal(lin.lora_B, torch.zeros(7, 8))
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt 5) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    a = lin.lora_A.detach()
    assert float(a.abs().max()) <= bound and float(a.std()) > 0.3 * bound
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(3, 5, 12)
    want = x @ lin.weight.T + lin.bias + (x @ lin.lora_A.T @ lin.lora_B.T) * (1 / 8)
    torch.testing.assert_close(lin(x), want)
    ident = LoRALinear.identity(6, r=2, lora_alpha=4.0)
    with torch.no_grad():
        ident.lora_B.normal_()
    y = torch.randn(4, 6)
    torch.testing.assert_close(ident(y), y + 2.0 * (y @ ident.lora_A.T @ ident.lora_B.T))
    assert ident.bias is None
    with pytest.raises(ValueError, match="base_weight"):
        LoRALinear(3, 4, base_weight=torch.eye(3))
    with pytest.raises(ValueError, match="'r'"):
        LoRALinear(3, 4, r=0)
    frozen = mark_only_lora_trainable(torch.nn.Sequential(torch.nn.Linear(3, 3), LoRALinear(3, 3)))
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["1.lora_A", "1.lora_B"]


def test_lora_merge_unmerge_keeps_outputs_and_restores_weights():
    torch.manual_seed(1)
    lin = LoRALinear(16, 9, r=4, lora_alpha=2.0)
    with torch.no_grad():
        lin.lora_B.normal_()
    base = lin.weight.detach().clone()
    x = torch.randn(10, 16)
    train_out = lin(x)
    lin.eval()
    assert lin.merged
    torch.testing.assert_close(lin.weight, base + 0.5 * lin.lora_B @ lin.lora_A)
    torch.testing.assert_close(lin(x), train_out, atol=1e-6, rtol=1e-6)
    sd = lin.state_dict()
    assert torch.equal(sd["weight"], base) and "_base_weight" not in sd  # the state dict holds the base weight
    lin.eval()  # idempotent
    lin.train()
    assert not lin.merged and torch.equal(lin.weight, base)  # bit for bit
    torch.testing.assert_close(lin(x), train_out, atol=0, rtol=0)
    # Loading into a merged module re-merges with the loaded factors.
    other = LoRALinear(16, 9, r=4, lora_alpha=2.0).eval()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), train_out, atol=1e-6, rtol=1e-6)
    assert torch.equal(other.train().weight, base)


# ---------------------------------------------------------------------------------------------------------------------
# Semantic adapter


def _feats(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 128, 128, generator=g)
    return backbone(x)


def _randomise(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ref_adapter(adapter, feats, masks):
    xs = {}
    for f in adapter.in_features:
        lin = adapter.lora[f]
        x = feats[f].permute(0, 2, 3, 1)
        xs[f] = (x + lin.scaling * (x @ lin.lora_A.T @ lin.lora_B.T)).permute(0, 3, 1, 2)
    size = feats["res2"].shape[-2:]
    h = 0
    for f in adapter.in_features:
        p = F.conv2d(xs[f], adapter.proj[f].weight[..., None, None], adapter.proj[f].bias)
        h = h + F.interpolate(p, size=size, mode="bilinear", align_corners=False)
    h = F.gelu(h)
    enhanced_pooled = _ref_pool(xs["clip_vis_dense"], masks) + _ref_pool(h, masks) @ adapter.out.weight.T
    return enhanced_pooled


def test_adapter_zero_init_is_the_frozen_clip(backbone):
    torch.manual_seed(0)
    adapter = SemanticAdapter(backbone.channels, hidden_dim=16)
    assert torch.equal(adapter.out.weight, torch.zeros_like(adapter.out.weight))
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    masks = torch.randn(2, 4, 32, 32, generator=g) * 3
    frozen = region_embeddings(backbone, images, masks, (112, 128))
    adapted = region_embeddings(backbone, images, masks, (112, 128), adapter)
    torch.testing.assert_close(adapted, frozen, atol=1e-6, rtol=1e-6)
    assert adapted.requires_grad
    adapted.sum().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}
    assert float(grads["out.weight"].abs().sum()) > 0  # the zero-init output layer learns from step one
    assert float(grads["lora.clip_vis_dense.lora_B"].abs().sum()) > 0
    assert all(p.grad is None for p in backbone.parameters())  # the backbone stays frozen


def test_adapter_equals_hand_composition(backbone):
    torch.manual_seed(0)
    adapter = SemanticAdapter(backbone.channels, hidden_dim=16)
    _randomise(adapter, 1)
    feats = _feats(backbone, 2)
    masks = torch.randn(2, 5, 40, 40, generator=torch.Generator().manual_seed(7)) * 3
    got = adapter(feats, masks)
    with torch.no_grad():
        want = _ref_adapter(adapter, feats, masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    sub = SemanticAdapter(backbone.channels, in_features=("res4", "clip_vis_dense"), hidden_dim=8)
    assert set(sub.lora) == {"res4", "clip_vis_dense"} and sub(feats, masks).shape == (2, 5, 320)
    with pytest.raises(ValueError, match="not in the backbone"):
        SemanticAdapter(backbone.channels, in_features=("res6",))
    with pytest.raises(ValueError, match="missing"):
        sub({"res4": feats["res4"]}, masks)


def test_adapter_merge_unmerge_leaves_eval_outputs_unchanged(backbone):
    torch.manual_seed(0)
    adapter = SemanticAdapter(backbone.channels, hidden_dim=16)
    _randomise(adapter, 4)
    g = torch.Generator().manual_seed(8)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    masks = torch.randn(2, 6, 32, 32, generator=g) * 3
    weights = {n: t.detach().clone() for n, t in adapter.state_dict().items()}
    with torch.no_grad():
        train_out = region_embeddings(backbone, images, masks, (112, 128, 144), adapter)
        adapter.eval()
        assert all(m.merged for m in adapter.lora.values())
        eval_out = region_embeddings(backbone, images, masks, (112, 128, 144), adapter)
    torch.testing.assert_close(eval_out, train_out, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(adapter.state_dict()[n], w) for n, w in weights.items())  # mode-independent state dict
    adapter.train()
    live = dict(adapter.named_parameters())
    assert all(torch.equal(live[n], w) for n, w in weights.items() if n in live)  # restored bit for bit
    with torch.no_grad():
        again = region_embeddings(backbone, images, masks, (112, 128, 144), adapter)
    torch.testing.assert_close(again, train_out, atol=0, rtol=0)
