"""Chat-completion semantics between the routes and the engine.

``ChatService.start(request)`` checks the request against the server's limits, takes a
queue place (429 before any image is fetched), fetches and decodes the images, hands an
``EngineRequest`` to the engine and waits for its first event (so that errors before the
first token are plain JSON errors).  ``collect`` turns the ``Output`` events into one
``ChatCompletion``; ``stream`` into SSE lines, ending with ``data: [DONE]``.  Tool calls
and reasoning are split out of the text by ``server.api.tools``.  It never touches tensors.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from server.api import grounding
from server.api import protocol as p
from server.api import tools as toolparse
from server.engine.interface import (Engine, EngineRequest, ImageInput, Output, SamplingParams,
                                     VideoInput)
from server.engine.structured import GrammarSpec, check_cost
from server.errors import APIError, InvalidRequest, ModelNotFound
from server.api.media import MediaFetcher, PixelBudget, VideoOptions, gather_all, original_size
from server.api.metrics import Metrics
from server.settings import HUB_ID, Settings
from server.textprep import THREAD_CHARS

log = logging.getLogger("qwen_vl.serving")

TOKENS_PX = 32 * 32                 # one language token per 32x32 pixels
MAX_TOKENS_PER_IMAGE = 16384        # the model's own processor ceiling


_heap_frozen = False


def freeze_startup_heap():
    """Move everything alive after the model load (torch, transformers, the model, the
    tokenizer: millions of objects) out of the cyclic garbage collector's reach, once per
    process.  Without it every full collection walks that whole heap: ~0.25 s on the 2-core
    box, and the logprobs path (several objects per token, alive until the response is
    written) set one off about once per second of serving, stalling the model thread for the
    duration.  Later objects are collected as before."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


