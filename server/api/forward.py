"""Ray-free pieces of the replica setup (issue 15), kept apart so they test without Ray.

* ``front_app(settings, keys, relay)`` is the replicas' front door, the ASGI app that
  ``server.cluster`` serves with our own uvicorn (the single-process server's
  ``guarded_protocol``: header deadline, connections per address).  It keeps the single
  process's guards for slow and unknown clients: the body deadline (408), the body cap
  (413) and, before any body byte is read, the API key (401); then it buffers the body
  and hands the request to ``relay`` (which forwards it to a replica).  The replica checks
  the key again, with everything that goes with it (per-key limits, operator routes).
* ``RawRequest`` is one HTTP request as the front door received it (method, path, query,
  headers, body): plain data that crosses a process boundary by pickling.
* ``call_app(app, raw)`` runs our own ASGI app in-process on that request and yields the
  response as ``ResponseHead`` followed by body chunks, so a replica answers exactly what
  the single-process server would (same routes, errors and SSE).  Stopping the iteration
  early tells the app the client went away (which aborts the generation).
* ``Lifespan`` drives an ASGI app's startup and shutdown without a web server.
* ``prefix_key(body)`` names the conversation prefix a chat request shares with others
  (system prompt, first image) and ``rendezvous_order(key, ids)`` ranks replicas for it:
  the affinity router's pure parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from server.api.clients import BodyDeadline
from server.errors import APIError, PayloadTooLarge, RequestTimeout, Unauthorized
from server.keys import KeyStore
from server.api.middleware import BodyLimit, access_line, request_id


@dataclass
class RawRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


def error_response(err: APIError) -> JSONResponse:
    """``err`` in OpenAI's envelope, as the app's error handlers render it."""
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers)


# --- the front door ----------------------------------------------------------------------

# ``relay(raw, receive)``: the response to ``raw``; ``receive`` is the connection's
# (after the body: it says ``http.disconnect`` when the client leaves)
RelayFn = Callable[[RawRequest, Callable[[], Awaitable[dict]]], Awaitable[Response]]


def front_app(settings, keys: KeyStore, relay: RelayFn,
              background: list[Callable[[], Awaitable[None]]] = ()):
    """The front door's ASGI app.  Outermost first, as in ``create_app``: the body
    deadline (``--body-timeout``: 408, connection closed), the body cap
    (``--max-body-bytes``: 413), then ``FrontDoor``.  ``background`` are coroutine
    functions run for the app's life (started by its lifespan, cancelled at its end)."""
    jobs = [keys.watch] if keys.path else []  # a key file edited on disk: reloaded here too
    door = FrontDoor(keys, relay, [*jobs, *background])
    app = BodyDeadline(BodyLimit(door, settings.max_body_bytes), settings.body_timeout)
    if not getattr(settings, "access_log", True):
        return app
    return DoorLog(app, () if getattr(settings, "log_health_checks", False) else ("/health",))


def from_replica(response: Response) -> Response:
    """Mark ``response`` as a replica's answer (its app wrote the access log line)."""
    response.from_replica = True
    return response


class DoorLog:
    """The access log line of each request the door answers itself (401, 408, 413, and the
    relay's own 503s and 500s: the app writes one for what it answers, so an operator sees
    the clients the door turned away); a replica's answer (``from_replica``) has its
    app's line.  ``quiet_paths`` as the app's (``/health`` unless --log-health-checks)."""

    def __init__(self, app, quiet_paths=("/health",)):
        self.app, self.quiet_paths = app, frozenset(quiet_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.quiet_paths:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), None

        async def sending(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, sending)
        finally:
            if status is not None and not scope.get("state", {}).get("relayed"):
                access_line({"request_id": request_id(scope), "method": scope["method"],
                             "path": scope["path"], "status": status,
                             "ms": round((time.perf_counter() - t0) * 1000, 1),
                             "by": "front door"})


