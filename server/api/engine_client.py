"""The API server's handle on the engine-core process: ``EngineClient`` implements
``server.engine.interface.Engine`` over ZeroMQ (``server.messages``), without torch.

One DEALER socket, owned by the event loop.  ``generate`` sends the request (its pixels
as raw frames) and reads its events from a queue that ``_receive`` fills from the
engine's ``out`` batches (one message per engine step for all of this API server's
requests).  Leaving the iteration early sends ``abort``.  Before sending, the chat
template is rendered and the text tokenised here (``server.textprep``).  ``reserve``
(unless deferred: a text request's place is taken by the engine as ``gen`` arrives),
``count``, ``image_geometry``, ``detokenize`` and ``stats`` are calls with a reply; the
per-key limits (``limiter``) are kept by the engine too, so that they hold across API
servers.

Engine faults: the engine's pid (from its ``ready``) is watched with a pidfd, and every
message counts as a heartbeat.  When the engine exits (killed, out of memory) or is
silent for ``HEARTBEAT_LOST_S``, every open request is answered at once with a 503
(``ENGINE_GONE``: a stream ends with an error event and ``[DONE]``), every pending call
fails the same way, and ``healthy`` is False until an engine says ``ready`` again (the
supervisor restarts it; ``hello`` is repeated until then).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

from server.engine.interface import ChoiceEvents, EngineRequest, NoReservation
from server.engine.output import Sink
from server.errors import APIError, ServiceUnavailable
from server.lifecycle import exit_if_it_fails, pid_watch
from server.messages import (FAILED, HEARTBEAT_LOST_S, PREFILLED, decode_error,
                             decode_outputs, decode_result, encode_request, is_error, pack,
                             unpack)
from server.textprep import THREAD_CHARS, TextPrep, text_chars

log = logging.getLogger("qwen_vl.client")

ENGINE_GONE = "The engine stopped while serving this request; retry it."
HELLO_EVERY_S = 0.2


class _Reservation:
    """A queue place held by the engine under ``res_id``, valid for the engine of
    ``epoch`` only (a restarted engine numbers its places afresh); ``res_id`` None: a
    deferred place, taken when the request reaches the engine."""

    def __init__(self, client: "EngineClient", res_id: int | None, epoch: str | None = None):
        self.client, self.res_id, self.epoch, self.held = client, res_id, epoch, True

    def stale(self) -> bool:
        return self.res_id is not None and self.epoch != self.client._epoch

    def release(self):
        if self.held:
            self.held = False
            if self.res_id is not None and not self.stale():
                self.client._cast("release", self.res_id)


class _Ticket:
    """A key's place and token charge, kept by the engine (``server.ratelimit.Ticket``)."""

    def __init__(self, client: "EngineClient", tid: int | None):
        self.client, self.tid = client, tid

    def finish(self, tokens_used: int | None = None):
        if self.tid is not None:
            self.client._cast("finish", [self.tid, tokens_used])
            self.tid = None


class RemoteLimiter:
    """``server.ratelimit.Limiter``'s ``admit``, answered by the engine's limiter."""

    def __init__(self, client: "EngineClient"):
        self.client = client

    async def admit(self, key, cost: int, seqs: int = 1) -> _Ticket:
        from server.keys import KeyLimits
        lim = key.limits
        if lim == KeyLimits():  # nothing to count: no round trip
            return _Ticket(self.client, None)
        tid = await self.client._call("admit", [key.name, [lim.requests_per_minute,
                                                            lim.tokens_per_minute,
                                                            lim.max_concurrent], cost, seqs])
        return _Ticket(self.client, tid)


class _Entry:
    """A request as this API server's output stage sees it (``OutputStage`` reads
    ``seqs``, ``sink``, ``stream``, ``held``, ``held_at``, ``reservation``)."""

    def __init__(self, seqs, sink, stream: bool, on_prefill=None):
        self.seqs, self.sink, self.stream = seqs, sink, stream
        self.on_prefill = on_prefill  # told the prompt's tokens when its prefill is scheduled
        self.held, self.held_at = [], None
        self.reservation = NoReservation()


class _StepLogprobs:
    """``sampler.LogprobRows.entry`` over the rows of a received step, each with the
    width it was packed with."""

    def __init__(self, rows: list):
        self.rows = rows

    def entry(self, i: int, k: int):
        width, r = self.rows[i]
        w = 2 + width
        return r[1], [int(t) for t in r[2:2 + k]], r[w:w + k]


