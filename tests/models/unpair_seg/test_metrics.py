"""Semantic mIoU, panoptic PQ/SQ/RQ and prompt oracle IoUs against hand-computed cases and loop references."""

import math

import numpy as np
import pytest
import torch

from models.unpair_seg.metrics import (PanopticMetrics, PromptMetrics, SemanticMetrics, mask_box, mask_ious,
                                       oracle_iou, oracle_point, pairwise_iou)

# -- semantic ---------------------------------------------------------------------------------------------------------

GT = np.array([[0, 0, 1, 1],
               [0, 2, 2, 255]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 2]])


def test_semantic_hand_computed():
    m = SemanticMetrics(3, class_names=["a", "b", "c"])
    m.update(PRED, torch.from_numpy(GT))
    r = m.compute()
    # (gt, pred) over the 7 non-ignored pixels: (0,0) x2, (0,1), (1,1) x2, (2,2), (2,0).
    iou = [2 / 4, 2 / 3, 1 / 2]
    acc = [2 / 3, 1.0, 1 / 2]
    assert r["IoU"] == pytest.approx(iou) and r["ACC"] == pytest.approx(acc)
    assert r["mIoU"] == pytest.approx(sum(iou) / 3)
    assert r["mIoU_mmseg"] == pytest.approx(sum(iou) / 3)
    assert r["mACC"] == pytest.approx(sum(acc) / 3)
    assert r["pACC"] == pytest.approx(5 / 7)
    assert r["fwIoU"] == pytest.approx(3 / 7 * 0.5 + 2 / 7 * 2 / 3 + 2 / 7 * 0.5)
    assert (r["count"], r["pixels"], r["class_names"]) == (1, 7, ["a", "b", "c"])


def test_semantic_predicted_only_class_detectron2_vs_mmseg():
    pred = PRED.copy()
    pred[1, 2] = 3  # class 3 never occurs in the GT
    m = SemanticMetrics(5)
    m.update(pred, GT)
    r = m.compute()
    # class 0: TP 2 FN 1 FP 0; class 1: TP 2 FP 1; class 2: TP 1 FN 1; class 3: FP 1 -> IoU 0; class 4: absent.
    assert r["IoU"] == pytest.approx([2 / 3, 2 / 3, 1 / 2, 0.0, None])
    assert r["mIoU"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)  # detectron2: classes in the GT
    assert r["mIoU_mmseg"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2 + 0) / 4)  # mmseg: in the GT or the prediction
    assert r["ACC"][3] is None and r["ACC"][4] is None


def test_semantic_random_matches_reference_and_merges():
    rng = np.random.default_rng(0)
    k, ignore = 6, 255
    images = []
    for _ in range(4):
        gt = rng.integers(0, k, (7, 9))
        gt[rng.random((7, 9)) < 0.2] = ignore
        images.append((rng.integers(0, k - 1, (7, 9)), gt))
    one, a, b = SemanticMetrics(k), SemanticMetrics(k), SemanticMetrics(k)
    for i, (p, g) in enumerate(images):
        one.update(p, g)
        (a if i % 2 else b).update(p, g)
    a.merge(b)
    c = SemanticMetrics(k)
    c.load_state_dict(a.state_dict())
    r = one.compute()
    assert c.compute() == r
    # Reference: per-class boolean masks over all images.
    ps = np.concatenate([p.ravel() for p, _ in images])
    gs = np.concatenate([g.ravel() for _, g in images])
    keep = gs != ignore
    ps, gs = ps[keep], gs[keep]
    ious = []
    for cls in range(k):
        inter = np.sum((ps == cls) & (gs == cls))
        union = np.sum((ps == cls) | (gs == cls))
        ious.append(inter / union if union else None)
        assert r["IoU"][cls] == pytest.approx(ious[-1])
    present = [i for cls, i in enumerate(ious) if np.any(gs == cls)]
    assert r["mIoU"] == pytest.approx(np.mean(present))
    assert r["pACC"] == pytest.approx(np.mean(ps == gs))


def test_semantic_rejects_bad_inputs():
    with pytest.raises(ValueError, match="ignore_label"):
        SemanticMetrics(300, ignore_label=255)
    m = SemanticMetrics(3)
    with pytest.raises(ValueError, match="'gt'"):
        m.update(PRED, np.where(GT == 2, 7, GT))
    with pytest.raises(ValueError, match="'pred'"):
        m.update(np.full_like(PRED, 3), GT)
    with pytest.raises(ValueError, match="same shape"):
        m.update(PRED[:, :3], GT)
    with pytest.raises(TypeError, match="integers"):
        m.update(PRED.astype(np.float32), GT)
    with pytest.raises(ValueError, match="no evaluated pixels"):
        m.compute()


# -- panoptic ---------------------------------------------------------------------------------------------------------

CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
        {"id": 3, "name": "s", "isthing": 0}, {"id": 4, "name": "unused", "isthing": 0}]


