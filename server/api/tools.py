"""Turning generated text back into OpenAI's message parts (torch-free).

Qwen writes tool calls as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several separated by newlines) and thinking models wrap their reasoning in
``<think>...</think>``.  ``OutputParser`` splits a choice's text, fed as it arrives, into
events — ``("content", text)``, ``("reasoning", text)``, ``("tool_start", index, id, name)``,
``("tool_args", index, text)`` — in the order OpenAI streams them: a call's first fragment
carries its id and name with empty arguments, later fragments extend the arguments.  The
non-streaming path (``parse``) runs the very same parser over the whole text, so the two
agree by construction.

Text that might be the start of a marker (``<tool_c``...) is held back until it is known
not to be one.  Without tools and reasoning the parser passes text through unchanged.

* Reasoning is split only when the template opened a ``<think>`` block (``opened``) or
  the output starts with ``<think>``; the text up to ``</think>`` is reasoning.
* A ``<tool_call>`` block becomes a tool call as soon as its ``{"name": "...",
  "arguments": `` prefix is complete; the arguments are streamed as the model writes them
  (raw JSON text, without the enclosing object's closing brace).  A block that is not
  valid JSON with a name is handed back as plain content when it ends.
* ``arguments`` is the exact JSON text the model wrote, so streamed fragments and the
  non-streamed string are identical.
* A block that begins as a JSON object ends at the first ``</tool_call>`` outside a JSON
  string: marker text inside an argument string is argument text, never the end.
* Only a call whose block closed and whose arguments ``json.loads`` accepts is complete
  (``complete_calls``, ``has_tool_calls``).  A call cut off (``max_tokens``) or with
  broken arguments stays in ``calls`` (its fragments were streamed already), and its raw
  block is kept in ``incomplete_text``: the non-streamed message returns that text as
  ``content``, as vLLM does, and lists only complete calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _args_visible(rest: str) -> str:
    """The part of a call's argument text that is surely arguments: without trailing
    whitespace and the enclosing object's closing brace (which may be what ends it)."""
    r = rest.rstrip()
    if r.endswith("}"):
        r = r[:-1].rstrip()
    return r


class _JsonCloseScanner:
    """Finds ``</tool_call>`` outside JSON strings, incrementally over a growing block."""

    def __init__(self):
        self.pos, self.in_str, self.escaped, self.json = 0, False, False, None

    def find(self, body: str) -> int:
        if self.json is None:  # decided by the block's first non-space character
            head = body.lstrip()
            if not head:
                return -1
            self.json = head.startswith("{")
        if not self.json:
            return body.find(TOOL_CLOSE)
        i = self.pos
        while i < len(body):
            ch = body[i]
            if self.in_str:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch == "<" and body.startswith(TOOL_CLOSE[:len(body) - i], i):
                if len(body) - i < len(TOOL_CLOSE):
                    break  # maybe the marker, not complete yet: look again when it grows
                self.pos = i
                return i
            i += 1
        self.pos = i
        return -1


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass
class ToolCallOut:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False    # its block closed and the arguments parse
    raw: str = ""             # the block's text, while it is not complete
    lead: str = ""            # whitespace before the block (content, if it is not a call)


@dataclass
class Parsed:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCallOut] = field(default_factory=list)


