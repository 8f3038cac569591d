"""Chat-completion semantics between the routes and the engine.

``ChatService.complete(request)`` checks the request against the server's limits, takes
a queue place (429 before any image is fetched), fetches and decodes the images, hands
an ``EngineRequest`` to the engine and turns its ``Output`` events into either one
``ChatCompletion`` or a stream of SSE lines.  It never touches tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from server import protocol as p
from server.engine.interface import Engine, EngineRequest, ImageInput, Output, SamplingParams
from server.errors import APIError, InvalidRequest, ModelNotFound
from server.media import MediaFetcher
from server.metrics import Metrics
from server.settings import HUB_ID, Settings

log = logging.getLogger("qwen_vl.serving")

TOKENS_PX = 32 * 32                 # one language token per 32x32 pixels
MAX_TOKENS_PER_IMAGE = 16384        # the model's own processor ceiling


@dataclass
class RequestStats:
    """Filled while a request runs; the access log line and metrics read it."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    ttft: float | None = None
    t0: float = field(default_factory=time.perf_counter)


class ChatService:
    def __init__(self, engine: Engine, settings: Settings, fetcher: MediaFetcher,
                 metrics: Metrics):
        self.engine, self.settings, self.fetcher, self.metrics = engine, settings, fetcher, metrics
        self.served_name = settings.served_model_name
        self.accepted_names = {settings.served_model_name, HUB_ID, engine.model_id,
                               settings.model_path, *settings.model_aliases}

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.served_name, created=int(time.time()))])

    # --- request → engine ------------------------------------------------------------
    def _check(self, req: p.ChatCompletionRequest):
        s = self.settings
        if req.model not in self.accepted_names:
            raise ModelNotFound(f"The model '{req.model}' does not exist; this server serves "
                                f"'{self.served_name}'.", param="model")
        extra = sorted((req.model_extra or {}).keys())
        if extra:
            log.info("ignoring unknown request fields: %s", ", ".join(extra))
        if req.n > s.max_n:
            raise InvalidRequest(f"n must be at most {s.max_n}.", param="n")
        mt = req.requested_max_tokens
        if mt is not None and mt > s.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be at most {s.max_tokens_limit}.",
                                 param="max_completion_tokens" if req.max_completion_tokens
                                 else "max_tokens")
        if len(req.messages) > s.max_messages:
            raise InvalidRequest(f"At most {s.max_messages} messages are allowed.", param="messages")
        chars = images = 0
        for i, m in enumerate(req.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if isinstance(part, p.VideoPart):
                    raise InvalidRequest("Video input is not supported by this server.",
                                         param=f"messages[{i}].content[{j}]")
                if isinstance(part, p.ImagePart):
                    images += 1
                    if m.role != "user":
                        raise InvalidRequest("Images are only accepted in user messages.",
                                             param=f"messages[{i}].content[{j}]")
                else:
                    chars += len(part.text)
            if isinstance(m.content, str):
                chars += len(m.content)
        if chars > s.max_text_chars:
            raise InvalidRequest(f"The messages hold more than {s.max_text_chars} characters.",
                                 param="messages")
        if images > s.max_images_per_request:
            raise InvalidRequest(f"At most {s.max_images_per_request} images per request.",
                                 param="messages")
        if req.response_format is not None and req.response_format.type != "text":
            raise InvalidRequest("response_format json modes are not supported yet.",
                                 param="response_format")
        if req.tools and req.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice 'required' and named functions are not supported yet.",
                                 param="tool_choice")

    def _budget(self, url: p.ImageURL, param: str) -> tuple[int, int]:
        s = self.settings
        lo, hi = s.min_pixels, s.max_pixels
        if url.detail == "low":
            hi = min(hi, 256 * TOKENS_PX)
        elif url.detail == "high":
            hi = max(hi, min(4 * hi, MAX_TOKENS_PER_IMAGE * TOKENS_PX))
        lo = min(lo, hi)
        if url.max_pixels is not None:
            hi = max(min(url.max_pixels, MAX_TOKENS_PER_IMAGE * TOKENS_PX), TOKENS_PX)
            lo = min(lo, hi)
        if url.min_pixels is not None:
            lo = max(url.min_pixels, TOKENS_PX)
            if lo > hi:
                raise InvalidRequest("min_pixels may not exceed max_pixels.", param=param)
        return lo, hi

    async def _convert(self, req: p.ChatCompletionRequest) -> tuple[list[dict], list[ImageInput]]:
        messages: list[dict] = []
        jobs = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            msg: dict = {"role": role}
            if isinstance(m.content, list):
                parts = []
                for j, part in enumerate(m.content):
                    if isinstance(part, p.TextPart):
                        parts.append({"type": "text", "text": part.text})
                    else:
                        param = f"messages[{i}].content[{j}].image_url"
                        lo, hi = self._budget(part.image_url, param)
                        jobs.append((self.fetcher.load_image(part.image_url.url,
                                                             param=param + ".url"), lo, hi))
                        parts.append({"type": "image"})
                msg["content"] = parts
            else:
                msg["content"] = m.content or ""
            if m.tool_calls:
                msg["tool_calls"] = [{"type": "function", "id": tc.id, "function": {
                    "name": tc.function.name, "arguments": _json_or_text(tc.function.arguments)}}
                    for tc in m.tool_calls]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        try:
            decoded = await asyncio.gather(*(job for job, _, _ in jobs))
        except BaseException:
            for job, _, _ in jobs:  # don't leave half-fetched images running
                if hasattr(job, "close"):
                    job.close()
            raise
        images = [ImageInput(img, lo, hi) for img, (_, lo, hi) in zip(decoded, jobs)]
        return messages, images

    def _params(self, req: p.ChatCompletionRequest) -> SamplingParams:
        s = self.settings
        temperature = s.temperature if req.temperature is None else req.temperature
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise InvalidRequest("logit_bias keys must be token ids.", param="logit_bias")
            bias[int(k)] = max(-100.0, min(100.0, v))
        return SamplingParams(
            max_tokens=req.requested_max_tokens, temperature=temperature,
            top_p=s.top_p if req.top_p is None else req.top_p,
            top_k=s.top_k if req.top_k is None else max(req.top_k, 0),
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            stop=list(req.stop or []), seed=req.seed, n=req.n, ignore_eos=req.ignore_eos,
            logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0, logit_bias=bias)

    async def start(self, req: p.ChatCompletionRequest, request_id: str,
                    stats: RequestStats) -> AsyncIterator[Output]:
        """Validate, reserve, fetch; returns the engine's output stream, already started
        so that errors before the first token still become a plain JSON error."""
        self._check(req)
        params = self._params(req)
        reservation = self.engine.reserve()
        try:
            messages, images = await self._convert(req)
        except BaseException:
            reservation.release()
            raise
        stats.images = len(images)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if (
            req.tools and req.tool_choice != "none") else None
        stream = self.engine.generate(
            EngineRequest(request_id, messages, images, params, tools), reservation)
        first = await anext(stream)  # raises context/engine errors before any byte is sent
        stats.ttft = time.perf_counter() - stats.t0
        return _prepend(first, stream)

    # --- engine → response -----------------------------------------------------------
    async def collect(self, req, request_id, outputs: AsyncIterator[Output],
                      stats: RequestStats) -> p.ChatCompletion:
        texts = [""] * req.n
        finish: list[str | None] = [None] * req.n
        logprobs: list[list] = [[] for _ in range(req.n)]
        counts = [0] * req.n
        async for o in outputs:
            texts[o.index] += o.text
            counts[o.index] = o.completion_tokens
            stats.prompt_tokens = o.prompt_tokens
            if o.logprobs:
                logprobs[o.index] += [_wire_logprob(lp) for lp in o.logprobs]
            if o.finish_reason:
                finish[o.index] = o.finish_reason
        stats.completion_tokens = sum(counts)
        choices = [p.Choice(index=i, message=p.ResponseMessage(content=texts[i]),
                            finish_reason=finish[i],
                            logprobs=p.ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None)
                   for i in range(req.n)]
        return p.ChatCompletion(id=request_id, model=req.model, choices=choices,
                                usage=_usage(stats))

    async def stream(self, req, request_id, outputs: AsyncIterator[Output],
                     stats: RequestStats) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            c = p.ChatCompletionChunk(id=request_id, created=created, model=req.model,
                                      choices=choices, usage=usage)
            return "data: " + c.model_dump_json(exclude_none=True) + "\n\n"

        counts = [0] * req.n
        for i in range(req.n):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        try:
            async for o in outputs:
                counts[o.index] = o.completion_tokens
                stats.prompt_tokens = o.prompt_tokens
                if o.text or o.logprobs:
                    lp = p.ChoiceLogprobs(content=[_wire_logprob(x) for x in o.logprobs]) \
                        if o.logprobs else None
                    yield chunk([p.ChunkChoice(index=o.index, delta=p.Delta(content=o.text),
                                               logprobs=lp)])
                if o.finish_reason:
                    yield chunk([p.ChunkChoice(index=o.index, delta=p.Delta(),
                                               finish_reason=o.finish_reason)])
        except APIError as e:  # mid-stream failure: OpenAI's error event, then end
            yield "data: " + json.dumps(e.envelope()) + "\n\n"
            yield "data: [DONE]\n\n"
            raise
        stats.completion_tokens = sum(counts)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage=_usage(stats))
        yield "data: [DONE]\n\n"


async def _prepend(first, rest):
    yield first
    async for x in rest:
        yield x


def _usage(stats: RequestStats) -> p.Usage:
    return p.Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                   total_tokens=stats.prompt_tokens + stats.completion_tokens)


def _wire_logprob(lp) -> p.TokenLogprob:
    return p.TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                          top_logprobs=[p.TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                                        for t, v in lp.top])


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s
