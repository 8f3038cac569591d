"""The server's processes (issue 31): a supervisor, one engine-core process and
``--api-server-count`` API servers on one port (``server.supervisor``).

Faults: the engine core killed mid-stream (every open request answered within 5 s,
``/health`` 503, then a new engine and traffic again); one of two API servers killed
(the other's requests unaffected, a new one takes its place).  State that must hold
across API servers: per-key limits, queue places, ``/metrics`` totals.  Messages at
the boundary: the codec round trip (``server.messages``)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from server import messages
from server.engine.interface import EngineRequest, ImageInput, Output, SamplingParams, TokenLogprob
from server.errors import QueueTimeout, RateLimited

LONG = {"model": "qwen3-vl", "messages": [{"role": "user", "content": "Tell a story."}],
        "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def engine_pid(srv) -> int:
    """The engine core's pid, from its own log line (the latest, after a restart)."""
    pids = re.findall(r"engine core ready \(pid (\d+)\)", srv.log())
    return int(pids[-1])


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def health(srv) -> int:
    try:
        return httpx.get(srv.url + "/health", timeout=2, trust_env=False).status_code
    except httpx.HTTPError:
        return 0


def healthy_everywhere(srv) -> bool:
    """/health 200 from every API server (API_SERVERS of them under that variable): each
    learns of a new engine on its own, a heartbeat apart."""
    n = int(os.environ.get("API_SERVERS") or 1)
    seen: dict[str, int] = {}
    for _ in range(10 * n):  # fresh connections, until each server has answered one
        try:
            r = httpx.get(srv.url + "/health", timeout=2, trust_env=False)
        except httpx.HTTPError:
            return False
        seen[r.headers.get("x-api-server", "")] = r.status_code
        if len(seen) >= n:
            break
    return len(seen) >= n and all(code == 200 for code in seen.values())


# --- the codec ---------------------------------------------------------------------------

def test_request_round_trip_keeps_every_field_and_the_pixels():
    """An ``EngineRequest`` through ``encode_request``/``decode_request`` (as the engine
    receives it: the pixel frames as buffers) is the same request, pixel for pixel."""
    from server.engine.structured import GrammarSpec
    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8))
    params = SamplingParams(max_tokens=7, temperature=0.3, stop=["\n"], seed=5, n=2,
                            logprobs=True, top_logprobs=3, logit_bias={17: -2.5},
                            grammar=GrammarSpec.json_schema({"type": "object"}))
    req = EngineRequest("r1", [{"role": "user", "content": [{"type": "image"}]}],
                        [ImageInput(pic, 4096, 65536, "sha:abc")], params,
                        tools=[{"type": "function", "function": {"name": "f"}}],
                        key="shop", cache_salt="s1", stream=False)
    wire, frames = messages.encode_request(req)
    header = messages.unpack(messages.pack("gen", "1", 9, wire))
    back = messages.decode_request(header[3], [memoryview(bytes(f)) for f in frames])
    assert back.params == params and back.messages == req.messages and back.tools == req.tools
    assert (back.key, back.cache_salt, back.stream) == ("shop", "s1", False)
    im = back.images[0]
    assert (im.min_pixels, im.max_pixels, im.digest) == (4096, 65536, "sha:abc")
    assert np.array_equal(np.asarray(im.image), np.asarray(pic))
    from server.textprep import PromptPieces
    req.pieces, req.messages, req.tools = PromptPieces([[1, 2], [3]], ["image"]), [], None
    wire, frames = messages.encode_request(req)
    back = messages.decode_request(messages.unpack(messages.pack(wire))[0], frames)
    assert back.pieces == req.pieces and back.messages == [] and back.tools is None


def test_an_api_server_keeps_the_newest_health_of_its_current_engine():
    """Health reports come on two sockets (heartbeats, failed steps' errors): an older
    one (fewer failed steps) or one from an engine that has since restarted is ignored."""
    from types import SimpleNamespace
    from server.api.engine_client import EngineClient
    c = SimpleNamespace(_epoch="e2", _health_at=0, _healthy=True)
    note = EngineClient._note_health
    note(c, False, 3, "e1")       # the old engine's error, read late
    assert c._healthy is True
    note(c, False, 3, "e2")
    note(c, True, 2)              # a heartbeat sent before that failure
    assert (c._healthy, c._health_at) == (False, 3)
    note(c, True, 3)              # recovered (cooldown), same count
    assert c._healthy is True


