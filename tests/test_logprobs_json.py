"""The logprobs hot path (``protocol.LogprobJSON``, ``completion_json``, ``chunk_json``)
writes exactly the JSON that the pydantic wire models wrote before it: the same bytes for
non-streamed responses (FastAPI's ``response_model`` serialisation) and for every SSE chunk,
with ``top_logprobs``, awkward tokens (quotes, control characters, partial UTF-8, bytes
missing) and awkward floats (-0.0, 1e-7, 1e-5, inf, NaN)."""

from __future__ import annotations

import json
import random
import struct

import httpx
import pytest
from pydantic import TypeAdapter

from server.api import protocol as p
from server.engine.interface import Output, TokenLogprob
from server.api.media import MediaFetcher, MediaPolicy
from server.api.metrics import Metrics
from server.api.serving import ChatService, RequestStats, deltas, _finish, _message
from server.settings import Settings

TOKENS = ["Hello", " world", '"', "\\", "\n", "\x01\x1f", "é", "\ufffd", "😀", "<|im_end|>",
          "a/b", "\u2028", " \t", "", "{", "}", ",", "[]"]
RAW = {7: [0xE4, 0xBD]}  # a token holding part of a character: its text is U+FFFD


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


FLOATS = [-0.0, 0.0, -1e-7, -1.1920928955078125e-07, -0.00001, -0.0001, -12.5, -1e16, -1e21,
          -5e-324, float("-inf"), float("nan"), -11.931640625]


def entries(rng: random.Random, n: int, k: int, with_ids: bool) -> list[TokenLogprob]:
    out = []
    for _ in range(n):
        ids = [rng.randrange(len(TOKENS)) for _ in range(k + 1)]
        vals = [rng.choice(FLOATS) if rng.random() < 0.3
                else f32(-rng.random() * 10 ** rng.randint(-9, 2)) for _ in range(k + 1)]

        def raw(i):
            return RAW.get(i, list(TOKENS[i].encode()))
        top = [(TOKENS[i], v, raw(i)) for i, v in zip(ids[1:], vals[1:])]
        # bytes None: the wire writes the token's UTF-8
        own = None if ids[0] not in RAW and rng.random() < 0.3 else raw(ids[0])
        out.append(TokenLogprob(TOKENS[ids[0]], vals[0], top, own,
                                ids[0] if with_ids else None, ids[1:] if with_ids else None))
    return out


# --- the previous implementation: pydantic models per token (server/api/serving.py before) ----

def old_wire_logprob(lp) -> p.TokenLogprob:
    return p.TokenLogprob.model_construct(
        token=lp.token, logprob=lp.logprob,
        bytes=lp.bytes if lp.bytes is not None else list(lp.token.encode()),
        top_logprobs=[p.TopLogprob.model_construct(token=t, logprob=v, bytes=b)
                      for t, v, b in lp.top])


def old_collect_json(svc, req, request_id, outs: list[Output], created: int) -> bytes:
    texts, finish = [""] * req.n, [None] * req.n
    logprobs: list[list] = [[] for _ in range(req.n)]
    for o in outs:
        texts[o.index] += o.text
        if o.logprobs:
            logprobs[o.index] += [old_wire_logprob(lp) for lp in o.logprobs]
        if o.finish_reason:
            finish[o.index] = o.finish_reason
    choices = []
    for i in range(req.n):
        parser = svc.output_parser(req)
        events = parser.feed(texts[i]) + parser.finish()
        choices.append(p.Choice(
            index=i, message=_message(events, parser), finish_reason=_finish(finish[i], parser),
            logprobs=p.ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None))
    prompt = outs[-1].prompt_tokens
    done = sum(max(o.completion_tokens for o in outs if o.index == i) for i in range(req.n))
    c = p.ChatCompletion(id=request_id, model=req.model, choices=choices, created=created,
                         usage=p.Usage(prompt_tokens=prompt, completion_tokens=done,
                                       total_tokens=prompt + done))
    # what FastAPI 0.165 does for a route with response_model=ChatCompletion
    value = TypeAdapter(p.ChatCompletion).validate_python(c, from_attributes=True)
    return TypeAdapter(p.ChatCompletion).dump_json(value, by_alias=True, exclude_unset=False,
                                                   exclude_defaults=False, exclude_none=False)


