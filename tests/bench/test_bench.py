"""python -m bench: runs on the CPU, records provenance and every implementation, refuses unknown ops."""

import json
import math

import pytest
import yaml

from bench import __main__ as bench_main
from bench.common import Record, table


def test_cpu_quick_run_writes_records(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--out", str(out), "--md", str(tmp_path / "r.md")]) == 0
    assert "Kernel timings need a GPU" in capsys.readouterr().out
    data = json.loads(out.read_text())
    prov = data["provenance"]
    for key in ("date", "commit", "command", "torch", "triton", "device", "mmkernels_C"):
        assert prov[key], key
    impls = {(r["op"], r["impl"], r["pass"]) for r in data["records"]}
    for op, baseline in (("rms_norm", "F.rms_norm"), ("rope3d", "official split/cat"),
                         ("joint_attention", "official unfused (SDPA)")):
        for p in ("fwd", "fwd+bwd"):
            assert (op, baseline, p) in impls and (op, "mmkernels[torch]", p) in impls
    assert all(r["ms"] > 0 and r["gbps"] > 0 and "WRONG" not in r["note"] for r in data["records"])
    assert "| rms_norm |" in (tmp_path / "r.md").read_text()


def test_cpu_quick_joint_attention(tmp_path):
    """The joint attention bench on the CPU: our torch backend and the official-style path, both passes, checked."""
    out = tmp_path / "ja.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--ops", "joint_attention", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["op"] for r in records} == {"joint_attention"}
    by = {(r["impl"], r["pass"]): r for r in records}
    for impl in ("mmkernels[torch]", "official unfused (SDPA)"):
        for p in ("fwd", "fwd+bwd"):
            r = by[(impl, p)]
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0, r
            assert r["rel_err"] is not None and r["rel_err"] < 1e-4 and "WRONG" not in r["note"], r
    fwd = by[("mmkernels[torch]", "fwd")]
    assert by[("mmkernels[torch]", "fwd+bwd")]["flops"] == fwd["flops"] * 7 // 2  # backward = 2.5x forward


def test_measure_skips_a_failing_baseline_and_checks_lists():
    """skip_errors records the reason instead of raising; list outputs are checked per output."""
    import torch

    from bench.common import Context, measure

    ctx = Context(torch.device("cpu"), quick=True)
    x = torch.randn(4, 8)
    kw = dict(op="op", case="c", shape="[4, 8]", args=(x,), grad_args=(0,), note="",
              cost={"fwd": (1, 1), "fwd+bwd": (2, 2)})

    def broken(a):
        raise RuntimeError("no kernel for this shape\nmore detail")

    recs = measure(ctx, label="broken", fn=broken, dy=x, expected=x, skip_errors=True, **kw)
    assert [r.pass_ for r in recs] == ["fwd", "fwd+bwd"]
    assert all(math.isnan(r.ms) and "skipped: RuntimeError: no kernel for this shape" in r.note for r in recs)
    assert "skipped" in table(recs)
    with pytest.raises(RuntimeError):
        measure(ctx, label="broken", fn=broken, dy=x, expected=x, **kw)

    recs = measure(ctx, label="pair", fn=lambda a: [a * 2, a + 1], dy=(x, x), expected=[x * 2, x + 1.5], **kw)
    assert all("WRONG" in r.note and math.isfinite(r.ms) for r in recs)


def test_unknown_op_is_an_error():
    with pytest.raises(SystemExit):
        bench_main.main(["--ops", "softmax", "--device", "cpu"])


def test_record_arithmetic_and_speedup_column():
    base = Record("op", "c", "[1]", "bfloat16", "F.base", "fwd", ms=2.0, bytes=4_000_000_000, flops=0).finish(4000.0)
    ours = Record("op", "c", "[1]", "bfloat16", "mmkernels[triton]", "fwd", ms=1.0, bytes=4_000_000_000,
                  flops=0).finish(4000.0)
    assert base.gbps == pytest.approx(2000.0) and base.pct_copy == pytest.approx(50.0)
    assert "2.00x vs F.base" in table([base, ours])


