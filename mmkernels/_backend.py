"""Backend registry and selection.

Every op offers up to three backends: ``torch`` (the plain-PyTorch reference, runs anywhere), ``triton`` and
``cuda`` (``mmkernels._C``). Each backend registers two checks with its op:

* ``available()``: can it run on this machine at all (Triton importable, ``_C`` built, a GPU present)?
* ``supports(*args)``: can it run *these* inputs (device, dtype, sizes)?

Both return ``None`` when the answer is yes, and otherwise a short reason, which ends up in error messages and in
the table of ``python -m mmkernels``.

Which backend runs is decided per call:

1. the innermost ``with mmkernels.use_backend(name):``, else
2. the environment variable ``MMKERNELS_BACKEND`` (read at call time), else
3. ``auto``.

``auto`` picks the first of cuda, triton, torch that is available, supports the inputs and is not experimental;
for inputs that are all on the CPU it is always torch (the Triton CPU interpreter exists for tests, not speed).
A backend whose kernels have never passed their tests on a GPU is registered ``experimental``: it runs only when
named. A named backend that cannot run the inputs raises :class:`BackendError`; it never silently falls back.

How this survives ``torch.compile``: the public functions read the context manager's choice (a ContextVar, which
dynamo guards on, so changing it recompiles) and pass it as a string argument into the custom op; the environment
variable and "auto" are resolved inside the op at run time, where the real tensors are. Forward and backward
receive the same string, so the backward follows the forward's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

BACKENDS = ("cuda", "triton", "torch")  # also auto's order of preference
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MMKERNELS_BACKEND"

_requested: contextvars.ContextVar[str] = contextvars.ContextVar("mmkernels_backend", default="")


class BackendError(RuntimeError):
    """A requested backend cannot run an op on the given inputs (or on this machine)."""


def _check_choice(name: Any, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in CHOICES:
        raise ValueError(f"{where}: expected one of {', '.join(CHOICES)}, got {name!r}")
    return name.strip().lower()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run mmkernels ops inside the block on backend ``name`` (auto, torch, triton or cuda).

    Nested blocks override outer ones; the environment variable ``MMKERNELS_BACKEND`` applies outside any block.
    """
    token = _requested.set(_check_choice(name, "mmkernels.use_backend(name)"))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend() -> str:
    """The backend chosen by the innermost ``use_backend`` block, or ``""`` when none is active.

    ``""`` means "decide at run time from MMKERNELS_BACKEND, else auto". Public op functions pass this string
    into their custom op unchanged.
    """
    return _requested.get()


def env_backend() -> str:
    """The backend named by ``MMKERNELS_BACKEND`` (default ``auto``), validated."""
    value = os.environ.get(ENV_VAR, "")
    return _check_choice(value, f"environment variable {ENV_VAR}") if value.strip() else "auto"


Reason = Optional[str]


def _always() -> Reason:
    return None


@dataclass
class Backend:
    """One backend of one op. ``module`` is imported lazily, so that Triton is imported only when used."""

    name: str
    module: str
    available: Callable[[], Reason] = _always
    supports: Callable[..., Reason] = lambda *a, **k: None
    experimental: Optional[str] = None  # why, when the backend must be named explicitly to run
    _impl: Any = field(default=None, repr=False)

    def impl(self) -> Any:
        if self._impl is None:
            self._impl = importlib.import_module(self.module)
        return self._impl


class Op:
    """The backends of one op, and the rule that picks one for a call."""

    def __init__(self, name: str):
        self.name = name
        self.backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKENDS:
            raise ValueError(f"unknown backend {backend.name!r} for op {self.name}; expected one of {BACKENDS}")
        self.backends[backend.name] = backend
        return backend

    def resolve(self, requested: str, *args: Any, **kwargs: Any) -> Any:
        """The implementation module to run ``args`` with, per ``requested`` ("" = environment, else auto)."""
        name = _check_choice(requested, f"mmkernels.{self.name} backend") if requested else env_backend()
        if name == "auto":
            if _all_cpu(args, kwargs):
                return self.backends["torch"].impl()
            skipped = []
            for bname in BACKENDS:
                be = self.backends.get(bname)
                if be is None:
                    continue
                why = be.experimental or be.available() or be.supports(*args, **kwargs)
                if why is None:
                    return be.impl()
                skipped.append(f"{bname}: {why}")
            raise BackendError(f"mmkernels.{self.name}: no backend can run these inputs ({'; '.join(skipped)})")
        be = self.backends.get(name)
        if be is None:
            raise BackendError(f"mmkernels.{self.name}: there is no {name!r} backend for this op "
                               f"(it has {', '.join(self.backends)})")
        why = be.available() or be.supports(*args, **kwargs)
        if why is not None:
            raise BackendError(f"mmkernels.{self.name}: backend {name!r} was requested but cannot run these "
                               f"inputs: {why}. Choose another with mmkernels.use_backend(...) or {ENV_VAR}.")
        return be.impl()

    def status(self) -> dict[str, tuple[str, list[str]]]:
        """backend -> (state, reasons) for this machine (not for particular inputs).

        state is "yes" (auto may pick it), "experimental" (runs only when named) or "no" (cannot run here).
        """
        out = {}
        for bname in BACKENDS:
            be = self.backends.get(bname)
            if be is None:
                out[bname] = ("no", ["not implemented"])
                continue
            why = be.available()
            reasons = [r for r in (why, f"experimental: {be.experimental}" if be.experimental else None) if r]
            out[bname] = ("no" if why else "experimental" if be.experimental else "yes", reasons)
        return out


def _tensors(values):
    """Every tensor in ``values``, looking inside lists and tuples (ops such as joint_attention take streams)."""
    import torch

    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _all_cpu(args, kwargs) -> bool:
    return all(t.device.type == "cpu" for t in _tensors((*args, *kwargs.values())))


OPS: dict[str, Op] = {}


def register_op(name: str) -> Op:
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = Op(name)
    return OPS[name]


# ----------------------------------------------------------------------------------------------------------------
# Machine-level availability, shared by every op.


def triton_available() -> Reason:
    try:
        importlib.import_module("triton")
    except ImportError as e:  # pragma: no cover - triton is a declared dependency on Linux
        return f"triton is not importable ({e})"
    if triton_interpreted():
        return None
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (or TRITON_INTERPRET=1 to run kernels on the CPU interpreter)"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_available() -> Reason:
    from mmkernels import _ext

    if _ext.C is None:
        return f"mmkernels._C is not built ({_ext.C_ERROR})"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU (mmkernels._C is built for {_ext.C.cuda_archs()})"
    return None


def triton_supports_tensors(*tensors, dtypes=None) -> Reason:
    """Device/dtype capability of the Triton backend: CUDA tensors, or CPU tensors under the interpreter."""
    import torch

    dtypes = dtypes or (torch.float32, torch.float16, torch.bfloat16)
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in dtypes:
            return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpreted():
            if t.dtype == torch.bfloat16:
                return "bfloat16 is not supported by the Triton CPU interpreter"
            continue
        return f"tensors on {t.device} need TRITON_INTERPRET=1 (Triton runs on CUDA tensors)"
    return None


def cuda_supports_tensors(*tensors, dtypes=None) -> Reason:
    """Device/dtype capability of the CUDA backend: CUDA tensors of a supported dtype on a compiled arch."""
    import torch

    from mmkernels import _ext

    dtypes = dtypes or (torch.float32, torch.float16, torch.bfloat16)
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"tensors on {t.device}: the cuda backend runs on CUDA tensors only"
        if t.dtype not in dtypes:
            return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
        why = _ext.arch_supported(t.device)
        if why:
            return why
    return None
