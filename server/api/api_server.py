"""An API-server process: uvicorn and the FastAPI app (HTTP, auth, per-key limits through
the engine, validation, media fetching and decoding to uint8, SSE), with
``server.api.engine_client.EngineClient`` as its engine.  No torch.  Several of them share
one listening socket, made by the supervisor (``server.supervisor``).

``/health`` and ``/v1`` answer 503 until the engine-core process says it is ready (the
model loads meanwhile).  SIGTERM drains as the single process did: uvicorn stops taking
connections and finishes the open requests within ``--shutdown-timeout``; shortly before
it, the requests still open are answered with a 503 (``close_grace``); then the process
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import uvicorn

from server.lifecycle import die_with_parent, name_process

EXIT_STARTUP_FAILED = 3


def close_grace(timeout: float) -> float:
    """How long before ``--shutdown-timeout`` the requests still open are answered (a 503,
    or a stream's error event and ``[DONE]``): time to write those answers."""
    return min(2.0, timeout / 2)


class GuardedServer(uvicorn.Server):
    """uvicorn's server, with ``--shutdown-timeout`` bounding the whole exit: uvicorn's drain
    and the lifespan's engine stop can each wait that long, so the first SIGTERM also arms a
    watchdog that ends the process at the timeout, whatever is still running.  Shortly
    before it, the requests still open are answered with a 503 (``app.state.close_requests``)
    so that no client sees a cut connection."""

    def __init__(self, config, shutdown_timeout: float, close_requests=None):
        super().__init__(config)
        self._shutdown_timeout = shutdown_timeout
        self._close_requests = close_requests
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig, frame):
        if sig == signal.SIGTERM and self._watchdog is None:
            self._watchdog = threading.Timer(self._shutdown_timeout, exit_now, args=(0,))
            self._watchdog.daemon = True
            self._watchdog.start()
            if self._close_requests is not None:
                loop = asyncio.get_event_loop()
                delay = self._shutdown_timeout - close_grace(self._shutdown_timeout)
                loop.call_soon_threadsafe(loop.call_later, delay, self._close_requests)
        super().handle_exit(sig, frame)


def exit_now(code: int) -> None:
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str], addr: str, sock, index: int, parent_pid: int) -> None:
    """The process's entry point (``multiprocessing`` spawn target): serve ``sock``, with
    the engine-core process at ``addr``."""
    die_with_parent(parent_pid)
    name_process(f"qwen-vl-api{index}")
    from server.api.app import create_app
    from server.api.clients import guarded_protocol
    from server.config_errors import load_or_exit
    from server.api.engine_client import EngineClient
    from server.logs import setup_logging
    settings = load_or_exit(argv)
    setup_logging(settings.log_level, settings.log_format)

    async def connect():
        return await EngineClient(addr, f"api{index}").wait_ready()

    # X-Api-Server on every response: which process answered (logs, the fault tests)
    app = create_app(settings, connect, tags=[(b"x-api-server", f"api{index}".encode())])
    # log_config=None: uvicorn's loggers go through our handler (text or JSON)
    server = GuardedServer(uvicorn.Config(
        app, log_level=settings.log_level, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        http=guarded_protocol(settings)),  # header deadline, connections per address
        shutdown_timeout=settings.shutdown_timeout,
        close_requests=app.state.close_requests)
    # uvicorn drains running requests on SIGTERM (--shutdown-timeout), then restores the
    # previous handler and re-raises the signal: make that handler a clean exit.  os._exit,
    # not sys.exit: the interpreter would otherwise join every pool thread still busy
    signal.signal(signal.SIGTERM, lambda *_: exit_now(0))
    server.run(sockets=[sock])
    exit_now(0 if server.started else EXIT_STARTUP_FAILED)