def test_tune_script_needs_a_gpu(capsys):
    """The joint-attention block-size sweep is GPU-only and says so (exit code 2) instead of timing the CPU."""
    import torch

    from bench import tune_joint_attention

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only refusal")
    assert tune_joint_attention.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cpu_quick_stvae(tmp_path):
    """The ST-VAE end-to-end bench on the CPU: ours and the official-style composition, encode and decode, checked."""
    out = tmp_path / "vae.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--ops", "stvae", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    by = {(r["impl"], r["pass"]): r for r in records}
    for impl in ("mmkernels", "official-style"):
        for p in ("encode", "decode"):
            r = by[(impl, p)]
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0, r
            assert r["rel_err"] is not None and r["rel_err"] < 1e-4 and "WRONG" not in r["note"], r
    assert by[("mmkernels", "encode")]["flops"] == by[("official-style", "encode")]["flops"]
    assert any(r["case"].startswith("streamed decode") for r in records)


def test_causal_conv3d_cases_are_the_stvae_convs(tmp_path):
    """Every 3x3x3 conv the official ST-VAE runs on a 17-frame 512^2 or 256^2 video (encoder and decoder, found with a
    hook on a meta-device run) is a benchmark case, and nothing else is; the CPU record carries the peak-bar
    denominator (input + output + weights)."""
    import torch
    import torch.nn.functional as F

    from bench.ops import causal_conv3d as cc
    from models.lavin_dit.stvae import STVAE, STVAEConfig

    with torch.device("meta"):
        vae = STVAE(STVAEConfig.official(), fused=False).eval()
    seen, orig = set(), F.conv3d

    def hook(x, w, b=None, *args, **kwargs):
        y = orig(x, w, b, *args, **kwargs)
        if tuple(w.shape[2:]) == (3, 3, 3):
            seen.add((w.shape[1], w.shape[0], tuple(y.shape[2:])))
        return y

    F.conv3d = hook
    try:
        with torch.no_grad():
            for size in (512, 256):
                vae.decode(vae.encode(torch.empty(1, 3, 17, size, size, device="meta")).mode())
    finally:
        F.conv3d = orig
    assert seen == {(cin, cout, size) for _, cin, cout, size in cc.CASES}
    assert len({name for name, *_ in cc.CASES}) == len(cc.CASES) and len(seen) == len(cc.CASES)
    assert any(name.startswith("dec") for name, *_ in cc.QUICK)

    out = tmp_path / "cc.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--ops", "causal_conv3d", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    (_, cin, cout, (T, H, W)), = cc.CPU
    fwd = 4 * (cin * T * H * W + cout * cin * 27 + cout + cout * T * H * W)
    for r in records:
        assert r["extra"]["io_weights_bytes"] == (fwd if r["pass"] == "fwd" else 2 * fwd), r
        assert "peak_ratio" not in r["extra"]  # measured on a GPU only


