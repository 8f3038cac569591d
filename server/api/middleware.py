"""Pure-ASGI middleware: request ids + one access-log line per request, and the body cap.

``RequestLog`` gives every request an id (``X-Request-Id`` response header, reused from
the request if the client sent a sane one) and logs one structured line when the
response ends: method, path, status, duration and, for chat requests, tokens and TTFT
(read from ``scope["state"]["stats"]``).  Prompts and images are never logged.
``access_log=False`` turns the lines off; paths in ``quiet_paths`` (``/health``, polled
by load balancers and supervisors) are not logged.  Metrics count every request.
``BodyLimit`` answers 413 before parsing when a body is over the cap, by Content-Length
or while it streams in.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from server.errors import PayloadTooLarge

log = logging.getLogger("qwen_vl.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(scope) -> str:
    """The client's ``X-Request-Id`` when it is a sane one, else a new id."""
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    return given if _SANE_ID.match(given) else "req-" + uuid.uuid4().hex[:16]


def access_line(fields: dict) -> None:
    """One access log line (``fields`` also go to a JSON log as they are)."""
    log.info("request %s", json.dumps(fields), extra={"fields": fields})


async def _send_error(send, err):
    body = json.dumps(err.envelope()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes.")
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await _send_error(send, too_large)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # an HTTPException, because FastAPI turns any other exception raised
                    # while it reads the body into "400 error parsing the body"; the app's
                    # handler renders status 413 as PayloadTooLarge
                    raise HTTPException(413, detail=too_large.message)
            return msg

        await self.app(scope, limited_receive, send)


class RequestLog:
    """The access log line, the request metrics and ``X-Request-Id`` (plus ``tags``: the
    answering process's own headers, e.g. ``X-Api-Server``) on every response."""

    def __init__(self, app, metrics, access_log: bool = True, quiet_paths=("/health",),
                 tags: tuple = ()):
        self.app, self.metrics = app, metrics
        self.access_log, self.quiet_paths = access_log, frozenset(quiet_paths)
        self.tags = list(tags)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg.setdefault("headers", [])
                msg["headers"] = [*msg["headers"], (b"x-request-id", rid.encode()), *self.tags]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            stats = scope["state"].get("stats")
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            fields = {"request_id": rid, "method": scope["method"], "path": scope["path"],
                      "status": status, "ms": round(elapsed * 1000, 1)}
            key, ticket = scope["state"].get("key"), scope["state"].get("ticket")
            if ticket is not None:  # the key's concurrent place and real token count
                ticket.finish(stats.prompt_tokens + stats.completion_tokens
                              if stats is not None else None)
            if key is not None:
                fields["key"] = key
                self.metrics.observe_key(key, status, stats or _NO_STATS, elapsed)
            if stats is not None:
                self.metrics.observe(stats, elapsed)
                fields.update(prompt_tokens=stats.prompt_tokens,
                              completion_tokens=stats.completion_tokens, images=stats.images,
                              ttft_ms=None if stats.ttft is None else round(stats.ttft * 1000, 1))
            if self.access_log and scope["path"] not in self.quiet_paths:
                access_line(fields)


class _NoStats:
    prompt_tokens = completion_tokens = 0


_NO_STATS = _NoStats()
_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
           "/health", "/metrics", "/tokenize", "/detokenize"}
