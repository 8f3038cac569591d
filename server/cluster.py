"""N engine replicas behind one OpenAI endpoint, on Ray Serve (issue 15).

Imported only by ``python -m server`` when ``--replicas`` > 1 or ``--ray-address`` is
given: nothing else in the project imports Ray.

The layout, per application:

    Serve HTTP proxy --> Front (light, no model) --handle--> EngineReplica x N
                                                              (create_app + AsyncEngine)

* ``EngineReplica`` loads the model in its constructor (so Serve routes nothing to a
  replica before it can answer) and runs the very app ``create_app`` builds for the
  single-process server, in-process (``server.forward.call_app``): same routes, errors,
  SSE.  Every response carries ``X-Replica`` (the Serve replica id) and
  ``X-Replica-Pid``.  ``check_health`` fails when the engine does, and Ray replaces the
  replica; a replica whose process dies is replaced the same way.
* ``Front`` is the HTTP ingress: it forwards each request through a deployment handle,
  so the request router picks the replica (least loaded by default: Serve's power of
  two choices on queue length; ``--routing affinity`` uses ``AffinityRouter``).  It turns
  a replica that died under a request into OpenAI's 503 envelope (or, mid-stream, an SSE
  error event), retries requests that got no answer at all on another replica, and
  answers 503 when no replica takes a request within ``ROUTE_TIMEOUT_S`` (never a hang).
* ``/metrics`` is answered by one replica (named by ``X-Replica``) with its own series;
  Ray Serve's per-replica metrics (``ray_serve_*``) are on Ray's metrics export port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import threading

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import ReplicaUnavailableError
    from ray.serve.request_router import FIFOMixin, RequestRouter
except ImportError as e:  # pragma: no cover - depends on the install
    raise SystemExit("--replicas/--ray-address need Ray Serve: pip install -e '.[cluster]' "
                     "(./launch_api.sh installs it when given either flag)") from e
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.app import create_app
from server.errors import PayloadTooLarge, ServiceUnavailable
from server.forward import (Lifespan, RawRequest, ResponseHead, call_app, prefix_key,
                            rendezvous_order)
from server.settings import Settings
from server.startup import engine_factory

log = logging.getLogger("qwen_vl.cluster")

APP_NAME = "qwen-vl"
# a replica that died under a request that had no answer yet: tries on other replicas
RETRIES = 2
# how long a request may wait for a replica to take it (all busy, or all restarting)
# before it gets a 503; generation time is not counted
ROUTE_TIMEOUT_S = 30.0
_TAKEN = "taken"  # a replica's first stream item: it has the request
_DEAD = (RayActorError, ReplicaUnavailableError)


# --- replicas ----------------------------------------------------------------------------

class EngineReplica:
    async def __init__(self, settings: Settings):
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        engine = await asyncio.to_thread(engine_factory(settings))
        self.app = create_app(settings, lambda: engine)
        self.lifespan = Lifespan(self.app)
        await self.lifespan.start()
        runtime = self.app.state.runtime
        while runtime.service is None:  # the app's own load task
            if runtime.load_error:
                raise RuntimeError(runtime.load_error)
            await asyncio.sleep(0.01)
        self.engine = engine
        self.name = serve.get_replica_context().replica_id.unique_id
        self.tags = [(b"x-replica", self.name.encode()),
                     (b"x-replica-pid", str(os.getpid()).encode())]
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    async def handle(self, raw: RawRequest, affinity: str | None = None):
        """Stream the app's answer: a ``ResponseHead``, then body chunks.  ``affinity``
        is read by the request router only."""
        yield _TAKEN
        async for item in call_app(self.app, raw, self.tags):
            yield item

    def check_health(self):
        if not self.engine.healthy:
            raise RuntimeError("engine unhealthy")

    async def __del__(self):
        await self.lifespan.stop()


class Front:
    """The HTTP ingress: forwards every request to an engine replica."""

    def __init__(self, engines, affinity: bool, max_body_bytes: int):
        self.engines = engines.options(stream=True, method_name="handle")
        self.affinity = affinity
        self.max_body_bytes = max_body_bytes

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None past ``--max-body-bytes``: the front buffers what it forwards,
        so it enforces the cap itself rather than leave it to the replica's 413."""
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return _envelope(PayloadTooLarge(
                f"The request body is larger than {self.max_body_bytes} bytes."))
        raw = RawRequest(request.method, request.url.path, request.url.query.encode(),
                         list(request.headers.raw), body)
        key = None
        if self.affinity and raw.method == "POST":  # parsed off the loop: bodies can be MBs
            key = await asyncio.to_thread(prefix_key, raw.body)
        for attempt in range(RETRIES + 1):
            stream = self.engines.remote(raw, affinity=key)
            try:
                try:
                    await asyncio.wait_for(stream.__anext__(), ROUTE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    stream.cancel()
                    return _envelope(ServiceUnavailable(
                        "No replica could take the request in time; retry later.",
                        headers={"Retry-After": "5"}))
                head: ResponseHead = await stream.__anext__()
                if "text/event-stream" in (head.header("content-type") or ""):
                    return StreamingResponse(_relay(stream), status_code=head.status,
                                             headers=_headers(head))
                body = b"".join([chunk async for chunk in stream])
                return Response(body, status_code=head.status, headers=_headers(head))
            except _DEAD:
                log.warning("a replica died under %s %s (try %d)", raw.method, raw.path,
                            attempt + 1)
            except asyncio.CancelledError:  # the client left: so does the replica's work
                stream.cancel()
                raise
        return _envelope(ServiceUnavailable(
            "The replica serving this request went away; retry the request."))


def _headers(head: ResponseHead) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
            if k.lower() not in (b"content-length", b"transfer-encoding")}


