"""One-shot GPU check (issue 11): eager decode vs CUDA graphs on the full-size random model.

    python -m bench.gpu_check [--device cuda|cpu] [--out FILE.json] [--profile]
                              [--set NAME=VALUE ...]

Builds the model in memory (``models.tiny.build_in_memory``: the real Qwen3-VL-2B shapes,
random weights, bf16, created directly on the GPU: nothing is written to disk), then runs the
same workload twice through the engine itself (``server.engine.core.AsyncEngine``, requests
via ``AsyncEngine.generate(EngineRequest(...), engine.reserve())``: no HTTP layer), once with
``enforce_eager=True`` and once with ``enforce_eager=False``, and reports for each:

* time per output token at batch 1 (one greedy request, ``ignore_eos``);
* decode tokens/s at batch 16 and 64 with ~1k tokens of context each (counted in the window
  where every row of the batch is decoding);
* TTFT of one request with a 1024x1024 image at batch 1 (median of a few, a fresh image each);
* throughput of 64 concurrent requests, each with its own 1024x1024 image, with the
  engine's per-stage timers (``engine.timers``: preparation, admission, encoder, prefill,
  decode; host and CUDA-event time) and, with ``--profile``, a trace of 3 early engine
  steps; again at a step budget of 1,024 tokens when the engine's is larger;
* peak GPU memory (``torch.cuda.max_memory_allocated``, weights included);
* the decode path the engine reports (``engine.decode_path``: "cuda-graphs" or "eager"), at
  startup and at the end (a capture that fails later turns it eager), and the number of
  decode graphs captured;

(``--profile``: two more batch-1 requests per mode under ``torch.profiler``, a text one and
one image: device time and kernel count against wall time per decode step, the top ops;
gzipped Chrome traces of the graphs mode beside ``--out``)
and one correctness line: the token ids of 8 concurrent greedy requests (text prompts of
one length) with CUDA graphs equal those of the eager run (same dtype).  It prints a table
and writes one JSON file (``--out``, default ``bench/results/gpu_check_<device>.json``).  The
whole run is sized to finish within 10 minutes on an H200.

``--device cpu`` runs the same code on the tiny model (float32) with a scaled-down workload
(batches 4 and 8, ~128-token contexts, 256x256 images, a few tokens each) in well under a
minute: the tests run it with fastapi, pydantic, pydantic-settings, xgrammar, openai,
uvicorn, bitsandbytes and prometheus_client blocked.  On CPU both columns run eagerly (the
same static-buffer path).  ``--device cpu --workload cuda`` runs the GPU's full request mix
on the tiny model (about a minute here): a dry run of the GPU workload's sizes.  A part that fails is
reported (``"error"`` in its mode, ``"complete": false``, exit status 1) and the other mode
still runs; the JSON is rewritten after every part, so a run cut short keeps what it
measured.

Carrying it to the GPU machine
------------------------------
The device tool copies the working tree (tracked and untracked, not ignored files) and runs
the command in its root, so from a checkout:

    run(command="python -m bench.gpu_check --out $OUT/gpu_check.json", timeout_s=600)

(no ``.venv``: the image's own python has what it needs; nothing to ``carry``).  Expect a few
minutes: building the model on the GPU, two engine startups (the second captures the decode
graphs), and per column about 1,300 decode steps.  The JSON is rewritten after every part, so
even a run cut short by the timeout returns what it measured under ``$OUT``.

The H200 image has torch, transformers, tokenizers, safetensors, accelerate, PIL and numpy,
which is all this check imports: it needs no wheels brought along and no network.  It never
imports ``server.settings`` (pydantic): the engine's settings are the defaults of the one
settings definition, read from ``server/settings.py``'s source (``settings_defaults``), with
a few overrides: ``device_map``, ``dtype`` (bfloat16 on cuda), ``max_model_len`` (4096),
``max_num_seqs`` (64), ``seed`` and, per column, ``enforce_eager``.  Nor does the engine import xgrammar unless a request asks for a
grammar (without it, structured output answers 400; this check sends none).  The tokenizer
is the tiny one (trained in a second at startup); token ids past it decode to nothing, which
does not matter for timing.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import builtins
import functools
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
MODES = ("eager", "graphs")  # the table's two columns
# decode-only columns (issue 30): batch-1 time per token, decode at each batch, the batch-1
# profile (kernels per token); no images, no correctness batch
EXTRA = {"compiled": dict(compile=True),      # graphs + --compile
         "reference": dict(kernels="torch")}  # graphs + the kernels' torch reference
MODE_SETTINGS = {"eager": dict(enforce_eager=True), "graphs": {}, **EXTRA}


# --- settings without pydantic -------------------------------------------------------

def settings_defaults(path: Path = ROOT / "server" / "settings.py") -> dict:
    """Every field of ``server.settings.Settings`` with its default, read from the source
    (the GPU image has no pydantic): ``name: T = Field(default, ...)``,
    ``Field(default_factory=list)`` and plain ``name: T = value``."""
    tree = ast.parse(path.read_text())
    consts: dict = {}
    for node in tree.body:  # module-level constants a default may name (HUB_ID, ...)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = _eval(node.value, consts)
            except Exception:
                pass
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.value is not None) or node.target.id.startswith("_") \
                or node.target.id == "model_config":
            continue
        v, name = node.value, node.target.id
        try:
            if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "Field":
                kw = {k.arg: k.value for k in v.keywords}
                if v.args:
                    out[name] = _eval(v.args[0], consts)
                elif "default" in kw:
                    out[name] = _eval(kw["default"], consts)
                elif "default_factory" in kw:
                    out[name] = _eval(kw["default_factory"], consts)()
                else:  # required: no default
                    out[name] = None
            else:
                out[name] = _eval(v, consts)
        except Exception as exc:  # a default this reader cannot evaluate: say so, go on
            print(f"settings_defaults: {name}: cannot evaluate its default ({exc!r}); "
                  "using None", file=sys.stderr)
            out[name] = None
    return out


_SAFE = {n: getattr(builtins, n) for n in ("list", "dict", "set", "tuple", "int", "float",
                                            "str", "bool", "min", "max", "len")}


def _eval(node: ast.AST, names: dict):
    return eval(compile(ast.Expression(node), "<settings>", "eval"), {"__builtins__": _SAFE},
                dict(names))


def engine_settings(**overrides) -> SimpleNamespace:
    """A settings object for ``AsyncEngine``: the defaults plus ``overrides``."""
    values = settings_defaults()
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"not settings: {sorted(unknown)}")
    return SimpleNamespace(**{**values, **overrides})


# --- workload --------------------------------------------------------------------------

@dataclass
class Workload:
    tpot_tokens: int            # output tokens of the batch-1 request
    decode_batches: tuple       # batch sizes of the decode rows
    decode_context: int         # prompt tokens of each decode row
    decode_tokens: int          # output tokens of each decode row
    image_size: int             # side of the square test images
    image_ttft_reps: int        # sequential single-image requests (median TTFT)
    image_requests: int         # concurrent image requests (throughput)
    image_tokens: int           # output tokens of each image request
    correctness_batch: int
    correctness_tokens: int
    max_model_len: int
    max_num_seqs: int


WORKLOADS = {
    "cuda": Workload(tpot_tokens=256, decode_batches=(16, 64), decode_context=1024,
                     decode_tokens=256, image_size=1024, image_ttft_reps=5, image_requests=64,
                     image_tokens=128, correctness_batch=8, correctness_tokens=64,
                     max_model_len=4096, max_num_seqs=64),
    "cpu": Workload(tpot_tokens=24, decode_batches=(4, 8), decode_context=128, decode_tokens=12,
                    image_size=256, image_ttft_reps=2, image_requests=8, image_tokens=6,
                    correctness_batch=8, correctness_tokens=12, max_model_len=2048,
                    max_num_seqs=16),
}

QUESTIONS = ["What colour and style is this product?", "Is this item damaged? Answer briefly.",
             "Where is my parcel? Order 48213 was shipped on Monday.",
             "Write a short, friendly reply to a customer asking about returns.",
             "Read the order number on this screenshot.", "Summarise the customer's problem.",
             "Can I exchange these shoes for a larger pair?", "你好，请问有什么可以帮您？"]


def context_text(tokenizer, tokens: int, seed: int) -> str:
    """Shop-support text of ``tokens`` tokens (or within a token or two), different for each
    seed."""
    from models.tiny import corpus
    lines = corpus()
    rng = random.Random(seed)
    parts, est = [], 0
    while est < tokens * 1.3 + 50:
        line = rng.choice(lines)
        parts.append(line)
        est += max(1, len(line) // 3)
    ids = tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:  # the estimate fell short: double up
        ids = ids + ids
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    head = f"Ticket {seed}."
    base = max(1, tokens - count(head))
    for cut in (base, base - 1, base + 1, base - 2, base + 2):  # exactly ``tokens`` if we can
        text = head + tokenizer.decode(ids[:cut])
        if count(text) == tokens:
            break
    return text


@functools.lru_cache(maxsize=256)
def noise_image(size: int, seed: int):
    """A fresh random photo stand-in: noise over a gradient (no two seeds alike)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed % 2**32)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, 3)[None, None, :]
            + ramp[:, None, None] * rng.uniform(0.0, 0.5, 3)[None, None, :])
    img = np.clip(base * 0.6 + rng.integers(0, 100, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


class Runner:
    """Sends requests to one engine and times their events."""

    def __init__(self, engine, settings, tokenizer):
        self.engine, self.settings, self.tokenizer = engine, settings, tokenizer
        self.n = 0

    def request(self, text: str, max_tokens: int, image=None):
        from server.engine.interface import EngineRequest, ImageInput, SamplingParams
        self.n += 1
        content = text if image is None else [{"type": "image"}, {"type": "text", "text": text}]
        images = [] if image is None else [ImageInput(image, self.settings.min_pixels,
                                                      self.settings.max_pixels)]
        return EngineRequest(request_id=f"check-{self.n}",
                             messages=[{"role": "user", "content": content}], images=images,
                             params=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                   ignore_eos=True))

    async def run(self, req) -> dict:
        t0 = time.perf_counter()
        events, ids, prompt = [], [], 0
        async for out in self.engine.generate(req, self.engine.reserve()):
            if out.token_ids:
                events.append((time.perf_counter(), len(out.token_ids)))
                ids += out.token_ids
            prompt = out.prompt_tokens or prompt
        return {"t0": t0, "events": events, "ids": ids, "prompt_tokens": prompt,
                "ttft": events[0][0] - t0 if events else None}

    async def run_all(self, reqs) -> list[dict]:
        return await asyncio.gather(*(self.run(r) for r in reqs))


def decode_rate(results: list[dict]) -> tuple[float, float]:
    """Output tokens/s while every row is decoding: from the moment the last row got its
    first token to the moment the first row got its last; and that window's length in s
    (0.0: the rows never all decoded at once, and the rate is over the whole span)."""
    start = max(r["events"][0][0] for r in results)
    end = min(r["events"][-1][0] for r in results)
    if end - start > 1e-3:
        n = sum(k for r in results for t, k in r["events"] if start < t <= end)
        if n:
            return n / (end - start), end - start
    start = min(r["events"][0][0] for r in results)
    end = max(r["events"][-1][0] for r in results)
    n = sum(k for r in results for _, k in r["events"][1:])
    return n / max(end - start, 1e-9), 0.0


async def profile_request(r: "Runner", req, out_dir: Path, name: str,
                          trace: bool = True) -> dict:
    """Run ``req`` alone under ``torch.profiler`` (CPU ops of every thread + CUDA
    kernels): the kernels' summed device time and count against the wall time of its
    decode steps (what is left is host time: Python, launches, the one sync); the top
    kernels/ops tables (``profile_<name>.txt``) and, with ``trace``, a gzipped Chrome trace
    (``trace_<name>.json.gz``) under ``out_dir``.  A profiler that fails is reported,
    never raised."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile
    try:
        cuda = torch.cuda.is_available()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        try:  # the steps run on the engine's model thread, not this one
            cfg = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        except Exception:
            cfg = None
        with profile(activities=acts, experimental_config=cfg) as prof:
            x = await r.run(req)
        first_t, first_n = x["events"][0]
        steps = len(x["ids"]) - first_n
        out_dir.mkdir(parents=True, exist_ok=True)
        ka = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        (out_dir / f"profile_{name}.txt").write_text(
            ka.table(sort_by=sort, row_limit=40) + "\n\n"
            + ka.table(sort_by="cpu_time_total", row_limit=40))
        path = out_dir / f"trace_{name}.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
        kernels = [e for e in events if e.get("cat") == "kernel"]
        device_ms = sum(e.get("dur", 0) for e in events
                        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")) / 1000
        if trace:
            with open(path, "rb") as f, gzip.open(str(path) + ".gz", "wb") as g:
                g.write(f.read())
        path.unlink()
        tokens = len(x["ids"])
        return {"tokens": tokens, "prompt_tokens": x["prompt_tokens"],
                "ttft_ms": 1000 * x["ttft"], "decode_steps": steps,
                "decode_wall_ms_per_step": (1000 * (x["events"][-1][0] - first_t)
                                            / max(steps, 1)),
                "request_wall_ms": 1000 * (x["events"][-1][0] - x["t0"]),
                "device_time_ms": device_ms, "kernels": len(kernels),
                "device_ms_per_token": device_ms / max(tokens, 1),
                "kernels_per_token": len(kernels) / max(tokens, 1)}
    except Exception as exc:
        return {"error": repr(exc)}


async def image_burst(r: "Runner", engine, w: Workload, seed: int, budget,
                      profile_dir: Path | None, tag: str) -> dict:
    """``w.image_requests`` concurrent requests with a fresh image each: throughput, TTFT,
    the engine's per-stage timers (``engine.timers``) and its prefill steps; with
    ``profile_dir``, a torch.profiler trace of engine steps 2-4 of the burst (the engine
    thread's ops; the preparation threads' host time is in the stage timers)."""
    images = [noise_image(w.image_size, seed + i) for i in range(w.image_requests)]
    reqs = [r.request(QUESTIONS[i % len(QUESTIONS)], w.image_tokens, im)
            for i, im in enumerate(images)]
    timers, sched = engine.timers, engine.scheduler
    timers.reset()
    timers.enable()
    steps = StepProfile(sched, profile_dir, f"burst_{tag}", first=2, last=4)
    t = time.perf_counter()
    try:
        with steps:
            xs = await r.run_all(reqs)
    finally:
        wall = time.perf_counter() - t
        timers.enable(False)
    out = {"requests": w.image_requests, "output_tokens": w.image_tokens,
           "step_budget": budget,
           "tokens_per_s": sum(len(x["ids"]) for x in xs) / wall,
           "requests_per_s": len(xs) / wall, "wall_s": wall,
           "ttft_p50_ms": 1000 * statistics.median(x["ttft"] for x in xs),
           "ttft_max_ms": 1000 * max(x["ttft"] for x in xs),
           "stages": timers.report()}
    if steps.trace:
        out["profile_trace"] = steps.trace
    return out


class StepProfile:
    """With a ``profile_dir``: a torch.profiler trace (``profile_<name>.json``) of engine
    steps ``first``..``last`` of what runs inside the ``with`` (the engine thread's ops,
    CPU and CUDA), started and stopped on the engine thread; without one, nothing."""

    def __init__(self, sched, profile_dir: Path | None, name: str, first=3, last=6):
        self.sched, self.dir, self.name = sched, profile_dir, name
        self.first, self.last, self.trace = first, last, None

    def __enter__(self):
        if self.dir is None:
            return self
        import torch
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        real, n, prof = self.sched.step, [0], [None]

        def step():
            n[0] += 1
            if n[0] == self.first:
                prof[0] = torch.profiler.profile(activities=acts)
                prof[0].__enter__()
            try:
                real()
            finally:
                if n[0] == self.last and prof[0] is not None:
                    prof[0].__exit__(None, None, None)
                    self.dir.mkdir(parents=True, exist_ok=True)
                    prof[0].export_chrome_trace(str(self.dir / f"profile_{self.name}.json"))
                    self.trace = f"profile_{self.name}.json"
        self._real, self.sched.step = real, step
        return self

    def __exit__(self, *exc):
        if self.dir is not None:
            self.sched.step = self._real


async def measure_mode(loaded, settings, w: Workload, device: str, seed: int,
                       res: dict, note=lambda msg: None,
                       profile_dir: Path | None = None, tag: str = "mode") -> dict:
    """Start an engine with ``settings``, run the workload into ``res`` (filled as it goes:
    what was measured survives a later failure), shut the engine down.  ``note(msg)`` is
    called after each part."""
    import torch

    from server.engine.core import AsyncEngine

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    engine = AsyncEngine(loaded, settings)
    startup = time.perf_counter() - t
    tok = loaded.processor.tokenizer
    r = Runner(engine, settings, tok)
    res.update({"decode_path": getattr(engine, "decode_path", "eager"),
                "engine_startup_s": round(startup, 3)})
    note(f"engine started in {startup:.1f} s, decode path {res['decode_path']}")
    try:
        # warm-up: every kind of request once (lazy initialisation, allocator, kernels)
        await r.run_all([r.request("Hello!", 4), r.request("Hi there.", 4),
                         r.request("What is this?", 2, noise_image(w.image_size, seed + 999))])

        # 1. time per output token at batch 1 (best of two)
        tpots = []
        for i in range(2):
            x = await r.run(r.request(QUESTIONS[i], w.tpot_tokens))
            first_t, first_n = x["events"][0]
            n = len(x["ids"]) - first_n
            tpots.append((x["events"][-1][0] - first_t) / max(n, 1))
        res["tpot_batch1_ms"] = 1000 * min(tpots)
        note(f"{res['tpot_batch1_ms']:.2f} ms per output token at batch 1")

        # 2. decode tokens/s at each batch with ~decode_context tokens of context
        res["decode"] = []
        for b in w.decode_batches:
            reqs = [r.request(context_text(tok, w.decode_context, seed + 100 * b + i),
                              w.decode_tokens) for i in range(b)]
            # the largest batch: a trace of 4 decode steps well past its prefill
            steps = StepProfile(engine.scheduler,
                                profile_dir if b == max(w.decode_batches) else None,
                                f"decode_batch{b}_{tag}", first=w.decode_tokens // 2,
                                last=w.decode_tokens // 2 + 3)
            with steps:
                xs = await r.run_all(reqs)
            rate, window = decode_rate(xs)
            res["decode"].append({"batch": b,
                                  "context_tokens": round(statistics.mean(
                                      x["prompt_tokens"] for x in xs)),
                                  "output_tokens": w.decode_tokens,
                                  "tokens_per_s": rate, "step_ms": 1000 * b / rate,
                                  "window_s": window})
            note(f"decode at batch {b}: {rate:.0f} tok/s")

        if tag in EXTRA:  # a decode-only column: its batch-1 profile, and done
            if profile_dir is not None:
                res["profile"] = await profile_request(r, r.request(QUESTIONS[3], 24),
                                                       profile_dir, tag, trace=False)
                note(f"profile: {res['profile']}")
            return res

        # 3. TTFT of one image request at batch 1 (a fresh image each time: no cache helps)
        ttfts = []
        for i in range(w.image_ttft_reps):
            x = await r.run(r.request("Describe this photo.", 2,
                                      noise_image(w.image_size, seed + 2000 + i)))
            ttfts.append(x["ttft"])
            res["image_prompt_tokens"] = x["prompt_tokens"]
        res["image_ttft_ms"] = 1000 * statistics.median(ttfts)
        note(f"image TTFT {res['image_ttft_ms']:.1f} ms")

        # 4. throughput: image_requests concurrent requests, one fresh image each, with
        # per-stage timers (host and CUDA-event time), at the engine's step budget and
        # again at 1,024 tokens (fresh images: no cache helps either run)
        sched = engine.scheduler
        budgets = [getattr(sched, "chunk", None)]
        if budgets[0] not in (None, 1024):
            budgets.append(1024)
        for k, budget in enumerate(budgets):
            if budget is not None:
                sched.chunk = budget
            key = "image_batch" if k == 0 else f"image_batch_budget_{budget}"
            res[key] = await image_burst(r, engine, w, seed + 3000 + 1000 * k, budget,
                                         profile_dir if k == 0 else None, tag)
            note(f"{w.image_requests} image requests at a step budget of {budget}: "
                 f"{res[key]['tokens_per_s']:.0f} tok/s, stages {res[key]['stages']}")
        if budgets[0] is not None:
            sched.chunk = budgets[0]

        # 5. correctness material: greedy token ids of a batch of 8 text prompts of one
        # length (no padding, whichever steps admit them: in bf16 a different grouping
        # alone can change a token, and that is not what this line is about)
        reqs = [r.request(context_text(tok, 96, seed + 5000 + i), w.correctness_tokens)
                for i in range(w.correctness_batch)]
        xs = await r.run_all(reqs)
        res["correctness_ids"] = [x["ids"] for x in xs]
        note("correctness batch done")

        # 6. where a batch-1 step's time goes (optional, last: it cannot spoil the figures)
        if profile_dir is not None:
            res["profile"] = await profile_request(r, r.request(QUESTIONS[3], 24),
                                                   profile_dir, tag, trace=tag == "graphs")
            note(f"profile: {res['profile']}")
            res["profile_image"] = await profile_request(
                r, r.request("Describe this photo.", 2, noise_image(w.image_size, seed + 7000)),
                profile_dir, f"image_{tag}", trace=tag == "graphs")
            note(f"image profile: {res['profile_image']}")
    finally:
        res["peak_gpu_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30) if cuda else None
        res.update(decode_path_now(engine))
        await engine.shutdown(30)
        del engine, r
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return res


def decode_path_now(engine) -> dict:
    """The decode path at the end of the run (a graph capture that fails later, for a new
    table width, turns the runner eager) and how many decode graphs were captured."""
    runner = getattr(engine, "runner", None)
    path = getattr(runner, "decode_path", None) or getattr(engine, "decode_path", "eager")
    try:
        graphs = sum(1 for st in runner.steps.values() if getattr(st, "graph", None) is not None)
    except Exception:
        graphs = None
    return {"decode_path_end": path, "graphs_captured": graphs,
            "decode_compiled": getattr(runner, "compiled", None) is not None}


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    firsts = []
    for x, y in zip(a, b):
        d = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if d is None and len(x) != len(y):
            d = min(len(x), len(y))
        firsts.append(d)
    same = sum(d is None for d in firsts)
    return {"batch": len(a), "sequences_equal": same, "equal": same == len(a) and len(a) > 0,
            "first_divergence": firsts}


# --- model -----------------------------------------------------------------------------

def load(device: str, settings, via_loader: bool, seed: int):
    """The ``LoadedModel`` the engine takes: the full-size model built on the GPU (or the
    tiny one on CPU), in memory; ``via_loader`` saves it to a temporary folder and loads it
    through ``models.loader.load_model`` instead (as the server does)."""
    import torch

    from models import tiny
    from models.loader import LoadedModel, load_model, video_support
    from models.processor import _set_default_budget

    full = device == "cuda"
    if via_loader:
        import tempfile
        tmp = tempfile.mkdtemp(prefix="gpu_check_model_")
        tiny.build(tmp, seed=seed, full_size=full, check=False)
        return load_model(SimpleNamespace(**{**vars(settings), "model_path": tmp})), tmp
    model, processor = tiny.build_in_memory(
        seed, check=False, full_size=full, device=device,
        dtype=torch.bfloat16 if full else torch.float32,
        attn_implementation=settings.attn_implementation)
    _set_default_budget(processor, settings.min_pixels, settings.max_pixels)
    max_len = min(settings.max_model_len, model.config.get_text_config().max_position_embeddings)
    return LoadedModel(model=model, processor=processor, model_id="random-qwen3-vl-"
                       + ("2b" if full else "tiny"), max_model_len=max_len,
                       device=next(model.parameters()).device,
                       supports_video=video_support(model)), None


# --- report ----------------------------------------------------------------------------

def rows(report: dict) -> list[tuple[str, str, str]]:
    """The table's rows; a part that failed or did not run shows as "-"."""
    w = report["workload"]
    e, g = (report["modes"].get(m, {}) for m in MODES)

    def f(mode: dict, *path, d: int = 1) -> str:
        v = mode
        for k in path:
            v = v.get(k) if isinstance(v, dict) else (v[k] if isinstance(v, list)
                                                     and k < len(v) else None)
        return "-" if v is None else v if isinstance(v, str) else f"{v:.{d}f}"

    def path(m: dict) -> str:
        start, end = m.get("decode_path", "-"), m.get("decode_path_end")
        return start if end in (None, start) else f"{start} -> {end}"

    out = [("decode path", path(e), path(g)),
           ("decode graphs captured", f(e, "graphs_captured", d=0),
            f(g, "graphs_captured", d=0)),
           ("decode step compiled (--compile)", str(e.get("decode_compiled", "-")),
            str(g.get("decode_compiled", "-"))),
           ("engine startup s", f(e, "engine_startup_s", d=2), f(g, "engine_startup_s", d=2)),
           ("ms per output token, batch 1", f(e, "tpot_batch1_ms", d=2),
            f(g, "tpot_batch1_ms", d=2))]
    for i, b in enumerate(w["decode_batches"]):
        out.append((f"decode tok/s, batch {b}, ~{w['decode_context']} ctx",
                    f(e, "decode", i, "tokens_per_s", d=0), f(g, "decode", i, "tokens_per_s", d=0)))
    tokens = e.get("image_prompt_tokens") or g.get("image_prompt_tokens")
    out += [(f"TTFT ms, one {w['image_size']}px image ({tokens} prompt tok)",
             f(e, "image_ttft_ms"), f(g, "image_ttft_ms")),
            (f"tok/s, {w['image_requests']} concurrent {w['image_size']}px image requests",
             f(e, "image_batch", "tokens_per_s", d=0), f(g, "image_batch", "tokens_per_s", d=0)),
            ("  their TTFT p50 ms", f(e, "image_batch", "ttft_p50_ms", d=0),
             f(g, "image_batch", "ttft_p50_ms", d=0)),
            ("peak GPU memory GiB", f(e, "peak_gpu_memory_gib", d=2),
             f(g, "peak_gpu_memory_gib", d=2))]
    if "profile" in e or "profile" in g:  # --profile: device time vs wall time per step
        out += [("profiled batch 1: wall ms per decode step",
                 f(e, "profile", "decode_wall_ms_per_step", d=2),
                 f(g, "profile", "decode_wall_ms_per_step", d=2)),
                ("profiled batch 1: device ms per token",
                 f(e, "profile", "device_ms_per_token", d=2),
                 f(g, "profile", "device_ms_per_token", d=2)),
                ("profiled batch 1: kernels per token",
                 f(e, "profile", "kernels_per_token", d=0),
                 f(g, "profile", "kernels_per_token", d=0)),
                ("profiled image request: TTFT ms",
                 f(e, "profile_image", "ttft_ms", d=1), f(g, "profile_image", "ttft_ms", d=1)),
                ("profiled image request: device ms",
                 f(e, "profile_image", "device_time_ms", d=1),
                 f(g, "profile_image", "device_time_ms", d=1))]
    for name, m in zip(MODES, (e, g)):
        if m.get("error"):
            out.append((f"{name} FAILED", m["error"][:80], ""))
    for name in EXTRA:  # decode-only columns, beside graphs: this one | graphs
        x = report["modes"].get(name)
        if x is None:
            continue
        out.append((f"{name}: ms per output token, batch 1", f(x, "tpot_batch1_ms", d=2),
                    f(g, "tpot_batch1_ms", d=2)))
        for i, b in enumerate(w["decode_batches"]):
            out.append((f"{name}: decode tok/s, batch {b}", f(x, "decode", i, "tokens_per_s", d=0),
                        f(g, "decode", i, "tokens_per_s", d=0)))
        out.append((f"{name}: kernels per token, batch 1", f(x, "profile", "kernels_per_token",
                                                               d=0),
                    f(g, "profile", "kernels_per_token", d=0)))
        out.append((f"{name}: decode path, compiled", f"{x.get('decode_path_end')}, "
                    f"{x.get('decode_compiled')}", ""))
        if x.get("error"):
            out.append((f"{name} FAILED", x["error"][:80], ""))
    return out


def table(report: dict) -> str:
    lines = ["| | eager | graphs |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(report)]
    c = report["correctness"]
    lines.append("")
    if c is None:
        lines.append("correctness: not measured (" + ("a mode failed" if len(report["modes"]) == 2
                                                      else "it needs both columns") + ")")
    else:
        paths = c.get("decode_paths", ["eager", "graphs"])
        what = (f"{paths[1]} tokens == {paths[0]} tokens" if paths[0] != paths[1] else
                f"{paths[1]} tokens == {paths[0]} tokens (no CUDA graphs here: only a "
                "determinism check, not graphs against eager)")
        lines.append(f"correctness: {what} at batch {c['batch']} (greedy, "
                     f"{report['dtype']}): {'PASS' if c['equal'] else 'FAIL'} "
                     f"({c['sequences_equal']}/{c['batch']} sequences equal)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None,
                   help="JSON file (default bench/results/gpu_check_<device>.json)")
    p.add_argument("--workload", choices=tuple(WORKLOADS), default=None,
                   help="the workload's sizes (default: the device's); --device cpu "
                        "--workload cuda runs the GPU's request mix on the tiny model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES),
                   help="the columns to run, of: eager, graphs (default both; the correctness "
                        "line needs both), and the decode-only ones: compiled (--compile), "
                        "reference (--kernels torch)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an engine setting for both columns, e.g. --set max_prefill_chunk=4096 "
                        "--set prep_workers=8 (a Python literal, else a string); repeatable")
    p.add_argument("--profile", action="store_true",
                   help="last, in each mode: a batch-1 text request and a one-image request "
                        "under torch.profiler (device vs wall time per step, kernels per "
                        "token; top-op tables beside --out, gzipped Chrome traces of the "
                        "graphs mode)")
    p.add_argument("--via-loader", action="store_true",
                   help="save the model to a temporary folder and load it with models.loader "
                        "(as the server does) instead of handing the in-memory model over")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m in MODE_SETTINGS]
    if not modes:
        p.error(f"--modes {args.modes!r}: none of {', '.join(MODE_SETTINGS)}")

    t_start = time.perf_counter()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    w = WORKLOADS[args.workload or device]
    dtype = "bfloat16" if device == "cuda" else "float32"
    base = dict(device_map="cuda:0" if device == "cuda" else "cpu", dtype=dtype,
                max_model_len=w.max_model_len, max_num_seqs=w.max_num_seqs,
                log_level="warning", seed=args.seed)
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected NAME=VALUE")
        try:
            base[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            base[name] = value
    try:
        settings = engine_settings(**base)
    except KeyError as exc:
        p.error(str(exc))
    t = time.perf_counter()
    loaded, tmp = load(device, settings, args.via_loader, args.seed)
    build_s = time.perf_counter() - t
    print(f"model built in {build_s:.1f} s on {loaded.device} "
          f"({sum(q.numel() for q in loaded.model.parameters()) / 1e6:.1f}M parameters)",
          flush=True)

    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_check_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": device,
        "device_name": (torch.cuda.get_device_name(0) if device == "cuda"
                        else platform.processor() or platform.machine()),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "model": {"parameters_m": round(sum(q.numel() for q in loaded.model.parameters()) / 1e6, 1),
                  "layers": loaded.model.config.get_text_config().num_hidden_layers,
                  "hidden": loaded.model.config.get_text_config().hidden_size,
                  "built_in_s": round(build_s, 2), "via_loader": args.via_loader},
        "workload": asdict(w),
        "settings_set": args.set,
        "modes": {},
        "correctness": None,
        "complete": False,
        "elapsed_s": None,
    }

    def save():  # after every part: a run cut short still leaves what it measured
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        public = {**report, "modes": {m: {k: v for k, v in r.items() if k != "correctness_ids"}
                                      for m, r in report["modes"].items()}}
        out.write_text(json.dumps(public, indent=2))

    if device == "cuda":
        # what the server's measured budget would be here (--gpu-memory-utilization), for
        # the record; the two engines below get a fixed budget that fits the workload, so
        # that a pool the first one failed to free cannot starve the second
        from server.engine.kv_budget import KVBudget
        try:
            b = KVBudget.measure(loaded.model, settings, loaded.device)
            report["kv_budget_measured"] = {"tokens": b.tokens, "gib": round(b.gib, 2)}
        except Exception as exc:
            report["kv_budget_measured"] = {"error": repr(exc)}
        base.setdefault("kv_cache_tokens", w.max_num_seqs * w.max_model_len)
        report["kv_cache_tokens"] = base["kv_cache_tokens"]

    ids = {}
    for mode in modes:
        s = engine_settings(**{**base, **MODE_SETTINGS[mode]})
        res = report["modes"][mode] = {}
        t = time.perf_counter()

        def note(msg, mode=mode):
            print(f"  [{time.perf_counter() - t_start:6.1f} s] {mode}: {msg}", flush=True)
            save()
        try:
            asyncio.run(measure_mode(loaded, s, w, device, args.seed, res, note,
                                     out.parent if args.profile else None, mode))
        except Exception as exc:  # report it, and still run the other mode
            import traceback
            traceback.print_exc()
            res["error"] = repr(exc)
        ids[mode] = res.pop("correctness_ids", None)
        if device == "cuda":  # after shutdown: what the engine left allocated
            gc.collect()
            torch.cuda.empty_cache()
            res["allocated_after_shutdown_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        print(f"{mode}: {time.perf_counter() - t:.1f} s", flush=True)
        save()
    if ids.get("eager") is not None and ids.get("graphs") is not None:
        report["correctness"] = compare(ids["eager"], ids["graphs"])
        # what was really compared: the decode path each column ended on (on a CPU both
        # are eager, and the line says so rather than claiming graphs == eager)
        report["correctness"]["decode_paths"] = [
            report["modes"][m].get("decode_path_end") for m in ("eager", "graphs")]
    report["complete"] = all("error" not in r for r in report["modes"].values())
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    print()
    print(table(report))
    print(f"\nelapsed {report['elapsed_s']} s; wrote {out}")
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