@dataclass
class RequestStats:
    """Filled while a request runs; the access log line and metrics read it."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0          # of prompt_tokens, served from the prefix cache
    image_tokens: int = 0           # of prompt_tokens, standing for the images
    video_tokens: int = 0           # ... and for the videos' frames
    images: int = 0
    # the images as sent and as the model saw them, for "grounding": true
    grounding_images: list = field(default_factory=list)
    ttft: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    ticket: Any = None  # the key's ticket (its id goes with the request to the engine)

    def tally(self, o: Output, counts: list[int]) -> None:
        """Kept current from each output (``counts``: each choice's completion tokens so
        far): a client that hangs up is still charged what it was sent."""
        self.completion_tokens = sum(counts)
        self.prompt_tokens = o.prompt_tokens
        self.cached_tokens, self.image_tokens = o.cached_tokens, o.image_tokens
        self.video_tokens = o.video_tokens

    def prefilled(self, prompt_tokens: int) -> None:
        """The engine scheduled this prompt's prefill: charged even if the client leaves
        before its first token (called from the model thread: one attribute write)."""
        self.prompt_tokens = max(self.prompt_tokens, prompt_tokens)


class ChatService:
    def __init__(self, engine: Engine, settings: Settings, fetcher: MediaFetcher,
                 metrics: Metrics):
        self.engine, self.settings, self.fetcher, self.metrics = engine, settings, fetcher, metrics
        self.served_name = settings.served_model_name
        self.accepted_names = {settings.served_model_name, HUB_ID, engine.model_id,
                               settings.model_path, *settings.model_aliases}
        self.vocab_size = engine.vocab_size
        self.logprob_json = p.LogprobJSON()  # the logprobs' JSON, fragments cached per token
        freeze_startup_heap()  # the engine is loaded: what exists now lives as long as the server

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.served_name, created=int(time.time()))])

    def model(self, name: str) -> p.ModelCard:
        """``GET /v1/models/{name}``: any name a request may use (aliases too), by that name."""
        if name not in self.accepted_names:
            raise ModelNotFound(f"The model '{name}' does not exist; this server serves "
                                f"'{self.served_name}'.", param="model")
        return p.ModelCard(id=name, created=int(time.time()))

    # --- request → engine ------------------------------------------------------------
    def check_common(self, req: p.SamplingRequest, *, generating: bool = True):
        """The checks every generating route shares (chat, legacy completions): those of
        ``check_basic``, ``n``, ``max_tokens``."""
        s = self.settings
        self.check_basic(req)
        if req.n > s.max_n:
            raise InvalidRequest(f"n must be at most {s.max_n}.", param="n")
        mt = req.requested_max_tokens
        if mt is not None and mt > s.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be at most {s.max_tokens_limit}.",
                                 param="max_completion_tokens" if getattr(
                                     req, "max_completion_tokens", None) else "max_tokens")
        if generating and s.scheduler == "sequential":
            self._check_sequential(req)

    def check_basic(self, req) -> None:
        """Every route's first checks: valid Unicode (lone surrogates break the tokenizer)
        and sane nesting, the model's name (when given), unknown fields logged."""
        problem = _scan(req.model_dump(by_alias=True, exclude_none=True))
        if problem is not None and problem[0] == "unicode":
            # lone surrogates ("\ud800") break the tokenizer and the utf-8 response
            raise InvalidRequest("Strings must be valid Unicode (no lone surrogates).",
                                 param=problem[1] or None)
        if problem is not None:
            raise InvalidRequest(f"The request is nested more than {MAX_JSON_DEPTH} levels "
                                 "deep.", param=_short_path(problem[1]) or None)
        if req.model is not None:  # optional for /tokenize only
            self.model(req.model)  # 404 for a name this server does not serve
        extra = sorted((req.model_extra or {}).keys())
        if extra:  # client-chosen names: quoted (no forged lines), short, a few
            shown = ", ".join(json.dumps(k[:64]) for k in extra[:8])
            log.info("ignoring unknown request fields: %s%s", shown,
                     f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")

    def check_prompt_text(self, prompt: str) -> None:
        """A plain prompt's text limit (--max-text-chars), before it is tokenised."""
        limit = self.settings.max_text_chars
        if len(prompt) > limit:
            raise InvalidRequest(f"The prompt holds more than {limit} characters "
                                 "(--max-text-chars).", param="prompt")

    def _check(self, req: p.ChatCompletionRequest, *, generating: bool = True):
        s = self.settings
        self.check_common(req, generating=generating)
        if len(req.messages) > s.max_messages:
            raise InvalidRequest(f"At most {s.max_messages} messages are allowed.", param="messages")
        images = videos = 0
        for i, m in enumerate(req.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, p.OtherVideoPart):
                    raise InvalidRequest(f"Send a video as a video_url part ({{\"type\": "
                                         f"\"video_url\", \"video_url\": {{\"url\": ...}}}}), "
                                         f"not {part.type}.", param=where)
                if isinstance(part, p.VideoPart):
                    videos += 1
                    if not self.engine.supports_video or not s.max_videos_per_request:
                        raise InvalidRequest("Video input is not enabled on this server.",
                                             param=where)
                    if m.role != "user":
                        raise InvalidRequest("Videos are only accepted in user messages.",
                                             param=where)
                    self._video_options(part.video_url, where + ".video_url")
                if isinstance(part, p.ImagePart):
                    images += 1
                    if m.role != "user":
                        raise InvalidRequest("Images are only accepted in user messages.",
                                             param=where)
        if req.tools and len(req.tools) > s.max_tools:
            # before anything renders or compiles them (--max-tools)
            raise InvalidRequest(f"At most {s.max_tools} tools are allowed (--max-tools).",
                                 param="tools")
        size = req.text_size  # contents, tool calls and their arguments, tools: all the text
        if size.chars > s.max_text_chars:  # before anything renders or tokenises it
            raise InvalidRequest(
                f"The messages and tools hold more than {s.max_text_chars} characters of "
                f"text ({size.chars}, {size.tool_chars} of them in tools; --max-text-chars).",
                param="tools" if size.tool_chars * 2 > size.chars else "messages")
        if images > s.max_images_per_request:
            raise InvalidRequest(f"At most {s.max_images_per_request} images per request.",
                                 param="messages")
        if videos > s.max_videos_per_request:
            raise InvalidRequest(f"At most {s.max_videos_per_request} videos per request.",
                                 param="messages")
        self._check_structured(req)
        spec = self._grammar(req)
        if spec is not None:  # refuse a compile bomb before it is queued
            check_cost(spec, s.max_grammar_repeat)

    def _check_structured(self, req: p.ChatCompletionRequest):
        rf, tc = req.response_format, req.tool_choice
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise InvalidRequest("response_format of type json_schema needs a json_schema "
                                 "object.", param="response_format.json_schema")
        if tc not in (None, "none", "auto"):
            if not req.tools:
                raise InvalidRequest("tool_choice requires tools.", param="tool_choice")
            if isinstance(tc, p.NamedToolChoice):
                name = tc.function.get("name")
                if name not in {t.function.name for t in req.tools}:
                    raise InvalidRequest(f"tool_choice names the function {name!r}, which is "
                                         "not among the tools.", param="tool_choice")
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true.",
                                 param="top_logprobs")

    def _check_sequential(self, req: p.SamplingRequest):
        """The sequential baseline runs ``model.generate()``, which has no logprobs,
        logit_bias or OpenAI penalties, and whose ``min_new_tokens`` (ignore_eos) fights a
        grammar that must end (all-NaN probabilities): refuse rather than ignore."""
        chat = isinstance(req, p.ChatCompletionRequest)
        # chat's logprobs is a bool, legacy completions' a count (0 asks for them too)
        unsupported = {"logprobs": req.logprobs is not None and req.logprobs is not False,
                       "logit_bias": bool(req.logit_bias),
                       "presence_penalty": bool(req.presence_penalty),
                       "frequency_penalty": bool(req.frequency_penalty),
                       "ignore_eos": chat and req.ignore_eos and self._grammar(req) is not None}
        for name, used in unsupported.items():
            if used:
                what = "ignore_eos with structured output" if name == "ignore_eos" else name
                raise InvalidRequest(f"{what} is not supported by the sequential scheduler "
                                     "(--scheduler sequential); use --scheduler batching.",
                                     param=name)

    @staticmethod
    def _grammar(req: p.ChatCompletionRequest) -> GrammarSpec | None:
        """What decoding must follow: forced tool calls, else a JSON response format."""
        tc = req.tool_choice
        if req.tools and (tc == "required" or isinstance(tc, p.NamedToolChoice)):
            fns = [t.function for t in req.tools]
            if isinstance(tc, p.NamedToolChoice):  # exactly one call of that function
                fns = [f for f in fns if f.name == tc.function.get("name")][:1]
            return GrammarSpec.tool_calls([(f.name, f.parameters) for f in fns],
                                          parallel=req.parallel_tool_calls and tc == "required")
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_schema" and rf.json_schema.schema_ is not None:
            return GrammarSpec.json_schema(rf.json_schema.schema_)
        return GrammarSpec.json_object()

    def output_parser(self, req: p.ChatCompletionRequest) -> toolparse.OutputParser:
        """Splits a choice's text into content / reasoning / tool calls.  A grammar-bound
        output holds no reasoning, even when the template opened a <think> block."""
        return toolparse.OutputParser(
            tools=bool(req.tools) and req.tool_choice != "none",
            opened_think=bool(getattr(self.engine, "opens_think", False))
            and self._grammar(req) is None,
            parallel=req.parallel_tool_calls)

    def _budget(self, url: p.ImageURL, param: str) -> tuple[int, int]:
        s = self.settings
        lo, hi = s.min_pixels, s.max_pixels
        if url.detail == "low":
            hi = min(hi, 256 * TOKENS_PX)
        elif url.detail == "high":
            hi = max(hi, min(4 * hi, MAX_TOKENS_PER_IMAGE * TOKENS_PX))
        lo = min(lo, hi)
        # a request may ask for fewer pixels than the server allows, never more: both
        # overrides are clamped to the ceiling above (--max-pixels, x4 for detail "high")
        ceiling = hi
        if url.max_pixels is not None:
            hi = max(min(url.max_pixels, ceiling), TOKENS_PX)
            lo = min(lo, hi)
        if url.min_pixels is not None:
            lo = max(min(url.min_pixels, ceiling), TOKENS_PX)
            if lo > hi:
                raise InvalidRequest("min_pixels may not exceed max_pixels.", param=param)
        return lo, hi

    def _video_options(self, v: p.VideoURL, param: str) -> VideoOptions:
        """The video's sampling and pixel budget: the request may lower the server's
        (``--video-max-frames``, ``--video-max-pixels``), never raise them."""
        s = self.settings
        hi = max(min(v.max_pixels, s.video_max_pixels), TOKENS_PX) \
            if v.max_pixels is not None else s.video_max_pixels
        lo = min(s.video_min_pixels, hi)
        if v.min_pixels is not None:
            lo = max(min(v.min_pixels, s.video_max_pixels), TOKENS_PX)
            if lo > hi:
                raise InvalidRequest("min_pixels may not exceed max_pixels.", param=param)
        max_frames = min(v.max_frames or s.video_max_frames, s.video_max_frames)
        # Qwen's processor floors every frame at 1.05 x min_pixels (qwen-vl-utils' per-frame
        # cap): a floor above the budget's share per frame would let the frames together
        # outgrow max_pixels, so it is held below that share
        lo = max(min(lo, int(hi / (1.05 * max_frames))), TOKENS_PX)
        frames = v.url if isinstance(v.url, list) else None
        if frames is not None and not 1 <= len(frames) <= max_frames:
            raise InvalidRequest(f"A video given as frames needs 1 to {max_frames} of them "
                                 "(--video-max-frames, or the part's max_frames).",
                                 param=param + ".url")
        return VideoOptions(fps=v.fps or s.video_fps, min_frames=min(s.video_min_frames,
                                                                      max_frames),
                            max_frames=max_frames, min_pixels=lo, max_pixels=hi)

    async def _convert(self, req: p.ChatCompletionRequest, key: str = ""
                       ) -> tuple[list[dict], list[ImageInput], list[VideoInput]]:
        """The messages in HF's format, and the request's images and videos, fetched and
        decoded (the decode workers take ``key``'s jobs in turn with other keys')."""
        messages: list[dict] = []
        jobs, video_jobs = [], []
        pixels = PixelBudget(self.settings.max_request_image_pixels)
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            msg: dict = {"role": role}
            if isinstance(m.content, list):
                parts = []
                for j, part in enumerate(m.content):
                    if isinstance(part, p.TextPart):
                        parts.append({"type": "text", "text": part.text})
                    elif isinstance(part, p.VideoPart):
                        param = f"messages[{i}].content[{j}].video_url"
                        opts = self._video_options(part.video_url, param)
                        video_jobs.append((self.fetcher.load_video(
                            part.video_url.url, param=param + ".url", options=opts,
                            budget=pixels, turn=key), opts))
                        parts.append({"type": "video"})
                    else:
                        param = f"messages[{i}].content[{j}].image_url"
                        lo, hi = self._budget(part.image_url, param)
                        jobs.append((self.fetcher.load(
                            part.image_url.url, param=param + ".url", max_pixels=hi,
                            budget=pixels, turn=key), lo, hi))
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
        decoded = await gather_all([j for j, _, _ in jobs] + [j for j, _ in video_jobs])
        images = [ImageInput(img, lo, hi, digest)
                  for (img, digest), (_, lo, hi) in zip(decoded, jobs)]
        videos = [VideoInput(video, o.min_pixels, o.max_pixels, digest)
                  for (video, digest), (_, o) in zip(decoded[len(jobs):], video_jobs)]
        return messages, images, videos

    def _params(self, req: p.ChatCompletionRequest) -> SamplingParams:
        return self.sampling_params(req, logprobs=req.logprobs,
                                    top_logprobs=req.top_logprobs or 0,
                                    grammar=self._grammar(req))

    def sampling_params(self, req: p.SamplingRequest, *, logprobs: bool, top_logprobs: int,
                        grammar: GrammarSpec | None) -> SamplingParams:
        """The shared sampling fields as the engine takes them (server defaults filled
        in, ``logit_bias`` checked against the vocabulary)."""
        s = self.settings
        temperature = s.temperature if req.temperature is None else req.temperature
        bias = {}
        vocab = self.vocab_size
        for k, v in (req.logit_bias or {}).items():
            # ASCII digits only (str.isdigit also takes '²', which int() refuses), and an
            # id the model has: an out-of-range id would fail the whole decode batch
            if not (k.isascii() and k.isdigit() and len(k) < 10) or (
                    vocab is not None and int(k) >= vocab):
                raise InvalidRequest("logit_bias keys must be token ids"
                                     + (f" below {vocab}." if vocab else "."),
                                     param=f"logit_bias.{k}" if k.isprintable() and len(k) <= 32
                                     else "logit_bias")
            if not math.isfinite(v):
                raise InvalidRequest("logit_bias values must be finite numbers.",
                                     param="logit_bias")
            bias[int(k)] = max(-100.0, min(100.0, v))
        return SamplingParams(
            max_tokens=req.requested_max_tokens, temperature=temperature,
            top_p=s.top_p if req.top_p is None else req.top_p,
            top_k=s.top_k if req.top_k is None else max(req.top_k, 0),
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            # stop strings could cut a constrained output short of its grammar
            # ("" would match at once: dropped)
            stop=[] if grammar else [x for x in req.stop or [] if x], seed=req.seed, n=req.n,
            ignore_eos=req.ignore_eos, logprobs=logprobs,
            top_logprobs=top_logprobs, logit_bias=bias, grammar=grammar)

    async def start(self, req: p.ChatCompletionRequest, request_id: str,
                    stats: RequestStats, key: str = "", salt: str = "") -> AsyncIterator[Output]:
        """Validate, reserve, fetch; returns the engine's output stream, already started
        so that errors before the first token still become a plain JSON error.  ``salt``
        is the key's cache salt (``ApiKey.cache_salt``); the request's ``cache_salt``
        narrows it further."""
        self._check(req)
        params = self._params(req)

        async def load() -> dict:
            messages, images, videos = await self._convert(req, key)
            if req.grounding:
                stats.grounding_images = await self._geometry(images)
            return {"messages": messages, "images": images, "videos": videos,
                    "tools": _tools(req)}
        media = any(not isinstance(part, p.TextPart) for m in req.messages
                    if isinstance(m.content, list) for part in m.content)
        return await self.launch(req, request_id, stats, params, load, key=key, salt=salt,
                                 work_first=media or req.text_size.chars > THREAD_CHARS)

    async def launch(self, req: p.SamplingRequest, request_id: str, stats: RequestStats,
                     params: SamplingParams, load, *, key: str = "", salt: str = "",
                     work_first: bool = False) -> AsyncIterator[Output]:
        """A queue place (429 before any work), then ``load()`` (the ``EngineRequest``'s
        prompt fields: messages, images, tools or a plain prompt; fetching the images),
        then the engine; returns its output stream, its first event already in.  Without
        ``work_first`` (media to fetch, or a long text to tokenise on an API server:
        ``server.textprep.THREAD_CHARS``) there is no work before the engine, and the
        place may be taken there (``Engine.reserve(deferred=True)``)."""
        reservation = await _maybe(self.engine.reserve(deferred=not work_first))
        try:
            fields = await load()
        except BaseException:
            reservation.release()
            raise
        stats.images = len(fields.get("images", ()))
        stream = self.engine.generate(
            EngineRequest(request_id, fields.pop("messages", []), fields.pop("images", []),
                          params, key=key, stream=bool(req.stream),
                          cache_salt=_salt(salt, req.cache_salt), on_prefill=stats.prefilled,
                          ticket=getattr(stats.ticket, "tid", None), **fields),
            reservation)
        first = await anext(stream)  # raises context/engine errors before any byte is sent
        stats.ttft = time.perf_counter() - stats.t0
        return _prepend(first, stream)

    async def _geometry(self, images: list[ImageInput]) -> list[p.GroundingImage]:
        out = []
        for i, (im, g) in enumerate(zip(images, await _maybe(
                self.engine.image_geometry(images)))):
            w, h = original_size(im.image)
            out.append(p.GroundingImage(
                index=i, width=w, height=h,
                model_width=g.width if g else im.image.width,
                model_height=g.height if g else im.image.height,
                image_tokens=g.tokens if g else 0))
        return out

    # --- /tokenize and /detokenize -------------------------------------------------------
    async def tokenize(self, req: p.TokenizeChatRequest | p.TokenizeCompletionRequest
                       ) -> p.TokenizeResponse:
        """The prompt a chat request (or a plain prompt) would run, counted: the same
        checks, image fetching and media policy as ``start``, a queue place while its
        images load, nothing generated.  The context length is reported, not enforced."""
        if isinstance(req, p.TokenizeChatRequest):
            self._check(req, generating=False)
            reservation = await _maybe(self.engine.reserve())
            try:
                messages, images, videos = await self._convert(req)
                count = await self.engine.count(EngineRequest(
                    "tokenize", messages, images, SamplingParams(), _tools(req),
                    videos=videos))
            finally:
                reservation.release()
        else:
            self.check_basic(req)
            self.check_prompt_text(req.prompt)
            count = await self.engine.count(EngineRequest(
                "tokenize", [], [], SamplingParams(), prompt=req.prompt))
        n, window = len(count.token_ids), self.engine.max_model_len
        return p.TokenizeResponse(count=n, max_model_len=window, tokens=count.token_ids,
                                  image_tokens=count.image_tokens,
                                  video_tokens=count.video_tokens,
                                  max_tokens_room=max(0, window - n))

    async def detokenize(self, req: p.DetokenizeRequest) -> p.DetokenizeResponse:
        self.check_basic(req)
        if len(req.tokens) > self.engine.max_model_len:
            raise InvalidRequest(f"At most {self.engine.max_model_len} tokens (the context "
                                 "window) may be detokenized at once.", param="tokens")
        return p.DetokenizeResponse(prompt=await self.engine.detokenize(req.tokens))

    # --- engine → response -----------------------------------------------------------
    async def collect(self, req, request_id, outputs: AsyncIterator[Output],
                      stats: RequestStats) -> str:
        """The ``ChatCompletion``'s JSON (logprobs written by ``p.LogprobJSON``)."""
        texts = [""] * req.n
        finish: list[str | None] = [None] * req.n
        logprobs: list[list] = [[] for _ in range(req.n)]
        counts = [0] * req.n
        async for o in outputs:
            texts[o.index] += o.text
            counts[o.index] = o.completion_tokens
            stats.tally(o, counts)
            if o.logprobs:
                logprobs[o.index] += o.logprobs
            if o.finish_reason:
                finish[o.index] = o.finish_reason
        stats.completion_tokens = sum(counts)
        choices = []
        for i in range(req.n):
            parser = self.output_parser(req)
            events = parser.feed(texts[i]) + parser.finish()
            message = _message(events, parser)
            if req.grounding:
                message.grounding = grounding.ground(message.content or "",
                                                     stats.grounding_images)
            choices.append(p.Choice(
                index=i, message=message, finish_reason=_finish(finish[i], parser),
                # filled with the written array by completion_json
                logprobs=p.ChoiceLogprobs(content=[]) if req.logprobs else None))
        return p.completion_json(
            p.ChatCompletion(id=request_id, model=req.model, choices=choices,
                             usage=usage(stats)),
            [self.logprob_json.array(x) for x in logprobs] if req.logprobs else [])

    async def stream(self, req, request_id, outputs: AsyncIterator[Output],
                     stats: RequestStats) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None, logprobs: str | None = None) -> str:
            c = p.ChatCompletionChunk(id=request_id, created=created, model=req.model,
                                      choices=choices, usage=usage)
            return "data: " + p.chunk_json(c, logprobs) + "\n\n"

        placeholder = p.ChoiceLogprobs(content=[])  # filled by chunk_json
        fast = p.ChunkWriter(request_id, created, req.model)  # content deltas

        counts = [0] * req.n
        parsers = [self.output_parser(req) for _ in range(req.n)]
        contents = [""] * req.n  # what each choice's deltas said, for its grounding
        for i in range(req.n):
            yield chunk([p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        try:
            async for o in outputs:
                counts[o.index] = o.completion_tokens
                stats.tally(o, counts)
                parser = parsers[o.index]
                events = parser.feed(o.text) if o.text else []
                if o.finish_reason:
                    events += parser.finish()
                lp = self.logprob_json.array(o.logprobs) if o.logprobs else None
                for delta in deltas(events):  # tokens' logprobs ride on their first chunk
                    if req.grounding and delta.content:
                        contents[o.index] += delta.content
                    if delta.content is not None and delta.tool_calls is None and \
                            delta.reasoning_content is None and delta.role is None:
                        yield "data: " + fast.content(o.index, delta.content, lp) + "\n\n"
                    else:
                        yield chunk([p.ChunkChoice(index=o.index, delta=delta,
                                                   logprobs=placeholder if lp else None)],
                                    logprobs=lp)
                    lp = None
                if lp is not None:  # text held back (marker or stop-string prefix)
                    yield "data: " + fast.content(o.index, "", lp) + "\n\n"
                if o.finish_reason:
                    last = p.Delta(grounding=grounding.ground(
                        contents[o.index], stats.grounding_images) if req.grounding else None)
                    yield chunk([p.ChunkChoice(index=o.index, delta=last,
                                               finish_reason=_finish(o.finish_reason, parser))])
        except APIError as e:  # mid-stream failure: OpenAI's error event, then end
            # ...cleanly: re-raising here would cut the chunked body short (the client sees
            # "incomplete chunked read") and log a traceback for a handled error
            log.warning("request %s failed mid-stream: %s (%s)", request_id, e.code, e.status)
            stats.completion_tokens = sum(counts)
            yield "data: " + json.dumps(e.envelope()) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        stats.completion_tokens = sum(counts)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage=usage(stats))
        yield "data: [DONE]\n\n"


def _tools(req: p.ChatCompletionRequest) -> list[dict] | None:
    """The tools the template renders (none with ``tool_choice: "none"``)."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def _salt(key_salt: str, request_salt: str | None) -> str:
    """The tenant a request's cache entries belong to: its key's, narrowed by its own
    ``cache_salt`` (length-prefixed, so no two pairs give the same string)."""
    if request_salt is None:
        return key_salt
    return f"{len(key_salt)}:{key_salt}|req:{request_salt}"


async def _prepend(first, rest):
    yield first
    async for x in rest:
        yield x


def _finish(reason: str | None, parser: toolparse.OutputParser) -> str | None:
    return "tool_calls" if reason == "stop" and parser.has_tool_calls else reason


def _message(events: list[tuple], parser: toolparse.OutputParser) -> p.ResponseMessage:
    # a call cut off or with broken arguments is not presented as a call: its raw text
    # comes back as content (as vLLM does); finish_reason says "length" for a cut one
    content = "".join(e[1] for e in events if e[0] == "content") + parser.incomplete_text
    reasoning = "".join(e[1] for e in events if e[0] == "reasoning")
    calls = [p.ToolCall(id=c.id, function=p.FunctionCall(name=c.name, arguments=c.arguments))
             for c in parser.complete_calls]
    return p.ResponseMessage(content=content if (content or not calls) else None,
                             reasoning_content=reasoning if parser.saw_reasoning else None,
                             tool_calls=calls or None)


def deltas(events: list[tuple]) -> list[p.Delta]:
    """Parser events → stream deltas, in order: content and reasoning runs merged, a tool
    call's first fragment (id, type, name, arguments "") on its own, then its arguments."""
    out: list[p.Delta] = []
    for e in events:
        kind, last = e[0], out[-1] if out else None
        if kind == "content":
            if last is not None and last.content is not None and last.tool_calls is None:
                last.content += e[1]
            else:
                out.append(p.Delta(content=e[1]))
        elif kind == "reasoning":
            if last is not None and last.reasoning_content is not None:
                last.reasoning_content += e[1]
            else:
                out.append(p.Delta(reasoning_content=e[1]))
        elif kind == "tool_start":
            out.append(p.Delta(tool_calls=[p.ToolCallDelta(
                index=e[1], id=e[2], type="function",
                function={"name": e[3], "arguments": ""})]))
        elif kind == "tool_args":
            tcd = last.tool_calls[0] if last is not None and last.tool_calls else None
            if tcd is not None and tcd.index == e[1] and tcd.id is None:
                tcd.function["arguments"] += e[2]
            else:
                out.append(p.Delta(tool_calls=[p.ToolCallDelta(
                    index=e[1], function={"arguments": e[2]})]))
    return out


def usage(stats: RequestStats) -> p.Usage:
    return p.Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                   total_tokens=stats.prompt_tokens + stats.completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(
                       cached_tokens=stats.cached_tokens, image_tokens=stats.image_tokens,
                       video_tokens=stats.video_tokens))


