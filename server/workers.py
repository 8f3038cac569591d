"""Worker processes that can be abandoned: a small pool for work that may run long and
cannot be interrupted (grammar compilation, image decoding).

Contract
--------
``pool = ProcessPool(name, size, init=fn, initargs=(...))`` starts ``size`` worker
processes (forked from a clean fork server, never from this threaded process); each runs
``init(*initargs)`` once.  ``await pool.run(fn, *args, timeout=s, big=False)`` runs the
module-level function ``fn(*args)`` in a free worker and returns its result or re-raises
its exception (pickled across).

* The time budget counts from the moment a worker takes the job: waiting in the queue is
  free.  When it runs out the worker is killed, a fresh one is started in its place and
  ``run`` raises ``TimeoutError``.
* When the awaiting task is cancelled (the client left), a queued job is dropped and a
  running one is killed the same way: abandoned work never keeps a worker.
* Jobs marked ``big`` may use at most ``size - 1`` workers, so that one worker is always
  left for small jobs (a few huge images cannot make every small one wait).
* Queued jobs are taken in turns by their ``turn`` (the API key): a free worker takes the
  oldest job of the turn served longest ago, so one key's six slow jobs make another
  key's job wait for at most one of them per worker, not for all six.
* ``close()`` kills every worker: shutdown never waits for them.
* Workers and their fork server ignore SIGTERM (``server.worker_signals``): a SIGTERM to
  the whole process group (systemd, ``docker stop``, Ctrl-C's cousin ``kill -- -PGID``)
  leaves them to the server, which drains and then kills them; a worker that dies while
  the server still needs it is replaced.  They end by themselves when the server dies
  (their pipe closes).

All methods are called on the event loop; results are read with ``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("qwen_vl.workers")

_CTX = None


class WorkerDied(RuntimeError):
    """The worker process ended while it ran the job (killed from outside, out of memory)."""


def _context():
    """The fork-server context: workers fork from one single-threaded process that has
    imported their modules once (a fresh worker is ready in milliseconds, not the seconds
    an import of xgrammar and torch takes; and no fork of this threaded process)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["server.worker_signals", "PIL.Image", "server.api.media",
                                     "models.video", "av", "xgrammar", "server.engine.structured"])
    return _CTX


# A photo (a ~0.6 MB JPEG in, ~0.8 MB of pixels back) crosses in one write, not in ~200 KB
# turns that each wait for a busy reader: measured with both cores busy (two spinning
# processes), 630 KB out and 786 KB back per job, 4 rounds each: the default socket pair
# 2.7-5.0 ms per job and 1.4-2.0 ms of the server's CPU, 4 MB buffers 2.2-4.1 ms and
# 1.2-1.7 ms (1 MB pipes: 2.5-3.9 ms, 1.6-2.3 ms).  The kernel caps the size at
# net.core.wmem_max / rmem_max (Linux's default ~200 KB still doubles the default buffer).
SOCKET_BYTES = 4 << 20


def _grow_buffers(*conns) -> None:
    """Ask for ``SOCKET_BYTES`` send and receive buffers on each connection's socket."""
    for conn in conns:
        try:
            sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)  # a dup
        except OSError:  # not a socket (another platform's Pipe): left as it is
            continue
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BYTES)
        except OSError:  # refused outright (the usual answer is a silent cap)
            pass
        finally:
            sock.close()


def _worker_main(conn, init, initargs):
    if init is not None:
        init(*initargs)
    conn.send(("ready", None))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # the server is gone or stopping
            return
        try:
            result = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            result = ("err", exc)
        try:
            conn.send(result)
        except Exception as exc:  # an unpicklable result or exception
            conn.send(("err", RuntimeError(f"worker could not return its result: {exc!r}")))


@dataclass
class _Job:
    fn: Callable
    args: tuple
    timeout: float | None
    big: bool
    future: asyncio.Future
    turn: str = ""
    worker: "_Worker | None" = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    job: _Job | None = None


