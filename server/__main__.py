"""``python -m server [flags]``: parse settings, start uvicorn, load the model in the
background (``/health`` is 503 until it is ready).

Exit status: 0 after a clean shutdown (SIGTERM, drained), 1 if the model cannot be
loaded (one log line says why), 2 for a configuration error (one line per problem on
stderr), 3 if the server cannot start listening (port in use, like ``uvicorn.run``)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

import uvicorn

from server import startup
from server.app import create_app
from server.clients import guarded_protocol
from server.config_errors import load_or_exit
from server.keys import KeyFileError, build_keys
from server.logs import setup_logging
from server.settings import Settings

EXIT_LOAD_FAILED, EXIT_STARTUP_FAILED = 1, 3


def close_grace(timeout: float) -> float:
    """How long before ``--shutdown-timeout`` the requests still open are answered (a 503,
    or a stream's error event and ``[DONE]``): time to write those answers."""
    return min(2.0, timeout / 2)


class _Server(uvicorn.Server):
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
            self._watchdog = threading.Timer(self._shutdown_timeout, _exit_now, args=(0,))
            self._watchdog.daemon = True
            self._watchdog.start()
            if self._close_requests is not None:
                loop = asyncio.get_event_loop()
                delay = self._shutdown_timeout - close_grace(self._shutdown_timeout)
                loop.call_soon_threadsafe(loop.call_later, delay, self._close_requests)
        super().handle_exit(sig, frame)


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    settings = load_or_exit(argv if argv is not None else sys.argv[1:])
    setup_logging(settings.log_level, settings.log_format)
    if settings.replicas > 1 or settings.ray_address:
        from server.cluster import serve_cluster  # imports Ray: only on these flags
        return serve_cluster(settings)
    startup.report(settings, build_keys(settings.api_keys, settings.api_key_file))
    failed: list[str] = []

    def stop_on_load_error(reason: str):
        failed.append(reason)
        server.should_exit = True

    try:
        app = create_app(settings, startup.engine_factory(settings),
                         on_load_error=stop_on_load_error)
    except KeyFileError as e:  # a broken key file: one plain line, not a traceback
        logging.getLogger("qwen_vl").error("%s", e)
        sys.exit(2)
    # log_config=None: uvicorn's loggers go through our handler (text or JSON)
    server = _Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        http=guarded_protocol(settings)),  # header deadline, connections per address
        shutdown_timeout=settings.shutdown_timeout,
        close_requests=app.state.close_requests)
    # uvicorn drains running requests on SIGTERM (--shutdown-timeout), then restores the
    # previous handler and re-raises the signal: make that handler a clean exit, so that a
    # drained shutdown exits 0 for service managers.  os._exit, not sys.exit: the
    # interpreter would otherwise join every pool thread still busy (a prompt being
    # prepared), whatever the shutdown timeout says; the worker processes are killed
    # by then (lifespan shutdown)
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(0))
    server.run()
    if failed:
        _exit_now(EXIT_LOAD_FAILED)
    if not server.started:
        _exit_now(EXIT_STARTUP_FAILED)


if __name__ == "__main__":
    main()
