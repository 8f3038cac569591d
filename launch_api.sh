#!/usr/bin/env bash
# Start the OpenAI-compatible API on 0.0.0.0:8080 (override with --host/--port).
# Every flag is passed to the server: ./launch_api.sh --help lists them.
EXTRAS="${EXTRAS:-structured}"
source "$(dirname "$0")/server/bootstrap.sh"
exec "$PY" -m server "$@"
