"""``python -m bench``: kernel and end-to-end model benchmarks against named baselines, measured in one process.

    python -m bench [--quick] [--device auto|cpu|cuda] [--ops rms_norm,rope3d] [--models lavin_dit_sampling]
                    [--out results.json] [--md table.md]

With neither ``--ops`` nor ``--models`` it runs every op (bench/ops/) and then every model benchmark (bench/models/);
naming only one of the two runs only what it names.

On a CUDA device it times every available backend of every op and the baselines with CUDA events, and reports
GB/s and the percentage of the copy bandwidth measured in the same run. On the CPU it times the torch paths at
small sizes only and says so: kernel timings need a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from bench import common

OPS = ("rms_norm", "rope3d", "joint_attention", "adarn", "group_norm_silu", "causal_conv3d", "stvae", "ms_deform_attn",
       "mask_pool", "mask_nms")
MODELS = ("lavin_dit_sampling", "lavin_dit_train", "cris", "unpair_seg")  # bench/models/: end to end


def _names(p, flag: str, value, known) -> list[str]:
    names = [o.strip() for o in value.split(",") if o.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        p.error(f"{flag}: unknown name(s) {', '.join(unknown)}; expected a subset of {', '.join(known)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--models", default=None, help=f"end-to-end benchmarks, comma-separated subset of "
                                                  f"{','.join(MODELS)}")
    p.add_argument("--out", help="write the records and provenance as JSON")
    p.add_argument("--md", help="write the markdown table")
    args = p.parse_args(argv)

    if args.ops is None and args.models is None:
        ops, models = list(OPS), list(MODELS)
    else:
        ops = _names(p, "--ops", args.ops, OPS) if args.ops is not None else []
        models = _names(p, "--models", args.models, MODELS) if args.models is not None else []
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here")
    ctx = common.Context(torch.device(device), args.quick)
    if ctx.cuda:
        ctx.copy_gbps = common.measure_copy_gbps(ctx.device, ctx.quick)
    else:
        # One thread: with two OpenMP threads on a 2-core machine, any other load stalls every parallel region
        # for milliseconds, which swamps these small CPU timings.
        torch.set_num_threads(1)
        print("No GPU: timing the torch paths on the CPU at small sizes. Kernel timings need a GPU; these numbers "
              "say nothing about kernel speed.", flush=True)

    for op in ops:
        ctx.records += importlib.import_module(f"bench.ops.{op}").run(ctx)
    for model in models:
        ctx.records += importlib.import_module(f"bench.models.{model}").run(ctx)

    prov = common.provenance(ctx.device, ctx.copy_gbps)
    print(json.dumps(prov, indent=1))
    md = common.table(ctx.records)
    print(md)
    if args.out:
        common.write_json(args.out, prov, ctx.records)
        print(f"wrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    wrong = [r for r in ctx.records if "WRONG" in r.note]
    if wrong:
        print(f"{len(wrong)} measurement(s) came from implementations whose output disagrees with the reference",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
