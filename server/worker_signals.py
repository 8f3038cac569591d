"""Imported by the worker processes' fork server only (``server.workers`` preloads it
there, never in the server process): the fork server and every worker forked from it
ignore SIGTERM.

Why: systemd and ``docker stop`` send SIGTERM to the whole process group.  The server
drains its requests for up to ``--shutdown-timeout`` and still needs its workers for that
(a grammar compile, an image decode); a worker killed by the group signal would fail its
job and be respawned during the shutdown.  The server kills its workers itself (SIGKILL)
when it stops, and a worker whose server is gone ends when its pipe closes.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
