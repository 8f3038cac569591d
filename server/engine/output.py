"""The output stage: turns sampled token ids into ``Output`` events, off the model thread.

Contract:

* The model thread hands over one item per step (``put_step``: the rows, their token ids,
  the finish reasons the ids decide, and the host copy of the logprob data) or a failure
  (``put_fail``: entries and the error to send them).  Items are processed in order.
* The output thread detokenises, applies stop strings (``Sequence.emit``) and writes the
  logprob entries' JSON (the step's rows at once, ``server.logprob_json.LogprobJSON``: a
  token's logprobs travel as one str, which the serving layer joins), then delivers
  everything it has processed with one ``call_soon_threadsafe`` per event loop (not one
  per request): it drains the queue first, so a slow consumer gets several steps per
  wake-up.
* A non-streamed request (``EngineRequest.stream`` False) is read whole: its first
  events go at once (time to first token, errors before any byte), then they are held
  and delivered merged when a choice finishes, or every ``HOLD_S`` seconds (the key's
  token count stays about current): a couple of deliveries per request instead of one
  per step (vLLM's ``FINAL_ONLY`` output kind).
* A failure while producing one request's events fails that request only (its rows are
  marked stopped, so the model thread drops them at its next step) and counts toward the
  engine's health circuit.  Fault injection: stage ``output``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from server.engine.interface import Output, coalesce
from server.errors import APIError, InternalError

log = logging.getLogger("qwen_vl.engine")

HOLD_S = 0.5  # a non-streamed request's events are delivered at least this often


class Sink:
    """Where one request's events go: an ``asyncio.Queue`` on its event loop."""

    def __init__(self, loop, put):
        self.loop, self.put = loop, put

    def __call__(self, item):  # one item from any thread (the sequential scheduler)
        self.loop.call_soon_threadsafe(self.put, item)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values (used by byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The token's raw bytes: Qwen's byte-level BPE spells each byte as one character of
    GPT-2's byte alphabet, so a token holding half a character still has its real bytes
    here (its decoded text would only be U+FFFD)."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return []
    try:
        return [_BYTE_OF_CHAR[ch] for ch in piece]
    except KeyError:  # an added/special token is stored as plain text
        return list(piece.encode())


class _TokenCache(dict):
    """A token's text and bytes by id, decoded once per server (logprobs ask for the same
    few thousand tokens over and over); a hit is a plain dict lookup."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def __missing__(self, token: int) -> tuple[str, list[int]]:
        hit = self[token] = (self.engine.token_text(token), self.engine.token_bytes(token))
        return hit


class _Row:
    """Row ``i`` of a step's ``LogprobRows`` as a one-row ``LogprobRows``."""

    def __init__(self, lps, i):
        self.lps, self.i = lps, i

    def entry(self, _, k):
        return self.lps.entry(self.i, k)


def _release(entry, events: list[Output]) -> list[Output] | None:
    """What of ``events`` goes to the request now: all of it when it streams; otherwise
    the first events, then the held ones merged when a choice finishes or ``HOLD_S``
    passed since the last delivery (None: keep holding)."""
    if entry.stream:
        return events
    entry.held += events
    now = time.monotonic()
    if entry.held_at is not None and now - entry.held_at < HOLD_S \
            and not any(o.finish_reason for o in events):
        return None
    out, entry.held, entry.held_at = coalesce(entry.held), [], now
    return out


def _deliver(pairs):
    for sink, item in pairs:
        sink.put(item)


class OutputStage:
    """``on_closed(seq)``, when given, is called (on the output thread) for each choice a
    stop string closed: the engine-core process's model thread cannot read ``stopped``
    from another process, so the API server tells it (``EngineClient``)."""

    def __init__(self, engine, on_closed=None, *, thread: bool = True):
        self.engine, self.on_closed = engine, on_closed
        self._tokens = _TokenCache(engine)  # id -> (text, bytes), this thread
        self._json_writer = None             # per-id JSON fragments, this thread
        if thread:  # else the caller's own thread feeds ``_process`` and ``_flush``
            self._q: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="engine-output",
                                            daemon=True)
            self._thread.start()

    # --- model thread ----------------------------------------------------------------
    def _logprob_json(self):
        """The logprobs' JSON writer, imported on first use: the engine itself runs
        without pydantic (``bench.gpu_check`` on a GPU image without it)."""
        if self._json_writer is None:
            from server.logprob_json import LogprobJSON
            self._json_writer = LogprobJSON()
        return self._json_writer

    def put_step(self, rows, tokens: list[int], finishes: list, hides: list[bool], lps):
        self._q.put(("step", rows, tokens, finishes, hides, lps))

    def put_fail(self, entries, err: APIError):
        self._q.put(("fail", entries, err))

    def tick(self) -> float | None:
        """Called by the model thread once per loop; nothing to do here (see
        ``server.engine.proc.RemoteOutput.tick``)."""
        return None

    def stop(self):
        self._q.put(None)

    # --- output thread ---------------------------------------------------------------
    def _run(self):
        while True:
            items = [self._q.get()]
            while True:  # take everything that is waiting: one wake-up for all of it
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            pending: dict[int, tuple] = {}  # id(sink) -> (sink, item)
            order: list = []
            for item in items:
                if item is None:
                    self._flush(order)
                    return
                self._process(item, pending, order)
            self._flush(order)

    def _process(self, item, pending, order):
        def send(sink, thing):
            if isinstance(thing, list):  # events accumulate per request across steps
                if id(sink) in pending and isinstance(pending[id(sink)][1], list):
                    pending[id(sink)][1].extend(thing)
                    return
                pending[id(sink)] = (sink, thing)
            order.append((sink, thing))

        if item[0] == "fail":
            _, entries, err = item
            for e in entries:
                for s in e.seqs:
                    s.stopped = True
                pending.pop(id(e.sink), None)
                e.held = []
                send(e.sink, err)
            return
        _, rows, tokens, finishes, hides, lps = item
        written = self._write_logprobs(rows, tokens, lps) if lps is not None else None
        outs: dict[int, tuple] = {}  # id(entry) -> (entry, events, or None once it failed)
        for i, s in enumerate(rows):
            entry = s.sink
            if id(entry) in outs and outs[id(entry)][1] is None:
                continue  # this request already failed in this step
            try:
                self.engine.faults.tick("output")
                lp = None
                if written is not None and s.params.logprobs:
                    lp = written[i]
                    if lp is None:  # the step's batch write failed (or the row is
                        # closed, and emit drops it): this row alone
                        lp = self._write_logprobs([s], [tokens[i]], _Row(lps, i))[0]
                o = s.emit(tokens[i], lp, finishes[i], hides[i])
                if self.on_closed is not None and s.stopped and not finishes[i] \
                        and o is not None and o.finish_reason == "stop":
                    self.on_closed(s)
            except Exception as exc:  # this request only
                log.exception("output stage failed", exc_info=exc)
                self.engine._note_failure()
                outs[id(entry)] = (entry, None)
                for r in entry.seqs:
                    r.stopped = True
                continue
            if o is not None:
                outs.setdefault(id(entry), (entry, []))[1].append(o)
        for entry, events in outs.values():
            if events is None:
                entry.held = []
                entry.reservation.release()
                send(entry.sink, InternalError("The model failed on this request."))
            elif events:
                events = _release(entry, events)
                if events:
                    send(entry.sink, events)

    def _write_logprobs(self, rows, tokens, lps) -> list[str | None]:
        """Per row the JSON of its token's logprob entry (None: no logprobs asked for, or
        the write failed; ``lps`` is the step's ``sampler.LogprobRows``)."""
        items, at = [], []
        for i, s in enumerate(rows):
            p = s.params
            if p.logprobs and not s.finish_reason and not s.stopped:
                lp, ids, vals = lps.entry(i, p.top_logprobs)
                items.append((tokens[i], lp, ids, vals))
                at.append(i)
        written: list[str | None] = [None] * len(rows)
        if len(rows) > 1:
            try:
                out = self._logprob_json().write(items, self._tokens.__getitem__)
            except Exception:  # retried row by row, so that it fails its request only
                log.debug("batched logprob write failed", exc_info=True)
                return written
        else:
            out = self._logprob_json().write(items, self._tokens.__getitem__)
        for i, w in zip(at, out):
            written[i] = w
        return written

    @staticmethod
    def _flush(order):
        by_loop: dict[int, list] = {}
        for sink, thing in order:
            by_loop.setdefault(id(sink.loop), [sink.loop, []])[1].append((sink, thing))
        for loop, pairs in by_loop.values():
            try:
                loop.call_soon_threadsafe(_deliver, pairs)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass
        order.clear()
