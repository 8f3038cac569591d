#!/usr/bin/env bash
# Post-restart check of a running server; ./test_api.sh --help says how to call it.
set -uo pipefail
usage() {
  cat <<'EOF'
Usage: ./test_api.sh [--key KEY] [BASE_URL] [IMAGE_URL]

Checks a running server: /health, /v1/models, a text question and an image question (a
generated image sent as a data URL, plus IMAGE_URL if given), printing each latency.
Exit status is non-zero on any failure.  Needs curl and python3 (standard library only).

  BASE_URL      the server [default: http://127.0.0.1:8080; a trailing /v1 is fine]
  IMAGE_URL     also ask about this image URL (the server fetches it)
  --key KEY     API key, for a server started with --api-key / --api-key-file
                [default: env OPENAI_API_KEY]
  -h, --help    this text
Env: MODEL (model name to ask for) [default: qwen3-vl].
EOF
}
KEY="${OPENAI_API_KEY:-}"; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --key) [ $# -ge 2 ] || { echo "test_api.sh: --key needs a value (see --help)" >&2; exit 2; }
           KEY=$2; shift 2 ;;
    --key=*) KEY=${1#--key=}; shift ;;
    -*) echo "test_api.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -le 2 ] || { echo "test_api.sh: too many arguments (see --help)" >&2; exit 2; }
BASE="${args[0]:-http://127.0.0.1:8080}"; BASE="${BASE%/}"; BASE="${BASE%/v1}"
IMAGE_URL="${args[1]:-}"
MODEL="${MODEL:-qwen3-vl}"
AUTH=(); [ -n "$KEY" ] && AUTH=(-H "Authorization: Bearer $KEY")
fails=0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

check() {  # check NAME EXPECTED_PYTHON_CONDITION curl-args...
  local name=$1 cond=$2; shift 2
  local out code secs
  out=$(curl -sS -m 120 -o "$tmp/body" -w "%{http_code} %{time_total}" "${AUTH[@]}" "$@" 2>"$tmp/err") \
    || { echo "FAIL  $name: $(cat "$tmp/err")"; fails=$((fails+1)); return; }
  code=${out% *}; secs=${out#* }
  if python3 - "$tmp/body" "$code" "$cond" <<'PY'
import json, sys
path, code, cond = sys.argv[1], int(sys.argv[2]), sys.argv[3]
raw = open(path, "rb").read()
try:
    body = json.loads(raw)
except ValueError:
    body = None
ok = eval(cond, {"code": code, "body": body})
if ok and isinstance(body, dict) and body.get("choices"):
    c = body["choices"][0]
    print("      answer:", repr((c["message"]["content"] or "")[:60]), "| usage:", body.get("usage"))
sys.exit(0 if ok else 1)
PY
  then printf "ok    %-28s %6.0f ms\n" "$name" "$(python3 -c "print($secs*1000)")"
  else
    echo "FAIL  $name (HTTP $code): $(head -c 300 "$tmp/body")"; fails=$((fails+1))
    [ "$code" = 401 ] && echo "      the server requires an API key: pass --key KEY (or set OPENAI_API_KEY)"
  fi
}

chat_body() {  # chat_body CONTENT_JSON
  printf '{"model": "%s", "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": %s}]}' "$MODEL" "$1"
}

echo "Checking $BASE"
check "GET /health" 'code == 200 and body["status"] == "ok"' "$BASE/health"
check "GET /v1/models" 'code == 200 and body["data"]' "$BASE/v1/models"

chat_body '"Say hello in one short sentence."' > "$tmp/text.json"
check "text question" 'code == 200 and body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] > 0' \
  -H "Content-Type: application/json" --data @"$tmp/text.json" "$BASE/v1/chat/completions"

python3 - > "$tmp/img.txt" <<'PY'
import base64, struct, zlib
w, h = 96, 64   # a generated gradient, no external file needed
rows = b"".join(b"\x00" + bytes(((x * 255 // w), (y * 255 // h), 128) [i] for x in range(w) for i in range(3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
print("data:image/png;base64," + base64.b64encode(png).decode())
PY
chat_body "[{\"type\": \"text\", \"text\": \"What colours are in this image?\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"$(cat "$tmp/img.txt")\"}}]" > "$tmp/img.json"
check "image question (data URL)" 'code == 200 and body["usage"]["prompt_tokens"] > 10' \
  -H "Content-Type: application/json" --data @"$tmp/img.json" "$BASE/v1/chat/completions"

if [ -n "$IMAGE_URL" ]; then
  chat_body "[{\"type\": \"text\", \"text\": \"Describe this image.\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"$IMAGE_URL\"}}]" > "$tmp/url.json"
  check "image question (URL)" 'code == 200' \
    -H "Content-Type: application/json" --data @"$tmp/url.json" "$BASE/v1/chat/completions"
fi

if [ "$fails" -eq 0 ]; then echo "all checks passed"; else echo "$fails check(s) failed"; fi
exit $(( fails > 0 ))
