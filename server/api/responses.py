"""The Responses API (``POST /v1/responses``), stateless, on the chat service.

A ``ResponsesRequest`` becomes a chat request (``to_chat``): ``instructions`` a system
message, ``input`` (a string, or items: messages with ``input_text`` / ``input_image`` /
``output_text`` parts, ``function_call`` and ``function_call_output`` items for a tool
round trip; ``reasoning`` items dropped) the messages, flat function ``tools`` and
``tool_choice`` chat's, ``text.format`` the ``response_format``, ``max_output_tokens``
``max_tokens``.  It then runs exactly as a chat completion (checks, key limits, media
policy, queue, engine, tool-call and reasoning parsing: ``ChatService``); errors name the
Responses request's own fields (``input[2].content[1].image_url``), not chat's.

The answer is built by one state machine (``_Builder``) for both modes: the parser's
events open and fill ``output`` items (``reasoning`` with a summary, ``message`` with one
``output_text`` part, ``function_call``) and, streamed, become the SDK's events in order:
``response.created``, ``response.in_progress``, per item ``response.output_item.added``,
its part/delta/done events and ``response.output_item.done``, then
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it, with
``incomplete_details.reason``), each with its ``sequence_number``.  A mid-stream failure
is an ``error`` event, then ``response.failed``.

Stateless: ``store`` is accepted (OpenAI defaults it to true) but nothing is kept, and the
response says ``"store": false``; ``previous_response_id`` and ``background`` answer 400,
``GET /v1/responses/{id}`` 404.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from pydantic import ValidationError

from server.api import protocol as p
from server.engine.interface import Output
from server.errors import APIError, InvalidRequest
from server.api.serving import ChatService, RequestStats, deltas

STATELESS = ("This server is stateless: it stores no responses (store is accepted, nothing "
             "is kept); send the whole conversation in input.")


def response_id() -> str:
    return _new_id("resp")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- request

def to_chat(req: p.ResponsesRequest) -> tuple[p.ChatCompletionRequest, dict[str, str]]:
    """The chat request, and where each chat message came from (``messages[i]`` ->
    ``input[k]`` / ``input`` / ``instructions``) for the errors' ``param``."""
    if req.previous_response_id is not None:
        raise InvalidRequest(STATELESS, param="previous_response_id")
    if req.background:
        raise InvalidRequest("background is not supported: the answer comes on this "
                             "connection.", param="background")
    messages: list[dict] = []
    where: dict[str, str] = {}

    def add(msg: dict, origin: str):
        where[f"messages[{len(messages)}]"] = origin
        messages.append(msg)

    if req.instructions:
        add({"role": "system", "content": req.instructions}, "instructions")
    items = [req.input] if isinstance(req.input, str) else req.input
    for k, item in enumerate(items):
        origin = "input" if isinstance(req.input, str) else f"input[{k}]"
        if isinstance(item, str):  # the whole input as one string
            add({"role": "user", "content": item}, origin)
        elif isinstance(item, p.InputMessage):
            add({"role": item.role, "content": _content(item, origin)}, origin)
        elif isinstance(item, p.FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                add({"role": "assistant", "content": None, "tool_calls": [call]}, origin)
        elif isinstance(item, p.FunctionCallOutputItem):
            add({"role": "tool", "tool_call_id": item.call_id, "content": item.output}, origin)
    body: dict = {"model": req.model, "messages": messages, "stream": req.stream,
                  "parallel_tool_calls": req.parallel_tool_calls}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("user", "user"), ("cache_salt", "cache_salt")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            exclude={"type"}, exclude_none=True)} for t in req.tools]
    tc = req.tool_choice
    if tc is not None:
        body["tool_choice"] = tc if isinstance(tc, str) else {
            "type": "function", "function": {"name": tc.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                   "strict": fmt.strict}}
    try:
        return p.ChatCompletionRequest.model_validate(body), where
    except ValidationError as e:  # rare: the item models already hold chat's rules
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise InvalidRequest(f"{loc}: {first.get('msg', 'invalid value')}",
                             param=_param(loc, where) or None) from None


def _content(item: p.InputMessage, origin: str):
    if isinstance(item.content, str):
        return item.content
    parts = []
    for j, part in enumerate(item.content):
        if isinstance(part, p.InputImage):
            if part.image_url is None:
                raise InvalidRequest("input_image needs an image_url (this server keeps no "
                                     "files: file_id is not supported).",
                                     param=f"{origin}.content[{j}].image_url")
            parts.append({"type": "image_url",
                          "image_url": {"url": part.image_url, "detail": part.detail}})
        else:
            parts.append({"type": "text", "text": getattr(part, "text", None)
                          or getattr(part, "refusal", None) or ""})
    return parts


