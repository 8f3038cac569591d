"""``python -m server [flags]``: parse settings and start the server's processes
(``server.supervisor``: one engine-core process and ``--api-server-count`` API-server
processes on one port; ``/health`` is 503 until the model is loaded), or, with
``--replicas`` / ``--ray-address``, the Ray Serve replicas (``server.cluster``).

Exit status: 0 after a clean shutdown (SIGTERM, drained), 1 if the model cannot be
loaded (one log line says why), 2 for a configuration error (one line per problem on
stderr), 3 if the server cannot start listening (port in use), 4 if the engine-core
process kept dying (``--engine-restarts``)."""

from __future__ import annotations

import logging
import sys

from server import startup
from server.config_errors import load_or_exit
from server.keys import KeyFileError, build_keys
from server.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    settings = load_or_exit(argv)
    setup_logging(settings.log_level, settings.log_format)
    if settings.replicas > 1 or settings.ray_address:
        from server.cluster import serve_cluster  # imports Ray: only on these flags
        return serve_cluster(settings)
    try:
        keys = build_keys(settings.api_keys, settings.api_key_file)
    except KeyFileError as e:  # a broken key file: one plain line, not a traceback
        logging.getLogger("qwen_vl").error("%s", e)
        sys.exit(2)
    startup.report(settings, keys)
    from server.supervisor import Supervisor
    code = Supervisor(settings, argv).run()
    logging.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
