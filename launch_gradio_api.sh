#!/usr/bin/env bash
# Start the OpenAI-compatible API (0.0.0.0:8080) and the Gradio web UI (:7860) with one
# model, loaded once by the API; the UI is a client of the API (python -m server.ui).
#   ./launch_gradio_api.sh [API flags] [--ui-port 7860] [--ui-host H] [--api-base-url URL]
#                          [--ui-api-key K] [--ui-model M] [--ui-concurrency N] ...
# Every --ui-* flag and --api-base-url go to the UI, everything else to the API (same
# flags as ./launch_api.sh).  The UI listens on 127.0.0.1 unless --ui-host is given and
# talks to http://127.0.0.1:<API port>/v1 unless --api-base-url is given.  It is never
# handed the API's keys: when the API has keys, the page asks each person for one.
# Ctrl-C or SIGTERM stops both; if the API exits, the UI is stopped too; if the UI exits,
# the API keeps serving (the bots use it) and the launcher says so.
EXTRAS="${EXTRAS:-ui,structured}"
source "$(dirname "$0")/server/bootstrap.sh"

api_args=(); ui_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help)
      echo "UI flags (here --api-base-url defaults to"
      echo "http://127.0.0.1:<API --port>/v1 and --ui-max-tokens to --max-tokens-limit):"
      "$PY" -m server.ui --help | sed -n '/^options:/,$p' | grep -v -e '^options:' -e '-h, --help'
      echo; echo "API flags (same as ./launch_api.sh):"
      exec "$PY" -m server --help ;;
    --ui-*=*|--api-base-url=*) ui_args+=("$1"); shift ;;
    --ui-*|--api-base-url)
      [ $# -ge 2 ] || { echo "launch_gradio_api.sh: $1 needs a value" >&2; exit 2; }
      ui_args+=("$1" "$2"); shift 2 ;;
    *) api_args+=("$1"); shift ;;
  esac
done

# Resolve the API's host and port exactly as the server will (YAML < env < flags); a
# configuration error is printed by the same one-line reporter as the server's.
info=$("$PY" - "${api_args[@]}" <<'PY'
import sys
from server.config_errors import load_or_exit
s = load_or_exit(sys.argv[1:])
print(s.host); print(s.port); print(s.max_tokens_limit)
PY
) || exit 2
{ read -r api_host; read -r api_port; read -r max_tokens; } <<<"$info"
case "$api_host" in 0.0.0.0|::|"") connect_host=127.0.0.1 ;; *:*) connect_host="[$api_host]" ;; *) connect_host="$api_host" ;; esac
# without OPENAI_API_KEY: a key in the operator's shell must not become every visitor's
# key (--ui-api-key does that, on purpose)
ui_env=(GRADIO_ANALYTICS_ENABLED=False)

export PYTHONUNBUFFERED=1
"$PY" -m server "${api_args[@]}" &
api_pid=$!
env -u OPENAI_API_KEY "${ui_env[@]}" "$PY" -m server.ui --ui-host 127.0.0.1 --ui-port 7860 \
  --api-base-url "http://$connect_host:$api_port/v1" --ui-max-tokens "$max_tokens" "${ui_args[@]}" &
ui_pid=$!
echo "[launch] api pid $api_pid on $api_host:$api_port, ui pid $ui_pid" >&2

stopped=0
stop_both() {
  [ "$stopped" = 1 ] && return; stopped=1
  kill -TERM "$api_pid" "$ui_pid" 2>/dev/null || true
  wait "$api_pid" 2>/dev/null || true
  wait "$ui_pid" 2>/dev/null || true
}
trap 'stop_both; exit 130' INT
trap 'stop_both; exit 143' TERM

set +e
wait -n "$api_pid" "$ui_pid"
rc=$?
if kill -0 "$api_pid" 2>/dev/null; then
  # the UI is for people testing by hand; the bots use the API: keep it up
  echo "[launch] the UI exited (status $rc); the API keeps serving on $api_host:$api_port" \
       "(restart this launcher to bring the UI back)" >&2
  wait "$api_pid"
  rc=$?
else
  echo "[launch] the API exited (status $rc): stopping the UI" >&2
fi
set -e
stop_both
exit "$rc"
