"""OpenAI wire types for /v1/chat/completions and /v1/models, and vLLM's for /tokenize and
/detokenize: the one place they live.

Requests are validated here (types, ranges); semantic checks that need settings (limits,
model names) live in ``serving``.  Unknown request fields are kept in ``model_extra``
and logged by the serving layer, never rejected.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_serializer,
                      field_validator, model_serializer, model_validator)


class _Open(BaseModel):
    """Wire objects that tolerate fields we do not know (OpenAI adds them often)."""
    model_config = ConfigDict(extra="allow")


# --- request ---------------------------------------------------------------------------

class ImageURL(_Open):
    url: str = Field(max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] | None = "auto"   # null means auto
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Open):
    """A video: one URL (``data:``, ``http(s)``, ``file://``) of a clip, or a list of image
    URLs, its frames in order (vLLM's frame list).  ``fps``: frames sampled per second of
    a clip, or the rate a frame list was taken at; ``max_frames`` lowers the server's cap
    on sampled frames; ``min_pixels``/``max_pixels`` the pixel budget of the whole video
    (all its sampled frames together, as Qwen's video processor counts it)."""
    url: str | list[Annotated[str, Field(max_length=64 * 1024 * 1024)]] = Field(
        max_length=64 * 1024 * 1024)
    fps: float | None = Field(None, ge=0.1, le=60)
    max_frames: int | None = Field(None, ge=2)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class VideoPart(_Open):
    type: Literal["video_url"]
    video_url: VideoURL


class OtherVideoPart(_Open):
    """Other spellings of a video, accepted on the wire to answer them with a clear 400."""
    type: Literal["video", "input_video"]


ContentPart = Annotated[TextPart | ImagePart | VideoPart | OtherVideoPart,
                        Field(discriminator="type")]


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required")
        return self


class StreamOptions(_Open):
    include_usage: bool = False


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, str]


class JsonSchemaSpec(_Open):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


@dataclass(frozen=True)
class TextSize:
    """How much text a request hands to the chat template, counted before anything renders
    it: ``chars`` (the text limits) and ``token_bound``, an upper bound of the tokens the
    rendered prompt can hold apart from images (the key limits' estimate).  A byte-level
    BPE token covers at least one UTF-8 byte, so bytes bound tokens for any mix of
    characters; JSON quoting and the template's own tokens are added generously."""
    chars: int
    tool_chars: int
    token_bound: int


TEMPLATE_TOKENS_PER_MESSAGE = 8      # <|im_start|>role\n ... <|im_end|>\n: 5 in Qwen's
TEMPLATE_TOKENS_PER_TOOL_CALL = 24   # <tool_call>\n{"name": "", "arguments": }\n</tool_call>
TEMPLATE_TOKENS_FOR_TOOLS = 256      # the tools preamble (~100 tokens in Qwen's template)
# transformers' tojson (ensure_ascii=False): '"' and '\\' take 2 bytes, control characters 6
_CONTROL = re.compile(r"[\x00-\x1f]")


def _rendered_arguments(arguments: str) -> str:
    """Tool-call arguments at their longest as the template may write them: the text sent,
    or (serving parses JSON arguments) their re-dump (``tojson``: ", " and ": " separators,
    floats in full, 1e15 as 1000000000000000.0), which can be several times longer.  Text
    too deeply nested to parse stays text, as serving keeps it."""
    try:
        parsed = json.loads(arguments)
        if not isinstance(parsed, (dict, list)):
            return arguments
        dumped = json.dumps(parsed, ensure_ascii=False)
    except (ValueError, RecursionError):
        return arguments
    return dumped if len(dumped) > len(arguments) else arguments


def _walk_text(obj, acc: list[int]) -> None:
    """acc[0] += characters of every string (keys too), acc[1] += an upper bound of the
    UTF-8 bytes of ``obj`` as JSON (quotes, escapes, separators, numbers)."""
    if isinstance(obj, str):
        acc[0] += len(obj)
        acc[1] += len(obj.encode("utf-8", "surrogatepass")) + 2 + obj.count('"') + \
            obj.count("\\") + 5 * len(_CONTROL.findall(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk_text(str(k), acc)
            _walk_text(v, acc)
            acc[1] += 3
        acc[1] += 2
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_text(v, acc)
            acc[1] += 2
        acc[1] += 2
    else:
        acc[1] += 32  # a number, true/false/null


class SamplingRequest(_Open):
    """The fields chat and legacy completions share, with the same meaning (the serving
    layer's ``sampling_params`` reads them for both)."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # benchmark knob (vLLM spells it the same): keep generating past end-of-sequence
    ignore_eos: bool = False
    # vLLM's field: requests hit only cache entries made with the same salt (on top of the
    # key's own isolation), for clients that want finer isolation than per key
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):  # a field validator, so that the 400 names param "stop"
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def image_count(self) -> int:
        return 0

    @property
    def video_count(self) -> int:
        return 0


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # ours (server.api.grounding): each message gets a ``grounding`` field with the boxes and
    # points of its content mapped to the original photo's pixels
    grounding: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def image_count(self) -> int:
        return sum(1 for m in self.messages if isinstance(m.content, list)
                   for part in m.content if isinstance(part, ImagePart))

    @property
    def video_count(self) -> int:
        return sum(1 for m in self.messages if isinstance(m.content, list)
                   for part in m.content if isinstance(part, VideoPart))

    @cached_property
    def text_size(self) -> TextSize:
        """Every text the template will render (contents, tool calls with their arguments,
        tool ids, names, the tools with their descriptions and schemas), counted once."""
        msg, tools = [0, 0], [0, 0]
        calls = 0
        for m in self.messages:
            if isinstance(m.content, str):
                _walk_text(m.content, msg)
            for part in m.content if isinstance(m.content, list) else []:
                text = getattr(part, "text", None)
                if isinstance(text, str):
                    _walk_text(text, msg)
            for extra in (m.name, m.tool_call_id):
                if extra:
                    _walk_text(extra, msg)
            for tc in m.tool_calls or []:
                calls += 1
                for s in (tc.id, tc.function.name):
                    _walk_text(s, msg)
                _walk_text(_rendered_arguments(tc.function.arguments), msg)
        for t in self.tools or []:
            _walk_text(t.model_dump(exclude_none=True), tools)
        bound = msg[1] + tools[1] + TEMPLATE_TOKENS_PER_MESSAGE * (len(self.messages) + 1) \
            + TEMPLATE_TOKENS_PER_TOOL_CALL * calls + (TEMPLATE_TOKENS_FOR_TOOLS if self.tools else 0)
        return TextSize(msg[0] + tools[0], tools[0], bound)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one plain prompt (text or token ids), no chat template."""
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)    # left out: 16, OpenAI's default here
    logprobs: int | None = Field(None, ge=0, le=20)  # the legacy form: top-k per token
    echo: bool = False
    suffix: str | None = None                     # refused (Qwen has no fill-in-the-middle)
    best_of: int | None = Field(None, ge=1)       # accepted only as n

    @property
    def single_prompt(self) -> str | list[int] | None:
        """The one prompt (a list of one is unwrapped); None for several or none."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return p
        return p[0] if len(p) == 1 else None

    @cached_property
    def text_size(self) -> TextSize:
        p = self.single_prompt
        if isinstance(p, str):
            acc = [0, 0]
            _walk_text(p, acc)
            return TextSize(acc[0], 0, acc[1])
        return TextSize(0, 0, len(p or ()))


# --- response --------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


class PromptTokensDetails(_Open):
    # prompt tokens whose KV came from the prefix cache (OpenAI's field; 0 when none did)
    cached_tokens: int = 0
    # prompt tokens that stand for the request's images (ours: what the photos cost)
    image_tokens: int = 0
    # prompt tokens that stand for its videos' frames (ours; timestamps and markers not)
    video_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # always present, as OpenAI sends it (vLLM leaves it out when prefix caching is off)
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class GroundingImage(BaseModel):
    index: int                   # among the request's images, in order of appearance
    width: int                   # the photo as sent, after EXIF orientation
    height: int
    model_width: int             # the size the model saw it at (its 0-1000 frame)
    model_height: int
    image_tokens: int


class GroundingBox(BaseModel):
    image: int | None            # GroundingImage.index; null when the request had none
    label: str | None = None
    bbox_2d: list[int | float]   # x1, y1, x2, y2 as the model wrote them (0-1000)
    bbox_px: list[int] | None    # the same in the original photo's pixels


class GroundingPoint(BaseModel):
    image: int | None
    label: str | None = None
    point_2d: list[int | float]
    point_px: list[int] | None


class Grounding(BaseModel):
    """``message.grounding`` / the final chunk's ``delta.grounding`` (``server.api.grounding``)."""
    images: list[GroundingImage]
    boxes: list[GroundingBox]
    points: list[GroundingPoint]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    grounding: Grounding | None = None   # only with "grounding": true (left out otherwise)

    @model_serializer(mode="wrap")
    def _without_unasked_grounding(self, handler):
        out = handler(self)
        if out.get("grounding", ...) is None:
            del out["grounding"]
        return out


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    grounding: Grounding | None = None   # on a choice's final chunk, when asked for

    @field_serializer("grounding")
    def _grounding_with_nulls(self, g: Grounding | None):
        # a chunk is written with exclude_none; the grounding keeps its nulls (a label or
        # pixels that are null), as in the non-streamed message
        return None if g is None else g.model_dump()


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- the Responses API (POST /v1/responses) ------------------------------------------------
# The request's items as the SDK sends them; ``server.api.responses`` turns them into a chat
# request (the semantics are chat's) and the chat outputs into ``output`` items and events.

class InputText(_Open):
    type: Literal["input_text"]
    text: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = Field(None, max_length=64 * 1024 * 1024)
    file_id: str | None = None           # refused: this server keeps no files
    detail: Literal["auto", "low", "high"] | None = "auto"


class OutputTextPart(_Open):
    """An earlier assistant turn's text, sent back as history."""
    type: Literal["output_text", "refusal", "summary_text", "reasoning_text"]
    text: str | None = None
    refusal: str | None = None


InputContentPart = Annotated[InputText | InputImage | OutputTextPart, Field(discriminator="type")]


class InputMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputContentPart]


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = "{}"


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str


class ReasoningInputItem(_Open):
    """An earlier turn's reasoning, sent back as history: dropped (the template keeps
    no reasoning of earlier turns either)."""
    type: Literal["reasoning"]


def _item_kind(v) -> str:
    if isinstance(v, dict):
        return v.get("type", "message")  # {"role", "content"} alone is a message
    return getattr(v, "type", "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningInputItem, Tag("reasoning")],
    Discriminator(_item_kind, custom_error_type="invalid_item", custom_error_message=(
        "an input item is a message, function_call, function_call_output or reasoning"))]


class FunctionTool(FunctionDef):
    """The Responses API's flat form of chat's ``Tool``; hosted tools (web_search, ...)
    are refused by their type before their other fields are looked at."""
    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, v):
        if isinstance(v, dict) and v.get("type") != "function":
            kind = v.get("type")
            raise ValueError("only function tools are supported, not "
                             + (json.dumps(kind[:32]) if isinstance(kind, str) else "this"))
        return v


class FunctionToolChoice(_Open):
    type: Literal["function"]
    name: str


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Open):
    format: TextFormat | None = None


