"""LaVin-DiT J-DiT training throughput (issue 5): tokens/s and MFU of the shared trainer's step.

Setup (GPU; from train/configs/lavin_dit_1.0b.yaml, its 256^2 stage when it has ``train.stages``): the 1.0B preset
with gradient checkpointing, 256^2 frames (32^2 latents, a 16x16 token grid per frame), the config's largest pair
count (k = 4: 9 context frames + 1 target, L = 2560 tokens per sample), micro-batch 16 x 2 accumulation steps, bf16,
ZeRO-2, AdamW, clipping 1.0, EMA 0.9999, flow matching with logit-normal t and CFG dropout 0.1, all through
train/trainer.py ``Trainer`` on DeepSpeed.
What is timed is the trainer's own step time (data, forward, backward, optimizer, EMA; ``log_every=1``) over the
steps after a warm-up (Triton compilation, allocator). Checkpoint writes are switched off (they are not part of a
step). Inputs are seeded random latents: the frozen ST-VAE's encode is preprocessing, not J-DiT training, so it is
left out, and the weights are the official init (values do not change the time).
CPU ``--quick`` (a smoke test of the same code): the tiny preset and train/configs/lavin_dit_tiny.yaml (2 pairs, 32^2
frames), micro-batch 2, fp32, ZeRO-2 in one gloo process, a few steps; no MFU (no peak for a CPU).

FLOP count (model FLOPs: the matmuls the model needs; norms, RoPE, softmax and elementwise ops are not counted).
Per sample with T_c context and T_x target frames on an H x W token grid: N_c = T_c*H*W, N_x = T_x*H*W,
L = N_c + N_x; D hidden, P = p*p*C = 64 patch features, Wq = H_q*hd, Wkv = H_kv*hd (GQA), I SwiGLU hidden, n depth,
F = 256 timestep features. A Linear of k inputs and m outputs applied to one row costs 2*k*m. Both streams have the
same shapes (separate weights), so per token:

    qkv  = D*(Wq + 2*Wkv)                       q, k, v projections (every block, both streams)
    post = Wq*D + 3*D*I                         output projection + gate/up/down of the SwiGLU

    forward linear (tokens) = 2*[ L*P*D                              the two patch embedders
                                 + n*L*qkv
                                 + (n*N_x + (n-1)*N_c)*post         the last block's cond-stream update is skipped
                                                                    by our model (it never reaches the output)
                                 + N_x*D*P ]                         final linear (target tokens)
    forward linear (vectors) = 2*[ F*D + D*D                         timestep MLP
                                  + n*2*D*4D                         the two modulation linears of every block
                                  + D*D ]                            final adaLN modulation
    forward attention = n * 4 * L^2 * Wq       QK^T (2*L^2*hd per query head) and PV (the same), full joint
                                                attention over L tokens at the real head dim hd; GQA shares K/V but
                                                not these matmuls
    forward = linear (tokens) + linear (vectors) + attention
    training = 3*forward - 2*(L*P*D + F*D)

Backward = 2x forward (the input and the weight gradient of every matmul; for attention dQ, dK, dV and dP, not the
score recompute of flash attention), except for the layers whose input is data (the patch embedders and the first
timestep linear), which need no input gradient: hence the subtraction. Gradient checkpointing recomputes every
block's forward in the backward; that work is *not* counted (MFU, not hardware FLOP utilization). With CFG dropout a
dropped sample runs the short null context (T_c = 2), and is counted as such: the objective counts the tokens and
FLOPs of the passes it actually runs. tests/bench checks this count against torch's FlopCounterMode on the
official-style model. For 1.0B, k = 4, 256^2: forward = 2.49 TFLOP per sample (30% of it attention), training
7.48 TFLOP per sample, 239 TFLOP per 32-sample step (no dropout).

MFU = (training FLOP per step / step time) / the device's dense bf16 peak (bench.common.NOMINAL by device name:
H200 790, H100 798 TFLOP/s, design.md §5; other devices: unknown). Bar (issue 5, H200): MFU >= 40%.
Tokens/s counts every token through the transformer (context and target) per second.
Bytes charged (for GB/s only; a lower bound): per micro-batch the weights read by the forward and the backward and
the gradient written (3*s*N_params), per step AdamW reading and writing the fp32 weights and both moments and reading
the gradient (28*N_params); activations not counted.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
from dataclasses import dataclass

import torch
import yaml

from bench.common import ROOT, Context, Record
from bench.models import ModelRecord, bar_note, peak_tflops, sync
from models.lavin_dit import flow
from models.lavin_dit.config import JDiTConfig
from models.lavin_dit.jdit import FREQ_DIM, JDiT, patchify

MFU_BAR = 40.0  # percent
VAE_RATIO = 8  # the ST-VAE's spatial compression (latent = frame / 8)
CONFIG_GPU = os.path.join(ROOT, "train", "configs", "lavin_dit_1.0b.yaml")
CONFIG_CPU = os.path.join(ROOT, "train", "configs", "lavin_dit_tiny.yaml")


def jdit_flops(cfg: JDiTConfig, Tc: int, Tx: int, H: int, W: int) -> dict:
    """FLOP of one sample through ``cfg``'s J-DiT (see the module docstring): T_c context and T_x target frames on an
    H x W token grid. Keys: linear_tokens, linear_vectors, attention, forward, train (3x forward minus the input
    gradients nobody needs), skipped (the last block's cond-stream update, which the official code computes and ours
    skips; not part of forward)."""
    D, P, I, n = cfg.hidden_size, cfg.patch_dim, cfg.mlp_hidden, cfg.depth
    wq, wkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    nc, nx = Tc * H * W, Tx * H * W
    L = nc + nx
    qkv = D * (wq + 2 * wkv)
    post = wq * D + 3 * D * I
    linear_tokens = 2 * (L * P * D + n * L * qkv + (n * nx + (n - 1) * nc) * post + nx * D * P)
    linear_vectors = 2 * (FREQ_DIM * D + D * D + n * 2 * D * 4 * D + D * D)
    attention = n * 4 * L * L * wq
    forward = linear_tokens + linear_vectors + attention
    first = 2 * (L * P * D + FREQ_DIM * D)
    return {"linear_tokens": linear_tokens, "linear_vectors": linear_vectors, "attention": attention,
            "forward": forward, "train": 3 * forward - first, "skipped": 2 * nc * post, "tokens": L}


class LatentSamples(torch.utils.data.Dataset):
    """Seeded random DiT latents: sample i is {"cond": [C, T_c, h, w], "x1": [C, T_x, h, w]} (fp32), a function of i."""

    def __init__(self, n: int, channels: int, tc: int, tx: int, h: int, w: int):
        self.n, self.shape_c, self.shape_x = n, (channels, tc, h, w), (channels, tx, h, w)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        return {"cond": torch.randn(self.shape_c, generator=g), "x1": torch.randn(self.shape_x, generator=g)}


class LatentFlowObjective:
    """The J-DiT flow-matching loss of train/lavin_dit.py (``FlowObjective``) on precomputed latents: logit-normal t,
    x_t on the linear path, CFG dropout to the official null context (two passes when a batch mixes both), loss
    MSE + 0.1 L1. It counts the tokens and FLOP (:func:`jdit_flops`, ``train``) of every pass, per optimizer step."""

    def __init__(self, cfg: JDiTConfig, uncond_ratio: float, t_kind: str, shift: float):
        self.cfg, self.uncond_ratio, self.t_kind, self.shift = cfg, uncond_ratio, t_kind, shift
        self.tokens: dict[int, int] = {}
        self.flops: dict[int, int] = {}

    def __call__(self, model, batch, step):
        cond, x1 = batch["cond"], batch["x1"]
        B, p = x1.shape[0], self.cfg.patch_size
        t = flow.sample_t(B, kind=self.t_kind, shift=self.shift).to(x1.device)
        x0 = torch.randn_like(x1)
        xt, u = flow.interpolate(x0, x1, t)
        drop = flow.drop_mask(B, self.uncond_ratio).to(x1.device)
        total = x1.new_zeros((), dtype=torch.float32)
        H, W = x1.shape[-2] // p, x1.shape[-1] // p
        for mask, ctx in ((~drop, cond), (drop, flow.uncond_context(cond))):
            m = int(mask.sum())
            if m == 0:
                continue
            v = model(patchify(xt[mask], p), t[mask], patchify(ctx[mask], p))
            total = total + flow.flow_loss(v, u[mask]) * (m / B)
            f = jdit_flops(self.cfg, ctx.shape[2], x1.shape[2], H, W)
            self.tokens[step] = self.tokens.get(step, 0) + m * f["tokens"]
            self.flops[step] = self.flops.get(step, 0) + m * f["train"]
        return total, {}


@dataclass
class Setup:
    preset: str
    size: int
    pairs: int
    model: dict
    train: dict
    flow: dict
    warmup: int
    measured: int


def setup(ctx: Context) -> Setup:
    """The benchmark's configuration: the 1.0B config on a GPU, the tiny config (shrunk, fp32) on the CPU."""
    with open(CONFIG_GPU if ctx.cuda else CONFIG_CPU) as f:
        cfg = yaml.safe_load(f)
    model = dict(cfg.get("model", {}))
    preset = model.pop("preset")
    train = dict(cfg["train"])
    k = cfg.get("data", {}).get("k", 4)
    pairs = max(k) if isinstance(k, (list, tuple)) else int(k)
    size = int(cfg.get("data", {}).get("size", [256, 256])[0])
    stages = train.pop("stages", None)
    if stages:  # a resolution schedule: the benchmark is the 256^2 stage (else the first), with its overrides
        stage = next((st for st in stages if int(st.get("size", [0])[0]) == 256), stages[0])
        size = int(stage.get("size", [size])[0])
        train.update({key: v for key, v in stage.items() if key not in ("size", "steps")})
    if ctx.cuda:
        warmup, measured = (2, 4) if ctx.quick else (3, 10)
    else:
        # A smoke test of the same path: tiny sizes, fp32, gradient checkpointing as in the 1.0B config.
        model["grad_checkpointing"] = True
        train.update(micro_batch=2, grad_accum=1, precision="fp32")
        warmup, measured = (1, 2) if ctx.quick else (2, 6)
    return Setup(preset, size, pairs, model, train, dict(cfg.get("flow", {})), warmup, measured)


