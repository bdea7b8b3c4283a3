"""CRIS preprocessing (models/cris/transforms.py) and tokenization (models/cris/tokenize.py) against OpenCV, hand
computations and the spec's rules (specs/cris.md §5.2 - §5.4)."""

import html

import cv2
import ftfy
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.cris import tokenize as tk
from models.cris.transforms import (CLIP_MEAN, CLIP_STD, letterbox_image, letterbox_mask, letterbox_matrix, normalize,
                                    predict_mask, unletterbox_prob, warp_image)

S = 96
SHAPES = [(48, 80), (80, 48), (64, 64), (30, 120), (200, 150), (7, 5), (1, 1)]


def _official_matrices(h, w, size):
    """The official getTransformMat, written out independently."""
    scale = min(size / h, size / w)
    nh, nw = h * scale, w * scale
    bx, by = (size - nw) / 2.0, (size - nh) / 2.0
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [nw + bx, by], [bx, nh + by]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src), (scale, bx, by)


def _ellipse(h, w):
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - 0.45 * h) / (0.3 * h)) ** 2 + ((xx + 0.5 - 0.55 * w) / (0.35 * w)) ** 2 <= 1


def _h(m):
    return np.vstack([m, [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("h,w", SHAPES + [(375, 500), (640, 427)])
@pytest.mark.parametrize("size", [S, 416])
def test_matrix_is_opencv_and_inverts(h, w, size):
    M, Mi = letterbox_matrix(h, w, size)
    M0, Mi0, (s, bx, by) = _official_matrices(h, w, size)
    assert M.dtype == np.float64 and M.shape == (2, 3) and Mi.shape == (2, 3)
    assert np.array_equal(M, M0) and np.array_equal(Mi, Mi0)  # bit for bit
    np.testing.assert_allclose(M, [[s, 0, bx], [0, s, by]], atol=1e-4)
    np.testing.assert_allclose(_h(Mi) @ _h(M), np.eye(3), atol=1e-5)
    assert min(bx, by) == pytest.approx(0, abs=1e-9)  # one side fills the square


@pytest.mark.parametrize("h,w", SHAPES)
def test_pad_colour_and_normalisation(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    M, _ = letterbox_matrix(h, w, S)
    raw = warp_image(img, M, S)
    assert raw.dtype == np.uint8 and raw.shape == (S, S, 3)
    ref = cv2.warpAffine(img, M, (S, S), flags=cv2.INTER_CUBIC,
                         borderValue=[0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
    assert np.array_equal(raw, ref)
    if h != w:  # a non-square image leaves pad bands; both corners of the pad side are pad colour
        assert (raw[0, 0] == (123, 117, 104)).all() and (raw[-1, -1] == (123, 117, 104)).all()
    x = letterbox_image(img, M, S)
    assert x.dtype == torch.float32 and x.shape == (3, S, S) and x.is_contiguous()
    assert torch.equal(x, normalize(raw))
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), (raw.transpose(2, 0, 1) / 255.0 - mean) / std, atol=1e-5)
    pad = (np.array([123, 117, 104]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    if h != w:
        np.testing.assert_allclose(x[:, 0, 0].numpy(), pad, atol=1e-6)


def _source_interior(M_inv, h, w, size, margin):
    """bool [size, size]: letterbox pixels whose centre maps at least ``margin`` source pixels inside the image."""
    v, u = np.mgrid[:size, :size].astype(np.float64)
    sx = M_inv[0, 0] * u + M_inv[0, 1] * v + M_inv[0, 2]
    sy = M_inv[1, 0] * u + M_inv[1, 1] * v + M_inv[1, 2]
    return (sx >= margin) & (sx <= w - 1 - margin) & (sy >= margin) & (sy <= h - 1 - margin)


def _source_outside(M_inv, h, w, size, margin):
    v, u = np.mgrid[:size, :size].astype(np.float64)
    sx = M_inv[0, 0] * u + M_inv[0, 2]
    sy = M_inv[1, 1] * v + M_inv[1, 2]
    return (sx < -margin) | (sx > w - 1 + margin) | (sy < -margin) | (sy > h - 1 + margin)


@pytest.mark.parametrize("h,w", [(48, 80), (80, 48), (64, 64), (30, 120), (200, 150)])
def test_constant_image_is_exact_on_the_content_box(h, w):
    M, Mi = letterbox_matrix(h, w, S)
    inside, outside = _source_interior(Mi, h, w, S, 2.5), _source_outside(Mi, h, w, S, 2.5)
    assert inside.sum() > 0.5 * S * S * min(h, w) / max(h, w)
    raw = warp_image(np.full((h, w, 3), (10, 200, 77), np.uint8), M, S)
    assert (raw[inside] == (10, 200, 77)).all()
    assert (raw[outside] == (123, 117, 104)).all()
    t = letterbox_mask(np.full((h, w), 255, np.uint8), M, S).numpy()
    assert (t[inside] == 1.0).all() and (t[outside] == 0.0).all()
    # And back: a constant probability map returns the constant on every original pixel whose cubic footprint stays
    # inside the letterbox square.
    back = unletterbox_prob(torch.full((S, S), 0.7), Mi, (h, w), S).numpy()
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    u, v = M[0, 0] * xx + M[0, 2], M[1, 1] * yy + M[1, 2]
    keep = (u >= 2.5) & (u <= S - 3.5) & (v >= 2.5) & (v <= S - 3.5)
    assert keep.sum() > 0.5 * h * w
    np.testing.assert_allclose(back[keep], 0.7, atol=1e-6)


@pytest.mark.parametrize("h,w", [(48, 80), (80, 48), (64, 64), (30, 120), (200, 150), (20, 37)])
def test_mask_round_trip(h, w):
    m = _ellipse(h, w)
    M, Mi = letterbox_matrix(h, w, S)
    t = letterbox_mask(m.astype(np.uint8) * 255, M, S)
    assert t.dtype == torch.float32 and t.shape == (S, S) and 0 <= t.min() and t.max() <= 1
    assert torch.equal(t, letterbox_mask(m, M, S))  # bool masks are taken as 0 / 255
    back = unletterbox_prob(t, Mi, (h, w), S)
    assert back.shape == (h, w) and back.dtype == torch.float32
    p = back.numpy() > 0.35
    assert (p & m).sum() / (p | m).sum() > 0.98
    # The soft target keeps the area: the letterboxed mass is the mask area times s^2.
    assert t.sum().item() == pytest.approx(m.sum() * M[0, 0] ** 2, rel=0.03)


def test_overlap_value_254_gives_a_soft_target():
    m = np.zeros((40, 40), np.uint8)
    m[5:30, 5:30] = 255
    m[10:20, 10:20] = 254  # two overlapping polygons in the official masks
    M, _ = letterbox_matrix(40, 40, 80)
    t = letterbox_mask(m, M, 80)
    assert t[30, 30].item() == pytest.approx(254 / 255, abs=1e-7) and t[50, 50].item() == 1.0


def test_predict_mask_is_the_official_composition():
    rng = np.random.default_rng(0)
    sizes = [(48, 80), (80, 48), (17, 33)]
    mats = [letterbox_matrix(h, w, S)[1] for h, w in sizes]
    logits = torch.randn(3, 1, 24, 24) * 3
    masks = predict_mask(logits, mats, sizes, size=S)
    probs = F.interpolate(torch.sigmoid(logits), size=(S, S), mode="bicubic", align_corners=True)[:, 0].numpy()
    for b, ((h, w), Mi) in enumerate(zip(sizes, mats)):
        ref = cv2.warpAffine(probs[b], Mi, (w, h), flags=cv2.INTER_CUBIC, borderValue=0.0) > 0.35
        assert masks[b].dtype == torch.bool and masks[b].shape == (h, w)
        assert np.array_equal(masks[b].numpy(), ref)
        assert np.array_equal(unletterbox_prob(torch.sigmoid(logits[b]), Mi, (h, w), S).numpy() > 0.35, ref)
    # Stacked matrices and sizes, tensors, [B, H, W] logits and bf16 all work; threshold is strict and honoured.
    again = predict_mask(logits[:, 0].bfloat16().float(), torch.from_numpy(np.stack(mats)), torch.tensor(sizes), size=S)
    assert all(torch.equal(a, b) for a, b in zip(again, predict_mask(logits.bfloat16().float(), mats, sizes, size=S)))
    assert len(predict_mask(logits.bfloat16(), mats, sizes, size=S)) == 3
    assert not predict_mask(torch.full((1, 1, 4, 4), 50.0), mats[:1], sizes[:1], threshold=2.0, size=S)[0].any()
    assert predict_mask(torch.full((1, 1, 4, 4), -50.0), mats[:1], sizes[:1], threshold=-1.0, size=S)[0].all()
    assert predict_mask(torch.zeros(0, 1, 4, 4), [], [], size=S) == []
    # Already at the letterbox size: no interpolation (the official shape check).
    p = torch.from_numpy(rng.random((S, S), dtype=np.float32))
    ref = cv2.warpAffine(p.numpy(), mats[0], (80, 48), flags=cv2.INTER_CUBIC, borderValue=0.0)
    assert np.array_equal(unletterbox_prob(p, mats[0], (48, 80), S).numpy(), ref)
    assert np.array_equal(unletterbox_prob(p[None, None].numpy(), mats[0], (48, 80), S).numpy(), ref)


def test_default_size_is_416():
    M, Mi = letterbox_matrix(480, 640)
    np.testing.assert_allclose(M, [[0.65, 0, 0], [0, 0.65, 52]], atol=1e-5)
    assert warp_image(np.zeros((480, 640, 3), np.uint8), M).shape == (416, 416, 3)
    assert predict_mask(torch.zeros(1, 1, 104, 104), [Mi], [(480, 640)])[0].shape == (480, 640)


def test_bad_inputs():
    M, Mi = letterbox_matrix(10, 20, S)
    with pytest.raises(ValueError, match="'h'"):
        letterbox_matrix(0, 5)
    with pytest.raises(ValueError, match="'w'"):
        letterbox_matrix(5, 2.5)
    with pytest.raises(ValueError, match="'size'"):
        letterbox_matrix(5, 5, size=True)
    with pytest.raises(ValueError, match="'img_rgb_uint8'"):
        letterbox_image(np.zeros((10, 20, 3), np.float32), M, S)
    with pytest.raises(ValueError, match="'img_rgb_uint8'"):
        letterbox_image(np.zeros((10, 20), np.uint8), M, S)
    with pytest.raises(TypeError, match="'img_rgb_uint8'"):
        letterbox_image(torch.zeros(10, 20, 3, dtype=torch.uint8), M, S)
    with pytest.raises(ValueError, match="'M'"):
        letterbox_image(np.zeros((10, 20, 3), np.uint8), np.eye(3), S)
    with pytest.raises(TypeError, match="'M'"):
        letterbox_mask(np.zeros((10, 20), np.uint8), [[1, 0, 0], [0, 1, 0]], S)
    with pytest.raises(ValueError, match="'mask_u8'"):
        letterbox_mask(np.zeros((10, 20), np.int32), M, S)
    with pytest.raises(ValueError, match="'prob'"):
        unletterbox_prob(torch.zeros(2, 4, 4), Mi, (10, 20), S)
    with pytest.raises(ValueError, match="'prob'"):
        unletterbox_prob(torch.zeros(4, 4, dtype=torch.int64), Mi, (10, 20), S)
    with pytest.raises(ValueError, match="'ori_size"):
        unletterbox_prob(torch.zeros(4, 4), Mi, (10,), S)
    with pytest.raises(ValueError, match="'ori_size"):
        unletterbox_prob(torch.zeros(4, 4), Mi, (10, 0), S)
    with pytest.raises(ValueError, match="'logits'"):
        predict_mask(torch.zeros(2, 3, 4, 4), [Mi, Mi], [(10, 20)] * 2, size=S)
    with pytest.raises(TypeError, match="'logits'"):
        predict_mask(np.zeros((2, 1, 4, 4)), [Mi, Mi], [(10, 20)] * 2, size=S)
    with pytest.raises(ValueError, match="'M_inv'"):
        predict_mask(torch.zeros(2, 1, 4, 4), [Mi], [(10, 20)] * 2, size=S)
    with pytest.raises(ValueError, match="'ori_sizes'"):
        predict_mask(torch.zeros(2, 1, 4, 4), [Mi, Mi], [(10, 20)], size=S)
    with pytest.raises(TypeError, match="'threshold'"):
        predict_mask(torch.zeros(1, 1, 4, 4), [Mi], [(10, 20)], threshold="0.35", size=S)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def test_hand_built_ids_and_padding():
    enc = tk.tokenizer().encoder
    assert (tk.SOT, tk.EOT) == (49406, 49407) == (enc["<start_of_text>"], enc["<end_of_text>"])
    ids = [enc["a</w>"], enc["red</w>"], enc["circle</w>"]]
    assert ids == [320, 736, 7117]
    out = tk.tokenize("a red circle", 17)
    assert out.dtype == torch.int64 and out.shape == (1, 17)
    assert out[0].tolist() == [49406, 320, 736, 7117, 49407] + [0] * 12
    batch = tk.tokenize(["a red circle", "the leftmost square"], 22)
    assert batch.shape == (2, 22)
    # "leftmost" is not in the vocabulary as one word: BPE splits it into "left" + "most</w>".
    expect = [49406, enc["the</w>"], enc["left"], enc["most</w>"], enc["square</w>"], 49407] + [0] * 16
    assert batch[1].tolist() == expect
    assert tk.tokenize([], 17).shape == (0, 17)
    # The text encoder finds EOT with argmax: one EOT per row, the largest id.
    assert (batch.argmax(1) == torch.tensor([4, 5])).all()


def test_truncation_keeps_eot_last():
    text = "the small purple triangle left of the large yellow ellipse"
    ids = tk.encode(text)
    assert len(ids) == 11  # "ellipse" is two BPE pieces
    full = tk.tokenize(text, 13)[0].tolist()  # exactly fits: no truncation, no padding
    assert full == [tk.SOT] + ids + [tk.EOT]
    cut = tk.tokenize(text, 6)[0].tolist()
    assert cut == [tk.SOT] + ids[:4] + [tk.EOT]
    assert tk.tokenize(text, 2)[0].tolist() == [tk.SOT, tk.EOT]


def test_id_zero_gotcha():
    """Padding is id 0, which is also the non-word-final BPE piece "!" (documented in tokenize.py)."""
    dec = tk.tokenizer().decoder
    assert dec[0] == "!" and dec[256] == "!</w>"
    assert tk.encode("!") == [256] and tk.encode("wow!") == [tk.encode("wow")[0], 256]
    assert tk.encode("!;") == [0, 282]
    row = tk.tokenize("the dog !; left", 17)[0]
    assert (row == 0).sum() > 17 - 2 - len(tk.encode("the dog !; left"))  # a real token reads as padding


@pytest.mark.parametrize("raw", ["  The  &amp;amp; RED\tcircle \n", "caf\u00c3\u00a9 au LAIT",
                                 "&lt;b&gt;Bold&lt;/b&gt;", "\u201cquoted\u201d  text", "MIXED case   WORDS"])
def test_cleaning_matches_the_spec(raw):
    """ftfy.fix_text, html.unescape twice, strip, whitespace collapse, lower (spec §5.3), done here by hand."""
    cleaned = " ".join(html.unescape(html.unescape(ftfy.fix_text(raw))).strip().split()).strip().lower()
    assert tk.encode(raw) == tk.encode(cleaned)
    assert tk.tokenize(raw, 22).tolist() == tk.tokenize(cleaned, 22).tolist()


def test_cleaning_examples():
    assert tk.encode("  The  &amp;amp; RED\tcircle ") == tk.encode("the & red circle")
    assert tk.encode("caf\u00c3\u00a9") == tk.encode("caf\u00e9")  # ftfy repairs the mojibake


def test_tokenize_bad_inputs():
    with pytest.raises(ValueError, match="'word_len'"):
        tk.tokenize("a", 1)
    with pytest.raises(ValueError, match="'word_len'"):
        tk.tokenize("a", 17.0)
    with pytest.raises(TypeError, match="'texts'"):
        tk.tokenize(["a", 3], 17)
    with pytest.raises(TypeError, match="'texts'"):
        tk.tokenize(None, 17)
    with pytest.raises(TypeError, match="'text'"):
        tk.encode(b"bytes")
