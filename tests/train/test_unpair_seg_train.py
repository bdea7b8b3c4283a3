"""train/unpair_seg (stage 1): the official recipe's pieces, a few steps that lower the loss, and
``python -m train.unpair_seg --stage 1`` on two gloo processes, killed mid-way and resumed exactly.

Everything runs the tiny model on a 64^2 canvas with ShapesWorld written in the SA-1B format.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import yaml
from torch import nn

from models.unpair_seg.convert import load_official, official_key_set, save_official
from models.unpair_seg.model import UnpairSegS1
from tests.train.test_trainer import _killed, _ok, torchrun
from train import launch
from train.data.sa1b import collate
from train.unpair_seg import common, stage1

TINY = "train/configs/unpair_seg_s1_tiny.yaml"
OFFICIAL = "train/configs/unpair_seg_s1.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:stage 1. neither:UserWarning",
                                        "ignore:.*is deprecated.*:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    launch.shutdown()


def _small_cfg(**over) -> dict:
    """The tiny config at a 64^2 canvas on 8 ShapesWorld scenes, a 6 x 6 point grid and 256 loss points."""
    cfg = stage1.load_config(TINY)
    cfg["model"]["image_size"] = 64
    cfg["data"]["points_per_side"] = [6, 6]
    cfg["data"]["shapes"].update(size=[48, 64], scenes=8)
    cfg["criterion"].update(num_points=256, matcher_num_points=256)
    cfg["train"].update(global_batch=4, steps=4, milestones=[3], warmup_steps=1, save_every=2, log_every=1,
                        keep_last=2, progress=False)
    for key, value in over.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return cfg


def test_recipe_defaults_follow_the_spec():
    cfg = stage1.load_config(OFFICIAL)
    tc = common.train_config(cfg, "/tmp/x", 8, stage1.TRAIN_DEFAULTS)
    assert (tc.optimizer, tc.lr, tc.weight_decay, tc.betas) == ("adamw", 1e-4, 0.05, (0.9, 0.999))
    assert (tc.schedule, tc.milestones, tc.gamma, tc.steps, tc.warmup_steps) == \
        ("multistep", (93_500, 104_500), 0.1, 110_000, 10)
    assert (tc.grad_clip, tc.ema_decay, tc.precision, tc.micro_batch) == (1.0, None, "auto", 7)  # 56 over 8 GPUs
    mcfg = common.model_config(cfg)
    assert (mcfg.image_size, mcfg.num_masks, mcfg.dec_layers) == (1024, 4, 10)
    crit, box = stage1.build_criterion(cfg)
    assert box and crit.weights == {"mask": 2.0, "dice": 1.0, "iou": 1.0} and crit.deep_supervision
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio, crit.matcher.num_points) == \
        (12544, 3.0, 0.75, 6000)
    d = stage1.data_section(cfg)
    assert (d["min_scale"], d["max_scale"], d["min_area_ratio"], d["max_area_ratio"], d["max_instances"],
            d["points_per_side"]) == (0.8, 1.2, 1e-4, 0.8, 40, [10, 10])
    thesis, _ = stage1.build_criterion(stage1.load_config(OFFICIAL, ["criterion.preset=thesis"]))
    assert thesis.weights["iou"] == 5.0
    with pytest.raises(ValueError, match="train.global_batch"):
        common.train_config(cfg, "/tmp/x", 3, stage1.TRAIN_DEFAULTS)
    with pytest.raises(ValueError, match="criterion: unknown"):
        stage1.build_criterion(stage1.load_config(OFFICIAL, ["criterion.class_weight=2"]))
    with pytest.raises(ValueError, match="unknown section"):
        stage1.load_config(OFFICIAL, ["solver.lr=1"])


def test_model_param_groups_and_checkpoint_keys(tmp_path):
    """Frozen backbone (logit_scale a buffer of the same key), no decay on exactly the norm and nn.Embedding
    parameters, the official key set, and --init loading a saved official checkpoint strictly."""
    cfg = _small_cfg()
    model = stage1.build_model(cfg, seed=0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.dim() == 0 for p in model.parameters())
    assert set(model.state_dict()) == set(official_key_set(common.model_config(cfg)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [g for g in common.param_groups(model, 0.05)(named) if g["params"]]
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(named)
    ids = {id(p): n for n, p in named}
    no_decay = {ids[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    want = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.Embedding)) or type(mod).__name__ == "LayerNorm2d":
            want |= {f"{mod_name}.{n}" for n, p in mod.named_parameters(recurse=False) if p.requires_grad}
    assert no_decay == want and no_decay
    assert "sem_seg_head.predictor.level_embed.weight" in no_decay  # an nn.Embedding
    assert "sem_seg_head.predictor.decoder_norm.weight" in no_decay
    assert "sem_seg_head.predictor.prompt_encoder.mask_emb" not in no_decay  # a plain Parameter: decayed (detectron2)
    assert any(n.endswith(".bias") and n not in no_decay for n in ids.values())  # biases decay, as detectron2
    path = tmp_path / "s1.pth"
    save_official(model, path)
    again = stage1.build_model(cfg, seed=1, init=str(path))
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="weights.init"):
        stage1.build_model(cfg, init=str(tmp_path / "missing.pth"))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    cfg = _small_cfg()
    ds = stage1.build_dataset(cfg, str(tmp_path))
    assert len(ds) == 8 and (tmp_path / stage1.SHAPES_DIR / "sa_0.json").exists()
    given = stage1.build_dataset(cfg, str(tmp_path / "other"), root=str(tmp_path / stage1.SHAPES_DIR))  # --data
    assert given.ids == ds.ids and not (tmp_path / "other" / stage1.SHAPES_DIR).exists()
    with pytest.raises(ValueError, match="not a folder"):
        stage1.build_dataset(cfg, str(tmp_path), root=str(tmp_path / "missing"))
    batch = collate([ds[i] for i in range(2)])
    crit, box = stage1.build_criterion(cfg)
    loss_fn = stage1.Stage1Loss(crit, box)
    model = stage1.build_model(cfg, seed=0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([g for g in common.param_groups(model, 0.05)(named) if g["params"]], lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for step in range(6):
        loss, parts = loss_fn(model, batch, step)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.backbone.parameters())
            assert all(p.grad is not None for _, p in named)  # every trainable part gets a gradient
            keys = {f"loss_{b}{t}" for b in ("", "box_") for t in ("mask", "dice", "iou")}
            assert keys <= set(parts) and parts["pairs"] > 0 and parts["box_pairs"] > 0
            assert loss.item() == pytest.approx(sum(crit.weight_of(k) * parts[k] for k in keys) + parts["aux"],
                                                rel=1e-5)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


def _write_cfg(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_two_process_smoke_kill_and_resume(tmp_path):
    """2 gloo processes, 2 epochs of 2 steps (2 images per process): killed after step 3 (checkpoint at step 2),
    resumed: every logged record and the final official checkpoint equal an uninterrupted run's; the loss falls."""
    path = _write_cfg(tmp_path, _small_cfg())

    def launch_run(out, fault=None):
        return torchrun("train.unpair_seg", "--stage", "1", "--config", path, "--out-dir", str(out), fault=fault,
                        timeout=300)

    _ok(launch_run(tmp_path / "ref"))
    _killed(launch_run(tmp_path / "cut", fault="exit_after_step:3"))
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_2"
    _ok(launch_run(tmp_path / "cut"))
    drop = ("time", "step_time")
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref]
    assert [r["step"] for r in ref] == [1, 2, 3, 4] and ref[-1]["samples"] == 16
    assert {"loss_mask", "loss_dice", "loss_iou", "loss_box_mask", "aux", "pairs", "match_iou"} <= set(ref[0])
    assert ref[-1]["loss"] < ref[0]["loss"], [r["loss"] for r in ref]
    summary = json.loads((tmp_path / "ref" / stage1.SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["train"]["micro_batch"] == 2 and summary["items"] == 8
    assert summary["data_root"] == str(tmp_path / "ref" / stage1.SHAPES_DIR)  # the embedded default, under the run
    a = torch.load(tmp_path / "ref" / stage1.FINAL, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / stage1.FINAL, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load_official(UnpairSegS1(common.model_config(_small_cfg())), str(tmp_path / "ref" / stage1.FINAL))
    init = stage1.build_model(_small_cfg(), seed=0)
    moved = [k for k, v in init.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved and all(k.startswith("sem_seg_head.") for k in moved)  # the frozen backbone never changed


def test_bf16_is_autocast_over_fp32_weights(tmp_path):
    """precision bf16 ("auto" on CUDA) is DeepSpeed's bf16 torch_autocast over fp32 weights (autocast: true): the
    model is written for autocast (its fp32 pixel decoder under the trainer's bf16 module cast failed at step 1 with
    "Input type (float) and bias type (c10::BFloat16) should be the same"). fp32 stays as it is; a ds_config's own
    autocast keys win. Then 2 steps train in bf16 autocast with the weights, the final checkpoint included, in fp32."""
    import dataclasses

    from mmkernels import use_backend
    from train.trainer import build_ds_config

    tc = common.train_config(_small_cfg(train__precision="bf16"), str(tmp_path), 1, stage1.TRAIN_DEFAULTS)
    assert tc.autocast and tc.precision == "bf16"
    ds = build_ds_config(tc, 1, False)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 0  # train/configs/zero0.json's keys are kept
    own = dataclasses.replace(tc, ds_config={"torch_autocast": {"enabled": True, "dtype": "float16"}})
    assert build_ds_config(own, 1, False)["torch_autocast"]["dtype"] == "float16"
    fp32 = dataclasses.replace(tc, precision="fp32")
    assert "torch_autocast" not in build_ds_config(fp32, 1, False) and "bf16" not in build_ds_config(fp32, 1, False)

    cfg = _small_cfg(train__precision="bf16", train__steps=2)
    with use_backend("torch"):  # the Triton CPU interpreter has no bf16
        out = stage1.train(cfg, str(tmp_path / "run"))
    recs = [r for r in out["records"] if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["train"]["precision"] == "bf16" and resolved["train"]["autocast"] is True
    assert resolved["deepspeed"]["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    state = torch.load(tmp_path / "run" / stage1.FINAL, weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    fp32_recs = [r for r in stage1.train(_small_cfg(train__steps=2), str(tmp_path / "fp32"))["records"] if "loss" in r]
    assert recs[0]["loss"] != fp32_recs[0]["loss"]  # autocast was on: bf16 matmuls move the first loss


def test_main_dispatches_by_stage(monkeypatch, capsys):
    from train.unpair_seg import __main__ as entry

    seen = []
    fake = types.ModuleType("train.unpair_seg.stage2")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "train.unpair_seg.stage2", fake)
    import train.unpair_seg as pkg

    monkeypatch.setattr(pkg, "stage2", fake, raising=False)
    assert entry.main(["--stage", "2", "--config", "x.yaml", "--s1", "a.pth"]) == 0
    assert seen == [["--config", "x.yaml", "--s1", "a.pth"]]
    assert entry.main(["--config", "x.yaml"]) == 2 and "--stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        entry.main(["--stage", "3"])