class FrontDoor:
    """Reads a request's body only from a caller with a valid key, then relays it.

    A request that carries a body (``Content-Length`` > 0 or ``Transfer-Encoding``) and
    no valid ``Authorization: Bearer`` key is answered 401 from its headers alone, so an
    unknown client cannot hold the server open by trickling a body.  Requests without a
    body go to a replica as they are (the app there decides which routes need a key,
    exactly as the single process does)."""

    def __init__(self, keys: KeyStore, relay: RelayFn,
                 background: list[Callable[[], Awaitable[None]]] = ()):
        self.keys, self.relay, self.background = keys, relay, list(background)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":  # websockets: no route takes them
            return
        request = Request(scope, receive)
        if _has_body(scope) and self.keys.enabled and self._key(request) is None:
            response = error_response(Unauthorized("Incorrect or missing API key."))
        else:
            try:
                body = await request.body()
            except HTTPException as e:  # BodyLimit's 413, BodyDeadline's 408
                err = PayloadTooLarge if e.status_code == 413 else RequestTimeout
                response = error_response(err(str(e.detail)))
            except ClientDisconnect:  # gone before its body arrived: nobody to answer
                return
            else:
                raw = RawRequest(scope["method"], scope["path"], scope["query_string"],
                                 list(scope["headers"]), body)
                response = await self.relay(raw, request.receive)
                # (``DoorLog``: a replica's answer is logged by its app)
                scope.setdefault("state", {})["relayed"] = getattr(response, "from_replica",
                                                                   False)
        await response(scope, receive, send)

    def _key(self, request: Request):
        given = request.headers.get("authorization", "")  # as the app's own auth reads it
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        return self.keys.authenticate(token)

    async def _lifespan(self, receive, send):
        await receive()  # lifespan.startup
        tasks = [asyncio.create_task(job()) for job in self.background]
        if self.keys.path and hasattr(signal, "SIGHUP"):  # as the app: SIGHUP reloads keys
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.keys.reload)
            except (RuntimeError, ValueError):  # not the main thread (an in-process test)
                pass
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        for task in tasks:
            task.cancel()
        await send({"type": "lifespan.shutdown.complete"})


def _has_body(scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") not in (b"", b"0") or (
        b"transfer-encoding" in headers)


# --- a replica's side ------------------------------------------------------------------

async def call_app(app, raw: RawRequest, extra_headers: list[tuple[bytes, bytes]] = ()
                   ) -> AsyncIterator[ResponseHead | bytes]:
    """Yield the app's response to ``raw``: one ``ResponseHead``, then non-empty chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": raw.method, "scheme": "http",
             "path": raw.path, "raw_path": raw.path.encode(), "root_path": "",
             "query_string": raw.query_string, "headers": list(raw.headers),
             "client": None, "server": None, "state": {}}
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_taken = False

    async def receive():
        nonlocal body_taken
        if not body_taken:
            body_taken = True
            return {"type": "http.request", "body": raw.body, "more_body": False}
        await gone.wait()  # the app polls this to learn of a client that left
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"],
                                   list(message.get("headers", [])) + list(extra_headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
        task.result()  # the app ended without a complete response: raise its error
        raise RuntimeError("the app ended without a response")
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class Lifespan:
    """Run an ASGI app's lifespan protocol (startup now, shutdown on ``stop``)."""

    def __init__(self, app):
        self.app = app
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._events: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            self._inbox.get, self._events.put))
        await self._inbox.put({"type": "lifespan.startup"})
        event = await self._events.get()
        if event["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"app startup failed: {event.get('message', event['type'])}")

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._events.get()


# --- conversation affinity --------------------------------------------------------------

def prefix_key(body: bytes) -> str | None:
    """A key for the prefix a chat request shares with its conversation: its system
    prompt and its first image.  Requests with neither (or not chat JSON) get None, and
    go to the least loaded replica."""
    try:
        req = json.loads(body)
        messages = req["messages"]
        system = [m.get("content") for m in messages if m.get("role") in ("system", "developer")]
        image = next((part.get("image_url") for m in messages
                      if isinstance(m.get("content"), list)
                      for part in m["content"] if isinstance(part, dict)
                      and part.get("type") == "image_url"), None)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not system and image is None:
        return None
    blob = json.dumps([system, image], sort_keys=True, ensure_ascii=False).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def rendezvous_order(key: str, ids: list[str]) -> list[str]:
    """``ids`` ranked for ``key`` by highest-random-weight hashing: every router agrees on
    the owner without shared state, and a replica that leaves only moves its own keys."""
    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}/{replica}".encode(), digest_size=8).digest()
    return sorted(ids, key=weight, reverse=True)
