#!/usr/bin/env bash
# The test command: ./tests/run.sh [pytest args]
# Creates/reuses .venv, installs the project with its test extras, makes sure Chromium
# is there for the browser test, and runs the whole suite offline.
set -euo pipefail
EXTRAS="ui,test,structured,bench,cluster"
source "$(dirname "$0")/../server/bootstrap.sh"

if [ ! -x /usr/bin/chromium ] || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then
  echo "[tests] installing Debian chromium (+ CJK fonts) for the browser test" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-cjk >&2 \
    || { echo "[tests] could not install chromium: the browser test will fail" >&2; }
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
