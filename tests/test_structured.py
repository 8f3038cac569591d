"""Structured output (``response_format`` json_object / json_schema) against the tiny model.

The tiny model has random weights: left alone it writes garbage, so every valid JSON
document below is the grammar's doing.  The schemas are finite (bounded strings, numbers,
arrays; enums, booleans), so that the random model always reaches the end of the grammar
within ``max_tokens``; then ``finish_reason`` is "stop" and the output must validate.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
from tests.conftest import grammar_accepts

pytestmark = pytest.mark.timeout(180)

MODEL = "qwen3-vl"

ORDER = {  # nested objects, arrays, enums, bounded numbers, required fields
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "maxLength": 8},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "express": {"type": "boolean"},
        "total": {"type": "number", "minimum": 0, "maximum": 500},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "minLength": 1, "maxLength": 6},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "note": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["order_id", "status", "express", "total", "items"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "country": {"enum": ["DE", "FR", "JP", "US"]}},
            "required": ["city", "country"]},
        "tags": {"type": "array", "items": {"enum": ["vip", "new", "b2b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "address"],
}
CODES = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "ok": {"const": True},
        "kind": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                           {"enum": ["none"]}]},
    },
    "required": ["code", "score", "ok", "kind"],
}
REFS = {
    "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]}},
    "type": "object",
    "properties": {"path": {"type": "array", "items": {"$ref": "#/$defs/point"},
                            "minItems": 1, "maxItems": 3},
                   "closed": {"type": "boolean"}},
    "required": ["path", "closed"],
}
TOP_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
             "minItems": 2, "maxItems": 4}
SCHEMAS = [ORDER, PERSON, CODES, REFS, TOP_ARRAY]


def fmt(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def ask(text="Give me the record."):
    return [{"role": "user", "content": text}]


async def test_fifty_concurrent_constrained_requests_all_validate(aclient):
    async def one(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = await aclient.chat.completions.create(
            model=MODEL, messages=ask(f"Record number {i}, please."), max_tokens=400,
            temperature=1.0, seed=i, response_format=fmt(schema, f"s{i % len(SCHEMAS)}"))
        return schema, r

    results = await asyncio.gather(*(one(i) for i in range(50)))
    outputs = set()
    for schema, r in results:
        c = r.choices[0]
        assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)
        assert r.usage.completion_tokens <= 400
        outputs.add(c.message.content)
    assert len(outputs) > 25  # sampled, not one canned answer


async def test_constrained_and_free_rows_share_a_batch(aclient):
    """Seeded rows sample the same tokens whatever shares their batch, so running the
    same two requests alone and together shows the mask touched only its own row."""
    free = dict(model=MODEL, messages=ask("Tell me a story."), max_tokens=48, seed=7,
                temperature=0.9)
    constrained = dict(model=MODEL, messages=ask(), max_tokens=400, seed=7, temperature=0.9,
                       response_format=fmt(PERSON))
    alone_free = await aclient.chat.completions.create(**free)
    alone_con = await aclient.chat.completions.create(**constrained)
    together = await asyncio.gather(
        aclient.chat.completions.create(**free), aclient.chat.completions.create(**constrained),
        *(aclient.chat.completions.create(**{**constrained, "seed": s}) for s in range(4)),
        *(aclient.chat.completions.create(**{**free, "seed": s}) for s in range(4)))
    t_free, t_con = together[0], together[1]
    assert t_free.choices[0].message.content == alone_free.choices[0].message.content
    assert t_con.choices[0].message.content == alone_con.choices[0].message.content
    assert t_con.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(t_con.choices[0].message.content), PERSON)
    # the free row is unconstrained garbage that runs to its limit
    assert t_free.choices[0].finish_reason in ("length", "stop")
    for r in together[2:6]:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    for r in together[6:]:
        with pytest.raises(ValueError):  # random text: not JSON
            json.loads(r.choices[0].message.content)


async def test_json_object_mode(aclient):
    rs = await asyncio.gather(*(aclient.chat.completions.create(
        model=MODEL, messages=ask("JSON please"), max_tokens=160, seed=s, temperature=1.0,
        response_format={"type": "json_object"}) for s in range(6)))
    # every answer keeps to the grammar: a whole object when it stopped, the start of one
    # when max_tokens cut it
    stopped = [r for r in rs if r.choices[0].finish_reason == "stop"]
    assert stopped
    for r in stopped:
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    for r in rs:
        assert grammar_accepts(r.choices[0].message.content,
                               complete=r.choices[0].finish_reason == "stop"), r.choices[0]


def test_streamed_constrained_output_matches_non_streamed(client):
    kw = dict(model=MODEL, messages=ask(), max_tokens=400, seed=11, temperature=1.0,
              response_format=fmt(ORDER))
    whole = client.chat.completions.create(**kw)
    text, finish = "", None
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == whole.choices[0].finish_reason == "stop"
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), ORDER)


def test_n_choices_each_follow_the_schema(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=400, n=3,
                                       seed=5, temperature=1.0, response_format=fmt(REFS))
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), REFS)


def test_stop_strings_do_not_cut_constrained_output(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=400, seed=3,
                                       stop=['"', ","], response_format=fmt(PERSON))
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize("schema,feature", [
    ({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, "oneOf"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "^(?=a)ab$"}, "lookahead"),
    ({"type": "object", "properties": {"n": {"not": {"type": "null"}}}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if/then/else"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"$ref": "https://example.com/schema.json"}, "remote $ref"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
])
def test_unsupported_schema_features_are_refused(server, schema, feature):
    r = httpx.post(server.base_url + "/chat/completions", timeout=30, json={
        "model": MODEL, "messages": ask(), "response_format": fmt(schema)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format"
    assert feature in err["message"]
    assert ".cc:" not in err["message"]


def test_schema_the_grammar_engine_rejects_is_a_400(server):
    r = httpx.post(server.base_url + "/chat/completions", timeout=30, json={
        "model": MODEL, "messages": ask(),
        "response_format": fmt({"type": "array", "items": [{"type": "integer"}]})})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and "cannot be enforced" in err["message"]
    assert "/project" not in err["message"]
    r = httpx.post(server.base_url + "/chat/completions", timeout=30, json={
        "model": MODEL, "messages": ask(), "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema"


# --- engine-level: compilation cache and the token masks --------------------------------

@pytest.fixture(scope="module")
def grammars(tiny_model):
    from transformers import AutoTokenizer

    from server.engine.structured import GrammarCache
    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    # a model vocabulary larger than the tokenizer's, as Qwen's padded lm_head is
    return tok, GrammarCache(tok, vocab_size=len(tok) + 35, stop_ids=eos, capacity=3)


def test_compiled_grammars_are_cached_lru(grammars):
    from server.engine.structured import GrammarSpec
    _, cache = grammars
    a = cache.compile(GrammarSpec.json_schema(PERSON))
    assert cache.compile(GrammarSpec.json_schema(PERSON)) is a
    for s in (ORDER, CODES, REFS):  # capacity 3: PERSON is evicted
        cache.compile(GrammarSpec.json_schema(s))
    assert cache.compile(GrammarSpec.json_schema(PERSON)) is not a


def test_masks_keep_any_distribution_inside_the_schema(grammars):
    """Adversarial check of the guarantee: sample from random logits (not the model) under
    the mask, decode as the server does, and validate.  Also: tokens past the tokenizer's
    size (padded vocabulary) and special tokens are never allowed."""
    import torch

    from server.engine.structured import GrammarSpec, apply_masks
    tok, cache = grammars
    vocab = cache.vocab_size
    g = torch.Generator().manual_seed(0)
    # each draw samples all 151,936 columns on the real vocabulary: fewer trials there
    trials = 25 if vocab < 10_000 else 8
    for schema in SCHEMAS:
        compiled = cache.compile(GrammarSpec.json_schema(schema))
        for trial in range(trials):
            m, ids = compiled.matcher(), []
            for _ in range(400):
                logits = torch.randn(2, vocab, generator=g) * (1 + trial % 5)
                free_row = logits[0].clone()
                apply_masks(logits, [m], [1])
                assert torch.equal(logits[0], free_row)  # other rows untouched
                assert torch.isinf(logits[1, len(tok):]).all()
                tid = int(torch.multinomial(torch.softmax(logits[1], -1), 1, generator=g))
                assert m.accept_token(tid)
                ids.append(tid)
                if m.is_terminated():
                    break
            assert m.is_terminated()
            jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), schema)


def test_accelerator_mask_path_matches_xgrammar(grammars):
    """The torch bit-unpacking used on GPUs masks exactly what xgrammar's CPU kernel does."""
    import torch
    import xgrammar as xgr

    from server.engine.structured import GrammarSpec, apply_bitmask_torch
    _, cache = grammars
    m = cache.compile(GrammarSpec.json_schema(CODES)).matcher()
    assert m.accept_string('{"code": "A')
    bm = xgr.allocate_token_bitmask(3, cache.vocab_size)
    m.fill_next_token_bitmask(bm, 2)
    bm[0] = torch.randint(-2**31, 2**31 - 1, bm[0].shape, dtype=torch.int32)
    logits = torch.randn(3, cache.vocab_size)
    a, b = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(a, bm, indices=[0, 2])
    apply_bitmask_torch(b, bm, [0, 2])
    assert torch.equal(a, b) and torch.equal(a[1], logits[1])
    assert 0 < int(torch.isfinite(a[2]).sum()) < 60  # only upper-case letters fit here