def test_decoded_pixels_are_packed_once_and_only_passed_on():
    """A photo's pixels are packed once, in the decode worker (``RGBPixels``); the same
    bytes object is the ZeroMQ frame, and the engine reads the frame's buffer as it is:
    no PIL repack on the way (``tobytes`` costs ~0.8 ms per 512 x 512 image each time).
    The engine's array equals the PIL decode's, pixel for pixel."""
    import io
    from server.api.media import MediaPolicy, _decode_job, decode_image_bytes
    from models.vision_prep import as_uint8_hwc
    buf = io.BytesIO()
    Image.effect_noise((96, 64), 60).convert("RGB").save(buf, "JPEG", quality=90)
    pixels = _decode_job(buf.getvalue(), MediaPolicy(), "p", None)
    wire, frames = messages.encode_request(EngineRequest(
        "r", [], [ImageInput(pixels, 4096, 65536, "d")], SamplingParams()))
    assert frames[0] is pixels.data  # handed on, not repacked
    frame = memoryview(bytes(frames[0]))
    back = messages.decode_request(wire, [frame]).images[0].image
    # the engine's array is a view of the frame itself
    assert np.shares_memory(np.asarray(back), np.frombuffer(frame, np.uint8))
    pil = decode_image_bytes(buf.getvalue(), MediaPolicy(), param="p")
    assert back.size == pil.size and pixels.info == pil.info  # original size for grounding
    assert np.array_equal(as_uint8_hwc(back).numpy(), as_uint8_hwc(pil).numpy())


def test_prefill_notice_and_errors_travel_with_the_steps():
    """The engine's output thread turns a prefill notice (from the model thread) and a
    failure into step records; the API server's ``StepOutput`` hands the notice to the
    request's hook (the key pays for the prompt from then on) and the error to its
    stream, each only for a request it still has open.  A failed batch step's error
    carries the engine's health, which the API server takes before it answers (a
    client told 503 finds /health 503, not the heartbeat's older word)."""
    import asyncio
    import queue
    from server.engine.proc import RemoteOutput, pack_step
    from server.api.engine_client import StepOutput
    from server.errors import Overloaded

    class RemoteSink:
        ident, rid = b"api0", "8"
    entry = type("E", (), {"seqs": [], "sink": RemoteSink()})()
    records = RemoteOutput._records([("prefill", b"api0", "7", 321),
                                     ("prefill", b"api0", "gone", 5),
                                     ("fail", [entry], Overloaded(retry_after=1),
                                      [False, 3, "e1"])])
    assert records == {b"api0": [
        ["7", messages.PREFILLED, 321, None, None, None, None],
        ["gone", messages.PREFILLED, 5, None, None, None, None],
        ["8", messages.FAILED, [False, 3, "e1"], None, None,
         messages.encode_error(Overloaded(retry_after=1)), None]]}

    async def api_side():
        heard, events = [], queue.SimpleQueue()
        client = type("C", (), {"api_id": "api0", "_loop": asyncio.get_running_loop(),
                                "_note_health": lambda self, *state: heard.append(
                                    (*state, events.empty()))})()
        from tokenizers import Tokenizer, models
        tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).to_str()
        out = StepOutput(client, "ipc:///nonexistent-test-socket", tok)
        try:
            from server.engine.output import Sink
            for rid, hook in (("7", heard.append), ("8", None)):
                req = EngineRequest("x", [], [], SamplingParams(n=1), on_prefill=hook)
                out.open(rid, req, Sink(asyncio.get_running_loop(), events.put))
            out.feed([messages.unpack(pack_step(records[b"api0"]))])
            await asyncio.sleep(0.05)  # deliveries go through the loop
        finally:
            out.close()
        return heard, events
    heard, events = asyncio.run(api_side())
    # "gone" is not open here: nobody to charge; the health came before the error
    assert heard == [321, (False, 3, "e1", True)], heard
    got = events.get_nowait()
    assert isinstance(got, Overloaded) and got.headers == {"Retry-After": "1"}, got


