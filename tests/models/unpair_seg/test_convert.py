"""models/unpair_seg/convert.py: strict official-checkpoint round trips (tiny), detectron2 wrappers, key errors that
name the key, refusal of pickled code, and the OFFICIAL config's full key set and sizes (spec §9) on the meta
device."""

from __future__ import annotations

import math
import pickle

import open_clip
import pytest
import torch

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.convert import (load_official, official_key_set, official_to_ours, ours_to_official,
                                       save_official)
from models.unpair_seg.model import UnpairSegS1

CALLS: list = []


def _record_call(tag):
    """What a malicious pickle would run; a list append so a test can see whether it ran."""
    CALLS.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_record_call, ("unpickled",))


@pytest.fixture(scope="module")
def cfg():
    return UnpairSegConfig.tiny(image_size=64)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    m = UnpairSegS1(cfg).eval()
    with torch.no_grad():  # every tensor random, so a mis-assigned key would show
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.2)
    return m


def _fresh(cfg, seed=123):
    torch.manual_seed(seed)
    return UnpairSegS1(cfg).eval()


def _outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1, 3, 64, 64), generator=g, dtype=torch.uint8)
    points = torch.rand(1, 3, 2, generator=g) * 64
    with torch.no_grad():
        out = m(images=images, prompts=points, prompt_type="point")
    return out["pred_masks"], out["pred_ious"]


