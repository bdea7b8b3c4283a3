"""``python -m train.lavin_dit_demo``: the LaVin-DiT part of ``make demo`` (design.md §8).

Trains the tiny LaVin-DiT on ShapesWorld on this machine (CPU: a few minutes; DeepSpeed, one process) with
``train/configs/lavin_dit_tiny.yaml`` (stage 1 ST-VAE, stage 2 J-DiT), then answers held-out in-context queries of
every task of the config with the trained model (EMA weights) and with the untrained one (same VAE), and writes to
``<out>/lavin_dit/``:

* ``report.md``: per task the MSE to the true answer (the deciding metric) and PSNR, plus IoU for mask tasks, for
  the untrained model, the trained one and the VAE's own reconstruction of the answer (the ceiling any DiT can reach
  through this VAE); whether the trained model beats the untrained one; the loss curves;
* ``<task>.png``: [query | answer | untrained | trained] for the first query of each task (video tasks: every frame,
  one row per frame); ``loss_vae.png`` and ``loss_dit.png``;
* ``metrics.json``: all numbers, the timings and the config.

Held out: the evaluation scenes come from a ShapesWorld with another seed than the training data's.
:func:`run` returns the report as a markdown section for ``python -m train.demo``; the exit status is 0 when the
trained model beats the untrained one on every task's MSE, else 1.

Why MSE decides, not IoU: the untrained J-DiT leaves the noise latent almost as it is, and its decoded noise
thresholds (mean > 0) to a random half of the pixels, a mask whose IoU with a small object is its area fraction. A
briefly trained tiny model regresses towards the mean answer (mostly background), so its IoU can sit below that
chance level while its MSE is already far lower. The report shows both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image

from models.lavin_dit.pipeline import InContextPipeline, SampleConfig
from models.lavin_dit.stvae import STVAE
from train import lavin_dit
from train.data.lavin_tasks import BINARY_TASKS, InContextDataset, task_metrics
from train.data.shapes import ShapesWorld
from train.plot import line_chart

EVAL_SCENES = (2 ** 30, 2 ** 30 + 10_000)
EVAL_SEED = 12345


def primary_metric(task: str) -> tuple[str, bool]:
    """(metric name, higher is better) that decides a task: MSE to the true answer (see the module docstring)."""
    del task
    return "mse", False


def _frames_png(x: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T * H, W, 3] (frames stacked vertically)."""
    x = x if x.dim() == 4 else x[:, None]
    u = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # [3, T, H, W]
    return u.permute(1, 2, 3, 0).reshape(-1, x.shape[-1], 3).numpy()


def _curve(path: str, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value of ``key``) of the logged rows of a metrics.jsonl that have it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[key]) for r in rows if key in r]


@torch.no_grad()
def _reconstruct(vae: STVAE, x: torch.Tensor) -> torch.Tensor:
    x = x if x.dim() == 4 else x[:, None]
    return vae.decode(vae.encode(x[None]).mode())[0].clamp(-1, 1)


