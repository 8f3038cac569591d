"""The narrow, tensor-free contract between the HTTP layer and the engine.

The serving layer builds an ``EngineRequest`` (chat messages in Hugging Face's format,
decoded PIL images, ``SamplingParams``), reserves a queue place with
``Engine.reserve()`` *before* fetching any image, then iterates
``Engine.generate(request, reservation)``: an async stream of ``Output`` events, one per
choice and step (for a non-streamed request, ``stream=False``, the events after the first
may come merged: one per choice and delivery), the last of each choice carrying a
``finish_reason``.  Cancelling the
iteration (client gone) aborts the request; the engine frees its batch slot at the next
step.  Every failure arrives as a ``server.errors.APIError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


@dataclass
class SamplingParams:
    max_tokens: int | None = None        # None: the engine fills in the default / context rest
    temperature: float = 0.7             # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1 → off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # a compiled grammar key (issue: structured output); None → unconstrained
    grammar: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


class RGBPixels:
    """A decoded RGB image as its raw bytes, ``(height, width, 3)`` uint8 in row order:
    what the API side's decode workers return and the engine reads as it is.  A PIL image
    repacks its pixels on every ``tobytes()`` and pickle (~0.8 ms for 512 x 512 each
    time); these are packed once, in the decode worker, then only passed on: through the
    worker's pipe, as the ZeroMQ frame to the engine, into the engine's array.  It reads
    like a PIL image where the server reads one (``mode``, ``size``, ``width``,
    ``height``, ``info``, ``tobytes()``); ``numpy.asarray`` gives the ``(H, W, 3)`` view
    and ``to_pil()`` a PIL image (the PIL preprocessing path, tests)."""

    mode = "RGB"
    __slots__ = ("data", "width", "height", "info")

    def __init__(self, data, width: int, height: int, info: dict | None = None):
        if len(memoryview(data).cast("B")) != width * height * 3:
            raise ValueError(f"{width}x{height} RGB needs {width * height * 3} bytes")
        self.data, self.width, self.height = data, width, height
        self.info = info if info is not None else {}

    @classmethod
    def from_pil(cls, image) -> "RGBPixels":
        image = image if image.mode == "RGB" else image.convert("RGB")
        return cls(image.tobytes(), image.width, image.height, dict(image.info))

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def tobytes(self) -> bytes:
        return bytes(self.data)

    def __array__(self, dtype=None, copy=None):
        import numpy as np
        a = np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3)
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a.copy() if copy else a  # a view of ``data`` (read-only for bytes)

    def to_pil(self):
        from PIL import Image
        image = Image.frombuffer("RGB", self.size, self.data, "raw", "RGB", 0, 1)
        image.info.update(self.info)
        return image

    def __reduce__(self):  # bytes, so that a memoryview over a ZeroMQ frame pickles too
        return RGBPixels, (bytes(self.data), self.width, self.height, self.info)


@dataclass
class ImageInput:
    image: Any                           # PIL.Image.Image or RGBPixels, RGB
    min_pixels: int
    max_pixels: int
    # hash of the image's bytes as received (``server.api.media.image_digest``); "" when there
    # were none (a PIL image from the UI or a test): the engine then hashes the pixels.
    # With the pixel budget it keys the image's cached pixels and KV (``Prepared.image_keys``)
    digest: str = ""


@dataclass
class VideoInput:
    """A video's sampled frames, decoded (``models.video.DecodedVideo``: frames ``(T, H, W,
    3)`` uint8, the source ``fps`` and each frame's source index, which give the
    timestamps written into the prompt), with the pixel budget of all its frames together."""
    video: Any                           # models.video.DecodedVideo
    min_pixels: int
    max_pixels: int
    # hash of the bytes as received and of how they were sampled (fps, frame cap): with the
    # pixel budget it keys the video's cached pixels, encoder outputs and KV, as for images
    digest: str = ""


@dataclass
class EngineRequest:
    request_id: str
    messages: list[dict]                 # HF chat format; image parts are {"type": "image"}
    images: list[ImageInput]             # in order of appearance
    params: SamplingParams
    tools: list[dict] | None = None
    key: str = ""                        # API key name (fair queueing); "" = anonymous
    # the tenant: every cache key of this request (prefix blocks, image pixels, encoder
    # outputs, grammar) is salted with it, so requests with another salt never hit its
    # entries; "" = the unsalted tenant (a server without keys). See ``ApiKey.cache_salt``
    cache_salt: str = ""
    # called (from the model thread) with the prompt's token count when its prefill is
    # scheduled: work the key is charged for even if the client leaves before any token
    on_prefill: Any = None
    # the key's ticket in an engine-core process (``server.engine.proc``; None in one
    # process): the engine notes the prefill on it itself, so the charge holds even if
    # the client left before its API server read the prefill notice
    ticket: int | None = None
    # False: the caller reads the whole result only (a non-streamed completion): after the
    # first, events may arrive merged, a few per request rather than one per step
    stream: bool = True
    # a plain prompt (legacy completions, /tokenize's prompt form): tokenised as it is, no
    # chat template, or given as token ids; ``messages`` and ``images`` are then empty
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    # in order of appearance; video parts are {"type": "video"} in ``messages``
    videos: list[VideoInput] = field(default_factory=list)
    # the prompt already rendered and tokenised by an API server (``server.textprep``
    # ``PromptPieces``); ``messages``, ``tools`` and ``prompt`` are then empty
    pieces: Any = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)  # (token, logprob, bytes)
    bytes: list[int] | None = None       # the token's own UTF-8 bytes (may be part of a char)
    # the ids of ``token`` and ``top`` when the engine knows them (the serving layer caches
    # per id); the bytes lists may be shared between events: never modify them
    token_id: int | None = None
    top_ids: list[int] | None = None


@dataclass
class Output:
    index: int                           # choice index
    text: str                            # new text since the last Output of this choice
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0           # so far, for this choice
    # per token its logprob entry: a ``TokenLogprob``, or that entry already written as its
    # wire JSON (a str: the batching engine's output thread writes them, see
    # ``server.logprob_json.LogprobJSON``)
    logprobs: list[TokenLogprob | str] | None = None
    # prompt tokens served from the prefix cache (the same on every Output of a choice);
    # reported as usage.prompt_tokens_details.cached_tokens
    cached_tokens: int = 0
    # prompt tokens that stand for images: usage.prompt_tokens_details.image_tokens
    image_tokens: int = 0
    # ... and for the videos' frames: usage.prompt_tokens_details.video_tokens
    video_tokens: int = 0


@dataclass
class ImageGeometry:
    """An image as the model sees it: resized to ``width`` x ``height`` pixels (multiples
    of the patch grid) and standing for ``tokens`` prompt tokens."""
    width: int
    height: int
    tokens: int


@dataclass
class PromptCount:
    """A request's prompt as ``generate`` would build it, without running it (``/tokenize``)."""
    token_ids: list[int]
    image_tokens: int                    # of the token ids, standing for the images
    video_tokens: int = 0                # ... and for the videos' frames


