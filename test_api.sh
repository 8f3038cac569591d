#!/usr/bin/env bash
# Post-restart check of a running server: ./test_api.sh [BASE_URL] [IMAGE_URL]
# Checks /health, /v1/models, a text question and an image question (a generated image
# sent as a data URL, plus IMAGE_URL if given), printing each latency.  Needs curl and
# python3 (standard library only).  Exit status is non-zero on any failure.
# Set OPENAI_API_KEY when the server requires a key.
set -uo pipefail
BASE="${1:-http://127.0.0.1:8080}"; BASE="${BASE%/}"; BASE="${BASE%/v1}"
IMAGE_URL="${2:-}"
MODEL="${MODEL:-qwen3-vl}"
AUTH=(); [ -n "${OPENAI_API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $OPENAI_API_KEY")
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
  else echo "FAIL  $name (HTTP $code): $(head -c 300 "$tmp/body")"; fails=$((fails+1)); fi
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
