"""train/lavin_dit.py: the flow and VAE objectives recomputed by other means, the VAE's image/video schedule, the
DiT's resolution stages, and both training stages end to end on ShapesWorld, in one process and (kill and resume) on
two processes under torchrun with gloo.

The 2-process test launches ``python -m train.lavin_dit`` itself on a tiny config (16x16 then 32x32 frames, a few
steps per stage) and stops it with the trainer's fault injection (train/trainer.py, MMKERNELS_TRAIN_FAULT).
"""

import json
import math
import os
import subprocess

import pytest
import torch
import yaml

from mmkernels.testing import assert_close
from models.lavin_dit import flow
from models.lavin_dit.config import JDiTConfig, STVAEConfig
from models.lavin_dit.jdit import JDiT, patchify
from models.lavin_dit.stvae import STVAE
from models.lavin_dit.vae_loss import VAEStageSchedule, vae_generator_loss
from tests.train.test_trainer import ROOT, _killed, _ok, torchrun
from train import launch, lavin_dit
from train.data.lavin_tasks import VIDEO_TASKS, InContextDataset, collate
from train.data.shapes import ShapesWorld
from train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning",  # DeepSpeed's own c10d calls
                                        "ignore:VAELoss. no LPIPS weights:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    launch.shutdown()


def _batch():
    ds = InContextDataset(ShapesWorld(seed=0, size=(32, 32)), tasks=["depth_estimation"], k=2, length=8)
    return collate([ds[0], ds[1], ds[2]])


def test_flow_objective_by_hand():
    torch.manual_seed(0)
    vae, dit = STVAE(STVAEConfig.tiny()), JDiT(JDiTConfig.preset("tiny"))
    with torch.no_grad():
        for p in dit.parameters():  # non-zero output layer so the loss depends on the model
            p.add_(0.02 * torch.randn_like(p))
    batch = _batch()
    obj = lavin_dit.FlowObjective(vae, uncond_ratio=0.5)
    torch.manual_seed(3)
    loss, logs = obj(dit, batch, 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.blocks[0].parameters())
    assert dit.final_layer.linear.weight.grad.abs().sum() > 0
    # By hand, drawing in the same order: posterior samples clip by clip, t, x0, the CFG dropout mask.
    torch.manual_seed(3)
    with torch.no_grad():
        clips = [batch["inputs"][:, 0], batch["targets"][:, 0], batch["inputs"][:, 1], batch["targets"][:, 1],
                 batch["query"], batch["target"]]
        lat = [STVAE.to_dit_latent(vae.encode(c).sample()) for c in clips]
        cond, x1 = torch.cat(lat[:-1], 2), lat[-1]
        t = torch.sigmoid(torch.randn(3))
        x0 = torch.randn_like(x1)
        drop = torch.rand(3) < 0.5
        xt, u = t.view(-1, 1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1, 1)) * x0, x1 - x0
        null = torch.cat([torch.zeros_like(cond[:, :, :1]), cond[:, :, -1:]], 2)
        per = []
        for i in range(3):
            ctx = null[i:i + 1] if drop[i] else cond[i:i + 1]
            v = dit(patchify(xt[i:i + 1], 2), t[i:i + 1], patchify(ctx, 2))
            d = (v - u[i:i + 1]).flatten()
            per.append(d.square().mean() + 0.1 * d.abs().mean())
        want = torch.stack(per).mean()
    assert_close(loss.detach(), want, dtype=torch.float32, what="flow loss")
    assert logs["uncond_frac"] == float(drop.float().mean())


