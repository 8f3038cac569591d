"""The FastAPI app factory and its thin routes.

``create_app(settings, engine_factory)`` returns an app that starts listening at once;
``engine_factory`` (which loads the model, in a thread; or, a coroutine function, connects
to the engine-core process) runs in the lifespan, and until
it returns ``/health`` and the ``/v1`` routes answer 503.  If it fails, one line says why
(``server.load_errors``) and ``on_load_error(reason)`` is called: the launcher uses it
to stop the process with a non-zero status, so a supervisor sees the failure.  Routes take a typed request,
make one call into ``ChatService`` and return JSON or an SSE stream; every error is
rendered by the handlers below in OpenAI's envelope.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api import protocol as p
from server.api.body import body_reader, chat_body_reader, document_bodies, tokenize_request
from server.api.clients import BodyDeadline
from server.api.completions import DEFAULT_MAX_TOKENS, CompletionService
from server.api.docs import add_offline_docs
from server.errors import (APIError, ClientClosedRequest, InternalError, InvalidRequest,
                           NotFound, PayloadTooLarge, PermissionDenied, RequestTimeout,
                           ServiceUnavailable, Unauthorized)
from server.keys import UNLIMITED_ANONYMOUS, ApiKey, KeyStore
from server.load_errors import describe_load_error
from server.api.media import MediaFetcher, MediaPolicy
from server.api.metrics import CONTENT_TYPE, Metrics
from server.api.middleware import BodyLimit, RequestLog
from server.ratelimit import Limiter, estimate_tokens, video_token_bound
from server.api.responses import STATELESS, ResponsesService, response_id, to_chat
from server.api.serving import ChatService, RequestStats
from server.settings import Settings

log = logging.getLogger("qwen_vl.app")


class _State:
    service: ChatService | None = None
    completions: CompletionService | None = None
    responses: ResponsesService | None = None
    engine = None
    load_error: str | None = None


SHUTTING_DOWN = "The server is shutting down; retry the request."


def media_policy(s: Settings) -> MediaPolicy:
    return MediaPolicy(max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
                       total_timeout=s.fetch_timeout, decode_timeout=s.decode_timeout,
                       allowed_media_hosts=tuple(s.allowed_media_hosts),
                       allowed_local_media_path=s.allowed_local_media_path,
                       max_video_bytes=s.max_video_bytes, max_video_seconds=s.max_video_seconds,
                       max_video_frame_pixels=s.max_video_frame_pixels,
                       max_video_decoded_pixels=s.max_video_decoded_pixels,
                       video_decode_timeout=s.video_decode_timeout)


def create_app(settings: Settings, engine_factory: Callable[[], object],
               on_load_error: Callable[[str], None] | None = None,
               tags: tuple = ()) -> FastAPI:
    state = _State()
    fetcher = MediaFetcher(media_policy(settings))
    metrics = Metrics(lambda: state.engine.stats() if state.engine else {})
    keys = KeyStore(settings.api_keys, settings.api_key_file)
    limiter = Limiter()
    closing = asyncio.Event()  # set when a SIGTERM's drain runs out of time (close_requests)
    read_chat_body = chat_body_reader(settings.max_json_elements, settings.max_content_parts)
    read_completion_body = body_reader(settings.max_json_elements, settings.max_content_parts,
                                       p.CompletionRequest.model_validate)
    read_responses_body = body_reader(settings.max_json_elements, settings.max_content_parts,
                                      p.ResponsesRequest.model_validate)
    read_tokenize_body = body_reader(settings.max_json_elements, settings.max_content_parts,
                                     tokenize_request)
    read_detokenize_body = body_reader(settings.max_json_elements, settings.max_content_parts,
                                       p.DetokenizeRequest.model_validate)

    async def load():
        try:
            # a factory that loads in-process runs on a thread; an engine client's is a
            # coroutine (it waits for the engine-core process to be ready)
            engine = (await engine_factory() if asyncio.iscoroutinefunction(engine_factory)
                      else await asyncio.to_thread(engine_factory))
        except Exception as e:
            reason = describe_load_error(e, settings.model_path)
            log.debug("model load traceback", exc_info=True)
            log.error("model failed to load: %s", reason)
            state.load_error = "the model failed to load; see the server log"
            if on_load_error is not None:
                on_load_error(reason)
            return
        state.engine = engine
        state.service = ChatService(engine, settings, fetcher, metrics)
        state.completions = CompletionService(state.service)
        state.responses = ResponsesService(state.service)
        log.info("ready: serving %s as '%s'", engine.model_id, settings.served_model_name)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(load())
        fetcher.start()  # decode workers, ready before the first image
        watcher = asyncio.create_task(keys.watch()) if keys.path else None
        _on_sighup(keys.reload if keys.path else None)
        yield
        task.cancel()
        if watcher is not None:
            watcher.cancel()
        fetcher.close_pool()  # kill decodes in flight: shutdown never waits for them
        if state.engine is not None:
            await state.engine.shutdown(settings.shutdown_timeout)
        await fetcher.aclose()

    app = FastAPI(title="Qwen3-VL OpenAI-compatible server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    add_offline_docs(app)

    def service() -> ChatService:
        if state.service is None:
            raise ServiceUnavailable(state.load_error or "The model is still loading.")
        return state.service

    # async: FastAPI runs a plain def dependency on a worker thread, one thread hop per
    # request; this is a hash and a few comparisons
    async def auth(request: Request) -> ApiKey:
        if not keys.enabled:
            return UNLIMITED_ANONYMOUS
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        key = keys.authenticate(token)  # constant time, every key compared
        if key is None:
            raise Unauthorized("Incorrect or missing API key.")
        return key

    video_tokens = video_token_bound(settings.video_max_pixels, settings.video_min_pixels,
                                     settings.video_max_frames)

    async def _admit(request: Request, key: ApiKey, body,
                     default_max_tokens: int = settings.max_new_tokens) -> RequestStats:
        """The key's limits (429) before any work for a generating request; the access
        log's end releases the ticket and reads the stats."""
        stats = request.scope["state"]["stats"] = RequestStats()
        await _ticket(request, key, estimate_tokens(body, default_max_tokens,
                                                    settings.max_pixels, video_tokens), body.n)
        return stats

    async def _ticket(request: Request, key: ApiKey, cost: int, seqs: int) -> None:
        """The key's place and charge: kept here, or by the engine-core process when the
        engine has a ``limiter`` (``EngineClient``: one count over all API servers)."""
        request.scope["state"]["key"] = key.name
        remote = getattr(state.engine, "limiter", None)
        ticket = request.scope["state"]["ticket"] = (
            await remote.admit(key, cost, seqs=seqs) if remote is not None
            else limiter.admit(key, cost, seqs=seqs))
        stats = request.scope["state"].get("stats")
        if stats is not None:
            stats.ticket = ticket

    async def _answer(request: Request, streaming: bool, events, collect) -> Response:
        """A generating route's answer: the SSE stream ``events()`` yields, or the JSON
        ``collect()`` writes (abandoned if the client leaves or the drain ends)."""
        if streaming:
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return Response(await _unless_disconnected(request, collect(), closing),
                        media_type="application/json")

    # --- routes ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.service is None or not state.engine.healthy:
            msg = state.load_error or ("loading" if state.service is None else "unhealthy")
            return JSONResponse({"status": msg}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route(key: ApiKey = Depends(auth)):
        # every key's name, counts and the cache counters: operators only (keys are tenants)
        if keys.enabled and not key.operator:
            raise PermissionDenied("/metrics is for operator keys (operator: true in the "
                                   "key file).")
        if hasattr(state.engine, "refresh_stats"):  # the engine is another process
            await state.engine.refresh_stats()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(auth)], response_model=p.ModelList)
    async def models():
        return service().models()

    @app.get("/v1/models/{model:path}", dependencies=[Depends(auth)],
             response_model=p.ModelCard)
    async def model(model: str):
        return service().model(model)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat(request: Request, key: ApiKey = Depends(auth),
                   body: p.ChatCompletionRequest = Depends(read_chat_body)):
        svc = service()
        stats = await _admit(request, key, body)
        cid = p.completion_id()
        # a client that leaves while its images are fetched or its grammar compiles
        # cancels that work and frees its queue place at once
        outputs = await _unless_disconnected(request, svc.start(body, cid, stats, key=key.name,
                                                                salt=key.cache_salt),
                                             closing)
        # JSON written by ChatService (the models' JSON, logprobs without per-token models)
        return await _answer(request, body.stream, lambda: svc.stream(body, cid, outputs, stats),
                             lambda: svc.collect(body, cid, outputs, stats))

    @app.post("/v1/completions", response_model=p.Completion)
    async def completions(request: Request, key: ApiKey = Depends(auth),
                          body: p.CompletionRequest = Depends(read_completion_body)):
        service()
        svc = state.completions
        stats = await _admit(request, key, body, default_max_tokens=DEFAULT_MAX_TOKENS)
        cid = p.legacy_completion_id()
        outputs, echo = await _unless_disconnected(
            request, svc.start(body, cid, stats, key=key.name, salt=key.cache_salt), closing)
        return await _answer(request, body.stream,
                             lambda: svc.stream(body, cid, outputs, echo, stats),
                             lambda: svc.collect(body, cid, outputs, echo, stats))

    @app.post("/v1/responses", response_model=p.ResponseObject)
    async def responses(request: Request, key: ApiKey = Depends(auth),
                        body: p.ResponsesRequest = Depends(read_responses_body)):
        service()
        svc = state.responses
        rid = response_id()
        chat_req, where = to_chat(body)  # the Responses-only checks; then it is a chat request
        stats = await _admit(request, key, chat_req)
        outputs = await _unless_disconnected(request, svc.start(
            chat_req, where, rid, stats, key=key.name, salt=key.cache_salt), closing)
        return await _answer(request, body.stream,
                             lambda: svc.stream(body, rid, chat_req, outputs, stats),
                             lambda: svc.collect(body, rid, chat_req, outputs, stats))

    @app.api_route("/v1/responses/{rest:path}", methods=["GET", "DELETE", "POST"],
                   dependencies=[Depends(auth)], include_in_schema=False)
    async def stored_response(rest: str):
        raise NotFound(STATELESS)

    # vLLM's token routes: a chat request (or a plain prompt) counted without generating,
    # and ids back to text.  Each is one request for the key's request rate (no tokens
    # charged); a chat request's images load as for a completion, and while they do the
    # count holds one of the key's concurrent places (images are the costly part)
    @app.post("/tokenize", response_model=p.TokenizeResponse)
    async def tokenize(request: Request, key: ApiKey = Depends(auth),
                       body=Depends(read_tokenize_body)):
        svc = service()
        await _ticket(request, key, 0, seqs=1 if getattr(body, "image_count", 0)
                or getattr(body, "video_count", 0) else 0)
        return await _unless_disconnected(request, svc.tokenize(body), closing)

    @app.post("/detokenize", response_model=p.DetokenizeResponse)
    async def detokenize(request: Request, key: ApiKey = Depends(auth),
                         body: p.DetokenizeRequest = Depends(read_detokenize_body)):
        svc = service()
        await _ticket(request, key, 0, seqs=0)
        return await _unless_disconnected(request, svc.detokenize(body), closing)

    # --- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return await api_error(request, _validation_to_400(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err: APIError = NotFound(f"No route {request.url.path}.")
        elif exc.status_code == 413:  # BodyLimit, for a body that streams in over the cap
            err = PayloadTooLarge(str(exc.detail))
        elif exc.status_code == 408:  # BodyDeadline: the body did not arrive in time
            err = RequestTimeout(str(exc.detail))
        else:
            err = APIError(str(exc.detail))
            err.status, err.type, err.code = exc.status_code, "invalid_request_error", None
        return await api_error(request, err)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unhandled error")
        return await api_error(request, InternalError("Internal server error."))

    # outermost first: request id/log, then body cap, then CORS
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyDeadline, timeout=settings.body_timeout)
    app.add_middleware(RequestLog, metrics=metrics, access_log=settings.access_log,
                       quiet_paths=() if settings.log_health_checks else ("/health",),
                       tags=tags)
    app.state.runtime = state

    def close_requests():
        """The end of a SIGTERM's drain (called on the loop by the launcher): every open
        request is answered now (a stream's error event and ``[DONE]``, a 503 envelope)
        rather than cut when the process exits."""
        closing.set()
        n = (state.engine.close_requests(ServiceUnavailable(SHUTTING_DOWN))
             if state.engine is not None else 0)
        log.warning("shutdown timeout near: %d open request(s) answered with a 503 "
                    "(streams: an error event and [DONE])", n)
    app.state.close_requests = close_requests
    document_bodies(app)
    return app


