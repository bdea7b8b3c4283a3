"""``python -m train.demo``: the main job, ``make demo`` (design.md §8).

1. ``python -m mmkernels``: versions and which backend runs which op on this machine;
2. ``python -m bench --quick`` on the available device (kernels against their baselines, and the model benchmarks);
3. each model trained at tiny size on ShapesWorld with DeepSpeed (on the CPU: a few minutes each), evaluated on
   held-out queries against its untrained self: LaVin-DiT (train/lavin_dit_demo.py), then CRIS
   (train/cris_demo.py: referring segmentation, which must also reach its own bar, held-out mIoU >= 0.5), then
   Unpair-Seg (train/unpair_seg_demo.py: a tiny CLIP pretrained here, stage 1 and stage 2 with held-out category
   words; class-agnostic mask AR, open-vocabulary mIoU and PQ on held-out scenes).

Everything lands in ``--out`` (default ``demo_out/``): ``report.md`` with all of it (backend table, benchmark table,
metrics, loss curves, prediction images), plus each part's own files. Exit status 0 when every part ran, every
trained model beats its untrained version on every task (Unpair-Seg: on AR@10, AR@100, mIoU and PQ), and CRIS
reaches its mIoU bar.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch


def _run(cmd: list[str], log: str) -> tuple[int, str]:
    """Run ``cmd`` (a python -m ... command line) from the repo root; tee its output to ``log``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + (("\n" + proc.stderr) if proc.returncode else "")
    with open(log, "w") as f:
        f.write(out)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        print(proc.stderr, end="", file=sys.stderr, flush=True)
    return proc.returncode, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--skip-bench", action="store_true", help="leave out python -m bench --quick")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the LaVin-DiT config's ST-VAE steps")
    ap.add_argument("--dit-steps", type=int, default=None, help="override the LaVin-DiT config's J-DiT steps")
    ap.add_argument("--queries", type=int, default=16, help="held-out evaluation queries per task")
    ap.add_argument("--cris-epochs", type=int, default=None, help="override the tiny CRIS config's epochs")
    ap.add_argument("--skip-cris", action="store_true", help="leave out the CRIS part")
    ap.add_argument("--skip-unpair-seg", action="store_true", help="leave out the Unpair-Seg part")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    py = sys.executable
    failures = []

    rc, backends = _run([py, "-m", "mmkernels"], os.path.join(out, "mmkernels.txt"))
    if rc:
        failures.append("python -m mmkernels")
    bench_md = "(skipped: --skip-bench)"
    if not args.skip_bench:
        md = os.path.join(out, "bench.md")
        rc, _ = _run([py, "-m", "bench", "--quick", "--out", os.path.join(out, "bench.json"), "--md", md],
                     os.path.join(out, "bench.log"))
        if rc or not os.path.exists(md):
            failures.append("python -m bench --quick")
            bench_md = f"python -m bench --quick failed (exit {rc}); see bench.log"
        else:
            with open(md) as f:
                bench_md = f.read()

    from train import lavin_dit_demo

    lavin_md, lavin_ok = lavin_dit_demo.run(out, vae_steps=args.vae_steps, dit_steps=args.dit_steps,
                                            queries=args.queries)
    if not lavin_ok:
        failures.append("LaVin-DiT: the trained model does not beat the untrained one on every task")

    cris_md = "## CRIS (tiny)\n\n(skipped: --skip-cris)\n"
    if not args.skip_cris:
        from train import cris_demo

        cris_md, cris_ok = cris_demo.run(out, epochs=args.cris_epochs)
        if not cris_ok:
            failures.append(f"CRIS: the trained model's held-out mIoU is below {cris_demo.BAR}")

    unpair_md = "## Unpair-Seg (tiny)\n\n(skipped: --skip-unpair-seg)\n"
    if not args.skip_unpair_seg:
        from train import unpair_seg_demo

        unpair_md, unpair_ok = unpair_seg_demo.run(out)
        if not unpair_ok:
            failures.append("Unpair-Seg: the trained model does not beat the untrained one on AR@10, AR@100, mIoU "
                            "and PQ")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'}, " \
                                                                             f"{os.cpu_count()} cores)"
    lines = ["# mmkernels demo", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {device}, {time.time() - t0:.0f} s in all.", "",
             "## Backends (`python -m mmkernels`)", "", "```", backends.strip(), "```", "",
             "## Benchmarks (`python -m bench --quick`)", "",
             "On a CPU these time only the torch paths at small sizes: kernel and model timings that mean something "
             "need a GPU (bench/results/).", "", bench_md.strip(), "", lavin_md, cris_md, unpair_md, "## Result", ""]
    lines += ["Every part ran, every trained model beat its untrained version"
              + ("" if args.skip_cris else " and CRIS reached its mIoU bar") + "."] if not failures else \
        [f"- FAILED: {f}" for f in failures]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"demo: wrote {os.path.join(out, 'report.md')} ({time.time() - t0:.0f} s)"
          + ("" if not failures else "; failed: " + "; ".join(failures)), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
