"""The engine-core process: the model, the scheduler, the KV pool, sampling, grammar
masks and the per-key fair queue, behind a ZeroMQ socket (``server.messages``), with no
HTTP in it.  Started by the supervisor (``server.supervisor``); the API-server processes
(``server.api.api_server``) reach it through ``server.api.engine_client.EngineClient``.

Threads: the model thread of ``AsyncEngine``, which also sends each step's rows to the
API servers itself (``RemoteOutput``: one ``step`` message per API server per step, no
text here), the preparation threads (template, tokens, image pixels), and this module's
event loop on the main thread, which only moves messages: requests in; replies, errors
before a request reaches the batch and the sequential scheduler's events out (``_post``
batches them by API server and flushes once per loop turn).

State that holds across API servers lives here: the queue places (``reserve``), the
per-key limits (``server.ratelimit.Limiter``: ``admit``/``finish``), the fair queue,
and every cache (prefix blocks, image pixels, encoder outputs, grammars), salted per
tenant as before.

Lifetime: SIGTERM and SIGINT are ignored (a group signal drains the API servers first);
SIGUSR1 stops the engine and exits 0.  The process dies with its supervisor
(``server.lifecycle.die_with_parent``).  A model that fails to load logs one line and exits 1.  An API
server that dies (its pid is watched from its ``hello``) has its requests aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import logging
import os
import signal
import sys
import threading
import time
from functools import partial

from server.engine.interface import NoReservation
from server.lifecycle import die_with_parent, exit_for_restart, name_process, pid_watch

log = logging.getLogger("qwen_vl.engine")

EXIT_LOAD_FAILED = 1
SWITCH_INTERVAL_S = 0.0005
UNSENT_RETRY_S = 0.02  # a step for an API server not connected yet is retried this often ...
UNSENT_DROP_S = 10.0   # ... and dropped after this long (that API server is gone)


class RemoteSink:
    """A request's sink in the engine-core process: where its events go (an API server and
    its request id).  Called with ``Output`` lists or an error (the sequential scheduler,
    queue timeouts), it posts them through the event loop; the batching scheduler's steps
    bypass it (``RemoteOutput``)."""

    def __init__(self, loop, post, ident: bytes, rid: str):
        self.loop, self.post, self.ident, self.rid = loop, post, ident, rid

    def __call__(self, item):
        self.loop.call_soon_threadsafe(self.post, item)


def health(engine) -> list:
    """``[healthy, failed_steps]``: the count read first, so a failure between the two
    reads can only pair a newer state with an older count, never the reverse (an API
    server keeps the state of the highest count it has seen)."""
    failed = engine.failed_steps
    return [engine.healthy, failed]


class RemoteOutput:
    """The engine-core process's output stage (``AsyncEngine(output=...)``): no text here.
    Each step's rows go raw to the API server of their request (``server.messages``
    ``step``): per row ``[rid, choice, token, finish, hide, logprob row, header]`` (the
    logprob row is the step's host copy, ``sampler.LogprobRows``; the header, on a row's
    first token only, is its prompt, cached, image and video token counts).  The API
    server's ``OutputStage`` detokenises, applies stop strings and writes logprob JSON.

    The model thread sends them itself, one message per API server per step, on the
    ROUTER socket the API servers read steps from (bound here at start, used by the model
    thread only): so a step never waits for the event loop, and there is no hand-over to
    a thread of its own (which cost a GIL switch per step: 6-9% of the greedy tokens/s
    on the 2-core box, measured).  Records for an API server not connected yet (just
    started, or the engine just restarted) are kept, retried with the next step or
    ``tick`` (the model thread ticks every ``UNSENT_RETRY_S`` while some wait) and
    dropped after ``UNSENT_DROP_S``.  Any other failure to send ends the process, for
    the supervisor to restart it: no step would reach an API server again, and every
    open request would wait forever."""

    def __init__(self, addr: str, epoch: str | None = None):
        self.addr, self.epoch = addr, epoch
        self._sock = None
        self._unsent: dict[bytes, tuple[float, list]] = {}  # ident -> (since, records)

    def __call__(self, engine) -> "RemoteOutput":  # AsyncEngine's output factory
        import zmq
        self._engine = engine
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        # an API server whose step socket is not connected yet raises instead of losing
        # the step: kept and retried
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the request socket's
        sock.bind(self.addr)
        self._sock = sock
        return self

    # --- the model thread ----------------------------------------------------------------
    def put_step(self, rows, tokens: list[int], finishes: list, hides: list[bool], lps):
        self._send([("step", rows, tokens, finishes, hides, lps)])

    def put_fail(self, entries, err):
        # the engine's health as this failure left it (``health``), read after the failure
        # was counted: it travels with the errors, so an API server answering them already
        # knows whether /health is now 503 (of this engine: its ``epoch``)
        self._send([("fail", entries, err, [*health(self._engine), self.epoch])])

    def put_prefill(self, ident: bytes, rid: str, tokens: int):
        """``rid``'s prefill was scheduled (``on_prefill``): a record on the step channel,
        not a trip through the event loop."""
        self._send([("prefill", ident, rid, tokens)])

    def tick(self) -> float | None:
        """The model thread, once per loop: retry what waits; how soon to come back."""
        if not self._unsent:
            return None
        self._send([])
        return UNSENT_RETRY_S if self._unsent else None

    def stop(self):
        """After the model thread (its only user): one still running (a join that timed
        out) keeps the socket, which the process's exit closes."""
        thread = getattr(getattr(self, "_engine", None), "_thread", None)
        if thread is not None and thread.is_alive():
            return
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(0)

    def _send(self, items):
        try:
            self._send_records(self._records(items))
        except BaseException:
            exit_for_restart("sending the engine's steps", log)

    def _send_records(self, out: dict[bytes, list]):
        import zmq
        sock = self._sock
        if sock is None:  # stopped
            return
        now = time.monotonic()
        for ident, (since, records) in list(self._unsent.items()):
            out.setdefault(ident, [])[:0] = records  # first: they are older
        unsent, self._unsent = self._unsent, {}
        for ident, records in out.items():
            try:
                sock.send_multipart([ident, pack_step(records)], copy=False)
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:  # not "not connected (yet, or any more)"
                    raise
                since = unsent.get(ident, (now, None))[0]
                if now - since < UNSENT_DROP_S:
                    self._unsent[ident] = (since, records)
                else:
                    log.warning("dropping %d step record(s) for API server %r: not "
                                "connected for %.0f s", len(records), ident, UNSENT_DROP_S)

    @staticmethod
    def _records(items) -> dict[bytes, list]:
        from server.messages import FAILED, PREFILLED, encode_error
        out: dict[bytes, list] = {}
        for item in items:
            if item[0] == "prefill":
                _, ident, rid, tokens = item
                out.setdefault(ident, []).append([rid, PREFILLED, tokens, None, None, None, None])
                continue
            if item[0] == "fail":
                _, entries, err, *state = item
                for e in entries:
                    for s in e.seqs:
                        s.stopped = True
                    out.setdefault(e.sink.ident, []).append(
                        [e.sink.rid, FAILED, state[0] if state else None, None, None,
                         encode_error(err), None])
                continue
            _, rows, tokens, finishes, hides, lps = item
            for i, s in enumerate(rows):
                if s.stopped:  # aborted, or closed by a stop string: nobody reads it
                    continue
                sink = s.sink.sink
                lp = [lps.k, lps.host[i]] if lps is not None and s.params.logprobs else None
                head = None
                if not s.announced:
                    s.announced = True
                    head = [s.prompt_len, s.cached_tokens, s.image_tokens, s.video_tokens]
                out.setdefault(sink.ident, []).append(
                    [sink.rid, s.index, tokens[i], finishes[i], hides[i], lp, head])
        return out


