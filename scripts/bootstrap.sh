#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment: torch, detectron2, this package.
#
#   VENV=.venv           where the environment lives
#   PYTHON=python3       the interpreter that creates it (3.11 is what the pinned torch wheels are for)
#   SYSTEM_SITE=1        create it with --system-site-packages, so a detectron2 you built yourself
#                        (importable by $PYTHON) is seen and kept instead of installed
#
# A second run with nothing changed only checks a stamp and the imports: a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
py="$VENV/bin/python"
stamp="$VENV/.sparse_detr_setup"
log="$VENV/setup.log"
inputs=$(cat requirements.txt setup.py scripts/bootstrap.sh scripts/install_detectron2.py $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] \
   && "$py" -c "import torch, detectron2, sparse_detr" 2>/dev/null; then
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
step "installing sparse_detr (editable)"
run "$py" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
"$py" -c "import torch, detectron2, sparse_detr; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__, '| sparse_detr from', sparse_detr.__path__[0])"
echo "$inputs" >"$stamp"
