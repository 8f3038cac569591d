"""Issue 15: replicas on Ray Serve.

Units (no Ray): the affinity key and ranking, the in-process ASGI call a replica makes,
and that a plain launch never imports Ray.

End to end: ``./launch_api.sh --replicas 2`` with the tiny model on CPU, driven by the
``openai`` SDK (streamed and not, with images) until both replicas (``X-Replica``) have
answered; ``/health``, ``/v1/models``, ``/docs`` and ``/metrics`` through the front door;
then one replica's process is killed under a running stream (which ends with a 503 error
event, never a hang), 20 more requests all succeed, and Ray brings a new replica up.
A second cluster (``--routing affinity``, with an API key and 2 s client deadlines)
keeps conversations on one replica, and its front door treats slow and unauthenticated
clients as the single process does (issue 31): 401 before the body, 408 for a stalled
body or silent headers, 413 over the body cap.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from server.api.forward import RawRequest, ResponseHead, call_app, prefix_key, rendezvous_order
from tests.conftest import ROOT, SMALL_IMAGES, data_url, free_port, fresh_python, png_bytes


def chat_body(system=None, image=None, text="hi") -> bytes:
    content = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    return json.dumps({"model": "qwen3-vl", "messages": messages}).encode()


# --------------------------------------------------------------------------- units

def test_prefix_key_follows_system_prompt_and_first_image():
    """Same system prompt and first image → same key, whatever the question; a different
    prompt or image → another key; nothing shared, or not chat JSON → None."""
    a = prefix_key(chat_body("You are a shop bot.", "data:image/png;base64,AAA", "q1"))
    assert a == prefix_key(chat_body("You are a shop bot.", "data:image/png;base64,AAA", "q2"))
    assert a != prefix_key(chat_body("You are a shop bot.", "data:image/png;base64,BBB"))
    assert a != prefix_key(chat_body("You are a tax bot.", "data:image/png;base64,AAA"))
    assert prefix_key(chat_body("You are a shop bot.")) is not None
    assert prefix_key(chat_body()) is None
    assert prefix_key(b"not json") is None and prefix_key(b'{"messages": 3}') is None


def test_rendezvous_order_is_stable_and_moves_only_the_lost_replicas_keys():
    ids = ["r1", "r2", "r3"]
    keys = [f"k{i}" for i in range(300)]
    owner = {k: rendezvous_order(k, ids)[0] for k in keys}
    assert owner == {k: rendezvous_order(k, list(reversed(ids)))[0] for k in keys}
    assert set(owner.values()) == set(ids)  # spread over all replicas
    for k in keys:  # r2 leaves: only its keys move
        if owner[k] != "r2":
            assert rendezvous_order(k, ["r1", "r3"])[0] == owner[k]


def _tiny_app():
    app, seen = FastAPI(), {}

    @app.post("/echo")
    async def echo(request: Request):
        return {"body": (await request.body()).decode(), "q": request.url.query}

    @app.get("/stream")
    async def stream():
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                seen["closed"] = True
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app, seen


async def test_call_app_relays_response_and_tells_the_app_when_the_caller_leaves():
    """A replica runs the app in-process: status, headers (plus its own tags) and body
    come back; stopping early closes the app's stream (generation aborts)."""
    app, seen = _tiny_app()
    out = [x async for x in call_app(app, RawRequest("POST", "/echo", b"a=1", [], b"hello"),
                                     [(b"x-replica", b"r1")])]
    head = out[0]
    assert isinstance(head, ResponseHead) and head.status == 200
    assert head.header("X-Replica") == "r1"
    assert json.loads(b"".join(out[1:])) == {"body": "hello", "q": "a=1"}

    missing = [x async for x in call_app(app, RawRequest("GET", "/nope"))]
    assert missing[0].status == 404

    chunks = call_app(app, RawRequest("GET", "/stream"))
    assert (await anext(chunks)).header("content-type").startswith("text/event-stream")
    assert await anext(chunks) == b"data: 0\n\n"
    await chunks.aclose()
    for _ in range(100):
        if seen.get("closed"):
            break
        await asyncio.sleep(0.01)
    assert seen.get("closed")


