"""Issue 9: no request may monopolise a shared resource.

Each hostile request of the issue goes to one real server subprocess while an innocent
request is sent half a second later (``Bystander``): the innocent text request must be
answered within 2 s (an innocent image request within 3 s, with 200), ``/health`` never
takes more than 1 s and always says 200, the server's RSS grows by less than ``RSS_BOUND_MB``, and the hostile
request gets a 4xx in OpenAI's envelope (never a 5xx, never a hang).  The last test
SIGTERMs the server with a grammar compile in flight and checks it exits within its
shutdown timeout.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import data_url, png_bytes

GRAMMAR_TIMEOUT = 3.0
VIDEO_DECODE_TIMEOUT = 0.1
SHUTDOWN_TIMEOUT = 4
RSS_BOUND_MB = 300
MODEL = "qwen3-vl"


# --------------------------------------------------------------------------- helpers

def chat(content="Say hi.", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 2, "temperature": 0, **kw}


def image_chat(*urls: str, text="Describe.", **kw) -> dict:
    parts = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u} if isinstance(u, str) else u}
        for u in urls]
    return chat(parts, **kw)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slow_schema(props: int = 200) -> dict:
    """Passes every cheap check (each bound under --max-grammar-repeat) but compiles for
    many seconds: only the time budget stops it."""
    return {"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": f"[a-z]{{1,{1000 - i}}}"} for i in range(props)}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


class Bystander:
    """Sends ``hostile`` (a callable returning an httpx.Response, or raising), then after
    0.5 s the ``innocent`` body, while /health is polled and RSS sampled."""

    def __init__(self, srv, hostile, innocent: dict | None = None):
        self.srv, self.hostile, self.innocent = srv, hostile, innocent or chat()
        self.health: list[float] = []
        self.health_status: list[int | str] = []
        self.rss0 = rss_mb(srv.proc.pid)
        self.rss_peak = self.rss0
        self.result: httpx.Response | BaseException | None = None
        self.hostile_s = self.innocent_s = None
        self.innocent_status = None

    def run(self) -> "Bystander":
        stop = threading.Event()

        def hostile():
            t0 = time.monotonic()
            try:
                self.result = self.hostile()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.result = exc
            self.hostile_s = time.monotonic() - t0

        def poll():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    self.health_status.append(httpx.get(
                        self.srv.url + "/health", timeout=10, trust_env=False).status_code)
                except httpx.HTTPError as exc:
                    self.health_status.append(type(exc).__name__)
                self.health.append(time.monotonic() - t0)
                self.rss_peak = max(self.rss_peak, rss_mb(self.srv.proc.pid))
                stop.wait(0.1)

        threads = [threading.Thread(target=hostile), threading.Thread(target=poll)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            r = httpx.post(self.srv.base_url + "/chat/completions", json=self.innocent,
                           timeout=60, trust_env=False)
            self.innocent_status = r.status_code
        except httpx.HTTPError as exc:
            self.innocent_status = type(exc).__name__
        self.innocent_s = time.monotonic() - t0
        threads[0].join(120)
        stop.set()
        threads[1].join(10)
        return self

    def check(self, innocent_limit: float = 2.0):
        assert self.innocent_status == 200, self.innocent_status
        assert self.innocent_s < innocent_limit, self.innocent_s
        assert max(self.health) < 1.0, max(self.health)
        assert set(self.health_status) == {200}, self.health_status  # answered, and healthy
        assert self.rss_peak - self.rss0 < RSS_BOUND_MB, (self.rss0, self.rss_peak)
        return self

    def refused(self, status: int = 400, code: str | None = None) -> dict:
        """The hostile request got ``status`` with OpenAI's error envelope."""
        r = self.result
        assert isinstance(r, httpx.Response), r
        assert r.status_code == status, (r.status_code, r.text[:500])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        if code is not None:
            assert err["code"] == code, err
        return err


def post(srv, body: dict | None = None, *, content: bytes | None = None, timeout=60):
    def send():
        if content is not None:
            return httpx.post(srv.base_url + "/chat/completions", content=content,
                              headers={"Content-Type": "application/json"}, timeout=timeout,
                              trust_env=False)
        return httpx.post(srv.base_url + "/chat/completions", json=body, timeout=timeout,
                          trust_env=False)
    return send