def old_stream(svc, req, request_id, outs: list[Output], created: int) -> list[str]:
    def chunk(choices, usage=None) -> str:
        c = p.ChatCompletionChunk(id=request_id, created=created, model=req.model,
                                  choices=choices, usage=usage)
        return "data: " + c.model_dump_json(exclude_none=True) + "\n\n"
    lines = []
    parsers = [svc.output_parser(req) for _ in range(req.n)]
    for i in range(req.n):
        lines.append(chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))]))
    for o in outs:
        parser = parsers[o.index]
        events = parser.feed(o.text) if o.text else []
        if o.finish_reason:
            events += parser.finish()
        lp = p.ChoiceLogprobs(content=[old_wire_logprob(x) for x in o.logprobs]) \
            if o.logprobs else None
        for delta in deltas(events):
            lines.append(chunk([p.ChunkChoice(index=o.index, delta=delta, logprobs=lp)]))
            lp = None
        if lp is not None:
            lines.append(chunk([p.ChunkChoice(index=o.index, delta=p.Delta(content=""),
                                              logprobs=lp)]))
        if o.finish_reason:
            lines.append(chunk([p.ChunkChoice(index=o.index, delta=p.Delta(),
                                              finish_reason=_finish(o.finish_reason, parser))]))
    lines.append("data: [DONE]\n\n")
    return lines


# --- the comparisons ----------------------------------------------------------------------

def test_array_matches_pydantic_models():
    rng = random.Random(0)
    writer = p.LogprobJSON()
    adapter = TypeAdapter(list[p.TokenLogprob])
    for trial in range(60):
        es = entries(rng, rng.randint(0, 12), rng.choice([0, 1, 5, 20]), with_ids=trial % 2 == 0)
        want = adapter.dump_json([old_wire_logprob(e) for e in es]).decode()
        assert writer.array(es) == want
    json.loads(writer.array(entries(rng, 5, 5, True)))  # NaN/inf come out as null


def test_written_entries_match_pydantic_models():
    """The engine's output thread writes each step's entries from token ids and floats
    (``LogprobJSON.write``); the serving layer joins them, alone or beside objects."""
    rng = random.Random(1)
    adapter = TypeAdapter(list[p.TokenLogprob])

    def info(i):
        return TOKENS[i], RAW.get(i, list(TOKENS[i].encode()))

    writer, other = p.LogprobJSON(), p.LogprobJSON()
    for trial in range(60):
        es = entries(rng, rng.randint(0, 12), rng.choice([0, 1, 5, 20]), with_ids=True)
        want = adapter.dump_json([old_wire_logprob(e) for e in es]).decode()
        written = writer.write([(e.token_id, e.logprob, e.top_ids, [t[1] for t in e.top])
                                for e in es], info)
        assert other.array(written) == want
        mixed = [w if rng.random() < 0.5 else e for w, e in zip(written, es)]
        assert other.array(mixed) == want


def fake_outputs(rng, n_choices: int, k: int, with_ids: bool) -> list[Output]:
    outs, counts = [], [0] * n_choices
    pieces = ["Hi", "", ' "quoted"', "\n", "é", "", "done"]
    for step in range(8):
        for i in range(n_choices):
            lps = entries(rng, rng.choice([1, 1, 3]), k or 0, with_ids)  # 3: coalesced
            counts[i] += len(lps)
            if k is None:  # no logprobs asked for
                lps = None if rng.random() < 0.5 else []
            outs.append(Output(index=i, text=pieces[step % len(pieces)], token_ids=[1] * 3,
                               finish_reason="length" if step == 7 else None, prompt_tokens=9,
                               completion_tokens=counts[i], logprobs=lps))
    return outs


async def _agen(items):
    for x in items:
        yield x


@pytest.mark.parametrize("n,k,with_ids", [(1, 5, True), (2, 3, False), (1, 0, True),
                                          (2, 20, True), (2, None, True)])
async def test_responses_match_previous_pydantic_output(n, k, with_ids):
    rng = random.Random(n * 100 + (k or 0))
    fetcher = MediaFetcher(MediaPolicy())

    class FakeEngine:
        model_id = "fake"
        vocab_size = 100

    svc = ChatService(FakeEngine(), Settings(), fetcher, Metrics(lambda: {}))
    try:
        outs = fake_outputs(rng, n, k, with_ids)
        body = dict(model=Settings().served_model_name, n=n, logprobs=k is not None,
                    top_logprobs=k, messages=[{"role": "user", "content": "hi"}])
        req = p.ChatCompletionRequest(**body)
        got = await svc.collect(req, "chatcmpl-x", _agen(outs), RequestStats())
        created = json.loads(got)["created"]
        assert got.encode() == old_collect_json(svc, req, "chatcmpl-x", outs, created)

        sreq = p.ChatCompletionRequest(**body, stream=True)
        lines = [x async for x in svc.stream(sreq, "chatcmpl-x", _agen(outs), RequestStats())]
        created = json.loads(lines[0][len("data: "):])["created"]
        assert lines == old_stream(svc, sreq, "chatcmpl-x", outs, created)
        assert sum('"top_logprobs"' in x for x in lines) == (len(outs) if k is not None else 0)
    finally:
        await fetcher.aclose()


