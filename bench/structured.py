"""Throughput cost of structured output: the same requests with and without a JSON schema.

    python -m bench.structured --base-url http://127.0.0.1:8080/v1 -n 64 --concurrency 16 \
        --max-tokens 128 --out bench/results/structured_cpu_tiny.json

Starts nothing: it drives a running server through the ``openai`` SDK.  Both runs send the
same prompts (same order, same seeds) at the same concurrency, with a fixed ``max_tokens``
and temperature 0.7; the constrained run adds ``response_format`` of type ``json_schema``
(an order record: strings, an enum, bounded numbers, an array of line items).  Output
tokens/s is completion tokens (from ``usage``) over the wall time of the run; the report
also gives mean completion tokens per request, finish reasons, and for the constrained run
how many outputs parse and validate.  A short warm-up run of each kind comes first (the
first constrained request compiles the schema).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

from openai import AsyncOpenAI

PROMPTS = ["Extract the order from this message: two blue jackets, size M, order 48213.",
           "Turn this into an order record: 1 wireless keyboard at $49.99, ship to London.",
           "Record the return: shoes, wrong size, order 11873, refund requested.",
           "Summarise the cart as an order: a lamp, a chair and a desk.",
           "The customer wants 4 puzzles and 1 robot kit delivered to Berlin.",
           "Create an order for 3 white cups with a blue logo, express shipping."]

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "maxLength": 12},
        "customer": {"type": "string", "maxLength": 24},
        "status": {"enum": ["pending", "shipped", "delivered", "returned"]},
        "express": {"type": "boolean"},
        "items": {"type": "array", "maxItems": 6, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 10},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price": {"type": "number", "minimum": 0, "maximum": 10000}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
    },
    "required": ["order_id", "customer", "status", "express", "items"],
    "additionalProperties": False,
}


async def one(client, model, i: int, args, constrained: bool) -> dict:
    extra = {}
    if constrained:
        extra["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "order", "schema": SCHEMA, "strict": True}}
    r = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=args.max_tokens, temperature=0.7, seed=i, **extra)
    c = r.choices[0]
    valid = None
    if constrained and c.finish_reason == "stop":
        try:
            obj = json.loads(c.message.content)
            valid = True
            try:
                import jsonschema
                jsonschema.validate(obj, SCHEMA)
            except ImportError:
                pass
        except Exception:
            valid = False
    return {"tokens": r.usage.completion_tokens, "finish": c.finish_reason, "valid": valid}


async def run(client, model, args, constrained: bool, n: int) -> dict:
    sem = asyncio.Semaphore(args.concurrency)

    async def guarded(i):
        async with sem:
            return await one(client, model, i, args, constrained)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(i) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    out = {"requests": n, "wall_s": round(wall, 3), "completion_tokens": tokens,
           "output_tokens_per_s": round(tokens / wall, 2),
           "mean_completion_tokens": round(tokens / n, 1),
           "finish_reasons": dict(Counter(r["finish"] for r in results))}
    if constrained:
        checked = [r["valid"] for r in results if r["valid"] is not None]
        out["stop_outputs_valid"] = f"{sum(checked)}/{len(checked)}"
    return out


async def main_async(args) -> dict:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                         timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    for constrained in (False, True):  # warm-up (and the schema's one compile)
        await run(client, model, args, constrained, min(args.concurrency, 4))
    free = await run(client, model, args, False, args.n)
    schema = await run(client, model, args, True, args.n)
    return {"base_url": args.base_url, "model": model, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "temperature": 0.7,
            "unconstrained": free, "json_schema": schema,
            "ratio": round(schema["output_tokens_per_s"] / free["output_tokens_per_s"], 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("-n", type=int, default=64, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