def test_plain_launch_never_imports_ray():
    """Without --replicas/--ray-address, ``python -m server``'s main runs to its
    supervisor, and an API-server process's module loads, without Ray in sys.modules."""
    code = ("import sys, server.supervisor as sup, server.__main__ as m\n"
            "import server.api.api_server\n"
            "sup.Supervisor.run = lambda self: print('RAY' if 'ray' in sys.modules "
            "else 'NO-RAY') or 0\n"
            "m.main(['--model-path', 'nowhere', '--port', '1'])\n")
    out = fresh_python(code)
    assert out.stdout.strip().splitlines()[-1] == "NO-RAY", out.stderr[-2000:]


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def start_cluster(tiny_model, tmp_path_factory):
    """``start_cluster(*flags)``: ``launch_api.sh --replicas 2 [flags]`` on a free port,
    healthy; every cluster started is stopped (Ray with it) at the end of the module."""
    started = []

    def start(*flags: str) -> str:
        port = free_port()
        log_path = tmp_path_factory.mktemp("cluster") / "cluster.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen(
            [str(ROOT / "launch_api.sh"), "--replicas", "2", "--model-path", tiny_model,
             "--host", "127.0.0.1", "--port", str(port), *SMALL_IMAGES,
             "--max-new-tokens", "8", *flags],
            cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 150
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "not healthy:\n" + log_path.read_text()[-4000:]
            # /health is 200 once one replica is up; the launcher logs "ready" once Serve
            # reports all of them running
            try:
                if (httpx.get(url + "/health", timeout=5).status_code == 200
                        and "qwen_vl.cluster: ready" in log_path.read_text(errors="replace")):
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(start_cluster):
    return start_cluster()


def ask(client, i: int, stream: bool, system="You are a shop assistant.", image_seed=None):
    """One chat request with an image through the SDK; returns (X-Replica, text)."""
    k = i if image_seed is None else image_seed
    image = data_url(png_bytes(64 + 8 * (k % 4), 48, color=(k * 40 % 256, 90, 30)))
    kw = dict(model="qwen3-vl", temperature=0, max_tokens=8, stream=stream, messages=[
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": f"What is item {i}?"},
                                     {"type": "image_url", "image_url": {"url": image}}]}])
    raw = client.chat.completions.with_raw_response.create(**kw)
    answer = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        assert answer.choices[0].finish_reason in ("stop", "length")
        text = answer.choices[0].message.content
    return raw.headers["x-replica"], text


