"""Tool calling (tools / tool_choice / parallel_tool_calls), the reasoning split, logprobs
and logit_bias, through the real server with the tiny model and through the ``openai`` SDK.

With random weights the tiny model never calls a tool by itself, so ``required`` and named
``tool_choice`` passing here is the grammar's doing; the parser's own cases (auto mode,
reasoning, streaming splits) are unit-tested on text.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import jsonschema
import pytest

from server.api.tools import OutputParser, parse
from tests.conftest import grammar_accepts

pytestmark = pytest.mark.timeout(180)

MODEL = "qwen3-vl"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
ORDER = {"type": "object", "properties": {
    "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["order_id"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather.",
                                       "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_order", "description": "Look up an order.",
                                      "parameters": ORDER}},
    {"type": "function", "function": {"name": "ping", "description": "No arguments."}},
]
PARAMS = {"get_weather": WEATHER, "get_order": ORDER,
          "ping": {"type": "object", "properties": {}, "additionalProperties": False}}
USER = [{"role": "user", "content": "What's the weather in Paris, and where is order 48213?"}]


def check_call(call):
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) > 10
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


# --- tool calls through the server ------------------------------------------------------

def test_tool_call_round_trip_with_openai_sdk(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                       tool_choice="required", max_tokens=300, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call)
    # send the calls back with their results: a normal answer follows
    messages = USER + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": "ok"})}
        for c in choice.message.tool_calls]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                        max_tokens=20, seed=1)
    c2 = r2.choices[0]
    assert c2.finish_reason in ("stop", "length") and not c2.message.tool_calls
    assert isinstance(c2.message.content, str)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_round_trip_messages_render_into_the_template(tiny_model):
    """What serving hands the engine for a tool round trip renders as Qwen's own format."""
    from models.processor import load_processor
    from server.api import protocol as p
    from server.api.serving import ChatService
    req = p.ChatCompletionRequest(model=MODEL, tools=TOOLS, messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_order", "arguments": '{"order_id": 48213}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "shipped"}])
    from server.settings import Settings
    svc = ChatService.__new__(ChatService)  # only the message conversion is exercised
    svc.settings = Settings()
    messages, images, videos = asyncio.run(svc._convert(req))
    assert messages[2]["tool_call_id"] == "call_1" and not images and not videos
    text = load_processor(tiny_model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True,
        tools=[t for t in (x.model_dump(exclude_none=True) for x in req.tools)])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": '
            '"get_order", "arguments": {"order_id": 48213}}\n</tool_call><|im_end|>') in text
    assert ('<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response>\n'
            '<tool_response>\nshipped\n</tool_response><|im_end|>') in text


