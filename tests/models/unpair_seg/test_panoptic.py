"""Mask2Former-style semantic and panoptic assembly on hand-built and random proposals."""

import math

import numpy as np
import pytest
import torch

from models.unpair_seg.panoptic import panoptic_inference, semantic_inference, semantic_labels


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def _softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def test_semantic_inference_matches_loops():
    g = torch.Generator().manual_seed(0)
    masks, cls = torch.randn(5, 4, 3, generator=g) * 3, torch.randn(5, 3, generator=g) * 2
    ref = np.zeros((3, 4, 3))
    for q in range(5):
        p = _softmax(cls[q].tolist())
        for k in range(3):
            for y in range(4):
                for x in range(3):
                    ref[k, y, x] += p[k] * _sig(float(masks[q, y, x]))
    got = semantic_inference(masks, cls)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(semantic_labels(masks, cls), torch.from_numpy(ref.argmax(0)))
    assert torch.equal(semantic_labels(masks, cls, rows_per_chunk=3), torch.from_numpy(ref.argmax(0)))
    # With a void logit: softmax over K + 1, the void column dropped (Mask2Former's learned no-object class).
    void = torch.randn(5, generator=g)
    ref_v = np.zeros((3, 4, 3))
    for q in range(5):
        p = _softmax(cls[q].tolist() + [float(void[q])])[:3]
        ref_v += np.array(p)[:, None, None] * (1 / (1 + np.exp(-masks[q].double().numpy())))[None]
    np.testing.assert_allclose(semantic_inference(masks, cls, void).numpy(), ref_v, rtol=1e-5, atol=1e-6)
    assert semantic_inference(torch.zeros(0, 4, 3), torch.zeros(0, 3)).abs().sum() == 0


def _hand_case():
    """4 x 6 image, 6 proposals (module docstring of the test for the expected outcome)."""
    h, w, big = 4, 6, 8.0
    m = torch.full((6, h, w), -big)
    m[0, :, 0:2] = big  # thing 0, strong
    m[1, 0:2, 3:6] = big  # stuff 2
    m[2, 2:4, 3:6] = big  # stuff 2 again: merges into q1's segment
    m[3, :, :] = big  # thing 1 with a low score: dropped by the 0.7 threshold
    m[4, :, 0:3] = big  # thing 1, loses cols 0-1 to q0 and col 2 rows 0-1 to q5: owns 2 of 12 pixels
    m[5, 0:2, 2] = big  # thing 3, strongest
    c = torch.zeros(6, 4)
    c[0, 0] = 5.0  # p = e^5 / (e^5 + 3) = 0.980
    c[1, 2] = 5.0
    c[2, 2] = 5.0
    c[3, 1] = 1.0  # p = e / (e + 3) = 0.475
    c[4, 1] = 4.0  # p = 0.948
    c[5, 3] = 6.0  # p = 0.993
    return m, c, [True, True, False, True]


def test_panoptic_inference_hand_built():
    m, c, is_thing = _hand_case()
    seg, info = panoptic_inference(m, c, is_thing)
    expected = torch.tensor([[1, 1, 3, 2, 2, 2],
                             [1, 1, 3, 2, 2, 2],
                             [1, 1, 0, 2, 2, 2],
                             [1, 1, 0, 2, 2, 2]], dtype=torch.int32)
    assert seg.dtype == torch.int32 and torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 2, False), (3, 3, True)]
    assert info[0]["score"] == pytest.approx(math.exp(5) / (math.exp(5) + 3), rel=1e-5)
    # A lower overlap threshold keeps q4 (2/12 = 0.167 of its mask): id 3 before q5's id 4.
    seg, info = panoptic_inference(m, c, is_thing, overlap_threshold=0.1)
    expected[2:4, 2] = 3
    expected[0:2, 2] = 4
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 0), (2, 2), (3, 1), (4, 3)]
    # Nothing above the object threshold: all void.
    seg, info = panoptic_inference(m, c, is_thing, object_mask_threshold=0.999)
    assert info == [] and seg.abs().sum() == 0


def _reference_panoptic(m, c, is_thing, thr=0.7, ovl=0.4):
    """Per-pixel loops over the Mask2Former rules."""
    q, h, w = m.shape
    probs = [_softmax(c[i].tolist()) for i in range(q)]
    kept = [i for i in range(q) if max(probs[i]) > thr]
    seg = np.zeros((h, w), dtype=np.int64)
    info, stuff, nid = [], {}, 0
    if not kept:
        return seg, info
    sig = 1 / (1 + np.exp(-m.double().numpy()))
    owner = np.empty((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            vals = [max(probs[i]) * sig[i, y, x] for i in kept]
            owner[y, x] = int(np.argmax(vals))
    for k, i in enumerate(kept):
        cls = int(np.argmax(probs[i]))
        owned, own = owner == k, sig[i] >= 0.5
        mask = owned & own
        if owned.sum() == 0 or own.sum() == 0 or mask.sum() == 0 or owned.sum() / own.sum() < ovl:
            continue
        if not is_thing[cls]:
            if cls in stuff:
                seg[mask] = stuff[cls]
                continue
            stuff[cls] = nid + 1
        nid += 1
        seg[mask] = nid
        info.append((nid, cls))
    return seg, info


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_panoptic_inference_random_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 7, 4, 9, 11
    # Smooth blobs: random centres and radii, so masks overlap partially.
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(q, generator=g) * h, torch.rand(q, generator=g) * w
    r = 2 + torch.rand(q, generator=g) * 3
    m = (r[:, None, None] - ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2).sqrt()) * 2
    c = torch.randn(q, k, generator=g) * 3
    is_thing = [True, False, True, False]
    seg, info = panoptic_inference(m, c, is_thing, object_mask_threshold=0.5)
    ref_seg, ref_info = _reference_panoptic(m, c, is_thing, thr=0.5)
    assert np.array_equal(seg.numpy(), ref_seg)
    assert [(s["id"], s["category_id"]) for s in info] == ref_info
    assert all(s["isthing"] == is_thing[s["category_id"]] for s in info)


def test_panoptic_inference_rejects_bad_inputs():
    m, c, is_thing = _hand_case()
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(m, c, is_thing[:3])
    with pytest.raises(ValueError, match="class_logits"):
        panoptic_inference(m, c[:5], is_thing)
    with pytest.raises(ValueError, match="mask_logits"):
        semantic_inference(m[0], c)
    with pytest.raises(ValueError, match="overlap_threshold"):
        panoptic_inference(m, c, is_thing, overlap_threshold=1.5)
    with pytest.raises(ValueError, match="void_logits"):
        semantic_inference(m, c, torch.zeros(3))