def concurrently(srv, body: dict, n: int, results: list):
    """A hostile callable: ``n`` identical requests at once; their responses go to
    ``results``."""
    def send():
        ts = [threading.Thread(target=lambda: results.append(post(srv, body, timeout=120)()))
              for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return results[0]
    return send


def log_status(srv, status: int) -> int:
    return len(re.findall(rf'"status": {status},', srv.log()))


# --------------------------------------------------------------------------- images

def progressive_scan_bomb(side: int = 6000, scans: int = 3000) -> bytes:
    """A valid progressive JPEG whose last scan is repeated ``scans`` times: each repeat
    costs a pass over the whole image, while the file stays small."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 30)).save(buf, "JPEG", progressive=True,
                                                       quality=10)
    data = buf.getvalue()
    last_sos = data.rindex(b"\xff\xda")
    scan = data[last_sos:-2]  # up to the EOI marker
    return data[:-2] + scan * scans + b"\xff\xd9"


def rle8_bmp(side: int = 64) -> bytes:
    """A BMP with BI_RLE8 compression (Pillow decodes it in Python)."""
    rows = b"".join(bytes([side, 7]) + b"\x00\x00" for _ in range(side)) + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + (offset + len(rows)).to_bytes(4, "little") + b"\0\0\0\0" + \
        offset.to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + side.to_bytes(4, "little") + \
        side.to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little") + \
        (1).to_bytes(4, "little") + len(rows).to_bytes(4, "little") + b"\0" * 8 + \
        (256).to_bytes(4, "little") + b"\0" * 4
    return header + info + palette + rows


def big_png(side: int = 5000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 90, 200)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- server

class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "data:image/png;base64,AAAA")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def redirect_origin():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://localhost:{srv.server_address[1]}/img.png"
    srv.shutdown()


def _start(server_factory):
    return server_factory("--grammar-timeout", str(GRAMMAR_TIMEOUT),
                          "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                          "--allowed-media-hosts", "localhost",
                          "--max-body-bytes", str(64 * 1024 * 1024),
                          "--video-decode-timeout", str(VIDEO_DECODE_TIMEOUT),
                          "--max-video-frame-pixels", str(1920 * 1088),
                          "--max-video-decoded-pixels", str(100_000_000))


@pytest.fixture(scope="module")
def srv(server_factory):
    return _start(server_factory)


# --------------------------------------------------------------------------- grammars

def test_grammar_repetition_bomb_is_refused_before_compiling(srv):
    """``[a-z]{1,20000}``: ~48 s of compiling on main; refused by the cheap check."""
    body = chat(response_format=schema_format(
        {"type": "object", "properties": {"a": {"type": "string",
                                                "pattern": "[a-z]{1,20000}"}}}))
    b = Bystander(srv, post(srv, body)).run().check()
    err = b.refused(400)
    assert "--max-grammar-repeat" in err["message"] and err["param"] == "response_format"
    assert b.hostile_s < 2


def test_slow_grammar_is_killed_at_its_time_budget(srv):
    """A schema under every bound that still compiles for many seconds: its worker
    process is killed at --grammar-timeout (400), and meanwhile others are served."""
    body = chat(response_format=schema_format(slow_schema()))
    b = Bystander(srv, post(srv, body)).run().check()
    err = b.refused(400)
    assert "--grammar-timeout" in err["message"], err
    assert b.hostile_s < GRAMMAR_TIMEOUT + 5, b.hostile_s
    assert "grammar worker killed (time budget spent)" in srv.log()


def tools(n: int, pad: int = 0) -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "d" * pad,
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
        for i in range(n)]


def test_thousands_of_tools_are_refused_by_count(srv):
    body = chat(tools=tools(2400), tool_choice="required")
    b = Bystander(srv, post(srv, body)).run().check()
    err = b.refused(400)
    assert err["param"] == "tools" and "--max-tools" in err["message"]
    assert b.hostile_s < 2


def test_tools_over_the_context_are_refused_before_their_grammar(srv):
    """128 tools whose rendered prompt exceeds the context: the context check comes first,
    so no grammar is compiled (or cached) for them."""
    before = srv.log().count("grammar worker")
    body = chat(tools=tools(128, pad=200), tool_choice="required")
    b = Bystander(srv, post(srv, body)).run().check()
    b.refused(400, code="context_length_exceeded")
    assert b.hostile_s < 3, b.hostile_s
    assert srv.log().count("grammar worker") == before


# --------------------------------------------------------------------------- images

def test_per_image_pixel_override_is_clamped(srv):
    """8 tiny PNGs each asking min_pixels = max_pixels = 16.7 Mpx: clamped to the server's
    --max-pixels (64 tokens each in these tests), answered fast, no memory spike."""
    huge = 16384 * 32 * 32
    part = {"url": data_url(png_bytes(64, 64)), "min_pixels": huge, "max_pixels": huge}
    b = Bystander(srv, post(srv, image_chat(*[part] * 8))).run().check()
    r = b.result
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    assert r.json()["usage"]["prompt_tokens"] < 8 * 64 + 40
    assert b.hostile_s < 5


def test_progressive_jpeg_scan_bomb_is_refused(srv):
    bomb = progressive_scan_bomb()
    assert len(bomb) < 1_000_000 and bomb.count(b"\xff\xda") > 1000
    innocent = image_chat(data_url(png_bytes(64, 48)))
    b = Bystander(srv, post(srv, image_chat(data_url(bomb, "image/jpeg"),
                                            data_url(bomb, "image/jpeg"))), innocent)
    b.run().check(innocent_limit=3.0)
    err = b.refused(400)
    assert "scans" in err["message"] and err["param"].endswith("image_url.url")


def test_rle_bmp_is_refused(srv):
    b = Bystander(srv, post(srv, image_chat(data_url(rle8_bmp(), "image/bmp"))),
                  image_chat(data_url(png_bytes(64, 48)))).run().check(innocent_limit=3.0)
    assert "RLE" in b.refused(400)["message"]


def test_large_legal_images_leave_a_decode_worker_for_small_ones(srv):
    """Four requests of four 25 Mpx PNGs each keep the decode pool busy for a while; an
    innocent small image still gets the worker kept for small images."""
    results: list = []
    many = concurrently(srv, image_chat(*[data_url(big_png())] * 4), 4, results)
    b = Bystander(srv, many, image_chat(data_url(png_bytes(64, 48)))).run()
    b.check(innocent_limit=3.0)
    assert all(r.status_code in (200, 400) for r in results), [r.status_code for r in results]


# --------------------------------------------------------------------------- videos

def video_chat(url: str, **opts) -> dict:
    return chat([{"type": "video_url", "video_url": {"url": url, **opts}},
                 {"type": "text", "text": "?"}])


def test_slow_videos_leave_a_decode_worker_for_a_photo(srv):
    """Four clips of 300 HD frames (every frame up to the last sampled one is decoded):
    their decodes run out of time (--video-decode-timeout 0.1 s here; one takes ~0.25 s on the 2-core box) and their workers
    are killed (400), and an innocent photo meanwhile gets the worker kept for small
    images."""
    from models.video import make_test_clip
    heavy = data_url(make_test_clip(seconds=5.0, fps=60, size=(1280, 720)), "video/mp4")
    results: list = []
    many = concurrently(srv, video_chat(heavy), 4, results)
    b = Bystander(srv, many, image_chat(data_url(png_bytes(64, 48)))).run()
    b.check(innocent_limit=3.0)
    assert all(r.status_code in (200, 400) for r in results), [r.status_code for r in results]
    assert any("timed out decoding video" in r.text for r in results), \
        [r.text[:200] for r in results]


def test_video_decode_bomb_is_refused_before_decoding(srv):
    """64 full-HD frames sampled from a 4 s clip are 133 M pixels: over
    --max-video-decoded-pixels (100 M here), refused from the header, before a frame is
    decoded, while an innocent request is served."""
    from models.video import make_test_clip
    bomb = data_url(make_test_clip(seconds=4.0, fps=16, size=(1920, 1080)), "video/mp4")
    b = Bystander(srv, post(srv, video_chat(bomb, fps=16))).run()
    b.check()
    err = b.refused(400)
    assert "too many pixels" in err["message"] and b.hostile_s < 2.0, (err, b.hostile_s)


def test_redirect_to_a_data_url_is_400(srv, redirect_origin):
    b = Bystander(srv, post(srv, image_chat(redirect_origin))).run().check()
    err = b.refused(400)
    assert "redirect" in err["message"] and err["param"].endswith("image_url.url")


# --------------------------------------------------------------------------- JSON walk

def test_huge_body_of_tiny_values_is_refused_before_parsing(srv):
    """16 MB of small numbers in an unknown field: counted (not parsed) and refused 413;
    /health keeps answering, memory stays flat."""
    raw = b'{"model": "qwen3-vl", "messages": [{"role": "user", "content": "hi"}], ' \
          b'"junk": [' + b"1," * 8_000_000 + b'1]}'
    b = Bystander(srv, post(srv, content=raw)).run().check()
    err = b.refused(413)
    assert "--max-json-elements" in err["message"]


def test_large_body_under_the_count_is_parsed_off_the_loop(srv):
    """400k values (under --max-json-elements): parsed in a thread, answered, /health
    unaffected."""
    raw = json.dumps({**chat(), "junk": list(range(400_000))}).encode()
    b = Bystander(srv, post(srv, content=raw)).run().check()
    assert isinstance(b.result, httpx.Response) and b.result.status_code == 200


def test_160k_content_parts_are_counted_before_validation(srv):
    """160k one-character text parts fit the byte and JSON-value limits; they are
    counted right after parsing and refused.  The last part is invalid: a validation
    error instead of the count's 400 would show that validation ran over all of them."""
    parts = [{"type": "text", "text": "a"}] * 160_000 + [{"type": "nope"}]
    raw = json.dumps(chat(parts)).encode()
    from server.api.body import count_values
    assert count_values(raw) < 500_000 and len(raw) < 64 * 2**20  # within the other limits
    b = Bystander(srv, post(srv, content=raw)).run().check()
    err = b.refused(400)
    assert "--max-content-parts" in err["message"] and err["param"] == "messages", err


# --------------------------------------------------------------------------- hang-ups

def _queue_depth(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10, trust_env=False).text
    m = re.search(r"^\w*queue_depth\S* (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_hang_up_during_compile_frees_the_place_and_logs_499(srv):
    n499 = log_status(srv, 499)
    body = chat(response_format=schema_format(slow_schema(199)))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base_url + "/chat/completions", json=body, timeout=1.0,
                   trust_env=False)
    deadline = time.monotonic() + 2.0
    while log_status(srv, 499) == n499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log_status(srv, 499) == n499 + 1, "hang-up not logged as 499 at once"
    assert _queue_depth(srv) == 0
    assert "grammar worker killed (client left)" in srv.log()


def test_body_upload_cut_is_logged_499(srv):
    n499, n400 = log_status(srv, 499), log_status(srv, 400)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                  + b'{"model": "qwen3-vl", "messages": [' + b" " * 1000)
        time.sleep(0.3)
    deadline = time.monotonic() + 3.0
    while log_status(srv, 499) == n499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log_status(srv, 499) == n499 + 1 and log_status(srv, 400) == n400


