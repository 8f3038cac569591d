"""Typed errors and the one place they become OpenAI's error envelope.

Every failure a client can see is an ``APIError`` subclass carrying its HTTP status,
OpenAI ``type`` and ``code`` strings and the offending ``param``.  Messages are written
for the client: they never include exception text, paths or memory addresses.
"""

from __future__ import annotations


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(APIError):
    status, type, code = 403, "permission_error", "permission_denied"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Overloaded(APIError):
    status, type, code = 429, "rate_limit_error", "server_overloaded"

    def __init__(self, message: str = "The server is at capacity; retry shortly.", *,
                 retry_after: int = 1, **kw):
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class RateLimited(APIError):
    """A key's own limit (issue 14); ``retry_after`` None: no wait would help."""
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int | None, **kw):
        super().__init__(message, headers={"Retry-After": str(retry_after)}
                         if retry_after is not None else None, **kw)


class RequestTimeout(APIError):
    """The request body did not arrive in time (the connection is closed after it)."""
    status, type, code = 408, "invalid_request_error", "request_timeout"


class ServiceUnavailable(APIError):
    status, type, code = 503, "server_error", "service_unavailable"


class QueueTimeout(ServiceUnavailable):
    """The request waited in the queue past ``--max-queue-wait`` without starting."""
    code = "queue_timeout"

    def __init__(self, message: str, *, retry_after: int, **kw):
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class InternalError(APIError):
    status, type, code = 500, "server_error", "internal_error"


class ClientClosedRequest(APIError):
    """The client hung up before its answer was ready (nginx's 499).  Never reaches the
    client; it only keeps access log and metrics from counting a hang-up as a 4xx/5xx."""
    status, type, code = 499, "invalid_request_error", "client_closed_request"