def test_cache_counts_serialised_bytes_and_keeps_tenants_apart(grammars):
    """Each entry weighs at least its serialised size (xgrammar's own estimate missed
    large grammars by 45x); the byte budget evicts by that weight; a salt is a tenant."""
    from server.engine.structured import GrammarCache, GrammarSpec
    tok, shared = grammars
    eos = shared.stop_ids
    cache = GrammarCache(tok, vocab_size=shared.vocab_size, stop_ids=eos)
    a = cache.compile(GrammarSpec.json_schema(ORDER), salt="key:a")
    assert cache.bytes >= len(a.compiled.serialize_json())
    assert cache.compile(GrammarSpec.json_schema(ORDER), salt="key:a") is a  # a's own hit
    assert cache.compile(GrammarSpec.json_schema(ORDER), salt="key:b") is not a
    assert (cache.hits, cache.misses) == (1, 2)
    # a budget the size of the largest entry: never more than that is kept
    sizes = {}
    for s in (ORDER, PERSON, CODES):
        g = cache.compile(GrammarSpec.json_schema(s))
        sizes[json.dumps(s)] = max(len(g.compiled.serialize_json()), 1)
    small = GrammarCache(tok, vocab_size=shared.vocab_size, stop_ids=eos,
                         max_bytes=max(sizes.values()) + 1)
    for s in (ORDER, PERSON, CODES):
        small.compile(GrammarSpec.json_schema(s))
        assert small.bytes <= small.max_bytes
    assert len(small._cache) < 3
