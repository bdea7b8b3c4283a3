"""End-to-end model benchmarks (``python -m bench --models lavin_dit_sampling,lavin_dit_train``).

Each module has ``run(ctx) -> list[Record]`` like bench/ops/*. Their records are :class:`ModelRecord`: a
:class:`bench.common.Record` (ms per end-to-end call, the bytes and FLOP charged to it, so GB/s and TFLOP/s come out
as for the ops) plus ``extra``, a dict of the model-level figures (seconds, speedups, tokens/s, MFU, the bars and
whether they are met), which ``write_json`` writes with the record.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bench.common import Record


@dataclass
class ModelRecord(Record):
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn``, each bracketed by device synchronizations (end-to-end latency:
    host work, launches and transfers included). The caller warms up first."""
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated memory during one call of ``fn`` above what was allocated before it (MiB); None on the CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def peak_tflops(device: torch.device) -> tuple[Optional[float], str]:
    """(dense bf16 TFLOP/s, device name) from bench.common.NOMINAL, keyed by the CUDA device name; None when the
    device is not in the table (the CPU, or another GPU)."""
    from bench.common import NOMINAL

    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, v in NOMINAL.items():
        if key in name:
            return v["tflops_bf16"], name
    return None, name


def bar_note(what: str, value: float, bar: float, higher_is_better: bool, unit: str = "") -> tuple[str, bool]:
    ok = value >= bar if higher_is_better else value <= bar
    op = ">=" if higher_is_better else "<="
    return f"{what} {value:.3g}{unit} (bar {op} {bar:g}{unit}: {'met' if ok else 'MISSED'})", ok
