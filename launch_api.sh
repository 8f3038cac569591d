#!/usr/bin/env bash
# Start the OpenAI-compatible API on 0.0.0.0:8080 (override with --host/--port).
# Every flag is passed to the server: ./launch_api.sh --help lists them.
EXTRAS="${EXTRAS:-structured}"
# Ray Serve (extra "cluster") only when replicas are asked for: a plain launch never installs it
for arg in "$@" ${QWEN_VL_REPLICAS:+--replicas} ${QWEN_VL_RAY_ADDRESS:+--ray-address}; do
  case "$arg" in --replicas|--replicas=*|--ray-address|--ray-address=*) EXTRAS="$EXTRAS,cluster" ;; esac
done
source "$(dirname "$0")/server/bootstrap.sh"
exec "$PY" -m server "$@"
