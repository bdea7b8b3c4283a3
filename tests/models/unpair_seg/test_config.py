"""UnpairSegConfig: the official values (spec §8), presets, from_official, validation."""

import pytest

from models.unpair_seg.config import PIXEL_MEAN, PIXEL_STD, UnpairSegConfig


def test_official_values_match_the_spec():
    c = UnpairSegConfig.official()
    assert c.clip_model_name == "convnext_large_d_320"
    assert (c.conv_dim, c.mask_dim, c.hidden_dim) == (256, 256, 256)
    assert (c.enc_heads, c.enc_layers, c.enc_dim_feedforward, c.enc_points) == (8, 6, 1024, 4)
    assert (c.dec_heads, c.dim_feedforward, c.dec_layers, c.num_decoder_layers) == (8, 2048, 10, 9)
    assert (c.num_masks, c.image_size, c.size_divisibility, c.common_stride) == (4, 1024, 32, 4)
    assert c.pts_per_side == (20, 20) and c.points_per_batch == 100
    assert (c.score_threshold, c.nms_iou, c.nms_coverage, c.nms_downsample) == (0.65, 0.5, 0.7, 2)
    assert c.pe_features == 128 and c.pixel_decoder_dtype == "fp32"
    assert c.pixel_mean == pytest.approx(tuple(255 * v for v in (0.48145466, 0.4578275, 0.40821073)))
    assert c.pixel_std == pytest.approx(tuple(255 * v for v in (0.26862954, 0.26130258, 0.27577711)))
    assert PIXEL_MEAN == c.pixel_mean and PIXEL_STD == c.pixel_std


def test_from_official_reads_the_yaml_names():
    c = UnpairSegConfig.from_official(CLIP_MODEL_NAME="convnext_large_d_320", CONVS_DIM=256, MASK_DIM=256,
                                      EMBED_DIM=256, NHEADS=8, DIM_FEEDFORWARD=2048, DEC_LAYERS=10,
                                      TRANSFORMER_ENC_LAYERS=6, NUM_MASKS=4, SIZE_DIVISIBILITY=32,
                                      PTS_PER_SIDE=[20, 20], CROP_SIZE=[1024, 1024], DROPOUT=0.0, PRE_NORM=False,
                                      RANK=8, CLIP_DIM=1536)
    assert c == UnpairSegConfig.official()
    assert c.extra == {"RANK": 8, "CLIP_DIM": 1536}
    # NHEADS sets both decoders, DIM_FEEDFORWARD only the mask decoder (the pixel decoder's 1024 is hard-coded)
    c2 = UnpairSegConfig.from_official(NHEADS=4, DIM_FEEDFORWARD=512)
    assert (c2.enc_heads, c2.dec_heads, c2.dim_feedforward, c2.enc_dim_feedforward) == (4, 4, 512, 1024)


@pytest.mark.parametrize("kw, match", [
    (dict(DROPOUT=0.1), "DROPOUT"),
    (dict(PRE_NORM=True), "PRE_NORM"),
    (dict(CROP_SIZE=[1024, 768]), "square"),
    (dict(CLIP_MODEL_NAME="RN50"), "ConvNeXt"),
])
def test_from_official_refuses_other_architectures(kw, match):
    with pytest.raises(ValueError, match=match):
        UnpairSegConfig.from_official(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(conv_dim=0), "conv_dim"),
    (dict(dec_layers=1), "dec_layers"),
    (dict(hidden_dim=250, conv_dim=250, mask_dim=250), "divisible"),
    (dict(mask_dim=128), "equal"),
    (dict(image_size=1000), "multiple"),
    (dict(score_threshold=1.5), "score_threshold"),
    (dict(pixel_decoder_dtype="fp16"), "pixel_decoder_dtype"),
    (dict(pts_per_side=(0, 20)), "pts_per_side"),
    (dict(enc_points=True), "enc_points"),
])
def test_bad_fields_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        UnpairSegConfig(**kw)


def test_tiny_keeps_the_structure_and_is_independent():
    t = UnpairSegConfig.tiny()
    assert t.clip_cfg["vision_cfg"]["timm_model_name"] == "convnext_atto"
    assert t.num_decoder_layers == 3 and t.image_size == 128 and t.hidden_dim % t.dec_heads == 0
    t.clip_cfg["embed_dim"] = 7  # a deep copy: the module-level TINY_CLIP is untouched
    assert UnpairSegConfig.tiny().clip_cfg["embed_dim"] == 64
    assert UnpairSegConfig.tiny(image_size=64, points_per_batch=3).points_per_batch == 3
