"""Drive a running server through the ``openai`` SDK at chosen concurrency levels.

    python -m bench.serve --base-url http://127.0.0.1:8080/v1 --concurrency 1 4 16 32 \
        --out bench/results/run.json --plot bench/results/run.png

A mix of text and image requests (each image freshly random, so no cache can help),
streamed so that time to first token (TTFT) is measured; fixed output lengths
(``ignore_eos``) keep runs comparable.  Reports request/s, output tokens/s, TTFT and
time per output token (TPOT) at p50/p99 for each level.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import time
from pathlib import Path

from openai import AsyncOpenAI

PROMPTS = ["What colour and style is this product?", "Read the order number on this screenshot.",
           "Is this item damaged? Answer briefly.", "Summarise the customer's problem.",
           "Where is my parcel? Order 48213 was shipped on Monday.",
           "Write a short, friendly reply to a customer asking about returns."]


def random_image(rng: random.Random, budget: int) -> str:
    from PIL import Image
    w = rng.randint(budget // 2, budget)
    h = rng.randint(budget // 2, budget)
    img = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client, model, rng, args) -> dict:
    text = rng.choice(PROMPTS) + f" (#{rng.randint(0, 10**6)})"
    content: list | str = text
    if rng.random() < args.image_ratio:
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": random_image(rng, args.image_size)}}]
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], stream=True,
        max_tokens=args.max_tokens, temperature=0.7, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **({"response_format": json.loads(args.response_format)}
                                           if args.response_format else {})})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "latency": total, "tokens": tokens}


async def run_level(client, model, concurrency: int, args) -> dict:
    n = max(args.min_requests, concurrency * args.requests_per_worker)
    rng = random.Random(args.seed * 1000 + concurrency)
    queue = list(range(n))
    results = []

    async def worker():
        while queue:
            queue.pop()
            results.append(await one_request(client, model, rng, args))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    tpots = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    ttfts = [r["ttft"] for r in results]
    out_tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": n, "wall_s": wall,
            "requests_per_s": n / wall, "output_tokens_per_s": out_tokens / wall,
            "ttft_p50_ms": 1000 * pct(ttfts, 50), "ttft_p99_ms": 1000 * pct(ttfts, 99),
            "tpot_p50_ms": 1000 * (pct(tpots, 50) or 0), "tpot_p99_ms": 1000 * (pct(tpots, 99) or 0),
            "mean_latency_ms": 1000 * statistics.mean(r["latency"] for r in results)}


async def bench(args) -> list[dict]:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    await run_level(client, model, 1, argparse.Namespace(**{**vars(args), "min_requests": 2,
                                                             "requests_per_worker": 1}))  # warm-up
    levels = []
    for c in args.concurrency:
        r = await run_level(client, model, c, args)
        print(f"  concurrency {c:>3}: {r['output_tokens_per_s']:8.1f} tok/s  "
              f"{r['requests_per_s']:6.2f} req/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
              f"TPOT p50 {r['tpot_p50_ms']:6.2f} ms", flush=True)
        levels.append(r)
    return levels


def plot(series: dict[str, list[dict]], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, levels in series.items():
        xs = [lv["concurrency"] for lv in levels]
        a.plot(xs, [lv["output_tokens_per_s"] for lv in levels], marker="o", label=label)
        b.plot(xs, [lv["ttft_p50_ms"] for lv in levels], marker="o", label=f"{label} TTFT p50")
        b.plot(xs, [lv["tpot_p50_ms"] for lv in levels], marker="x", linestyle="--",
               label=f"{label} TPOT p50")
    for ax, title in ((a, "output tokens/s"), (b, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    b.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_load_args(p: argparse.ArgumentParser):
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests-per-worker", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-ratio", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=256, help="max side of random images")
    p.add_argument("--response-format", default=None, help="JSON response_format to send")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="unused")
    p.add_argument("--model", default=None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--label", default="server")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    add_load_args(p)
    args = p.parse_args()
    levels = asyncio.run(bench(args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({args.label: levels}, indent=2))
    if args.plot:
        plot({args.label: levels}, args.plot)


if __name__ == "__main__":
    main()