class ResponsesRequest(_Open):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    # OpenAI's default is true; nothing is ever stored here (the response says false)
    store: bool = True
    previous_response_id: str | None = None   # refused: stateless
    background: bool = False                  # refused: answers come on this connection
    reasoning: dict[str, Any] | None = None   # accepted; effort is the model's own
    metadata: dict[str, str] | None = None
    user: str | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """``POST /v1/responses``' answer, and the object in its ``response.*`` events."""
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] | None = None
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponsesUsage | None = None


# --- /tokenize and /detokenize (vLLM's shapes) -------------------------------------------

class TokenizeChatRequest(ChatCompletionRequest):
    """A chat request to count: any chat-completion body (``model`` optional, as in vLLM).
    It is checked as a chat request is, and counted as ``generate`` would build it."""
    model: str | None = None


class TokenizeCompletionRequest(_Open):
    """vLLM's other form: a plain prompt, tokenised as it is (no chat template)."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True      # accepted; Qwen's tokenizer adds none either way


class TokenizeResponse(BaseModel):
    count: int                           # prompt tokens, images' tokens included
    max_model_len: int                   # the context window
    tokens: list[int]
    image_tokens: int = 0                # ours: of ``count``, standing for the images
    video_tokens: int = 0                # ours: of ``count``, standing for the videos' frames
    max_tokens_room: int                 # ours: the most max_tokens this prompt leaves room for


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# --- legacy completions -------------------------------------------------------------------

def legacy_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """The answer, and each streamed chunk (``usage`` on the last one only)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "local"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- the logprobs hot path ---------------------------------------------------------------
# A logprobs response is mostly its logprob objects (1 + top_logprobs per token): building
# them as the models above and serialising those costs ~15 us per token, as much as the
# rest of the server's work for that token.  ``LogprobJSON`` (``server/logprob_json.py``,
# shared with the engine's output stage) writes the same JSON directly, byte for byte what
# pydantic writes for ``TokenLogprob`` (field order, pydantic's float format, NaN/inf as
# null): per token id the ``{"token":..,"logprob":`` and ``,"bytes":[..]``
# fragments are written once, and all the floats of a call in one ``to_json``.  The
# responses keep being built as the models above, with ``content=[]`` standing in for the
# logprobs, and the written array takes its place (``completion_json`` / ``chunk_json``).
# tests/test_logprobs_json.py compares the output with the models'.

