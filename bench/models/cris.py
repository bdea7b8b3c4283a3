"""CRIS end to end (issue 7): inference latency and throughput at 416^2, and the training step, ours against an
official-style implementation with the same weights, in the same run.

Setting (GPU): the official RN50 config (word_len 17), seeded random weights (BN statistics included), images
[B, 3, 416, 416], random token ids with [SOT] ... [EOT] and zero padding. Inference at B = 1 (latency) and B = 64
(images/s); the training step at B = 8 (the official per-GPU batch: 64 global over 8 GPUs) and at B = 64.

Implementations:
  * "mmkernels (bf16)": models/cris/model.py in bf16 (the attention pool and the decoder's self-attention on
    mmkernels.joint_attention), eval mode; "mmkernels (bf16, compiled)" the same under torch.compile (GPU only).
  * "official-style (fp32)": models/cris/official_style.py ``spec_cris``: the official computation (sequence-first
    F.multi_head_attention_forward, unfused conv/BN, positional encodings rebuilt each call, grouped dynamic conv) in
    fp32, as the official validate/test run.
  * Training: ours = the model in train mode under bf16 autocast (fp32 master weights, Adam step included); the
    baseline = the same module in fp32 with every mmkernels op on its torch reference backend (unfused), as the
    official training runs without fused kernels (it uses fp16 autocast; fp32 here is the upper bound of its cost).
Output check: ours against official-style on the logits (rel err; bf16 tolerance 5e-2 through the whole network).
Timing: wall clock of whole calls with device synchronization, median of 5 after warm-up (``--quick``: 2).
Bars (H200): B = 1 latency <= 5 ms; B = 64 throughput >= 2x official-style.
Cost charged (for TFLOP/s): the conv and matmul FLOP of one forward counted with torch.utils.flop_counter on the
official-style computation; bytes: the weights once plus the images.
CPU: the tiny preset at 128^2 in fp32, B = 1 and 4: a smoke run of the same code; the bars do not apply.
"""

from __future__ import annotations

import math

import torch

from bench.common import Context, Record
from bench.models import ModelRecord, bar_note, median, peak_mib, wall_seconds
from mmkernels.testing import rel_err
from models.cris import CRIS, CRISConfig
from models.cris.official_style import spec_cris

LATENCY_BAR_MS = 5.0
THROUGHPUT_BAR = 2.0
OFFICIAL = "official-style (fp32)"


def randomize_(model: CRIS, seed: int) -> CRIS:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif t.dim() <= 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
    return model


