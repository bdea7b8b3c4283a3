"""CRIS model: against a plain-PyTorch composition of the spec written here from the state dict (sequence-first, as
the official code), the official key set and parameter counts, strict loading of official-layout checkpoints, the
CLIP loader (TorchScript archives read without running code), loss and shapes, bad input."""

import math
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from models.cris import CRIS, CRISConfig
from models.cris.convert import load_clip, load_official, ours_to_official, save_official
from models.common.torchscript import read_torchscript_state_dict
from models.cris.official_style import spec_cris
from mmkernels.testing import assert_close


def _randomize(model: CRIS, seed: int = 0) -> CRIS:
    """Random weights everywhere, including BN statistics (the default init has zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == torch.int64:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "1.weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / math.sqrt(max(1, t[0].numel() if t.dim() else 1))))
    return model


def _tokens(B, L, g):
    tok = torch.randint(1, 49406, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        tok[b, 0] = 49406
        tok[b, n - 1] = 49407
        tok[b, n:] = 0
    return tok


@pytest.mark.parametrize("input_size", [128, 96])
def test_matches_spec_composition(input_size):
    torch.manual_seed(0)
    cfg = CRISConfig.tiny(input_size=input_size)
    model = _randomize(CRIS(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, input_size, input_size, generator=g)
    tokens = _tokens(2, cfg.word_len, g)
    ours = model(img, tokens)
    assert ours.shape == (2, 1, input_size // 4, input_size // 4)
    expected = spec_cris({k: v.float() for k, v in model.state_dict().items()}, img, tokens, cfg)
    assert_close(ours, expected, dtype=torch.float32, tol=2e-4, what="CRIS logits")


def test_training_forward_loss_and_grads():
    cfg = CRISConfig.tiny(input_size=64)
    model = _randomize(CRIS(cfg)).train()
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 3, 64, 64, generator=g)
    tokens = _tokens(2, cfg.word_len, g)
    mask = torch.rand(2, 1, 64, 64, generator=g)
    pred, target, loss = model(img, tokens, mask)
    assert not pred.requires_grad and pred.shape == (2, 1, 16, 16)
    assert torch.equal(target, mask[:, :, ::4, ::4])  # nearest picks rows/cols 0, 4, 8, ...
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(pred, target))
    loss.backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == {"backbone.logit_scale"}  # as official: every other parameter trains
    with pytest.raises(ValueError, match="needs 'mask'"):
        model(img, tokens)


def test_official_key_set_and_shapes_rn50():
    model = CRIS(CRISConfig.cris_r50())
    sd = model.state_dict()
    counts = {}
    for k in sd:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    assert len(sd) == 662 and counts == {"backbone": 495, "neck": 77, "decoder": 74, "proj": 16}
    assert sum(p.numel() for p in model.parameters()) == 146_849_122
    assert list(sd)[:3] == ["backbone.positional_embedding", "backbone.text_projection", "backbone.logit_scale"]
    shapes = {  # spec §7
        "backbone.positional_embedding": (77, 512), "backbone.text_projection": (512, 1024),
        "backbone.logit_scale": (), "backbone.token_embedding.weight": (49408, 512),
        "backbone.transformer.resblocks.11.attn.in_proj_weight": (1536, 512),
        "backbone.transformer.resblocks.0.mlp.c_fc.weight": (2048, 512),
        "backbone.visual.conv1.weight": (32, 3, 3, 3), "backbone.visual.conv3.weight": (64, 32, 3, 3),
        "backbone.visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.visual.layer2.0.conv3.weight": (512, 128, 1, 1),
        "backbone.visual.attnpool.positional_embedding": (50, 2048),
        "backbone.visual.attnpool.q_proj.weight": (2048, 2048), "backbone.visual.attnpool.c_proj.weight": (1024, 2048),
        "backbone.visual.attnpool.connect.0.weight": (1024, 2048, 1, 1),
        "backbone.visual.attnpool.connect.1.num_batches_tracked": (),
        "neck.txt_proj.0.weight": (1024, 1024), "neck.f1_v_proj.0.weight": (1024, 1024, 1, 1),
        "neck.norm_layer.0.running_var": (1024,), "neck.f2_v_proj.0.weight": (512, 1024, 3, 3),
        "neck.f2_cat.0.weight": (512, 1536, 1, 1), "neck.f3_v_proj.0.weight": (256, 512, 3, 3),
        "neck.f3_cat.0.weight": (512, 768, 1, 1), "neck.f4_proj5.0.weight": (512, 1024, 3, 3),
        "neck.aggr.0.weight": (512, 1536, 1, 1), "neck.coordconv.0.conv1.0.weight": (512, 514, 3, 3),
        "neck.coordconv.1.0.weight": (512, 512, 3, 3),
        "decoder.layers.2.multihead_attn.in_proj_weight": (1536, 512),
        "decoder.layers.0.self_attn.out_proj.weight": (512, 512), "decoder.layers.1.ffn.3.weight": (2048,),
        "decoder.layers.1.ffn.4.weight": (512, 2048), "decoder.layers.0.cross_attn_norm.bias": (512,),
        "decoder.norm.weight": (512,), "proj.vis.1.0.weight": (512, 512, 3, 3), "proj.vis.3.1.running_mean": (256,),
        "proj.vis.4.bias": (256,), "proj.txt.weight": (2305, 1024),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_rn101_counts():
    model = CRIS(CRISConfig.cris_r101(word_len=22))
    assert len(model.state_dict()) == 968
    assert sum(p.numel() for p in model.parameters()) == 161_251_682
    assert model.state_dict()["proj.txt.weight"].shape == (2305, 512)


def test_load_official_checkpoint_strict(tmp_path):
    cfg = CRISConfig.tiny(input_size=64)
    src = _randomize(CRIS(cfg), seed=3)
    path = tmp_path / "best_model.pth"
    save_official(src, path)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    dst = load_official(CRIS(cfg), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    broken = ours_to_official(src.state_dict())
    broken.pop("module.neck.aggr.0.weight")
    broken["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing: neck.aggr.0.weight; 1 unexpected: extra.weight"):
        load_official(CRIS(cfg), broken)


def _clip_archive(cfg, path):
    """An OpenAI-style CLIP TorchScript archive (traced open_clip CLIP, the keys of OpenAI's RN models)."""
    from models.cris.model import _open_clip_model

    clip = _open_clip_model(cfg).eval()
    with torch.no_grad():
        for t in clip.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
    img = torch.randn(1, 3, cfg.clip.image_resolution, cfg.clip.image_resolution)
    text = torch.randint(0, 100, (1, cfg.clip.context_length))
    traced = torch.jit.trace(clip, (img, text), check_trace=False, strict=False)
    traced.save(str(path))
    return clip.state_dict()


def test_load_clip_from_torchscript_archive(tmp_path):
    cfg = CRISConfig.tiny(input_size=64)
    ref = _clip_archive(cfg, tmp_path / "RN50.pt")
    model = load_clip(CRIS(cfg), tmp_path / "RN50.pt")
    got = model.backbone.state_dict()
    for k, v in ref.items():
        if k == "attn_mask":
            continue
        fp16 = (k.endswith(("conv1.weight", "conv2.weight", "conv3.weight", "proj.weight", "proj.bias",
                            "in_proj_weight", "in_proj_bias", "c_fc.weight", "c_fc.bias", "0.weight"))
                or k == "text_projection") and "bn" not in k and "ln_" not in k
        expected = v.half().float() if fp16 and v.is_floating_point() else v
        assert torch.equal(got[k], expected), k
    w = model.backbone.visual.attnpool.connect[0].weight
    assert torch.equal(w, w.half().float())  # the fresh connect conv went through fp16 as well


def test_torchscript_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_torchscript_state_dict(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError):
        load_clip(CRIS(CRISConfig.tiny(input_size=64)), path)


def test_config_from_official():
    cfg = CRISConfig.from_official(clip_pretrain="pretrain/RN101.pt", word_len=22, word_dim=512,
                                   fpn_in=[512, 1024, 512], fpn_out=[256, 512, 1024], vis_dim=512, num_layers=3,
                                   num_head=8, dim_ffn=2048, dropout=0.1, intermediate=False, base_lr=1e-4,
                                   input_size=416)
    assert cfg == CRISConfig.cris_r101(word_len=22)
    with pytest.raises(ValueError, match="fpn_in"):
        CRISConfig.from_official(clip_pretrain="RN50.pt", fpn_in=[512, 1024, 512])
    with pytest.raises(ValueError, match="RN50.pt or RN101.pt"):
        CRISConfig.from_official(clip_pretrain="ViT-B-16.pt")


def test_bad_input():
    cfg = CRISConfig.tiny(input_size=64)
    model = CRIS(cfg).eval()
    img = torch.randn(1, 3, 64, 64)
    tok = _tokens(1, cfg.word_len, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="word_len = 17"):
        model(img, tok[:, :10])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 70, 64), tok)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(img, tok.repeat(2, 1))
    with pytest.raises(ValueError, match="'word' must be int64"):
        model(img, tok.float())