def _on_sighup(reload):
    """Reload the key file on SIGHUP (only where the loop may own signals: the main
    thread of a real server, not an in-process test client)."""
    if reload is None or not hasattr(signal, "SIGHUP"):
        return
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (RuntimeError, ValueError, NotImplementedError):
        pass


async def _unless_disconnected(request: Request, work, closing: asyncio.Event):
    """Run ``work``; if the client goes away first, cancel it (which aborts generation);
    if the server's drain ends first (``closing``), cancel it and answer 503."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    stop = asyncio.ensure_future(closing.wait())
    try:
        done, _ = await asyncio.wait({task, watch, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if stop in done:
            raise ServiceUnavailable(SHUTTING_DOWN)
        raise ClientClosedRequest("client disconnected")
    finally:
        watch.cancel()
        stop.cancel()
        if not task.done():  # this handler itself was cancelled: abort the generation too
            task.cancel()


# the discriminator tags pydantic puts in a location right after a list index: chat's
# content parts, the Responses API's input items and their content parts
_PART_TAGS = {"text", "image_url", "video_url", "video", "input_video",
              "message", "function_call", "function_call_output", "reasoning",
              "input_text", "input_image", "output_text", "refusal", "summary_text",
              "reasoning_text"}


def _validation_to_400(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("Invalid request.")
    # a union (content: str | list of parts) reports one error per branch: the deepest
    # one names the field that is really wrong (e.g. ...image_url.detail, not ...content)
    e = next((x for x in errors if x.get("type") == "json_invalid"), None) or max(
        errors, key=lambda x: len(x.get("loc", ())))
    if e.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    loc = [x for x in e.get("loc", ()) if x != "body"]
    # pydantic's locations also name union branches: type names ('str', 'list[...]',
    # 'NamedToolChoice') and, right after a list index, a part's discriminator tag
    # ('image_url' in messages[0].content[1].image_url.image_url.url): drop those
    param = ""
    for i, x in enumerate(loc):
        if isinstance(x, int):
            param += f"[{x}]"
        elif (x in ("str", "int", "float", "bool") or "[" in str(x) or str(x)[:1].isupper()
              or (i > 0 and isinstance(loc[i - 1], int) and x in _PART_TAGS
                  and i + 1 < len(loc))):
            continue
        else:
            param += ("." if param else "") + str(x)
    msg = e.get("msg", "Invalid value")
    return InvalidRequest(f"{param or 'body'}: {msg}" if loc else msg, param=param or None)
