"""The shared DeepSpeed trainer (train/trainer.py) on CPU.

Single-process tests run the trainer in this process (a one-process gloo group, destroyed at the end of the module);
two-process tests launch tests/train/trainer_driver.py under ``torchrun --nproc_per_node 2`` and kill it with the
trainer's fault-injection variable. The task is tiny (a 2-layer MLP with dropout on a seeded regression set) and the
loss draws noise from the global RNG, so exactness after a resume needs every RNG state and the data position back.
The first DeepSpeed use JIT-builds its CPU shared-memory comm op into TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions): about 45 s once per machine; every later process loads it from there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.train.trainer_driver import RegressionSet, eval_fn, full_weights, group_key, loss_fn, make_model
from train import launch
from train.trainer import (FAULT_ENV, FAULT_EXIT_CODE, StepSampler, TrainConfig, Trainer, build_ds_config,
                           lr_factor)

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")  # DeepSpeed's own c10d calls
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "samples", "time", "step_time", "mae"}


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    launch.shutdown()


def _cfg(out, **kw):
    base = dict(micro_batch=2, grad_accum=2, lr=1e-2, log_every=1, save_every=3, progress=False)
    base.update(kw)
    return TrainConfig(out_dir=str(out), **base)


def _trainer(out, *, ema=True, evaluate=True, **kw) -> Trainer:
    return Trainer(make_model(), loss_fn, RegressionSet(), _cfg(out, **kw), group_key=group_key,
                   eval_fn=eval_fn if evaluate else None)


def _read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(records) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------------------------------------------------------------
# Single process


def test_trainer_after_shutdown(tmp_path):
    """launch.shutdown() destroys the one-process group and forgets DeepSpeed's cached communication state, so a new
    Trainer in the same process (ZeRO-2 and ZeRO-0) trains again (before: "Group ... is not registered")."""
    import torch.distributed as dist

    first = _trainer(tmp_path / "a", steps=2, zero_stage=2)
    first.train()
    del first
    launch.shutdown()
    assert not dist.is_initialized()
    for zero in (2, 0):
        t = _trainer(tmp_path / f"b{zero}", steps=2, zero_stage=zero)
        recs = [r for r in t.train() if "loss" in r]
        assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
        del t
        launch.shutdown()


def test_single_process_trains(tmp_path):
    out = tmp_path / "run"
    steps, warm, lr, m = 30, 5, 3e-2, 0.1
    t = _trainer(out, steps=steps, micro_batch=4, grad_accum=1, lr=lr, warmup_steps=warm, schedule="cosine",
                 min_lr_ratio=m, ema_decay=0.9, save_every=10)
    assert t.world_size == 1 and t.zero_stage == 2 and t.dtype == torch.float32
    initial = {n: p.detach().clone() for n, p in t.engine.module.named_parameters()}
    records = t.train()

    # metrics.jsonl is what train() returned: a record per step, plus eval lines at the save points.
    lines = _read_metrics(out)
    assert lines == records
    train_recs = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, steps + 1))
    for r in train_recs:
        assert TRAIN_KEYS <= set(r) <= TRAIN_KEYS | {"group0", "group1", "group2"}
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS)
        assert r["samples"] == 4 * r["step"] and r["grad_norm"] > 0
    evals = [r for r in lines if "loss" not in r]
    assert [r["step"] for r in evals] == [10, 20, 30] and all(set(r) == {"step", "eval/mse"} for r in evals)

    losses = [r["loss"] for r in train_recs]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert evals[-1]["eval/mse"] < evals[0]["eval/mse"]

    # LR of step s (1-based record) = lr * factor(s - 1): linear warmup, then cosine down to min_lr_ratio * lr.
    for r in train_recs:
        s = r["step"] - 1
        if s < warm:
            want = lr * (s + 1) / warm
        else:
            want = lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - 1 - warm))))
        assert r["lr"] == pytest.approx(want, rel=1e-12, abs=0), r
    assert train_recs[0]["lr"] == pytest.approx(lr / warm) and train_recs[-1]["lr"] == pytest.approx(m * lr)
    assert train_recs[warm]["lr"] == pytest.approx(lr)

    # Checkpoints: the last keep_last=2, `latest` on the final one, no temporaries.
    ck = out / "checkpoints"
    assert sorted(d for d in os.listdir(ck) if d.startswith(("step_", "."))) == ["step_20", "step_30"]
    assert (ck / "latest").read_text() == "step_30"
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 2 and resolved["train"]["steps"] == steps

    # EMA: differs from the raw weights, and ema_model() carries it (frozen parameter untouched).
    ema = t.ema_state_dict()
    raw = {n: p.detach() for n, p in t.engine.module.named_parameters()}
    assert set(ema) == {n for n, p in t.engine.module.named_parameters() if p.requires_grad}
    assert "out_scale" not in ema
    for n in ema:
        assert not torch.allclose(ema[n], raw[n]) and not torch.allclose(ema[n], initial[n])
    em = t.ema_model()
    assert not em.training and all(not p.requires_grad for p in em.parameters())
    for n, p in em.named_parameters():
        assert torch.equal(p, ema[n] if n in ema else raw[n])
    x = RegressionSet().x[:8]
    t.engine.module.eval()
    assert not torch.allclose(em(x), t.engine.module(x))

    # A second train() on the finished run resumes at the end and does nothing.
    assert t.train() == []


def test_ema_matches_hand_computation(tmp_path):
    d = 0.5
    kw = dict(ema_decay=d, schedule="constant", save_every=100)
    p0 = {n: p.detach().clone() for n, p in make_model().named_parameters() if p.requires_grad}
    t1 = _trainer(tmp_path / "one", steps=1, **kw)
    t1.train()
    p1, e1 = full_weights(t1), t1.ema_state_dict()
    t2 = _trainer(tmp_path / "two", steps=2, **kw)
    t2.train()
    p2, e2 = full_weights(t2), t2.ema_state_dict()
    for n in p0:
        assert not torch.equal(p1[n], p0[n]) and not torch.equal(p2[n], p1[n])
        torch.testing.assert_close(e1[n], d * p0[n] + (1 - d) * p1[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(e2[n], d * (d * p0[n] + (1 - d) * p1[n]) + (1 - d) * p2[n], rtol=0, atol=1e-6)


class _SameSample(torch.utils.data.Dataset):
    """Every index holds the same (x, y), so step 1's gradient does not depend on the sampler's order or on how the
    samples split into micro-batches."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(6, generator=g), torch.randn(3, generator=g)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"x": self.x, "y": self.y}


