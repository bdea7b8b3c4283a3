"""CRIS metrics (models/cris/metrics.py) on hand-computed cases (specs/cris.md §6 "Evaluation metrics", §8.9)."""

import json

import numpy as np
import pytest
import torch

from models.cris import metrics as mt


def _mask(h, w, cells):
    m = np.zeros((h, w), bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_thresholds_are_the_official_float32_ones():
    assert mt.PR_THRESHOLDS.dtype == torch.float32
    assert [float(t) for t in mt.PR_THRESHOLDS] == [0.5, 0.6000000238418579, 0.699999988079071, 0.800000011920929,
                                                   0.8999999761581421]
    assert mt.PR_KEYS == ("Pr@50", "Pr@60", "Pr@70", "Pr@80", "Pr@90")


def test_sample_iou_hand_cases():
    p = _mask(3, 4, [(0, 0), (0, 1), (1, 0), (1, 1)])
    g = _mask(3, 4, [(0, 1), (1, 1), (2, 1), (2, 2)])
    assert mt.mask_counts(p, g) == (2, 6)
    assert mt.sample_iou(p, g) == 2 / (6 + 1e-6)
    assert mt.sample_iou(p, p) == 4 / (4 + 1e-6) < 1.0  # the epsilon is in the denominator
    empty = np.zeros((3, 4), bool)
    assert mt.sample_iou(empty, empty) == 0.0  # both empty -> 0, as official
    assert mt.sample_iou(empty, g) == 0.0 and mt.sample_iou(p, empty) == 0.0
    # Ground truth as stored: uint8 255, the overlap value 254, or a soft /255 mask: all non-zero is the object.
    g8 = g.astype(np.uint8) * 255
    g8[2, 2] = 254
    assert mt.sample_iou(torch.from_numpy(p), g8) == mt.sample_iou(p, g8 / 255.0) == mt.sample_iou(p, g)


def test_precision_threshold_edges_float32_vs_float64():
    ious = [0.5, 0.50000001, 0.6, 0.60000001, 0.60000003, 0.69999999, 0.7, 0.8, 0.9, 0.95]
    pr = mt.precision_at(ious)
    # > 0.5: all but 0.5.  > 0.6000000238: 0.60000003 and up (0.6 and 0.60000001 fail, unlike a float64 0.6).
    # > 0.6999999881: 0.69999999 passes.  > 0.8000000119: 0.8 fails.  > 0.8999999762: 0.9 passes.
    expect = {"Pr@50": 9, "Pr@60": 6, "Pr@70": 5, "Pr@80": 2, "Pr@90": 2}
    assert pr == {k: float(np.float32(v / 10)) for k, v in expect.items()}
    f64 = {f"Pr@{t}": sum(v > t / 100 for v in ious) for t in (50, 60, 70, 80, 90)}
    assert f64 == {"Pr@50": 9, "Pr@60": 7, "Pr@70": 3, "Pr@80": 2, "Pr@90": 1}  # what float64 thresholds would say
    assert mt.precision_at([1.0])["Pr@90"] == 1.0 and mt.precision_at([0.0])["Pr@50"] == 0.0
    with pytest.raises(ValueError, match="'ious'"):
        mt.precision_at([])


def test_accumulator_miou_oiou_and_json(tmp_path):
    acc = mt.ReferMetrics()
    p1 = _mask(3, 4, [(0, 0), (0, 1), (1, 0), (1, 1)])
    g1 = _mask(3, 4, [(0, 1), (1, 1), (2, 1), (2, 2)])
    p2, g2 = np.zeros((5, 2), bool), np.zeros((5, 2), np.uint8)  # both empty
    p3, g3 = _mask(2, 2, [(0, 0), (1, 1), (0, 1)]), np.zeros((2, 2), bool)
    p4 = g4 = _mask(6, 7, [(r, c) for r in range(6) for c in range(7) if (r + c) % 2])  # 21 pixels, identical
    assert acc.update([p1, p2], [g1, g2], ids=[10, 11]) == [2 / (6 + 1e-6), 0.0]
    acc.update([p3, p4], [g3, g4])
    out = acc.compute()
    ious = [2 / (6 + 1e-6), 0.0, 0.0, 21 / (21 + 1e-6)]
    assert out["mIoU"] == pytest.approx(sum(ious) / 4, abs=1e-15)
    assert out["oIoU"] == (2 + 0 + 0 + 21) / (6 + 0 + 3 + 21)
    assert out["count"] == 4 and len(acc) == 4
    assert out["Pr@50"] == 0.25 and out["Pr@90"] == 0.25  # only the identical pair passes (2/6 does not)
    written = acc.to_json(tmp_path / "sub" / "val.json", per_sample=True, dataset="refcoco", split="val")
    back = json.loads((tmp_path / "sub" / "val.json").read_text())
    assert back == written and back["dataset"] == "refcoco" and back["mIoU"] == out["mIoU"]
    assert [s["id"] for s in back["samples"]] == [10, 11, None, None]
    assert [(s["inter"], s["union"]) for s in back["samples"]] == [(2, 6), (0, 0), (0, 3), (21, 21)]
    assert not (tmp_path / "sub" / "val.json.tmp").exists()

    # Stacked tensors work too; merging the states of two halves equals one accumulator.
    a, b = mt.ReferMetrics(), mt.ReferMetrics()
    a.update(torch.from_numpy(np.stack([p1, p1])), torch.from_numpy(np.stack([g1, p1])))
    b.update([p3, p4], [g3, g4])
    whole = mt.ReferMetrics()
    whole.update([p1, p1, p3, p4], [g1, p1, g3, g4])
    a.merge(b.state())
    assert a.compute() == whole.compute()
    a.reset()
    assert len(a) == 0


def test_accumulator_bad_inputs():
    acc = mt.ReferMetrics()
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="'gts'"):
        acc.update([np.zeros((2, 2))], [])
    with pytest.raises(ValueError, match="same shape"):
        acc.update([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="'pred'"):
        acc.update([np.zeros((1, 2, 2))], [np.zeros((2, 2))])
    with pytest.raises(TypeError, match="'gt'"):
        acc.update([np.zeros((2, 2))], [[[0, 0], [0, 0]]])
    with pytest.raises(ValueError, match="'ids'"):
        acc.update([np.zeros((2, 2))], [np.zeros((2, 2))], ids=[1, 2])
    with pytest.raises(ValueError, match="'state'"):
        acc.merge({"inters": [1], "unions": [], "ious": [0.5]})
    assert len(acc) == 0  # failed updates added nothing


def _official_train_metric(output, target, threshold=0.35, pr_iou=0.5):
    """trainMetricGPU, written out (fractions instead of percentages)."""
    output = torch.sigmoid(output.flatten(1))
    target = target.flatten(1)
    output[output < threshold] = 0.0
    output[output >= threshold] = 1.0
    inter = (output.bool() & target.bool()).sum(dim=1)
    union = (output.bool() | target.bool()).sum(dim=1)
    ious = inter / (union + 1e-6)
    return ious.mean(), (ious > pr_iou).float().mean()


def test_train_metric_hand_case_and_random():
    big = 10.0
    logits = torch.tensor([[[[big, big], [-big, -big]]], [[[big, big], [big, -big]]]])  # [2, 1, 2, 2]
    target = torch.tensor([[[[0.3, 0.0], [0.0, 0.0]]], [[[1.0, 0.01], [0.5, 0.0]]]])  # soft: non-zero = object
    iou, prec = mt.train_metric(logits, target)
    i1, i2 = np.float32(1) / np.float32(2 + 1e-6), np.float32(3) / np.float32(3 + 1e-6)
    assert iou.dtype == torch.float32 and iou.item() == pytest.approx((i1 + i2) / 2, rel=1e-6)
    assert prec.item() == 0.5  # 1/2 (minus the epsilon) is not > 0.5
    # sigmoid(0) = 0.5 >= 0.5: the training threshold is inclusive.
    iou, _ = mt.train_metric(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), threshold=0.5)
    assert iou.item() == pytest.approx(4 / (4 + 1e-6))
    for shape in [(4, 1, 13, 7), (3, 5, 5), (2, 9)]:
        x, t = torch.randn(shape) * 2, (torch.rand(shape) > 0.6) * torch.rand(shape)
        got, want = mt.train_metric(x, t), _official_train_metric(x.clone(), t)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_train_metric_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        mt.train_metric(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="'logits'"):
        mt.train_metric(torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match="'logits'"):
        mt.train_metric(np.zeros((2, 4)), torch.zeros(2, 4))
