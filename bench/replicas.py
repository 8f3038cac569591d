"""One process vs replicas on Ray Serve, side by side in one run (issue 15).

    python -m bench.replicas --model-path /tmp/tiny --concurrency 16

Serves the same model three ways on this machine, one after another: the plain server
(no Ray), one replica through Ray Serve (the cost of the proxy hop), and ``--replicas``
replicas; runs ``bench.serve`` against each and prints the Markdown table used in
BENCHMARKS.md.  The one-replica run joins a Ray head this script starts
(``ray start --head --block``) and stops again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.compare import ROOT, _port
from bench.serve import add_load_args, bench


# the bench's own loopback head runs without Ray's token auth (a joined cluster with an
# explicit address needs RAY_AUTH_MODE set the same way as the head)
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}


def serve(args, flags: list[str]):
    """Start ``python -m server`` with ``flags``; return (process, base URL) once healthy."""
    port = _port()
    cmd = [sys.executable, "-m", "server", "--model-path", args.model_path,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           *args.server_args.split(), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **NO_AUTH}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server {flags} did not become healthy")


def ray_head(cpus: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={cpus}", "--include-dashboard=false",
                             "--disable-usage-stats"], cwd=ROOT, env={**os.environ, **NO_AUTH})
    time.sleep(15)  # the head's GCS and raylet; launching before them would start another
    return proc, f"127.0.0.1:{port}"


def run(args, label: str, flags: list[str]) -> dict:
    print(f"{label}:", flush=True)
    proc, args.base_url = serve(args, flags)
    try:
        return {"label": label, "levels": asyncio.run(bench(args))}
    finally:
        proc.terminate()
        proc.wait(120)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--out", default="bench/results/replicas_cpu_tiny.json")
    p.add_argument("--server-args", default="--min-pixels 4096 --max-pixels 65536")
    add_load_args(p)
    p.set_defaults(concurrency=[16])
    args = p.parse_args()
    cpus = os.cpu_count() or 1
    results = [run(args, "1 process, no Ray", [])]
    head, address = ray_head(cpus)
    try:
        results.append(run(args, "Ray Serve, 1 replica",
                           ["--replicas", "1", "--ray-address", address]))
    finally:
        head.terminate()
        head.wait(120)
    results.append(run(args, f"Ray Serve, {args.replicas} replicas",
                       ["--replicas", str(args.replicas)]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    base = results[0]["levels"]
    print("\n| setup | concurrency | tok/s | req/s | vs 1 process | TTFT p50 / p99 ms "
          "| TPOT p50 ms |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for lv, b in zip(r["levels"], base):
            print(f"| {r['label']} | {lv['concurrency']} | {lv['output_tokens_per_s']:.0f} "
                  f"| {lv['requests_per_s']:.2f} "
                  f"| {lv['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x "
                  f"| {lv['ttft_p50_ms']:.0f} / {lv['ttft_p99_ms']:.0f} "
                  f"| {lv['tpot_p50_ms']:.1f} |")


if __name__ == "__main__":
    main()