def test_a_prefill_is_charged_even_when_the_client_left_first():
    """The engine notes a scheduled prefill on the key's ticket itself: a client that
    left before its API server read the prefill notice (its ticket finished with the 0
    tokens that server knew of) is still charged the prompt.  The request carries its
    ticket's id through the codec."""
    from server.engine.proc import EngineCore
    from server.settings import Settings
    noticed = []
    core = EngineCore(Settings(), "ipc:///nonexistent-test-socket")
    core.output = type("O", (), {"put_prefill": lambda self, *a: noticed.append(a)})()
    clock = [100.0]
    core.limiter.clock = lambda: clock[0]
    level = lambda: core.limiter._states["shop"].tokens.level  # noqa: E731
    for prefill in (None, 300):
        tid = core._admit("shop", [None, 6000, None], 50, 1)
        req = EngineRequest("x", [], [], SamplingParams(), key="shop", ticket=tid)
        wire, frames = messages.encode_request(req)
        assert messages.decode_request(wire, frames).ticket == tid
        before = level()
        if prefill is not None:  # the model thread schedules it; then the client leaves
            core._prefilled(b"api0", "7", core.tickets[tid], prefill)
        core._cast("finish", [tid, 0])
        assert before - level() == (prefill or 0) - 50, (prefill, before, level())
    assert noticed == [(b"api0", "7", 300)]  # the notice still goes to the API server


def test_steps_for_an_api_server_not_connected_yet_are_kept_and_sent_later(tmp_path):
    """The model thread sends the steps itself: a record for an API server whose step
    socket is not connected yet is kept, the model thread is asked back soon (``tick``),
    and it arrives once that server connects, before newer records."""
    import zmq
    from server.engine.proc import RemoteOutput, UNSENT_RETRY_S
    addr = f"ipc://{tmp_path}/out"
    out = RemoteOutput(addr)(None)
    try:
        out.put_prefill(b"api9", "1", 5)
        assert out.tick() == UNSENT_RETRY_S  # kept: come back soon
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"api9")
        sock.connect(addr)
        deadline = time.monotonic() + 10
        while out.tick() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        out.put_prefill(b"api9", "2", 6)
        got = [messages.unpack(sock.recv()) for _ in range(2) if sock.poll(5000)]
        sock.close(0)
    finally:
        out.stop()
    assert [r[1][0][:3] for r in got] == [["1", messages.PREFILLED, 5],
                                         ["2", messages.PREFILLED, 6]], got


def test_failing_to_send_steps_ends_the_engine_process(tmp_path):
    """Should sending the engine's steps ever fail (other than to an API server not
    connected yet), no step would reach an API server again: the process exits (for the
    supervisor to restart it) instead of hanging every open request."""
    code = ("import time\n"
            "from server.engine.proc import RemoteOutput\n"
            f"out = RemoteOutput('ipc://{tmp_path}/out')\n"
            "out._records = lambda items: 1 / 0\n"
            "out(None)\n"
            "out.put_prefill(b'api0', '1', 3)\n"
            "time.sleep(30)\n")
    from server.lifecycle import EXIT_THREAD_FAILED
    from tests.conftest import fresh_python
    proc = fresh_python(code, timeout=60)
    assert proc.returncode == EXIT_THREAD_FAILED, proc.stderr[-2000:]
    assert "sending the engine's steps failed" in proc.stderr


def test_outputs_and_errors_round_trip():
    """Outputs (logprobs as wire JSON or as ``TokenLogprob``) and typed errors come back
    as they were sent: the client renders the same envelope, status and headers."""
    outs = [Output(0, "hé", [5, 6], "stop", 10, 2, ['{"token":"x"}'], cached_tokens=4,
                   image_tokens=3, video_tokens=1),
            Output(1, "", [7], None, 10, 1, [TokenLogprob("a", -0.5, [("a", -0.5, [97])],
                                                          [97], 7, [7])])]
    wire = messages.unpack(messages.pack("out", [["r", messages.encode_outputs(outs)]]))
    assert messages.decode_outputs(wire[1][0][1]) == outs
    for err in (RateLimited("slow down", retry_after=3),
                QueueTimeout("waited", retry_after=2)):
        back = messages.decode_error(messages.unpack(messages.pack(
            messages.encode_error(err)))[0])
        assert type(back) is type(err) and back.envelope() == err.envelope()
        assert back.status == err.status and back.headers == err.headers
    assert messages.decode_error(messages.encode_error(KeyError("x"))).status == 500


