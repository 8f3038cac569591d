"""N engine replicas behind one OpenAI endpoint, on Ray Serve (issue 15).

Imported only by ``python -m server`` when ``--replicas`` > 1 or ``--ray-address`` is
given: nothing else in the project imports Ray.

The layout (issue 31: the replicas sit behind the same door as the single process):

    launcher process                                        Ray Serve application
    uvicorn on --host:--port (guarded_protocol)
      -> front_app: BodyDeadline, BodyLimit, FrontDoor
         (key before body)
      -> Relay --deployment handle (request router)--> EngineReplica x N
                                                        (create_app + AsyncEngine)

* The launcher's own uvicorn owns ``--host:--port`` (Serve runs no HTTP proxy:
  ``proxy_location="Disabled"``), with the single-process server's guards: the header
  deadline and the cap on connections per address (``server.api.clients.guarded_protocol``),
  the body deadline (408), the body cap (413) and the API key checked before any body
  byte is read (401): ``server.api.forward.front_app``.  It listens at once; until the
  replicas are up, ``/health`` and every other route answer 503.
* ``Relay`` forwards each request through the EngineReplica deployment's handle, so the
  request router picks the replica (least loaded by default: Serve's power of two choices
  on queue length; ``--routing affinity`` uses ``AffinityRouter``, in this process).  It
  turns a replica that died under a request into OpenAI's 503 envelope (or, mid-stream,
  an SSE error event and ``[DONE]``), retries requests that got no answer at all on
  another replica, answers 503 when no replica takes a request within
  ``ROUTE_TIMEOUT_S`` (never a hang), and cancels the replica's work when the client
  leaves.  ``/health`` is forwarded too: 200 when a healthy replica answers it.
* ``EngineReplica`` loads the model in its constructor (so Serve routes nothing to a
  replica before it can answer) and runs the very app ``create_app`` builds for the
  single-process server, in-process (``server.api.forward.call_app``): same routes, errors,
  SSE, key limits.  Every response carries ``X-Replica`` (the Serve replica id) and
  ``X-Replica-Pid``.  ``check_health`` fails when the engine does, and Ray replaces the
  replica; a replica whose process dies is replaced the same way.
* ``/metrics`` is answered by one replica (named by ``X-Replica``) with its own series;
  Ray Serve's per-replica metrics (``ray_serve_*``) are on Ray's metrics export port.
* SIGTERM or SIGINT: uvicorn stops listening and drains (``--shutdown-timeout``), then
  the Serve application is deleted and Ray shut down (a joined cluster keeps running);
  exit 0.  Exit 1 if the replicas cannot start, 2 for a broken key file, 3 if the port
  cannot be bound, as the single process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
import uvicorn
from starlette.responses import JSONResponse, Response, StreamingResponse

from server import startup
from server.api.app import create_app
from server.api.clients import guarded_protocol
from server.errors import InternalError, ServiceUnavailable
from server.api.forward import (Lifespan, RawRequest, ResponseHead, call_app, error_response,
                                from_replica,
                            front_app, prefix_key, rendezvous_order)
from server.keys import KeyFileError, KeyStore
from server.settings import Settings

log = logging.getLogger("qwen_vl.cluster")

APP_NAME = "qwen-vl"
# a replica that died under a request that had no answer yet: tries on other replicas
RETRIES = 2
# how long a request may wait for a replica to take it (all busy, or all restarting)
# before it gets a 503; generation time is not counted
ROUTE_TIMEOUT_S = 30.0
HEALTH_ROUTE_TIMEOUT_S = 5.0  # a health probe must not hang for ROUTE_TIMEOUT_S
_TAKEN = "taken"  # a replica's first stream item: it has the request
_DEAD = (RayActorError, ReplicaUnavailableError)
EXIT_LOAD_FAILED, EXIT_KEY_FILE = 1, 2  # as server.__main__ (3, port in use: uvicorn's)


# --- replicas ----------------------------------------------------------------------------

class EngineReplica:
    async def __init__(self, settings: Settings):
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        engine = await asyncio.to_thread(startup.engine_factory(settings))
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


# --- the relay: front door -> replica ----------------------------------------------------

class Relay:
    """Forwards a request the front door has read to an engine replica, and brings its
    answer back; ``attach(handle)`` once the replicas are up (503 until then)."""

    def __init__(self, affinity: bool):
        self.affinity = affinity
        self.engines = None

    def attach(self, handle) -> None:
        self.engines = handle.options(stream=True, method_name="handle")

    async def __call__(self, raw: RawRequest, receive) -> Response:
        """The replica's response to ``raw``.  If the client leaves first (``receive``
        says so), the replica's work is cancelled; a stream's own relay notices the same
        once it runs (``_relay``)."""
        if self.engines is None:
            return _unavailable(raw, "The replicas are still starting; retry later.",
                                health="loading")
        work = asyncio.ensure_future(self._forward(raw))
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            return Response(status_code=499)  # nobody reads it: the client has gone
        finally:
            left.cancel()
            work.cancel()  # a no-op once it is done; else it cancels the replica's work

    async def _forward(self, raw: RawRequest) -> Response:
        key = None
        if self.affinity and raw.method == "POST":  # parsed off the loop: bodies can be MBs
            key = await asyncio.to_thread(prefix_key, raw.body)
        wait = HEALTH_ROUTE_TIMEOUT_S if raw.path == "/health" else ROUTE_TIMEOUT_S
        for attempt in range(RETRIES + 1):
            stream = self.engines.remote(raw, affinity=key)
            try:
                try:
                    await asyncio.wait_for(stream.__anext__(), wait)
                except asyncio.TimeoutError:
                    stream.cancel()
                    return _unavailable(raw, "No replica could take the request in time; "
                                             "retry later.", health="no replica available")
                head: ResponseHead = await stream.__anext__()
                if "text/event-stream" in (head.header("content-type") or ""):
                    return from_replica(StreamingResponse(
                        _relay(stream), status_code=head.status, headers=_headers(head)))
                body = b"".join([chunk async for chunk in stream])
                return from_replica(Response(body, status_code=head.status,
                                             headers=_headers(head)))
            except _DEAD:
                log.warning("a replica died under %s %s (try %d)", raw.method, raw.path,
                            attempt + 1)
            except asyncio.CancelledError:  # the client left: so does the replica's work
                stream.cancel()
                raise
            except Exception:  # a bug, here or in Ray: the client gets a 500, not a cut
                log.exception("relaying %s %s failed", raw.method, raw.path)
                stream.cancel()
                return error_response(InternalError("Internal server error."))
        return error_response(ServiceUnavailable(
            "The replica serving this request went away; retry the request."))


async def _disconnected(receive) -> None:
    """Return when the client has gone (the body was read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _unavailable(raw: RawRequest, message: str, health: str) -> Response:
    """503: a health probe gets ``/health``'s own shape (``{"status": health}``), the
    API OpenAI's envelope with ``message``."""
    if raw.path == "/health":
        return JSONResponse({"status": health}, status_code=503)
    return error_response(ServiceUnavailable(message, headers={"Retry-After": "5"}))


def _headers(head: ResponseHead) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
            if k.lower() not in (b"content-length", b"transfer-encoding")}


