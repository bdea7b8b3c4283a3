"""Flow matching and Euler sampling (models/lavin_dit/flow.py, sampler.py) against the spec (§3) and closed forms."""

import pytest
import torch
from torch import nn

from mmkernels.testing import assert_close
from models.lavin_dit import flow, sampler

SPEC_20 = "0.0000, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.0500, 0.0524, 0.0730, 0.1148, " \
          "0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.8100, 1.0000"
# specs/lavin_dit.md §3, the 30- and 40-point literals as written there.
SPEC_30 = "0.0000, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.0250, 0.0286, 0.0321, 0.0357, 0.0393, 0.0429, 0.0464, 0.0500, 0.0511, 0.0600, 0.0779, 0.1049, 0.1410, 0.1862, 0.2403, 0.3036, 0.3759, 0.4573, 0.5477, 0.6472, 0.7557, 0.8733, 1.0000"
SPEC_40 = "0.0000, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237, 0.0263, 0.0289, 0.0316, 0.0342, 0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.0500, 0.0506, 0.0555, 0.0655, 0.0804, 0.1004, 0.1253, 0.1553, 0.1902, 0.2302, 0.2752, 0.3251, 0.3801, 0.4401, 0.5051, 0.5750, 0.6500, 0.7300, 0.8150, 0.9050, 1.0000"


def test_official_grids_bitwise():
    want = torch.tensor([float(v) for v in SPEC_20.split(",")], dtype=torch.float32)
    assert torch.equal(sampler.time_grid(20), want)
    for n, spec in ((30, SPEC_30), (40, SPEC_40)):
        g = sampler.time_grid(n)
        assert g.dtype == torch.float32 and torch.equal(g, torch.tensor([float(v) for v in spec.split(",")]))
        assert g[n // 2 - 1] == torch.tensor(0.05)  # the high-noise half ends at 0.05
    for n in (2, 7, 25, 64):
        g = sampler.time_grid(n)
        assert g.numel() == n and g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
    with pytest.raises(ValueError, match="num_points"):
        sampler.time_grid(1)


def test_euler_steps_and_official_dtypes():
    grid = sampler.time_grid(20)
    seen = []

    def v(y, t):
        seen.append((y.dtype, t.clone()))
        return torch.full_like(y, 2.0, dtype=torch.float32) * (1 + t.view(-1, 1))

    x = torch.randn(2, 3).to(torch.bfloat16)
    out = sampler.euler(v, x, grid)
    assert len(seen) == 19 and all(float(t[0]) < 1 for _, t in seen)  # never evaluated at t = 1
    assert seen[0][0] == torch.bfloat16 and all(d == torch.float32 for d, _ in seen[1:])  # fp32 state after step 0
    want = x.float()
    for k in range(19):
        want = want + (grid[k + 1] - grid[k]) * 2.0 * (1 + grid[k])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))
    assert sampler.euler(v, x, grid, official_dtypes=False).dtype == torch.float32


def test_flow_loss_and_path():
    x0, x1, t = torch.randn(3, 4, 2), torch.randn(3, 4, 2), torch.tensor([0.0, 0.5, 1.0])
    xt, u = flow.interpolate(x0, x1, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], x1[2]) and torch.allclose(xt[1], (x0[1] + x1[1]) / 2)
    assert torch.equal(u, x1 - x0)
    v = torch.randn(3, 4, 2)
    per = [((v[i] - u[i]) ** 2).mean() + 0.1 * (v[i] - u[i]).abs().mean() for i in range(3)]
    assert_close(flow.flow_loss(v, u), torch.stack(per).mean(), dtype=torch.float32, what="loss")


def test_sample_t():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(200_000, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02
    t2 = flow.sample_t(5, kind="uniform", shift=3.0, generator=torch.Generator().manual_seed(1))
    u = torch.rand(5, generator=torch.Generator().manual_seed(1))
    assert_close(t2, u / (u + 3 * (1 - u)), dtype=torch.float32, what="shifted t")
    with pytest.raises(ValueError, match="kind"):
        flow.sample_t(3, kind="beta")


def test_uncond_context_and_cfg():
    cond = torch.randn(2, 16, 5, 3, 3)
    null = flow.uncond_context(cond)
    assert null.shape == (2, 16, 2, 3, 3) and not null[:, :, 0].any() and torch.equal(null[:, :, 1], cond[:, :, -1])
    vc, vu = torch.randn(4), torch.randn(4)
    assert torch.equal(sampler.cfg_combine(vc, vu, 1.0), vc)
    assert_close(sampler.cfg_combine(vc, vu, 1.5), vu + 1.5 * (vc - vu), dtype=torch.float32, what="cfg")
    m = flow.drop_mask(100_000, 0.1, torch.Generator().manual_seed(0))
    assert abs(m.float().mean() - 0.1) < 0.01


def test_ema():
    model = nn.Linear(3, 2)
    ema = flow.EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    avg = ema.averaged(model)
    for n, p in avg.named_parameters():
        assert_close(p, 0.9 * start[n] + 0.1 * (start[n] + 1), dtype=torch.float32, what=n)
    other = flow.EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(ValueError, match="decay"):
        flow.EMA(model, decay=1.0)