def test_save_load_round_trip(tmp_path, cfg, model):
    path = tmp_path / "stage1.pth"
    save_official(model, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"}
    assert set(raw["model"]) == set(model.state_dict())  # the official keys are ours, bare
    fresh = _fresh(cfg)
    before = _outputs(fresh)
    load_official(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    masks, ious = _outputs(fresh)
    ref_masks, ref_ious = _outputs(model)
    assert torch.equal(masks, ref_masks) and torch.equal(ious, ref_ious)
    assert not torch.equal(before[0], ref_masks)  # the load changed the outputs


def test_wrappers_and_prefixes(tmp_path, cfg, model):
    sd = model.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in sd.items()}, "iteration": 110000, "__author__": "someone",
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    path = tmp_path / "ddp.pth"
    torch.save(wrapped, path)
    fresh = _fresh(cfg)
    load_official(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    # in-memory forms: the detectron2 dict, a bare state dict with DDP prefixes and a non-tensor entry
    for state in (wrapped, {**{"module." + k: v for k, v in sd.items()}, "meta": "x"}):
        fresh = _fresh(cfg, seed=7)
        load_official(fresh, state)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    # a "model" entry holding a non-tensor next to the weights is unwrapped too (the non-tensor ignored)
    fresh = _fresh(cfg, seed=8)
    load_official(fresh, {"model": {**sd, "version": 3}})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    assert set(official_to_ours(wrapped)) == set(sd)
    assert ours_to_official({"_orig_mod." + k: v for k, v in sd.items()}).keys() == sd.keys()


def test_safetensors_checkpoint(tmp_path, cfg, model):
    from safetensors.torch import save_file

    path = tmp_path / "stage1.safetensors"
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    fresh = _fresh(cfg)
    load_official(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_missing_extra_misshaped_keys_are_named(cfg, model):
    sd = dict(model.state_dict())
    missing_key = "sem_seg_head.predictor.prompt_encoder.box_emb"
    bad = {k: v for k, v in sd.items() if k != missing_key}
    with pytest.raises(ValueError, match="missing.*prompt_encoder.box_emb"):
        load_official(_fresh(cfg), bad)
    bad = {**sd, "sem_seg_head.predictor.not_a_layer.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="unexpected.*not_a_layer.weight"):
        load_official(_fresh(cfg), bad)
    key = "sem_seg_head.pixel_decoder.mask_features.weight"
    bad = {**sd, key: torch.zeros(5, 5, 1, 1)}
    with pytest.raises(ValueError, match=r"shape mismatch.*mask_features.weight.*\(5, 5, 1, 1\)"):
        load_official(_fresh(cfg), bad)
    with pytest.raises(TypeError, match="UnpairSegS1"):
        load_official(torch.nn.Linear(2, 2), sd)
    with pytest.raises(FileNotFoundError):
        load_official(_fresh(cfg), "/nonexistent/stage1.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, cfg, model):
    path = tmp_path / "evil.pth"
    torch.save({"model": {**model.state_dict(), "payload": _Payload()}}, path)
    # the payload is live: an unrestricted unpickler would run it
    CALLS.clear()
    torch.load(path, weights_only=False)
    assert CALLS == ["unpickled"]
    CALLS.clear()
    fresh = _fresh(cfg)
    with pytest.raises(ValueError, match="weights_only"):
        load_official(fresh, path)
    assert CALLS == []
    plain = tmp_path / "evil.pkl"
    with open(plain, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(ValueError, match="could not be read safely"):
        load_official(fresh, plain)
    assert CALLS == []


# ---------------------------------------------------------------------------------------------------------------------
# The official key set (spec §9), independent of our module code: the head keys enumerated from the spec, the
# backbone's from open_clip itself.


def _pixel_decoder_keys(layers=6):
    keys = []
    for i in range(3):
        keys += [f"input_proj.{i}.0.weight", f"input_proj.{i}.0.bias", f"input_proj.{i}.1.weight",
                 f"input_proj.{i}.1.bias"]
    keys.append("transformer.level_embed")
    for j in range(layers):
        p = f"transformer.encoder.layers.{j}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            keys += [p + f"self_attn.{name}.weight", p + f"self_attn.{name}.bias"]
        for name in ("norm1", "norm2", "linear1", "linear2"):
            keys += [p + f"{name}.weight", p + f"{name}.bias"]
    keys += ["pe_layer.positional_encoding_gaussian_matrix", "mask_features.weight", "mask_features.bias",
             "adapter_1.weight", "adapter_1.norm.weight", "adapter_1.norm.bias", "layer_1.weight",
             "layer_1.norm.weight", "layer_1.norm.bias"]
    return ["sem_seg_head.pixel_decoder." + k for k in keys]


def _predictor_keys(layers=9, heads=5):
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    keys = ["pe_layer.positional_encoding_gaussian_matrix"]
    for i in range(layers):
        keys += [f"transformer_self_attention_layers.{i}.self_attn.{a}" for a in attn]
        keys += [f"transformer_self_attention_layers.{i}.norm.{w}" for w in ("weight", "bias")]
        keys += [f"transformer_cross_attention_layers.{i}.multihead_attn.{a}" for a in attn]
        keys += [f"transformer_cross_attention_layers.{i}.norm.{w}" for w in ("weight", "bias")]
        keys += [f"transformer_ffn_layers.{i}.{n}.{w}" for n in ("linear1", "linear2", "norm")
                 for w in ("weight", "bias")]
    keys += [f"extra_self_attention_layer.self_attn.{a}" for a in attn]
    keys += ["extra_self_attention_layer.norm.weight", "extra_self_attention_layer.norm.bias", "feat_embed.weight",
             "feat_embed.bias", "prompt_encoder.corner_emb", "prompt_encoder.point_emb", "prompt_encoder.box_emb",
             "prompt_encoder.mask_emb", "prompt_encoder.attr_emb.weight",
             "prompt_encoder.pos_emb.positional_encoding_gaussian_matrix", "level_embed.weight",
             "decoder_norm.weight", "decoder_norm.bias"]
    for k in range(heads):
        keys += [f"mask_embed.{k}.layers.{j}.{w}" for j in range(3) for w in ("weight", "bias")]
        keys += [f"iou_embed.{k}.layers.{j}.{w}" for j in range(3) for w in ("weight", "bias")]
    return ["sem_seg_head.predictor." + k for k in keys]


def test_official_key_set_on_meta():
    keys = official_key_set(UnpairSegConfig.official())
    assert len(keys) == 901
    backbone = {k for k in keys if k.startswith("backbone.clip_model.")}
    pixel = {k for k in keys if k.startswith("sem_seg_head.pixel_decoder.")}
    predictor = {k for k in keys if k.startswith("sem_seg_head.predictor.")}
    assert (len(backbone), len(pixel), len(predictor)) == (543, 118, 240)
    assert backbone | pixel | predictor == set(keys)
    assert pixel == set(_pixel_decoder_keys())
    assert predictor == set(_predictor_keys())
    with torch.device("meta"):
        clip = open_clip.CLIP(**open_clip.get_model_config("convnext_large_d_320"))
    ref = {"backbone.clip_model." + k: tuple(v.shape) for k, v in clip.state_dict().items()}
    assert {k: keys[k] for k in backbone} == ref
    # element counts of spec §9: 351.77 M (backbone), 5,790,144 params + 256 buffer values (pixel decoder),
    # 16,188,421 params + 512 buffer values (predictor)
    size = lambda ks: sum(math.prod(keys[k]) for k in ks)  # noqa: E731
    assert round(size(backbone) / 1e6, 2) == 351.77
    assert size(pixel) == 5_790_144 + 256
    assert size(predictor) == 16_188_421 + 512
    shapes = {
        "backbone.clip_model.visual.trunk.stem.0.weight": (192, 3, 4, 4),
        "backbone.clip_model.visual.trunk.stages.2.blocks.26.conv_dw.weight": (768, 1, 7, 7),
        "backbone.clip_model.visual.trunk.stages.3.blocks.0.mlp.fc1.weight": (6144, 1536),
        "backbone.clip_model.visual.trunk.stages.1.downsample.1.weight": (384, 192, 2, 2),
        "backbone.clip_model.visual.trunk.head.norm.weight": (1536,),
        "backbone.clip_model.visual.head.mlp.fc1.weight": (1536, 1536),
        "backbone.clip_model.visual.head.mlp.fc2.weight": (768, 1536),
        "backbone.clip_model.positional_embedding": (77, 768),
        "backbone.clip_model.text_projection": (768, 768),
        "backbone.clip_model.logit_scale": (),
        "backbone.clip_model.token_embedding.weight": (49408, 768),
        "sem_seg_head.pixel_decoder.input_proj.0.0.weight": (256, 1536, 1, 1),
        "sem_seg_head.pixel_decoder.input_proj.1.0.weight": (256, 768, 1, 1),
        "sem_seg_head.pixel_decoder.input_proj.2.0.weight": (256, 384, 1, 1),
        "sem_seg_head.pixel_decoder.transformer.level_embed": (3, 256),
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (192, 256),
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.attention_weights.bias": (96,),
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.3.linear1.weight": (1024, 256),
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.3.linear2.weight": (256, 1024),
        "sem_seg_head.pixel_decoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "sem_seg_head.pixel_decoder.adapter_1.weight": (256, 192, 1, 1),
        "sem_seg_head.pixel_decoder.layer_1.weight": (256, 256, 3, 3),
        "sem_seg_head.pixel_decoder.mask_features.weight": (256, 256, 1, 1),
        "sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_weight": (768, 256),
        "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.in_proj_bias": (768,),
        "sem_seg_head.predictor.transformer_ffn_layers.4.linear1.weight": (2048, 256),
        "sem_seg_head.predictor.transformer_ffn_layers.4.linear2.weight": (256, 2048),
        "sem_seg_head.predictor.feat_embed.weight": (256, 256, 1, 1),
        "sem_seg_head.predictor.prompt_encoder.corner_emb": (1, 2, 256),
        "sem_seg_head.predictor.prompt_encoder.mask_emb": (1, 5, 256),
        "sem_seg_head.predictor.prompt_encoder.attr_emb.weight": (2, 256),
        "sem_seg_head.predictor.level_embed.weight": (3, 256),
        "sem_seg_head.predictor.mask_embed.4.layers.2.weight": (256, 256),
        "sem_seg_head.predictor.iou_embed.0.layers.2.weight": (1, 256),
        "sem_seg_head.predictor.iou_embed.3.layers.2.bias": (1,),
    }
    for k, s in shapes.items():
        assert keys[k] == s, k
    assert not any(k.endswith(("pixel_mean", "pixel_std", "attn_mask")) for k in keys)  # non-persistent


def test_tiny_key_pattern_matches_official(cfg):
    """The tiny preset has the official key pattern (fewer layers, smaller widths)."""
    tiny = official_key_set(cfg)
    pixel = {k for k in tiny if k.startswith("sem_seg_head.pixel_decoder.")}
    predictor = {k for k in tiny if k.startswith("sem_seg_head.predictor.")}
    assert pixel == set(_pixel_decoder_keys(layers=cfg.enc_layers))
    assert predictor == set(_predictor_keys(layers=cfg.dec_layers - 1, heads=cfg.num_masks + 1))