def test_two_replicas_serve_survive_a_killed_replica_and_come_back(cluster):
    from openai import OpenAI
    client = OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)

    # 1. both replicas answer, streamed and not, with images
    seen: set[str] = set()
    with ThreadPoolExecutor(4) as pool:
        for rnd in range(6):
            results = list(pool.map(lambda i: ask(client, i, stream=i % 2 == 0),
                                    range(rnd * 4, rnd * 4 + 4)))
            assert all(text for _, text in results)
            seen |= {r for r, _ in results}
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen

    # 2. the other routes, through the proxy
    assert httpx.get(cluster + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(cluster + "/v1/models").json()["data"]][0] == "qwen3-vl"
    docs = httpx.get(cluster + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    metrics = httpx.get(cluster + "/metrics")
    assert metrics.headers["x-replica"] in seen and "qwen_vl_requests" in metrics.text
    bad = httpx.post(cluster + "/v1/chat/completions", json={"model": "qwen3-vl"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    # 3. kill the replica under a long stream: the stream ends with the 503 envelope
    body = {"model": "qwen3-vl", "stream": True, "max_tokens": 4000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a million."}]}
    events = []
    with httpx.stream("POST", cluster + "/v1/chat/completions", json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        victim = int(resp.headers["x-replica-pid"])
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        events = [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert time.time() - t0 < 30
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"

    # 4. 20 more requests, all succeed while Ray replaces the replica
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: ask(client, i, stream=i % 2 == 1), range(20)))
    assert len(results) == 20 and all(text for _, text in results)

    # 5. Ray brings a new replica up, and it serves
    deadline, fresh = time.time() + 90, set()
    while not fresh and time.time() < deadline:
        with ThreadPoolExecutor(4) as pool:
            fresh = {r for r, _ in pool.map(lambda i: ask(client, i, False), range(4))} - seen
    assert fresh, "no new replica within 90 s"


KEY = "sk-cluster-1234"
DEADLINE_S = 2.0  # --body-timeout and --header-timeout of the guarded cluster


@pytest.fixture(scope="module")
def guarded(start_cluster):
    """The second cluster (one more Ray cluster would cost its start-up again): affinity
    routing, an API key, short client deadlines."""
    return start_cluster("--routing", "affinity", "--api-key", KEY,
                         "--body-timeout", str(DEADLINE_S), "--header-timeout", str(DEADLINE_S))


def test_affinity_routing_keeps_a_conversation_on_one_replica(guarded):
    """``--routing affinity`` (Ray Serve's custom request router): the turns of one
    conversation (same system prompt and first image) all land on one replica, while
    different conversations spread over both."""
    from openai import OpenAI
    client = OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0, timeout=120)
    owners = {ask(client, i, stream=False, system=f"You are shop bot {i}.")[0]
              for i in range(16)}
    assert len(owners) == 2, owners
    turns = {ask(client, i, stream=i % 2 == 0, system="You help with order 77.",
                 image_seed=3)[0] for i in range(8)}
    assert len(turns) == 1, turns


def _first_answer(data: bytes) -> tuple[int, dict] | None:
    """The first HTTP answer in ``data`` (status, error envelope), None until complete
    (a 408 may follow it on the same connection)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.I)
    if not sep or not length or len(rest) < int(length.group(1)):
        return None
    return int(head.split(b" ")[1]), json.loads(rest[:int(length.group(1))])["error"]


async def _exchange(port: int, payload: bytes, trickle: bool = False,
                    until_close: bool = True, limit: float = 20):
    """Send ``payload`` on a fresh connection (then a byte every 0.5 s if ``trickle``) and
    read the answer, then (``until_close``) until the server closes the connection;
    returns (status, error envelope, seconds to the answer, seconds to the close or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(payload)

    async def dribble():
        while True:
            await asyncio.sleep(0.5)
            writer.write(b" ")
            await writer.drain()

    dribbler = asyncio.create_task(dribble()) if trickle else None
    data, answered, closed = b"", None, None
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            data += chunk
            if answered is None and _first_answer(data):
                answered = time.perf_counter() - t0
                if not until_close:
                    break
        else:
            closed = time.perf_counter() - t0
    except OSError:  # a reset after the answer: closed all the same
        closed = time.perf_counter() - t0
    except asyncio.TimeoutError:
        pass
    finally:
        if dribbler:
            dribbler.cancel()
        writer.close()
    answer = _first_answer(data)
    assert answer is not None, data
    return (*answer, answered, closed)


def test_front_door_guards_slow_and_unauthenticated_clients(guarded):
    """Issue 31: the replicas' front door is the single process's.  A 1 MB upload
    without a valid key gets 401 from its headers alone (and, trickling on, is cut at
    the header deadline); a keyed body that stalls gets 408 at --body-timeout; a
    connection that sends nothing gets 408 at --header-timeout; a body over
    --max-body-bytes gets 413 from its Content-Length."""
    port = int(guarded.rsplit(":", 1)[1])

    def upload(auth: str = "", length: int = 1_000_000) -> bytes:
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                '{"model": "qwen3-vl", ').encode()

    async def main():
        return await asyncio.gather(
            _exchange(port, upload(), trickle=True),
            _exchange(port, upload("Authorization: Bearer sk-wrong\r\n"), until_close=False),
            _exchange(port, upload(f"Authorization: Bearer {KEY}\r\n")),
            _exchange(port, b""),
            _exchange(port, upload(f"Authorization: Bearer {KEY}\r\n", 100 * 2 ** 20),
                      until_close=False))

    missing, wrong, stalled, silent, huge = asyncio.run(main())
    for status, err, answered, closed in (missing, wrong):
        assert (status, err["code"]) == (401, "invalid_api_key")
        assert answered < 1.0, answered  # not after the body (it never comes)
    assert missing[3] is not None and missing[3] < DEADLINE_S + 5, missing
    status, err, answered, closed = stalled
    assert (status, err["code"]) == (408, "request_timeout")
    assert DEADLINE_S - 0.5 <= answered < DEADLINE_S + 5 and closed is not None, stalled
    status, err, answered, closed = silent
    assert (status, err["code"]) == (408, "request_timeout")
    assert DEADLINE_S - 0.5 <= answered < DEADLINE_S + 5 and closed is not None, silent
    assert (huge[0], huge[1]["code"]) == (413, "payload_too_large") and huge[2] < 1.0, huge
    # the same door still lets keyed requests and key-less health probes through
    assert httpx.get(guarded + "/health").json() == {"status": "ok"}
    ok = httpx.post(guarded + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "qwen3-vl", "max_tokens": 2,
                          "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-replica"], ok.text
