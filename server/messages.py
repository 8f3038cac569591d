"""The messages between the API-server processes and the engine-core process: the one
module that defines what crosses the boundary (``server.api.engine_client`` on the API side,
``server.engine.proc`` on the engine side).  No torch here: both sides import it.

Transport: ZeroMQ over an ``ipc://`` socket.  The engine binds a ROUTER; each API server
connects a DEALER whose identity is its ``api_id``.  A message is one multipart ZeroMQ
message: frame 0 is a msgpack list (msgspec) ``[kind, ...]``; a request's pixels follow
as extra frames, raw uint8 (sent and received without a copy, never pickled).

API server -> engine (``kind``):

* ``hello``  ``[api_id, pid]``: (re)introduces the API server; answered with ``ready``
  once the model is loaded.  The engine watches ``pid`` and aborts all of that API
  server's requests when it dies.
* ``gen``    ``[rid, reservation, request]`` + frames: start a request
  (``encode_request``); its events come back in ``out`` batches under ``rid``.  A
  ``reservation`` of None (a text request: nothing fetched first) asks the engine to
  take the queue place now (429 in ``out`` when full).
* ``abort``  ``[rid]``: the client left; the engine drops the request.
* ``call``   ``[call_id, method, args]`` (+ frames for ``count``): a request/reply call
  (``reserve``, ``count``, ``detokenize``, ``geometry``, ``stats``, ``admit``);
  answered by ``reply``.
* ``cast``   ``[method, args]``: a call without reply (``release``, ``finish``).

Engine -> API server:

* ``ready``  ``[info]``: model id, context length, vocabulary, video support, the
  engine's pid and its ``epoch`` (a new one after every engine restart).
* ``out``    ``[[rid, item], ...]``: everything the engine produced for this API server
  since its last ``out``: one message per engine step (not per token, not per request).
  An item is a list of ``Output`` tuples (``encode_outputs``) or an error
  (``encode_error``): the sequential scheduler's events, and errors before a request
  reaches the batch.
* ``reply``  ``[call_id, ok, value]``: ``value`` is the result, or an encoded error.
* ``hb``     ``[healthy, failed_steps, epoch]``: a heartbeat every ``HEARTBEAT_S``.

Engine -> API server, on a second ROUTER socket (``<addr>-out``) written by the engine's
model thread (``server.engine.proc.RemoteOutput``), read by the API server's output
thread (``StepOutput``):

* ``step``   ``[[rid, choice, token, finish, hide, logprob row, header], ...]``: the
  batching engine's rows of one step (or a few) for this API server, raw tokens; the
  header (prompt, cached, image and video tokens) on a row's first token only.  A
  ``choice`` of ``FAILED`` is the request's error (encoded in the logprob place; the
  ``token`` place: the engine's ``[healthy, failed_steps, epoch]`` after a failed batch
  step), of
  ``PREFILLED`` the notice that its prefill was scheduled (``token``: the prompt's
  tokens; the key pays for them from now on).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from server import errors
from server.engine.interface import (EngineRequest, ImageGeometry, ImageInput, Output,
                                     PromptCount, RGBPixels, SamplingParams, TokenLogprob,
                                     VideoInput)

# a step record's choice index for a request's error, and for its prefill notice
FAILED, PREFILLED = -1, -2
HEARTBEAT_S = 0.25  # the engine's heartbeat period ...
HEARTBEAT_LOST_S = 10.0  # ... and how long without any message an engine counts as hung

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def pack(*fields) -> bytes:
    return _encoder.encode(list(fields))


def unpack(frame) -> list:
    return _decoder.decode(frame)


# --- errors ------------------------------------------------------------------------------

def encode_error(exc: BaseException) -> list:
    """An ``APIError`` as ``["e", class name, message, param, code, headers]``; any other
    exception becomes an internal error (its text stays in the log that raised it)."""
    if not isinstance(exc, errors.APIError):
        exc = errors.InternalError("The model failed on this request.")
    return ["e", type(exc).__name__, exc.message, exc.param, exc.code, exc.headers]


def decode_error(item: list) -> errors.APIError:
    _, name, message, param, code, headers = item
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.APIError)):
        cls = errors.APIError
    err = cls.__new__(cls)  # the fields as sent, whatever the subclass's own signature
    errors.APIError.__init__(err, message, param=param, code=code, headers=headers)
    return err


def is_error(item) -> bool:
    return isinstance(item, list) and item[:1] == ["e"]


# --- requests ----------------------------------------------------------------------------

_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.name != "grammar"]


def encode_request(req: EngineRequest) -> tuple[dict, list]:
    """``req`` as a msgpack-able dict and its pixel frames (images as raw RGB bytes,
    videos as their ``(T, H, W, 3)`` frame arrays)."""
    p = req.params
    grammar = p.grammar
    if grammar is not None:  # an uncompiled ``structured.GrammarSpec``: the engine compiles
        grammar = [grammar.kind, grammar.payload, grammar.parallel, grammar.param]
    frames: list = []
    images = []
    for im in req.images:
        pic = im.image
        if not isinstance(pic, RGBPixels):  # a PIL image (the UI's, a test's): packed here
            pic = RGBPixels.from_pil(pic)
        frames.append(pic.data)  # the decode worker's bytes, as they came
        images.append([pic.width, pic.height, im.min_pixels, im.max_pixels, im.digest])
    videos = []
    for v in req.videos:
        d = v.video
        frames.append(memoryview(d.frames.data) if d.frames.flags.c_contiguous
                      else d.frames.tobytes())
        videos.append([list(d.frames.shape), d.fps, list(d.frame_indices), d.total_frames,
                       d.duration, v.min_pixels, v.max_pixels, v.digest])
    return {"id": req.request_id, "messages": req.messages, "tools": req.tools,
            "params": [getattr(p, f) for f in _PARAM_FIELDS], "grammar": grammar,
            "key": req.key, "salt": req.cache_salt, "stream": req.stream,
            "prompt": req.prompt, "prompt_ids": req.prompt_token_ids,
            "pieces": None if req.pieces is None else [req.pieces.ids, req.pieces.kinds],
            "ticket": req.ticket, "images": images, "videos": videos}, frames


def decode_request(d: dict, frames: list) -> EngineRequest:
    """The engine side of ``encode_request``: images (``RGBPixels``) and decoded videos
    over the received frames' buffers (no copy)."""
    import numpy as np
    params = SamplingParams(**dict(zip(_PARAM_FIELDS, d["params"])))
    params.logit_bias = {int(k): v for k, v in params.logit_bias.items()}
    if d["grammar"] is not None:
        from server.engine.structured import GrammarSpec
        params.grammar = GrammarSpec(*d["grammar"])
    frames = iter(frames)
    images = [ImageInput(RGBPixels(_buffer(next(frames)), w, h), lo, hi, digest)
              for w, h, lo, hi, digest in d["images"]]
    videos = []
    if d["videos"]:
        from models.video import DecodedVideo
        for shape, fps, indices, total, duration, lo, hi, digest in d["videos"]:
            arr = np.frombuffer(_buffer(next(frames)), dtype=np.uint8).reshape(shape)
            videos.append(VideoInput(DecodedVideo(arr, fps, indices, total, duration),
                                     lo, hi, digest))
    pieces = d.get("pieces")
    if pieces is not None:
        from server.textprep import PromptPieces
        pieces = PromptPieces(*pieces)
    return EngineRequest(d["id"], d["messages"], images, params, tools=d["tools"],
                         key=d["key"], cache_salt=d["salt"], stream=d["stream"],
                         prompt=d["prompt"], prompt_token_ids=d["prompt_ids"], videos=videos,
                         pieces=pieces, ticket=d["ticket"])


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame  # a zmq.Frame, or bytes


