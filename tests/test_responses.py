"""Issue 33: the Responses API (``POST /v1/responses``) through the real ``openai`` SDK.

Its semantics are chat's (``server.api.responses`` turns the request into a chat request), so
the tests hold it to the chat route where they can: the same greedy text and the same
prompt tokens for the same conversation, text or with an image; then the event stream
(the SDK's types, in order, ending with ``response.completed``), a ``json_schema`` format
whose output parses and validates, a function-tool round trip, the stateless refusals,
and a unit test of the item builder with a reasoning (Thinking-model) answer.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from server.api import protocol as p
from server.api.responses import _Builder
from server.api.serving import RequestStats, deltas
from server.api.tools import OutputParser
from tests.conftest import data_url, png_bytes

MODEL = "qwen3-vl"
PICK = {"type": "object", "properties": {"colour": {"enum": ["red", "blue", "green"]},
                                         "count": {"type": "integer", "minimum": 0,
                                                   "maximum": 9}},
        "required": ["colour", "count"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "order_status", "description": "Look an order up.",
          "parameters": {"type": "object", "properties": {"order": {"enum": ["A17", "B42"]}},
                         "required": ["order"], "additionalProperties": False}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
              for t in TOOLS]


def test_text_answer_is_the_chat_answer(client):
    r = client.responses.create(model=MODEL, instructions="Answer briefly.",
                                input="Which mug is the blue one?", max_output_tokens=6,
                                temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Which mug is the blue one?"}])
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    # cut by max_output_tokens: incomplete, as OpenAI reports it
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.store is False  # accepted (default true), nothing stored


def test_image_input_counts_as_in_chat(client):
    url = data_url(png_bytes(200, 120))
    r = client.responses.create(model=MODEL, max_output_tokens=3, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": url,
                                      "detail": "low"}]}])
    chat = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url",
                                      "image_url": {"url": url, "detail": "low"}}]}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.input_tokens_details.model_extra["image_tokens"] == \
        chat.usage.prompt_tokens_details.image_tokens > 0
    assert r.output_text == chat.choices[0].message.content


def test_json_schema_format_parses_and_validates(client):
    r = client.responses.create(model=MODEL, input="Pick a colour and a count.",
                                max_output_tokens=64, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "pick",
                                                 "schema": PICK, "strict": True}})
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), PICK)
    assert r.text.format.type == "json_schema"


def test_streamed_events_end_with_completed(client):
    events = list(client.responses.create(
        model=MODEL, input="Pick a colour and a count.", max_output_tokens=64, stream=True,
        text={"format": {"type": "json_schema", "name": "pick", "schema": PICK}}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text
    assert events[-4].text == text and events[-2].item.status == "completed"
    jsonschema.validate(json.loads(text), PICK)
    assert final.usage.output_tokens > 0


def test_the_sdks_stream_helper_accumulates_our_events(client):
    """``responses.stream`` rebuilds the response from the events and checks their order;
    it wants ``response.completed`` (an answer cut by max_output_tokens ends with
    ``response.incomplete``, as OpenAI's does), so the format here makes it finish."""
    with client.responses.stream(
            model=MODEL, input="Pick.", max_output_tokens=64,
            text={"format": {"type": "json_schema", "name": "pick", "schema": PICK}}) as stream:
        deltas_seen = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas_seen) and final.status == "completed"


def test_function_tool_round_trip(client):
    first = client.responses.create(model=MODEL, input="Where is my order A17?", tools=TOOLS,
                                    tool_choice="required", max_output_tokens=64,
                                    temperature=0)
    assert first.status == "completed", first.output
    (call,) = first.output
    assert call.type == "function_call" and call.name == "order_status"
    assert call.status == "completed" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["order"] in ("A17", "B42")
    history = [{"role": "user", "content": "Where is my order A17?"},
               call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id,
                "output": '{"status": "shipped"}'}]
    second = client.responses.create(model=MODEL, input=history, tools=TOOLS,
                                     max_output_tokens=4, temperature=0)
    # the same conversation through chat: the same prompt, the same answer
    chat = client.chat.completions.create(
        model=MODEL, tools=CHAT_TOOLS, max_tokens=4, temperature=0, messages=[
            history[0],
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call.call_id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"status": "shipped"}'}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")


def test_streamed_function_call_events(client):
    events = list(client.responses.create(
        model=MODEL, input="Where is my order?", tools=TOOLS, max_output_tokens=64,
        tool_choice={"type": "function", "name": "order_status"}, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    args = "".join(e.delta for e in events
                   if e.type == "response.function_call_arguments.delta")
    assert events[-3].arguments == args and json.loads(args)["order"] in ("A17", "B42")
    assert events[-1].response.output[0].arguments == args


def test_stateless_and_refused_fields(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_123")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-1"}]}])
    assert e.value.body["param"] == "input[0].content[0].image_url"
    with pytest.raises(openai.BadRequestError) as e:  # a chat check, in input's terms
        client.responses.create(model=MODEL, input=[
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                         {"type": "input_image",
                                          "image_url": "data:image/png;base64,!!"}]}])
    assert e.value.body["param"] == "input[1].content[1].image_url"
    r = httpx.post(server.url + "/v1/responses", json={
        "model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools[0]")


def test_builder_reasoning_message_and_call():
    """A Thinking model's answer: a reasoning item with its summary, then the message,
    then a call; in the events each item is opened, filled and closed in turn."""
    req = p.ResponsesRequest(model=MODEL, input="hi", tools=TOOLS)
    parser = OutputParser(tools=True, opened_think=True)
    b = _Builder(req, "resp_x", RequestStats(), parser, streaming=True)
    text = ('weighing it</think>\n\nIt is A17.\n<tool_call>\n{"name": "order_status", '
            '"arguments": {"order": "A17"}}\n</tool_call>')
    for piece in (text[:7], text[7:30], text[30:]):
        for d in deltas(parser.feed(piece)):
            b.feed(d)
    for d in deltas(parser.finish()):
        b.feed(d)
    final = b.finish("stop")
    types = [i["type"] for i in final["output"]]
    assert types == ["reasoning", "message", "function_call"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "weighing it"}]
    assert final["output"][1]["content"][0]["text"] == "It is A17."
    assert final["output"][2]["status"] == "completed"
    assert json.loads(final["output"][2]["arguments"]) == {"order": "A17"}
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in b.take()]
    assert kinds[:3] == ["response.output_item.added", "response.reasoning_summary_part.added",
                         "response.reasoning_summary_text.delta"]
    assert kinds.count("response.output_item.added") == kinds.count(
        "response.output_item.done") == 3
    assert kinds[-1] == "response.completed"
