"""``python -m server [flags]``: parse settings, start uvicorn, load the model in the
background (``/health`` is 503 until it is ready)."""

from __future__ import annotations

import logging
import os
import signal
import sys

import uvicorn

from server.app import create_app
from server.clients import guarded_protocol
from server.keys import KeyFileError
from server.settings import Settings


def engine_factory(settings: Settings):
    """Load the model and start the engine; the only place the launcher touches torch."""
    def build():
        from models.loader import load_model
        from server.engine.core import AsyncEngine
        oom_at = os.environ.get("QWEN_VL_FAULT_OOM_AT")
        return AsyncEngine(load_model(settings), settings,
                           fault_oom_at=int(oom_at) if oom_at else None)
    return build


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.load(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.replicas > 1 or settings.ray_address:
        from server.cluster import serve_cluster  # imports Ray: only on these flags
        return serve_cluster(settings)
    try:
        app = create_app(settings, engine_factory(settings))
    except KeyFileError as e:  # a broken key file: one plain line, not a traceback
        logging.getLogger("qwen_vl").error("%s", e)
        sys.exit(2)
    # uvicorn drains running requests on SIGTERM (--shutdown-timeout), then restores the
    # previous handler and re-raises the signal: make that handler a clean exit, so that a
    # drained shutdown exits 0 for service managers.  os._exit, not sys.exit: the
    # interpreter would otherwise join every pool thread still busy (a prompt being
    # prepared), whatever the shutdown timeout says; the worker processes are killed
    # by then (lifespan shutdown)
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(0))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=int(settings.shutdown_timeout),
                http=guarded_protocol(settings))  # header deadline, connections per address


if __name__ == "__main__":
    main()
