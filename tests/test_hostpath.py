"""The engine step shaped for a GPU: one host sync per decode step, a vectorised device
sampler with counter-based draws, outputs off the model thread, every stage guarded,
the KV budget and the startup cache check.  Tiny model, float32, CPU."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from models.loader import load_model
from server.engine.core import AsyncEngine
from server.engine.interface import EngineRequest, SamplingParams
from server.engine import output as output_mod
from server.engine.output import _deliver as output_deliver
from server.engine.sampler import SamplingState, _mul32, draw, mix32, stream_base, uniform
from server.engine.sequence import Sequence
from server.engine.structured import GrammarSpec
from server.errors import APIError
from server.settings import Settings
from tests.sync_counter import HostSyncs


def _engines(model: str, loaded):
    """A factory of engines on ``loaded`` (the model at path ``model``), and their cleanup."""
    engines = []

    def make(fault=None, **overrides) -> AsyncEngine:
        s = Settings(model_path=model, min_pixels=4096, max_pixels=65536, **overrides)
        e = AsyncEngine(loaded, s, fault=fault)
        engines.append(e)
        return e
    yield make
    for e in engines:  # threads and grammar workers: nothing outlives the module
        e.close()


@pytest.fixture(scope="module")
def loaded(toy_model):
    s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536)
    return load_model(s)


@pytest.fixture(scope="module")
def make_engine(toy_model, loaded):
    """Engines on the toy vocabulary (the stage and fault tests do not depend on it)."""
    yield from _engines(toy_model, loaded)


@pytest.fixture(scope="module")
def make_real_engine(real_vocab_model):
    """Engines on Qwen's real 151,936-token vocabulary (full-size masks, logprobs, sort)."""
    yield from _engines(real_vocab_model, load_model(Settings(
        model_path=real_vocab_model, min_pixels=4096, max_pixels=65536)))


def text_req(i, max_tokens=12, stream=True, **params):
    params.setdefault("temperature", 0)
    return EngineRequest(f"r{i}", [{"role": "user", "content": f"order {i} status " * (1 + i % 3)}],
                         [], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params),
                         stream=stream)


async def run(engine, req, timeout=60.0):
    """(token ids of choice 0, text, completion_tokens) or the APIError; never hangs."""
    async def go():
        ids, text, count = [], "", 0
        async for o in engine.generate(req, engine.reserve()):
            ids += o.token_ids
            text += o.text
            count = o.completion_tokens
        return ids, text, count
    try:
        return await asyncio.wait_for(go(), timeout)
    except APIError as e:
        return e


# --- counter-based draws -------------------------------------------------------------

def test_mul32_and_uniform_match_python_integers():
    """The draw is integer arithmetic with no overflow: tensors (any device) give the same
    bits as Python's exact integers."""
    xs = [0, 1, 0xFFFFFFFF, 0x12345678, 0x80000000, 2**32 - 12345]
    t = torch.tensor(xs)
    assert _mul32(t, 0x846CA68B).tolist() == [(x * 0x846CA68B) % 2**32 for x in xs]
    assert mix32(t).tolist() == [mix32(x) for x in xs]
    lo, hi, step = torch.tensor(xs), torch.tensor(xs[::-1]), torch.arange(len(xs))
    assert uniform(lo, hi, step).tolist() == [uniform(a, b, c) for a, b, c in
                                               zip(xs, xs[::-1], range(len(xs)))]
    u = uniform(torch.full((4096,), 7), torch.full((4096,), 9), torch.arange(4096))
    assert 0.45 < float(u.mean()) < 0.55 and len(set(u.tolist())) > 4000


def test_a_step_hashes_only_base_plus_step_and_the_stream_is_unchanged():
    """The sampler hashes a row's key once when it joins (``stream_base``) and
    ``base + step`` at each step; the draws are still the documented construction
    ``mix32((mix32(mix32(lo) ^ hi) + step) mod 2**32)``, written here with Python's exact
    integers and the textbook multiply, so a seed gives the same text as before."""
    def ref_mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    keys = [(0, 0), (1, 2), (0xFFFFFFFF, 0x12345678), (0x80000000, 0xFFFFFFFF)]
    for lo, hi in keys:
        base = stream_base(lo, hi)
        assert base == ref_mix(ref_mix(lo) ^ hi)
        steps = torch.arange(0, 3000, 7)
        got = draw(torch.full_like(steps, base), steps).tolist()
        want = [(ref_mix((base + s) % 2**32) >> 8) / 2**24 for s in steps.tolist()]
        assert got == want