def run(ctx: Context) -> list[Record]:
    from train import launch
    from train.trainer import TrainConfig, Trainer

    s = setup(ctx)
    cfg = JDiTConfig.preset(s.preset, **s.model)
    lat = s.size // VAE_RATIO
    tc, tx = 2 * s.pairs + 1, 1
    tr = s.train
    steps = s.warmup + s.measured
    mb, ga = int(tr.get("micro_batch", 1)), int(tr.get("grad_accum", 1))
    torch.manual_seed(0)
    with torch.device(ctx.device):  # built on the device: the 1.0B init on the host would take longer than the run
        model = JDiT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    data = LatentSamples(steps * mb * ga, cfg.in_channels, tc, tx, lat, lat)
    objective = LatentFlowObjective(cfg, float(s.flow.get("uncond_ratio", flow.UNCOND_RATIO)),
                                    s.flow.get("t_kind", "lognorm"), float(s.flow.get("shift", 1.0)))
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "log_every", "save_every", "progress",
                                                                  "out_dir"}
    fields = {k: v for k, v in tr.items() if k in known}
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench_lavin_train_") as out:
            tcfg = TrainConfig(out_dir=out, steps=steps, log_every=1, save_every=10 ** 9, progress=False, **fields)
            trainer = Trainer(model, objective, data, tcfg)
            trainer._save = lambda: None  # checkpoint writes are not part of a training step
            if ctx.cuda:
                sync(ctx.device)
                torch.cuda.reset_peak_memory_stats(ctx.device)
            recs = [r for r in trainer.train() if "step_time" in r]
            peak = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20 if ctx.cuda else None
            dtype, zero, world = trainer.dtype, trainer.zero_stage, trainer.world_size
    finally:
        del trainer
        gc.collect()
        launch.shutdown()  # the one-process group this run created, if it did (a caller's group stays)
        if ctx.cuda:
            torch.cuda.empty_cache()

    timed = recs[s.warmup:]
    seconds = sum(r["step_time"] for r in timed)
    tokens = sum(objective.tokens[r["step"] - 1] for r in timed)
    flops = sum(objective.flops[r["step"] - 1] for r in timed)
    step_ms = 1e3 * seconds / len(timed)
    tok_s = tokens / seconds
    achieved = flops / seconds / 1e12
    peak_tf, device_name = peak_tflops(ctx.device)
    mfu = 100.0 * achieved / peak_tf if peak_tf else None
    esize = torch.finfo(dtype).bits // 8
    nbytes = ga * 3 * esize * n_params + 28 * n_params
    f0 = jdit_flops(cfg, tc, tx, lat // cfg.patch_size, lat // cfg.patch_size)
    notes = [f"{tok_s:,.0f} tokens/s"]
    extra = {"tokens_per_s": tok_s, "achieved_tflops": achieved, "mfu_pct": mfu, "peak_tflops": peak_tf,
             "device": device_name, "step_s": step_ms / 1e3, "steps_timed": len(timed), "warmup_steps": s.warmup,
             "tokens_per_step": tokens / len(timed), "flops_per_step": flops / len(timed), "params": n_params,
             "world_size": world, "zero_stage": zero, "micro_batch": mb, "grad_accum": ga,
             "grad_checkpointing": cfg.grad_checkpointing, "uncond_ratio": objective.uncond_ratio,
             "flops_per_sample_no_dropout": f0, "step_times_s": [r["step_time"] for r in timed],
             "peak_mib": peak, "mfu_bar_pct": MFU_BAR}
    if mfu is not None:
        note, ok = bar_note("MFU", mfu, MFU_BAR, True, "%")
        notes.append(note)
        extra["mfu_bar_met"] = ok
    else:
        notes.append(f"MFU unknown (no bf16 peak for {device_name}; bar >= {MFU_BAR:g}% on the H200)")
    if peak is not None:
        notes.append(f"peak {peak:.0f} MiB")
    dname = str(dtype).replace("torch.", "")
    L = f0["tokens"]
    return [ModelRecord("lavin_dit_train", f"J-DiT {s.preset} {s.size}^2 {s.pairs} pairs ZeRO-{zero}",
                        f"[{mb} x {ga} samples, L {L}]", dname, "mmkernels (Trainer, DeepSpeed)", "train step", step_ms,
                        nbytes, int(flops / len(timed)), note="; ".join(notes), peak_mb=peak,
                        extra=extra).finish(ctx.copy_gbps)]
