"""Issue 31: the replicas' front door and relay, in-process with fakes (no Ray cluster).

``server.api.forward.front_app`` is driven as an ASGI app with a fake ``relay``: it reads a
body only from a caller with a valid key (401 from the headers alone), answers 408 for a
body that stalls and 413 over the cap, and hands everything else on intact.
``server.cluster.Relay`` is driven with a fake deployment handle: a replica that dies
before answering is retried, no replica in time is a 503, a client that leaves cancels
the replica's work, and a replica dying mid-stream ends the stream with an error event.
The real thing, on a local Ray cluster, is in tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from starlette.responses import Response

from server.api.forward import RawRequest, ResponseHead, from_replica, front_app
from server.keys import KeyStore

KEY = "sk-front-1"


def settings(**kw):
    return SimpleNamespace(**{"max_body_bytes": 1000, "body_timeout": 0.3, **kw})


class FakeRelay:
    def __init__(self):
        self.seen: list[RawRequest] = []

    async def __call__(self, raw, receive):
        self.seen.append(raw)
        return from_replica(Response(b"relayed", status_code=200))


async def call(app, method="POST", path="/v1/chat/completions", headers=(), body=None,
               query=b""):
    """Run one request through ``app``; ``body`` None: the body never comes (receive
    blocks).  Returns (status, headers dict, body, how many times receive was called)."""
    scope = {"type": "http", "method": method, "path": path, "query_string": query,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1"}
    sent, calls = [], 0

    async def receive():
        nonlocal calls
        calls += 1
        if body is None or calls > 1:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    await asyncio.wait_for(app(scope, receive, send), 5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), data, calls


def keyed(token=KEY, length=10):
    return [("authorization", f"Bearer {token}"), ("content-length", str(length))]


async def test_a_body_is_read_only_from_a_caller_with_a_key():
    """Without a valid key a request with a body is answered 401 from its headers: its
    body is never awaited (here it would never come) and nothing is relayed."""
    relay = FakeRelay()
    app = front_app(settings(), KeyStore([KEY], None), relay)
    for headers in (keyed("sk-wrong"), [("content-length", "10")],
                    [("transfer-encoding", "chunked")]):
        status, _, data, receives = await call(app, headers=headers)
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        assert receives == 0
    assert relay.seen == []


async def test_requests_are_relayed_intact():
    """A keyed request reaches the relay whole (method, path, query, headers, body); a
    request without a body needs no key at the door (the replica's app decides)."""
    relay = FakeRelay()
    app = front_app(settings(), KeyStore([KEY], None), relay)
    status, _, data, _ = await call(app, headers=keyed(), body=b'{"a": 1}', query=b"x=1")
    assert (status, data) == (200, b"relayed")
    raw = relay.seen[0]
    assert (raw.method, raw.path, raw.query_string, raw.body) == (
        "POST", "/v1/chat/completions", b"x=1", b'{"a": 1}')
    assert (b"authorization", f"Bearer {KEY}".encode()) in raw.headers
    assert (await call(app, "GET", "/health", body=b""))[0] == 200
    assert relay.seen[1].path == "/health"


async def test_stalled_body_is_408_and_closed_and_oversized_body_413():
    relay = FakeRelay()
    app = front_app(settings(), KeyStore([KEY], None), relay)
    status, headers, data, _ = await call(app, headers=keyed())  # the body never comes
    assert (status, json.loads(data)["error"]["code"]) == (408, "request_timeout")
    assert headers[b"connection"] == b"close"
    status, _, data, receives = await call(app, headers=keyed(length=5000))
    assert (status, json.loads(data)["error"]["code"]) == (413, "payload_too_large")
    status, _, _, _ = await call(app, headers=keyed(length=5), body=b"x" * 5000)  # it lied
    assert status == 413 and relay.seen == []


async def _response(status):
    return Response(b"", status_code=status)


async def test_what_the_door_answers_itself_is_logged(caplog):
    """The door's own 401, 408 and 413 and the relay's own 503 each get an access log
    line, as the app's answers do (an operator sees the clients a door turned away); a
    replica's answer gets none from the door (the replica's app writes it)."""
    app = front_app(settings(), KeyStore([KEY], None), FakeRelay())
    with caplog.at_level("INFO", logger="qwen_vl.access"):
        await call(app, headers=keyed("sk-wrong") + [("x-request-id", "trace-1")])
        await call(app, headers=keyed())
        await call(app, headers=keyed(length=5000))
        await call(app, headers=keyed(), body=b'{"a": 1}')
        busy = front_app(settings(), KeyStore([KEY], None),
                         lambda raw, receive: _response(503))
        await call(busy, headers=keyed(), body=b'{"a": 1}')
    lines = [r.fields for r in caplog.records if r.name == "qwen_vl.access"]
    assert [(f["status"], f["by"]) for f in lines] == [
        (401, "front door"), (408, "front door"), (413, "front door"), (503, "front door")], lines
    assert lines[0]["request_id"] == "trace-1" and lines[1]["request_id"].startswith("req-")
    quiet = front_app(settings(access_log=False), KeyStore([KEY], None), FakeRelay())
    caplog.clear()
    with caplog.at_level("INFO", logger="qwen_vl.access"):
        await call(quiet, headers=keyed("sk-wrong"))
    assert not [r for r in caplog.records if r.name == "qwen_vl.access"]


# ------------------------------------------------------------------------ the relay

cluster = pytest.importorskip("server.cluster")  # Ray installed (the cluster extra)


class FakeStream:
    """A deployment handle's response stream: ``items`` in turn; an exception is raised,
    ``"hang"`` never returns."""

    def __init__(self, *items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == "hang":
            await asyncio.Event().wait()
        return item

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self, *streams):
        self.streams = list(streams)

    def options(self, **kw):
        return self

    def remote(self, raw, affinity=None):
        return self.streams.pop(0)


def relay_with(*streams):
    relay = cluster.Relay(affinity=False)
    relay.attach(FakeHandle(*streams))
    return relay


async def never_leaves():
    await asyncio.Event().wait()


def head(content_type="application/json"):
    return ResponseHead(200, [(b"content-type", content_type.encode()),
                              (b"x-replica", b"r2")])


async def test_relay_retries_a_replica_that_died_before_answering():
    dead = FakeStream(cluster.RayActorError())
    relay = relay_with(dead, FakeStream(cluster._TAKEN, head(), b'{"ok": ', b"1}"))
    resp = await relay(RawRequest("POST", "/v1/chat/completions"), never_leaves)
    assert (resp.status_code, resp.body) == (200, b'{"ok": 1}')
    assert resp.headers["x-replica"] == "r2"


async def test_relay_answers_503_when_no_replica_takes_the_request(monkeypatch):
    """Within ROUTE_TIMEOUT_S (its wait is then cancelled), and before the replicas are
    up at all (``/health`` says it is loading)."""
    monkeypatch.setattr(cluster, "ROUTE_TIMEOUT_S", 0.1)
    waiting = FakeStream("hang")
    resp = await relay_with(waiting)(RawRequest("POST", "/v1/chat/completions"),
                                     never_leaves)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert json.loads(resp.body)["error"]["code"] == "service_unavailable"
    assert waiting.cancelled
    starting = await cluster.Relay(affinity=False)(RawRequest("GET", "/health"), never_leaves)
    assert (starting.status_code, json.loads(starting.body)) == (503, {"status": "loading"})


async def test_relay_cancels_the_replicas_work_when_the_client_leaves():
    working = FakeStream(cluster._TAKEN, "hang")
    left = asyncio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    answer = asyncio.ensure_future(relay_with(working)(RawRequest("POST", "/v1/x"), receive))
    await asyncio.sleep(0.05)
    assert not working.cancelled
    left.set()
    await asyncio.wait_for(answer, 2)
    assert working.cancelled


async def test_relay_ends_a_stream_whose_replica_died_with_an_error_event():
    stream = FakeStream(cluster._TAKEN, head("text/event-stream"), b"data: {}\n\n",
                        cluster.RayActorError())
    resp = await relay_with(stream)(RawRequest("POST", "/v1/chat/completions"),
                                    never_leaves)
    chunks = [c async for c in resp.body_iterator]
    assert chunks[0] == b"data: {}\n\n"
    events = chunks[1].decode().split("\n\n")
    assert json.loads(events[0][6:])["error"]["code"] == "service_unavailable"
    assert events[1] == "data: [DONE]"