def _panoptic_case():
    gt = np.zeros((4, 8), dtype=np.int64)
    gt[0:2, 0:4] = 10  # cat 1
    gt[2:4, 0:4] = 11  # cat 2
    gt[:, 4:6] = 12  # cat 3 (stuff)
    gt[0:2, 6:8] = 13  # cat 1, crowd
    # gt[2:4, 6:8] = 0: VOID
    gt_segs = [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 8}, {"id": 11, "category_id": 2, "iscrowd": 0},
               {"id": 12, "category_id": 3, "iscrowd": 0}, {"id": 13, "category_id": 1, "iscrowd": 1}]
    pred = np.zeros((4, 8), dtype=np.int64)
    pred[0:2, 0:3] = 1  # cat 1 on segment 10: IoU 6 / 8 = 0.75 -> TP
    pred[2:4, 0:2] = 2  # cat 2 on segment 11: IoU 4 / 8 = 0.5, not > 0.5 -> FP (and segment 11 a FN)
    pred[:, 4:6] = 3  # cat 3 on segment 12 ...
    pred[2:4, 6] = 3  # ... plus 2 VOID pixels, left out of the union: IoU 8 / (10 + 8 - 8 - 2) = 1 -> TP
    pred[0:2, 6:8] = 4  # cat 1 on the cat-1 crowd (4 px) ...
    pred[0, 3] = 4  # ... plus 1 px of segment 10: 4/5 on crowd -> not a FP
    pred[2:4, 7] = 5  # cat 3: 2 VOID px ...
    pred[3, 3] = 5  # ... plus 1 px of segment 11: 2/3 on VOID -> not a FP
    pred_segs = [{"id": i, "category_id": c} for i, c in ((1, 1), (2, 2), (3, 3), (4, 1), (5, 3))]
    return gt, gt_segs, pred, pred_segs


