"""python -m bench: runs on the CPU, records provenance and every implementation, refuses unknown ops."""

import json
import math

import pytest

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