def pack_step(records: list) -> bytes:
    from server.messages import pack
    return pack("step", records)


class _Req:
    """A request of an API server: its preparation task, queue place, engine id and the
    choices still running."""

    def __init__(self, task, reservation, uid: str):
        self.task, self.reservation, self.uid = task, reservation, uid

    def finished(self) -> bool:
        """Every choice ended (the model's finish, a stop string, or a failure)."""
        t = self.task
        if not t.done() or t.cancelled() or t.exception() is not None:
            return False
        seqs = t.result().seqs
        return bool(seqs) and all(s.finished for s in seqs)


class _Api:
    """One API server as the engine knows it."""

    def __init__(self, ident: bytes, pid: int):
        self.ident, self.pid = ident, pid
        self.requests: dict[str, _Req] = {}
        self.outbox: list = []
        self.watch: int | None = None


class EngineCore:
    def __init__(self, settings, addr: str, ready=None):
        self.settings, self.addr, self.ready = settings, addr, ready
        self.engine = None
        self.epoch = f"{os.getpid()}-{time.time_ns()}"
        self.apis: dict[bytes, _Api] = {}
        self.reservations: dict[int, object] = {}
        self.tickets: dict[int, object] = {}
        # queue places' and tickets' ids: from a random start, so that an id an API server
        # got from an engine that has since restarted is no other request's here
        self._ids = itertools.count(random.SystemRandom().randrange(1 << 52))
        self._flush_pending = False
        self._stop = asyncio.Event()
        from server.ratelimit import Limiter
        self.limiter = Limiter()

    # --- lifetime ------------------------------------------------------------------------
    async def run(self) -> int:
        import zmq
        import zmq.asyncio
        from server.startup import engine_factory
        from server.load_errors import describe_load_error
        self.loop = asyncio.get_running_loop()
        self.loop.add_signal_handler(signal.SIGUSR1, self._stop.set)
        ctx = zmq.asyncio.Context()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop a message for a slow API server
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a restarted API server reconnects under its old identity: it takes it over (the
        # dead one's connection may not be gone yet; ZeroMQ would ignore the new one)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(self.addr)
        receiver = asyncio.create_task(self._receive())
        try:
            self.output = RemoteOutput(self.addr + "-out", self.epoch)
            self.engine = await asyncio.to_thread(engine_factory(self.settings,
                                                                 output=self.output))
        except Exception as e:
            log.debug("model load traceback", exc_info=True)
            log.error("model failed to load: %s", describe_load_error(e, self.settings.model_path))
            return EXIT_LOAD_FAILED
        log.info("engine core ready (pid %d): serving %s", os.getpid(), self.engine.model_id)
        if self.ready is not None:  # the supervisor's pipe
            self.ready.send_bytes(b"ready")
            self.ready.close()
        for api in self.apis.values():
            self._send(api.ident, "ready", self._info())
        beat = asyncio.create_task(self._heartbeat())
        await self._stop.wait()
        beat.cancel()
        receiver.cancel()
        await self.engine.shutdown(self.settings.shutdown_timeout)
        ctx.destroy(linger=0)
        return 0

    def _info(self) -> dict:
        e = self.engine
        return {"model_id": e.model_id, "max_model_len": e.max_model_len,
                "vocab_size": e.vocab_size, "supports_video": e.supports_video,
                "opens_think": bool(getattr(e, "opens_think", False)),
                "pid": os.getpid(), "epoch": self.epoch,
                "tokenizer": e.detok.to_str(), **e.builder.template_spec()}

    async def _heartbeat(self):
        from server.messages import HEARTBEAT_S
        while True:
            state = health(self.engine)
            for api in self.apis.values():
                self._send(api.ident, "hb", *state, self.epoch)
            self._sweep()
            await asyncio.sleep(HEARTBEAT_S)

    # --- sending -------------------------------------------------------------------------
    def _send(self, ident: bytes, *fields):
        from server.messages import pack
        self.sock.send_multipart([ident, pack(*fields)], copy=False)

    def _post(self, api: _Api, rid: str, item):
        """On the loop: one event item (``Sink``) for ``rid``; sent with the others of this
        loop turn in one ``out`` message (``_flush``)."""
        from server.messages import encode_error, encode_outputs
        if isinstance(item, BaseException):
            api.requests.pop(rid, None)
            wire = encode_error(item)
        else:
            wire = encode_outputs(item)
        api.outbox.append([rid, wire])
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self):
        self._flush_pending = False
        for api in self.apis.values():
            if api.outbox:
                self._send(api.ident, "out", api.outbox)
                api.outbox = []

    # --- receiving -----------------------------------------------------------------------
    async def _receive(self):
        from server.messages import unpack
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            ident, msg, extra = frames[0].bytes, unpack(frames[1].buffer), frames[2:]
            try:
                self._dispatch(ident, msg, extra)
            except Exception:  # a malformed message must not stop the engine
                log.exception("bad message from API server %r", ident)

    def _dispatch(self, ident: bytes, msg: list, extra: list):
        kind = msg[0]
        if kind == "hello":
            self._hello(ident, msg[2])
            return
        api = self.apis.get(ident)
        if api is None:  # an API server that has not said hello to this engine yet
            return
        if kind == "gen":
            self._generate(api, msg[1], msg[2], msg[3], extra)
        elif kind == "abort":
            self._abort(api, msg[1])
        elif kind == "stop":
            self._stop_choice(api, msg[1], msg[2])
        elif kind == "call":
            asyncio.ensure_future(self._call(api, msg[1], msg[2], msg[3], extra))
        elif kind == "cast":
            self._cast(msg[1], msg[2])

    def _hello(self, ident: bytes, pid: int):
        old = self.apis.get(ident)
        if old is not None and old.pid == pid:
            if self.engine is not None:
                self._send(ident, "ready", self._info())
            return
        if old is not None:
            self._api_gone(old)
        api = self.apis[ident] = _Api(ident, pid)
        api.watch = pid_watch(self.loop, pid, partial(self._api_died, api))
        log.info("API server %s (pid %d) connected", ident.decode(), pid)
        if self.engine is not None:
            self._send(ident, "ready", self._info())

    def _api_died(self, api: _Api):
        log.warning("API server %s (pid %d) exited: aborting its %d request(s)",
                    api.ident.decode(), api.pid, len(api.requests))
        if self.apis.get(api.ident) is api:
            del self.apis[api.ident]
        self._api_gone(api)

    def _api_gone(self, api: _Api):
        for rid in list(api.requests):
            self._abort(api, rid)

    # --- requests ------------------------------------------------------------------------
    def _generate(self, api: _Api, rid: str, res_id: int, wire: dict, frames: list):
        from server.messages import decode_request
        uid = f"{api.ident.decode()}/{rid}"
        try:
            # a deferred place (res_id None) is taken now: a full queue answers 429 here
            reservation = (self.engine.reserve() if res_id is None
                           else self.reservations.pop(res_id, None) or NoReservation())
        except Exception as exc:
            self._post(api, rid, exc)
            return
        try:
            req = decode_request(wire, frames)
        except Exception as exc:
            reservation.release()
            log.exception("undecodable request")
            self._post(api, rid, exc)
            return
        req.request_id = uid
        post = partial(self._post, api, rid)
        req.on_prefill = partial(self._prefilled, api.ident, rid,
                                 self.tickets.get(req.ticket) if req.ticket is not None
                                 else None)
        sink = RemoteSink(self.loop, post, api.ident, rid)
        task = asyncio.ensure_future(self.engine.submit(req, reservation, sink))
        api.requests[rid] = _Req(task, reservation, uid)

        def submitted(t):
            if t.cancelled():
                return
            if t.exception() is not None:
                self._post(api, rid, t.exception())
        task.add_done_callback(submitted)

    def _prefilled(self, ident: bytes, rid: str, ticket, tokens: int):
        """Model thread: ``rid``'s prefill is scheduled.  Noted on the key's ticket here
        (the least it is charged: the client may leave before its API server reads the
        notice, and the ticket is finished from there) and sent with the step records."""
        if ticket is not None:
            ticket.prefilled = max(ticket.prefilled, tokens)
        self.output.put_prefill(ident, rid, tokens)

    def _stop_choice(self, api: _Api, rid: str, index: int):
        """A stop string closed choice ``index`` (seen by the API server): its row leaves
        the batch at the next step."""
        r = api.requests.get(rid)
        if r is not None and r.task.done() and not r.task.cancelled() \
                and r.task.exception() is None:
            seqs = r.task.result().seqs
            if 0 <= index < len(seqs):
                seqs[index].stopped = True

    def _sweep(self):
        """Forget requests whose choices have all ended (their last events are sent)."""
        for api in self.apis.values():
            for rid in [rid for rid, r in api.requests.items() if r.finished()]:
                del api.requests[rid]

    def _abort(self, api: _Api, rid: str):
        r = api.requests.pop(rid, None)
        if r is None:
            return
        if not r.task.done():
            r.task.cancel()  # still preparing (template, grammar, pixels): stop that work
        r.reservation.release()
        self.engine.abort(r.uid)

    # --- calls ---------------------------------------------------------------------------
    async def _call(self, api: _Api, call_id: int, method: str, args, frames: list):
        from server.messages import decode_request, encode_error, encode_result
        try:
            if method == "reserve":
                res_id = next(self._ids)
                self.reservations[res_id] = self.engine.reserve()
                value = res_id
            elif method == "count":
                value = await self.engine.count(decode_request(args, frames))
            elif method == "geometry":
                req = decode_request(args, frames)
                value = self.engine.image_geometry(req.images)
            elif method == "detokenize":
                value = await self.engine.detokenize(args)
            elif method == "stats":
                value = {**self.engine.stats(), "engine_healthy": int(self.engine.healthy)}
            elif method == "admit":
                value = self._admit(*args)
            else:
                raise ValueError(f"unknown call {method!r}")
            self._send(api.ident, "reply", call_id, True, encode_result(method, value))
        except Exception as exc:
            if not hasattr(exc, "envelope"):
                log.exception("call %s failed", method)
            self._send(api.ident, "reply", call_id, False, encode_error(exc))

    def _admit(self, name: str, limits: list, cost: int, seqs: int) -> int:
        from server.keys import ApiKey, KeyLimits
        key = ApiKey(name, b"", KeyLimits(*limits))
        ticket = self.limiter.admit(key, cost, seqs=seqs)
        tid = next(self._ids)
        self.tickets[tid] = ticket
        return tid

    def _cast(self, method: str, args):
        if method == "release":
            r = self.reservations.pop(args, None)
            if r is not None:
                r.release()
        elif method == "finish":
            tid, tokens = args
            t = self.tickets.pop(tid, None)
            if t is not None:
                t.finish(tokens)


def main(argv: list[str], addr: str, ready, parent_pid: int) -> None:
    """The process's entry point (``multiprocessing`` spawn target)."""
    die_with_parent(parent_pid)
    name_process("qwen-vl-engine")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from server.config_errors import load_or_exit
    from server.logs import setup_logging
    settings = load_or_exit(argv)
    setup_logging(settings.log_level, settings.log_format)
    # the model thread holds the GIL between its torch calls; every other thread here
    # (a request arriving, its template and tokens, a step going out) waits for it up to
    # the switch interval, 5 ms by default, several times per request: measured on the
    # 2-core box, that wait cost a quarter of the batch (47 rows per step instead of 61)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # the weight-loading progress bar (tqdm) would make a multiprocessing lock: a named
    # semaphore this process, which ends with os._exit, never unlinks (the supervisor's
    # resource tracker then warns of a leak at shutdown); a thread lock does the job here
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    code = asyncio.run(EngineCore(settings, addr, ready).run())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
