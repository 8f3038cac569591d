"""A tool call reported complete always parses (issue 13): ``</tool_call>`` inside a JSON
string never ends a call, a call cut by max_tokens is "length" with its text as content."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.api.tools import OutputParser, parse
from tests.test_tools_logprobs import MODEL, TOOLS, USER

pytestmark = pytest.mark.timeout(240)

TRICKY = ('<tool_call>\n{"name": "note", "arguments": {"text": "a </tool_call> b <tool_call>'
          ' c \\" </tool_call>"}}\n</tool_call>')


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_marker_inside_a_string_is_argument_text(chunk):
    p = OutputParser(tools=True)
    events = []
    for i in range(0, len(TRICKY), chunk):
        events += p.feed(TRICKY[i:i + chunk])
    events += p.finish()
    assert p.has_tool_calls and len(p.calls) == 1
    streamed = "".join(e[2] for e in events if e[0] == "tool_args")
    assert json.loads(streamed) == {"text": 'a </tool_call> b <tool_call> c " </tool_call>'}
    assert not [e for e in events if e[0] == "content"]
    whole = parse(TRICKY, tools=True)
    assert whole.content is None and whole.tool_calls[0].arguments == streamed


def test_cut_and_broken_calls_come_back_as_content():
    cut = '<tool_call>\n{"name": "note", "arguments": {"text": "unfinished'
    r = parse("Sure. " + cut, tools=True)
    assert r.tool_calls == [] and r.content == "Sure. " + cut
    broken = '<tool_call>\n{"name": "note", "arguments": {"text": }}\n</tool_call>'
    p = OutputParser(tools=True)
    p.feed(broken)
    p.finish()
    assert not p.has_tool_calls and p.incomplete_text == broken
    good = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
    r = parse(good + cut, tools=True)  # one complete call, then one cut
    assert [c.name for c in r.tool_calls] == ["a"] and r.content == cut


async def test_required_calls_at_temperature_1_always_parse(aclient):
    """The issue's case: 20 seeds of tool_choice="required" at temperature 1.0 with the
    README's tool.  Every call listed parses, whatever the finish reason; an answer cut
    by max_tokens lists no unfinished call (its text is content)."""
    tools = [{"type": "function", "function": {
        "name": "get_order_status", "description": "Look up an order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                       "required": ["order_id"]}}}]

    async def run(seed):
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Where is order 48213?"}],
            tools=tools, tool_choice="required", seed=seed, temperature=1.0, max_tokens=128)
    finishes = []
    for r in await asyncio.gather(*(run(s) for s in range(20))):
        c = r.choices[0]
        finishes.append(c.finish_reason)
        for call in c.message.tool_calls or []:
            assert "order_id" in json.loads(call.function.arguments)
        if c.finish_reason == "tool_calls":
            assert c.message.tool_calls and not c.message.content, c.message
        else:
            assert c.finish_reason == "length", c
            assert c.message.tool_calls or c.message.content.startswith("<tool_call>"), c
    assert set(finishes) <= {"tool_calls", "length"}


def test_call_cut_by_max_tokens_is_length_not_a_call(client):
    """Cut inside the arguments: non-streamed, the call's text is content (as in vLLM);
    streamed, the fragments sent so far end with finish_reason "length"."""
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, seed=3,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # the grammar fixes the text, not its tokens: find (same seed, same tokens) how many
    # tokens reach the first argument's value, and cut 2 tokens after that
    full = client.chat.completions.create(max_tokens=128, logprobs=True, **kw).choices[0]
    text, cut = "", 0
    for cut, entry in enumerate(full.logprobs.content, 1):
        text += entry.token
        if text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": '):
            break
    kw["max_tokens"] = cut + 2
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls
    assert c.message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    finish, args = None, ""
    for ch in client.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            args += "".join(t.function.arguments or "" for t in choice.delta.tool_calls or [])
    assert finish == "length" and args.startswith('{"city": ')
