"""Slow and greedy clients: deadlines for headers and bodies, a cap on connections per address.

uvicorn has no header or body deadline (its keep-alive timeout only covers idle time
between requests) and no per-address connection cap, so:

* ``BodyDeadline`` (ASGI middleware): a request's body must have arrived
  ``body_timeout`` seconds after its headers; otherwise the app answers 408
  (``request_timeout``, OpenAI's envelope) with ``Connection: close``, and uvicorn closes
  the connection after it.
* ``guarded_protocol(settings)``: uvicorn's own HTTP protocol class (httptools, or h11),
  extended to (1) answer 408 and close a connection whose request headers are not
  complete ``header_timeout`` seconds after its first byte (or after it opened), and
  (2) refuse, with 429 and close, a connection from an address that already holds
  ``max_connections_per_client`` open ones.  Pass it to uvicorn as ``http=``.
  Both answers are written straight to the socket, since no request exists yet.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.exceptions import HTTPException

from server.errors import APIError, RateLimited, RequestTimeout

log = logging.getLogger("qwen_vl.clients")


class BodyDeadline:
    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = timed_out = False

        async def timed_receive():
            nonlocal body_done, timed_out
            if body_done:  # later receives wait for a disconnect: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                timed_out = True
                log.warning("request body not received within %g s: 408", self.timeout)
                # an HTTPException: FastAPI turns any other error raised while it reads
                # the body into a 400; the app's handler renders 408 as RequestTimeout
                raise HTTPException(408, detail=f"The request body did not arrive within "
                                                f"{self.timeout:g} seconds.") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                body_done = True
            return msg

        async def close_after(msg):
            if timed_out and msg["type"] == "http.response.start":
                # the rest of the body may still trickle in: don't keep reading it
                msg["headers"] = [*msg.get("headers", []), (b"connection", b"close")]
            await send(msg)

        await self.app(scope, timed_receive, close_after)


def _raw_response(err: APIError) -> bytes:
    body = json.dumps(err.envelope()).encode()
    reason = {408: "Request Timeout", 429: "Too Many Requests"}.get(err.status, "Error")
    head = [f"HTTP/1.1 {err.status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{k}: {v}" for k, v in err.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(settings) -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    header_timeout = settings.header_timeout
    cap = settings.max_connections_per_client
    open_by_addr: dict[str, int] = {}   # shared by the connections of this server
    capped: set[str] = set()            # addresses at the cap (logged once each time)

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _addr: str | None = None
        _header_timer: asyncio.TimerHandle | None = None
        _armed_for = None

        def connection_made(self, transport):
            super().connection_made(transport)
            addr = self.client[0] if self.client else None
            if cap and addr is not None:
                if open_by_addr.get(addr, 0) >= cap:
                    if addr not in capped:
                        capped.add(addr)
                        log.warning("client %s holds %d connections: refusing more", addr, cap)
                    self._refuse(RateLimited(
                        f"Too many open connections from your address (at most {cap}).",
                        retry_after=1))
                    return
                open_by_addr[addr] = open_by_addr.get(addr, 0) + 1
                self._addr = addr
            self._arm()

        def data_received(self, data):
            # the first bytes of a new request start its header deadline (kept while the
            # same request's headers are still coming in)
            idle = self.cycle is None or self.cycle.response_complete
            if idle and (self._header_timer is None or self._armed_for is not self.cycle):
                self._disarm()
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc):
            self._disarm()
            if self._addr is not None:
                left = open_by_addr[self._addr] - 1
                if left:
                    open_by_addr[self._addr] = left
                else:
                    del open_by_addr[self._addr]
                if left < cap:
                    capped.discard(self._addr)
                self._addr = None
            super().connection_lost(exc)

        def _arm(self):
            self._armed_for = self.cycle  # a new cycle means the headers were complete
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self):
            self._header_timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                log.warning("request headers not received within %g s: 408", header_timeout)
                self._refuse(RequestTimeout(
                    f"The request headers did not arrive within {header_timeout:g} seconds."))

        def _refuse(self, err: APIError):
            self._disarm()
            self.transport.write(_raw_response(err))
            self.transport.close()

    return GuardedProtocol