def test_server_bodies_are_the_models_json(server):
    """The real server: non-streamed bodies (with and without logprobs) and streamed chunks
    are what the models write for the same content."""
    url = server.base_url + "/chat/completions"
    base = {"model": "qwen3-vl", "messages": [{"role": "user", "content": "Where is it?"}],
            "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    adapter = TypeAdapter(p.ChatCompletion)
    for extra in ({}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 5, "n": 2}):
        r = httpx.post(url, json={**base, **extra}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        again = adapter.dump_json(p.ChatCompletion.model_validate_json(r.content), by_alias=True)
        assert r.content == again
        if extra.get("top_logprobs"):
            assert all(len(e["top_logprobs"]) == 5 for c in r.json()["choices"]
                       for e in c["logprobs"]["content"])
    with httpx.stream("POST", url, json={**base, "logprobs": True, "top_logprobs": 5,
                                         "stream": True}, timeout=60) as r:
        chunks = [x[len("data: "):] for x in r.iter_lines() if x.startswith("data: {")]
    for c in chunks:
        assert c == p.ChatCompletionChunk.model_validate_json(c).model_dump_json(exclude_none=True)
    entries_seen = [e for c in chunks for ch in json.loads(c)["choices"]
                    for e in (ch.get("logprobs") or {}).get("content", [])]
    assert len(entries_seen) == 12 and all(len(e["top_logprobs"]) == 5 for e in entries_seen)


def test_output_thread_write_failure_fails_that_request_only():
    """The output thread writes a step's entries at once; when that fails (here: one
    request's top token cannot be decoded), it writes row by row, so that only the request
    concerned gets an error and the others their events, with the entries a batch writes."""
    from server.engine.interface import SamplingParams
    from server.engine.output import OutputStage
    from server.engine.sampler import LogprobRows
    from server.errors import InternalError

    class Faults:
        def tick(self, stage):
            pass

    class Engine:
        faults, failures = Faults(), 0

        def token_text(self, t):
            if t == 13:
                raise ValueError("undecodable")
            return f"t{t}"

        def token_bytes(self, t):
            return list(f"t{t}".encode())

        def _note_failure(self):
            self.failures += 1

    class Entry:
        def __init__(self):
            self.sink, self.seqs, self.released = object(), [], False
            self.stream = True  # as server.engine.core.Entry
            self.reservation = self

        def release(self):
            self.released = True

    class Row:
        def __init__(self, entry, k):
            self.sink, self.finish_reason, self.stopped = entry, None, False
            self.params = SamplingParams(temperature=0, logprobs=True, top_logprobs=k)
            entry.seqs.append(self)

        def emit(self, token, lp, finish, hide):
            return (token, lp)

    engine = Engine()
    stage = OutputStage(engine)
    try:
        a, b, c = Entry(), Entry(), Entry()
        rows = [Row(a, 2), Row(b, 2), Row(c, 1)]
        host = [[1.0, -0.5, 2.0, 3.0, -0.5, -1.25],
                [4.0, -0.1, 13.0, 5.0, -0.1, -3.0],   # top id 13 cannot be decoded
                [6.0, -2.0, 7.0, 8.0, -0.25, -9.0]]
        order: list = []
        stage._process(("step", rows, [1, 4, 6], [None] * 3, [False] * 3,
                        LogprobRows(host, 2)), {}, order)
        got = {id(sink): thing for sink, thing in order}
        assert isinstance(got[id(b.sink)], InternalError) and b.released and engine.failures == 1
        assert all(r.stopped for r in b.seqs)

        def info(i):
            return engine.token_text(i), engine.token_bytes(i)
        want = p.LogprobJSON().write([(1, -0.5, [2, 3], [-0.5, -1.25]), (6, -2.0, [7], [-0.25])],
                                     info)
        assert got[id(a.sink)] == [(1, want[0])] and got[id(c.sink)] == [(6, want[1])]
        assert json.loads(want[1]) == {"token": "t6", "logprob": -2.0, "bytes": list(b"t6"),
                                       "top_logprobs": [{"token": "t7", "logprob": -0.25,
                                                         "bytes": list(b"t7")}]}
    finally:
        stage.stop()