class OutputParser:
    def __init__(self, *, tools: bool = False, opened_think: bool = False, parallel: bool = True):
        self.tools, self.parallel = tools, parallel
        # states: "start" (might begin with <think>), "think", "content", "call"
        self.state = "think" if opened_think else "start"
        self.buf = ""                 # unconsumed text of the current state
        self.calls: list[ToolCallOut] = []
        self._call: ToolCallOut | None = None   # the open call, once its name is known
        self._args_at = 0             # where its arguments start in buf
        self._sent = 0                # argument characters already sent
        self._strip_lead = False      # drop whitespace before content (after </think>, calls)
        self._held_ws = ""            # content's trailing whitespace, held while tools are on
        self._reasoning_seen = opened_think
        self._scanner = _JsonCloseScanner()

    # --- public -----------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        while self._step(out, final=True):
            pass
        if self.state == "call":
            if self._call is not None:  # cut off mid-call (length): send what there is
                self._send_args(out, _args_visible(self.buf[self._args_at:]))
                self._call.raw = self._call.lead + TOOL_OPEN + self.buf
            elif not (self.calls and not self.parallel):
                self._content(out, TOOL_OPEN + self.buf)
            self.buf = ""
        if self._held_ws and not self.calls:
            out.append(("content", self._held_ws))
        self._held_ws = ""
        return out

    @property
    def complete_calls(self) -> list[ToolCallOut]:
        return [c for c in self.calls if c.complete]

    @property
    def incomplete_text(self) -> str:
        """The raw blocks of calls that did not complete (cut off, or broken arguments)."""
        return "".join(c.raw for c in self.calls if not c.complete)

    @property
    def has_tool_calls(self) -> bool:
        """Calls were made and every one is complete (then finish_reason "tool_calls")."""
        return bool(self.calls) and all(c.complete for c in self.calls)

    @property
    def saw_reasoning(self) -> bool:
        """A <think> block was open (then the message has ``reasoning_content``)."""
        return self._reasoning_seen

    # --- states -----------------------------------------------------------------------
    def _step(self, out: list, final: bool) -> bool:
        """Consume what can be decided from ``buf``; True if the state changed."""
        if self.state == "start":
            if self.buf.startswith(THINK_OPEN):
                self.buf = self.buf[len(THINK_OPEN):]
                self.state, self._reasoning_seen = "think", True
                return True
            if THINK_OPEN.startswith(self.buf) and not final:
                return False  # still might be "<think>"
            self.state = "content"
            return True
        if self.state == "think":
            at = self.buf.find(THINK_CLOSE)
            if at != -1:
                if at:
                    out.append(("reasoning", self.buf[:at]))
                self.buf = self.buf[at + len(THINK_CLOSE):]
                self.state, self._strip_lead = "content", True
                return True
            keep = 0 if final else _partial_suffix(self.buf, THINK_CLOSE)
            if len(self.buf) > keep:
                out.append(("reasoning", self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
            return False
        if self.state == "content":
            if self._strip_lead:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return False
                self._strip_lead = False
            if not self.tools:
                if self.buf:
                    out.append(("content", self.buf))
                    self.buf = ""
                return False
            at = self.buf.find(TOOL_OPEN)
            if at != -1:  # whitespace before it stays held: dropped if this is a call
                self._content(out, self.buf[:at])
                self.buf = self.buf[at + len(TOOL_OPEN):]
                self.state, self._call, self._sent = "call", None, 0
                self._scanner = _JsonCloseScanner()
                return True
            keep = 0 if final else _partial_suffix(self.buf, TOOL_OPEN)
            self._content(out, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        if self.state == "call":
            return self._step_call(out, final)
        return False

    def _content(self, out: list, text: str):
        """Emit content, holding back trailing whitespace while a tool call may follow."""
        body = text.rstrip()
        if body:
            out.append(("content", self._held_ws + body))
            self._held_ws = text[len(body):]
        else:
            self._held_ws += text

    def _step_call(self, out: list, final: bool) -> bool:
        end = self._scanner.find(self.buf)
        body = self.buf if end == -1 else self.buf[:end]
        if end == -1 and not final:
            body = body[:len(body) - _partial_suffix(body, TOOL_CLOSE)]
        skip = bool(self.calls) and not self.parallel
        if self._call is None and not skip:
            m = _CALL_HEAD.match(body)
            if m and m.end() < len(body):  # the arguments have begun (not just whitespace)
                try:
                    name = json.loads('"' + m.group(1) + '"')
                except ValueError:
                    name = None
                if name is not None:
                    self._call = ToolCallOut(new_call_id(), name, lead=self._held_ws)
                    self._held_ws = ""  # whitespace before a call is not content
                    self._args_at, self._sent = m.end(), 0
                    self.calls.append(self._call)
                    out.append(("tool_start", len(self.calls) - 1, self._call.id, name))
        if self._call is not None:
            self._send_args(out, _args_visible(body[self._args_at:]))
        if end == -1:
            return False
        # the block is complete
        if self._call is not None:
            self._call.complete = _valid_json(self._call.arguments)
            if not self._call.complete:
                self._call.raw = self._call.lead + TOOL_OPEN + body + TOOL_CLOSE
        if self._call is None and not skip:
            call = self._whole_call(body)
            if call is None:  # not a tool call after all: it was text
                self._content(out, TOOL_OPEN + body + TOOL_CLOSE)
                self.buf = self.buf[end + len(TOOL_CLOSE):]
                self.state = "content"
                return True
            self._held_ws = ""
            self.calls.append(call)
            out.append(("tool_start", len(self.calls) - 1, call.id, call.name))
            if call.arguments:
                out.append(("tool_args", len(self.calls) - 1, call.arguments))
        self.buf = self.buf[end + len(TOOL_CLOSE):]
        self.state, self._call, self._strip_lead = "content", None, True
        return True

    def _send_args(self, out: list, visible: str):
        call = self._call
        if len(visible) > self._sent and visible.startswith(call.arguments):
            piece = visible[self._sent:]
            call.arguments += piece
            self._sent = len(visible)
            out.append(("tool_args", len(self.calls) - 1, piece))  # the open call is last

    @staticmethod
    def _whole_call(body: str) -> ToolCallOut | None:
        """A complete block whose head did not match the streaming pattern (e.g. keys in
        another order): accept it if it is a JSON object with a string name."""
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCallOut(new_call_id(), obj["name"], args, complete=_valid_json(args),
                           raw=TOOL_OPEN + body + TOOL_CLOSE)


def parse(text: str, *, tools: bool = False, opened_think: bool = False,
          parallel: bool = True) -> Parsed:
    """The whole text of a choice → content, reasoning, tool calls."""
    p = OutputParser(tools=tools, opened_think=opened_think, parallel=parallel)
    events = p.feed(text) + p.finish()
    content = "".join(e[1] for e in events if e[0] == "content") + p.incomplete_text
    reasoning = "".join(e[1] for e in events if e[0] == "reasoning")
    calls = p.complete_calls
    return Parsed(content=content if (content or not calls) else None,
                  reasoning=reasoning if p.saw_reasoning else None,
                  tool_calls=calls)
