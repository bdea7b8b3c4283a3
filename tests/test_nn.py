"""mmkernels.nn modules: state-dict compatibility, agreement with torch's own RMSNorm, autocast behaviour."""

import pytest
import torch

import mmkernels.nn as mnn
from mmkernels.ops.rope3d import reference as rope_ref
from mmkernels.testing import assert_close, randn


def test_rmsnorm_loads_torch_rmsnorm_state_and_matches_it():
    theirs = torch.nn.RMSNorm(40, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(randn((40,), shift=1.0))
    ours = mnn.RMSNorm(40, eps=1e-6)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn((3, 7, 40))
    assert_close(ours(x), theirs(x), dtype=torch.float32, what="vs torch.nn.RMSNorm")


def test_rmsnorm_without_affine_has_no_state():
    m = mnn.RMSNorm((64,), elementwise_affine=False)
    assert m.state_dict() == {} and m.weight is None
    x = randn((5, 64))
    assert_close(m(x), torch.nn.functional.rms_norm(x, (64,), eps=1e-6), dtype=torch.float32)


def test_rmsnorm_autocast_casts_input_like_apex():
    m = mnn.RMSNorm(32)
    with torch.no_grad():
        m.weight.copy_(randn((32,), shift=1.0))
    x = randn((4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    xb = x.to(torch.bfloat16).float()
    normed = (xb * torch.rsqrt(xb.square().mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(y, (normed.float() * m.weight.to(torch.bfloat16).float()).to(torch.bfloat16))


def test_rmsnorm_trains():
    m = mnn.RMSNorm(16)
    x = randn((8, 16))
    m(x).square().sum().backward()
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all() and m.weight.grad.abs().sum() > 0


def test_rmsnorm_rejects_multi_dim_shape():
    with pytest.raises(ValueError, match="last dim only"):
        mnn.RMSNorm((4, 8))


def test_rotary_module():
    m = mnn.RotaryEmbedding3D(64, split=(16, 24, 24))
    assert m.state_dict() == {}
    x = randn((2, 12, 3, 64))
    assert_close(m(x, (1, 3, 4), offsets=(1, 0, 0)),
                 rope_ref.rope3d(x.double(), (1, 3, 4), (16, 24, 24), 10000.0, (1, 0, 0)), dtype=torch.float32)
    with pytest.raises(ValueError, match="divisible by 6"):
        mnn.RotaryEmbedding3D(64)
    with pytest.raises(ValueError, match="3 even parts summing to head_dim=72"):
        mnn.RotaryEmbedding3D(72, split=(24, 24, 20))
