"""mmkernels.rope3d: every backend against the reference, forward and backward; an independent complex-number check
of the definition; official-style arithmetic; opcheck; compile; bad input."""

import cmath
import math

import pytest
import torch

import mmkernels
from mmkernels import BackendError, use_backend
from mmkernels.ops.rope3d import reference
from mmkernels.testing import assert_close, randn
from tests.ops.common import backend_dtype_params, backend_params, check_compiled

# (B, grid, H, D, split, offsets): LaVin-DiT's D=72 (24/24/24), D=64 with an explicit split, 80, 96, 128, a zero
# part, tiny D=6, negative and positive offsets, and a 32x32 spatial grid with a large temporal offset so that
# angles reach hundreds of radians.
CASES = [
    (2, (2, 3, 4), 3, 72, None, None),
    (1, (1, 5, 7), 2, 64, (16, 24, 24), None),
    (3, (3, 1, 1), 1, 6, None, (0, 0, 0)),
    (1, (2, 2, 3), 2, 80, (28, 26, 26), (3, -1, 5)),
    (2, (1, 4, 4), 2, 96, None, None),
    (1, (2, 2, 2), 1, 128, (0, 64, 64), None),
    (1, (2, 32, 32), 1, 24, (8, 8, 8), (300, 0, 0)),
]


def _ids(case):
    b, grid, h, d, split, off = case
    return f"B{b}-g{'x'.join(map(str, grid))}-H{h}-D{d}" + (f"-s{'_'.join(map(str, split))}" if split else "") + (
        f"-o{'_'.join(map(str, off))}" if off else "")


def _L(grid):
    return grid[0] * grid[1] * grid[2]


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params())
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(backend, device, dtype, case):
    B, grid, H, D, split, offsets = case
    x = randn((B, _L(grid), H, D), dtype, device)
    dy = randn((B, _L(grid), H, D), dtype, device)
    xr = x.clone().requires_grad_(True)
    with use_backend(backend):
        y = mmkernels.rope3d(xr, grid, split, offsets=offsets)
        y.backward(dy)
    s = split or reference.default_split(D)
    o = offsets or (0, 0, 0)
    xd = x.double().requires_grad_(True)
    y_ref = reference.rope3d(xd, grid, s, 10000.0, o)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, y_ref, dtype=dtype, what="y")
    assert_close(xr.grad, xd.grad, dtype=dtype, what="dx")


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_views_are_read_in_place(backend, device):
    """x as a view of a wider projection output [B, L, H*D + pad], and as a transposed [B, H, L, D] tensor."""
    B, grid, H, D = 2, (2, 2, 3), 3, 24
    L = _L(grid)
    proj = randn((B, L, H * D + 8), torch.float32, device)
    x = proj[..., 4:4 + H * D].unflatten(-1, (H, D))
    assert not x.is_contiguous()
    xt = randn((B, H, L, D), torch.float32, device).transpose(1, 2)
    with use_backend(backend):
        for v in (x, xt):
            assert_close(mmkernels.rope3d(v, grid), reference.rope3d(v.double(), grid, (8, 8, 8)),
                         dtype=torch.float32, what="strided view")


