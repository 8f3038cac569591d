#!/usr/bin/env bash
# Regenerates requirements/lock.txt, the exact versions that every install uses:
#
#     ./requirements/compile.sh                    # the lock (newest versions the ranges allow)
#     ./requirements/compile.sh --resolution lowest-direct -o OUT   # the lowest-versions run
#
# The lock is a pip constraints file (`pip install -c requirements/lock.txt -e '.[extras]'`):
# every dependency of every extra, pinned, for Python >= 3.11 on any platform (uv's
# --universal: one version per package, markers where a package is platform-only).
# torch and what pins torch or is pinned by it (torchvision, nvidia-*, cuda-*) stay out: server/bootstrap.sh
# installs torch by its own rule (the local CPU build here, the GPU build it names on a GPU
# box). The lock is resolved with torch==2.13.0, the version the suite runs on; triton (pulled
# by xgrammar on x86_64 Linux) is in it, and bootstrap drops that line on a GPU box, where
# the CUDA torch pins its own triton.
#
# uv (from PyPI, the `lock` extra) resolves against PyPI alone: it never sees pip's configuration
# or the local torch file, which is why torch is given as an override and left out.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_FOR_RESOLVING="torch==2.13.0"
out="$ROOT/requirements/lock.txt"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

# uv at the version the lock pins (the `lock` extra), so the resolver itself is locked, in a
# venv of its own: never a package added to the venv being checked, nor to the system Python
TOOLS="$ROOT/.venv-tools"
PY="$TOOLS/bin/python"
[ -x "$PY" ] || python3 -m venv "$TOOLS"
"$PY" -m uv --version >/dev/null 2>&1 \
  || "$PY" -m pip install --disable-pip-version-check -q -c "$ROOT/requirements/lock.txt" uv >&2
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "$TORCH_FOR_RESOLVING" > "$tmp/torch.txt"
# uv prefers the versions already in its output file: start from the current lock, so that
# adding a dependency pins the new packages without moving every other one (delete the
# lock, or pass --upgrade, to move to the newest versions)
[ -f "$out" ] && cp "$out" "$tmp/all.txt"
(cd "$ROOT" && "$PY" -m uv pip compile pyproject.toml --all-extras --universal \
   --python-version 3.11 --fork-strategy fewest --override "$tmp/torch.txt" \
   --no-header --annotation-style line "${args[@]}" -o "$tmp/all.txt" -q)
{
  echo "# Exact versions of every dependency and extra: a pip constraints file."
  echo "# Regenerate with ./requirements/compile.sh ($("$PY" -m uv --version), resolved with $TORCH_FOR_RESOLVING);"
  echo "# torch, torchvision, nvidia-* and cuda-* are left out (server/bootstrap.sh installs torch)."
  grep -v -E '^(torch|torchvision|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$tmp/all.txt"
} > "$out"
echo "[compile] wrote $out ($(grep -c '==' "$out") pins)" >&2