def _envelope(err) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers)


async def _relay(stream):
    """Pass SSE chunks on; a replica that dies mid-stream ends the stream the way the
    server ends any mid-stream failure: an error event, then ``[DONE]``."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except _DEAD:
        finished = True
        err = ServiceUnavailable("The replica serving this stream went away.")
        yield ("data: " + json.dumps(err.envelope()) + "\n\ndata: [DONE]\n\n").encode()
    finally:
        if not finished:  # the client left early: stop the replica's generation too
            stream.cancel()


# --- conversation affinity ---------------------------------------------------------------

class AffinityRouter(FIFOMixin, RequestRouter):
    """Requests with the same ``prefix_key`` go to the same replica (its prefix cache
    holds their system prompt and first image), unless that replica is ``imbalance``
    requests busier than the least busy one; the others, and the overflow, go to the less
    loaded of two random replicas."""

    imbalance = 8

    def initialize_state(self, imbalance: int = 8):
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.kwargs.get("affinity") if pending_request else None
        if key and candidate_replicas:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            ranked = [by_id[i] for i in rendezvous_order(key, list(by_id))]
            queue = self.replica_queue_len_cache.get
            owner_q = queue(ranked[0].replica_id) or 0
            least_q = min(queue(r.replica_id) or 0 for r in ranked)
            if owner_q - least_q < self.imbalance:
                # the owner first; if it refuses (full), the least loaded of the rest
                return [[ranked[0]], ranked[1:]] if len(ranked) > 1 else [ranked]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


# --- launcher ----------------------------------------------------------------------------

def _replica_resources(settings: Settings) -> dict:
    """One GPU per replica where the cluster has GPUs; on CPUs, the cores shared out
    (never more than one box has: a replica runs on one box)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= 1:
        if gpus < settings.replicas:
            message = (f"{settings.replicas} replicas need {settings.replicas} GPUs; the "
                       f"cluster has {gpus:g}")
            if not settings.ray_address:  # nothing will join a local cluster: stop here
                raise SystemExit(message)
            log.warning("%s: the rest wait for boxes to join", message)
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = ray.cluster_resources().get("CPU", 1)
    per_box = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]),
                  default=1)
    return {"num_cpus": max(1, int(min(per_box, cpus // settings.replicas)))}


def build_app(settings: Settings):
    engine_opts = dict(
        name="EngineReplica", num_replicas=settings.replicas,
        ray_actor_options=_replica_resources(settings),
        # the engine queues and answers 429 itself: let Serve send it all it may take
        max_ongoing_requests=settings.max_num_seqs + settings.max_queue,
        health_check_period_s=5, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=settings.shutdown_timeout)
    if settings.routing == "affinity":
        engine_opts["request_router_config"] = RequestRouterConfig(
            request_router_class=AffinityRouter)
    engines = serve.deployment(**engine_opts)(EngineReplica).bind(settings)
    front = serve.deployment(
        name="Front", num_replicas=settings.replicas, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0})(Front)
    return front.bind(engines, settings.routing == "affinity", settings.max_body_bytes)


def serve_cluster(settings: Settings) -> None:
    """Start (or join) Ray, deploy the app on ``settings.host:port``, block until SIGTERM
    or SIGINT, then shut Serve down (and the local Ray with it)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray_address:
        ray.init(address=settings.ray_address, include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        # a lean local cluster: no dashboard, a small object store (requests are small)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, settings.replicas),
                 include_dashboard=False, object_store_memory=128 * 1024 ** 2,
                 logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    log.info("starting %d replicas (%s routing)", settings.replicas, settings.routing)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    log.info("ready: %d replicas on http://%s:%d", settings.replicas, settings.host,
             settings.port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    serve.delete(APP_NAME)
    if not settings.ray_address:
        serve.shutdown()
    ray.shutdown()
    sys.exit(0)
