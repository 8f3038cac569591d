"""Batching scheduler vs the sequential ``generate()`` baseline, side by side in one run.

    python -m bench.compare --model-path /tmp/tiny --out bench/results/cpu_tiny

Starts the server once per scheduler on the same machine (same model, same flags), runs
``bench.serve`` at each concurrency level, then writes ``<out>.json``, ``<out>.png`` and
prints the Markdown table used in BENCHMARKS.md, with the two target ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve import add_load_args, bench, plot

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, scheduler: str, extra: list[str],
                 root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """The server of the checkout at ``root`` (this one by default)."""
    port = _port()
    cmd = [sys.executable, "-m", "server", "--model-path", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--scheduler", scheduler, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server ({scheduler}) exited")
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not become healthy")


def table(series: dict[str, list[dict]]) -> str:
    b, s = series["batching"], series["sequential"]
    rows = ["| concurrency | batching tok/s | sequential tok/s | speed-up | batching TTFT p50 / p99 ms "
            "| batching TPOT p50 / p99 ms | sequential TTFT p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for x, y in zip(b, s):
        rows.append(f"| {x['concurrency']} | {x['output_tokens_per_s']:.0f} | {y['output_tokens_per_s']:.0f} "
                    f"| {x['output_tokens_per_s'] / y['output_tokens_per_s']:.1f}x "
                    f"| {x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} "
                    f"| {x['tpot_p50_ms']:.1f} / {x['tpot_p99_ms']:.1f} | {y['ttft_p50_ms']:.0f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--out", default="bench/results/compare")
    p.add_argument("--server-args", default="--min-pixels 4096 --max-pixels 65536",
                   help="extra flags for both servers")
    add_load_args(p)
    args = p.parse_args()
    series = {}
    for scheduler in ("batching", "sequential"):
        print(f"{scheduler}:", flush=True)
        proc, base = start_server(args.model_path, scheduler, args.server_args.split())
        try:
            args.base_url = base
            series[scheduler] = asyncio.run(bench(args))
        finally:
            proc.terminate()
            proc.wait(60)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(series, indent=2))
    plot(series, str(out.with_suffix(".png")))
    print()
    print(table(series))
    by_c = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in series["batching"]}
    seq = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in series["sequential"]}
    if 16 in by_c and 1 in by_c:
        print(f"\nat 16: batching / sequential = {by_c[16] / seq[16]:.1f}x (target >= 5x); "
              f"batching 16 / batching 1 = {by_c[16] / by_c[1]:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