# --- faults ------------------------------------------------------------------------------

def test_engine_killed_mid_stream_answers_everyone_then_comes_back(server_factory):
    """SIGKILL to the engine core while a stream and a plain request run: both are
    answered within 5 s (an error event and [DONE]; a 503 envelope), /health turns 503,
    the supervisor starts a new engine, and the next request is served."""
    srv = server_factory("--shutdown-timeout", "5")
    http = httpx.Client(base_url=srv.url, timeout=60, trust_env=False)
    lines: list[str] = []
    killed: list[float] = []

    def stream():
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 3:
                        os.kill(engine_pid(srv), signal.SIGKILL)
                        killed.append(time.monotonic())

    with ThreadPoolExecutor(2) as ex:
        plain = ex.submit(http.post, "/v1/chat/completions", json=LONG)
        ex.submit(stream).result()
        ended = time.monotonic()
        r = plain.result()
        plain_ended = time.monotonic()
    assert ended - killed[0] < 5 and plain_ended - killed[0] < 5
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2][6:])["error"]["code"] == "service_unavailable", lines[-2]
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    wait_for(lambda: health(srv) == 503, 5, "/health 503 after the engine died")
    wait_for(lambda: healthy_everywhere(srv), 90, "/health 200 again (a new engine)")
    again = http.post("/v1/chat/completions", json={**LONG, "max_tokens": 5})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
    log = srv.log()
    assert "starting a new one (restart 1 of 5)" in log, log[-3000:]
    assert srv.proc.poll() is None


def test_engine_that_keeps_dying_ends_the_server_with_status_4(server_factory):
    """``--engine-restarts 0``: the first engine death ends the server (exit 4), for the
    operator's supervisor (systemd, Docker) to act on."""
    srv = server_factory("--engine-restarts", "0")
    os.kill(engine_pid(srv), signal.SIGKILL)
    assert srv.proc.wait(timeout=30) == 4
    assert "giving up (exit 4)" in srv.log()


def test_one_api_server_killed_loses_only_its_own_requests(server_factory):
    """Two API servers; streams on both; SIGKILL one of them.  The other's streams run to
    their end untouched, the engine aborts the dead one's rows, a new API server takes
    its place and both serve again."""
    srv = server_factory("--api-server-count", "2")
    req = {**LONG, "max_tokens": 400, "stream": True}
    victim: list[str] = []
    results: dict[int, tuple] = {}

    def stream(i: int):
        lines, server = [], None
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=req, timeout=60,
                              trust_env=False) as r:
                server = r.headers["x-api-server"]
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 20 and not victim and server == "api0":
                            victim.append(server)
                            os.kill(api_pid(srv, 0), signal.SIGKILL)
        except httpx.HTTPError as e:
            results[i] = (server, "cut", repr(e))
            return
        results[i] = (server, lines[-1], lines[-2])

    def api_pid(srv, index: int) -> int:
        return int(re.findall(rf"API server api{index} \(pid (\d+)\) connected", srv.log())[-1])

    for _ in range(8):  # connections are spread by the kernel: until both servers have some
        results.clear()
        victim.clear()
        with ThreadPoolExecutor(12) as ex:
            list(ex.map(stream, range(12)))
        if victim and {s for s, *_ in results.values()} == {"api0", "api1"}:
            break
    assert victim, f"no stream landed on api0: {results}"
    served_by = {s for s, *_ in results.values()}
    assert served_by == {"api0", "api1"}, results
    for server, last, before in results.values():
        if server == "api1":  # untouched: ran to max_tokens
            assert last == "data: [DONE]", (last, before)
            assert json.loads(before[6:])["choices"][0]["finish_reason"] == "length", before
        else:
            assert last == "cut" or "error" in before, (server, last, before)
    wait_for(lambda: "API server 0" in srv.log() and "starting a new one" in srv.log(), 10,
             "the supervisor replaces the dead API server")
    log = srv.log()
    assert re.search(r"API server api0 \(pid \d+\) exited: aborting its [1-9]\d* request",
                     log), log[-3000:]
    seen = set()
    wait_for(lambda: seen.update([httpx.post(
        srv.url + "/v1/chat/completions", json={**LONG, "max_tokens": 2}, trust_env=False,
        timeout=30, headers={"connection": "close"}).headers["x-api-server"]]) or seen == {
        "api0", "api1"}, 60, "both API servers serve again")