def test_panoptic_hand_computed():
    m = PanopticMetrics(CATS)
    m.update(*_panoptic_case())
    r = m.compute()
    per = {c["id"]: c for c in r["per_class"]}
    assert (per[1]["tp"], per[1]["fp"], per[1]["fn"]) == (1, 0, 0)
    assert (per[2]["tp"], per[2]["fp"], per[2]["fn"]) == (0, 1, 1)
    assert (per[3]["tp"], per[3]["fp"], per[3]["fn"]) == (1, 0, 0)
    assert per[1]["pq"] == pytest.approx(0.75) and per[1]["sq"] == pytest.approx(0.75) and per[1]["rq"] == 1.0
    assert per[2]["pq"] == 0.0 and per[2]["rq"] == 0.0
    assert per[3]["pq"] == pytest.approx(1.0)
    assert r["n"] == 3 and r["n_th"] == 2 and r["n_st"] == 1  # category 4 has no segment: left out
    assert r["PQ"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert r["SQ"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert r["RQ"] == pytest.approx(2 / 3)
    assert r["PQ_th"] == pytest.approx(0.375) and r["RQ_th"] == pytest.approx(0.5)
    assert r["PQ_st"] == pytest.approx(1.0)


def test_panoptic_merge_and_two_images():
    gt, gs, pred, ps = _panoptic_case()
    one, a, b = PanopticMetrics(CATS), PanopticMetrics(CATS), PanopticMetrics(CATS)
    # Image 2: a perfect prediction of segment 11 (cat 2) only; everything else of the GT unpredicted.
    pred2 = np.where(gt == 11, 7, 0)
    ps2 = [{"id": 7, "category_id": 2}]
    for acc in (one, a):
        acc.update(gt, gs, pred, ps)
    one.update(gt, gs, pred2, ps2)
    b.update(gt, gs, pred2, ps2)
    a.merge(b)
    r = one.compute()
    assert a.compute() == r
    per = {c["id"]: c for c in r["per_class"]}
    # cat 1: TP 1 (0.75), FN 1 (segment 10 of image 2); cat 2: TP 1 (1.0), FP 1, FN 1; cat 3: TP 1, FN 1.
    assert per[1]["pq"] == pytest.approx(0.75 / 1.5)
    assert per[2]["pq"] == pytest.approx(1.0 / 2.0) and per[2]["sq"] == pytest.approx(1.0)
    assert per[3]["pq"] == pytest.approx(1.0 / 1.5)
    assert r["count"] == 2


def test_panoptic_sanity_checks():
    gt, gs, pred, ps = _panoptic_case()
    m = PanopticMetrics(CATS)
    with pytest.raises(ValueError, match="not in 'pred_segments'"):
        m.update(gt, gs, pred, ps[:-1])
    with pytest.raises(ValueError, match="not in 'pan_pred'"):
        m.update(gt, gs, pred, ps + [{"id": 9, "category_id": 1}])
    with pytest.raises(ValueError, match="unknown category_id"):
        m.update(gt, gs, pred, ps[:-1] + [{"id": 5, "category_id": 99}])
    with pytest.raises(ValueError, match="isthing"):
        PanopticMetrics([{"id": 1}])


# -- prompts ----------------------------------------------------------------------------------------------------------


def _brute_force_point(mask):
    """Argmax (first in row-major order) of the distance to the nearest non-mask pixel, the border ring included."""
    h, w = mask.shape
    pad = np.pad(mask, 1)
    bg = np.argwhere(~pad) - 1  # background pixel coordinates in the unpadded frame
    best, at = -1.0, None
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                d = np.sqrt(((bg - (y, x)) ** 2).sum(1)).min()
                if d > best + 1e-12:
                    best, at = d, (x, y)
    return at


def test_oracle_point_hand_and_brute_force():
    m = np.zeros((8, 12), dtype=bool)
    m[1:6, 2:9] = True  # 5 x 7 box: rows 1..5, cols 2..8; distance 3 at row 3, cols 4..6 -> the first, x = 4
    assert oracle_point(m) == (4, 3)
    assert oracle_point(torch.from_numpy(m)) == (4, 3)
    # The image border is a boundary: a full-image mask's farthest point is its centre.
    assert oracle_point(np.ones((5, 5), dtype=bool)) == (2, 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        blob = np.zeros((9, 10), dtype=bool)
        for _ in range(3):
            y, x, r = rng.integers(0, 9), rng.integers(0, 10), rng.integers(1, 4)
            yy, xx = np.mgrid[:9, :10]
            blob |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        assert oracle_point(blob) == _brute_force_point(blob)
    with pytest.raises(ValueError, match="empty"):
        oracle_point(np.zeros((3, 3), dtype=bool))


def test_mask_box_and_ious():
    m = np.zeros((6, 7), dtype=bool)
    m[2:5, 1:4] = True
    m[1, 6] = True
    assert mask_box(m) == (1, 1, 7, 5)
    gt = np.zeros((4, 4), dtype=bool)
    gt[0:2, 0:2] = True
    preds = np.zeros((3, 4, 4), dtype=bool)
    preds[0, 0:2, 0:2] = True  # IoU 1
    preds[1, 0, 0] = True  # 1 / 4
    preds[2, 0:2, 1:3] = True  # 2 / 6
    np.testing.assert_allclose(mask_ious(preds, gt), [1.0, 0.25, 1 / 3])
    # Logits binarise at >= 0.
    logits = np.where(preds, 2.0, -3.0).astype(np.float32)
    logits[1, 3, 3] = 0.0  # exactly 0 counts as foreground: IoU 1 / 5
    np.testing.assert_allclose(mask_ious(logits, gt), [1.0, 0.2, 1 / 3])
    np.testing.assert_allclose(oracle_iou(np.stack([preds, preds[::-1]]), np.stack([gt, gt])), [1.0, 1.0])
    np.testing.assert_allclose(oracle_iou(preds[None, 1:], gt[None]), [1 / 3])
    with pytest.raises(ValueError, match="empty"):
        mask_ious(preds, np.zeros((4, 4), dtype=bool))


def test_prompt_metrics_accumulate():
    gt = np.zeros((2, 4, 4), dtype=bool)
    gt[0, 0:2, 0:2] = True
    gt[1, 2:4, :] = True  # 8 px
    pred = np.zeros((2, 2, 4, 4), dtype=bool)
    pred[0, 0, 0:2, 0:2] = True  # 1.0
    pred[0, 1, 0, 0:2] = True  # 0.5
    pred[1, 0, 3, :] = True  # 0.5
    pred[1, 1, 1:4, :] = True  # 8 / 12
    scores = np.array([[0.2, 0.9], [0.1, 0.3]])
    m = PromptMetrics()
    ious = m.update(pred, gt, scores)
    np.testing.assert_allclose(ious, [[1.0, 0.5], [0.5, 2 / 3]])
    r = m.compute()
    assert r["mIoU"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert r["mIoU_top"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["count"] == 2
    other = PromptMetrics()
    other.update(pred[:1], gt[:1])
    m.merge(other)
    assert m.compute()["mIoU"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert m.compute()["mIoU_top"] == pytest.approx((0.5 + 2 / 3) / 2)  # the scoreless update adds no top count
    assert PromptMetrics().compute() == {"mIoU": None, "count": 0}
    with pytest.raises(ValueError, match="scores"):
        m.update(pred, gt, scores[:, :1])
    assert math.isfinite(r["mIoU"])


def test_pairwise_iou_and_add():
    rng = np.random.default_rng(2)
    pred = rng.random((5, 6, 7)) < 0.4
    pred[4] = False  # an empty prediction
    gt = rng.random((3, 6, 7)) < 0.5
    got = pairwise_iou(pred, gt)
    assert got.shape == (3, 5)
    for n in range(3):
        for m in range(5):
            inter, union = np.sum(gt[n] & pred[m]), np.sum(gt[n] | pred[m])
            assert got[n, m] == pytest.approx(inter / union)
    assert pairwise_iou(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), bool))[0, 0] == 0.0
    m = PromptMetrics()
    m.add(got.max(1))
    m.add(np.array([0.5]), top_ious=np.array([0.25]))
    r = m.compute()
    assert r["count"] == 4 and r["mIoU"] == pytest.approx((got.max(1).sum() + 0.5) / 4)
    assert r["mIoU_top"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="top_ious"):
        m.add(np.array([0.5, 0.1]), top_ious=np.array([0.2]))
