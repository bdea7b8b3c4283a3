"""Benchmark plumbing: timing, device ceilings, provenance, result records and tables.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). On the CPU, a plain
wall-clock median over repeated calls, clearly labelled: CPU numbers say nothing about kernel speed.

Ceilings: the nominal H100/H200 numbers from design.md §5, plus the device-to-device copy bandwidth *measured in
the same run*, so "% of copy" never rests on a datasheet.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Nominal dense bf16 matmul TFLOP/s and device-copy TB/s (design.md §5, measured on the lent machines).
NOMINAL = {
    "H200": {"tflops_bf16": 790.0, "copy_tbps": 4.3},
    "H100": {"tflops_bf16": 798.0, "copy_tbps": 3.0},
}


@dataclass
class Record:
    """One measured implementation on one case."""

    op: str
    case: str
    shape: str
    dtype: str
    impl: str  # e.g. "mmkernels[triton]", "F.rms_norm", "compiled reference"
    pass_: str  # "fwd" or "fwd+bwd"
    ms: float
    bytes: int
    flops: int
    gbps: float = 0.0
    tflops: float = 0.0
    pct_copy: Optional[float] = None  # of the copy bandwidth measured in this run
    note: str = ""
    rel_err: Optional[float] = None  # of the checked output against the expected value (measure)
    peak_mb: Optional[float] = None  # peak allocated memory of one call, when the benchmark measures it (GPU)

    def finish(self, copy_gbps: Optional[float]) -> "Record":
        self.gbps = self.bytes / (self.ms * 1e-3) / 1e9
        self.tflops = self.flops / (self.ms * 1e-3) / 1e12
        self.pct_copy = 100.0 * self.gbps / copy_gbps if copy_gbps else None
        return self


@dataclass
class Context:
    device: torch.device
    quick: bool
    copy_gbps: Optional[float] = None
    records: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def our_impls(ctx: Context, op: str, fn: Callable, *inputs) -> list[tuple[str, Callable, str]]:
    """(label, callable, note) for each of our backends of ``op`` that can run ``inputs`` here: triton and cuda on a
    GPU (cuda marked experimental until validated), the torch backend on the CPU. ``fn`` is the public op."""
    from mmkernels import _backend, use_backend

    out = []
    for b in ("triton", "cuda") if ctx.cuda else ("torch",):
        be = _backend.OPS[op].backends.get(b)  # not every op has every backend
        if be is not None and be.available() is None and be.supports(*inputs) is None:
            def run(*args, b=b):
                with use_backend(b):
                    return fn(*args)
            out.append((f"mmkernels[{b}]", run, "(experimental)" if be.experimental else ""))
    return out


def _check_err(actual, expected) -> float:
    """rel_err of one output, or the largest rel_err over the outputs when ``expected`` is a list/tuple of tensors
    (ops with several outputs, e.g. one per stream)."""
    from mmkernels.testing import rel_err

    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            raise ValueError(f"expected {len(expected)} outputs, got {type(actual).__name__}")
        return max((rel_err(a, e) for a, e in zip(actual, expected)), default=0.0)
    return rel_err(actual, expected)


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def measure(ctx: Context, *, op: str, case: str, shape: str, label: str, fn: Callable, args: tuple,
            grad_args: tuple[int, ...], dy, expected, note: str,
            cost: dict[str, tuple[int, int]], skip_errors: bool = False,
            tol: Optional[float] = None) -> list[Record]:
    """Check ``fn(*args)`` against ``expected`` (a wrong output is marked WRONG, never reported as a plain time),
    then time the forward and forward+backward (grads of the args at ``grad_args`` for upstream grad ``dy``).
    ``cost`` maps "fwd" and "fwd+bwd" to (bytes, flops). ``tol``: the allowed relative error, default the dtype's
    (mmkernels.testing.tolerance); a baseline with legitimately different rounding may be given more.

    Several outputs: ``fn`` may return a list/tuple of tensors; then ``expected`` and ``dy`` are lists/tuples of the
    same length (the check reports the largest relative error over the outputs).
    ``skip_errors``: an exception in the check or in a pass (a baseline that cannot run a shape, out of memory)
    gives a record with ms = NaN and note "skipped: <reason>" instead of propagating."""
    from mmkernels.testing import tolerance

    dtype = expected[0].dtype if isinstance(expected, (list, tuple)) else expected.dtype
    dname = str(dtype).replace("torch.", "")

    def skipped(pass_: str, e: BaseException) -> Record:
        if ctx.cuda and isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        nbytes, flops = cost[pass_]
        return Record(op, case, shape, dname, label, pass_, float("nan"), nbytes, flops,
                      note=f"{note} skipped: {_reason(e)}".strip()).finish(ctx.copy_gbps)

    try:
        err = _check_err(fn(*args), expected)
    except Exception as e:
        if not skip_errors:
            raise
        return [skipped(p, e) for p in ("fwd", "fwd+bwd")]
    if err > (tolerance(dtype) if tol is None else tol):
        note = f"{note} WRONG: rel err {err:.2e}".strip()
    gargs = tuple(a.detach().requires_grad_(True) if i in grad_args else a for i, a in enumerate(args))
    wrt = tuple(gargs[i] for i in grad_args)

    def fwd_bwd():
        torch.autograd.grad(fn(*gargs), wrt, dy)

    out = []
    for pass_, call in (("fwd", lambda: fn(*args)), ("fwd+bwd", fwd_bwd)):
        nbytes, flops = cost[pass_]
        try:
            ms = time_ms(call, ctx.device, ctx.quick)
        except Exception as e:
            if not skip_errors:
                raise
            out.append(skipped(pass_, e))
            continue
        out.append(Record(op, case, shape, dname, label, pass_, ms, nbytes, flops, note=note,
                          rel_err=err).finish(ctx.copy_gbps))
    return out


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200,
                                             return_mode="median"))
    fn()  # warm-up
    samples = []
    budget = 0.3 if quick else 1.5
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_copy_gbps(device: torch.device, quick: bool) -> Optional[float]:
    """Device-to-device copy bandwidth (read + write bytes per second), measured now. None on the CPU."""
    if device.type != "cuda":
        return None
    n = (256 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * n / (ms * 1e-3) / 1e9


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(device: torch.device, copy_gbps: Optional[float]) -> dict:
    import triton

    from mmkernels import _ext

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
        "mmkernels_C": _ext.C.cuda_archs() if _ext.C is not None else f"not built ({_ext.C_ERROR})",
        "device": "cpu: " + (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
        info["copy_gbps_measured"] = round(copy_gbps, 1) if copy_gbps else None
        info["nominal"] = next((v for k, v in NOMINAL.items() if k in props.name), None)
    return info


def table(records: list[Record]) -> str:
    """A markdown table of the records, grouped by op/case/pass, with speedup vs the first baseline in each group.
    A skipped record (ms NaN) shows "skipped" and gets no speedup."""
    head = "| op | case | dtype | pass | impl | ms | GB/s | TFLOP/s | % copy | speedup vs baseline |"
    lines = [head, "|" + "---|" * 10]
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.op, r.case, r.dtype, r.pass_), []).append(r)
    for (op, case, dtype, pass_), rs in groups.items():
        baseline = next((r for r in rs if not r.impl.startswith("mmkernels") and math.isfinite(r.ms)), None)
        for r in rs:
            ok = math.isfinite(r.ms)
            speed = f"{baseline.ms / r.ms:.2f}x vs {baseline.impl}" if baseline and ok and r is not baseline else ""
            pct = f"{r.pct_copy:.0f}%" if r.pct_copy is not None and ok else "-"
            nums = f"{r.ms:.4f} | {r.gbps:.0f} | {r.tflops:.1f}" if ok else "skipped | - | -"
            lines.append(f"| {op} | {case} {r.shape} | {dtype} | {pass_} | {r.impl}{' ' + r.note if r.note else ''} "
                         f"| {nums} | {pct} | {speed} |")
    return "\n".join(lines)


def write_json(path: str, prov: dict, records: list[Record]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = []
    for r in records:
        d = asdict(r)
        d["pass"] = d.pop("pass_")
        rows.append(d)
    with open(path, "w") as f:
        json.dump({"provenance": prov, "records": rows}, f, indent=1)
