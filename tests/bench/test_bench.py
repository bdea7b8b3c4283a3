"""python -m bench: runs on the CPU, records provenance and every implementation, refuses unknown ops."""

import json

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
    for op, baseline in (("rms_norm", "F.rms_norm"), ("rope3d", "official split/cat")):
        for p in ("fwd", "fwd+bwd"):
            assert (op, baseline, p) in impls and (op, "mmkernels[torch]", p) in impls
    assert all(r["ms"] > 0 and r["gbps"] > 0 and "WRONG" not in r["note"] for r in data["records"])
    assert "| rms_norm |" in (tmp_path / "r.md").read_text()


def test_unknown_op_is_an_error():
    with pytest.raises(SystemExit):
        bench_main.main(["--ops", "softmax", "--device", "cpu"])


def test_record_arithmetic_and_speedup_column():
    base = Record("op", "c", "[1]", "bfloat16", "F.base", "fwd", ms=2.0, bytes=4_000_000_000, flops=0).finish(4000.0)
    ours = Record("op", "c", "[1]", "bfloat16", "mmkernels[triton]", "fwd", ms=1.0, bytes=4_000_000_000,
                  flops=0).finish(4000.0)
    assert base.gbps == pytest.approx(2000.0) and base.pct_copy == pytest.approx(50.0)
    assert "2.00x vs F.base" in table([base, ours])
