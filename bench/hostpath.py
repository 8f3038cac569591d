"""The engine's host path: greedy vs Qwen's sampling vs logprobs at concurrency 64.

    python -m bench.hostpath --model-path /tmp/tiny [--before /tmp/main-before]
    python -m bench.hostpath --model-path /tmp/tiny-real --vs-model /tmp/tiny-toy

Starts this checkout's server (and, with ``--before``, the server of another checkout of
the project, e.g. ``git worktree add /tmp/main-before main``, on the same model; with
``--vs-model``, a second server of this checkout on another model, labelled "vs-model",
e.g. the same tiny model with the toy vocabulary), then
sends ``--requests`` text requests at concurrency 64, 64 tokens each (``ignore_eos``),
through the ``openai`` SDK (raw responses: the client shares the CPU; ``--client aiohttp``
sends the same requests through aiohttp: a tenth of the SDK's CPU per greedy request, a
third per logprobs request), in three modes:

* greedy: temperature 0;
* sampling: Qwen's recommended temperature 0.7, top_p 0.8, top_k 20,
  presence_penalty 1.5, a seed per request;
* logprobs: greedy with ``logprobs`` and ``top_logprobs`` 5.

``--requests`` defaults to 1024, 16 times the concurrency, so that the figure is the
steady state at concurrency 64 (requests finishing and joining at different steps; vLLM's
serving benchmark sends 1,000 prompts by default).  With 128, the run is two waves that
start and end together: about half of its steps run with a partial batch, and the
client's own time per request (about 1.3 ms with the SDK on the same cores) holds the
batch nearly empty while it answers 64 finished requests.  BENCHMARKS.md records both.

Modes alternate between the servers, so both see the same machine load.  Prints output
tokens/s per mode and server (best of ``--rounds``); for a server that counts its decode
steps in ``/metrics``, tokens/s split into the mean decode batch (rows per step: how
full the clients keep it) and the time per step (the run's wall time over its steps,
prefill included); the ratios the issue asks for
(sampling / greedy, logprobs / greedy: best over best, and the median, min and max of the
ratios within each round; greedy after / before, and per mode the median of after / before
within each round), and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from bench.compare import ROOT, start_server

MODES = {
    "greedy": lambda i: dict(temperature=0),
    "sampling": lambda i: dict(temperature=0.7, top_p=0.8, presence_penalty=1.5, seed=i,
                               extra_body={"top_k": 20}),
    "logprobs": lambda i: dict(temperature=0, logprobs=True, top_logprobs=5),
}


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Where is my parcel? Order {i} was shipped on Monday."}]


async def _drive(args, send) -> tuple[int, float]:
    """(output tokens, seconds) of ``args.requests`` requests, ``args.concurrency`` at a
    time; ``send(i)`` makes request ``i`` and returns its completion tokens."""
    todo = list(range(args.requests))
    tokens = 0

    async def worker():
        nonlocal tokens
        while todo:
            n = await send(todo.pop())
            tokens += n  # not `tokens += await ...`: that reads tokens before the await
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return tokens, time.perf_counter() - t0


async def run_mode(base_url: str, mode: str, args) -> tuple[int, float]:
    """(output tokens, seconds) of ``args.requests`` requests at ``args.concurrency``."""
    if getattr(args, "client", "sdk") == "aiohttp":
        return await _run_aiohttp(base_url, mode, args)
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id

    async def send(i: int) -> int:
        kw = MODES[mode](i)
        extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
        # the raw response: the client shares the CPU with the server, and parsing
        # 64 x 6 logprob objects per response into pydantic models is client work
        r = await client.chat.completions.with_raw_response.create(
            model=model, max_tokens=args.max_tokens, extra_body=extra,
            messages=_messages(i), **kw)
        return json.loads(r.text)["usage"]["completion_tokens"]
    try:
        return await _drive(args, send)
    finally:
        await client.close()


async def _run_aiohttp(base_url: str, mode: str, args) -> tuple[int, float]:
    """The same requests as JSON bodies through aiohttp (C HTTP parser, no request models):
    the client's share of the 2 cores drops from about 1.2 to 0.15 CPU-s per 1024 greedy
    requests (1.8 to 0.57 for logprobs); each response is still parsed whole."""
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency),
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.get(base_url + "/models") as r:
            model = (await r.json())["data"][0]["id"]

        async def send(i: int) -> int:
            kw = MODES[mode](i)
            body = {"model": model, "max_tokens": args.max_tokens, "ignore_eos": True,
                    **kw.pop("extra_body", {}), **kw, "messages": _messages(i)}
            async with http.post(base_url + "/chat/completions", json=body) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {raw[:500]!r}")
                return json.loads(raw)["usage"]["completion_tokens"]
        return await _drive(args, send)


def decode_counters(base_url: str) -> tuple[float, float] | None:
    """(decode steps, rows decoded) from the server's ``/metrics``; None when it does not
    count them (an older checkout)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("qwen_vl_decode_steps_total", "qwen_vl_decode_rows_total"):
            found[name] = float(value)
    if len(found) < 2:
        return None
    return found["qwen_vl_decode_steps_total"], found["qwen_vl_decode_rows_total"]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--before", default=None, help="another checkout to measure side by side")
    p.add_argument("--vs-model", default=None,
                   help="another model for this checkout, measured side by side")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="best of this many runs per cell")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of the modes (greedy is always run)")
    p.add_argument("--client", choices=("sdk", "aiohttp"), default="sdk",
                   help="the openai SDK (default), or aiohttp (a lean client)")
    p.add_argument("--out", default="bench/results/hostpath_cpu_tiny.json")
    args = p.parse_args()
    modes = ["greedy"] + [m for m in args.modes.split(",") if m in MODES and m != "greedy"]

    roots = {"after": (ROOT, args.model_path)}
    if args.before:
        roots["before"] = (Path(args.before).resolve(), args.model_path)
    if args.vs_model:
        roots["vs-model"] = (ROOT, args.vs_model)
    servers = {}
    try:
        for label, (root, model) in roots.items():
            servers[label] = start_server(model, "batching", [], root=root)
        for label, (_, url) in servers.items():  # warm-up
            asyncio.run(run_mode(url, "greedy", argparse.Namespace(**{
                **vars(args), "requests": 8, "concurrency": 8})))
        res: dict[str, dict[str, float]] = {label: {} for label in servers}
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
        # per server and mode, per round: (rows per decode step, ms per decode step)
        split: dict[str, dict[str, list[tuple[float, float]]]] = {
            label: {m: [] for m in modes} for label in servers}
        for _ in range(args.rounds):
            for label in servers:
                rounds[label].append({})
            for mode in modes:
                for label, (_, url) in servers.items():
                    c0, t0 = decode_counters(url), time.perf_counter()
                    tokens, seconds = asyncio.run(run_mode(url, mode, args))
                    tps = tokens / seconds
                    wall, c1 = time.perf_counter() - t0, decode_counters(url)
                    res[label][mode] = max(res[label].get(mode, 0.0), tps)
                    rounds[label][-1][mode] = tps
                    line = f"  {label:>6} {mode:>9}: {tps:8.1f} tok/s"
                    if c0 and c1 and c1[0] > c0[0]:
                        steps, rows = c1[0] - c0[0], c1[1] - c0[1]
                        split[label][mode].append((rows / steps, wall / steps * 1e3))
                        line += f"  ({rows / steps:.1f} rows x {steps / wall:.0f} steps/s)"
                    print(line, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    # the machine is shared and its load drifts: a ratio is read within one round (modes
    # run back to back), and the median over rounds is reported beside best / best
    ratios = {}
    for label, r in res.items():
        for mode in modes[1:]:
            paired = sorted(x[mode] / x["greedy"] for x in rounds[label])
            ratios[f"{label} {mode}/greedy"] = r[mode] / r["greedy"]
            ratios[f"{label} {mode}/greedy, median of rounds"] = statistics.median(paired)
            ratios[f"{label} {mode}/greedy, min of rounds"] = paired[0]
            ratios[f"{label} {mode}/greedy, max of rounds"] = paired[-1]
    for other in ("before", "vs-model"):
        if other not in res:
            continue
        ratios[f"greedy after/{other}"] = res["after"]["greedy"] / res[other]["greedy"]
        for mode in modes:  # the same mode, the two servers back to back
            ratios[f"{mode} after/{other}, median of rounds"] = statistics.median(
                a[mode] / b[mode] for a, b in zip(rounds["after"], rounds[other]))
    print("\n| server | " + " | ".join(f"{m} tok/s" for m in modes) + " | "
          + " | ".join(f"{m}/greedy" for m in modes[1:]) + " |\n|---|"
          + "---:|" * (2 * len(modes) - 1))
    for label, r in res.items():
        print(f"| {label} | " + " | ".join(f"{r[m]:.0f}" for m in modes) + " | "
              + " | ".join(f"{r[m] / r['greedy']:.2f}x" for m in modes[1:]) + " |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    detail = {label: {m: {"rows_per_step": statistics.median(r for r, _ in v),
                          "ms_per_step": statistics.median(t for _, t in v)}
                      for m, v in per.items() if v} for label, per in split.items()}
    if any(detail.values()):
        print("\nmedian of rounds: rows per decode step (the batch the clients keep full), "
              "ms per decode step (wall / steps)")
        for label, per in detail.items():
            for m, d in per.items():
                print(f"  {label:>6} {m:>9}: {d['rows_per_step']:5.1f} rows, "
                      f"{d['ms_per_step']:.2f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens_per_s": res, "ratios": ratios, "rounds": rounds,
                                          "decode_split": detail, "client": args.client,
                                          "concurrency": args.concurrency,
                                          "requests": args.requests,
                                          "max_tokens": args.max_tokens,
                                          "models": {k: m for k, (_, m) in roots.items()}},
                                         indent=2))


if __name__ == "__main__":
    main()
