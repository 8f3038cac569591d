"""Process lifetime helpers shared by the supervisor, the engine-core process and the API
servers (no torch): children that die with their parent, a process's exit seen at once on
an event loop, and a thread whose failure ends its process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

# a process that ended itself because a thread it cannot serve without failed; any status
# after "ready" makes the supervisor start another
EXIT_THREAD_FAILED = 70


def exit_if_it_fails(target, what: str, log: logging.Logger):
    """``target`` for a thread the process cannot serve without (the API servers' output
    thread): should it ever raise, every open request would wait forever, so the process
    exits (``exit_for_restart``)."""
    def run():
        try:
            target()
        except BaseException:
            exit_for_restart(what, log)
    return run


def exit_for_restart(what: str, log: logging.Logger) -> None:
    """Called in an ``except`` block: log the exception and end the process with
    ``EXIT_THREAD_FAILED``, a fault like any other, for the supervisor to restart it."""
    log.exception("%s failed: exiting for a restart", what)
    logging.shutdown()
    os._exit(EXIT_THREAD_FAILED)


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent (``parent_pid``) dies: a supervisor
    killed with -9 must not leave its children serving.  Elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent was already gone before prctl
        os._exit(1)


def pid_watch(loop: asyncio.AbstractEventLoop, pid: int, on_exit) -> int | None:
    """Call ``on_exit()`` on ``loop`` when process ``pid`` ends (a pidfd: at once, no
    polling); returns the fd (to close), None where pidfds are missing."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None

    def fire():
        loop.remove_reader(fd)
        os.close(fd)
        on_exit()
    loop.add_reader(fd, fire)
    return fd


def name_process(name: str) -> None:
    """Linux: the process's name in ``/proc/PID/comm`` and ``ps -o comm`` (at most 15
    bytes), so that the engine core and each API server can be told apart; else a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