def evaluate(vae: STVAE, dits: dict, cfg: dict, queries: int, sample_steps: int) -> tuple[dict, dict]:
    """({task: {model: [per-query metric dicts]}}, {task: {name: first query's images}}) on held-out queries:
    ``queries`` per task, k = 2 pairs, every model in ``dits`` plus the VAE ceiling ("vae")."""
    d = cfg["data"]
    tasks = list(d.get("tasks") or [])
    world = ShapesWorld(seed=d.get("seed", 0) + 1, size=tuple(d["size"]))
    evalset = InContextDataset(world, tasks=tasks or None, k=2, length=max(1, len(tasks)) * queries,
                               frames=d.get("frames", 5), seed=EVAL_SEED, scenes=EVAL_SCENES)
    results: dict = {}
    images: dict = {}
    for i in range(len(evalset)):
        s = evalset[i]
        task, target = s["task"], s["target"]
        pairs = [(s["inputs"][j], s["targets"][j]) for j in range(s["inputs"].shape[0])]
        preds = {"vae": _reconstruct(vae, target)}
        for name, dit in dits.items():
            pipe = InContextPipeline(vae, dit)
            pred = pipe(pairs, s["query"], SampleConfig(steps=sample_steps, cfg_scale=1.5, seed=i),
                        target_frames=target.shape[1])
            preds[name] = pred if pred.dim() == 4 else pred[:, None]
        for name, pred in preds.items():
            m = task_metrics(task, pred, target)
            results.setdefault(task, {}).setdefault(name, []).append({k: float(v) for k, v in m.items()})
        if task not in images:
            images[task] = {"query": s["query"], "answer": target, **preds}
    return results, images


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def run(out_root: str, config: str = "train/configs/lavin_dit_tiny.yaml", vae_steps: Optional[int] = None,
        dit_steps: Optional[int] = None, queries: int = 16, sample_steps: int = 20) -> tuple[str, bool]:
    """Train, evaluate, write ``<out_root>/lavin_dit/``; return (the report as markdown with paths relative to
    ``out_root``, whether the trained model beats the untrained one on every task)."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    out = os.path.join(out_root, "lavin_dit")
    run_dir = os.path.join(out, "run")
    if vae_steps is not None:
        cfg["vae"]["train"]["steps"] = vae_steps
    if dit_steps is not None:
        cfg["train"]["steps"] = dit_steps
    for sec in (cfg["vae"]["train"], cfg["train"], *cfg["train"].get("stages", [])):
        if "steps" in sec:
            sec["save_every"] = min(sec.get("save_every", 10 ** 9), sec["steps"])
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    dataset = lavin_dit.build_dataset(cfg)
    vae = lavin_dit.train_vae(cfg, run_dir, dataset).float().cpu().eval()
    t_vae = time.time() - t0
    dit_untrained = lavin_dit.build_dit(cfg).eval()
    final = lavin_dit.train_dit(cfg, run_dir, vae, dataset)  # every resolution stage of cfg["train"]
    dit_trained = lavin_dit.load_final_dit(cfg, final).float().cpu().eval()  # EMA weights
    t_dit = time.time() - t0 - t_vae
    results, images = evaluate(vae, {"untrained": dit_untrained, "trained": dit_trained}, cfg, queries,
                               sample_steps)
    t_eval = time.time() - t0 - t_vae - t_dit

    rel = os.path.relpath(out, out_root)
    table = ["| task | MSE untrained | MSE trained | MSE VAE ceiling | trained better | PSNR untrained / trained (dB) "
             "| IoU untrained / trained / ceiling (masks) |", "|---|---|---|---|---|---|---|"]
    summary, all_better = {}, True
    for task, r in results.items():
        name, higher = primary_metric(task)
        u, t, c = (_mean(r[k], name) for k in ("untrained", "trained", "vae"))
        better = t > u if higher else t < u
        all_better &= better
        summary[task] = {k: {m: _mean(rows, m) for m in rows[0]} for k, rows in r.items()}
        summary[task]["primary"] = {"metric": name, "higher_is_better": higher, "trained_better": better}
        iou = " / ".join(f"{_mean(r[k], 'iou'):.3f}" for k in ("untrained", "trained", "vae")) \
            if task in BINARY_TASKS else "-"
        table.append(f"| {task} | {u:.4f} | {t:.4f} | {c:.4f} | {'yes' if better else 'NO'} | "
                     f"{_mean(r['untrained'], 'psnr'):.2f} / {_mean(r['trained'], 'psnr'):.2f} | {iou} |")
        strip = np.concatenate([_frames_png(images[task][k]) for k in ("query", "answer", "untrained", "trained")],
                               axis=1)
        Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(
            os.path.join(out, f"{task}.png"))
    vae_log = os.path.join(run_dir, "vae", "metrics.jsonl")
    # The total jumps when the adversarial terms switch on (disc_start): plot the reconstruction MSE instead.
    curves = {"vae": _curve(vae_log, "mse")}
    for s in lavin_dit.dit_stages(cfg, run_dir):
        curves[os.path.relpath(s.config.out_dir, run_dir)] = _curve(os.path.join(s.config.out_dir, "metrics.jsonl"))
    plots = []
    for key, title in (("vae", "ST-VAE reconstruction MSE (logged means; video steps from stage1_steps)"),):
        if curves[key]:
            plots.append(line_chart(os.path.join(out, "loss_vae.png"), {key: curves[key]}, title))
    dit_curves = {k: v for k, v in curves.items() if k != "vae" and v}
    if dit_curves:
        plots.append(line_chart(os.path.join(out, "loss_dit.png"), dit_curves,
                                "J-DiT flow-matching loss (velocity MSE + 0.1 L1)"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"metrics": summary, "all_tasks_better": all_better, "curves": curves,
                   "seconds": {"vae": t_vae, "dit": t_dit, "eval": t_eval}, "config": cfg}, f, indent=1)
    device = "GPU" if torch.cuda.is_available() else "CPU"
    dit_steps_total = sum(s.config.steps for s in lavin_dit.dit_stages(cfg, run_dir))
    lines = ["## LaVin-DiT (tiny) on ShapesWorld", "",
             f"Trained here ({device}, DeepSpeed, one process): ST-VAE {cfg['vae']['train']['steps']} steps "
             f"({t_vae:.0f} s), J-DiT {dit_steps_total} steps ({t_dit:.0f} s); evaluation {t_eval:.0f} s. "
             f"{queries} held-out queries per task, k = 2 example pairs, {sample_steps}-point Euler grid, CFG 1.5, "
             f"{cfg['data']['size'][0]}x{cfg['data']['size'][1]} images. Untrained = the same VAE with a freshly "
             "initialized J-DiT; VAE ceiling = the VAE's reconstruction of the true answer.", "", *table, "",
             f"Trained better than untrained on every task: **{'yes' if all_better else 'NO'}**.", "",
             "Predictions (query | answer | untrained | trained; video tasks one frame per row):", ""]
    lines += [f"![{task}]({rel}/{task}.png)" for task in results]
    lines += ["", "Loss curves:", ""] + [f"![loss]({rel}/{os.path.basename(p)})" for p in plots] + [""]
    section = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(section.replace(f"]({rel}/", "](") + "\n")
    return section, all_better


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="train/configs/lavin_dit_tiny.yaml")
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the config's ST-VAE steps")
    ap.add_argument("--dit-steps", type=int, default=None, help="override the config's J-DiT steps")
    ap.add_argument("--queries", type=int, default=16, help="evaluation queries per task")
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args(argv)
    section, ok = run(args.out, args.config, args.vae_steps, args.dit_steps, args.queries, args.sample_steps)
    print(section, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