async def _relay(stream):
    """Pass SSE chunks on; a replica that dies mid-stream ends the stream the way the
    server ends any mid-stream failure: an error event, then ``[DONE]``."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except Exception as e:
        finished = True
        if isinstance(e, _DEAD):
            err = ServiceUnavailable("The replica serving this stream went away.")
        else:
            log.exception("relaying a stream failed")
            err = InternalError("Internal server error.")
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
    """The Serve application: the EngineReplica deployment (its handle is the ingress)."""
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
    return serve.deployment(**engine_opts)(EngineReplica).bind(settings)


def _start_ray(settings: Settings) -> None:
    if settings.ray_address:
        ray.init(address=settings.ray_address, include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        # a lean local cluster: no dashboard, a small object store (requests are small)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, settings.replicas),
                 include_dashboard=False, object_store_memory=128 * 1024 ** 2,
                 logging_level=logging.WARNING)
    # no Serve HTTP proxy: our own uvicorn (serve_cluster) owns --host:--port
    serve.start(proxy_location="Disabled")


def _stop_ray(settings: Settings) -> None:
    try:
        serve.delete(APP_NAME)  # each replica drains (graceful_shutdown_timeout_s)
    except Exception:  # e.g. the cluster we joined went away: nothing left to delete
        log.warning("could not delete the Serve application", exc_info=True)
    if not settings.ray_address:
        serve.shutdown()
    ray.shutdown()


async def _in_daemon_thread(fn):
    """``fn()`` on a daemon thread: a blocking Ray call (``serve.run`` waits for every
    replica to load) that must neither block the loop nor hold the exit (a pool thread
    of ``asyncio.to_thread`` would)."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

    threading.Thread(target=run, name="serve-deploy", daemon=True).start()
    return await asyncio.wrap_future(done)


def serve_cluster(settings: Settings) -> None:
    """Start (or join) Ray, serve the front door on ``settings.host:port`` at once and
    deploy the replicas behind it; on SIGTERM or SIGINT drain, delete the application,
    shut Ray down and exit (statuses: the module docstring)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = KeyStore(settings.api_keys, settings.api_key_file)
    except KeyFileError as e:  # a broken key file: one plain line, not a traceback
        log.error("%s", e)
        sys.exit(EXIT_KEY_FILE)
    startup.report(settings, keys.keys)
    _start_ray(settings)
    relay = Relay(affinity=settings.routing == "affinity")
    application = build_app(settings)  # resources checked now: a clear exit before serving
    failed: list[str] = []

    async def deploy():
        log.info("starting %d replicas (%s routing)", settings.replicas, settings.routing)
        try:
            handle = await _in_daemon_thread(lambda: serve.run(
                application, name=APP_NAME, route_prefix=None))
        except Exception as e:
            log.error("the replicas failed to start: %s", e)
            failed.append(str(e))
            server.should_exit = True
            return
        relay.attach(handle)
        log.info("ready: %d replicas on http://%s:%d", settings.replicas, settings.host,
                 settings.port)

    server = uvicorn.Server(uvicorn.Config(
        front_app(settings, keys, relay, background=[deploy]),
        host=settings.host, port=settings.port, log_level=settings.log_level,
        log_config=None, access_log=False,  # the replicas log each request
        timeout_graceful_shutdown=settings.shutdown_timeout,
        http=guarded_protocol(settings)))  # header deadline, connections per address
    # uvicorn handles SIGTERM/SIGINT while it runs (stop listening, drain), then restores
    # these handlers and raises the signal again: a no-op then, so that the teardown
    # below runs (a Python handler, not SIG_IGN: that one children would inherit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # a port in use: SystemExit(3), after the teardown
    finally:
        log.info("shutting down")
        _stop_ray(settings)
    sys.exit(EXIT_LOAD_FAILED if failed else 0)
