"""What an operator meets on day one (issue 13): a model that cannot load exits with one
line, GET /v1/models/{model}, the startup report, log settings, test_api.sh --key."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai import OpenAI

from server.settings import Settings
from tests.conftest import ROOT, free_port

KEY = "sk-test-operator"


@pytest.fixture(scope="module")
def keyed(server_factory):
    """A server with a key, an alias and JSON logs."""
    return server_factory("--api-key", KEY, "--model-aliases", "shop-bot",
                          "--log-format", "json")


# --- fail fast ------------------------------------------------------------------------------

def test_model_that_cannot_load_exits_with_one_line(tmp_path):
    """Four broken model paths at once: each server logs one line and exits 1; an
    unreachable (or unknown) hub repo gives up within --fetch-timeout."""
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    hub = "is not a local folder, and the Hugging Face hub could not provide it ("
    cases = [  # path, hub offline, the reason expected
        (str(tmp_path / "missing"), True, "no such folder"),
        (str(no_config), True, "the folder has no config.json"),
        ("someone/not-cached-model", True, hub + "HF_HUB_OFFLINE is set"),
        ("someone/not-cached-model", False, hub),  # no network here: no answer in 3 s
    ]
    procs = []
    for i, (path, offline, _) in enumerate(cases):
        env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
        env.update(PYTHONUNBUFFERED="1", **({"HF_HUB_OFFLINE": "1"} if offline else {}))
        log = tmp_path / f"log-{i}"
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "server", "--model-path", path, "--host", "127.0.0.1",
             "--port", str(free_port()), "--fetch-timeout", "3"], cwd=ROOT, env=env,
            stdout=log.open("wb"), stderr=subprocess.STDOUT), log))
    t0 = time.time()
    for (path, _, reason), (proc, log) in zip(cases, procs):
        rc = proc.wait(timeout=90)
        text = log.read_text()
        assert rc == 1, text
        errors = [ln for ln in text.splitlines() if " ERROR " in ln]
        assert len(errors) == 1 and "model failed to load: " in errors[0], text
        assert reason in errors[0] and path in errors[0], errors[0]
        assert "Traceback" not in text, text
    assert time.time() - t0 < 90


def test_load_error_lines():
    from server.load_errors import describe_load_error

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name, torch-free
        pass

    line = describe_load_error(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 "
                                                "GiB\nmore detail"), "Qwen/x")
    assert line.startswith("out of memory while loading Qwen/x (OutOfMemoryError: CUDA out")
    assert "--quantization 4bit" in line and "\n" not in line
    assert describe_load_error(ValueError("bad\nthings"), "/m") == "/m: ValueError: bad"


# --- GET /v1/models/{model} -------------------------------------------------------------------

def test_models_retrieve_served_name_and_aliases(keyed):
    client = OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0, timeout=30)
    for name in ("qwen3-vl", "shop-bot", "Qwen/Qwen3-VL-2B-Instruct"):
        card = client.models.retrieve(name)
        assert card.id == name and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and "qwen3-vl" in e.value.body["message"]
    r = httpx.get(keyed.base_url + "/models/qwen3-vl", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# --- logs -----------------------------------------------------------------------------------

def test_json_logs_quiet_health_and_startup_report(keyed):
    client = OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="shop-bot", max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    httpx.get(keyed.url + "/health", timeout=5)
    time.sleep(0.5)
    lines = [ln for ln in keyed.log().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert records and {"ts", "level", "logger", "message"} <= set(records[0])
    access = [r for r in records if r["logger"] == "qwen_vl.access"]
    assert any(r["path"] == "/v1/chat/completions" and r["status"] == 200
               and r["completion_tokens"] >= 1 for r in access), access
    assert not any(r["path"] == "/health" for r in access)  # polled 10+ times, never logged
    messages = [r["message"] for r in records]
    assert any(m.startswith("auth: on (1 API key") for m in messages), messages
    assert any(m.startswith("config: no config file") for m in messages), messages
    # every line of the server's own output is JSON, uvicorn's included
    other = [ln for ln in keyed.log().splitlines() if ln.strip() and not ln.startswith("{")]
    assert not other, other


def test_startup_warns_about_an_open_api(caplog, tmp_path):
    from server import startup
    cfg = tmp_path / "c.yaml"
    cfg.write_text("host: 0.0.0.0\n")
    with caplog.at_level(logging.INFO, logger="qwen_vl.startup"):
        startup.report(Settings.load(["--config", str(cfg)]), [])
    text = caplog.text
    assert f"config: loaded {cfg}" in text and "auth: off" in text
    assert "WARNING" in text and "0.0.0.0 with no API key" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen_vl.startup"):
        startup.report(Settings.load(["--host", "127.0.0.1"]), [])
        startup.report(Settings.load(["--host", "0.0.0.0"]), ["k"])
    assert "WARNING" not in caplog.text and "auth: on (1 API key;" in caplog.text


def test_startup_report_of_an_empty_key_file(caplog, tmp_path):
    """An empty key file refuses every request (KeyStore): the report says so, not 'off'."""
    from server import startup
    empty = tmp_path / "keys"
    empty.write_text("")
    with caplog.at_level(logging.INFO, logger="qwen_vl.startup"):
        startup.report(Settings.load(["--host", "0.0.0.0", "--api-key-file", str(empty)]), [])
    assert "auth: off" not in caplog.text and "holds no key" in caplog.text
    assert "anyone who can reach" not in caplog.text


async def test_access_log_off_and_health_on():
    """The middleware alone: --no-access-log silences it, --log-health-checks adds /health."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from server.api.metrics import Metrics
    from server.api.middleware import RequestLog

    async def ok(request):
        return PlainTextResponse("ok")

    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.fields["path"])

    handler = Grab()
    logging.getLogger("qwen_vl.access").addHandler(handler)
    logging.getLogger("qwen_vl.access").setLevel(logging.INFO)
    try:
        for kw, want in (({}, ["/x"]), ({"access_log": False}, []),
                         ({"quiet_paths": ()}, ["/health", "/x"])):
            app = RequestLog(Starlette(routes=[Route("/health", ok), Route("/x", ok)]),
                             Metrics(dict), **kw)
            seen.clear()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                         base_url="http://t") as c:
                for path in ("/health", "/x"):
                    assert (await c.get(path)).status_code == 200
            assert seen == want, (kw, seen)
    finally:
        logging.getLogger("qwen_vl.access").removeHandler(handler)


# --- test_api.sh ----------------------------------------------------------------------------

def test_test_api_sh_help_and_key(keyed):
    r = subprocess.run(["./test_api.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--key KEY" in r.stdout and "curl" not in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    r = subprocess.run(["./test_api.sh", keyed.url], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "pass --key KEY" in r.stdout, r.stdout
    r = subprocess.run(["./test_api.sh", "--key", KEY, keyed.base_url], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all checks passed" in r.stdout, r.stdout + r.stderr
