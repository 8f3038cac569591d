"""Host time of the decode step at batch 64, the forward excluded (issue 30, point 4).

    python -m bench.decode_host --model-path /tmp/tiny [--batch 64] [--tokens 64]
        [--context 1000] [--rounds 3]

Runs an ``AsyncEngine`` in-process (no HTTP) with ``--batch`` greedy text requests of
``--tokens`` tokens each (``ignore_eos``) after a prompt of about ``--context`` tokens
(each row's block table grows with it: ~1k tokens is 64 blocks of 16), and
splits each decode step's wall time (the scheduler's ``decode`` stage, ``StageTimers``)
into:

* ``forward``: the model's step (``_DecodeStep.run``: on a GPU, the launches or the graph
  replay; what the device does);
* ``sample``: the sampler's call (its tensor work; on a GPU mostly device time);
* ``host``: the rest: the per-row Python building the step's inputs (ids, positions,
  lengths, block tables), the staging copy, the token read-back, each row's ``accept``
  (stop checks) and the hand-off to the output thread.  On a GPU this is the time between
  one step's sync and the next step's launch, which the device spends idle.

Prints the medians per step (ms) over the steps that ran the full batch, as JSON; with
``--out`` writes them there.  Compare two checkouts by running each (a ``git worktree``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import time

from models.loader import load_model
from server.engine.core import AsyncEngine
from server.engine.interface import EngineRequest, SamplingParams
from server.engine import runner as runner_mod
from server.engine import sampler as sampler_mod
from server.settings import Settings


def _timed(cls, name: str, sink: list[float]):
    orig = getattr(cls, name)

    def wrapper(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **kw)
        finally:
            sink.append(time.perf_counter() - t0)
    setattr(cls, name, wrapper)


async def _round(engine: AsyncEngine, batch: int, tokens: int, context: int):
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i):
        text = f"order {i} status" + " word" * max(0, context - 12)  # ~1 token a word
        req = EngineRequest(f"r{i}", [{"role": "user", "content": text}], [], params)
        async for _ in engine.generate(req, engine.reserve()):
            pass
    await asyncio.gather(*(one(i) for i in range(batch)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=16, help="prompt tokens, about")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--profile", help="write a cProfile of the decode steps (the engine "
                    "thread's, forward and sampler included) to this file")
    args = ap.parse_args()
    prof = cProfile.Profile() if args.profile else None
    s = Settings(model_path=args.model_path, max_num_seqs=args.batch)
    engine = AsyncEngine(load_model(s), s)
    forward: list[float] = []   # every call, appended by the wrappers
    sample: list[float] = []
    steps: list[tuple[int, float, float, float]] = []  # per decode step: rows, total, fwd, smp
    _timed(runner_mod._DecodeStep, "run", forward)
    _timed(sampler_mod.SamplingState, "sample", sample)
    sched = engine.scheduler
    own_decode = sched._decode

    def decode_step():
        n, n_fwd, n_smp = len(sched.batch.rows), len(forward), len(sample)
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        out = own_decode()
        if prof is not None:
            prof.disable()
        # only this step's forward and sample calls (prefill steps sample too)
        steps.append((n, time.perf_counter() - t0, sum(forward[n_fwd:]),
                      sum(sample[n_smp:])))
        return out
    sched._decode = decode_step
    per_round = []
    try:
        for r in range(args.rounds + 1):  # the first round warms up
            steps.clear()
            asyncio.run(_round(engine, args.batch, args.tokens, args.context))
            if r == 0:
                continue
            full = [x for x in steps if x[0] == args.batch]

            def med(f):
                return round(statistics.median(f(x) for x in full) * 1e3, 3)
            per_round.append({
                "steps_full_batch": len(full),
                "decode_ms": med(lambda x: x[1]), "forward_ms": med(lambda x: x[2]),
                "sample_ms": med(lambda x: x[3]), "host_ms": med(lambda x: x[1] - x[2] - x[3]),
            })
    finally:
        engine.close()
    if prof is not None:
        prof.dump_stats(args.profile)
    result = {"batch": args.batch, "tokens": args.tokens, "context": args.context,
              "model": args.model_path,
              "rounds": per_round,
              "median_host_ms": statistics.median(r["host_ms"] for r in per_round)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
