"""The Unpair-Seg demo part: the class-agnostic mask AR against hand-computed cases, the demo's background rule, and
a very short ``run(..., quick=True)`` that writes every file and a report section with the metric table."""

import json

import numpy as np
import pytest
import torch

from train import unpair_seg_demo as demo


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_best_ious_hand_case():
    """Two GT squares and three proposals, IoUs worked out by hand; top-k follows the scores, not the order."""
    g0 = _box(10, 10, 0, 4, 0, 4)    # 16 px
    g1 = _box(10, 10, 5, 10, 5, 10)  # 25 px
    p_a = _box(10, 10, 0, 4, 0, 2)   # half of g0: IoU 8 / 16 = 0.5
    p_b = _box(10, 10, 5, 10, 5, 10)  # exactly g1: IoU 1
    p_c = _box(10, 10, 0, 4, 0, 3)   # 12 px inside g0: IoU 12 / 16 = 0.75
    pred = np.stack([p_a, p_b, p_c])
    gt = np.stack([g0, g1])
    scores = np.array([0.9, 0.2, 0.5])
    np.testing.assert_allclose(demo.best_ious(pred, scores, gt), [0.75, 1.0])
    np.testing.assert_allclose(demo.best_ious(pred, scores, gt, k=1), [0.5, 0.0])  # only p_a (0.9)
    np.testing.assert_allclose(demo.best_ious(pred, scores, gt, k=2), [0.75, 0.0])  # p_a, p_c
    # float logits are binarised at >= 0, integer masks at != 0; tensors are accepted
    logits = np.where(pred, 3.0, -3.0).astype(np.float32)
    np.testing.assert_allclose(demo.best_ious(torch.from_numpy(logits), torch.tensor(scores), gt.astype(np.uint8)),
                               [0.75, 1.0])
    # a partial overlap across two objects: p = rows 2..6, cols 2..6 (16 px); with g0: 2x2 = 4, union 28
    p_x = _box(10, 10, 2, 6, 2, 6)
    np.testing.assert_allclose(demo.best_ious(p_x[None], np.array([1.0]), gt), [4 / 28, 1 / 40])
    # no proposals: every GT has IoU 0
    np.testing.assert_array_equal(demo.best_ious(np.zeros((0, 10, 10), bool), np.zeros(0), gt), [0.0, 0.0])


def test_average_recall_hand_case():
    """AR = mean over t in 0.5:0.05:0.95 of the recall at t; the values below by counting thresholds by hand."""
    assert demo.AR_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert demo.average_recall([1.0]) == pytest.approx(1.0)
    assert demo.average_recall([0.49]) == pytest.approx(0.0)
    assert demo.average_recall([0.75]) == pytest.approx(0.6)  # 0.5 .. 0.75: 6 of 10 thresholds
    assert demo.average_recall([0.5]) == pytest.approx(0.1)   # only t = 0.5 (>= is inclusive)
    # two objects: 0.75 -> 6 thresholds, 0.92 -> 9; recall per threshold averaged = (6 + 9) / 20
    assert demo.average_recall([0.75, 0.92]) == pytest.approx(15 / 20)
    assert np.isnan(demo.average_recall([]))


def test_recall_accumulator_over_images():
    """AR@K pools the GT objects of all images; K limits each image's proposals by score."""
    rng = np.random.default_rng(0)
    h = w = 12
    acc = demo.RecallAccumulator(ks=(1, 100))
    g0, g1 = _box(h, w, 0, 6, 0, 6), _box(h, w, 6, 12, 6, 12)
    exact1 = g1.copy()
    half0 = _box(h, w, 0, 6, 0, 3)  # IoU 0.5 with g0
    # image 1: the higher-scored proposal is the half mask, the exact one of g1 comes second
    acc.add(np.stack([half0, exact1]), np.array([0.8, 0.6]), np.stack([g0, g1]))
    # image 2: one GT, a random proposal inside the GT with known IoU, plus noise proposals with lower scores
    g2 = _box(h, w, 2, 10, 2, 10)  # 64 px
    inner = np.zeros((h, w), bool)
    inner[2:10, 2:10] = rng.random((8, 8)) < 0.9
    iou2 = inner.sum() / 64.0
    noise = rng.random((3, h, w)) < 0.05
    acc.add(np.concatenate([inner[None], noise]), np.array([0.9, 0.1, 0.2, 0.3]), g2[None])
    r = acc.compute()
    assert r["count"] == 3 and r["images"] == 2
    # K = 1: g0 0.5, g1 0 (its proposal is second), g2 iou2
    want1 = np.mean([np.mean([v >= t for v in (0.5, 0.0, iou2)]) for t in demo.AR_THRESHOLDS])
    # K = 100: g0 0.5, g1 1.0, g2 max(iou2, noise IoUs) = iou2 (noise at 5 % density stays far below)
    noise_best = max((n & g2).sum() / (n | g2).sum() for n in noise)
    assert noise_best < iou2
    want100 = np.mean([np.mean([v >= t for v in (0.5, 1.0, iou2)]) for t in demo.AR_THRESHOLDS])
    assert r["AR@1"] == pytest.approx(want1)
    assert r["AR@100"] == pytest.approx(want100)
    assert r["R@0.5@1"] == pytest.approx(2 / 3) and r["R@0.5@100"] == pytest.approx(1.0)