# --- the vectorised sampler against a per-row reference --------------------------------

def _reference_penalised(logits, p: SamplingParams, prompt, out):
    row = logits.clone()
    for t, b in p.logit_bias.items():
        row[t] += b
    if p.repetition_penalty != 1.0:
        seen = sorted(set(prompt) | set(out))
        v = row[seen]
        row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    for t in set(out):
        row[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return row


def test_vectorised_penalties_equal_per_row_reference():
    """Greedy rows with every penalty kind, next to plain rows: argmax of the device
    state's penalised logits equals a per-row Python reference, over several steps."""
    g = torch.Generator().manual_seed(3)
    vocab = 64
    params = [SamplingParams(temperature=0),
              SamplingParams(temperature=0, presence_penalty=1.5),
              SamplingParams(temperature=0, frequency_penalty=0.7, logit_bias={5: 2.0, 9: -3.0}),
              SamplingParams(temperature=0, repetition_penalty=1.8),
              SamplingParams(temperature=0, repetition_penalty=0.7, presence_penalty=0.4)]
    prompts = [torch.randint(0, vocab, (6,), generator=g) for _ in params]
    state = SamplingState.build(params, [(i, 0) for i in range(len(params))], prompts, vocab, "cpu")
    outs = [[] for _ in params]
    for _ in range(8):
        logits = torch.randn(len(params), vocab, generator=g)
        toks = state.sample(logits.clone()).tokens.tolist()  # sample() works in place
        for i, p in enumerate(params):
            ref = _reference_penalised(logits[i], p, prompts[i].tolist(), outs[i])
            assert toks[i] == int(ref.argmax()), f"row {i}"
            outs[i].append(toks[i])


def test_top_k_candidates_path_equals_full_sort_path():
    """A sampling row draws the same token whether its batch takes the top-k candidate
    path (all rows bounded) or the full-sort path (a neighbour without top_k)."""
    vocab = 200
    g = torch.Generator().manual_seed(5)
    row = SamplingParams(temperature=0.8, top_k=20, top_p=0.8, min_p=0.05)
    free = SamplingParams(temperature=1.0, top_p=0.9)
    bounded = SamplingState.build([row, row], [(11, 0), (12, 0)], [torch.tensor([1])] * 2, vocab, "cpu")
    sorted_ = SamplingState.build([row, free], [(11, 0), (13, 0)], [torch.tensor([1])] * 2, vocab, "cpu")
    assert bounded.bounded and not sorted_.bounded
    for _ in range(30):
        logits = torch.randn(2, vocab, generator=g)
        a = bounded.sample(logits.clone()).tokens[0].item()
        b = sorted_.sample(logits.clone()).tokens[0].item()
        assert a == b
        assert a in logits[0].topk(20).indices.tolist()


# --- one host sync per decode step -----------------------------------------------------

@pytest.mark.parametrize("vocab", ["toy", "real"])
async def test_one_host_sync_per_decode_step(request, vocab, monkeypatch):
    """Batch 16: greedy, sampling with top_k/top_p/min_p, presence/frequency/repetition
    penalties, logit_bias, logprobs with top_logprobs, and a JSON-grammar row.  Once all
    16 decode together, each step makes exactly one host sync, on the toy vocabulary and
    on the real one (151,936 columns of masks, penalties and sorts)."""
    engine = request.getfixturevalue("make_engine" if vocab == "toy" else "make_real_engine")()
    kinds = [dict(), dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5, seed=1),
             dict(temperature=1.0, min_p=0.1), dict(temperature=0, repetition_penalty=1.3),
             dict(temperature=0.9, frequency_penalty=0.5, logit_bias={7: 1.0}),
             dict(temperature=0, logprobs=True, top_logprobs=5),
             dict(temperature=0.7, top_k=20, logprobs=True, top_logprobs=2, seed=3),
             dict(temperature=1.0)]
    reqs = [text_req(i, max_tokens=40, **kinds[i % len(kinds)]) for i in range(15)]
    reqs.append(EngineRequest("json", [{"role": "user", "content": "json please"}], [],
                              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                             grammar=GrammarSpec.json_object())))
    sched, counts = engine.scheduler, []
    real_step = sched.step

    def step():
        steady = sched.batch is not None and len(sched.batch) == 16 and not sched.waiting
        with HostSyncs() as syncs:  # the ops that stall the host on CUDA (tests/sync_counter)
            real_step()
        if steady and len(sched.batch or []) == 16:
            counts.append(dict(syncs.seen))
    sched.step = step
    results = await asyncio.gather(*(run(engine, r) for r in reqs))
    assert all(not isinstance(r, APIError) for r in results)
    assert len(counts) >= 10
    # the one sync: the sampled tokens' packed read-back
    assert all(c == {"Tensor.tolist": 1} for c in counts), counts


