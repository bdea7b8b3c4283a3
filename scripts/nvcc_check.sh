#!/usr/bin/env bash
# Compile CUDA sources of mmkernels._C one at a time, with setup.py's flags, into objects under /tmp, without
# building or installing the extension (so several people can compile-check their kernels at once).
#   scripts/nvcc_check.sh csrc/<op>/<file>.cu [more.cu ...]      (ARCHS="8.0;9.0a" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
ARCHS="${ARCHS:-8.0;9.0a}"
read -r -a INC < <("$PY" - <<'PYEOF'
from torch.utils.cpp_extension import include_paths
import sysconfig
try:
    import cutlass_library, os
    cut = [os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")]
except ImportError:
    cut = []
print(" ".join(f"-I{p}" for p in include_paths("cuda") + cut + [sysconfig.get_paths()["include"], "csrc"]))
PYEOF
)
GENCODE=()
IFS=';' read -r -a A <<< "$ARCHS"
for a in "${A[@]}"; do n="${a//./}"; GENCODE+=("-gencode=arch=compute_${n},code=sm_${n}"); done
for f in "$@"; do
  out="/tmp/nvcc_check/$(echo "$f" | tr '/' '_').o"
  mkdir -p /tmp/nvcc_check
  echo "nvcc $f -> $out"
  "$CUDA_HOME/bin/nvcc" -c "$f" -o "$out" "${INC[@]}" "${GENCODE[@]}" -std=c++20 -O3 -lineinfo \
    --expt-relaxed-constexpr --expt-extended-lambda -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=_C \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
    -DMMKERNELS_CUDA_ARCHS="\"$ARCHS\"" ${NVCC_EXTRA:-}
done