def test_best_ious_rejects_bad_inputs():
    gt = _box(4, 4, 0, 2, 0, 2)[None]
    with pytest.raises(ValueError, match="scores"):
        demo.best_ious(gt, np.zeros(2), gt)
    with pytest.raises(ValueError, match="share"):
        demo.best_ious(np.zeros((1, 5, 5), bool), np.zeros(1), gt)
    with pytest.raises(ValueError, match="empty mask"):
        demo.best_ious(gt, np.zeros(1), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="'k'"):
        demo.best_ious(gt, np.zeros(1), gt, k=0)
    with pytest.raises(TypeError, match="pred_masks"):
        demo.best_ious([[[1]]], np.zeros(1), gt)


def test_assemble_background_rule():
    """Pixels no proposal covers become background in the semantic map; the panoptic assembly's unassigned pixels
    one background segment (category K + 1) with a fresh id."""
    k = 6
    prop = torch.full((2, 4, 5), -2.0)
    prop[0, :2, :2] = 2.0
    prop[1, 2:, 3:] = 1.0
    sem = torch.full((4, 5), 3, dtype=torch.int64)
    pan = torch.zeros((4, 5), dtype=torch.int32)
    pan[:2, :2] = 1
    pred = {"proposal": prop, "sem_seg": sem, "panoptic_seg": pan,
            "segments_info": [{"id": 1, "category_id": 4, "isthing": True, "score": 0.9}]}
    s, p, segs = demo.assemble(pred, k)
    covered = (prop >= 0).any(0).numpy()
    np.testing.assert_array_equal(s, np.where(covered, 3, k))
    assert segs == [{"id": 1, "category_id": 5}, {"id": 2, "category_id": k + 1}]
    np.testing.assert_array_equal(p, np.where(pan.numpy() == 1, 1, 2))
    empty = {"proposal": torch.zeros((0, 4, 5)), "sem_seg": torch.zeros((4, 5), dtype=torch.int64),
             "panoptic_seg": torch.zeros((4, 5), dtype=torch.int32), "segments_info": []}
    s, p, segs = demo.assemble(empty, k)
    assert (s == k).all() and (p == 1).all() and segs == [{"id": 1, "category_id": k + 1}]


@pytest.mark.parametrize("name", ["colour", "category"])
def test_scene_ground_truth_labels_objects_by_the_vocabulary(name):
    """Every visible object's pixels carry the index of its colour (or category) word; background is K; the panoptic
    segments use ids K-class + 1 and the background K + 1."""
    from train.data.shapes import ShapesWorld

    vocab = demo.vocabulary(name)
    k = len(vocab.classes)
    scene = ShapesWorld(seed=3, size=(48, 64), min_objects=3, max_objects=4).scene(5)
    gt = demo.scene_ground_truth(scene, vocab)
    seen = 0
    for j, spec in enumerate(scene.specs):
        m = scene.instance == j + 1
        if not m.any():
            continue
        word = spec.colour if name == "colour" else spec.category
        assert (gt["semantic"][m] == vocab.words.index(word)).all()
        seg = next(s for s in gt["segments"] if s["id"] == j + 1)
        assert seg["category_id"] == vocab.words.index(word) + 1 and seg["area"] == int(m.sum())
        seen += 1
    assert seen == len(gt["masks"]) > 0
    assert (gt["semantic"][scene.instance == 0] == k).all()
    assert gt["segments"][-1]["category_id"] == k + 1
    cats = vocab.panoptic_categories()
    assert [c["id"] for c in cats] == list(range(1, k + 2)) and cats[-1]["isthing"] == 0


def test_vocabularies_and_held_out_classes():
    colour = demo.vocabulary("colour")
    assert colour.classes[0] == "red shape" and len(colour.classes) == len(colour.colours) - 1 == 8
    assert colour.held_out(["purple", "cyan"]) == ["purple shape", "cyan shape"]
    assert demo.vocabulary("category").held_out(["star"]) == ["star"]
    with pytest.raises(ValueError, match="colour"):
        demo.vocabulary("shapes")
    with pytest.raises(ValueError, match="holdout"):
        demo.run("/nonexistent", quick=True, holdout=["circle"])  # a shape word is not a colour word


@pytest.mark.slow
def test_quick_run_writes_report(tmp_path):
    """A 2-step run of each stage on a handful of scenes, 2 held-out scenes: the files, the metric table, and the
    verdict consistent with metrics.json."""
    section, ok = demo.run(str(tmp_path), quick=True)
    out = tmp_path / "unpair_seg"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["metrics"]) == set(demo.VARIANTS)
    for name, r in m["metrics"].items():
        for key in ("AR@10", "AR@100", "mIoU", "PQ"):
            assert r[key] is not None and 0.0 <= r[key] <= 1.0, (name, key)
        assert r["count"] > 0 and r["images"] == demo.QUICK_EVAL_SCENES
        assert r["held_out"]["words"] == ["purple shape", "cyan shape"]
    better = {k: m["metrics"]["trained"][k] > m["metrics"]["untrained"][k] for k in demo.VERDICT_KEYS}
    assert m["better"] == better and ok == all(better.values()) == m["ok"]
    assert m["configs"]["stage2"]["stage2"]["holdout"] == ["purple", "cyan"]
    assert m["vocabulary"] == "colour" and len(m["classes"]) == 8
    assert (out / "examples.png").exists() and (out / "report.md").exists()
    for sub in ("proposals", "semantic", "panoptic"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [f"{i}.png" for i in range(demo.QUICK_EXAMPLES)]
    for tag in ("clip", "s1", "s2"):
        assert (out / f"loss_{tag}.png").exists()
    assert (out / "run" / "clip" / "clip.safetensors").exists()
    assert "| model | proposals / image | AR@10 | AR@100 | mIoU | PQ |" in section and "| trained |" in section
    assert "| untrained |" in section and "unpair_seg/examples.png" in section
    assert "](unpair_seg/" not in (out / "report.md").read_text()  # paths relative to its folder
