#!/usr/bin/env bash
# One device call that builds, tests and benchmarks on a lent GPU (see ../shared/gpu/README.md).
# Run from the repo root on the GPU machine, with the wheels from ../shared/gpu/fetch_wheels.sh carried as .whl/.
# Writes build.log, gpu_tests.log, bench.json and bench.md to $OUT (default ./gpu_out).
# STEPS (default "test,bench") picks what runs after the (incremental) build, so the work can be split over several
# 10-minute device calls: STEPS=test, then STEPS=bench BENCH_ARGS="--ops joint_attention"; STEPS=tune runs the
# joint-attention block-size sweep (bench/tune_joint_attention.py); STEPS=sanitize runs the CUDA-backend op tests
# under compute-sanitizer. PYTEST_ARGS adds pytest arguments
# (e.g. "-k joint_attention").
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # Hopper only: halves the build; tests check the list
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/device.txt"
start=$(date +%s)
MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -m mmkernels | tee "$OUT/mmkernels.txt"
# Every op test runs on the GPU here: CUDA backends, compiled Triton, bf16. (The offline Triton compile check is
# for GPU-less machines; here the kernels compile for real.)
STEPS=${STEPS:-test,bench}
# The GPU image has pytest-xdist and pytest-timeout: ~2800 tests whose first calls JIT-compile Triton kernels run in
# PYTEST_N worker processes (the 16 CPU cores compile in parallel; the tests share the one GPU), and a hung kernel
# fails its test after PYTEST_TIMEOUT s instead of eating the lease. Both are skipped where the plugins are absent.
# The run goes on past failures (up to PYTEST_MAXFAIL, listed by -rf): a first run of never-run kernels should
# report every failing case in one call, not the first.
PAR=()
python3 -c "import xdist" 2>/dev/null && PAR+=(-n "${PYTEST_N:-12}")
python3 -c "import pytest_timeout" 2>/dev/null && PAR+=(--timeout "${PYTEST_TIMEOUT:-240}")
if [[ ",$STEPS," == *",test,"* ]]; then
  t0=$(date +%s)
  python3 -m pytest tests/ops tests/test_backend.py tests/test_build.py tests/test_nn.py tests/nn -q -rf \
    --maxfail "${PYTEST_MAXFAIL:-40}" -p no:cacheprovider --ignore=tests/ops/test_triton_compile.py "${PAR[@]}" --durations=15 ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  echo "test: $(( $(date +%s) - t0 )) s"
fi
if [[ ",$STEPS," == *",bench,"* ]]; then
  t0=$(date +%s)
  python3 -m bench ${BENCH_ARGS:-} --device cuda --out "$OUT/bench.json" --md "$OUT/bench.md" 2>&1 | tail -40
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
# STEPS=sanitize: the CUDA-backend op tests (ids "cuda-cuda...") under compute-sanitizer memcheck (seen working on
# the Firecracker H200 machines, 2026-11-04): out-of-bounds and misaligned accesses of the hand-written kernels are
# reported by address even where the output happens to be right. One process (the sanitizer follows children, but
# xdist workers would multiply its overhead); SANITIZE_K narrows the selection.
if [[ ",$STEPS," == *",sanitize,"* ]]; then
  t0=$(date +%s)
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  "$SAN" --tool memcheck --target-processes all --print-limit 20 --error-exitcode 9 \
    python3 -m pytest tests/ops -q -rf -x -p no:cacheprovider --ignore=tests/ops/test_triton_compile.py \
    -k "${SANITIZE_K:-cuda-cuda}" 2>&1 | tee "$OUT/sanitize.log" | tail -40
  echo "sanitize: $(( $(date +%s) - t0 )) s"
fi
if [[ ",$STEPS," == *",tune,"* ]]; then
  python3 -m bench.tune_joint_attention ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | tail -40
fi