# --- outputs off the model thread ------------------------------------------------------

async def test_stop_string_found_late_is_not_emitted_or_counted(make_engine):
    """The output thread finds a stop string after the model thread sampled one more
    token: text and completion_tokens equal the synchronous reference."""
    engine = make_engine()
    ids, text, _ = await run(engine, text_req(1, max_tokens=30))
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    ref = Sequence(request_id="x", index=0, prompt_len=1,
                   params=SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True),
                   tokenizer=engine.detok, eos_ids=engine.eos_ids, sink=None)
    outs = [ref.append(t) for t in ids if not ref.finished]
    got = await run(engine, text_req(1, max_tokens=30, stop=[stop]))
    assert got[1] == "".join(o.text for o in outs) and stop not in got[1]
    assert got[2] == outs[-1].completion_tokens == len(ref.output_ids) < 30


async def test_one_event_loop_wakeup_per_step(make_engine):
    """8 streams decoding together wake the event loop about once per step, not once per
    request per step."""
    engine = make_engine()
    loop = asyncio.get_running_loop()
    calls = {"n": 0}
    orig = loop.call_soon_threadsafe

    def counted(callback, *a, **k):
        # engine events only (the preparation path has its own wake-ups per request);
        # the engine before this change woke the loop with q.put_nowait per request
        if callback is output_deliver or getattr(callback, "__name__", "") == "put_nowait":
            calls["n"] += 1
        return orig(callback, *a, **k)
    loop.call_soon_threadsafe = counted
    try:
        steps = engine.scheduler.steps
        await asyncio.gather(*(run(engine, text_req(i, max_tokens=30)) for i in range(8)))
        steps = engine.scheduler.steps - steps
    finally:
        del loop.call_soon_threadsafe
    # per request per step would be 8 x steps; a few steps that end while the loop is
    # busy take two wake-ups on a loaded box (34 for 31 steps seen once)
    assert calls["n"] <= steps * 1.25 + 2, (calls["n"], steps)


async def test_decode_counters_count_steps_and_rows(make_engine):
    """``stats()`` counts batched decode steps and the rows they decoded (the first token
    of each choice comes from its prefill): 4 requests of 10 tokens decode 36 rows, in at
    least 9 steps (at most one per row when no two share a step)."""
    engine = make_engine()
    before = engine.stats()
    results = await asyncio.gather(*(run(engine, text_req(i, max_tokens=10)) for i in range(4)))
    assert all(r[2] == 10 for r in results), results
    after = engine.stats()
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows == 4 * 9 and 9 <= steps <= rows, (rows, steps)


async def test_non_streamed_request_gets_its_first_token_then_the_rest_at_once(
        make_engine, monkeypatch):
    """``stream=False``: the first token's events at once (time to first token), the rest
    merged into one delivery when the choice finishes, not one per step; ids, text and
    counts equal those of the same requests streamed."""
    monkeypatch.setattr(output_mod, "HOLD_S", 3600.0)  # no timed delivery in between
    engine = make_engine()

    async def outputs(req):
        return [o async for o in engine.generate(req, engine.reserve())]

    def by_choice(outs, n):
        return [([t for o in outs if o.index == c for t in o.token_ids],
                 "".join(o.text for o in outs if o.index == c),
                 max(o.completion_tokens for o in outs if o.index == c)) for c in range(n)]
    cases = [dict(max_tokens=40), dict(max_tokens=40), dict(max_tokens=25, n=2)]
    streamed = await asyncio.gather(*(outputs(text_req(i, **kw)) for i, kw in enumerate(cases)))
    held = await asyncio.gather(*(outputs(text_req(i, stream=False, **kw))
                                  for i, kw in enumerate(cases)))
    for kw, s, h in zip(cases, streamed, held):
        n = kw.get("n", 1)
        assert len(h) == 2 * n, [(o.index, len(o.token_ids), o.finish_reason) for o in h]
        assert all(len(o.token_ids) == 1 for o in h[:n])
        assert all(o.finish_reason == "length" for o in h[n:])
        assert by_choice(h, n) == by_choice(s, n)
        assert all(c[2] == kw["max_tokens"] for c in by_choice(h, n))


