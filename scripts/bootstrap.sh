#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment: torch, detectron2, this package.
#
#   VENV=.venv           where the environment lives
#   PYTHON=python3       the interpreter that creates it (3.11 is what the pinned torch wheels are for)
#   SYSTEM_SITE=1        create it with --system-site-packages, so a detectron2 you built yourself
#                        (importable by $PYTHON) is seen and kept instead of installed
#   FORCE_CUDA=0|1       compile the CUDA kernels of sparse_detr._C (default: 1 when nvcc is on PATH)
#   TORCH_CUDA_ARCH_LIST their architectures (default: the GPUs' own, else 9.0)
#
# A second run with nothing changed only checks a stamp and the imports: a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
py="$VENV/bin/python"
stamp="$VENV/.sparse_detr_setup"
log="$VENV/setup.log"
# The build of the compiled op sparse_detr._C (csrc/): its CPU kernels always, its CUDA kernels too whenever
# nvcc is found (FORCE_CUDA=0 leaves them out, FORCE_CUDA=1 insists), for TORCH_CUDA_ARCH_LIST: by default
# the architecture of the GPUs nvidia-smi lists, else 9.0 (Hopper), which is what CI compiles. The build mode
# is part of the stamp, so `make demo` and `make test` share one build and a change of mode rebuilds.
if [ -z "${FORCE_CUDA:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then FORCE_CUDA=1; else FORCE_CUDA=0; fi
fi
export FORCE_CUDA
if [ "$FORCE_CUDA" = 1 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                         | grep -E '^[0-9]+\.[0-9]+$' | sort -u | paste -sd';' - || true)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
build_mode="FORCE_CUDA=$FORCE_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
inputs=$( (cat requirements.txt setup.py pyproject.toml scripts/bootstrap.sh scripts/install_detectron2.py $(find csrc -type f 2>/dev/null | sort); echo "$build_mode") | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] \
   && "$py" -c "import torch, detectron2, sparse_detr, sparse_detr._C" 2>/dev/null; then
  echo "environment $VENV is up to date"
  exit 0
fi

step() { echo "[setup] $*"; }
run() {  # run quietly into the log; show its end when it fails
  if ! "$@" >>"$log" 2>&1; then
    echo "[setup] failed: $*" >&2
    grep -v "is ignored: it is neither" "$log" | tail -n 30 >&2
    exit 1
  fi
}

if [ ! -x "$py" ]; then
  step "creating $VENV with $($PYTHON --version 2>&1)"
  venv_args=()
  [ "${SYSTEM_SITE:-0}" = 1 ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
fi
: >"$log"
step "installing torch, torchvision and the other requirements (log: $log)"
run "$py" -m pip install --disable-pip-version-check -r requirements.txt
step "installing detectron2 (kept if already importable)"
run "$py" scripts/install_detectron2.py
step "installing sparse_detr (editable) and compiling its kernels ($build_mode)"
run "$py" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
"$py" -c "import torch, detectron2, sparse_detr, sparse_detr._C as C; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__, '| sparse_detr from', sparse_detr.__path__[0], '| kernels: CPU' + (' + CUDA' if C.WITH_CUDA else ''))"
echo "$inputs" >"$stamp"