def _mlp() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _mse(model, batch, step):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_logged_grad_norm_is_the_pre_clip_norm(tmp_path, stage, clip):
    """grad_norm is the global norm of step 1's (accumulated) gradient before clipping, for every ZeRO stage, with
    and without clipping (ZeRO-0 in fp32, where DeepSpeed computes no norm, used to log null). The clip of 1e-3 is
    far below the norm, so a norm read after clipping would show."""
    data, model = _SameSample(), _mlp()
    ref = _mlp()
    torch.nn.functional.mse_loss(ref(data.x[None]), data.y[None]).backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref.parameters()])).item()
    assert want > 100 * 1e-3
    cfg = TrainConfig(out_dir=str(tmp_path), steps=2, micro_batch=2, grad_accum=2, lr=1e-2, log_every=1,
                      save_every=100, progress=False, ema_decay=None, zero_stage=stage, grad_clip=clip)
    recs = [r for r in Trainer(model, _mse, data, cfg).train() if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) for r in recs)
    assert recs[0]["grad_norm"] == pytest.approx(want, rel=1e-5)
    assert recs[1]["grad_norm"] != pytest.approx(want, rel=1e-5)  # step 2 reads the updated weights' gradient


@pytest.mark.parametrize("stage,ema,workers", [(1, True, 0), (3, True, 0), (3, False, 0), (2, True, 2)])
def test_resume_single_process(tmp_path, stage, ema, workers):
    """Stop after 3 steps (a finished run with steps=3), continue the same out_dir to 6: identical to 6 in one go
    (ZeRO-3 without EMA evaluates on gathered raw weights; workers > 0 loads through DataLoader worker processes)."""
    kw = dict(zero_stage=stage, ema_decay=0.9 if ema else None, schedule="constant", warmup_steps=2,
              num_workers=workers)
    ref = _trainer(tmp_path / "ref", steps=6, **kw)
    ref_records = ref.train()
    first = _trainer(tmp_path / "cut", steps=3, **kw)
    first.train()
    second = _trainer(tmp_path / "cut", steps=6, **kw)
    assert second.zero_stage == stage
    rest = second.train()
    assert [r["step"] for r in rest if "loss" in r] == [4, 5, 6]
    assert _losses(_read_metrics(tmp_path / "cut")) == _losses(ref_records)
    assert [r for r in _read_metrics(tmp_path / "cut") if "loss" not in r] == [r for r in ref_records if "loss" not in r]
    _assert_same_weights(full_weights(second), full_weights(ref))
    if ema:
        _assert_same_weights(second.ema_state_dict(), ref.ema_state_dict())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("ema", [False, True])
