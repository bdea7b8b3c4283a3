"""Block-size sweep of the Triton joint attention on a GPU: ``python -m bench.tune_joint_attention [--case N]``.

For one LaVin-DiT case (bench/ops/joint_attention.py's CASES), it times the whole op (forward, and forward +
backward) for every forward config in FWD and backward config in BWD, setting the tuning knobs
MMKERNELS_JA_FWD / MMKERNELS_JA_BWD (read by mmkernels/ops/joint_attention/triton.py at each call), checks each
result against the reference, and prints useful TFLOP/s (4*B*Hq*Ltot^2*D forward, 2.5x that backward). Configs
that fail to compile or run (too much shared memory, registers) are reported, not fatal. The winners go into
``_fwd_blocks`` / ``_bwd_blocks``; record the run in bench/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward.
FWD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 2),
       (128, 64, 8, 2), (64, 64, 4, 4)]
# (dK/dV BLOCK_M, BLOCK_N, dQ BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward.
BWD = [(32, 128, 128, 32, 8, 2), (32, 128, 128, 32, 4, 2), (64, 64, 64, 64, 4, 2), (64, 128, 128, 64, 8, 2),
       (32, 64, 64, 32, 4, 3), (16, 128, 128, 16, 4, 3)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=int, default=0, help="index into bench.ops.joint_attention.CASES")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_joint_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    import mmkernels
    from bench.ops.joint_attention import CASES, EPS, SPLIT72
    from mmkernels.ops.rope3d import reference as rope_ref
    from mmkernels.testing import randn, rel_err

    c = CASES[args.case]
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, Hq, Hkv, D = c.batch, c.hq, c.hkv, c.d
    ltot = sum(c.lengths)
    qs = [randn((B, L, Hq * D), dt, dev) for L in c.lengths]
    ks = [randn((B, L, Hkv * D), dt, dev) for L in c.lengths]
    vs = [randn((B, L, Hkv * D), dt, dev) for L in c.lengths]
    qw = [randn((Hq * D,), dt, dev, shift=1.0, scale=0.1) for _ in c.lengths] if c.norm else None
    kw = [randn((Hkv * D,), dt, dev, shift=1.0, scale=0.1) for _ in c.lengths] if c.norm else None
    split = (SPLIT72 if D == 72 else rope_ref.suggest_split(D)) if c.grid else None
    rope = mmkernels.RoPE3DSpec(c.grid, split) if c.grid else None
    dos = [randn((B, L, Hq * D), dt, dev) for L in c.lengths]
    leaves = [t.requires_grad_(True) for t in qs + ks + vs]
    flops = 4 * B * Hq * ltot * ltot * D

    def op(backend="triton"):
        with mmkernels.use_backend(backend):
            return mmkernels.joint_attention(qs, ks, vs, num_heads=Hq, num_kv_heads=Hkv, q_norm=qw, k_norm=kw,
                                             norm_eps=EPS, rope=rope)

    def fwd_bwd():
        torch.autograd.grad(op(), leaves, dos)

    with torch.no_grad():
        expected = op("torch")
    print(f"case {c.name}: B={B} L={'+'.join(map(str, c.lengths))} Hq={Hq} Hkv={Hkv} D={D} "
          f"on {torch.cuda.get_device_name()}", flush=True)
    for cfg in FWD:
        os.environ["MMKERNELS_JA_FWD"] = ",".join(map(str, cfg))
        try:
            with torch.no_grad():
                err = max(rel_err(o, e) for o, e in zip(op(), expected))
                ms = triton.testing.do_bench(lambda: op(), warmup=10, rep=100, return_mode="median")
            print(f"fwd {cfg}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  rel err {err:.1e}", flush=True)
        except Exception as e:  # a config the compiler or the device rejects
            print(f"fwd {cfg}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    os.environ.pop("MMKERNELS_JA_FWD")
    with torch.no_grad():
        fwd_ms = triton.testing.do_bench(lambda: op(), warmup=10, rep=100, return_mode="median")
    for cfg in BWD:
        os.environ["MMKERNELS_JA_BWD"] = ",".join(map(str, cfg))
        try:
            ms = triton.testing.do_bench(fwd_bwd, warmup=5, rep=100, return_mode="median")
            bwd_ms = ms - fwd_ms
            print(f"bwd {cfg}: fwd+bwd {ms:.3f} ms, bwd ~{bwd_ms:.3f} ms  {2.5 * flops / bwd_ms / 1e9:.0f} TFLOP/s",
                  flush=True)
        except Exception as e:
            print(f"bwd {cfg}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    os.environ.pop("MMKERNELS_JA_BWD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
