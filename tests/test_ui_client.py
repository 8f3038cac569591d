"""The Gradio page's API client, built against the installed ``openai`` SDK (issue 26).

openai 3.x builds its client on httpx2 and refused the ``httpx.Timeout`` the UI handed it
(TypeError at start-up, so ``launch_gradio_api.sh`` exited at once). These construct the
UI's backend with whatever SDK is installed (the lock's, the newest under UNLOCKED=1, the
lowest under LOWEST=1) and talk to a real server through it, without a browser.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

pytest.importorskip("gradio", reason="the ui extra is part of the test install")
from server.ui import ChatBackend  # noqa: E402


def test_backend_builds_with_the_installed_sdk_and_keeps_its_timeouts():
    backend = ChatBackend("http://127.0.0.1:9/v1", "", timeout=123.0)
    timeout = backend.client.timeout
    assert isinstance(timeout, openai.Timeout), (openai.__version__, type(timeout))
    assert (timeout.read, timeout.connect) == (123.0, 5.0)
    assert backend._client("sk-typed").api_key == "sk-typed"


def test_backend_reaches_a_real_server(server):
    backend = ChatBackend(server.base_url, "")
    line, ready, needs_key = asyncio.run(backend.status())
    assert ready and not needs_key, line
    assert asyncio.run(backend.resolve_model()) == "qwen3-vl"
