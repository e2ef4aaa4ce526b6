#!/usr/bin/env bash
# honelm quickstart. Sets itself up on first use (virtual environment, CPU PyTorch, honelm).
#
#   ./run.sh demo [options]      train a tiny model offline on a built-in task and show what it learned
#   ./run.sh test [pytest args]  run the full test suite
#
# Environment: HONELM_VENV (default .venv), HONELM_TORCH (pip requirement for torch,
# default torch==2.13.0), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${HONELM_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[honelm] creating virtual environment in $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[honelm] installing PyTorch (${HONELM_TORCH:-torch==2.13.0})" >&2
    "$PY" -m pip install -q --disable-pip-version-check "${HONELM_TORCH:-torch==2.13.0}"
  fi
  # Reinstall honelm only when its packaging metadata changed.
  local stamp="$VENV/.honelm-install-stamp"
  local want
  want="$(cat pyproject.toml | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import honelm, pytest" >/dev/null 2>&1; then
    echo "[honelm] installing honelm and its test tools" >&2
    "$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/honelm" demo "$@"
    ;;
  test)
    setup
    # One compute thread per test worker: the workers already use every core.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec "$PY" -m pytest -n "${HONELM_TEST_WORKERS:-2}" -q tests "$@"
    ;;
  *)
    echo "usage: ./run.sh demo [options] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