# --------------------------------------------------------------------------- sequential

def test_sequential_scheduler_refuses_what_it_cannot_honour(tiny_model):
    """Unit test of the service layer with a stand-in engine: each feature model.generate()
    cannot honour is a 400 naming the scheduler."""
    from server.api import protocol as p
    from server.errors import InvalidRequest
    from server.api.serving import ChatService
    from server.settings import Settings

    class Engine:
        model_id, vocab_size = "tiny", 1000

    svc = ChatService(Engine(), Settings(model_path=tiny_model, scheduler="sequential"),
                      fetcher=None, metrics=None)
    cases = {"logprobs": dict(logprobs=True), "logit_bias": dict(logit_bias={"5": 1.0}),
             "presence_penalty": dict(presence_penalty=0.5),
             "frequency_penalty": dict(frequency_penalty=0.5),
             "ignore_eos": dict(ignore_eos=True, response_format={"type": "json_object"})}
    for param, kw in cases.items():
        with pytest.raises(InvalidRequest) as e:
            svc._check(p.ChatCompletionRequest(**chat(**kw)))
        assert e.value.param == param and "sequential" in e.value.message
    svc._check(p.ChatCompletionRequest(**chat(ignore_eos=True)))  # fine without a grammar
    batching = ChatService(Engine(), Settings(model_path=tiny_model), fetcher=None,
                           metrics=None)
    for kw in cases.values():
        batching._check(p.ChatCompletionRequest(**chat(**kw)))


# --------------------------------------------------------------------------- SIGTERM

def test_sigterm_with_a_compile_in_flight_exits_within_the_timeout(server_factory):
    """A server of its own (it stops it: no test after it depends on the order)."""
    srv = _start(server_factory)
    body = chat(response_format=schema_format(slow_schema(198)))
    threading.Thread(target=lambda: _swallow(post(srv, body, timeout=30)), daemon=True).start()
    time.sleep(1.0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(SHUTDOWN_TIMEOUT + 20)
    elapsed = time.monotonic() - t0
    assert elapsed < SHUTDOWN_TIMEOUT + 2, elapsed
    assert rc == 0, rc


def _swallow(fn):
    try:
        fn()
    except Exception:
        pass