class _NoFaults:
    def tick(self, stage: str = "forward"):
        pass


class StepOutput:
    """This API server's output stage: a thread that reads the engine's ``step`` messages
    from their own socket and hands them to ``server.engine.output.OutputStage`` (text,
    stop strings, logprob JSON, one delivery per event loop per wake-up), the code the
    single process ran, now beside the HTTP layer instead of beside the model.  A stop
    string tells the engine to drop its row (``stop``)."""

    def __init__(self, client: "EngineClient", addr: str, tokenizer_json: str):
        from tokenizers import Tokenizer
        from server.engine.output import OutputStage, token_bytes, token_text
        self.client, self.addr = client, addr
        self.detok = Tokenizer.from_str(tokenizer_json)
        self.faults = _NoFaults()
        self.token_text = lambda t: token_text(self.detok, t)
        self.token_bytes = lambda t: token_bytes(self.detok, t)
        self.entries: dict[str, _Entry] = {}  # rid -> entry (loop adds, thread reads)
        self._stopping = False
        self.stage = OutputStage(self, self._closed, thread=False)
        import threading
        self._thread = threading.Thread(
            target=exit_if_it_fails(self._run, "this API server's output thread", log),
            name="api-output", daemon=True)
        self._thread.start()

    def _note_failure(self):  # OutputStage's health hook: the engine keeps the circuit
        pass

    def _closed(self, seq):
        self.client._loop.call_soon_threadsafe(self.client._stop_choice, seq.request_id,
                                               seq.index)

    def close(self):
        self._stopping = True

    def _run(self):
        import zmq
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.client.api_id.encode())
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.addr)
        while not self._stopping:
            if not sock.poll(200):
                continue
            msgs = []
            while True:
                try:
                    msgs.append(unpack(sock.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
            self.feed(msgs)
        sock.close(0)

    def feed(self, msgs: list) -> None:
        """The records of received ``step`` messages, in order: a prefill notice to its
        request's hook, an error or the rows to ``OutputStage`` (one delivery each)."""
        stage = self.stage
        pending: dict[int, tuple] = {}
        order: list = []
        for _, records in msgs:
            rows, tokens, finishes, hides, lps = [], [], [], [], []
            for rid, index, token, finish, hide, lp, head in records:
                e = self.entries.get(rid)
                if e is None:  # the client left: the engine drops it at its next step
                    continue
                if index == PREFILLED:  # the key pays for the prompt from now on
                    if e.on_prefill is not None:
                        e.on_prefill(token)  # RequestStats.prefilled: one attribute write
                    continue
                if index == FAILED:
                    if token is not None:  # the engine's health: known before the error
                        self.client._loop.call_soon_threadsafe(self.client._note_health,
                                                               *token)
                    stage._process(("fail", [e], decode_error(lp)), pending, order)
                    continue
                s = e.seqs[index]
                if head is not None:
                    s.prompt_len, s.cached_tokens, s.image_tokens, s.video_tokens = head
                rows.append(s)
                tokens.append(token)
                finishes.append(finish)
                hides.append(hide)
                lps.append(lp)
            if rows:
                stage._process(("step", rows, tokens, finishes, hides,
                                _StepLogprobs(lps) if any(lps) else None), pending, order)
        stage._flush(order)

    def open(self, rid: str, request, sink) -> None:
        from server.engine.sequence import Sequence
        p = request.params
        seqs = [Sequence(request_id=rid, index=i, prompt_len=0, params=p,
                         tokenizer=self.detok, eos_ids=set(), sink=None)
                for i in range(p.n)]
        e = _Entry(seqs, sink, request.stream, request.on_prefill)
        for s in seqs:
            s.sink = e
        self.entries[rid] = e


class EngineClient:
    """Implements ``server.engine.interface.Engine`` for one API server."""

    def __init__(self, addr: str, api_id: str):
        import zmq
        import zmq.asyncio
        self._zmq = zmq
        self.addr, self.api_id = addr, api_id
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, api_id.encode())
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        # queue nothing while no engine is there: a hello sent then is dropped (and
        # repeated), not delivered in a heap to the next engine
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(addr)
        self._ids = itertools.count(1)
        self._open: dict[str, asyncio.Queue] = {}  # rid -> its events' queue
        self._calls: dict[int, tuple[asyncio.Future, str]] = {}
        self._ready = asyncio.Event()
        self._info: dict = {}
        self._healthy = False
        self._health_at = 0  # the engine's failed steps when ``_healthy`` was reported
        self._epoch: str | None = None
        self._last_heard = time.monotonic()
        self._pidfd: int | None = None
        self._closed_with: BaseException | None = None
        self.limiter = RemoteLimiter(self)
        self._loop = asyncio.get_running_loop()
        self.output: StepOutput | None = None  # made at the first ready
        self.textprep: TextPrep | None = None  # likewise
        self._tasks = [asyncio.ensure_future(self._receive()),
                       asyncio.ensure_future(self._keepalive())]

    async def wait_ready(self) -> "EngineClient":
        await self._ready.wait()
        return self

    # --- Engine ---------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._info["model_id"]

    @property
    def max_model_len(self) -> int:
        return self._info["max_model_len"]

    @property
    def vocab_size(self) -> int:
        return self._info["vocab_size"]

    @property
    def supports_video(self) -> bool:
        return self._info["supports_video"]

    @property
    def opens_think(self) -> bool:
        return self._info["opens_think"]

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self._healthy

    async def reserve(self, deferred: bool = False) -> _Reservation:
        if deferred:  # the engine takes the place when ``gen`` arrives (res_id None)
            return _Reservation(self, None)
        epoch = self._epoch
        res_id = await self._call("reserve", None)
        return _Reservation(self, res_id, epoch)

    async def generate(self, request: EngineRequest, reservation):
        rid = f"{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        try:
            epoch = self._epoch
            await self._tokenise(request)
            # checked after the await: an engine lost meanwhile has failed the open
            # requests without this one, and its successor knows neither the request
            # nor the place an old engine gave it
            if not self._ready.is_set() or self._epoch != epoch or reservation.stale():
                raise ServiceUnavailable(ENGINE_GONE)
            if self._closed_with is not None:
                raise self._closed_with
        except BaseException:
            reservation.release()
            raise
        wire, frames = encode_request(request)
        self._open[rid] = q
        self.output.open(rid, request, Sink(self._loop, q.put_nowait))
        res_id = reservation.res_id
        reservation.held = False  # the engine holds it now: released there
        self._sock.send_multipart([pack("gen", rid, res_id, wire), *frames], copy=False)
        events = ChoiceEvents(q, request.params.n)
        try:
            async for out in events:
                yield out
        finally:
            self.output.entries.pop(rid, None)
            if self._open.pop(rid, None) is not None and events.left and self._ready.is_set():
                self._send("abort", rid)

    async def image_geometry(self, images):
        wire, frames = encode_request(EngineRequest("geometry", [], images, _params()))
        return await self._call("geometry", wire, frames)

    async def count(self, request: EngineRequest):
        await self._tokenise(request)
        wire, frames = encode_request(request)
        return await self._call("count", wire, frames)

    async def _tokenise(self, request: EngineRequest) -> None:
        """The chat template and the tokens, here rather than in the engine's process
        (``server.textprep``); a long text on a worker thread, off this event loop."""
        if self.textprep is None:
            return
        if text_chars(request) > THREAD_CHARS:
            await asyncio.to_thread(self.textprep.prepare, request)
        else:
            self.textprep.prepare(request)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._call("detokenize", list(token_ids))

    async def refresh_stats(self) -> None:
        """The engine's figures, fetched for a /metrics scrape (``stats`` returns them)."""
        try:
            self._stats = await asyncio.wait_for(self._call("stats", None), 5)
        except (APIError, asyncio.TimeoutError):
            self._stats = {}

    def stats(self) -> dict:
        return dict(getattr(self, "_stats", {}))

    def close_requests(self, exc: BaseException) -> int:
        self._closed_with = exc
        return self._fail_open(exc)

    async def shutdown(self, timeout: float) -> None:
        if self.output is not None:
            self.output.close()
        for t in self._tasks:
            t.cancel()
        if self._pidfd is not None:
            self._unwatch()
        self._ctx.destroy(linger=0)

    # --- transport ------------------------------------------------------------------------
    def _send(self, *fields):
        self._sock.send_multipart([pack(*fields)], copy=False)

    def _stop_choice(self, rid: str, index: int) -> None:
        if self._ready.is_set() and rid in self._open:
            self._send("stop", rid, index)

    def _cast(self, method: str, args) -> None:
        if self._ready.is_set():
            self._send("cast", method, args)

    async def _call(self, method: str, args, frames: list = ()):
        if not self._ready.is_set():
            raise ServiceUnavailable("The engine is not ready; retry shortly.")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (fut, method)
        try:
            self._sock.send_multipart([pack("call", call_id, method, args), *frames],
                                      copy=False)
            return await fut
        finally:
            self._calls.pop(call_id, None)

    async def _keepalive(self):
        """``hello`` until an engine is ready (and again after it restarts); then watch
        for silence."""
        while True:
            if not self._ready.is_set():
                try:
                    await self._sock.send_multipart(
                        [pack("hello", self.api_id, os.getpid())], flags=self._zmq.NOBLOCK)
                except self._zmq.Again:  # no engine yet
                    pass
            elif time.monotonic() - self._last_heard > HEARTBEAT_LOST_S:
                self._lost("the engine sent nothing for %.0f s" % HEARTBEAT_LOST_S)
            await asyncio.sleep(HELLO_EVERY_S)

    async def _receive(self):
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._last_heard = time.monotonic()
            try:
                self._handle(unpack(frames[0].buffer))
            except Exception:
                log.exception("bad message from the engine")

    def _handle(self, msg: list):
        kind = msg[0]
        if kind == "out":
            for rid, item in msg[1]:
                q = self._open.get(rid)
                if q is None:
                    continue  # aborted: the engine learns it at its next message
                if is_error(item):
                    q.put_nowait(decode_error(item))
                else:
                    q.put_nowait(decode_outputs(item))
        elif kind == "reply":
            _, call_id, ok, value = msg
            entry = self._calls.get(call_id)
            if entry is not None and not entry[0].done():
                fut, method = entry
                if ok:
                    fut.set_result(decode_result(method, value))
                else:
                    fut.set_exception(decode_error(value))
        elif kind == "hb":
            if msg[3] == self._epoch:
                self._note_health(msg[1], msg[2])
            if msg[3] != self._epoch and self._ready.is_set():
                self._lost("the engine restarted")
        elif kind == "ready":
            self._ready_from(msg[1])

    def _note_health(self, healthy: bool, failed_steps: int, epoch: str | None = None):
        """On the loop: the engine's health, from a heartbeat or with a failed step's
        errors (``proc.health``); a report older than the one held, or from an engine
        that has since restarted (``epoch``), is ignored."""
        if epoch is not None and epoch != self._epoch:
            return
        if failed_steps >= self._health_at:
            self._healthy, self._health_at = bool(healthy), failed_steps

    def _ready_from(self, info: dict):
        if self._ready.is_set() and info["epoch"] == self._epoch:
            return
        self._info, self._epoch, self._healthy = info, info["epoch"], True
        self._health_at = 0
        if self.output is None:
            self.output = StepOutput(self, self.addr + "-out", info["tokenizer"])
            self.textprep = TextPrep.from_info(info)
        self._watch(info["pid"])
        self._ready.set()
        log.info("engine ready (pid %d)", info["pid"])

    def _watch(self, pid: int):
        if self._pidfd is not None:
            self._unwatch()
        self._pidfd = pid_watch(asyncio.get_running_loop(), pid,
                                lambda: self._lost(f"the engine (pid {pid}) exited",
                                                   watched=True))

    def _unwatch(self):
        try:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
        except (OSError, RuntimeError):
            pass
        self._pidfd = None

    def _lost(self, why: str, watched: bool = False):
        """The engine is gone: answer everything open now, wait for the next one."""
        if not self._ready.is_set():
            return
        if watched:
            self._pidfd = None  # closed by pid_watch
        elif self._pidfd is not None:
            self._unwatch()
        self._ready.clear()
        self._healthy = False
        n = self._fail_open(ServiceUnavailable(ENGINE_GONE))
        log.error("%s: %d open request(s) answered with 503; waiting for it to come back",
                  why, n)

    def _fail_open(self, exc: BaseException) -> int:
        n = len(self._open)
        for q in list(self._open.values()):
            q.put_nowait(exc)
        for fut, _ in list(self._calls.values()):
            if not fut.done():
                fut.set_exception(ServiceUnavailable(ENGINE_GONE))
        return n


def _params():
    from server.engine.interface import SamplingParams
    return SamplingParams()