from server.logprob_json import LogprobJSON, _jstr  # noqa: E402,F401  (re-exported)

assert list(TopLogprob.model_fields) == ["token", "logprob", "bytes"]
assert list(TokenLogprob.model_fields) == ["token", "logprob", "bytes", "top_logprobs"]

_LP_MARK = '"logprobs":{"content":[]}'   # unescaped quotes: never inside a JSON string



def completion_json(c: ChatCompletion, logprobs: list[str]) -> str:
    """``c`` as JSON (what FastAPI writes for a ``ChatCompletion``), the choices whose
    ``logprobs`` is ``ChoiceLogprobs(content=[])`` filled, in order, from ``logprobs``
    (arrays written by ``LogprobJSON``)."""
    body = c.model_dump_json(by_alias=True)
    if not logprobs:
        return body
    parts = body.split(_LP_MARK)
    if len(parts) != len(logprobs) + 1:
        raise ValueError("logprobs placeholders do not match the choices")
    out = [parts[0]]
    for lp, rest in zip(logprobs, parts[1:]):
        out += ['"logprobs":{"content":', lp, "}", rest]
    return "".join(out)


def chunk_json(c: ChatCompletionChunk, logprobs: str | None = None) -> str:
    """One SSE chunk's JSON (``exclude_none``); ``logprobs`` fills its one choice's
    ``ChoiceLogprobs(content=[])``."""
    body = c.model_dump_json(exclude_none=True)
    if logprobs is None:
        return body
    head, sep, rest = body.partition(_LP_MARK)
    if not sep:
        raise ValueError("no logprobs placeholder in the chunk")
    return f'{head}"logprobs":{{"content":{logprobs}}}{rest}'


class ChunkWriter:
    """The stream's most common chunk, one choice's content delta (with its logprobs),
    written from a cached envelope: the same JSON as ``chunk_json`` of
    ``ChatCompletionChunk(choices=[ChunkChoice(index, Delta(content=text), logprobs)])``."""

    def __init__(self, id: str, created: int, model: str):
        empty = chunk_json(ChatCompletionChunk(id=id, created=created, model=model, choices=[]))
        if not empty.endswith('"choices":[]}'):
            raise ValueError("unexpected chunk layout")
        self._head = empty[:-2]

    def content(self, index: int, text: str, logprobs: str | None = None) -> str:
        lp = "" if logprobs is None else f',"logprobs":{{"content":{logprobs}}}'
        return f'{self._head}{{"index":{index},"delta":{{"content":{_jstr(text)}}}{lp}}}]}}'
