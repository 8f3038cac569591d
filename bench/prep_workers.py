"""Request preparation throughput: 1 vs 2 preparation workers, and the pixel cache.

    python -m bench.prep_workers --out bench/results/prep_workers_cpu.json

What the engine's preparation threads (``--prep-workers``) do for an image request,
measured directly: ``PromptBuilder.build`` (chat template, token ids, image preprocessing)
of requests carrying one 1024x1024 synthetic photo each (the server's default budget: 1024
tokens), submitted at once to a thread pool of 1 or 2 workers as ``AsyncEngine`` does.
Every image is a different photo (the pixel cache is off for these rows), so each is
preprocessed.  Rounds alternate between the worker counts and the median round is
reported, to damp the noise of a shared machine; both image paths (``torch``, ``pil``),
with torch's intra-op threads at the default and at 1 (the torch path already spreads one
image over the cores; PIL's does not).  Every round runs every configuration once, in turn.

A last row shows the pixel cache (``--image-cache-mb``): the same requests resent with the
cache warm (every image a hit: no preprocessing, only template and tokens).

The tiny model's processor is used (its tokenizer and template; the image constants are
the real model's: patch 16, merge 2, temporal patch 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.images import SERVER_BUDGET, synthetic_photo
from server.engine.interface import EngineRequest, ImageInput, SamplingParams


def _requests(images, digests=True) -> list[EngineRequest]:
    return [EngineRequest(
        f"r{i}", [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What is in the photo?"}]}],
        [ImageInput(im, *SERVER_BUDGET, digest=f"photo{i}" if digests else "")],
        SamplingParams(max_tokens=16)) for i, im in enumerate(images)]


def _wall(builder, reqs, workers: int) -> float:
    with ThreadPoolExecutor(workers, thread_name_prefix="prep") as ex:
        t0 = time.perf_counter()
        list(ex.map(builder.build, reqs))
        return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["torch", "pil"])
    ap.add_argument("--torch-threads", type=int, nargs="+",
                    default=sorted({torch.get_num_threads(), 1}, reverse=True),
                    help="torch intra-op threads (the torch path's own parallelism)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from models.processor import load_processor
    from models.tiny import build
    from server.engine.prompt import PromptBuilder

    tmp = tempfile.mkdtemp(prefix="bench-prep-")
    build(tmp, seed=0)
    processor = load_processor(tmp)
    images = [synthetic_photo(args.side, args.side, seed=i) for i in range(args.requests)]
    reqs = _requests(images)

    def builder(mode: str, cache_mb: int = 0):
        b = PromptBuilder(processor, max_model_len=32768, default_max_tokens=16,
                          image_preprocess=mode, image_cache_bytes=cache_mb << 20)
        b.build(reqs[0])  # warm up (and, with the cache, one entry of many)
        return b

    # (path, workers, cache label, builder); every round runs each once, in turn, so that
    # the other sessions' load on this box falls on all of them alike
    configs = [(mode, w, "off (every image new)", builder(mode))
               for mode in args.modes for w in args.workers]
    warm = builder(args.modes[0], 512)
    _wall(warm, reqs, max(args.workers))  # every image now cached
    configs.append((args.modes[0], max(args.workers), "warm (every image a hit)", warm))
    rows = []
    for threads in args.torch_threads:
        torch.set_num_threads(threads)
        times: list[list[float]] = [[] for _ in configs]
        for _ in range(args.rounds):
            for i, (_, w, _, b) in enumerate(configs):
                times[i].append(_wall(b, reqs, w))
        for (mode, w, cache, _), ts in zip(configs, times):
            t = statistics.median(ts)
            rows.append({"mode": mode, "workers": w, "cache": cache, "torch_threads": threads,
                         "images_per_s": len(reqs) / t, "median_s": t, "rounds_s": ts})
            print(f"torch threads {threads} {mode:5s} workers {w} cache {cache}: "
                  f"{len(reqs) / t:6.1f} img/s", flush=True)

    base = {(r["mode"], r["cache"], r["torch_threads"]): r["images_per_s"]
            for r in rows if r["workers"] == 1}
    print("\n| path | torch threads | workers | pixel cache | images/s | vs 1 worker |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        b = base.get((r["mode"], r["cache"], r["torch_threads"]))
        print(f"| {r['mode']} | {r['torch_threads']} | {r['workers']} | {r['cache']} | "
              f"{r['images_per_s']:.1f} | " + (f"{r['images_per_s'] / b:.2f}x |" if b else "- |"))
    if args.out:
        meta = {"torch": torch.__version__,
                "machine": platform.machine(), "cpu_count": os.cpu_count(),
                "loadavg": os.getloadavg(), "side": args.side, "requests": args.requests,
                "rounds": args.rounds}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
