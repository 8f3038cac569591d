#!/usr/bin/env bash
# The test command: ./tests/run.sh [pytest args]
# Creates/reuses .venv, installs the project with its test extras, makes sure Chromium
# (browser test), systemd-analyze and nginx (deploy/ checks) are there, and runs the whole
# suite offline.
set -euo pipefail
EXTRAS="ui,test,structured,bench,cluster"
source "$(dirname "$0")/../server/bootstrap.sh"

if [ ! -x /usr/bin/chromium ] || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1 \
   || [ ! -x /usr/bin/systemd-analyze ] || [ ! -x /usr/sbin/nginx ]; then
  echo "[tests] installing Debian chromium (+ CJK fonts) for the browser test, systemd and nginx-light for the deploy/ checks" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-cjk systemd nginx-light >&2 \
    || { echo "[tests] could not install them: the browser or deploy tests will fail" >&2; }
fi

export QWEN_VL_CONSTRAINTS="${QWEN_VL_CONSTRAINTS-$constraints}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# file order by default (what CI runs); RANDOM_ORDER=1 shuffles modules and tests with
# pytest-randomly under a seed it prints (RANDOM_SEED=N replays that order)
order=(-p no:randomly)
if [ "${RANDOM_ORDER:-0}" = 1 ]; then
  seed="${RANDOM_SEED:-$RANDOM$RANDOM}"
  echo "[tests] random order: RANDOM_ORDER=1 RANDOM_SEED=$seed ./tests/run.sh replays it" >&2
  order=(-p randomly "--randomly-seed=$seed")
fi
exec "$PY" -m pytest -q -p no:cacheprovider "${order[@]}" "$@"