def test_bf16_trains_evaluates_and_resumes(tmp_path, stage, ema):
    """precision="bf16" (what "auto" is on CUDA) on every ZeRO stage: the module runs in bf16, eval_fn (fp32 inputs)
    gets an fp32 model with or without EMA (it got the raw bf16 module at ZeRO 0-2 without EMA: "mat1 and mat2 must
    have the same dtype"), and a resumed run equals one run bitwise."""
    kw = dict(zero_stage=stage, ema_decay=0.9 if ema else None, precision="bf16", schedule="constant", save_every=2)
    ref = _trainer(tmp_path / "ref", steps=4, **kw)
    assert ref.engine.module.fc1.weight.dtype == torch.bfloat16
    ref_records = ref.train()
    evals = [r for r in ref_records if "loss" not in r]
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["eval/mse"]) for r in evals)
    # trained_model(): the fp32 master weights (not bf16 values) wherever DeepSpeed keeps them, within bf16
    # rounding of the module's own; ZeRO-3's are gathered from the partitions.
    trained = dict(ref.trained_model().named_parameters())
    master = ref.full_state_dict()
    for n, w in full_weights(ref).items():
        assert trained[n].dtype == torch.float32 and torch.equal(trained[n], master[n])
        torch.testing.assert_close(trained[n].bfloat16(), w.bfloat16(), rtol=0, atol=0)
    off_grid = [n for n, t in trained.items() if not torch.equal(t, t.bfloat16().float())]
    assert bool(off_grid) == (stage != 0), off_grid  # ZeRO-0 bf16 keeps no per-parameter master copy
    _trainer(tmp_path / "cut", steps=2, **kw).train()
    second = _trainer(tmp_path / "cut", steps=4, **kw)
    assert [r["step"] for r in second.train() if "loss" in r] == [3, 4]
    assert _losses(_read_metrics(tmp_path / "cut")) == _losses(ref_records)
    _assert_same_weights(full_weights(second), full_weights(ref))
    if ema:
        _assert_same_weights(second.ema_state_dict(), ref.ema_state_dict())


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def _bn_loss(model, batch, step):
    pred = model(batch["x"].to(model.fc.weight.dtype))
    return torch.nn.functional.mse_loss(pred.float(), batch["y"]), {}


def test_bf16_casts_buffers_with_the_parameters(tmp_path):
    """DeepSpeed 0.19 casts only parameters to bf16 unless data_types.buffer_dtype is set; a BatchNorm's fp32
    running stats next to bf16 weights then fail in batch_norm ("expected scalar type BFloat16 but found Float").
    The trainer sets the key (a ds_config that sets it wins), and the BatchNorm model trains."""
    cfg = TrainConfig(out_dir=str(tmp_path), steps=1, precision="bf16")
    assert build_ds_config(cfg, 1, False)["data_types"]["buffer_dtype"] == "bf16"
    assert "data_types" not in build_ds_config(TrainConfig(out_dir=str(tmp_path), steps=1, precision="fp32"), 1, False)
    own = TrainConfig(out_dir=str(tmp_path), steps=1, precision="bf16",
                      ds_config={"data_types": {"buffer_dtype": "fp32"}})
    assert build_ds_config(own, 1, False)["data_types"]["buffer_dtype"] == "fp32"
    amp = build_ds_config(TrainConfig(out_dir=str(tmp_path), steps=1, precision="bf16", autocast=True), 1, False)
    assert "data_types" not in amp and "bf16" not in amp and amp["torch_autocast"]["dtype"] == "bfloat16"
    t = Trainer(_BNNet(), _bn_loss, RegressionSet(), _cfg(tmp_path / "bn", steps=2, precision="bf16", zero_stage=0,
                                                          ema_decay=None))
    assert t.engine.module.bn.running_mean.dtype == torch.bfloat16
    before = t.engine.module.bn.running_mean.clone()
    recs = [r for r in t.train() if "loss" in r]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    assert not torch.equal(t.engine.module.bn.running_mean, before)


def test_resume_refuses_a_different_batch_layout(tmp_path):
    _trainer(tmp_path / "r", steps=3).train()
    with pytest.raises(ValueError, match="micro_batch"):
        _trainer(tmp_path / "r", steps=6, micro_batch=3).train()