def tokens(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, 49406, (B, L), generator=g)
    for b in range(B):
        n = int(torch.randint(4, L + 1, (1,), generator=g))
        tok[b, 0], tok[b, n - 1] = 49406, 49407
        tok[b, n:] = 0
    return tok


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run(ctx: Context) -> list[Record]:
    dev = ctx.device
    if ctx.cuda:
        cfg, dtype, batches, train_batches = CRISConfig.cris_r50(), torch.bfloat16, (1, 64), (8, 64)
    else:
        cfg, dtype, batches, train_batches = CRISConfig.tiny(input_size=128), torch.float32, (1, 4), (4,)
    reps = 2 if ctx.quick else 5
    S = cfg.input_size
    torch.manual_seed(0)
    base = randomize_(CRIS(cfg), 0).eval()
    sd32 = {k: v.to(dev) for k, v in base.state_dict().items()}
    ours = CRIS(cfg).eval()
    ours.load_state_dict(base.state_dict())
    ours = ours.to(dev, dtype)
    dname = str(dtype).replace("torch.", "")
    impls = {f"mmkernels ({dname})": ours}
    if ctx.cuda:
        impls[f"mmkernels ({dname}, compiled)"] = torch.compile(ours)
    weights_bytes = sum(v.numel() * v.element_size() for v in sd32.values())
    dname = str(dtype).replace("torch.", "")
    records: list[Record] = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        img = torch.randn(B, 3, S, S, generator=g).to(dev)
        tok = tokens(B, cfg.word_len, B).to(dev)

        def official():
            return spec_cris(sd32, img, tok, cfg)

        fns = {OFFICIAL: official}
        for label, m in impls.items():
            fns[label] = (lambda m=m: m(img.to(dtype), tok))
        with torch.no_grad():
            want = official()
            errs = {label: rel_err(fns[label]().float(), want) for label in impls}
            flops = _flops(official)
            times = {label: wall_seconds(fn, dev, reps) for label, fn in fns.items()}
            peaks = {label: peak_mib(fn, dev) for label, fn in fns.items()}
        t_off = median(times[OFFICIAL])
        case = f"{'RN50' if ctx.cuda else 'tiny'} inference B{B} {S}^2"
        nbytes = weights_bytes + img.numel() * 4
        for label in fns:
            secs = median(times[label])
            extra = {"batch": B, "seconds": secs, "images_per_s": B / secs, "samples_s": times[label],
                     "peak_mib": peaks[label]}
            notes = []
            if label != OFFICIAL:
                speedup = t_off / secs
                extra.update(speedup_vs_official=speedup, rel_err_vs_official=errs[label])
                if errs[label] > (5e-2 if dtype == torch.bfloat16 else 1e-3):
                    notes.append(f"WRONG: rel err {errs[label]:.2e} vs official-style")
                if ctx.cuda and B == 1:
                    n, ok = bar_note("latency", secs * 1e3, LATENCY_BAR_MS, False, " ms")
                    notes.append(n)
                    extra.update(latency_bar_ms=LATENCY_BAR_MS, latency_bar_met=ok)
                elif ctx.cuda and B == 64:
                    n, ok = bar_note("throughput vs official-style", speedup, THROUGHPUT_BAR, True, "x")
                    notes.append(n)
                    extra.update(throughput_bar=THROUGHPUT_BAR, throughput_bar_met=ok)
                else:
                    notes.append(f"{speedup:.2f}x vs official-style (CPU smoke run; the bars are for the H200)")
            else:
                notes.append("the reference of the output check")
            records.append(ModelRecord("cris", case, f"[{B}, 3, {S}, {S}] + tokens [{B}, {cfg.word_len}]", dname,
                                       label, "inference", secs * 1e3, nbytes, flops, note="; ".join(notes),
                                       rel_err=errs.get(label), peak_mb=peaks[label], extra=extra)
                           .finish(ctx.copy_gbps))
        del want
    records += _train_records(ctx, cfg, base, train_batches, reps)
    if ctx.cuda:
        torch.cuda.empty_cache()
    return records


def _train_records(ctx: Context, cfg: CRISConfig, base: CRIS, batches, reps: int) -> list[Record]:
    from mmkernels import use_backend

    dev = ctx.device
    records = []
    for B in batches:
        g = torch.Generator().manual_seed(100 + B)
        img = torch.randn(B, 3, cfg.input_size, cfg.input_size, generator=g).to(dev)
        tok = tokens(B, cfg.word_len, 100 + B).to(dev)
        mask = (torch.rand(B, 1, cfg.input_size, cfg.input_size, generator=g) > 0.7).float().to(dev)
        variants = {f"mmkernels ({'bf16 autocast' if ctx.cuda else 'fp32'})": ("auto", ctx.cuda),
                    "unfused torch ops (fp32)": ("torch", False)}
        times = {}
        for label, (backend, autocast) in variants.items():
            model = CRIS(cfg).to(dev).train()
            model.load_state_dict(base.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)

            def step(model=model, opt=opt, backend=backend, autocast=autocast):
                with use_backend(backend), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    _, _, loss = model(img, tok, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # warm-up
            times[label] = wall_seconds(step, dev, reps)
            del model, opt
        # Bytes charged: the fp32 weights read once plus the images and targets (a lower bound of the traffic).
        nbytes = sum(v.numel() * 4 for v in base.state_dict().values()) + img.numel() * 4 + mask.numel() * 4
        t_base = median(times["unfused torch ops (fp32)"])
        for label, samples in times.items():
            secs = median(samples)
            extra = {"batch": B, "seconds": secs, "samples_s": samples, "images_per_s": B / secs}
            note = "baseline" if label.startswith("unfused") else f"{t_base / secs:.2f}x vs unfused fp32"
            records.append(ModelRecord("cris", f"{'RN50' if ctx.cuda else 'tiny'} train step B{B}",
                                       f"[{B}, 3, {cfg.input_size}, {cfg.input_size}]", "bf16" if ctx.cuda else
                                       "float32", label, "train step (fwd+bwd+Adam)", secs * 1e3, nbytes, 0, note=note,
                                       extra=extra).finish(ctx.copy_gbps))
    return records