# --- outputs -----------------------------------------------------------------------------

def encode_outputs(outs: list[Output]) -> list:
    return [[o.index, o.text, o.token_ids, o.finish_reason, o.prompt_tokens,
             o.completion_tokens, _encode_logprobs(o.logprobs), o.cached_tokens,
             o.image_tokens, o.video_tokens] for o in outs]


def _encode_logprobs(lps):
    if not lps:
        return lps
    # the batching engine's entries are already their wire JSON (str); the sequential
    # scheduler's are ``TokenLogprob``s
    return [lp if isinstance(lp, str) else dataclasses.astuple(lp) for lp in lps]


def decode_outputs(rows: list) -> list[Output]:
    outs = []
    for (index, text, ids, finish, prompt, completion, lps, cached, image,
         video) in rows:
        if lps:
            lps = [lp if isinstance(lp, str) else _token_logprob(lp) for lp in lps]
        outs.append(Output(index, text, ids, finish, prompt, completion, lps,
                           cached_tokens=cached, image_tokens=image, video_tokens=video))
    return outs


def _token_logprob(t: list) -> TokenLogprob:
    token, logprob, top, raw, token_id, top_ids = t
    return TokenLogprob(token, logprob, [tuple(x) for x in top], raw, token_id, top_ids)


# --- call results ------------------------------------------------------------------------

def encode_result(method: str, value) -> Any:
    if method == "count":
        return [value.token_ids, value.image_tokens, value.video_tokens]
    if method == "geometry":
        return [None if g is None else [g.width, g.height, g.tokens] for g in value]
    return value


def decode_result(method: str, value) -> Any:
    if method == "count":
        return PromptCount(*value)
    if method == "geometry":
        return [None if g is None else ImageGeometry(*g) for g in value]
    return value
