"""The backend registry: selection rules, errors, and that backward follows the forward's backend."""

import pytest
import torch

import mmkernels
from mmkernels import BackendError, _backend, use_backend
from mmkernels.testing import triton_interpreted


def _op(experimental_cuda=False, cuda_ok=True, triton_ok=True):
    """A private op whose backends are sentinel objects, to test the selection rule without kernels."""
    op = _backend.Op("probe")
    for name in _backend.BACKENDS:
        op.register(_backend.Backend(name, module=f"probe.{name}"))
        op.backends[name]._impl = name  # the "module" resolve returns
    op.backends["cuda"].experimental = "untested" if experimental_cuda else None
    op.backends["cuda"].supports = lambda x: None if cuda_ok else "cuda says no"
    op.backends["triton"].supports = lambda x: None if triton_ok else "triton says no"
    return op


META = torch.empty(2, device="meta")  # not on the CPU, so auto considers every backend
CPU = torch.empty(2)


def test_auto_order_and_experimental():
    assert _op().resolve("auto", META) == "cuda"
    assert _op(experimental_cuda=True).resolve("auto", META) == "triton"
    assert _op(cuda_ok=False).resolve("auto", META) == "triton"
    assert _op(cuda_ok=False, triton_ok=False).resolve("auto", META) == "torch"


def test_auto_is_torch_for_cpu_tensors():
    assert _op().resolve("auto", CPU) == "torch"


def test_auto_looks_inside_tensor_lists():
    """Ops that take streams (joint_attention) pass lists of tensors: a GPU tensor in a list is not a CPU input."""
    assert _op().resolve("auto", [CPU, (CPU, CPU)]) == "torch"
    assert _op().resolve("auto", [CPU, (CPU, META)]) == "cuda"


def test_explicit_choice_never_falls_back():
    assert _op(experimental_cuda=True).resolve("cuda", META) == "cuda"  # experimental runs when named
    with pytest.raises(BackendError, match="backend 'triton' was requested but cannot run these inputs: triton says no"):
        _op(triton_ok=False).resolve("triton", META)


def test_missing_backend():
    op = _backend.Op("probe2")
    op.register(_backend.Backend("torch", module="probe"))
    with pytest.raises(BackendError, match="there is no 'cuda' backend"):
        op.resolve("cuda", META)


def test_env_var(monkeypatch):
    op = _op()
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    assert op.resolve("", META) == "triton"
    assert op.resolve("cuda", META) == "cuda"  # use_backend beats the environment
    monkeypatch.setenv("MMKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="environment variable MMKERNELS_BACKEND: expected one of auto"):
        op.resolve("", META)


def test_env_var_is_read_at_call_time(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("MMKERNELS_BACKEND", "cuda")
    with pytest.raises(BackendError, match="cuda"):
        mmkernels.rms_norm(x)
    monkeypatch.setenv("MMKERNELS_BACKEND", "torch")
    mmkernels.rms_norm(x)


def test_use_backend_nests_and_restores():
    assert _backend.requested_backend() == ""
    with use_backend("triton"):
        assert _backend.requested_backend() == "triton"
        with use_backend("TORCH "):
            assert _backend.requested_backend() == "torch"
        assert _backend.requested_backend() == "triton"
    assert _backend.requested_backend() == ""
    with pytest.raises(ValueError, match=r"use_backend\(name\): expected one of auto, cuda, triton, torch"):
        with use_backend("tensorrt"):
            pass


def test_duplicate_op_name():
    with pytest.raises(ValueError, match="already registered"):
        _backend.register_op("rms_norm")


def test_status_table_states():
    status = _op(experimental_cuda=True).status()
    assert status["torch"] == ("yes", [])
    assert status["cuda"][0] == "experimental"


@pytest.mark.skipif(not triton_interpreted(), reason="runs the Triton backend, which needs a GPU or the interpreter")
def test_backward_follows_forward_backend(monkeypatch):
    """Forward inside use_backend("triton"), backward outside it: the backward still runs the Triton kernels."""
    from mmkernels.ops.rms_norm import triton as rms_triton

    calls = []
    original = rms_triton.backward

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(rms_triton, "backward", counting)
    x = torch.randn(3, 16, requires_grad=True)
    with use_backend("triton"):
        y = mmkernels.rms_norm(x)
    y.sum().backward()
    assert calls == [1]


def test_registered_ops_have_all_three_backends():
    for name in ("rms_norm", "rope3d"):
        assert set(_backend.OPS[name].backends) == set(_backend.BACKENDS)