def test_named_tool_choice_forces_one_call_of_that_function(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, max_tokens=300, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_order"}})
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "get_order"
        check_call(calls[0])


async def test_required_calls_parallel_or_not(aclient):
    async def run(parallel, seed):
        return await aclient.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", seed=seed,
            max_tokens=400, temperature=1.0, parallel_tool_calls=parallel)
    single = await asyncio.gather(*(run(False, s) for s in range(6)))
    multi = await asyncio.gather(*(run(True, s) for s in range(6)))
    for r in single:
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1
    names = set()
    for r in single + multi:
        if r.choices[0].finish_reason == "tool_calls":
            for call in r.choices[0].message.tool_calls:
                check_call(call)
                names.add(call.function.name)
    assert len(names) >= 2  # the choice among the tools is the model's


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_call(client):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=300,
              seed=4, temperature=1.0)
    whole = client.chat.completions.create(**kw)
    calls: dict[int, dict] = {}
    fragments, finish = [], None
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for tc in c.delta.tool_calls or []:
                fragments.append(tc)
                if tc.index not in calls:  # OpenAI's first fragment: id, type, name, ""
                    assert tc.id.startswith("call_") and tc.type == "function"
                    assert tc.function.name and tc.function.arguments == ""
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:  # then only argument text
                    assert tc.id is None and tc.function.name is None
                    calls[tc.index]["arguments"] += tc.function.arguments
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    got = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert got == want
    assert len(fragments) > len(got) + 1  # really streamed in pieces


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"oneOf": [{}, {}]}}}}}],
      "tool_choice": "required"}, "tool_choice"),
])
def test_tool_choice_errors(server, body, param):
    r = httpx.post(server.base_url + "/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_choice_none_and_auto_leave_text_alone(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                           tool_choice=choice, max_tokens=16, seed=2)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)


# --- the parser (auto mode, reasoning) ---------------------------------------------------

def _stream(text, sizes, **kw):
    p = OutputParser(**kw)
    events, i = [], 0
    for n in sizes:
        events += p.feed(text[i:i + n])
        i += n
    events += p.feed(text[i:]) + p.finish()
    calls: dict[int, list] = {}
    for e in events:
        if e[0] == "tool_start":
            calls[e[1]] = [e[3], ""]
        elif e[0] == "tool_args":
            calls[e[1]][1] += e[2]
    return ("".join(e[1] for e in events if e[0] == "content"),
            "".join(e[1] for e in events if e[0] == "reasoning"),
            [tuple(v) for _, v in sorted(calls.items())])


PARSER_CASES = [
    ("plain text <b>stays</b> as is  \n", {}, "plain text <b>stays</b> as is  \n", None, []),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
     {"tools": True}, "Let me check.", None,
     [("get_weather", '{"city": "Paris"}'), ("ping", "{}")]),
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
     '{"name": "b", "arguments": {}}\n</tool_call>', {"tools": True, "parallel": False},
     None, None, [("a", '{"x": 1}')]),
    ('<tool_call>\n{"arguments": {"q": [1, {"r": "}"}]}, "name": "s"}\n</tool_call>',
     {"tools": True}, None, None, [("s", '{"q": [1, {"r": "}"}]}')]),
    ("see <tool_call>not json</tool_call> ok", {"tools": True},
     "see <tool_call>not json</tool_call> ok", None, []),
    ("<think>\nstep 1\n</think>\n\nThe answer is 42.", {}, "The answer is 42.", "\nstep 1\n", []),
    ("step 1</think>\n\nAnswer.", {"opened_think": True}, "Answer.", "step 1", []),
    ('<think>hm</think>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
     {"tools": True}, None, "hm", [("ping", "{}")]),
    ("no <think> here", {}, "no <think> here", None, []),
]


@pytest.mark.parametrize("text,kw,content,reasoning,calls", PARSER_CASES)
def test_parser_whole_and_streamed_agree(text, kw, content, reasoning, calls):
    got = parse(text, **kw)
    assert got.content == content and got.reasoning == reasoning
    assert [(c.name, c.arguments) for c in got.tool_calls] == calls
    for c in got.tool_calls:
        assert c.id.startswith("call_")
    want = _stream(text, [len(text)], **kw)
    rng = random.Random(0)
    for _ in range(100):  # any split of the text into deltas gives the same result
        assert _stream(text, [rng.randint(0, 5) for _ in text], **kw) == want


# --- logprobs and logit_bias -------------------------------------------------------------

def _check_logprobs(entries, k):
    for e in entries:
        assert e.logprob <= 0 and e.bytes is not None
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == k
        assert tops == sorted(tops, reverse=True)
        assert all(t <= 0 for t in tops) and sum(math.exp(t) for t in tops) <= 1 + 1e-4
        if k:
            assert e.logprob <= tops[0] + 1e-5


def test_logprobs_shape_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, seed=3,
                                       logprobs=True, top_logprobs=5, n=2)
    for c in r.choices:
        _check_logprobs(c.logprobs.content, 5)
    total = sum(len(c.logprobs.content) for c in r.choices)
    assert total == r.usage.completion_tokens
    greedy = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12,
                                            temperature=0, logprobs=True, top_logprobs=20)
    entries = greedy.choices[0].logprobs.content
    _check_logprobs(entries, 20)
    assert len(entries) == greedy.usage.completion_tokens
    for e in entries:  # greedy picks the most likely token
        assert e.token == e.top_logprobs[0].token
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, seed=3,
                                           logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    assert none.choices[0].logprobs is None


