"""``python -m mmkernels``: versions, the compiled extension, and which backend runs which op on this machine."""

from __future__ import annotations

import importlib.metadata
import os
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import torch

    import mmkernels
    from mmkernels import _backend, _ext

    lines = [f"mmkernels {mmkernels.__version__}  ({os.path.dirname(mmkernels.__file__)})",
             f"python    {sys.version.split()[0]}",
             f"torch     {torch.__version__}  (CUDA {torch.version.cuda or 'none: CPU build'})",
             f"triton    {_version('triton')}"]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"device    {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("device    no CUDA GPU: ops run on the torch backend; Triton only under TRITON_INTERPRET=1")
    if _ext.C is not None:
        lines.append(f"_C        built for {_ext.C.cuda_archs()}; ops: {', '.join(_ext.C.compiled_ops())}")
    else:
        lines.append(f"_C        not built ({_ext.C_ERROR})")
    requested = os.environ.get(_backend.ENV_VAR)
    lines.append(f"backend   {_backend.ENV_VAR}={requested!r}" if requested else
                 f"backend   auto ({_backend.ENV_VAR} unset): the first validated backend of cuda, triton, torch "
                 "that supports the inputs")
    lines.append("")
    table = {name: op.status() for name, op in sorted(_backend.OPS.items())}
    width = max(len(n) for n in table) + 2
    lines.append("op".ljust(width) + " | ".join(b.ljust(10) for b in _backend.BACKENDS))
    notes: dict[tuple[str, str], list[str]] = {}  # (backend, reason) -> ops
    for name, status in table.items():
        cells = []
        for b in _backend.BACKENDS:
            state, reasons = status[b]
            cells.append(state.ljust(10))
            for r in reasons:
                notes.setdefault((b, r), []).append(name)
        lines.append(name.ljust(width) + " | ".join(cells))
    lines.append("")
    lines.append("yes = runs here and auto may pick it; experimental = runs only when named; no = cannot run here.")
    for (b, reason), ops in notes.items():
        lines.append(f"  {b} ({', '.join(ops)}): {reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
