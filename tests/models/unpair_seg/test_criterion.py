"""models/unpair_seg/criterion.py: stage-1 many-to-many matching and losses, on hand-built cases.

References are written here in numpy (bilinear sampling with zero padding, BCE, Dice, block-averaged IoU targets,
Mask2Former's importance sampling), never by calling the code under test.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from models.unpair_seg import criterion as C
from models.unpair_seg.criterion import Many2ManyMatcher, Many2ManySetCriterion


# ---------------------------------------------------------------------------------------------------------------------
# numpy references


def ref_bilinear(m: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """m [H, W], coords [P, 2] (x, y) in [0, 1] -> [P]: bilinear, pixel centres at (i + 0.5) / size, zeros outside."""
    h, w = m.shape
    x = coords[:, 0] * w - 0.5
    y = coords[:, 1] * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros(len(coords))
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            wy = (y - y0) if dy else (1 - (y - y0))
            wx = (x - x0) if dx else (1 - (x - x0))
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out += np.where(ok, m[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0) * wx * wy
    return out


def ref_bce(x: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))))


def ref_dice(x: np.ndarray, t: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-x))
    return float(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))


def ref_iou(logits: np.ndarray, mask: np.ndarray) -> float:
    h, w = logits.shape
    H, W = mask.shape
    low = mask.reshape(h, H // h, w, W // w).mean((1, 3)) >= 0.5
    pred = logits > 0
    union = (pred | low).sum()
    return float((pred & low).sum() / union) if union else 0.0


def ref_losses(logit_maps: list, masks: list, ious: list, num: float, num_points: int, oversample: float,
               importance: float, seed: int) -> dict:
    """Mask2Former's point-sampled losses of pairs (in this order), the draws from torch.Generator(seed) as
    rand(M, oversample * P, 2) then rand(M, P - importance * P, 2)."""
    g = torch.Generator().manual_seed(seed)
    m = len(logit_maps)
    ns, nu = int(num_points * oversample), int(importance * num_points)
    cand = torch.rand(m, ns, 2, generator=g).double().numpy()
    rest = torch.rand(m, num_points - nu, 2, generator=g).double().numpy() if num_points > nu else None
    out = {"mask": 0.0, "dice": 0.0, "iou": 0.0}
    for j in range(m):
        unc = -np.abs(ref_bilinear(logit_maps[j], cand[j]))
        pts = cand[j][np.argsort(-unc, kind="stable")[:nu]]
        if rest is not None:
            pts = np.concatenate([pts, rest[j]])
        x, t = ref_bilinear(logit_maps[j], pts), ref_bilinear(masks[j].astype(float), pts)
        out["mask"] += ref_bce(x, t) / num
        out["dice"] += ref_dice(x, t) / num
        out["iou"] += (ious[j] - ref_iou(logit_maps[j], masks[j])) ** 2 / num
    return out


def _rng(seed=0):
    return np.random.default_rng(seed)


def _blob_masks(rng, t: int, size: int) -> np.ndarray:
    """t random rectangles (distinct, none empty) on a size x size canvas."""
    out = np.zeros((t, size, size), dtype=bool)
    for k in range(t):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(3, size // 2, 2)
        out[k, y0:y1, x0:x1] = True
    return out


def _like(mask: np.ndarray, low: int, rng, scale: float = 5.0, noise: float = 0.7) -> np.ndarray:
    """Logits at low x low resembling a canvas mask (block average), with noise."""
    H = mask.shape[0]
    avg = mask.reshape(low, H // low, low, H // low).mean((1, 3))
    return scale * (2 * avg - 1) + noise * rng.standard_normal((low, low))


# ---------------------------------------------------------------------------------------------------------------------
# Sampling primitives


def test_point_sample_and_sample_maps_equal_the_bilinear_reference():
    rng = _rng(1)
    maps = rng.standard_normal((5, 7, 11))
    coords = rng.uniform(-0.15, 1.15, (9, 40, 2))
    index = rng.integers(0, 5, 9)
    want = np.stack([ref_bilinear(maps[i], coords[j]) for j, i in enumerate(index)])
    got_ps = C.point_sample(torch.tensor(maps[index][:, None]), torch.tensor(coords))[:, 0]
    np.testing.assert_allclose(got_ps.numpy(), want, rtol=1e-9, atol=1e-9)
    for chunk in (1, 50, 1 << 20):  # chunks of ~1 pair, ~1 pair, everything
        got = C.sample_maps(torch.tensor(maps, dtype=torch.float32), torch.tensor(index), torch.tensor(coords),
                            chunk_points=chunk)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    bools = rng.random((5, 7, 11)) > 0.5  # masks stay bool: no float copy of the maps
    got = C.sample_maps(torch.tensor(bools), torch.tensor(index), torch.tensor(coords))
    want_b = np.stack([ref_bilinear(bools[i].astype(float), coords[j]) for j, i in enumerate(index)])
    np.testing.assert_allclose(got.numpy(), want_b, rtol=1e-5, atol=1e-6)
    # differentiable in the maps
    t = torch.tensor(maps, dtype=torch.float32, requires_grad=True)
    C.sample_maps(t, torch.tensor(index), torch.tensor(coords, dtype=torch.float32)).sum().backward()
    assert t.grad is not None and float(t.grad.abs().sum()) > 0


def test_bce_and_dice_hand_values():
    x = torch.tensor([[0.0, np.log(3.0)], [2.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # row 0: BCE(0, 1) = ln 2, BCE(ln 3, 0) = ln(1 + 3) = ln 4 -> mean ln(8) / 2;
    # row 1: BCE(2, 1) = ln(1 + e^-2), BCE(-1, 1) = ln(1 + e) -> their mean
    bce = [np.log(8) / 2, (np.log1p(np.exp(-2)) + np.log1p(np.e)) / 2]
    assert float(C.sigmoid_ce_loss(x, t, 4.0)) == pytest.approx(sum(bce) / 4, rel=1e-12)
    # row 0: p = (1/2, 3/4): 1 - (2 * 1/2 + 1) / (5/4 + 1 + 1) = 1 - 2 / 3.25
    s2, sm1 = 1 / (1 + np.exp(-2)), 1 / (1 + np.e)
    dice = [1 - 2 / 3.25, 1 - (2 * (s2 + sm1) + 1) / (s2 + sm1 + 2 + 1)]
    assert float(C.dice_loss(x, t, 2.0)) == pytest.approx(sum(dice) / 2, rel=1e-12)


def test_pairwise_costs_equal_per_pair_losses():
    rng = _rng(2)
    x = rng.standard_normal((6, 30)) * 3
    t = (rng.random((4, 30)) > 0.4).astype(float)
    t[1] = rng.random(30)  # soft labels (bilinear at mask edges)
    ce = C.batch_sigmoid_ce_cost(torch.tensor(x), torch.tensor(t)).numpy()
    dc = C.batch_dice_cost(torch.tensor(x), torch.tensor(t)).numpy()
    for a, b in itertools.product(range(6), range(4)):
        assert ce[a, b] == pytest.approx(ref_bce(x[a], t[b]), rel=1e-10)
        assert dc[a, b] == pytest.approx(ref_dice(x[a], t[b]), rel=1e-10)


def test_importance_sampling_picks_the_uncertain_points():
    """Logits -20 except a band of 6 columns near 0: the importance share of the points (300 of 1200 candidates,
    ~330 of which fall in the band) all lie in the band (up to the bilinear half-pixel); the random rest is spread
    over the map. (The zero padding makes the map's outer half-pixel ring uncertain too, as in Mask2Former, which is
    why the band must hold more candidates than the importance share.)"""
    torch.manual_seed(0)
    logits = torch.full((3, 1, 16, 16), -20.0)
    logits[:, :, :, 5:11] = 0.3 * torch.randn(3, 1, 16, 6)
    coords = C.uncertainty_point_coords(logits, C.calculate_uncertainty, 400, 3.0, 0.75)
    assert coords.shape == (3, 400, 2) and bool(((coords >= 0) & (coords <= 1)).all())
    col = coords[..., 0] * 16
    assert bool(((col[:, :300] > 4.5) & (col[:, :300] < 11.5)).all())
    rest = col[:, 300:]
    assert float(((rest < 4.5) | (rest > 11.5)).float().mean()) > 0.3  # ~ 9/16 outside the band
    only = C.uncertainty_point_coords(logits, C.calculate_uncertainty, 60, 4.0, 1.0)
    assert only.shape == (3, 60, 2) and bool(((only[..., 0] * 16 > 4.5) & (only[..., 0] * 16 < 11.5)).all())
    # -|logit|: a logit of 0 is the most uncertain
    assert torch.equal(C.calculate_uncertainty(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([-2.0, -0.0, -3.0]))


def test_iou_target_is_the_binarised_iou_on_the_prediction_grid():
    rng = _rng(3)
    logits = rng.standard_normal((5, 8, 8))
    masks = _blob_masks(rng, 5, 32)
    got = C.binarised_iou(torch.tensor(logits), torch.tensor(masks)).numpy()
    want = [ref_iou(logits[j], masks[j]) for j in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # an empty prediction and an empty (vanishing) target: union 0 -> 0
    assert float(C.binarised_iou(-torch.ones(1, 8, 8), torch.zeros(1, 32, 32, dtype=torch.bool))) == 0.0
    # a perfect prediction: 1
    low = torch.tensor(masks[:1].reshape(1, 8, 4, 8, 4).mean((2, 4)) >= 0.5)
    assert float(C.binarised_iou(low.float() * 2 - 1, torch.tensor(masks[:1]))) == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Matching


def _pred_for(mask_by_output: dict, k: int, low: int, rng) -> np.ndarray:
    """[K, low, low] logits: outputs in mask_by_output resemble their mask, the others are noise."""
    out = 0.7 * rng.standard_normal((k, low, low))
    for o, m in mask_by_output.items():
        out[o] = _like(m, low, rng)
    return out


@pytest.mark.parametrize("perm", [(0, 1), (1, 0)])
@pytest.mark.parametrize("outs", [(1, 0), (0, 3), (2, 1)])
def test_matcher_pairs_each_target_with_its_lookalike_output(perm, outs):
    """A prediction equal to target A and one equal to target B are matched A / B whatever the output slots and
    whatever the order of the targets; the two noise outputs stay unmatched."""
    rng = _rng(4)
    ab = _blob_masks(rng, 2, 32)
    masks = ab[list(perm)]  # target order permuted
    a_slot, b_slot = outs
    pred = _pred_for({a_slot: ab[0], b_slot: ab[1]}, 4, 8, rng)
    member = torch.ones(1, 1, 2, dtype=torch.bool)
    (q, k, t), = Many2ManyMatcher(num_points=2000)(torch.tensor(pred[None, None], dtype=torch.float32),
                                                   torch.tensor(masks[None]), member)
    got = {int(kk): int(tt) for kk, tt in zip(k, t)}
    want = {a_slot: perm.index(0), b_slot: perm.index(1)}
    assert got == want and q.tolist() == [0, 0] and k.tolist() == sorted(k.tolist())


def test_many_to_many_targets_of_nested_masks():
    """A point in the small square lies in the small and the big square (2 targets), a point in the big one only
    has 1, a point in the separate square 1, a point in nothing none: the matcher gives each output exactly the
    targets containing its point."""
    rng = _rng(5)
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[0, 4:20, 4:20] = True  # big
    masks[1, 8:12, 8:12] = True  # small, inside big
    masks[2, 24:30, 22:30] = True  # separate
    points = [(10, 10), (16, 5), (26, 27), (1, 30)]  # (x, y) pixels
    member = torch.tensor([[[bool(masks[t, y, x]) for t in range(3)] for x, y in points]])
    assert member[0].sum(-1).tolist() == [2, 1, 1, 0]
    pred = np.stack([_pred_for({0: masks[1], 2: masks[0]}, 4, 8, rng), _pred_for({3: masks[0]}, 4, 8, rng),
                     _pred_for({1: masks[2]}, 4, 8, rng), _pred_for({}, 4, 8, rng)])
    (q, k, t), = Many2ManyMatcher(num_points=3000)(torch.tensor(pred[None], dtype=torch.float32),
                                                   torch.tensor(masks[None]), member)
    assert list(zip(q.tolist(), k.tolist(), t.tolist())) == [(0, 0, 1), (0, 2, 0), (1, 3, 0), (2, 1, 2)]
    assert float(C.matched_count(member, 4)) == 4.0


def test_more_targets_than_outputs_keeps_the_best_fitting_ones():
    rng = _rng(6)
    masks = _blob_masks(rng, 3, 32)
    pred = _pred_for({0: masks[2], 1: masks[0]}, 2, 8, rng)
    member = torch.ones(1, 1, 3, dtype=torch.bool)
    (q, k, t), = Many2ManyMatcher(num_points=2000)(torch.tensor(pred[None, None], dtype=torch.float32),
                                                   torch.tensor(masks[None]), member)
    assert list(zip(k.tolist(), t.tolist())) == [(0, 2), (1, 0)]
    assert float(C.matched_count(member, 2)) == 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def _point_case(seed=7):
    """N=2 images, Q=3 prompts, K=2 outputs, T=3 masks (image 1: 2 real + 1 padding), 8x8 logits, 32x32 masks,
    with the matching fixed by construction: {(b, q, k): t}."""
    rng = _rng(seed)
    masks = np.stack([_blob_masks(rng, 3, 32), _blob_masks(rng, 3, 32)])
    masks[1, 2] = False  # padding
    valid = np.array([[True, True, True], [True, True, False]])
    member = np.zeros((2, 3, 3), dtype=bool)
    member[0, 0, [0, 1]] = True  # two targets
    member[0, 1, 2] = True  # one target: output 1 unmatched
    member[1, 0, [0, 1]] = True
    member[1, 2, [1, 2]] = True  # mask 2 is padding: only mask 1 counts
    pairs = {(0, 0, 0): 1, (0, 0, 1): 0, (0, 1, 0): 2, (1, 0, 0): 0, (1, 0, 1): 1, (1, 2, 1): 1}
    pred = np.stack([np.stack([_pred_for({kk: masks[b, t] for (bb, qq, kk), t in pairs.items() if (bb, qq) == (b, q)},
                                         2, 8, rng) for q in range(3)]) for b in range(2)])
    ious = rng.uniform(0.1, 0.9, (2, 3, 2))
    return masks, valid, member, pairs, pred, ious


def _point_inputs(masks, valid, member, pred, ious, aux=0):
    out = {"pred_masks": torch.tensor(pred, dtype=torch.float32, requires_grad=True),
           "pred_ious": torch.tensor(ious, dtype=torch.float32, requires_grad=True)}
    out["aux_outputs"] = [{"pred_masks": out["pred_masks"] * (1.0 + 0.1 * i), "pred_ious": out["pred_ious"]}
                          for i in range(aux)]
    tgt = {"masks": torch.tensor(masks), "mask_valid": torch.tensor(valid), "point_targets": torch.tensor(member)}
    return out, tgt


def test_point_losses_equal_the_reference_and_unmatched_outputs_get_nothing():
    masks, valid, member, pairs, pred, ious, = _point_case()
    out, tgt = _point_inputs(masks, valid, member, pred, ious)
    crit = Many2ManySetCriterion(num_masks=2, matcher=Many2ManyMatcher(2.0, 1.0, 2000), num_points=300,
                                 deep_supervision=False, generator=torch.Generator().manual_seed(11))
    losses = crit(out, tgt, "point")
    assert set(losses) == {"loss_mask", "loss_dice", "loss_iou"}
    order = sorted(pairs)  # the criterion's pair order: image, prompt, output
    want = ref_losses([pred[b, q, k] for b, q, k in order], [masks[b, pairs[(b, q, k)]] for b, q, k in order],
                      [ious[b, q, k] for b, q, k in order], num=6.0, num_points=300, oversample=3.0,
                      importance=0.75, seed=11)
    for term in ("mask", "dice", "iou"):
        assert losses[f"loss_{term}"].item() == pytest.approx(want[term], rel=2e-4, abs=1e-6), term
    total = crit.total(losses)
    assert total.item() == pytest.approx(2 * want["mask"] + want["dice"] + want["iou"], rel=2e-4)
    total.backward()
    gm, gi = out["pred_masks"].grad.abs().sum((-1, -2)), out["pred_ious"].grad.abs()
    for b, q, k in itertools.product(range(2), range(3), range(2)):
        matched = (b, q, k) in pairs
        assert (float(gm[b, q, k]) > 0) == matched and (float(gi[b, q, k]) > 0) == matched, (b, q, k)
    assert crit.stats["point"]["pairs"] == 6.0


def test_box_losses_use_the_prompting_mask_on_head_zero():
    rng = _rng(8)
    masks = np.stack([_blob_masks(rng, 3, 32), _blob_masks(rng, 3, 32)])
    box_targets = np.array([[2, 0, -1], [1, -1, -1]])
    pred = 0.7 * rng.standard_normal((2, 3, 1, 8, 8))
    ious = rng.uniform(0.1, 0.9, (2, 3, 1))
    out = {"pred_masks": torch.tensor(pred, dtype=torch.float32, requires_grad=True),
           "pred_ious": torch.tensor(ious, dtype=torch.float32)}
    tgt = {"masks": torch.tensor(masks), "box_targets": torch.tensor(box_targets)}
    crit = Many2ManySetCriterion(num_points=200, oversample_ratio=2.0, importance_sample_ratio=0.5,
                                 generator=torch.Generator().manual_seed(3))
    losses = crit(out, tgt, "box")
    assert set(losses) == {"loss_box_mask", "loss_box_dice", "loss_box_iou"}
    order = [(0, 0), (0, 1), (1, 0)]
    want = ref_losses([pred[b, q, 0] for b, q in order], [masks[b, box_targets[b, q]] for b, q in order],
                      [ious[b, q, 0] for b, q in order], num=3.0, num_points=200, oversample=2.0, importance=0.5,
                      seed=3)
    for term in ("mask", "dice", "iou"):
        assert losses[f"loss_box_{term}"].item() == pytest.approx(want[term], rel=2e-4, abs=1e-6), term
    crit.total(losses).backward()
    g = out["pred_masks"].grad.abs().sum((-1, -2, -3))
    assert (g > 0).tolist() == [[True, True, False], [True, False, False]]
    # no box at all: zero losses that still reach the graph
    out2 = {"pred_masks": out["pred_masks"].detach().clone().requires_grad_(), "pred_ious": out["pred_ious"]}
    none = crit(out2, {"masks": tgt["masks"], "box_targets": torch.full((2, 3), -1)}, "box")
    assert all(v.item() == 0.0 for v in none.values())
    crit.total(none).backward()
    assert out2["pred_masks"].grad is not None


def test_chunking_changes_draws_only():
    """Chunks of pairs give the same kind of loss (close values, the random points differ) and exactly the
    reference when one chunk holds every pair."""
    masks, valid, member, pairs, pred, ious = _point_case(9)
    vals = []
    for chunk in (1 << 24, 900):  # all pairs / one pair per chunk (300 x 3 candidates)
        out, tgt = _point_inputs(masks, valid, member, pred, ious)
        crit = Many2ManySetCriterion(num_masks=2, num_points=300, deep_supervision=False, chunk_points=chunk,
                                     generator=torch.Generator().manual_seed(5))
        vals.append({k: v.item() for k, v in crit(out, tgt).items()})
    assert vals[0] != vals[1]
    for k in vals[0]:
        assert vals[0][k] == pytest.approx(vals[1][k], rel=0.1, abs=0.02)
    assert vals[0]["loss_iou"] == pytest.approx(vals[1]["loss_iou"], rel=1e-6)  # IoU targets use no points


def test_deep_supervision_supervises_every_head_independently():
    masks, valid, member, pairs, pred, ious = _point_case()
    out, tgt = _point_inputs(masks, valid, member, pred, ious, aux=3)
    crit = Many2ManySetCriterion(num_masks=2, num_points=64, matcher=Many2ManyMatcher(num_points=500))
    losses = crit(out, tgt)
    assert set(losses) == {f"loss_{t}{s}" for t in ("mask", "dice", "iou") for s in ("", "_0", "_1", "_2")}
    assert len(losses) == 3 * 4
    # aux head 2 has logits x 1.2: its losses differ from the last head's
    assert losses["loss_mask_2"].item() != losses["loss_mask"].item()
    flat = Many2ManySetCriterion(num_masks=2, num_points=64, deep_supervision=False)
    assert set(flat(out, tgt)) == {"loss_mask", "loss_dice", "loss_iou"}
    box = {"pred_masks": out["pred_masks"][:, :, :1], "pred_ious": out["pred_ious"][:, :, :1],
           "aux_outputs": [{"pred_masks": a["pred_masks"][:, :, :1], "pred_ious": a["pred_ious"][:, :, :1]}
                           for a in out["aux_outputs"]]}
    bl = crit(box, {"masks": tgt["masks"], "box_targets": torch.tensor([[0, 1, -1], [1, -1, -1]])}, "box")
    assert set(bl) == {f"loss_box_{t}{s}" for t in ("mask", "dice", "iou") for s in ("", "_0", "_1", "_2")}


def test_weights_presets_and_total():
    cfg, thesis = Many2ManySetCriterion.from_preset("config"), Many2ManySetCriterion.from_preset("thesis")
    assert cfg.weights == {"mask": 2.0, "dice": 1.0, "iou": 1.0}
    assert thesis.weights == {"mask": 2.0, "dice": 1.0, "iou": 5.0}
    assert (cfg.matcher.cost_mask, cfg.matcher.cost_dice, cfg.matcher.num_points) == (2.0, 1.0, 6000)
    assert (cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio) == (12544, 3.0, 0.75)
    losses = {"loss_mask": torch.tensor(1.5), "loss_dice_3": torch.tensor(0.25), "loss_box_iou_0": torch.tensor(0.5)}
    assert float(thesis.total(losses)) == pytest.approx(2 * 1.5 + 0.25 + 5 * 0.5)
    custom = Many2ManySetCriterion.from_preset("thesis", iou_weight=3.0, matcher_num_points=100)
    assert custom.weights["iou"] == 3.0 and custom.matcher.num_points == 100
    with pytest.raises(ValueError, match="preset"):
        Many2ManySetCriterion.from_preset("paper")
    with pytest.raises(ValueError, match="not a loss name"):
        cfg.weight_of("loss_class")


def test_bad_inputs_raise():
    masks, valid, member, pairs, pred, ious = _point_case()
    out, tgt = _point_inputs(masks, valid, member, pred, ious)
    crit = Many2ManySetCriterion(num_masks=2, num_points=16)
    with pytest.raises(ValueError, match="prompt_type"):
        crit(out, tgt, "mask")
    with pytest.raises(ValueError, match="K = num_masks"):
        Many2ManySetCriterion(num_masks=4)(out, tgt)
    with pytest.raises(ValueError, match="point_targets"):
        crit(out, {"masks": tgt["masks"]})
    with pytest.raises(ValueError, match="box prompts have K = 1"):
        crit(out, {"masks": tgt["masks"], "box_targets": torch.zeros(2, 3, dtype=torch.long)}, "box")
    with pytest.raises(ValueError, match="pred_masks"):
        crit({"pred_ious": out["pred_ious"]}, tgt)
    with pytest.raises(ValueError, match="same canvas"):
        crit(out, dict(tgt, masks=tgt["masks"][..., :16]))
    box = {"pred_masks": out["pred_masks"][:, :, :1], "pred_ious": out["pred_ious"][:, :, :1]}
    with pytest.raises(ValueError, match="beyond T"):
        crit(box, {"masks": tgt["masks"], "box_targets": torch.full((2, 3), 3)}, "box")
    with pytest.raises(ValueError, match="padding masks"):
        crit(box, {"masks": tgt["masks"], "mask_valid": tgt["mask_valid"],
                   "box_targets": torch.tensor([[0, -1, -1], [2, -1, -1]])}, "box")
    for kw, match in (({"num_masks": 0}, "num_masks"), ({"iou_weight": -1.0}, "iou_weight"),
                      ({"num_points": 0}, "num_points"), ({"oversample_ratio": 0.5}, "oversample_ratio"),
                      ({"importance_sample_ratio": 1.5}, "importance_sample_ratio")):
        with pytest.raises(ValueError, match=match):
            Many2ManySetCriterion(**kw)
    with pytest.raises(ValueError, match="cost_mask"):
        Many2ManyMatcher(cost_mask=-1.0)
    with pytest.raises(ValueError, match="point_coords"):
        C.point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(2, 3, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation across ranks


def _rank_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(_rank_losses(rank), os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_losses(rank: int) -> dict:
    """Rank 0 has 3 box pairs, rank 1 has 1."""
    rng = _rng(20 + rank)
    masks = torch.tensor(_blob_masks(rng, 3, 32)[None])
    bt = torch.tensor([[0, 1, 2]]) if rank == 0 else torch.tensor([[1, -1, -1]])
    out = {"pred_masks": torch.tensor(rng.standard_normal((1, 3, 1, 8, 8)), dtype=torch.float32),
           "pred_ious": torch.tensor(rng.uniform(0, 1, (1, 3, 1)), dtype=torch.float32)}
    crit = Many2ManySetCriterion(num_points=50, generator=torch.Generator().manual_seed(rank))
    return {k: float(v) for k, v in crit(out, {"masks": masks, "box_targets": bt}, "box").items()}


def test_losses_are_normalised_by_the_mean_pair_count_over_ranks(tmp_path):
    """Mask2Former's num_masks: the pairs summed over ranks / world size = (3 + 1) / 2 on both ranks; one process
    alone divides by its own count."""
    from train.launch import free_port

    torch.multiprocessing.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank, own in ((0, 3.0), (1, 1.0)):
        dist_losses = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        alone = _rank_losses(rank)
        for k, v in alone.items():
            assert dist_losses[k] == pytest.approx(v * own / 2.0, rel=1e-5), (rank, k)
