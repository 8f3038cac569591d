"""Shared fixtures: the tiny model (built once per session) and real server subprocesses.

The tiny model has Qwen's real vocabulary unless TEST_VOCAB=toy.

``server_factory(*flags, env=...)`` starts ``python -m server`` with the tiny model on a
free port, waits for ``/health`` to say ok and returns a ``RunningServer``; every server
started is stopped when its test module ends (the shared ``server``: when the session ends), and the run fails if any process it started outlives it.  ``server`` is one shared default server.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# small image budgets keep CPU tests fast: 4..64 language tokens per image
SMALL_IMAGES = ("--min-pixels", "4096", "--max-pixels", "65536")


def fresh_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter in the checkout (what it imports, or how it
    exits, without this test process's modules), its output captured as text."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy in {timeout}s:\n{log_path.read_text()[-4000:]}")


# `tiny_model`, the servers' model: the tiny Qwen3-VL with Qwen's real 151,936-token
# vocabulary (`models.tiny --real-vocab`), so grammars, masks, logprobs, penalties,
# detokenisation and stop strings run at their real size; TEST_VOCAB=toy gives the
# 1,413-token one.  `toy_model` is always the 1,413-token one: the in-process engine twins
# (paged vs generate(), cached vs uncached, ...) compare paths that do not depend on the
# vocabulary's size, and each engine they build costs ~4 s more at the real size
# (measured: 736 s for the whole suite on the real vocabulary, 320 s on the toy one).
TEST_VOCAB = os.environ.get("TEST_VOCAB", "real")


def _build(tmp_path_factory, real: bool) -> str:
    from models.tiny import build
    out = tmp_path_factory.mktemp("tiny-qwen3-vl-" + ("real" if real else "toy"))
    build(out, seed=0, real_vocab=real)
    return str(out)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> str:
    return _build(tmp_path_factory, real=False)


@pytest.fixture(scope="session")
def real_vocab_model(tmp_path_factory) -> str:
    return _build(tmp_path_factory, real=True)


@pytest.fixture(scope="session")
def tiny_model(request) -> str:
    return request.getfixturevalue("real_vocab_model" if TEST_VOCAB == "real" else "toy_model")


_STARTED: list[RunningServer] = []  # every server of the run, in start order
# API_SERVERS=2 ./tests/run.sh tests/test_api.py ...: every server with that many API-server
# processes (the default: the server's own, 1)
API_SERVERS = os.environ.get("API_SERVERS", "")


def start_server(model, log_path: Path, *flags: str, env: dict | None = None,
                 new_session: bool = False) -> RunningServer:
    """``python -m server`` on ``model`` at a free port (small images), logging to
    ``log_path``; returns once ``/health`` says ok.  The benches start theirs here too."""
    port = free_port()
    if API_SERVERS and "--api-server-count" not in flags:
        flags = (*flags, "--api-server-count", API_SERVERS)
    cmd = [sys.executable, "-m", "server", "--model-path", str(model),
           "--host", "127.0.0.1", "--port", str(port), *SMALL_IMAGES, *flags]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    # new_session: a process group of its own, for tests that signal the whole group
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=new_session)
    srv = RunningServer(proc, port, log_path)
    _STARTED.append(srv)
    wait_healthy(srv.url, proc, log_path)
    return srv


@pytest.fixture(scope="session")
def server_factory(tiny_model, tmp_path_factory):
    def start(*flags: str, env: dict | None = None, model: str | None = None,
              new_session: bool = False) -> RunningServer:
        return start_server(model or tiny_model,
                            tmp_path_factory.mktemp("server") / "server.log", *flags,
                            env=env, new_session=new_session)

    yield start
    for s in _STARTED:
        s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _stop_module_servers():
    """Servers a test module started stop when it ends (the shared ``server`` lives for
    the session): about 17 of them would otherwise wait for the end of the run."""
    before = len(_STARTED)
    yield
    for s in _STARTED[before:]:
        if not getattr(s, "shared", False):
            s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture(scope="session")
def server(server_factory) -> RunningServer:
    srv = server_factory()
    srv.shared = True
    return srv


def group_pids(pgid: int) -> list[int]:
    """The pids still in process group ``pgid`` (from /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    pids.append(int(d))
            except ProcessLookupError:
                pass
    return pids


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def pytest_sessionfinish(session, exitstatus):
    """No server subprocess or grammar/decode worker outlives the run (multiprocessing's
    own fork server and resource tracker, which end with this process, aside)."""
    left, me = {}, os.getpid()
    for pid in _children(me):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        # the fork server itself is a direct child; the workers it forked are not
        if ppid == me and ("multiprocessing.forkserver" in cmd
                           or "multiprocessing.resource_tracker" in cmd):
            continue
        left[pid] = cmd[:160]
    if left:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"processes outlived the test run: {left}", red=True)
        session.exitstatus = 1


@pytest.fixture
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(server):
    from openai import AsyncOpenAI
    return AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def png_bytes(w: int = 64, h: int = 48, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    from PIL import Image
    img = Image.new("RGB", (w, h), color)
    for x in range(0, w, 7):  # some structure, so images differ in content
        img.putpixel((x, (x * 3) % h), (x % 256, 255 - x % 256, 90))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    import base64
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


class _Summary:
    """A plugin registered at run time: puts a module's counts line in pytest's terminal
    summary (shown under -q too) and points at the JSON file with the details."""

    def __init__(self, name: str, path: Path, line):
        self.name, self.path, self.line = name, path, line

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", f"{self.name} summary")
        terminalreporter.write_line(self.line())
        terminalreporter.write_line(f"(details: {self.path})")


def summary_fixture(name: str, stats: dict, line):
    """A module-scoped autouse fixture that reports ``line()`` at the end of the run and
    writes ``stats`` to ``<basetemp>/<name>-summary.json``."""
    import json

    @pytest.fixture(scope="module", autouse=True)
    def summary(request, tmp_path_factory):
        path = tmp_path_factory.getbasetemp() / f"{name}-summary.json"
        pm = request.config.pluginmanager
        if not pm.has_plugin(f"{name}-summary"):
            pm.register(_Summary(name, path, line), f"{name}-summary")
        yield
        path.write_text(json.dumps(stats, indent=1, sort_keys=True))
    return summary


def grammar_accepts(text: str, schema: dict | None = None, *, complete: bool) -> bool:
    """Whether ``text`` is (``complete``) or begins (not ``complete``: an answer cut by
    max_tokens) a JSON value of ``schema`` (default: any object), in the compact form
    the server's grammars allow (no free whitespace)."""
    import json as _json

    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgr.Grammar.from_json_schema(_json.dumps(schema or {"type": "object"}),
                                           any_whitespace=False)
    return _is_grammar_accept_string(grammar, text, require_termination=complete)