def test_main_runs_both_stages(tmp_path):
    with open("train/configs/lavin_dit_tiny.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["vae"]["train"].update(steps=3, micro_batch=2, save_every=3, log_every=1, zero_stage=0)
    cfg["train"].update(steps=3, micro_batch=2, save_every=3, log_every=1, zero_stage=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert lavin_dit.main(["--config", str(path), "--out-dir", str(tmp_path / "run")]) == 0
    for stage in ("vae", "dit"):
        lines = [json.loads(x) for x in (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in lines if "loss" in r]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert flow.UNCOND_RATIO == cfg["flow"]["uncond_ratio"]


def test_every_config_builds():
    import glob

    for path in sorted(glob.glob("train/configs/lavin_dit_*.yaml")):
        with open(path) as f:
            cfg = yaml.safe_load(f)
        dit_cfg = lavin_dit.build_dit_config(cfg)
        stages = lavin_dit.dit_stages(cfg, "/tmp/unused")
        assert all(st.config.steps > 0 for st in stages) and dit_cfg.hidden_size % dit_cfg.num_heads == 0, path
        v = cfg["vae"]
        lavin_dit.vae_loss_config(v)
        sched = lavin_dit.vae_schedule(v)
        vtc = lavin_dit._train_config(v["train"], "/tmp/unused")
        assert 0 < sched.stage1_steps < vtc.steps and 0 < sched.video_fraction < 1, path
        if "tiny" not in path:  # the thesis schedule (§4.4.1): 100k steps at 256^2, then 20k at 512^2 with lr 5e-5
            assert [(st.size, st.config.steps) for st in stages] == [((256, 256), 100_000), ((512, 512), 20_000)]
            assert [st.config.lr for st in stages] == [1e-4, 5e-5], path
            assert [st.config.out_dir for st in stages] == ["/tmp/unused/dit/stage1", "/tmp/unused/dit/stage2"]
            assert sched.video_frames == 17
            # the global batch is kept across the stages
            assert len({st.config.micro_batch * st.config.grad_accum for st in stages}) == 1, path
    assert lavin_dit.build_dit_config({"model": {"preset": "3.4B"}}) == JDiTConfig.preset("3.4B")


# ---------------------------------------------------------------------------------------------------------------------
# ST-VAE stage: the GAN objective in one backward, the image/video schedule, a trainer run


def _vae_section(**over) -> dict:
    v = {"preset": "tiny", "weights": None, "lpips": None, "kl_weight": 1e-6, "disc_start": 0, "disc_weight": 0.5,
         "stage1_steps": 1, "video_fraction": 0.5, "video_frames": 5,
         "train": {"steps": 4, "micro_batch": 2, "lr": 2e-3, "ema_decay": None, "zero_stage": 0, "log_every": 1,
                   "save_every": 100, "progress": False}}
    train = over.pop("train", {})
    v.update(over)
    v["train"].update(train)
    return v


def _small_dataset(size=(16, 16), tasks=("foreground_segmentation", "depth_estimation")):
    return InContextDataset(ShapesWorld(seed=0, size=size), tasks=list(tasks), k=1, length=64)


@pytest.mark.parametrize("step", [0, 1])  # an image batch, then a video batch (stage1_steps=1, video_fraction=1)
def test_vae_objective_one_backward_gives_each_part_its_own_grads(step):
    v = _vae_section(video_fraction=1.0)
    gan = lavin_dit.build_vaegan(v).double()
    data = lavin_dit.VAEData(_small_dataset(), video_frames=5)
    obj = lavin_dit.VAEObjective(lavin_dit.vae_loss_config(v), data, lavin_dit.vae_schedule(v))
    batch = {"index": torch.tensor([3, 10])}
    torch.manual_seed(7)  # the posterior sample
    loss, logs = obj(gan, batch, step)
    loss.backward()
    got = {n: None if p.grad is None else p.grad.clone() for n, p in gan.named_parameters()}
    assert logs["frames"] == (1 if step == 0 else 5) and logs["adaptive_weight"] > 0 and "loss_d" in logs

    # Separately: the generator loss alone for the VAE, the discriminator loss alone for the discriminator.
    x = data.pairs([3, 10], "image" if step == 0 else "video").double()
    assert x.shape == (4, 3, 1 if step == 0 else 5, 16, 16)
    vae_p, disc_p = list(gan.vae.parameters()), list(gan.disc.parameters())
    torch.manual_seed(7)
    loss_g, recon, logs_g = vae_generator_loss(gan.vae, gan.disc, x, step, obj.criterion)
    g_vae = torch.autograd.grad(loss_g, vae_p, retain_graph=True, allow_unused=True)
    assert all(g is None for g in torch.autograd.grad(loss_g, disc_p, allow_unused=True))
    loss_d, _ = obj.criterion.discriminator_loss(gan.disc, x, recon.detach(), step)
    g_disc = torch.autograd.grad(loss_d, disc_p)
    torch.testing.assert_close(loss.detach(), (loss_g + loss_d).detach(), rtol=1e-13, atol=0)
    assert sum(g is not None for g in g_vae) > 0.9 * len(vae_p)
    for (n, _), g in zip(gan.vae.named_parameters(), g_vae):
        if g is None:  # not used by this batch
            assert got["vae." + n] is None, n
            continue
        torch.testing.assert_close(got["vae." + n], g, rtol=1e-10, atol=1e-14, msg=f"vae.{n}")
    for (n, _), g in zip(gan.disc.named_parameters(), g_disc):
        torch.testing.assert_close(got["disc." + n], g, rtol=1e-10, atol=1e-14, msg=f"disc.{n}")
    assert all(float(g.abs().sum()) > 0 for g, p in zip(g_disc, disc_p) if p.dim() > 1)  # (the last bias's hinge
    # gradient is mean(-1 over real) + mean(+1 over fake) = 0 while every logit is inside the margin)
    # The adversarial term is really in the VAE's gradient: without it (GAN off) the last layer's grad differs.
    torch.manual_seed(7)
    off = lavin_dit.VAELoss(lavin_dit.vae_loss_config(_vae_section(disc_start=10 ** 9)))
    loss_off, _, _ = vae_generator_loss(gan.vae, gan.disc, x, step, off)
    g_off, = torch.autograd.grad(loss_off, [gan.vae.last_layer()])
    g_on = got["vae.decoder.conv_out.conv.weight"]
    assert float((g_on - g_off).norm()) > 1e-3 * float(g_off.norm())


def test_vae_schedule_draws_video_batches_in_the_configured_fraction():
    v = _vae_section(stage1_steps=6, video_fraction=0.3, video_frames=9)
    sched = lavin_dit.vae_schedule(v)
    assert sched == VAEStageSchedule(6, 0.3, 9)
    data = lavin_dit.VAEData(_small_dataset(), video_frames=9)
    obj = lavin_dit.VAEObjective(lavin_dit.vae_loss_config(v), data, sched)
    shapes = [tuple(obj.inputs({"index": torch.tensor([s, s + 1])}, s).shape) for s in range(26)]
    assert shapes[:6] == [(4, 3, 1, 16, 16)] * 6  # stage 1: images only
    stage2 = [sh[2] for sh in shapes[6:]]
    assert set(stage2) == {1, 9} and all(sh[0] == 4 and sh[3:] == (16, 16) for sh in shapes)
    for n in range(1, 21):  # every prefix of stage 2 holds floor(0.3 n) video batches
        assert stage2[:n].count(9) == math.floor(0.3 * n + 1e-9), (n, stage2)
    # Video batches are the video tasks' (input, target) clips: frame prediction's target continues its input.
    world = data.world
    assert data.video_tasks == VIDEO_TASKS and world.size == (16, 16)
    clip = data.pairs([0], "video")
    assert clip.shape == (2, 3, 9, 16, 16) and not torch.equal(clip[0, :, 1:], clip[0, :, :-1])  # things move
    # A sample is a function of its index (exact resume): the same pixels when drawn again.
    assert torch.equal(data.pairs([5, 2], "video"), data.pairs([5, 2], "video"))
    assert not torch.equal(data.pairs([5], "image"), data.pairs([6], "image"))


@pytest.fixture
def _one_thread():
    """One intra-op thread: 32 GAN steps diverge chaotically with the reduction order, so the run (and its measured
    ratios) is deterministic only at a fixed thread count. Standalone with 2 threads the video ratio was 0.93, over
    its bar; the suite passed only because tests/bench (bench on the CPU sets 1 thread) had run first."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vae_stage_trains_with_the_gan_and_schedule(tmp_path, _one_thread):
    """The trainer path of the VAE stage (ZeRO-2, one process): the discriminator from step 2, video batches in stage
    2, the reconstruction error falls, and the official-layout stvae.pt holds the returned VAE."""
    steps, s1 = 32, 16
    v = _vae_section(disc_start=2, stage1_steps=s1, video_fraction=0.25,
                     train={"steps": steps, "micro_batch": 4, "zero_stage": 2, "save_every": steps})
    cfg = {"vae": v}
    init = lavin_dit.build_vaegan(v)
    dataset = _small_dataset()
    vae = lavin_dit.train_vae(cfg, str(tmp_path), dataset)
    recs = [json.loads(x) for x in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    sched = lavin_dit.vae_schedule(v)
    assert [r["frames"] for r in recs] == [sched.num_frames(s) for s in range(steps)]
    assert [r["frames"] for r in recs[s1:]].count(5) == 4 and all(r["frames"] == 1 for r in recs[:s1])
    # The GAN terms from step 2 (0-based) on; the discriminator trained.
    assert all("loss_d" not in r for r in recs[:2]) and all("loss_d" in r for r in recs[2:])
    assert all(r["adaptive_weight"] > 0 and r["adv_g"] != 0 for r in recs[2:])
    for r in recs[2:]:
        assert r["loss"] == pytest.approx(r["loss_g"] + r["loss_d"], rel=1e-5)
    ck = torch.load(tmp_path / "vae" / "checkpoints" / f"step_{steps}" / "mp_rank_00_model_states.pt",
                    map_location="cpu", weights_only=False)["module"]
    disc0 = init.disc.state_dict()
    assert all(not torch.equal(ck["disc." + n], t) for n, t in disc0.items() if t.dim() > 1)
    # The reconstruction error falls: on the training batches, and on held-out pairs (posterior mean decoded).
    img = [r["mse"] for r in recs if r["frames"] == 1]
    assert sum(img[-8:]) < 0.8 * sum(img[:8]), img
    data = lavin_dit.VAEData(dataset, video_frames=5)
    for kind, bar in (("image", 0.75), ("video", 0.9)):  # (a deterministic run: about 0.64 and 0.82 here;
        # videos are 4 of the 32 steps)
        x = data.pairs(range(1000, 1006), kind)
        with torch.no_grad():
            before = float((init.vae(x, sample_posterior=False)[0] - x).square().mean())
            after = float((vae(x, sample_posterior=False)[0] - x).square().mean())
        assert after < bar * before, (kind, before, after)
    # stvae.pt: the official layout (strict load), the same weights as the returned VAE and the checkpoint's.
    loaded = lavin_dit.load_official(STVAE(STVAEConfig.tiny()), str(tmp_path / "vae" / "stvae.pt"))
    for n, t in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], t) and torch.equal(ck["vae." + n], t), n


# ---------------------------------------------------------------------------------------------------------------------
# J-DiT resolution stages


def _staged_cfg(vae_weights: str, stage2_steps: int = 2, **train) -> dict:
    t = {"micro_batch": 2, "lr": 1e-3, "ema_decay": 0.5, "zero_stage": 0, "log_every": 1, "save_every": 2,
         "progress": False,
         "stages": [{"size": [16, 16], "steps": 2}, {"size": [32, 32], "steps": stage2_steps, "lr": 5e-4}]}
    t.update(train)
    return {"data": {"size": [16, 16], "tasks": ["foreground_segmentation", "depth_estimation"], "k": 1,
                     "length": 64, "seed": 0},
            "vae": {"preset": "tiny", "weights": vae_weights},
            "model": {"preset": "tiny"},
            "flow": {"uncond_ratio": 0.1, "t_kind": "lognorm", "shift": 1.0},
            "train": t}


def _random_vae_file(path) -> str:
    torch.manual_seed(0)
    torch.save({"state_dict": lavin_dit.ours_to_official(STVAE(STVAEConfig.tiny()).state_dict())}, path)
    return str(path)


def _metrics(path) -> list:
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_bf16_vae_and_dit_stages_train(tmp_path):
    """precision bf16 (auto on CUDA) through both stages: the VAE with the discriminator and video batches from step
    1 (the temporal pooling had no bf16 CPU kernel), then the J-DiT with EMA on the VAE; losses finite, the final
    checkpoint and its EMA in fp32 and loadable."""
    from mmkernels import use_backend

    v = _vae_section(disc_start=1, stage1_steps=1, video_fraction=1.0,
                     train={"steps": 2, "micro_batch": 2, "precision": "bf16", "zero_stage": 1})
    cfg = _staged_cfg("unused", precision="bf16", ema_decay=0.9)
    cfg["vae"], cfg["train"]["stages"] = v, [{"size": [16, 16], "steps": 2}]
    ds = _small_dataset()
    with use_backend("torch"):  # the Triton CPU interpreter has no bf16
        vae = lavin_dit.train_vae(cfg, str(tmp_path), ds)
        recs = [json.loads(x) for x in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
        assert [r["frames"] for r in recs] == [1, 5] and "loss_d" in recs[1]
        assert all(math.isfinite(r["loss"]) for r in recs)
        # stvae.pt and the returned VAE hold the fp32 master weights (ZeRO-1 keeps them), not bf16-rounded values.
        saved = torch.load(tmp_path / "vae" / lavin_dit.STVAE_FILE, weights_only=True)["state_dict"]
        assert any(not torch.equal(t, t.bfloat16().float()) for t in saved.values() if t.is_floating_point())
        assert any(not torch.equal(p, p.bfloat16().float()) for p in vae.parameters())
        path = lavin_dit.train_dit(cfg, str(tmp_path), vae.float(), ds)
    fin = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.float32 for part in ("model", "ema") for t in fin[part].values()
               if t.is_floating_point())
    drecs = [json.loads(x) for x in open(os.path.join(os.path.dirname(path), "metrics.jsonl")).read().splitlines()]
    assert [r["step"] for r in drecs if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in drecs
                                                                       if "loss" in r)
    lavin_dit.load_final_dit(cfg, path)


def test_dit_resolution_stages(tmp_path, monkeypatch):
    seen = []

    class Recording(Trainer):
        def train(self):
            item = self.dataset[0]
            seen.append({"dir": self.config.out_dir, "lr": self.config.lr, "hw": tuple(item["query"].shape[-2:]),
                         "weights": {n: p.detach().clone() for n, p in self.engine.module.state_dict().items()},
                         "ema": self.ema_state_dict()})
            return super().train()

    monkeypatch.setattr(lavin_dit, "Trainer", Recording)
    cfg = _staged_cfg(_random_vae_file(tmp_path / "vae.pt"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert lavin_dit.main(["--config", str(path), "--out-dir", str(out)]) == 0
    s1, s2 = out / "dit" / "stage1", out / "dit" / "stage2"
    assert [x["dir"] for x in seen] == [str(s1), str(s2)]
    assert [x["hw"] for x in seen] == [(16, 16), (32, 32)] and [x["lr"] for x in seen] == [1e-3, 5e-4]
    fin1 = torch.load(s1 / "final.pt", weights_only=True)
    assert fin1["steps"] == 2 and fin1["size"] == [16, 16]
    # Stage 2 started from stage 1's final weights and EMA (not a fresh initialization).
    for n, t in seen[1]["weights"].items():
        assert torch.equal(t, fin1["model"][n]), n
    assert any(not torch.equal(seen[0]["weights"][n], fin1["model"][n]) for n in fin1["ema"])
    for n, t in fin1["ema"].items():
        assert torch.equal(seen[1]["ema"][n], t), n
    assert any(not torch.equal(fin1["ema"][n], fin1["model"][n]) for n in fin1["ema"])
    m1, m2 = _metrics(s1 / "metrics.jsonl"), _metrics(s2 / "metrics.jsonl")
    assert [r["step"] for r in m1] == [1, 2] and [r["step"] for r in m2] == [1, 2]
    assert [r["lr"] for r in m2] == [5e-4, 5e-4]
    # The final model: stage 2's EMA.
    final = lavin_dit.load_final_dit(cfg, str(s2 / "final.pt"))
    fin2 = torch.load(s2 / "final.pt", weights_only=True)
    for n, p in final.named_parameters():
        assert torch.equal(p, fin2["ema"][n]), n

    # Resume with a longer stage 2: stage 1 is done (its final.pt) and is skipped; stage 2 continues from step 2.
    seen.clear()
    stage1_files = {p: os.path.getmtime(p) for p in s1.rglob("*") if p.is_file()}
    path.write_text(yaml.safe_dump(_staged_cfg(cfg["vae"]["weights"], stage2_steps=4)))
    assert lavin_dit.main(["--config", str(path), "--out-dir", str(out)]) == 0
    assert [x["dir"] for x in seen] == [str(s2)]
    assert {p: os.path.getmtime(p) for p in s1.rglob("*") if p.is_file()} == stage1_files
    m2b = _metrics(s2 / "metrics.jsonl")
    assert [r["step"] for r in m2b] == [1, 2, 3, 4] and m2b[:2] == m2
    assert torch.load(s2 / "final.pt", weights_only=True)["steps"] == 4


def test_dit_stage_config_errors(tmp_path):
    # A finished stage counts as done only with its configured steps, and must have been trained at its size.
    st = lavin_dit.dit_stages({"train": {"stages": [{"size": [32, 32], "steps": 2}]}}, str(tmp_path))[0]
    assert st.final_path == str(tmp_path / "dit" / "stage1" / "final.pt") and lavin_dit._read_final(st) is None
    os.makedirs(tmp_path / "dit" / "stage1")
    torch.save({"model": {}, "ema": None, "steps": 2, "size": [32, 32]}, st.final_path)
    assert lavin_dit._read_final(st)["steps"] == 2
    torch.save({"model": {}, "ema": None, "steps": 1, "size": [32, 32]}, st.final_path)
    assert lavin_dit._read_final(st) is None
    torch.save({"model": {}, "ema": None, "steps": 2, "size": [16, 16]}, st.final_path)
    with pytest.raises(ValueError, match="trained at"):
        lavin_dit._read_final(st)
    base = {"train": {"steps": 3, "stages": [{"size": [16, 16]}, {"size": [32], "steps": 2}]}}
    with pytest.raises(ValueError, match=r"stages\[1\].size"):
        lavin_dit.dit_stages(base, "/tmp/x")
    with pytest.raises(ValueError, match="needs 'steps'"):
        lavin_dit.dit_stages({"train": {"stages": [{"size": [16, 16]}]}}, "/tmp/x")
    with pytest.raises(ValueError, match="unknown key"):
        lavin_dit.train_vae({"vae": {"stage_1_steps": 3}}, "/tmp/x", None)
    # Stages inherit the shared keys; steps from the section when a stage has none.
    st = lavin_dit.dit_stages({"train": {"steps": 3, "micro_batch": 2, "stages": [{}, {"micro_batch": 1}]}}, "/o")
    assert [(s.size, s.config.steps, s.config.micro_batch) for s in st] == [(None, 3, 2), (None, 3, 1)]


# ---------------------------------------------------------------------------------------------------------------------
# Two processes, gloo: kill the tiny LaVin-DiT mid-way and resume


def _launch(config: str, out, fault=None) -> subprocess.CompletedProcess:
    return torchrun("train.lavin_dit", "--config", config, "--out-dir", str(out), fault=fault, timeout=600)


def test_two_process_kill_and_resume_is_exact(tmp_path):
    """VAE stage (2 steps, GAN on at step 1, a video batch at step 1) -> DiT stage 1 (16x16, 2 steps) -> DiT stage 2
    (32x32, 4 steps), ZeRO-2 on 2 gloo processes. Killed after stage-2 step 3 (its checkpoint is at step 2), then
    resumed: the VAE run resumes at its end, DiT stage 1 is skipped, stage 2 redoes step 3; every loss and the final
    weights equal those of an uninterrupted run."""
    cfg = _staged_cfg(None, stage2_steps=4, micro_batch=1, ema_decay=0.9, zero_stage=2)
    cfg["vae"] = _vae_section(disc_start=1, stage1_steps=1, video_fraction=1.0,
                              train={"steps": 2, "micro_batch": 1, "zero_stage": 2, "save_every": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _ok(_launch(str(path), tmp_path / "ref"))
    _killed(_launch(str(path), tmp_path / "cut", fault="exit_after_step:3"))
    cut = tmp_path / "cut"
    assert not (cut / "dit" / "stage2" / "final.pt").exists() and (cut / "dit" / "stage1" / "final.pt").exists()
    assert (cut / "dit" / "stage2" / "checkpoints" / "latest").read_text() == "step_2"
    stage1_mtime = os.path.getmtime(cut / "dit" / "stage1" / "final.pt")
    resumed = _launch(str(path), cut)
    _ok(resumed)
    assert os.path.getmtime(cut / "dit" / "stage1" / "final.pt") == stage1_mtime
    for stage in ("vae", "dit/stage1", "dit/stage2"):
        ref, got = _metrics(tmp_path / "ref" / stage / "metrics.jsonl"), _metrics(cut / stage / "metrics.jsonl")
        keys = [k for k in ref[0] if k not in ("time", "step_time")]
        assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref], stage
        assert all(math.isfinite(r["loss"]) for r in ref)
    vae_recs = _metrics(tmp_path / "ref" / "vae" / "metrics.jsonl")
    assert [r["frames"] for r in vae_recs] == [1, 5] and "loss_d" in vae_recs[1]
    assert len(_metrics(tmp_path / "ref" / "dit" / "stage2" / "metrics.jsonl")) == 4
    ref_fin = torch.load(tmp_path / "ref" / "dit" / "stage2" / "final.pt", weights_only=True)
    got_fin = torch.load(cut / "dit" / "stage2" / "final.pt", weights_only=True)
    for part in ("model", "ema"):
        assert ref_fin[part].keys() == got_fin[part].keys()
        for n in ref_fin[part]:
            assert torch.equal(ref_fin[part][n], got_fin[part][n]), (part, n)
    for n, t in torch.load(tmp_path / "ref" / "vae" / "stvae.pt", weights_only=True)["state_dict"].items():
        assert torch.equal(t, torch.load(cut / "vae" / "stvae.pt", weights_only=True)["state_dict"][n]), n
