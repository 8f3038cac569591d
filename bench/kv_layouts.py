"""KV-cache layouts side by side: the engine's preallocated slabs vs HF's ``DynamicCache``.

    python -m bench.kv_layouts --batch 32 --context 1024 --steps 64

Builds a random Qwen3-VL text stack of moderate size (float32, CPU unless CUDA is there),
prefills ``batch`` rows of ``context`` tokens once, then times ``steps`` decode steps with
each layout (same model, same inputs, alternating rounds; median reported).  The slab
layout writes each new key/value column in place; ``DynamicCache`` concatenates the whole
cache at every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer

from server.engine.batch import DecodeBatch, new_cache


def model_for(args):
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=args.hidden // 8, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": [args.hidden // 32, args.hidden // 64 + args.hidden // 128, args.hidden // 64 - args.hidden // 128],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=args.hidden, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]))
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def run(model, make_cache, args, dev) -> float:
    b, t = args.batch, args.context
    ids = torch.randint(0, 4000, (b, t), device=dev)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    cache = make_cache()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        batch = DecodeBatch(cache, mask, torch.full((b,), t, device=dev), ids[:, -1], [None] * b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = model(**batch.decode_inputs())
            batch.advance(out.logits[:, -1].argmax(-1))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_for(args).to(dev)
    layers = args.layers
    layouts = {"slab (engine)": lambda: new_cache(layers),
               "DynamicCache (torch.cat)": lambda: Cache(layers=[DynamicLayer() for _ in range(layers)])}
    times = {k: [] for k in layouts}
    for _ in range(args.rounds):
        for name, make in layouts.items():
            times[name].append(run(model, make, args, dev))
    print(f"batch {args.batch}, context {args.context}, {args.steps} decode steps, "
          f"hidden {args.hidden}, {args.layers} layers, {dev.type}")
    for name, ts in times.items():
        print(f"  {name:26s} {statistics.median(ts):7.2f} ms/step  (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ts)})")


if __name__ == "__main__":
    main()
