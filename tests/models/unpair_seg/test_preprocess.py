"""models/unpair_seg/preprocess.py against hand computations of the official demo's pre-processing (spec §7.1-7.2):
detectron2 ResizeShortestEdge sizes, PIL bilinear, padding 128 at the bottom/right, EXIF transpose, the official
point grid and the original <-> canvas mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.unpair_seg import preprocess as pp


def _rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("hw, size, expected", [
    ((480, 640), 1024, (768, 1024)),     # landscape: short 480 -> 1024 gives long 1365.3 > 1024, rescale
    ((640, 480), 1024, (1024, 768)),     # portrait
    ((1024, 1024), 1024, (1024, 1024)),  # already the canvas
    ((1024, 768), 1024, (1024, 768)),    # already resized
    ((100, 300), 1024, (341, 1024)),     # 1024 / 3 = 341.33
    ((333, 500), 1024, (682, 1024)),     # 333 * 1024 / 500 = 681.98
    ((50, 40), 1024, (1024, 819)),       # upscaling: 40 * 1024 / 50 = 819.2
    ((300, 300), 128, (128, 128)),
    ((7, 3), 128, (128, 55)),            # 3 * 128 / 7 = 54.86
])
def test_output_shape_hand_cases(hw, size, expected):
    assert pp.output_shape(*hw, size) == expected


def test_output_shape_follows_detectron2_arithmetic():
    # detectron2 rescales the already scaled sizes (newh * (max_size / max(newh, neww))), then int(v + 0.5).
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 3000, size=2))
        s = 1024.0
        scale = s / min(h, w)
        newh, neww = (s, scale * w) if h < w else (scale * h, s)
        if max(newh, neww) > s:
            f = s / max(newh, neww)
            newh, neww = newh * f, neww * f
        assert pp.output_shape(h, w, 1024) == (int(newh + 0.5), int(neww + 0.5))
        assert max(pp.output_shape(h, w, 1024)) == 1024


def test_resize_is_pil_bilinear_on_uint8():
    img = _rand_image(45, 70, seed=2)
    out = pp.resize_longest(img, 128)
    assert out.dtype == np.uint8 and out.shape == (82, 128, 3)  # 45 * 128 / 70 = 82.3
    ref = np.asarray(Image.fromarray(img).resize((128, 82), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)
    big = _rand_image(300, 200, seed=3)  # downscaling (PIL antialiases)
    out = pp.resize_longest(big, 128)
    ref = np.asarray(Image.fromarray(big).resize((85, 128), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)
    same = _rand_image(128, 96, seed=4)  # already at the size: unchanged
    np.testing.assert_array_equal(pp.resize_longest(same, 128), same)


def test_pad_value_and_placement():
    img = _rand_image(30, 50, seed=5)
    canvas = pp.pad_to_canvas(img, 64)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    np.testing.assert_array_equal(canvas[:30, :50], img)
    assert (canvas[30:] == 128).all() and (canvas[:, 50:] == 128).all()
    assert (pp.pad_to_canvas(img, 64, value=7)[40:] == 7).all()


def test_prepare_is_the_official_entry():
    img = _rand_image(40, 30, seed=6)
    entry = pp.prepare(img, 64)
    assert entry["height"] == 40 and entry["width"] == 30
    x = entry["image"]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64)
    resized = np.asarray(Image.fromarray(img).resize((48, 64), Image.Resampling.BILINEAR))  # 30 * 64 / 40 = 48
    np.testing.assert_array_equal(x[:, :, :48].permute(1, 2, 0).numpy(), resized)
    assert (x[:, :, 48:] == 128).all()


# ---------------------------------------------------------------------------------------------------------------------
# EXIF


def _blocks(h, w):
    """An image of big flat colour blocks (JPEG keeps them nearly exact)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (250, 10, 10)
    img[: h // 2, w // 2:] = (10, 250, 10)
    img[h // 2:, : w // 2] = (10, 10, 250)
    img[h // 2:, w // 2:] = (240, 240, 20)
    return img


@pytest.mark.parametrize("orientation, turn", [(6, -1), (8, 1), (3, 2)])
def test_read_image_applies_exif_orientation(tmp_path, orientation, turn):
    img = _blocks(32, 48)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(tmp_path / "photo.jpg", quality=100, exif=exif)
    Image.fromarray(img).save(tmp_path / "plain.jpg", quality=100)  # the same pixels, no orientation tag
    out = pp.read_image(tmp_path / "photo.jpg")
    decoded = np.asarray(Image.open(tmp_path / "plain.jpg").convert("RGB"))
    # orientation 6: the stored rows are the displayed right side -> display = stored turned 90 deg clockwise;
    # 8: counter-clockwise; 3: 180 deg (np.rot90 turns counter-clockwise for k > 0)
    np.testing.assert_array_equal(out, np.rot90(decoded, k=turn))
    expected = np.rot90(img, k=turn)  # block colours survive JPEG at the block centres
    hh, ww = expected.shape[0] // 4, expected.shape[1] // 4
    for y, x in ((hh, ww), (hh, 3 * ww), (3 * hh, ww), (3 * hh, 3 * ww)):
        assert np.abs(out[y, x].astype(int) - expected[y, x].astype(int)).max() <= 6


def test_read_image_plain_png_and_grayscale(tmp_path):
    img = _rand_image(9, 11, seed=7)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(pp.read_image(tmp_path / "a.png"), img)
    Image.fromarray(img[..., 0]).save(tmp_path / "g.png")  # "L" -> RGB with three equal channels
    g = pp.read_image(tmp_path / "g.png")
    assert g.shape == (9, 11, 3) and (g == img[..., :1]).all()
    with pytest.raises(FileNotFoundError):
        pp.read_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------------------------------
# grid and coordinates


def test_point_grid_640x480_by_hand():
    grid = pp.point_grid(20, 20, 480, 640, size=1024)
    assert grid.dtype == torch.float32 and tuple(grid.shape) == (400, 2)
    # official: sizes (W-1, H-1) = (639, 479), ratio 1023 / 639, scaled (1023, 479 * 1023 / 639)
    sx, sy = 1023.0, 479 * 1023.0 / 639
    side = 1 / 40 + np.arange(20) * (1 - 2 / 40) / 19
    for idx in (0, 1, 19, 20, 210, 399):
        iy, ix = divmod(idx, 20)  # x varies fastest
        np.testing.assert_allclose(grid[idx].numpy(), [side[ix] * sx, side[iy] * sy], rtol=2e-6)
    np.testing.assert_allclose(grid[0].numpy(), [1023 / 40, sy / 40], rtol=2e-6)
    np.testing.assert_allclose(grid[-1].numpy(), [1023 * 39 / 40, sy * 39 / 40], rtol=2e-6)
    assert float(grid[:, 0].max()) < 1023 and float(grid[:, 1].max()) < sy  # only the content, never the padding


def test_point_grid_uneven_and_portrait():
    grid = pp.point_grid(3, 2, 100, 51, size=128)  # portrait: H - 1 = 99 is the long side
    r = 127.0 / 99
    xs = np.array([1 / 6, 0.5, 5 / 6]) * 50 * r
    ys = np.array([0.25, 0.75]) * 99 * r
    expected = np.array([[x, y] for y in ys for x in xs])
    np.testing.assert_allclose(grid.numpy(), expected, rtol=2e-6)


def test_canvas_scale_is_bitwise_the_official_expression():
    """The official ratio is ``(input_size - 1.0) / sizes.amax(dim=-1)`` on an int64 tensor of (W - 1, H - 1):
    float32 through Tensor.__rdiv__ (reciprocal, then a product). Ours equals it bit for bit, so the grid does too."""
    rng = np.random.default_rng(3)
    for h, w in rng.integers(2, 4000, size=(2000, 2)).tolist() + [[302, 68], [480, 640], [1024, 1024]]:
        sizes = torch.tensor([[w - 1, h - 1]], dtype=torch.int64)
        official = float(((1024 - 1.0) / sizes.amax(dim=-1))[0])
        assert pp.canvas_scale(h, w, 1024) == official, (h, w)
    h, w = 302, 68
    sizes = torch.tensor([w - 1, h - 1], dtype=torch.int64)
    scaled = sizes * ((1024 - 1.0) / sizes.amax(dim=-1))
    grid = pp.point_grid(3, 3, h, w, 1024)
    off = 1.0 / 6
    axis = torch.linspace(off, 1 - off, 3)
    want = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2) * scaled
    assert torch.equal(grid, want)


def test_canvas_mapping_round_trip():
    h, w = 480, 640
    r = 1023 / 639
    pts = torch.tensor([[0.0, 0.0], [639.0, 479.0], [100.5, 20.25]])
    c = pp.to_canvas(pts, h, w, 1024)
    np.testing.assert_allclose(c.numpy(), pts.numpy() * r, rtol=1e-6)
    np.testing.assert_allclose(c[1].numpy(), [1023.0, 479 * r], rtol=1e-6)  # the last pixel -> canvas 1023
    np.testing.assert_allclose(pp.from_canvas(c, h, w, 1024).numpy(), pts.numpy(), rtol=1e-6, atol=1e-5)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0]])
    back = pp.from_canvas(pp.to_canvas(boxes, h, w, 1024), h, w, 1024)
    np.testing.assert_allclose(back.numpy(), boxes.numpy(), rtol=1e-6)
    # the grid in original pixels is the fraction of the extent (W - 1, H - 1)
    g = pp.from_canvas(pp.point_grid(4, 4, h, w, 1024), h, w, 1024)
    np.testing.assert_allclose(g[:4, 0].numpy(), np.array([1, 3, 5, 7]) / 8 * 639, rtol=1e-5)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="uint8"):
        pp.resize_longest(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        pp.resize_longest(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(ValueError, match="does not fit"):
        pp.pad_to_canvas(np.zeros((9, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="value"):
        pp.pad_to_canvas(np.zeros((4, 4, 3), np.uint8), 8, value=300)
    with pytest.raises(ValueError, match="n_x"):
        pp.point_grid(0, 3, 10, 10)
    with pytest.raises(TypeError, match="n_y"):
        pp.point_grid(3, 2.5, 10, 10)
    with pytest.raises(ValueError, match="extent"):
        pp.point_grid(2, 2, 1, 1)
    with pytest.raises(ValueError, match="height"):
        pp.output_shape(0, 5, 8)
    with pytest.raises(ValueError, match="last dim"):
        pp.to_canvas(torch.zeros(3, 3), 10, 10)
    with pytest.raises(ValueError, match="finite"):
        pp.to_canvas(torch.tensor([[float("nan"), 1.0]]), 10, 10)
    with pytest.raises(ValueError, match="x1 >= x0"):
        pp.check_boxes("boxes", torch.tensor([[5.0, 0.0, 1.0, 3.0]]))
    with pytest.raises(ValueError, match="--points"):
        pp.parse_pairs("1,2;3", 2, "--points")
