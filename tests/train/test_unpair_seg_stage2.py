"""Unpair-Seg stage 2 (models/unpair_seg/stage2.py, train/unpair_seg/stage2.py): the recipe from the configs, the
model's pieces (proposals, hold-out, frozen stage 1, adapter checkpoints, weights loading), the loss falling on a
fixed batch, and ``python -m train.unpair_seg --stage 2`` on 2 gloo processes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.stage2 import Stage2Config, UnpairSegS2, load_adapter, save_adapter
from tests.train.test_trainer import _ok, torchrun
from train import launch
from train.unpair_seg import stage2 as s2train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "train", "configs")
pytestmark = pytest.mark.filterwarnings("ignore:stage 2. neither:UserWarning", "ignore:stage 2. weights:UserWarning",
                                        "ignore:.*is deprecated.*:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    launch.shutdown()


def _tiny(**s2) -> UnpairSegS2:
    torch.manual_seed(0)
    kw = dict(threshold=0.0, scales=(96, 128))
    kw.update(s2)
    return UnpairSegS2(UnpairSegConfig.tiny(score_threshold=0.0), Stage2Config.tiny(128, **kw))


def test_configs_carry_the_thesis_recipe(tmp_path):
    cfg = s2train.load_config(os.path.join(CONFIGS, "unpair_seg_s2.yaml"))
    tc = s2train.train_config(cfg, str(tmp_path), world_size=8)
    assert (tc.micro_batch * 8, tc.lr, tc.steps, tc.ema_decay) == (32, 2e-5, 30000, None)
    m = s2train.model_config(cfg)
    assert m == UnpairSegConfig.official() and m.pts_per_side == (20, 20) and m.image_size == 1024
    s = s2train.stage2_config(cfg)
    assert s.scales == (896, 1024, 1152) and s.threshold == 0.7 and s.adapter_rank == 8 and s.adapter_alpha == 1.0
    assert s == Stage2Config.official()
    with pytest.raises(ValueError, match="global_batch"):
        s2train.train_config(cfg, str(tmp_path), world_size=3)
    tiny = s2train.load_config(os.path.join(CONFIGS, "unpair_seg_s2_tiny.yaml"))
    st = s2train.stage2_config(tiny)
    assert st.scales == (112, 128, 144) == Stage2Config.tiny(128).scales and st.holdout == ("star",)
    assert s2train.model_config(tiny).image_size == 128
    with pytest.raises(ValueError, match="stage2: unknown"):
        s2train.stage2_config({"stage2": {"rank": 4}})
    with pytest.raises(ValueError, match="unknown section"):
        s2train.load_config(os.path.join(CONFIGS, "unpair_seg_s2_tiny.yaml"), ["optim.lr=1"])
    with pytest.raises(ValueError, match="train: unknown"):
        s2train.train_config({"train": {"global_batch": 2, "learning_rate": 1}}, str(tmp_path), 1)
    for bad in ({"threshold": 2.0}, {"softmax_axis": "rows"}, {"scales": ()}, {"holdout": "star"},
                {"templates": ["no braces"]}):
        with pytest.raises(ValueError):
            Stage2Config(**bad)


def test_loss_falls_on_a_fixed_batch_and_stage1_stays_frozen():
    model = _tiny()
    s1_before = {k: v.clone() for k, v in model.s1.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    masks = torch.randn(2, 6, 32, 32, generator=g) * 4
    entities = [["large red circle", "small blue star", "medium green cross"], ["large yellow square"]]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.startswith("adapter.") for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    assert model.adapter.training and not model.s1.training
    losses, pairs = [], []
    for _ in range(8):
        out = model(images, entities, masks=masks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
        pairs.append(float(out["pairs"]))
    assert pairs == [4.0] * 8  # min(Q, T) per image at threshold 0, fixed since the matching is frozen
    assert losses[-1] < losses[0] - 0.05 and all(math.isfinite(v) for v in losses), losses
    assert all(p.grad is None for p in model.s1.parameters())
    assert all(torch.equal(v, s1_before[k]) for k, v in model.s1.state_dict().items())
    # eval(): LoRA merged, the same embeddings (to float rounding).
    with torch.no_grad():
        train_emb = model.region_embeddings(images, masks)
        model.eval()
        torch.testing.assert_close(model.region_embeddings(images, masks), train_emb, atol=1e-6, rtol=1e-6)


def test_batches_without_masks_or_entities_give_a_connected_zero():
    model = _tiny()
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    for masks, entities in ((torch.zeros(2, 0, 32, 32), [["red circle"], ["blue star"]]),
                            (torch.randn(2, 3, 32, 32, generator=g), [[], []])):
        model.zero_grad()
        out = model(images, entities, masks=masks)
        assert float(out["loss"].detach()) == 0.0 and float(out["pairs"]) == 0.0
        out["loss"].backward()
        grads = [p.grad for p in model.adapter.parameters() if p.requires_grad]
        assert all(gr is not None and float(gr.abs().sum()) == 0.0 for gr in grads)


def test_holdout_and_entity_embeddings():
    model = _tiny(holdout=("star",))
    assert model.training_entities(["small blue star", "red circle", "red circle", "starfish"]) == \
        ["red circle", "starfish"]
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (1, 3, 128, 128), generator=g, dtype=torch.uint8)
    out = model(images, [["small blue star", "red circle"]], masks=torch.randn(1, 3, 32, 32, generator=g))
    assert float(out["entities"]) == 1.0 and float(out["pairs"]) == 1.0
    # Entity embeddings: the template ensemble of the text tower, normalised.
    emb = model.entity_embeddings(["red circle", "blue star", "red circle"])
    from models.unpair_seg.templates import SIMPLE

    raw = F.normalize(model.backbone.get_text_classifier([t.format("blue star") for t in SIMPLE]), dim=-1)
    torch.testing.assert_close(emb[1], F.normalize(raw.mean(0), dim=0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb[0], emb[2])
    assert model.entity_embeddings([]).shape == (0, 64)
    with pytest.raises(TypeError, match="list of str"):
        model.entity_embeddings("red circle")
    with pytest.raises(ValueError, match="one list of str per image"):
        model(images, [["a"], ["b"]])


def test_proposals_are_the_stage1_grid_inference():
    model = _tiny(max_proposals=5)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 128, 128), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[128, 128], [64, 128]])
    prop = model.proposals(images, sizes)
    assert prop["masks"].shape[2:] == (32, 32) and prop["masks"].shape[1] <= 5
    from models.unpair_seg.preprocess import point_grid

    for i in range(2):
        h, w = sizes[i].tolist()
        ref = model.s1.inference([{"image": images[i], "height": 128, "width": 128,
                                   "points": point_grid(8, 8, h, w, 128)}])[0]
        k = min(5, ref["proposal"].shape[0])
        assert int(prop["valid"][i].sum()) == k
        want = F.interpolate(ref["proposal"][:k][None], size=(32, 32), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(prop["masks"][i, :k], want)
        torch.testing.assert_close(prop["scores"][i, :k], ref["scores"][:k])
        assert bool((prop["masks"][i, k:] == -1e4).all())
    with pytest.raises(ValueError, match="canvases"):
        model.proposals(images[:, :, :64])
    # an image without any proposal (threshold 1: nothing passes) gives an all-invalid row, not a crash
    none = UnpairSegS2(UnpairSegConfig.tiny(score_threshold=1.0), Stage2Config.tiny(128, threshold=0.0,
                                                                                     scales=(96, 128)))
    empty = none.proposals(images, sizes)
    assert empty["masks"].shape[:2] == empty["valid"].shape and not bool(empty["valid"].any())


def test_adapter_checkpoint_round_trip_and_weights(tmp_path):
    model = _tiny()
    with torch.no_grad():
        for p in model.adapter.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.eval()  # merged: the file must still hold the base weights
    save_adapter(model, tmp_path / "adapter.safetensors")
    adapter, s2cfg = load_adapter(tmp_path / "adapter.safetensors", model.backbone)
    assert s2cfg == model.s2cfg
    ours = model.adapter.state_dict()
    assert adapter.state_dict().keys() == ours.keys()
    assert all(torch.equal(adapter.state_dict()[k], ours[k]) for k in ours)
    # weights: a CLIP file (any wrapper prefix) into the backbone; a stage-1 checkpoint over it, strictly.
    from safetensors.torch import save_file

    from models.unpair_seg.convert import save_official

    other = _tiny()
    with torch.no_grad():
        for p in other.s1.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    clip_sd = {f"backbone.clip_model.{k}": v.contiguous() for k, v in other.backbone.clip_model.state_dict().items()}
    save_file(clip_sd, str(tmp_path / "clip.safetensors"))
    s2train.load_weights(model, None, str(tmp_path / "clip.safetensors"))
    assert all(torch.equal(v, other.backbone.clip_model.state_dict()[k])
               for k, v in model.backbone.clip_model.state_dict().items())
    save_official(other.s1, tmp_path / "stage1.pth")
    fresh = _tiny()
    s2train.load_weights(fresh, str(tmp_path / "stage1.pth"), None)
    assert all(torch.equal(v, other.s1.state_dict()[k]) for k, v in fresh.s1.state_dict().items())
    target = _tiny_with_clip_diff(tmp_path)  # writes clip2.safetensors, a CLIP unlike stage1.pth's
    with pytest.warns(UserWarning, match="different CLIP"):
        s2train.load_weights(target, str(tmp_path / "stage1.pth"), str(tmp_path / "clip2.safetensors"))
    assert all(torch.equal(v, other.s1.state_dict()[k]) for k, v in target.s1.state_dict().items())
    with pytest.raises(FileNotFoundError):
        s2train.load_weights(model, str(tmp_path / "missing.pth"), None)
    names = s2train.frozen_scalars_to_buffers(model.s1)
    assert names == ["backbone.clip_model.logit_scale"]
    assert "backbone.clip_model.logit_scale" in dict(model.s1.named_buffers())
    assert set(model.s1.state_dict()) == set(other.s1.state_dict())


def _tiny_with_clip_diff(tmp_path) -> UnpairSegS2:
    from safetensors.torch import save_file

    m = _tiny()
    sd = {k: (v + 1.0 if v.is_floating_point() else v).contiguous()
          for k, v in m.backbone.clip_model.state_dict().items()}
    save_file(sd, str(tmp_path / "clip2.safetensors"))
    return m


def test_two_process_gloo_smoke_run(tmp_path):
    """The tiny config on 2 gloo processes, 4 ShapesWorld scenes (so every step sees the same 4 images: a fixed
    batch), random stage 1 / CLIP: the loss falls, every step is logged, the adapter file loads."""
    cfg = s2train.load_config(os.path.join(CONFIGS, "unpair_seg_s2_tiny.yaml"))
    cfg["model"].update(score_threshold=0.0)
    cfg["stage2"].update(threshold=0.0, scales=[96, 128], holdout=[])
    cfg["data"]["shapes"].update(scenes=4, size=[32, 32])
    cfg["train"].update(global_batch=4, steps=4, lr=3e-3, warmup_steps=0, schedule="constant", log_every=1,
                        save_every=4, progress=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    _ok(torchrun("train.unpair_seg", "--stage", "2", "--config", str(path), "--out-dir", str(out), timeout=400))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["samples"] == 4 * r["step"] for r in recs)
    losses = [r["loss"] for r in recs]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(r["pairs"] > 0 for r in recs)
    summary = json.loads((out / "stage2.json").read_text())
    assert summary["world_size"] == 2 and summary["micro_batch"] == 2 and summary["dataset"] == 4
    assert (out / "data" / "shapes" / "captions.jsonl").is_file()
    from models.unpair_seg.backbone import CLIPBackbone

    adapter, s2cfg = load_adapter(out / "adapter.safetensors", CLIPBackbone(UnpairSegConfig.tiny()))
    assert s2cfg.scales == (96, 128) and float(adapter.out.weight.detach().abs().sum()) > 0  # trained away from zero
