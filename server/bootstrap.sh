# Sourced by launch_api.sh, launch_gradio_api.sh and tests/run.sh (not run directly).
# Creates the venv if missing and installs the project into it at the versions we tested:
# every dependency through requirements/lock.txt, a pip constraints file (`pip install -c`),
# so any set of extras gets the locked versions. torch is outside the lock: torch==2.13.0
# (the local CPU build here) on a box without an NVIDIA GPU, torch==2.11.0 (the CUDA 13.0
# build on PyPI, the version run on the GPU box; driver >= 580) with one, TORCH_SPEC to
# choose another; an installed torch that satisfies the range is never replaced.
#
# Set EXTRAS (e.g. "ui,test") before sourcing. Modes, each in a venv of its own:
#   (default)   .venv          the lock
#   UNLOCKED=1  .venv-unlocked the newest releases the ranges in pyproject.toml allow
#   LOWEST=1    .venv-lowest   the lowest versions the direct ranges allow (uv's
#                              --resolution lowest-direct, compiled into the venv)
# torch follows the rule above in all three. Re-runs of the default and lowest modes are a
# no-op unless pyproject.toml or the lock changed, or EXTRAS asks for an extra not
# installed yet; UNLOCKED=1 upgrades on every run. CI=true installs with --no-cache-dir
# (a fresh venv, nothing from pip's cache) and fails if the result is not exactly the lock.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/lock.txt"
EXTRAS="${EXTRAS:-}"
MODE=locked
[ "${UNLOCKED:-}" = 1 ] && MODE=unlocked
[ "${LOWEST:-}" = 1 ] && MODE=lowest
case "$MODE" in
  locked) VENV="${VENV:-$ROOT/.venv}" ;;
  *) VENV="${VENV:-$ROOT/.venv-$MODE}" ;;
esac
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
pip_flags=(--disable-pip-version-check -q)
[ "${CI:-}" = true ] && pip_flags+=(--no-cache-dir)
pip_install() { "$PY" -m pip install "${pip_flags[@]}" "$@" 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" >&2 || true; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 5))" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    spec="${TORCH_SPEC:-torch==2.11.0}"
    echo "[bootstrap] NVIDIA GPU found: installing $spec (CUDA)" >&2
  else
    spec="${TORCH_SPEC:-torch==2.13.0}"
    echo "[bootstrap] no NVIDIA GPU: installing $spec (CPU)" >&2
  fi
  pip_install "$spec"
fi

# the constraints this mode installs with (none when unlocked)
constraints=""
if [ "$MODE" = locked ]; then
  constraints="$LOCK"
elif [ "$MODE" = lowest ]; then
  constraints="$VENV/lowest.txt"
  if [ ! -f "$constraints" ] || [ "$constraints" -ot "$ROOT/pyproject.toml" ]; then
    echo "[bootstrap] compiling the lowest versions the ranges allow into $constraints" >&2
    "$ROOT/requirements/compile.sh" --resolution lowest-direct -o "$constraints"
  fi
fi
if [ -n "$constraints" ] && [ "$gpu" = 1 ]; then
  # the CUDA torch pins its own triton: the lock's (torch 2.13's) would fight it
  grep -v '^triton==' "$constraints" > "$VENV/constraints-gpu.txt"
  constraints="$VENV/constraints-gpu.txt"
fi

# one stamp per pyproject.toml + lock, listing the extras installed with it: a run that
# asks for extras already there installs nothing (launchers and tests share the venv)
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$LOCK" | sha256sum | cut -c1-16)"
want="$( { [ -f "$stamp" ] && cat "$stamp"; echo "${EXTRAS//,/$'\n'}"; } | sed '/^$/d' | sort -u)"
if [ "$MODE" = unlocked ] || [ ! -f "$stamp" ] || [ "$want" != "$(sed '/^$/d' "$stamp" | sort -u)" ]; then
  all="$(echo "$want" | paste -sd, -)"
  echo "[bootstrap] installing the project${all:+ with extras [$all]} ($MODE)" >&2
  spec="$ROOT"; [ -n "$all" ] && spec="$ROOT[$all]"
  if [ "$MODE" = unlocked ]; then
    pip_install --upgrade --upgrade-strategy eager -e "$spec"
  else
    pip_install -c "$constraints" -e "$spec"
  fi
  "$PY" -c "import server, fastapi, transformers, torch" || { echo "[bootstrap] install failed" >&2; exit 1; }
  "$PY" -m pip check >&2 || { echo "[bootstrap] pip check found broken requirements" >&2; exit 1; }
  if [ "$MODE" != unlocked ] && ! "$PY" "$ROOT/requirements/check.py" "$constraints" >&2; then
    if [ "${CI:-}" = true ]; then exit 1; fi
    echo "[bootstrap] the venv holds other versions than the lock: remove $VENV and run again for a clean install" >&2
  fi
  rm -f "$VENV"/.installed-* && echo "$want" > "$stamp"
fi
cd "$ROOT"
