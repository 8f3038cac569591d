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
* ``host``: the rest (wall time, and ``host_cpu``: the engine thread's own CPU time in
  it, ``time.thread_time``, which leaves out the waits for the GIL that the output thread
  holds meanwhile: the host's own work, steadier on a shared box): the per-row Python building the step's inputs (ids, positions,
  lengths, block tables), the staging copy, the token read-back, each row's ``accept``
  (stop checks) and the hand-off to the output thread.  On a GPU this is the time between
  one step's sync and the next step's launch, which the device spends idle.

``--stub-device`` leaves only the host's work in the step (see its help): the figure to
compare between checkouts, since on this CPU the real forward flushes the caches and the
output thread's turns on the GIL land in the host's part.

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


def _timed(cls, name: str, sink: list[tuple[float, float]]):
    orig = getattr(cls, name)

    def wrapper(self, *a, **kw):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return orig(self, *a, **kw)
        finally:
            sink.append((time.perf_counter() - t0, time.thread_time() - c0))
    setattr(cls, name, wrapper)


async def _round(engine: AsyncEngine, batch: int, tokens: int, context: int):
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i):
        text = f"order {i} status" + " word" * max(0, context - 12)  # ~1 token a word
        req = EngineRequest(f"r{i}", [{"role": "user", "content": text}], [], params)
        async for _ in engine.generate(req, engine.reserve()):
            pass
    await asyncio.gather(*(one(i) for i in range(batch)))


def _stub(cls, name: str, key):
    """``cls.name`` returns, per ``key``, what its first call returned."""
    orig, seen = getattr(cls, name), {}

    def stub(self, *a, **kw):
        k = key(self, a, kw)
        if k not in seen:
            seen[k] = orig(self, *a, **kw)
        return seen[k]
    setattr(cls, name, stub)


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
    ap.add_argument("--stub-device", action="store_true", help="after the warm-up round, "
                    "the model's step and the sampler return what they returned the first "
                    "time for that batch (no compute): what is left is the host's work with "
                    "warm CPU caches, as on a GPU box, where the forward does not stream the "
                    "weights through the CPU's caches between two steps")
    args = ap.parse_args()
    prof = cProfile.Profile() if args.profile else None
    s = Settings(model_path=args.model_path, max_num_seqs=args.batch)
    engine = AsyncEngine(load_model(s), s)
    forward: list[tuple[float, float]] = []   # every call (wall, thread CPU), by the wrappers
    sample: list[tuple[float, float]] = []
    steps: list[tuple] = []  # per decode step: rows, total, fwd, smp (wall), then thread CPU
    _timed(runner_mod._DecodeStep, "run", forward)
    _timed(sampler_mod.SamplingState, "sample", sample)
    sched = engine.scheduler
    own_decode = sched._decode

    def decode_step():
        n, n_fwd, n_smp = len(sched.batch.rows), len(forward), len(sample)
        t0, c0 = time.perf_counter(), time.thread_time()
        if prof is not None:
            prof.enable()
        out = own_decode()
        if prof is not None:
            prof.disable()
        # only this step's forward and sample calls (prefill steps sample too)
        f, s = forward[n_fwd:], sample[n_smp:]
        steps.append((n, time.perf_counter() - t0, sum(x[0] for x in f), sum(x[0] for x in s),
                      time.thread_time() - c0, sum(x[1] for x in f), sum(x[1] for x in s)))
        return out
    sched._decode = decode_step
    per_round = []
    try:
        for r in range(args.rounds + 1):  # the first round warms up
            if r == 1 and args.stub_device:
                _stub(runner_mod._DecodeStep, "run", lambda self, a, kw: id(self))
                _stub(sampler_mod.SamplingState, "sample",
                      lambda self, a, kw: (len(self.params), a[1] is None))
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
                "host_cpu_ms": med(lambda x: x[4] - x[5] - x[6]),
            })
    finally:
        engine.close()
    if prof is not None:
        prof.dump_stats(args.profile)
    result = {"batch": args.batch, "tokens": args.tokens, "context": args.context,
              "model": args.model_path,
              "rounds": per_round,
              "median_host_ms": statistics.median(r["host_ms"] for r in per_round),
              "median_host_cpu_ms": statistics.median(r["host_cpu_ms"] for r in per_round)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