MAX_JSON_DEPTH = 64   # request nesting (tool schemas are the deep part); deeper → 400


def _scan(obj) -> tuple[str, str] | None:
    """First problem in a request's JSON, as (kind, path): "unicode" for a string or key that
    is not encodable as UTF-8 (lone surrogates), "depth" for nesting past MAX_JSON_DEPTH
    (the chat template renders tool schemas recursively: a deep one is a RecursionError).
    Iterative (it cannot run out of stack) and lazy: one stack of iterators, no per-element
    allocation; the path is only spelled out for the problem found."""
    if isinstance(obj, str):
        return None if _utf8(obj) else ("unicode", "")
    if not isinstance(obj, (dict, list, tuple)):
        return None
    keys: list = []       # the path to the container on top of the stack
    stack = [_children(obj)]
    while stack:
        for k, v in stack[-1]:
            if isinstance(k, str) and not _utf8(k):
                return "unicode", _path(keys)
            if isinstance(v, str):
                if not _utf8(v):
                    return "unicode", _path(keys + [k])
            elif isinstance(v, (dict, list, tuple)):
                if len(stack) >= MAX_JSON_DEPTH:
                    return "depth", _path(keys + [k])
                keys.append(k)
                stack.append(_children(v))
                break
        else:
            stack.pop()
            if keys:
                keys.pop()
    return None


def _children(o):
    return iter(o.items()) if isinstance(o, dict) else enumerate(o)


def _utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(keys: list) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _short_path(path: str, parts: int = 4) -> str:
    """The first few components of a JSON path (a depth error's full path is absurd)."""
    pieces = re.findall(r"[^.\[]+|\[\d+\]", path)
    out = ""
    for x in pieces[:parts]:
        out += x if x.startswith("[") or not out else "." + x
    return out


def _json_or_text(s: str):
    try:
        v = json.loads(s)
    except (ValueError, RecursionError):
        return s
    # nesting the chat template cannot render, or "\ud800" escapes: keep the plain text
    return v if _scan(v) is None else s


async def _maybe(value):
    """``value``, awaited if the engine answered with an awaitable: ``reserve`` and
    ``image_geometry`` of an engine in another process are calls with a reply."""
    return await value if inspect.isawaitable(value) else value