def _models_json(tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--models", name, "--out", str(out)]) == 0
    return json.loads(out.read_text())["records"]


def test_cpu_quick_lavin_dit_sampling(tmp_path):
    """The end-to-end sampling bench on the CPU (tiny presets): ours and the official-style implementation, timed,
    with the speedup computed and ours equal to official-style within 1e-3 (fp32)."""
    records = _models_json(tmp_path, "lavin_dit_sampling")
    assert {r["op"] for r in records} == {"lavin_dit_sampling"}
    by = {r["impl"]: r for r in records}
    assert set(by) == {"mmkernels", "mmkernels (batched CFG)", "official-style (unfused, SDPA)"}
    ours, off = by["mmkernels"], by["official-style (unfused, SDPA)"]
    batched = by["mmkernels (batched CFG)"]
    assert batched["extra"]["sample_config"] == {"cfg_mode": "batched"} and batched["rel_err"] < 1e-3, batched
    for r in (ours, off, batched):
        assert r["dtype"] == "float32" and r["pass"] == "sample (end to end)"
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0, r
        assert r["tflops"] > 0 and "WRONG" not in r["note"], r
        assert r["extra"]["seconds"] == pytest.approx(r["ms"] / 1e3)
        assert r["extra"]["dit_passes"] == 2 * (r["extra"]["grid_points"] - 1) == 4
    assert ours["flops"] == off["flops"] and ours["bytes"] == off["bytes"]  # the same cost charged to both
    sp = ours["extra"]["speedup_vs_official"]
    assert math.isfinite(sp) and sp > 0 and sp == pytest.approx(off["ms"] / ours["ms"])
    assert ours["rel_err"] is not None and ours["rel_err"] < 1e-3, ours
    assert ours["extra"]["dit_pass_rel_err"] < 1e-3
    assert "x vs official-style" in ours["note"]


def test_cpu_quick_lavin_dit_train(tmp_path):
    """The training-throughput bench on the CPU: the shared Trainer (DeepSpeed ZeRO-2, one gloo process, fp32) on the
    tiny preset; finite step time, tokens/s and FLOP consistent with the counted passes; no MFU without a peak."""
    from bench.models.lavin_dit_train import jdit_flops
    from models.lavin_dit.config import JDiTConfig

    (r,) = _models_json(tmp_path, "lavin_dit_train")
    x = r["extra"]
    assert r["op"] == "lavin_dit_train" and r["dtype"] == "float32" and r["pass"] == "train step"
    assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0, r
    assert x["zero_stage"] == 2 and x["world_size"] == 1 and x["grad_checkpointing"] is True
    assert x["steps_timed"] == len(x["step_times_s"]) >= 2
    assert x["step_s"] == pytest.approx(sum(x["step_times_s"]) / x["steps_timed"])
    assert x["tokens_per_s"] == pytest.approx(x["tokens_per_step"] / x["step_s"])
    assert r["tflops"] == pytest.approx(x["achieved_tflops"])
    assert x["mfu_pct"] is None and "MFU unknown" in r["note"]
    # 2 pairs at 32^2 on the tiny config's model: 6 frames of 2x2 tokens; a CFG-dropped sample runs the 3-frame null
    # context. With d dropped samples of the 2 in a step: tokens 2*24 - 12*d, FLOP (2 - d)*full + d*null.
    with open("train/configs/lavin_dit_tiny.yaml") as f:
        model = dict(yaml.safe_load(f)["model"])
    cfg = JDiTConfig.preset(model.pop("preset"), **model, grad_checkpointing=True)
    full, null = jdit_flops(cfg, 5, 1, 2, 2), jdit_flops(cfg, 2, 1, 2, 2)
    assert (full["tokens"], null["tokens"]) == (24, 12) and x["flops_per_sample_no_dropout"] == full
    d = (48 - x["tokens_per_step"]) / 12  # mean dropped samples per timed step
    assert 0 <= d <= 2
    assert x["flops_per_step"] == pytest.approx((2 - d) * full["train"] + d * null["train"])
    assert r["flops"] == int(x["flops_per_step"])


@pytest.mark.parametrize("overrides,Tc,Tx,H,W", [({}, 3, 1, 2, 3), ({"kv_group": 1, "depth": 3}, 2, 2, 3, 2)])
def test_jdit_flop_count_matches_the_flop_counter(overrides, Tc, Tx, H, W):
    """bench/models/lavin_dit_train.py's FLOP formula equals torch's FlopCounterMode on the official-style J-DiT with
    SDPA's math path (plain matmuls): forward = formula + the last block's cond-stream update (computed by the
    official code, skipped by ours), and forward + backward = 3x forward - the input grads of the data-fed layers
    (that update has no backward: nothing depends on it)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models.lavin_dit_train import jdit_flops
    from models.lavin_dit.config import JDiTConfig
    from models.lavin_dit.jdit import JDiT
    from models.lavin_dit.official_style import OfficialStyleJDiT

    cfg = JDiTConfig.preset("tiny", **overrides)
    model = OfficialStyleJDiT(JDiT(cfg))
    B = 2
    x, cond = torch.randn(B, Tx, H, W, cfg.patch_dim), torch.randn(B, Tc, H, W, cfg.patch_dim)
    t = torch.rand(B)
    f = jdit_flops(cfg, Tc, Tx, H, W)
    assert f["tokens"] == (Tc + Tx) * H * W
    assert f["forward"] == f["linear_tokens"] + f["linear_vectors"] + f["attention"]
    with sdpa_kernel([SDPBackend.MATH]):
        with FlopCounterMode(display=False) as fwd:
            model(x, t, cond)
        with FlopCounterMode(display=False) as both:
            model(x, t, cond).square().sum().backward()
    assert fwd.get_total_flops() == B * (f["forward"] + f["skipped"])
    assert both.get_total_flops() == B * (f["train"] + f["skipped"])


def test_official_style_jdit_matches_the_spec_and_ours():
    """models/lavin_dit/official_style.py: the official composition on our JDiT's weights equals the spec's fp64
    composition (tests/models/test_jdit.py) and our fused model (fp32); forward_with_cfg is the official two-pass
    guidance on a [2B] state."""
    import torch

    from mmkernels.testing import rel_err
    from models.lavin_dit.jdit import patchify
    from models.lavin_dit.official_style import OfficialStyleJDiT
    from models.lavin_dit.sampler import cfg_combine
    from tests.models.test_jdit import TINY, _f_forward, _randomized

    model = _randomized(TINY).double()
    off = OfficialStyleJDiT(model)
    assert {n for n, _ in off.named_parameters()} == {f"model.{n}" for n, _ in model.named_parameters()}
    x = torch.randn(2, 1, 2, 3, TINY.patch_dim, dtype=torch.float64)
    cond = torch.randn(2, 3, 2, 3, TINY.patch_dim, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    assert rel_err(off(x, t, cond), _f_forward(sd, TINY, x, t, cond)) < 1e-6
    model.float()
    x, cond, t = x.float(), cond.float(), t.float()
    assert rel_err(off(x, t, cond), model(x, t, cond)) < 1e-5
    # forward_with_cfg: channels-first latents, conditional half first, contexts of different lengths.
    lat = torch.randn(1, 16, 1, 4, 6)
    c_full, c_null = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 16, 2, 4, 6)
    tt = torch.full((2,), 0.25)
    out = off.forward_with_cfg(lat.repeat(2, 1, 1, 1, 1), tt, (c_full, c_null), 1.5)
    want = cfg_combine(model(patchify(lat, 2), tt[:1], patchify(c_full, 2)),
                       model(patchify(lat, 2), tt[:1], patchify(c_null, 2)), 1.5)
    assert out.shape == (2, 16, 1, 4, 6)
    assert rel_err(out[:1], want) < 1e-5 and torch.equal(out[0], out[1])


def test_cpu_quick_ms_deform_attn(tmp_path):
    """The MSDA bench on the CPU: our torch backend (atomic and deterministic backward) against grid_sample, checked."""
    out = tmp_path / "msda.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--ops", "ms_deform_attn", "--out", str(out)]) == 0
    by = {(r["impl"], r["pass"]): r for r in json.loads(out.read_text())["records"]}
    for impl in ("grid_sample", "mmkernels[torch]", "mmkernels[torch] deterministic"):
        for p in ("fwd", "fwd+bwd"):
            r = by[(impl, p)]
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0, r
            assert r["rel_err"] < 1e-4 and "WRONG" not in r["note"], r


def test_cpu_quick_cris(tmp_path):
    """The CRIS end-to-end bench on the CPU (tiny preset): ours equal to the official-style computation (fp32),
    inference at two batch sizes and the training step timed."""
    records = _models_json(tmp_path, "cris")
    inf = [r for r in records if r["pass"] == "inference"]
    assert {r["extra"]["batch"] for r in inf} == {1, 4}
    for r in inf:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["flops"] > 0 and "WRONG" not in r["note"], r
        if r["impl"] != "official-style (fp32)":
            assert r["rel_err"] < 1e-3 and r["extra"]["speedup_vs_official"] > 0, r
    train = [r for r in records if r["pass"].startswith("train step")]
    assert len(train) == 2 and all(r["ms"] > 0 for r in train)


def test_cpu_quick_unpair_seg(tmp_path):
    """The Unpair-Seg end-to-end bench on the CPU (tiny preset): stage-1 grid inference equal to the official-style
    path (same proposals), and the stage-2 region embeddings equal to interpolate + einsum pooling."""
    records = _models_json(tmp_path, "unpair_seg")
    stage1 = [r for r in records if "stage-1" in r["case"]]
    assert {r["impl"] for r in stage1} == {"mmkernels (fp32)", "official-style"}
    for r in stage1:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and "DIFFERS" not in r["note"], r
        assert r["extra"]["prompts"] == 64
    ours = next(r for r in stage1 if r["impl"] == "mmkernels (fp32)")
    assert ours["extra"]["proposals"] == ours["extra"]["proposals_official"] >= 1
    assert ours["extra"]["proposal_iou_vs_official"] == 1.0
    region = [r for r in records if "stage-2" in r["case"]]
    assert len(region) == 2
    r = next(r for r in region if r["impl"].startswith("mmkernels"))
    assert r["extra"]["min_cosine_vs_official"] > 0.9999 and "DIFFERS" not in r["note"], r