# chat's names for the fields the Responses request names otherwise (the longest first)
_RENAMED = (("response_format.json_schema.schema", "text.format.schema"),
            ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
            ("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
            ("messages", "input"))


def _param(param: str | None, where: dict[str, str]) -> str | None:
    """A chat error's ``param`` in the Responses request's terms."""
    if not param:
        return param
    if param.startswith("messages["):
        head, _, rest = param.partition("]")
        origin = where.get(head + "]")
        if origin is None:
            return "input"
        rest = rest.replace(".image_url.url", ".image_url")
        return origin + rest if origin != "instructions" else origin
    if param.startswith("tools[") and ".function" in param:  # flat tools: no "function"
        return param.replace(".function", "", 1)
    for chat, ours in _RENAMED:
        if param == chat or param.startswith(chat + "."):
            return ours + param[len(chat):]
    return param


# --------------------------------------------------------------------------- response

class _Builder:
    """Parser events -> output items and, when ``streaming``, the stream's events
    (``take()``); a plain answer writes no event at all."""

    def __init__(self, req: p.ResponsesRequest, rid: str, stats: RequestStats, parser,
                 streaming: bool):
        self.req, self.stats, self.parser, self.streaming = req, stats, parser, streaming
        self.base = p.ResponseObject(
            id=rid, created_at=int(time.time()), status="in_progress", model=req.model,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls, temperature=req.temperature,
            top_p=req.top_p, reasoning=req.reasoning, metadata=req.metadata or {},
            user=req.user, tool_choice=(req.tool_choice.model_dump() if isinstance(
                req.tool_choice, p.FunctionToolChoice) else req.tool_choice or "auto"),
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
            if req.text is not None and req.text.format is not None
            else {"format": {"type": "text"}})
        self.items: list[dict] = []
        self.open: dict | None = None      # the item being filled
        self.calls: dict[int, dict] = {}   # parser call index -> its item
        self.seq = 0
        self.out: list[str] = []           # events not yet sent

    # events -------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        if not self.streaming:
            return
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        self.out.append(f"event: {kind}\ndata: {json.dumps(data)}\n\n")

    def take(self) -> list[str]:
        out, self.out = self.out, []
        return out

    def snapshot(self, status: str, **extra) -> dict:
        return self.base.model_copy(update={"status": status, "output": list(self.items),
                                            **extra}).model_dump()

    # items --------------------------------------------------------------------------
    def _start(self, item: dict) -> dict:
        self._close()
        self.items.append(item)
        self.open = item
        self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)
        return item

    def _close(self, status: str = "completed") -> None:
        item, self.open = self.open, None
        if item is None:
            return
        at = {"output_index": self.items.index(item), "item_id": item["id"]}
        if item["type"] == "message":
            part = item["content"][0]
            self.event("response.output_text.done", **at, content_index=0, text=part["text"],
                       logprobs=[])
            self.event("response.content_part.done", **at, content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            self.event("response.reasoning_summary_text.done", **at, summary_index=0,
                       text=part["text"])
            self.event("response.reasoning_summary_part.done", **at, summary_index=0,
                       part=part)
        else:
            self.event("response.function_call_arguments.done", **at,
                       arguments=item["arguments"])
            # complete: its block closed and its arguments parse
            done = {c.id for c in self.parser.complete_calls}
            status = "completed" if item["call_id"] in done else "incomplete"
        item["status"] = status
        self.event("response.output_item.done", output_index=at["output_index"], item=item)

    def _text(self, kind: str, text: str) -> None:
        item = self.open
        if kind == "message":
            if item is None or item["type"] != "message":
                item = self._start({"type": "message", "id": _new_id("msg"),
                                    "status": "in_progress", "role": "assistant",
                                    "content": []})
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                item["content"].append(part)
                self.event("response.content_part.added", output_index=len(self.items) - 1,
                           item_id=item["id"], content_index=0, part=part)
            item["content"][0]["text"] += text
            self.event("response.output_text.delta", output_index=len(self.items) - 1,
                       item_id=item["id"], content_index=0, delta=text, logprobs=[])
        else:
            if item is None or item["type"] != "reasoning":
                item = self._start({"type": "reasoning", "id": _new_id("rs"),
                                    "status": "in_progress", "summary": []})
                part = {"type": "summary_text", "text": ""}
                item["summary"].append(part)
                self.event("response.reasoning_summary_part.added",
                           output_index=len(self.items) - 1, item_id=item["id"],
                           summary_index=0, part=part)
            item["summary"][0]["text"] += text
            self.event("response.reasoning_summary_text.delta",
                       output_index=len(self.items) - 1, item_id=item["id"],
                       summary_index=0, delta=text)

    def feed(self, delta: p.Delta) -> None:
        if delta.reasoning_content:
            self._text("reasoning", delta.reasoning_content)
        if delta.content:
            self._text("message", delta.content)
        for tc in delta.tool_calls or []:
            if tc.id is not None:  # a call opens: name known, arguments follow
                item = self._start({"type": "function_call", "id": _new_id("fc"),
                                    "call_id": tc.id, "name": tc.function["name"],
                                    "arguments": "", "status": "in_progress"})
                self.calls[tc.index] = item
            item = self.calls.get(tc.index)
            args = (tc.function or {}).get("arguments", "")
            if item is not None and args:
                item["arguments"] += args
                self.event("response.function_call_arguments.delta",
                           output_index=self.items.index(item), item_id=item["id"],
                           delta=args)

    def finish(self, reason: str | None) -> dict:
        """Close the open item; the final response object (its ``response.completed`` /
        ``response.incomplete`` event queued)."""
        cut = reason == "length"
        self._close("incomplete" if cut else "completed")
        s = self.stats
        usage = p.ResponsesUsage(
            input_tokens=s.prompt_tokens,
            input_tokens_details={"cached_tokens": s.cached_tokens,
                                  "image_tokens": s.image_tokens,
                                  "video_tokens": s.video_tokens},
            output_tokens=s.completion_tokens, output_tokens_details={"reasoning_tokens": 0},
            total_tokens=s.prompt_tokens + s.completion_tokens)
        final = self.snapshot("incomplete" if cut else "completed", usage=usage,
                              incomplete_details={"reason": "max_output_tokens"} if cut
                              else None)
        self.event("response.incomplete" if cut else "response.completed", response=final)
        return final


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    async def start(self, chat_req: p.ChatCompletionRequest, where: dict[str, str], rid: str,
                    stats: RequestStats, key: str = "", salt: str = ""):
        """``ChatService.start`` on the chat request ``to_chat`` made; its errors' params
        in the Responses request's terms."""
        try:
            return await self.chat.start(chat_req, rid, stats, key=key, salt=salt)
        except APIError as e:
            e.param = _param(e.param, where)
            raise

    @staticmethod
    async def _run(outputs: AsyncIterator[Output], stats: RequestStats,
                   b: _Builder) -> AsyncIterator[dict | None]:
        """Feeds the builder from the outputs; yields after each output (None) and, at
        the end, the final response object."""
        parser = b.parser
        counts = [0]
        async for o in outputs:
            counts[0] = o.completion_tokens
            stats.tally(o, counts)
            events = parser.feed(o.text) if o.text else []
            if o.finish_reason:
                events += parser.finish()
            for d in deltas(events):
                b.feed(d)
            if o.finish_reason:
                yield b.finish(o.finish_reason)
                return
            yield None

    async def collect(self, req: p.ResponsesRequest, rid: str, chat_req, outputs,
                      stats: RequestStats) -> str:
        b = _Builder(req, rid, stats, self.chat.output_parser(chat_req), streaming=False)
        final = None
        async for x in self._run(outputs, stats, b):
            final = x if x is not None else final
        return json.dumps(final)

    async def stream(self, req: p.ResponsesRequest, rid: str, chat_req, outputs,
                     stats: RequestStats) -> AsyncIterator[str]:
        b = _Builder(req, rid, stats, self.chat.output_parser(chat_req), streaming=True)
        b.event("response.created", response=b.snapshot("in_progress"))
        b.event("response.in_progress", response=b.snapshot("in_progress"))
        for e in b.take():
            yield e
        try:
            async for _ in self._run(outputs, stats, b):
                for e in b.take():
                    yield e
        except APIError as e:  # mid-stream: an error event, then response.failed
            b.event("error", code=e.code, message=e.message, param=e.param)
            b.event("response.failed", response=b.snapshot(
                "failed", error={"code": e.code or "server_error", "message": e.message}))
            for x in b.take():
                yield x
