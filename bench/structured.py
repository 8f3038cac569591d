"""Throughput cost of structured output: the same requests with and without a JSON schema.

    python -m bench.structured --base-url http://127.0.0.1:8080/v1 -n 64 --concurrency 16 \
        --max-tokens 128 --rounds 3 --out bench/results/structured_cpu_tiny.json

Starts nothing: it drives a running server through the ``openai`` SDK.  Both runs send the
same prompts (same order, same seeds) at the same concurrency, with a fixed ``max_tokens``
and temperature 0.7; the constrained run adds ``response_format`` of type ``json_schema``
(an order record: strings, an enum, bounded numbers, an array of line items).  Output
tokens/s is completion tokens (from ``usage``) over the wall time of the run; the report
also gives mean completion tokens per request, finish reasons, and for the constrained run
how many outputs parse and validate.  A short warm-up run of each kind comes first (the
first constrained request compiles the schema).

Constrained outputs end when the JSON is complete, so they are shorter and finish at
staggered times, which changes the batch's shape as well as adding the grammar's cost.
A third run, ``unconstrained_matched``, isolates the grammar's cost: unconstrained again,
each request's ``max_tokens`` set to the length its constrained twin produced (with
``ignore_eos``).  Runs alternate for ``--rounds`` rounds and the medians are reported, to
damp noise on a shared machine (medians and the best round of each kind are reported).
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


async def one(client, model, i: int, args, constrained: bool, max_tokens: int | None) -> dict:
    extra = {}
    if constrained:
        extra["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "order", "schema": SCHEMA, "strict": True}}
    if max_tokens is not None:  # matched length: generate exactly that many tokens
        extra["extra_body"] = {"ignore_eos": True}
    r = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=max_tokens or args.max_tokens, temperature=0.7, seed=i, **extra)
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


async def run(client, model, args, constrained: bool, n: int, lengths=None) -> dict:
    sem = asyncio.Semaphore(args.concurrency)

    async def guarded(i):
        async with sem:
            return await one(client, model, i, args, constrained,
                             lengths[i] if lengths else None)

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
    out["lengths"] = [r["tokens"] for r in results]
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, plus every round's figure and the best one
    (the least disturbed by other load on a shared machine)."""
    ranked = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    mid = {k: v for k, v in ranked[len(ranked) // 2].items() if k != "lengths"}
    mid["rounds_tokens_per_s"] = [r["output_tokens_per_s"] for r in runs]
    mid["best_tokens_per_s"] = ranked[-1]["output_tokens_per_s"]
    return mid


async def main_async(args) -> dict:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                         timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    for constrained in (False, True):  # warm-up (and the schema's one compile)
        await run(client, model, args, constrained, min(args.concurrency, 4))
    frees, schemas, matched = [], [], []
    for _ in range(args.rounds):
        frees.append(await run(client, model, args, False, args.n))
        schemas.append(await run(client, model, args, True, args.n))
        matched.append(await run(client, model, args, False, args.n, schemas[-1]["lengths"]))
    free, schema, same = _median_run(frees), _median_run(schemas), _median_run(matched)
    return {"base_url": args.base_url, "model": model, "concurrency": args.concurrency,
            "requests_per_run": args.n, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "temperature": 0.7,
            "unconstrained": free, "json_schema": schema, "unconstrained_matched": same,
            "ratio": round(schema["output_tokens_per_s"] / free["output_tokens_per_s"], 3),
            "ratio_matched_lengths": round(schema["output_tokens_per_s"]
                                           / same["output_tokens_per_s"], 3),
            "ratio_best": round(schema["best_tokens_per_s"] / free["best_tokens_per_s"], 3),
            "ratio_best_matched_lengths": round(schema["best_tokens_per_s"]
                                                / same["best_tokens_per_s"], 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("-n", type=int, default=64, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
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