# ---------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun


def torchrun(*module_args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m <module_args>`` from the repo root, with the fault injection
    ``fault`` (train.trainer FAULT_ENV) or none; every entry point's two-process tests launch through this."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop(FAULT_ENV, None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # this process's own one-process group must not leak into the launch
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *module_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(out, config: dict, result: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return torchrun("tests.train.trainer_driver", "--out", str(out), "--config", json.dumps(config), "--result",
                    result, fault=fault)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _killed(proc):
    assert proc.returncode != 0, "the fault injection did not stop the job"
    # torchrun reports each worker's exit code; the injected exit is the only way to get this one.
    assert f"exitcode: {FAULT_EXIT_CODE}" in proc.stderr or f"exitcode  : {FAULT_EXIT_CODE}" in proc.stderr, \
        proc.stderr[-3000:]


def _snapshot_after_mid_save_kill(ck) -> dict:
    state = torch.load(os.path.join(ck, "step_3", "trainer_state.pt"), weights_only=True)
    return {"entries": sorted(os.listdir(ck)), "latest": open(os.path.join(ck, "latest")).read(),
            "state_step": state["step"],
            "rank_files": sorted(f for f in os.listdir(os.path.join(ck, "step_3")) if f.startswith("rank_"))}


@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory):
    """ZeRO-2, 8 steps, checkpoints every 3: an uninterrupted run, and a run killed mid-save of step 6 (after the
    temporary write, before the rename), resumed from step 3 and killed again after step 7, resumed from step 6."""
    base = tmp_path_factory.mktemp("zero2")
    cfg = {"steps": 8, "zero_stage": 2}
    _ok(_torchrun(base / "ref", cfg, "final"))
    cut = base / "cut"
    _killed(_torchrun(cut, cfg, "unused", fault="exit_in_save:6"))
    snap = _snapshot_after_mid_save_kill(cut / "checkpoints")
    _killed(_torchrun(cut, cfg, "unused", fault="exit_after_step:7"))
    after_second_kill = sorted(os.listdir(cut / "checkpoints"))
    _ok(_torchrun(cut, cfg, "final"))
    return {"ref": base / "ref", "cut": cut, "snap": snap, "after_second_kill": after_second_kill}


def test_two_process_resume_is_exact_zero2(zero2_runs):
    ref = torch.load(zero2_runs["ref"] / "final.pt", weights_only=True)
    got = torch.load(zero2_runs["cut"] / "final.pt", weights_only=True)
    ref_lines, cut_lines = _read_metrics(zero2_runs["ref"]), _read_metrics(zero2_runs["cut"])
    assert [r["step"] for r in ref_lines if "loss" in r] == list(range(1, 9))
    assert _losses(cut_lines) == _losses(ref_lines)
    for key in ("mae", "lr", "grad_norm", "samples"):
        assert [r.get(key) for r in cut_lines] == [r.get(key) for r in ref_lines], key
    assert [r for r in cut_lines if "loss" not in r] == [r for r in ref_lines if "loss" not in r]  # eval lines
    _assert_same_weights(got["weights"], ref["weights"])
    _assert_same_weights(got["ema"], ref["ema"])
    # The last run resumed from step 6 (saved by the second run) and so returned steps 7, 8 only.
    assert [r["step"] for r in got["records"] if "loss" in r] == [7, 8]
    assert zero2_runs["after_second_kill"] == ["latest", "step_3", "step_6", "zero_to_fp32.py", "zero_to_torch.py"]


def test_mid_save_kill_leaves_previous_checkpoint(zero2_runs):
    snap = zero2_runs["snap"]
    # The interrupted save left only its temporary directory; `latest` still names the complete step_3.
    assert snap["latest"] == "step_3"
    assert ".tmp-step_6" in snap["entries"] and "step_6" not in snap["entries"]
    assert snap["state_step"] == 3 and snap["rank_files"] == ["rank_0.pt", "rank_1.pt"]
    # ... and step_3 loaded: the resumed run's metrics continue from it exactly (previous test), and the resume
    # removed the temporary directory.
    final_entries = os.listdir(zero2_runs["cut"] / "checkpoints")
    assert not any(e.startswith(".tmp-") for e in final_entries)
    assert (zero2_runs["cut"] / "checkpoints" / "latest").read_text() == "step_8"


def test_two_process_resume_is_exact_zero0(tmp_path):
    cfg = {"steps": 6, "zero_stage": 0, "grad_accum": 1}
    _ok(_torchrun(tmp_path / "ref", cfg, "final"))
    _killed(_torchrun(tmp_path / "cut", cfg, "unused", fault="exit_after_step:4"))
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_3"
    _ok(_torchrun(tmp_path / "cut", cfg, "final"))
    ref = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert _losses(_read_metrics(tmp_path / "cut")) == _losses(_read_metrics(tmp_path / "ref"))
    _assert_same_weights(got["weights"], ref["weights"])
    _assert_same_weights(got["ema"], ref["ema"])


# ---------------------------------------------------------------------------------------------------------------------
# Data order and configuration


def test_step_sampler_order():
    keys = [i % 3 for i in range(50)]
    plans = [StepSampler(50, 2, 3, 2, r, seed=7, group_key=lambda i: keys[i]).plan(epoch=1) for r in range(2)]
    s = StepSampler(50, 2, 3, 2, 0, seed=7, group_key=lambda i: keys[i])
    assert s.steps_per_epoch == 4 and len(plans[0]) == len(plans[1]) == 4
    seen = []
    for plan in plans:
        for step in plan:
            assert len(step) == 3
            for mb in step:
                assert len(mb) == 2 and len({keys[i] for i in mb}) == 1
                seen += mb
    assert len(seen) == len(set(seen)) == 48  # disjoint across ranks and steps
    assert plans[0] == StepSampler(50, 2, 3, 2, 0, seed=7, group_key=lambda i: keys[i]).plan(epoch=1)
    assert plans[0] != s.plan(epoch=2) and plans[0] != StepSampler(50, 2, 3, 2, 0, seed=8).plan(epoch=1)
    flat = StepSampler(10, 3, 1, 1, 0, seed=0)
    flat_idx = [i for st in flat.plan(0) for mb in st for i in mb]
    assert flat.steps_per_epoch == 3 and len(set(flat_idx)) == 9 and set(flat_idx) <= set(range(10))
    with pytest.raises(ValueError, match="too small"):
        StepSampler(5, 2, 2, 2, 0, seed=0)


def test_lr_factor():
    kw = dict(steps=12, warmup_steps=1, schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(0, **kw) == 1.0 and lr_factor(1, **kw) == 1.0 and lr_factor(11, **kw) == pytest.approx(0.2)
    assert lr_factor(6, **kw) == pytest.approx(0.2 + 0.8 * 0.5)
    assert [lr_factor(s, steps=5, warmup_steps=4, schedule="constant", min_lr_ratio=0.1) for s in range(5)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", 2.5), ("micro_batch", 0), ("grad_accum", -1), ("lr", 0.0), ("lr", float("nan")),
    ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("weight_decay", -0.1), ("warmup_steps", -1), ("schedule", "linear"),
    ("min_lr_ratio", 1.5), ("grad_clip", -1.0), ("ema_decay", 1.0), ("zero_stage", 4), ("zero_stage", True),
    ("precision", "fp16"), ("seed", -1), ("log_every", 0), ("save_every", 0), ("keep_last", 0),
    ("ds_config", "no_such_config"), ("ds_config", 3), ("num_workers", -1), ("progress", "yes"), ("autocast", 1),
])
def test_bad_config_values_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=field.split("[")[0]):
        TrainConfig(out_dir=str(tmp_path), **{"steps": 10, field: value})


def test_bad_config_other_cases(tmp_path):
    with pytest.raises(ValueError, match="out_dir"):
        TrainConfig(out_dir="", steps=1)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=1, micro_batch=2,
                      ds_config={"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ValueError, match="micro_batch"):
        build_ds_config(cfg, world_size=1, cuda=False)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=1, ds_config={"gradient_accumulation_steps": 3})
    with pytest.raises(ValueError, match="grad_accum"):
        build_ds_config(cfg, world_size=1, cuda=False)
    # Named configs resolve from train/configs and their keys win over the generated ones.
    ds = build_ds_config(TrainConfig(out_dir=str(tmp_path), steps=1, ds_config="zero3", grad_clip=0.5), 2, False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 2
    assert "bf16" not in ds and build_ds_config(TrainConfig(out_dir=str(tmp_path), steps=1), 1, True)["bf16"]
    with pytest.raises(ValueError, match="too small"):
        Trainer(make_model(), loss_fn, RegressionSet(n=3), _cfg(tmp_path, steps=1))
    with pytest.raises(TypeError, match="loss_fn"):
        Trainer(make_model(), "nope", RegressionSet(), _cfg(tmp_path, steps=1))