# --- state across API servers ------------------------------------------------------------

def connection_per_server(srv, headers: dict, tries: int = 10) -> dict[str, httpx.Client]:
    """A keep-alive connection held on each API server: the kernel hands a new connection
    to either process (they share the socket), and it stays with that one.  Opened 8 at
    a time (``GET /health`` tells which process took it) until both have one."""
    found: dict[str, httpx.Client] = {}
    for _ in range(tries):
        clients = [httpx.Client(base_url=srv.url, headers=headers, trust_env=False, timeout=30)
                   for _ in range(8)]
        with ThreadPoolExecutor(8) as ex:
            names = list(ex.map(lambda c: c.get("/health").headers["x-api-server"], clients))
        for name, c in zip(names, clients):
            if name not in found:
                found[name] = c
            else:
                c.close()
        if set(found) >= {"api0", "api1"}:
            return found
    raise AssertionError(f"the kernel never gave the second API server a connection: {found}")


def test_key_limits_and_metrics_hold_across_api_servers(server_factory, tmp_path):
    """A key allowed 6 requests a minute, its requests spread over two API servers: the
    7th is refused whichever server takes it (the count lives in the engine core), and
    /metrics on one server counts the requests both answered."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: shop\n    key: sk-shop\n    requests_per_minute: 6\n"
                    "  - name: ops\n    key: sk-ops\n    operator: true\n")
    srv = server_factory("--api-server-count", "2", "--api-key-file", str(keys))

    conns = connection_per_server(srv, {"authorization": "Bearer sk-shop"})

    def send(server: str) -> httpx.Response:
        r = conns[server].post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
        assert r.headers["x-api-server"] == server
        return r
    answers = [send(server) for server in ("api0", "api1") * 3]
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    refused = [send(server) for server in ("api0", "api1") * 2]
    assert {r.status_code for r in refused} == {429}, [r.text for r in refused]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    metrics = httpx.get(srv.url + "/metrics", headers={"authorization": "Bearer sk-ops"},
                        trust_env=False).text
    ok = re.search(r'qwen_vl_key_requests_total\{key="shop",status="200"\} (\S+)', metrics)
    limited = re.search(r'qwen_vl_key_rate_limited_total\{key="shop"\} (\S+)', metrics)
    assert ok and float(ok.group(1)) == 6 and limited and float(limited.group(1)) == 4, metrics
    assert re.search(r"qwen_vl_decode_steps_total \d", metrics)  # the engine's own figures


def test_a_place_from_an_engine_that_has_since_restarted_is_not_used(tmp_path):
    """A queue place numbered by an engine that restarted while the request fetched its
    images means nothing to the new engine (which numbers its own from 1): the request
    gets a 503 at once, and the place is neither sent nor released there."""
    import asyncio
    from server.api.engine_client import EngineClient
    from server.errors import ServiceUnavailable

    async def run():
        client = EngineClient(f"ipc://{tmp_path}/engine", "api0")
        sent = []
        client._cast = lambda *a: sent.append(a)
        client._send = lambda *a: sent.append(a)
        try:
            client._epoch = "old"
            client._ready.set()
            place = await client.reserve(deferred=True)
            assert not place.stale()  # taken by whichever engine the request reaches
            from server.api.engine_client import _Reservation
            old = _Reservation(client, 7, "old")
            client._epoch = "new"  # the engine restarted
            assert old.stale()
            with pytest.raises(ServiceUnavailable):
                await anext(client.generate(
                    EngineRequest("r", [], [], SamplingParams(), prompt_token_ids=[1]), old))
            assert not old.held and sent == []  # nothing went to the new engine
        finally:
            await client.shutdown(1)
    asyncio.run(run())