def test_definition_by_complex_rotation():
    """Independent check of the definition: each (x_i, x_{i+d/2}) pair is the complex number x_i + j*x_{i+d/2}
    multiplied by exp(j * coord * base**(-2i/d)), with coord the token's t, h or w position."""
    grid, split, base, offsets = (2, 3, 2), (4, 6, 2), 100.0, (1, 0, 2)
    T, Hg, Wg = grid
    x = randn((1, T * Hg * Wg, 1, sum(split)), torch.float64)
    y = reference.rope3d(x, grid, split, base, offsets)
    for n in range(T * Hg * Wg):
        coords = (n // (Hg * Wg) + offsets[0], (n // Wg) % Hg + offsets[1], n % Wg + offsets[2])
        start = 0
        for axis, d in enumerate(split):
            for i in range(d // 2):
                z = complex(x[0, n, 0, start + i], x[0, n, 0, start + i + d // 2])
                rot = z * cmath.exp(1j * coords[axis] * base ** (-2 * i / d))
                assert math.isclose(y[0, n, 0, start + i].item(), rot.real, abs_tol=1e-5)
                assert math.isclose(y[0, n, 0, start + i + d // 2].item(), rot.imag, abs_tol=1e-5)
            start += d


def test_inverse_undoes_forward():
    x = randn((2, 24, 2, 36), torch.float64)
    y = reference.rope3d(x, (2, 3, 4), (12, 12, 12))
    # cos and sin are fp32 values (as in the official code), so the round trip is exact to ~fp32 precision.
    assert_close(reference.rope3d(y, (2, 3, 4), (12, 12, 12), inverse=True), x, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_style_arithmetic_agrees(dtype):
    """The official arithmetic (bf16 tables, rounding after each op, split/cat) stays within dtype tolerance of ours."""
    x = randn((2, 2 * 4 * 4, 4, 72), dtype)
    official = reference.rope3d_official_style(x, (2, 4, 4), (24, 24, 24))
    with use_backend("torch"):
        ours = mmkernels.rope3d(x, (2, 4, 4))
    assert_close(ours, official, dtype=dtype, what="ours vs official-style")


def test_default_split_and_suggestion():
    assert reference.default_split(72) == (24, 24, 24)
    assert reference.suggest_split(64) == (20, 22, 22)
    for d in (2, 4, 8, 10, 64, 70, 128):
        s = reference.suggest_split(d)
        assert sum(s) == d and all(p % 2 == 0 and p >= 0 for p in s)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty(backend, device):
    with use_backend(backend):
        assert mmkernels.rope3d(torch.empty(0, 6, 2, 12, device=device), (1, 2, 3)).shape == (0, 6, 2, 12)
        assert mmkernels.rope3d(torch.empty(2, 0, 2, 12, device=device), (0, 2, 3)).shape == (2, 0, 2, 12)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    x = randn((2, 12, 3, 24), torch.float32, device)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.mmkernels.rope3d.default,
                              (x, [2, 2, 3], [8, 8, 8], 10000.0, [0, 1, 2], inverse, backend))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_torch_compile_fullgraph(backend, device, compiler):
    def attn_logits(q, k):
        q = mmkernels.rope3d(q, (2, 2, 2))
        k = mmkernels.rope3d(k, (2, 2, 2))
        return torch.einsum("blhd,bmhd->bhlm", q, k).square().mean()

    check_compiled(attn_logits, (randn((2, 8, 2, 18), torch.float32, device),
                                 randn((2, 8, 2, 18), torch.float32, device)), backend, compiler)


class TestBadInput:
    x = torch.randn(2, 24, 3, 72)

    def test_rank(self):
        with pytest.raises(ValueError, match=r"'x' must have 4 dims"):
            mmkernels.rope3d(torch.randn(24, 3, 72), (2, 3, 4))

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="floating-point"):
            mmkernels.rope3d(torch.ones(2, 24, 3, 72, dtype=torch.int64), (2, 3, 4))

    def test_grid_does_not_cover_L(self):
        with pytest.raises(ValueError, match=r"grid \(2, 3, 3\) holds 18 tokens, but x has L=24"):
            mmkernels.rope3d(self.x, (2, 3, 3))

    def test_grid_length(self):
        with pytest.raises(TypeError, match="'grid' must be a sequence of 3 ints"):
            mmkernels.rope3d(self.x, (6, 4))

    def test_grid_negative(self):
        with pytest.raises(ValueError, match="'grid' must hold ints >= 0"):
            mmkernels.rope3d(self.x, (-2, -3, 4))

    def test_odd_split(self):
        with pytest.raises(ValueError, match="even"):
            mmkernels.rope3d(self.x, (2, 3, 4), split=(23, 25, 24))

    def test_split_sum(self):
        with pytest.raises(ValueError, match=r"sums to 70, but the head dim \(x.shape\[-1\]\) is 72"):
            mmkernels.rope3d(self.x, (2, 3, 4), split=(24, 24, 22))

    def test_default_split_needs_multiple_of_6(self):
        with pytest.raises(ValueError, match=r"divisible by 6.*\(20, 22, 22\)"):
            mmkernels.rope3d(torch.randn(1, 24, 1, 64), (2, 3, 4))

    def test_base(self):
        with pytest.raises(ValueError, match="'base' must be > 0"):
            mmkernels.rope3d(self.x, (2, 3, 4), base=0.0)

    def test_offsets(self):
        with pytest.raises(TypeError, match="'offsets' must be a sequence of 3 ints"):
            mmkernels.rope3d(self.x, (2, 3, 4), offsets=(1, 2))
        with pytest.raises(TypeError, match=r"'offsets\[1\]' must be an int"):
            mmkernels.rope3d(self.x, (2, 3, 4), offsets=(1, 2.5, 0))

    def test_cuda_backend_on_cpu_tensors(self):
        with use_backend("cuda"), pytest.raises(BackendError, match="rope3d: backend 'cuda' was requested"):
            mmkernels.rope3d(self.x, (2, 3, 4))