class Reservation(Protocol):
    def release(self) -> None: ...


class NoReservation:
    """A reservation with no place behind it (given back already, or held elsewhere)."""

    def release(self) -> None:
        pass


class Engine(Protocol):
    model_id: str                        # hub id or path of the loaded model
    max_model_len: int
    vocab_size: int                      # rows of the logits (logit_bias ids are checked)
    supports_video: bool

    @property
    def healthy(self) -> bool: ...

    def reserve(self, deferred: bool = False) -> Reservation:
        """A queue place, or raise ``Overloaded`` (429) at once.  ``deferred``: the caller
        does no work before ``generate`` (no media to fetch), so an engine in another
        process may take the place when the request reaches it, a round trip less; its
        429 then comes from ``generate``."""

    def generate(self, request: EngineRequest, reservation: Reservation) -> AsyncIterator[Output]:
        ...

    def image_geometry(self, images: list[ImageInput]) -> list[ImageGeometry]:
        """Each image's size and token count as the model will see it (no pixel work)."""

    async def count(self, request: EngineRequest) -> PromptCount:
        """The prompt ``generate(request)`` would run, tokenised with its images counted
        (the same template and image budgets), without a context-length check and without
        touching any cache.  Raises ``InvalidRequest`` as ``generate`` would."""

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens kept); ``InvalidRequest`` for an id
        the tokenizer does not have."""

    def stats(self) -> dict[str, float]:
        """Figures read on each /metrics scrape (``server.api.metrics``): ``queue_depth``,
        ``running_seqs``; cumulative counters ``image_cache_hits``, ``image_cache_queries``
        and, where the engine has them, ``prefix_cache_query_tokens``,
        ``prefix_cache_hit_tokens``, ``encoder_cache_hits``; gauges ``kv_blocks_used``,
        ``kv_blocks_free``.  A key left out is not exported."""

    def close_requests(self, exc: BaseException) -> int:
        """Make every open ``generate`` stream (and any started later) raise ``exc``: the
        end of a SIGTERM's drain.  Returns how many were open."""

    async def shutdown(self, timeout: float) -> None: ...


def coalesce(outs: list[Output]) -> list[Output]:
    """Merge consecutive outputs of the same choice into one (fewer stream chunks when
    the event loop is behind the engine, and a non-streamed request's held events; text
    and token counts are unchanged).  The merged outputs own their lists."""
    if len(outs) == 1 or len({o.index for o in outs}) == len(outs):
        return outs  # nothing to merge (the common case): no copies
    merged: dict[int, Output] = {}
    for o in outs:
        m = merged.get(o.index)
        if m is None:
            merged[o.index] = Output(o.index, o.text, list(o.token_ids), o.finish_reason,
                                     o.prompt_tokens, o.completion_tokens,
                                     list(o.logprobs) if o.logprobs else None,
                                     cached_tokens=o.cached_tokens,
                                     image_tokens=o.image_tokens,
                                     video_tokens=o.video_tokens)
            continue
        m.text += o.text
        m.token_ids += o.token_ids
        m.finish_reason, m.completion_tokens = o.finish_reason, o.completion_tokens
        if o.logprobs:  # in place: a held answer merges hundreds of steps at once
            if m.logprobs is None:
                m.logprobs = []
            m.logprobs += o.logprobs
    return list(merged.values())


async def read_outputs(q: asyncio.Queue) -> AsyncIterator[Output]:
    """A request's events from the queue its sink fills (lists of ``Output``, or an
    exception, which is raised), merged per choice when several wait (the consumer lagged
    behind the engine).  The caller stops once every choice has finished."""
    while True:
        items = [await q.get()]
        while not q.empty():  # the consumer lagged: coalesce what is waiting
            items.append(q.get_nowait())
        outs = []
        for item in items:
            if isinstance(item, BaseException):
                raise item
            outs += item
        for out in coalesce(outs):
            yield out


class ChoiceEvents:
    """A request's events (``read_outputs``) until each of its ``n`` choices has
    finished; ``left`` counts the choices that have not (a caller that stops early, its
    client gone, aborts the request)."""

    def __init__(self, q: asyncio.Queue, n: int):
        self.q, self.left = q, n

    async def __aiter__(self) -> AsyncIterator[Output]:
        async for out in read_outputs(self.q):
            if out.finish_reason is not None:
                self.left -= 1
            yield out
            if not self.left:
                return