# --- every stage guarded ---------------------------------------------------------------

def _concerned(sched, stage: str, caller, last_prefilled: set[str]) -> set[str]:
    """The requests a fault in ``stage`` concerns, read from the scheduler's state when
    the fault fires (independently of the engine's failure path): a prefill (or a forward
    inside one) the prompts being prefilled (all of them: these prompts fit one chunk);
    a join the prompts that just finished prefilling; a decode, a sample (or a forward
    inside a decode) every running row; a leave the rows that stay; an output the one
    row whose events were being written."""
    rows = sched.batch.rows if sched.batch is not None else []
    prefilling = {p.entry.request_id for p in sched.prefilling}
    if stage == "prefill" or (stage == "forward" and caller.f_code.co_name == "_prefill"):
        return prefilling
    if stage == "join":
        return last_prefilled - prefilling
    if stage in ("decode", "sample", "forward"):
        return {r.request_id for r in rows}
    if stage == "leave":
        return {r.request_id for r in rows if not r.finished}
    if stage == "output":
        return {caller.f_locals["s"].request_id}
    raise AssertionError(stage)


@pytest.mark.parametrize("fault", ["prefill:2", "join:3:error", "leave:1", "decode:4",
                                   "sample:3:error", "output:20:error", "forward:5"])
async def test_fault_in_each_stage_fails_exactly_its_requests_and_frees_memory(
        make_engine, fault):
    """A fault injected into one stage: exactly the requests it concerns (read from the
    scheduler when it fires) get the error envelope, every other request completes in
    full, the engine keeps serving, and afterwards no KV block is held or promised."""
    engine = make_engine(fault=fault)
    sched, faults = engine.scheduler, engine.faults
    stage, at = fault.split(":")[0], int(fault.split(":")[1])
    concerned: set[str] = set()
    last_prefilled: set[str] = set()
    real_tick = faults.tick

    def tick(name="forward"):
        import sys
        if name == "prefill":
            last_prefilled.clear()
            last_prefilled.update(p.entry.request_id for p in sched.prefilling)
        if name == stage and faults.counts.get(name, 0) + 1 == at:
            concerned.update(_concerned(sched, stage, sys._getframe(1), last_prefilled))
        return real_tick(name)
    faults.tick = tick
    # streamed and non-streamed (events held between deliveries) requests alike
    reqs = [text_req(i, max_tokens=20 + 10 * (i % 3), stream=i % 2 == 0) for i in range(6)]

    async def staggered(i, r):
        await asyncio.sleep(0.02 * i)
        return await run(engine, r, timeout=60)
    results = await asyncio.gather(*(staggered(i, r) for i, r in enumerate(reqs)))
    failed = {r.request_id for r, res in zip(reqs, results) if isinstance(res, APIError)}
    assert concerned, f"the fault {fault} never fired"
    assert failed == concerned, (failed, concerned)
    expect = 500 if fault.endswith(":error") else 503
    assert {res.status for res in results if isinstance(res, APIError)} == {expect}
    assert all(isinstance(res, APIError) or res[2] == len(res[0]) == r.params.max_tokens
               for r, res in zip(reqs, results))
    after = await run(engine, text_req(9, max_tokens=5))
    assert not isinstance(after, APIError) and after[2] == 5
    for _ in range(200):  # the finished row leaves at the engine's next step
        if engine.scheduler.batch is None:
            break
        await asyncio.sleep(0.01)
    assert engine.scheduler.batch is None and engine.stats()["queue_depth"] == 0
    # the failed requests' memory is back: nothing held (cached prefixes are idle, not
    # used) and nothing promised for future tokens
    assert (engine.blocks.used, engine.blocks.promised) == (0, 0)


