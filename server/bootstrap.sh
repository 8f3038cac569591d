# Sourced by launch_api.sh, launch_gradio_api.sh and tests/run.sh (not run directly).
# Creates .venv at the repository root if missing and installs the project into it:
# CUDA torch from the registry on a box with an NVIDIA GPU, torch==2.13.0 (a local CPU
# build here) otherwise, and never replaces an installed torch that satisfies the range.
# Set EXTRAS (e.g. "ui,test") before sourcing.  Re-runs are a no-op unless
# pyproject.toml changed or EXTRAS asks for an extra not installed yet.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
EXTRAS="${EXTRAS:-}"

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" >&2 || true; }

if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 5))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[bootstrap] NVIDIA GPU found: installing CUDA torch" >&2
    pip_install "torch>=2.5"
  else
    echo "[bootstrap] no NVIDIA GPU: installing torch==2.13.0 (CPU)" >&2
    pip_install "torch==2.13.0"
  fi
fi

# one stamp per pyproject.toml version, listing the extras installed with it: a run that
# asks for extras already there installs nothing (launchers and tests share the venv)
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
want="$( { [ -f "$stamp" ] && cat "$stamp"; echo "${EXTRAS//,/$'\n'}"; } | sed '/^$/d' | sort -u)"
if [ ! -f "$stamp" ] || [ "$want" != "$(sed '/^$/d' "$stamp" | sort -u)" ]; then
  all="$(echo "$want" | paste -sd, -)"
  echo "[bootstrap] installing the project${all:+ with extras [$all]}" >&2
  spec="$ROOT"; [ -n "$all" ] && spec="$ROOT[$all]"
  pip_install -e "$spec"
  "$PY" -c "import server, fastapi, transformers, torch" || { echo "[bootstrap] install failed" >&2; exit 1; }
  rm -f "$VENV"/.installed-* && echo "$want" > "$stamp"
fi
cd "$ROOT"
