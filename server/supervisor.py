"""The process that ``python -m server`` becomes: it owns the listening socket and runs
the others, and does no serving itself (no torch, no model, no HTTP).

    supervisor ──spawn──> engine core   (server.engine.proc: model, scheduler, KV, caches)
        │                     ^  ZeroMQ ipc (server.messages)
        └──spawn──> API server x N      (server.api.api_server: uvicorn on the shared socket)

* The socket is bound here (exit 3 if the port is taken) and handed to every API server:
  they accept from it in turn, so one port serves them all (``--api-server-count``).
* The engine loads the model while the API servers answer ``/health`` 503.  If it exits
  before it was ready (the model did not load: it has logged why), the server exits 1.
* **Engine faults.**  If it dies after it was ready (killed, out of memory), the API
  servers answer every open request with a 503 at once and ``/health`` turns 503
  (``EngineClient``); the supervisor starts a new engine, which loads the model again,
  and traffic resumes when it is ready.  After ``--engine-restarts`` restarts the server
  exits 4 instead, for its own supervisor (systemd, Docker) to act.
* An API server that dies loses only its own requests (the engine aborts them); a new one
  takes its place on the same socket.
* SIGTERM / SIGINT: the API servers drain (``--shutdown-timeout``), then the engine
  stops (SIGUSR1); exit 0.  SIGHUP is passed on to the API servers (key file reload).
  Every child dies with the supervisor (``lifecycle.die_with_parent``), even under
  SIGKILL.
* ``/metrics`` adds up over the API servers: each writes its series to a shared
  directory (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and
  the engine's figures are fetched from the engine on each scrape.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from multiprocessing.connection import wait

log = logging.getLogger("qwen_vl.supervisor")

EXIT_LOAD_FAILED, EXIT_STARTUP_FAILED, EXIT_ENGINE_GAVE_UP = 1, 3, 4
ENGINE_STOP_S = 10.0  # the engine's own stop, after the API servers drained


def listen(host: str, port: int) -> socket.socket:
    """The shared listening socket (as uvicorn binds it: SO_REUSEADDR, backlog 2048)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings, argv: list[str]):
        self.settings, self.argv = settings, argv
        self.count = settings.api_server_count or 1
        self.ctx = multiprocessing.get_context("spawn")
        self.stop = threading.Event()
        self.engine = None
        self.engine_ready = None
        self.apis: dict[int, multiprocessing.Process] = {}
        self.restarts = 0

    def run(self) -> int:
        s = self.settings
        try:
            sock = listen(s.host, s.port)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, e)
            return EXIT_STARTUP_FAILED
        run_dir = tempfile.mkdtemp(prefix="qwen-vl-")
        metrics_dir = os.path.join(run_dir, "metrics")
        os.mkdir(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the children
        self.addr = f"ipc://{run_dir}/engine"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._signal_apis(signal.SIGHUP))
        try:
            self._start_engine()
            for i in range(self.count):
                self._start_api(i, sock)
            log.info("listening on http://%s:%d: %d API server process%s, engine core pid %d",
                     s.host, s.port, self.count, "" if self.count == 1 else "es",
                     self.engine.pid)
            return self._watch(sock)
        finally:
            sock.close()  # new connections are refused from now on (the API servers close
            self._stop_all()  # their copies as they start to drain)
            shutil.rmtree(run_dir, ignore_errors=True)

    # --- children ------------------------------------------------------------------------
    def _start_engine(self):
        from server.engine import proc
        # the engine writes one byte here once the model is loaded (a pipe, not an Event:
        # no named semaphore left behind when a child is killed)
        self.engine_ready, ready_w = self.ctx.Pipe(duplex=False)
        self.engine_loaded = False
        self.engine = self.ctx.Process(target=proc.main, name="qwen-vl-engine",
                                       args=(self.argv, self.addr, ready_w, os.getpid()))
        self.engine.start()
        ready_w.close()

    def _start_api(self, i: int, sock):
        from server.api import api_server
        p = self.ctx.Process(target=api_server.main, name=f"qwen-vl-api{i}",
                             args=(self.argv, self.addr, sock, i, os.getpid()))
        p.start()
        self.apis[i] = p

    def _signal_apis(self, sig):
        for p in self.apis.values():
            if p.is_alive():
                os.kill(p.pid, sig)

    # --- the loop ------------------------------------------------------------------------
    def _watch(self, sock) -> int:
        while not self.stop.is_set():
            by_sentinel = {self.engine.sentinel: None,
                           **{p.sentinel: i for i, p in self.apis.items()}}
            if not self.engine_loaded:
                by_sentinel[self.engine_ready] = "ready"
            for sentinel in wait(list(by_sentinel), timeout=0.2):
                i = by_sentinel.get(sentinel)
                if i == "ready":
                    self.engine_loaded = self._read_ready()
                elif i is None:
                    code = self._engine_exited()
                    if code is not None:
                        return code
                elif not self.stop.is_set():
                    p = self.apis[i]
                    p.join()
                    log.error("API server %d (pid %d) exited with status %s: its open "
                              "requests are lost; starting a new one", i, p.pid, p.exitcode)
                    self._start_api(i, sock)
        return 0

    def _engine_exited(self) -> int | None:
        e = self.engine
        e.join()
        if self.stop.is_set():
            return None
        if not self.engine_loaded and not self._read_ready():
            # the model did not load: the engine said why
            return EXIT_LOAD_FAILED
        if self.restarts >= self.settings.engine_restarts:
            log.error("the engine core (pid %d) exited with status %s after %d restart(s): "
                      "giving up (exit %d)", e.pid, e.exitcode, self.restarts,
                      EXIT_ENGINE_GAVE_UP)
            return EXIT_ENGINE_GAVE_UP
        self.restarts += 1
        log.error("the engine core (pid %d) exited with status %s: open requests were "
                  "answered 503; starting a new one (restart %d of %d)", e.pid, e.exitcode,
                  self.restarts, self.settings.engine_restarts)
        self._start_engine()
        return None

    def _read_ready(self) -> bool:
        try:
            return self.engine_ready.poll() and self.engine_ready.recv_bytes() == b"ready"
        except (EOFError, OSError):  # the engine exited before it was ready
            return False

    def _stop_all(self):
        """API servers first (they drain within --shutdown-timeout), then the engine."""
        self._signal_apis(signal.SIGTERM)
        for p in self.apis.values():
            p.join(self.settings.shutdown_timeout + 5)
            if p.is_alive():
                p.kill()
        e = self.engine
        if e is not None and e.is_alive():
            os.kill(e.pid, signal.SIGUSR1)
            e.join(ENGINE_STOP_S)
            if e.is_alive():
                e.kill()
