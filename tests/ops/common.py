"""Parametrization shared by the op tests: which (backend, device) pairs and dtypes to run."""

import pytest

from mmkernels.testing import backend_devices, dtypes_for


def backend_params():
    """pytest params (backend, device); CUDA-device cases carry the ``gpu`` marker (skipped without a GPU)."""
    return [
        pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
        for b, d in backend_devices(include_gpu=True)
    ]


def backend_dtype_params():
    """pytest params (backend, device, dtype) over every dtype each pair supports."""
    out = []
    for b, d in backend_devices(include_gpu=True):
        for dt in dtypes_for(b, d):
            name = str(dt).replace("torch.", "")
            out.append(pytest.param(b, d, dt, id=f"{b}-{d}-{name}",
                                    marks=[pytest.mark.gpu] if d == "cuda" else []))
    return out