class ProcessPool:
    def __init__(self, name: str, size: int, *, init: Callable | None = None,
                 initargs: tuple = ()):
        self.name, self.size = name, max(1, size)
        self._init, self._initargs = init, initargs
        self._workers: list[_Worker] = []
        self._queue: deque[_Job] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._start_lock = threading.Lock()
        self.killed = 0  # workers killed for a timeout or a cancelled job (tests read it)
        self._served: dict[str, int] = {}  # turn -> when it last got a worker (a serial)
        self._serial = 0

    # --- public ------------------------------------------------------------------------
    async def run(self, fn: Callable, *args, timeout: float | None = None,
                  big: bool = False, turn: str = ""):
        if self._closed:
            raise RuntimeError(f"{self.name} pool is closed")
        self._start()
        job = _Job(fn, args, timeout, big, self._loop.create_future(), turn)
        self._queue.append(job)
        self._dispatch()
        try:
            return await job.future
        except asyncio.CancelledError:
            w = job.worker
            if w is not None and w.job is job:  # running: kill it, its result is no use
                self._replace(w, "client left")
            elif job in self._queue:
                self._queue.remove(job)
            raise

    def start(self) -> None:
        """Start the workers now, from any thread (they then warm up while nobody waits);
        ``run`` also does it lazily.  The first start of any pool boots the fork server,
        which imports the workers' modules: seconds, so call it off the event loop."""
        with self._start_lock:
            while not self._closed and len(self._workers) < self.size:
                self._workers.append(self._spawn())

    def close(self) -> None:
        """Kill every worker; jobs running or queued fail (nobody is left waiting)."""
        self._closed = True
        jobs = [w.job for w in self._workers if w.job is not None] + list(self._queue)
        for w in list(self._workers):
            self._kill(w)
        self._workers.clear()
        self._queue.clear()
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
            if not job.future.done():
                job.future.set_exception(WorkerDied(f"{self.name} pool closed"))

    @property
    def busy(self) -> int:
        return sum(w.job is not None for w in self._workers)

    # --- workers -----------------------------------------------------------------------
    def _start(self):
        if self._loop is None:  # workers started before the loop: watch them from now on
            with self._start_lock:
                self._loop = asyncio.get_running_loop()
                for w in self._workers:
                    self._watch(w)
        self.start()

    def _spawn(self) -> _Worker:
        ctx = _context()
        parent, child = ctx.Pipe()
        _grow_buffers(parent, child)
        proc = ctx.Process(target=_worker_main, args=(child, self._init, self._initargs),
                           name=f"{self.name}-worker", daemon=True)
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        if self._loop is not None:
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                self._watch(w)
            else:
                self._loop.call_soon_threadsafe(self._watch, w)
        return w

    def _watch(self, w: _Worker):
        self._loop.add_reader(w.conn.fileno(), self._on_readable, w)
        # uvloop makes a watched fd non-blocking; a result larger than the pipe buffer
        # must be read whole once its first byte is there (the worker is writing it)
        os.set_blocking(w.conn.fileno(), True)

    def _kill(self, w: _Worker):
        try:
            if self._loop is not None:
                self._loop.remove_reader(w.conn.fileno())
        except Exception:
            pass
        try:
            w.proc.kill()
            w.proc.join(0.2)
        except Exception:
            pass
        w.conn.close()

    def _replace(self, w: _Worker, why: str):
        """Kill ``w`` (abandoning its job) and start a fresh worker in its place."""
        self.killed += 1
        log.warning("%s worker killed (%s); starting a fresh one", self.name, why)
        job = w.job
        w.job = None
        if job is not None and job.timer is not None:
            job.timer.cancel()
        self._kill(w)
        if w in self._workers:
            self._workers.remove(w)
        if not self._closed:
            self._workers.append(self._spawn())
        self._dispatch()

    def _on_readable(self, w: _Worker):
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError) as exc:  # the worker died (e.g. killed for memory)
            job = w.job
            self._replace(w, f"died, exit code {w.proc.exitcode}, {exc!r}")
            if job is not None and not job.future.done():
                job.future.set_exception(WorkerDied(f"{self.name} worker died"))
            return
        if kind == "ready":
            w.ready = True
        else:
            job, w.job = w.job, None
            if job is not None:
                if job.timer is not None:
                    job.timer.cancel()
                if not job.future.done():
                    if kind == "ok":
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)
        self._dispatch()

    def _on_timeout(self, job: _Job):
        w = job.worker
        if w is None or w.job is not job:
            return
        self._replace(w, "time budget spent")
        if not job.future.done():
            job.future.set_exception(TimeoutError())

    def _dispatch(self):
        big_running = sum(1 for w in self._workers if w.job is not None and w.job.big)
        for w in self._workers:
            if not w.ready or w.job is not None:
                continue
            job = self._next_job(big_running)
            if job is None:
                return
            big_running += job.big
            try:
                w.conn.send((job.fn, job.args))
            except Exception as exc:  # unpicklable arguments: the caller's bug
                job.future.set_exception(exc)
                continue
            w.job, job.worker = job, w
            if job.timeout is not None:
                job.timer = self._loop.call_later(job.timeout, self._on_timeout, job)

    def _next_job(self, big_running: int) -> _Job | None:
        best = None
        for job in self._queue:  # oldest first: min() below keeps the first of equals
            if job.future.done():
                continue
            if job.big and self.size > 1 and big_running >= self.size - 1:
                continue  # the last worker is kept for small jobs
            if best is None or self._served.get(job.turn, -1) < self._served.get(best.turn, -1):
                best = job
        if best is not None:
            self._queue.remove(best)
            self._serial += 1
            self._served[best.turn] = self._serial
        return best