def test_logprobs_streaming_match_non_streaming(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=24, seed=8, logprobs=True,
              top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    entries, usage = [], None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                             **kw):
        usage = ch.usage or usage
        for c in ch.choices:
            if c.logprobs and c.logprobs.content:
                entries += c.logprobs.content
    _check_logprobs(entries, 3)
    assert len(entries) == usage.completion_tokens == whole.usage.completion_tokens
    want = whole.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in want]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(entries, want))


def test_logprobs_with_constrained_tool_calls_streamed(client):
    n, usage = 0, None
    for ch in client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=300,
            seed=2, logprobs=True, top_logprobs=2, stream=True,
            stream_options={"include_usage": True}):
        usage = ch.usage or usage
        for c in ch.choices:
            if c.logprobs and c.logprobs.content:
                _check_logprobs(c.logprobs.content, 2)
                n += len(c.logprobs.content)
    assert n == usage.completion_tokens


def test_top_logprobs_limits(server):
    url = server.base_url + "/chat/completions"
    base = {"model": MODEL, "messages": USER, "max_tokens": 2}
    r = httpx.post(url, json={**base, "logprobs": True, "top_logprobs": 21}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(url, json={**base, "top_logprobs": 3}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_logit_bias(client, tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    forced = tok.encode(" order")[0]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0,
                                       logit_bias={str(forced): 100}, logprobs=True)
    assert [e.token for e in r.choices[0].logprobs.content] == [tok.decode([forced])] * 6
    # banning the greedy first token changes it
    greedy = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1,
                                            temperature=0, logprobs=True)
    first = greedy.choices[0].logprobs.content[0]
    # its id from its bytes (byte-level BPE spells each byte as one character)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spell = bytes_to_unicode()
    first_id = tok.convert_tokens_to_ids("".join(spell[b] for b in first.bytes))
    assert first_id is not None and first_id != tok.unk_token_id, first
    banned = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=1, temperature=0, logprobs=True,
        logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].bytes != first.bytes


# --- reasoning split with a template that opens <think> ---------------------------------

def test_reasoning_split_when_the_template_opens_think(server_factory, tiny_model, tmp_path):
    import shutil

    from openai import OpenAI
    model = tmp_path / "thinking"
    shutil.copytree(tiny_model, model)
    gen_prompt = "'<|im_start|>assistant\\n' }}"
    think_prompt = "'<|im_start|>assistant\\n<think>\\n' }}"
    jinja = model / "chat_template.jinja"
    head, sep, tail = jinja.read_text().rpartition(gen_prompt)
    assert sep
    jinja.write_text(head + think_prompt + tail)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("chat_template"), str):
        head, sep, tail = cfg["chat_template"].rpartition(gen_prompt)
        cfg["chat_template"] = head + think_prompt + tail
        cfg_path.write_text(json.dumps(cfg))
    srv = server_factory(model=str(model))
    c = OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
    kw = dict(model=MODEL, messages=USER, max_tokens=24, seed=5)
    whole = c.chat.completions.create(**kw).choices[0]
    msg = whole.message.model_dump()
    assert isinstance(msg["reasoning_content"], str) and msg["reasoning_content"]
    assert "</think>" not in msg["reasoning_content"] + (msg["content"] or "")
    reasoning = content = ""
    for ch in c.chat.completions.create(stream=True, **kw):
        for x in ch.choices:
            d = x.delta.model_dump()
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
    assert (reasoning, content) == (msg["reasoning_content"], msg["content"])
    # a grammar-bound answer has no reasoning part: the JSON is the content
    r = c.chat.completions.create(response_format={"type": "json_object"}, **{
        **kw, "max_tokens": 200}).choices[0]
    assert grammar_accepts(r.message.content, complete=r.finish_reason == "stop"), r
    assert r.message.model_dump().get("reasoning_content") is None