async def test_repeated_decode_failures_turn_health_red(make_engine):
    engine = make_engine(fault="decode:1*")
    for i in range(3):
        assert isinstance(await run(engine, text_req(i, max_tokens=5)), APIError)
    assert not engine.healthy


# --- KV budget -------------------------------------------------------------------------

async def test_request_that_can_never_fit_gets_400(make_engine):
    engine = make_engine(kv_cache_tokens=200)
    res = await run(engine, text_req(1, max_tokens=500))
    assert isinstance(res, APIError) and res.status == 400 and res.code == "kv_budget_exceeded"
    assert not isinstance(await run(engine, text_req(2, max_tokens=10)), APIError)


async def test_admission_waits_within_the_budget(make_engine):
    """Eight requests that fit the budget only a few at a time: all complete, and the
    cache never holds more token columns than the budget."""
    engine = make_engine(kv_cache_tokens=400)
    sched, rows = engine.scheduler, []
    real_step = sched.step

    def step():
        real_step()
        rows.append(len(sched.batch or []))
    sched.step = step
    results = await asyncio.gather(*(run(engine, text_req(i, max_tokens=40)) for i in range(8)))
    assert all(not isinstance(r, APIError) and r[2] == 40 for r in results)
    # each request needs 4 blocks of 16 (its prompt and 40 tokens) of the 25: at most 6
    # run at once, so some waited for others' blocks rather than failing
    assert 1 < max(rows) <= 6, max(rows)
    assert 0 < sched.peak_kv_tokens <= 400


# --- versions --------------------------------------------------------------------------

def test_startup_attention_check(make_engine):
    """The installed transformers routes the text model's attention through the engine's
    paged function (the check compares it with the model's own SDPA forward); a model
    whose attention no longer reaches the pool is caught loudly."""
    engine = make_engine()
    runner, blocks = engine.runner, engine.blocks
    probe = blocks.allocate(3)
    try:
        runner.check(probe)
        text = runner.model.model.language_model
        for layer in text.layers:  # as if a new transformers ignored the registered function
            layer.self_attn.config._attn_implementation = "sdpa"
        try:
            with pytest.raises(RuntimeError, match="paged attention disagrees"):
                runner.check(probe)
        finally:
            from server.engine.kv_pool import install
            install(runner.model)
        runner.check(probe)
    finally:
        blocks.release(probe)


# --- through the real server -----------------------------------------------------------

def test_http_budget_400_and_health_after_failed_steps(server_factory):
    """The real server with a small KV budget and every decode step failing: a request
    that can never fit gets a 400 envelope before any model work; the others get 503
    envelopes (never a hang); after repeated failed steps /health turns 503; the startup
    log states the budget and the cache check."""
    import httpx
    from openai import BadRequestError, InternalServerError, OpenAI
    srv = server_factory("--kv-cache-tokens", "300", env={"QWEN_VL_FAULT": "decode:1*"})
    client = OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "where is my order?"}]
    with pytest.raises(BadRequestError) as bad:
        client.chat.completions.create(model="qwen3-vl", messages=msgs, max_tokens=1000)
    assert bad.value.body["code"] == "kv_budget_exceeded"
    for _ in range(3):
        with pytest.raises(InternalServerError) as failed:
            client.chat.completions.create(model="qwen3-vl", messages=msgs, max_tokens=8)
        assert failed.value.status_code == 503
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
    assert "KV cache: 300 tokens" in srv.log() and "paged attention check: transformers" in srv.log()


async def test_prefill_is_reported_before_the_first_token(make_engine):
    """``on_prefill`` hears the prompt's size when its prefill is scheduled, before any
    token: a client that hangs up then is still charged the prefill (issue 27)."""
    engine = make_engine()
    seen = []
    req = dataclasses.replace(text_req(1, max_tokens=3), on_prefill=seen.append)
    gen = engine.generate(req, engine.reserve())
    first = await anext(gen)
    assert seen == [first.prompt_tokens] and first.prompt_tokens > 0
    await gen.aclose()
