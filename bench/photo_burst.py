"""A burst of photo requests through the engine (no HTTP), this checkout against another.

    python -m bench.photo_burst --model /tmp/mid --old /tmp/oldmain [--n 32] [--side 512]
                                [--rounds 3] [--out bench/results/photo_burst_cpu.json]

``--n`` requests, each with a fresh ``--side`` x ``--side`` photo at a budget of exactly
its size ((side/32)^2 image tokens), 8 greedy tokens each, all sent at once to a warmed
engine (``AsyncEngine.generate``, the batching scheduler).  Reports the whole burst's
time and TTFT p50/p90.  With ``--old DIR`` each round runs the same burst in a
subprocess whose ``server`` package comes from DIR (a ``git worktree`` of the previous
``main``) and one from this checkout, alternately; the median round of each is
reported, with the ratio new/old.  Only engine interfaces both versions have are used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE = r"""
import asyncio, json, sys, time
import torch
from PIL import Image
from models.loader import load_model
from server.engine.core import AsyncEngine
from server.engine.interface import EngineRequest, ImageInput, SamplingParams
from server.settings import Settings

model, n, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
s = Settings(model_path=model, min_pixels=side * side, max_pixels=side * side,
             max_num_seqs=n)
engine = AsyncEngine(load_model(s), s)

def req(i, seed):
    im = Image.effect_noise((side, side), 20 + seed % 60).convert("RGB")
    return EngineRequest(f"r{seed}", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"Is parcel {i} damaged?"}]}],
        [ImageInput(im, side * side, side * side)],
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

async def one(r, t0):
    first = None
    async for o in engine.generate(r, engine.reserve()):
        first = first or time.perf_counter() - t0
    return first

async def main():
    await one(req(0, 10_000), time.perf_counter())  # warm-up
    t0 = time.perf_counter()
    ttft = await asyncio.gather(*(one(req(i, i), t0) for i in range(n)))
    total = time.perf_counter() - t0
    ttft.sort()
    print(json.dumps({"total_s": round(total, 3),
                      "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
                      "ttft_p90_s": round(ttft[int(len(ttft) * 0.9)], 3)}))
asyncio.run(main())
engine.close()
"""


def run_once(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", ONE, args.model, str(args.n), str(args.side),
                          str(args.threads)], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--old", help="a checkout of the previous main to compare with")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    trees = {"new": ROOT, **({"old": Path(args.old)} if args.old else {})}
    rounds = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(run_once(tree, args))
            print(f"round {r} {name}: {rounds[name][-1]}", flush=True)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
               for name, rs in rounds.items()}
    if "old" in summary:
        summary["new/old"] = {k: round(summary["new"][k] / summary["old"][k], 3)
                              for k in summary["new"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds,
                                              "median": summary}, indent=1))


if __name__ == "__main__":
    main()
