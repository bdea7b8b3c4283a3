"""Parametrization shared by the op tests: which (backend, device) pairs and dtypes to run."""

import pytest
import torch

from mmkernels import use_backend
from mmkernels.testing import assert_close, backend_devices, dtypes_for


def backend_params():
    """pytest params (backend, device); CUDA-device cases carry the ``gpu`` marker (skipped without a GPU)."""
    return [
        pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
        for b, d in backend_devices()
    ]


def backend_dtype_params():
    """pytest params (backend, device, dtype) over every dtype each pair supports."""
    out = []
    for b, d in backend_devices():
        for dt in dtypes_for(b, d):
            name = str(dt).replace("torch.", "")
            out.append(pytest.param(b, d, dt, id=f"{b}-{d}-{name}",
                                    marks=[pytest.mark.gpu] if d == "cuda" else []))
    return out



def check_compiled(fn, inputs, backend: str, compiler: str) -> None:
    """``torch.compile(fn, fullgraph=True)`` (so any graph break fails) gives the eager value and input grads of the
    scalar ``fn(*inputs)`` on ``backend``."""
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    eager_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    with use_backend(backend):
        out = compiled(*comp_in)
        out.backward()
        ref = fn(*eager_in)
        ref.backward()
    assert_close(out, ref, dtype=torch.float32, what="compiled output")
    for i, (c, e) in enumerate(zip(comp_in, eager_in)):
        assert_close(c.grad, e.grad, dtype=torch.float32, what=f"compiled grad of input {i}")
