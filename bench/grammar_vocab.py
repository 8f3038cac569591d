"""What the vocabulary costs the grammar engine: tokenizer setup, compile time, compiled
size (xgrammar's own estimate and the serialised bytes) and the process's memory growth,
for a few realistic schemas and a large tools list, per model folder.

    python -m bench.grammar_vocab /tmp/tiny-toy /tmp/tiny-real --out bench/results/grammar_vocab.json

Uses the server's own ``GrammarCache`` (the same tokenizer preparation, the same compile
calls, in this process: no worker pool) so the figures are what the server pays per
schema. Each case compiles once cold; RSS is read from /proc after each compile and the
compiled grammars are kept alive, so growth accumulates like a cache that holds them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.structured import SCHEMA as ORDER_SCHEMA
from server.engine.structured import GrammarCache, GrammarSpec, _grammar_bytes


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tools(n: int) -> list[tuple[str, dict]]:
    """n functions in a shop bot's style: an id, an enum, a nested address, a list."""
    return [(f"shop_action_{i}", {
        "type": "object", "additionalProperties": False,
        "required": ["order_id", "reason"],
        "properties": {
            "order_id": {"type": "string", "maxLength": 16},
            "reason": {"enum": ["late", "damaged", "wrong_item", "other"]},
            "note": {"type": "string", "maxLength": 200},
            "address": {"type": "object", "additionalProperties": False,
                        "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
            "items": {"type": "array", "maxItems": 10, "items": {"type": "integer", "minimum": 1}},
        }}) for i in range(n)]


def wide_schema(props: int) -> dict:
    return {"type": "object", "additionalProperties": False,
            "required": [f"p{i}" for i in range(props)],
            "properties": {f"p{i}": {"type": "string", "maxLength": 8} for i in range(props)}}


CASES = {
    "json_object": GrammarSpec.json_object(),
    "order_schema": GrammarSpec.json_schema(ORDER_SCHEMA),
    "wide_64_properties": GrammarSpec.json_schema(wide_schema(64)),
    "tools_8": GrammarSpec.tool_calls(tools(8), parallel=True),
    "tools_32": GrammarSpec.tool_calls(tools(32), parallel=True),
}


def measure(model_dir: str) -> dict:
    from transformers import AutoConfig

    from models.processor import load_processor
    tok = load_processor(model_dir).tokenizer
    cfg = AutoConfig.from_pretrained(model_dir)
    vocab = cfg.text_config.vocab_size
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    cache = GrammarCache(tok, vocab_size=vocab, stop_ids=stop)
    base = rss_mb()
    t0 = time.perf_counter()
    cache._get_compiler()
    out = {"model": model_dir, "vocab_size": vocab, "tokenizer_len": len(tok),
           "tokenizer_info_s": round(time.perf_counter() - t0, 3),
           "tokenizer_info_rss_mb": round(rss_mb() - base, 1), "cases": {}}
    keep = []
    for name, spec in CASES.items():
        before = rss_mb()
        t0 = time.perf_counter()
        compiled = cache._compile(spec)
        secs = time.perf_counter() - t0
        keep.append(compiled)
        out["cases"][name] = {
            "compile_s": round(secs, 3),
            "xgrammar_estimate_mb": round(_grammar_bytes(compiled) / 2**20, 2),
            "serialized_mb": round(len(compiled.serialize_json()) / 2**20, 2),
            "rss_growth_mb": round(rss_mb() - before, 1)}
        print(json.dumps({"model": Path(model_dir).name, name: out["cases"][name]}), flush=True)
    out["rss_total_growth_mb"] = round(rss_mb() - base, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grammar_vocab", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = [measure(d) for d in args.model_dirs]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
