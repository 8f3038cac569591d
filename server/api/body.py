"""Reading a request body without stalling the event loop.

``chat_body_reader(max_elements, max_parts)`` returns a FastAPI dependency that reads the body and
returns the validated ``ChatCompletionRequest`` (``body_reader(..., validate)`` the same for
another route's request model: ``/tokenize``, ``/detokenize``):

* a client that cuts the upload short gets ``ClientClosedRequest`` (logged 499, not 400);
* before parsing, the JSON values are counted cheaply (commas and opening brackets,
  vectorised; an upper bound, since commas inside strings count too): over
  ``max_elements`` is a 413, so that a body of millions of tiny values never reaches
  ``json.loads`` (which would hold the event loop for seconds and grow memory by GBs);
* after parsing and before validation, the content parts of all messages are counted
  (one ``len`` per message): over ``max_parts`` is a 400, so that a body of 160k tiny
  parts within the size limits is never validated, dumped, scanned or rendered part by
  part (each step holds the GIL for seconds at that count);
* bodies over ``OFF_LOOP_BYTES`` are parsed and validated in a worker thread, the event
  loop meanwhile answering ``/health`` and streaming other requests.

Validation errors are raised as FastAPI's ``RequestValidationError`` so that the app's one
handler renders them as before.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from server.api import protocol as p
from server.errors import ClientClosedRequest, InvalidRequest, PayloadTooLarge

OFF_LOOP_BYTES = 256 * 1024
_VALUE_MARKS = tuple(b",[{")
_COUNT_CHUNK = 1 << 20


def _parse(raw: bytes, max_parts: int, validate):
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    parts = count_parts(data)
    if parts > max_parts:
        where = "input" if isinstance(data, dict) and "input" in data else "messages"
        raise InvalidRequest(f"The {where} hold {parts} content parts; at most {max_parts} "
                             "are allowed (--max-content-parts).", param=where)
    try:
        return validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def count_values(raw: bytes) -> int:
    """An upper bound on the JSON values in ``raw``: each one after the first in a
    container is preceded by a comma, and each container opens with a bracket.  Counted
    with numpy's vectorised compares, a megabyte at a time (no body-sized temporaries):
    ~5x ``bytes.count``, which took ~1 ms of the event loop per photo's data URL."""
    a = np.frombuffer(raw, np.uint8)
    n = 1
    for i in range(0, a.size, _COUNT_CHUNK):
        chunk = a[i:i + _COUNT_CHUNK]
        n += sum(int(np.count_nonzero(chunk == b)) for b in _VALUE_MARKS)
    return n


def count_parts(data) -> int:
    """Content parts over all messages (0 for a shape validation will refuse anyway); for
    the Responses API, its ``input`` items and their content parts."""
    if not isinstance(data, dict):
        return 0
    n = 0
    for field in ("messages", "input"):
        items = data.get(field)
        if not isinstance(items, list):
            continue
        n += len(items) if field == "input" else 0
        n += sum(len(m["content"]) for m in items
                 if isinstance(m, dict) and isinstance(m.get("content"), list))
    return n


def tokenize_request(data):
    """/tokenize takes a chat request (with ``messages``) or vLLM's prompt form."""
    chat = isinstance(data, dict) and "messages" in data
    return (p.TokenizeChatRequest if chat else p.TokenizeCompletionRequest).model_validate(data)


def chat_body_reader(max_elements: int, max_parts: int):
    return body_reader(max_elements, max_parts, p.ChatCompletionRequest.model_validate)


def body_reader(max_elements: int, max_parts: int, validate):
    async def read_body(request: Request):
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientClosedRequest("client disconnected while sending the body") from None
        if not raw:
            raise InvalidRequest("The request body is empty; send a JSON object.")
        if count_values(raw) > max_elements:
            raise PayloadTooLarge(f"The request body holds more than {max_elements} JSON "
                                  "values (--max-json-elements).")
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(_parse, raw, max_parts, validate)
        return _parse(raw, max_parts, validate)
    return read_body


BODIES = {  # path: (request model, response model) of the routes that read their own body
    "/v1/chat/completions": (p.ChatCompletionRequest, p.ChatCompletion),
    "/v1/completions": (p.CompletionRequest, p.Completion),
    "/v1/responses": (p.ResponsesRequest, p.ResponseObject),
    "/tokenize": (p.TokenizeChatRequest | p.TokenizeCompletionRequest, p.TokenizeResponse),
    "/detokenize": (p.DetokenizeRequest, p.DetokenizeResponse),
}


def _typed_route(request_model):
    async def typed(body):  # pragma: no cover - never served
        raise NotImplementedError
    typed.__annotations__["body"] = request_model  # a type, not a string to look up
    return typed


def document_bodies(app) -> None:
    """Put the request schemas back into ``/openapi.json``: these routes read their bodies
    themselves, so FastAPI no longer sees them.  The request body, responses and schemas
    are taken from shadow routes with typed body parameters, so the document is the one
    FastAPI writes for them."""
    from fastapi import FastAPI

    shadow = FastAPI()
    for path, (request_model, response_model) in BODIES.items():
        shadow.post(path, response_model=response_model)(_typed_route(request_model))

    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc, typed = base(), shadow.openapi()
        for path in BODIES:
            op, typed_op = doc["paths"][path]["post"], typed["paths"][path]["post"]
            op["requestBody"], op["responses"] = typed_op["requestBody"], typed_op["responses"]
        doc.setdefault("components", {}).setdefault("schemas", {}).update(
            typed["components"]["schemas"])
        return doc

    app.openapi = openapi
