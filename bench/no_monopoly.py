"""Issue 9's hostile requests, before and after: each one with an innocent request 0.5 s
later, against a real server with the tiny model.

    python -m bench.no_monopoly --server-dir /tmp/main-copy --out bench/results/no_monopoly_before.json
    python -m bench.no_monopoly --out bench/results/no_monopoly_after.json

Starts ``python -m server`` from ``--server-dir`` (default: this checkout) with flags both
versions know, and prints one line per case: the hostile request's status and seconds, the
innocent request's status and seconds, the slowest ``/health`` answer and the server's
RSS growth.  The last case SIGTERMs the server with a grammar compile in flight and
reports how long it took to exit.  The scenarios are the ones ``tests/test_no_monopoly.py``
asserts on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import RunningServer, data_url, free_port, png_bytes, wait_healthy
from tests.test_no_monopoly import (Bystander, _Redirect, big_png, chat, concurrently,
                                   image_chat, post, progressive_scan_bomb, rle8_bmp,
                                   schema_format, slow_schema, tools)

SHUTDOWN_TIMEOUT = 4


def cases(redirect_url: str) -> dict:
    huge = 16384 * 32 * 32
    small_image = image_chat(data_url(png_bytes(64, 48)))
    bomb = data_url(progressive_scan_bomb(), "image/jpeg")
    big = data_url(big_png())
    pattern = {"type": "object", "properties": {"a": {"type": "string",
                                                      "pattern": "[a-z]{1,10000}"}}}
    junk = (b'{"model": "qwen3-vl", "messages": [{"role": "user", "content": "hi"}], '
            b'"junk": [' + b"1," * 8_000_000 + b'1]}')
    return {
        "grammar_repeat_10000": (chat(response_format=schema_format(pattern)), None),
        "grammar_200_patterns": (chat(response_format=schema_format(slow_schema())), None),
        "tools_2400_required": (chat(tools=tools(2400), tool_choice="required"), None),
        "pixel_override_8_images": (image_chat(*[{"url": data_url(png_bytes(64, 64)),
                                                  "min_pixels": huge, "max_pixels": huge}] * 8),
                                    None),
        "jpeg_scan_bomb_x2": (image_chat(bomb, bomb), small_image),
        "rle_bmp": (image_chat(data_url(rle8_bmp(), "image/bmp")), small_image),
        "4x4_large_pngs": ("many", image_chat(*[big] * 4)),
        "json_16mb_tiny_values": (junk, None),
        "redirect_to_data_url": (image_chat(redirect_url), None),
    }


def start(server_dir: Path, model: str, log: Path) -> RunningServer:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--model-path", model, "--host", "127.0.0.1",
           "--port", str(port), "--min-pixels", "4096", "--max-pixels", "65536",
           "--allowed-media-hosts", "localhost", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=server_dir, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    srv = RunningServer(proc, port, log)
    wait_healthy(srv.url, proc, log)
    return srv


def run_case(srv, hostile, innocent) -> dict:
    if hostile == "many":  # four concurrent requests of the same body
        send = concurrently(srv, innocent, 4, [])
        innocent = image_chat(data_url(png_bytes(64, 48)))
    elif isinstance(hostile, bytes):
        send = post(srv, content=hostile, timeout=120)
    else:
        send = post(srv, hostile, timeout=120)
    b = Bystander(srv, send, innocent).run()
    r = b.result
    return {"hostile_status": r.status_code if isinstance(r, httpx.Response) else repr(r),
            "hostile_s": round(b.hostile_s, 2), "innocent_status": b.innocent_status,
            "innocent_s": round(b.innocent_s, 2), "health_max_s": round(max(b.health), 2),
            "rss_growth_mb": round(b.rss_peak - b.rss0)}


def sigterm_case(srv) -> dict:
    body = chat(response_format=schema_format(slow_schema(197)))
    threading.Thread(target=lambda: _quiet(post(srv, body, timeout=120)), daemon=True).start()
    time.sleep(1.0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(120)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        rc = "killed after 120 s"
    return {"exit_s": round(time.monotonic() - t0, 2), "rc": rc,
            "shutdown_timeout": SHUTDOWN_TIMEOUT}


def _quiet(fn):
    try:
        fn()
    except Exception:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-dir", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--out")
    args = ap.parse_args()
    import http.server
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        from models.tiny import build
        build(Path(tmp) / "tiny", seed=0)
        srv = start(Path(args.server_dir), str(Path(tmp) / "tiny"), Path(tmp) / "server.log")
        results = {}
        try:
            for name, (hostile, innocent) in cases(
                    f"http://localhost:{origin.server_address[1]}/x.png").items():
                results[name] = run_case(srv, hostile, innocent)
                print(name, json.dumps(results[name]), flush=True)
            results["sigterm_compile_in_flight"] = sigterm_case(srv)
            print("sigterm_compile_in_flight", json.dumps(results["sigterm_compile_in_flight"]))
        finally:
            srv.stop(signal.SIGKILL)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
