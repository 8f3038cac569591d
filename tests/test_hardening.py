"""Issue 5, "Hardened for a LAN": a table of bad inputs against one real server subprocess.

Every case asserts the exact status, OpenAI's error envelope ``{"error": {"message",
"type", "param", "code"}}``, the ``param`` where one applies, and that the message leaks
no traceback, memory address or server path.  After the table the server must still
answer a normal request, no case may have produced a 5xx (checked by our own count, by
``/metrics`` and by the server log) and a summary line is written:

    hardening: N bad inputs tried, 0 5xx

It appears in pytest's terminal summary (also under ``-q``, without ``-s``) and, as
JSON, in ``<pytest basetemp>/hardening-summary.json``.

Image URLs only ever point at a local HTTP server on 127.0.0.1 (reached through the
allow-listed name ``localhost``) or at addresses the server must refuse *before*
connecting; nothing here sends traffic off the machine.
"""

from __future__ import annotations

import base64
import http.server as http_server
import io
import json
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.conftest import summary_fixture, ROOT, data_url, png_bytes

KEY = "sk-lan-test-key"
BODY_CAP = 1_000_000         # --max-body-bytes
IMAGE_CAP = 300_000          # --max-image-bytes
FETCH_TIMEOUT = 2            # --fetch-timeout
MAX_IMAGES = 4               # --max-images-per-request
MODEL = "qwen3-vl"
IMG0 = "messages[0].content[1].image_url.url"   # param of the first image part
ANY = object()                                   # "param not checked"

STATS: dict[str, Any] = {"tried": 0, "5xx": 0, "statuses": {}, "cases": 0}


# --------------------------------------------------------------------------- summary

summary = summary_fixture("hardening", STATS, lambda: f"hardening: {STATS['tried']} bad inputs tried, {STATS['5xx']} 5xx")


# --------------------------------------------------------------------------- local HTTP

@dataclass
class Origin:
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"


def _make_handler(origin: Origin):
    ok_png = png_bytes(64, 48)

    class Handler(http_server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"   # close-delimited bodies: the endless one needs it

        def log_message(self, *a):
            pass

        def _head(self, status: int, ctype: str, length: int | None = None, extra=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length is not None:
                self.send_header("Content-Length", str(length))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()

        def do_GET(self):
            path = self.path.split("?")[0]
            origin.hits.append(path)
            try:
                if path in ("/ok.png", "/direct.png", "/redirect-target.png"):
                    self._head(200, "image/png", len(ok_png))
                    self.wfile.write(ok_png)
                elif path == "/redirect":
                    self._head(302, "text/plain", 0,
                               [("Location", origin.url("/redirect-target.png", "127.0.0.1"))])
                elif path == "/slow.png":  # a byte every 0.25 s, for at most 15 s
                    self._head(200, "image/png", 10_000)
                    for i in range(60):
                        self.wfile.write(ok_png[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.25)
                elif path == "/endless.png":  # no length, never ends (until 64 MiB)
                    self._head(200, "image/png")
                    chunk = ok_png[:8] + b"\0" * 65528
                    for _ in range(1024):
                        self.wfile.write(chunk)
                elif path == "/big.png":  # declares more than --max-image-bytes
                    self._head(200, "image/png", 50_000_000)
                    self.wfile.write(ok_png)
                elif path == "/page.html":
                    body = b"<!doctype html><html><body>not an image</body></html>"
                    self._head(200, "text/html; charset=utf-8", len(body))
                    self.wfile.write(body)
                else:
                    self._head(404, "text/plain", 9)
                    self.wfile.write(b"not found")
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture(scope="module")
def origin():
    o = Origin(0)
    httpd = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(o))
    httpd.daemon_threads = True
    o.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield o
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hardening-media")
    d = base / "allowed"
    d.mkdir()
    (d / "ok.png").write_bytes(png_bytes(32, 32))
    (base / "secret.png").write_bytes(png_bytes(32, 32))       # outside the allowed dir
    os.symlink("/etc/passwd", d / "passwd-link.png")
    os.symlink(base / "secret.png", d / "secret-link.png")
    return d


@pytest.fixture(scope="module")
def hsrv(server_factory, media_dir, origin):
    return server_factory(
        "--api-key", KEY, "--max-images-per-request", str(MAX_IMAGES),
        "--allowed-local-media-path", str(media_dir), "--allowed-media-hosts", "localhost",
        "--fetch-timeout", str(FETCH_TIMEOUT), "--max-body-bytes", str(BODY_CAP),
        "--max-image-bytes", str(IMAGE_CAP), "--max-new-tokens", "4")


@pytest.fixture(scope="module")
def keyed(hsrv):
    with httpx.Client(base_url=hsrv.url, timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


# --------------------------------------------------------------------------- payloads

def chat(content: Any = "Hello", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **kw}


def img(url: str, *more: str, **kw) -> dict:
    parts = [{"type": "text", "text": "What is in the picture?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in (url, *more)]
    return chat(parts, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(side: int = 8000) -> bytes:
    """A valid greyscale PNG of side x side black pixels: ~60 KB that decode to 64 MB."""
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)          # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def gif_frames(frames: int, side: int = 32) -> bytes:
    from PIL import Image
    imgs = [Image.new("P", (side, side), i % 200) for i in range(frames)]
    for i, im in enumerate(imgs):
        im.putpixel((i % side, (i // side) % side), 255)
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=10, loop=0)
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    status: int
    param: Any                                  # expected "param" (None allowed); ANY: skip
    build: Callable[[Any], dict]                # ctx -> httpx.request kwargs
    code: str | None = None                     # expected "code" when given
    check: Callable[[Any, httpx.Response], None] | None = None
    # a regex the error message must match: the guard's own reason, where a 400 could
    # also come from something else (an unreachable address, a missing file)
    reason: str | None = None


def post(body=None, *, raw: bytes | None = None, headers: dict | None = None,
         path: str = "/v1/chat/completions", method: str = "POST", auth: bool = True):
    """Request kwargs for ``httpx.Client.request``; ``auth=False`` sends no API key."""
    def build(ctx):
        kw: dict = {"method": method, "url": path, "auth": auth}
        if raw is not None:
            kw["content"] = raw
            kw["headers"] = {"Content-Type": "application/json"}
        elif body is not None:
            kw["json"] = body(ctx) if callable(body) else body
        if headers is not None:
            kw["headers"] = {**kw.get("headers", {}), **headers}
        return kw
    return build


def _not_hit(path: str):
    def check(ctx, r):
        assert path not in ctx.origin.hits, f"the server connected to {path}"
    return check


def _redirect_checked(ctx, r):
    assert "/redirect" in ctx.origin.hits, "the first (allowed) hop was never fetched"
    assert "/redirect-target.png" not in ctx.origin.hits, "followed a redirect to loopback"


def _one_image_tokens(ctx, r):
    # the 1000-frame GIF costs exactly what its first frame alone costs
    single = ctx.http.post("/v1/chat/completions",
                           json=img(data_url(gif_frames(1), "image/gif"))).json()
    assert r.json()["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]


def _chunked_over_cap():
    def gen():
        yield b'{"model": "qwen3-vl", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_CAP // 50_000 + 2):
            yield b"x" * 50_000
        yield b'"}]}'
    return {"method": "POST", "url": "/v1/chat/completions", "content": gen(), "auth": True,
            "headers": {"Content-Type": "application/json"}}  # no length: chunked


def _quick(limit: float):
    def check(ctx, r):
        assert r.elapsed.total_seconds() < limit, r.elapsed
    return check


CASES: list[Case] = [
    # --- JSON and types -----------------------------------------------------------
    Case("malformed-json", 400, None, post(raw=b'{"model": "qwen3-vl", "messages": [')),
    Case("empty-body", 400, None, post(raw=b"")),
    Case("json-array-body", 400, None, post(raw=b"[1, 2, 3]")),
    Case("json-null-body", 400, None, post(raw=b"null")),
    Case("invalid-utf8-body", 400, None, post(raw=b'{"model": "\xff\xfe"}')),
    Case("deeply-nested-json", 400, None,
         post(raw=b'{"model": "qwen3-vl", "messages": ' + b"[" * 20000 + b"]" * 20000 + b"}")),
    Case("5000-digit-integer", 400, None,
         post(raw=b'{"model": "qwen3-vl", "messages": [{"role": "user", "content": "x"}], '
                  b'"max_tokens": 1' + b"0" * 5000 + b"}")),
    Case("model-wrong-type", 400, "model", post({"model": 7, "messages": [
        {"role": "user", "content": "hi"}]})),
    Case("messages-wrong-type", 400, "messages", post({"model": MODEL, "messages": "hi"})),
    Case("content-wrong-type", 400, "messages[0].content", post(chat(12345))),
    Case("role-unknown", 400, "messages[0].role", post({"model": MODEL, "messages": [
        {"role": "wizard", "content": "hi"}]})),
    Case("temperature-string", 400, "temperature", post(chat(temperature="hot"))),
    Case("temperature-out-of-range", 400, "temperature", post(chat(temperature=9))),
    Case("temperature-nan", 400, "temperature", post(raw=json.dumps(chat()).encode()[:-1]
                                                     + b', "temperature": NaN}')),
    Case("max-tokens-zero", 400, "max_tokens", post(chat(max_tokens=0))),
    Case("max-tokens-infinite", 400, "max_tokens", post(raw=json.dumps(
        chat()).replace('"max_tokens": 4', '"max_tokens": 1e400').encode())),
    Case("n-fractional", 400, "n", post(chat(n=1.5))),
    Case("empty-messages", 400, "messages", post({"model": MODEL, "messages": []})),
    Case("message-without-content", 400, "messages[0]", post({"model": MODEL, "messages": [
        {"role": "user"}]})),
    Case("missing-model", 400, "model", post({"messages": [{"role": "user", "content": "hi"}]})),
    Case("unknown-model", 404, "model", post({**chat(), "model": "gpt-4o"}),
         code="model_not_found"),
    Case("lone-surrogate-in-text", 400, "messages[0].content",
         post(raw=b'{"model": "qwen3-vl", "max_tokens": 4, "messages": '
                  b'[{"role": "user", "content": "hi \\ud800 there"}]}')),
    Case("lone-surrogate-in-model", 400, "model",
         post(raw=b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}')),
    Case("five-stop-sequences", 400, "stop", post(chat(stop=["a", "b", "c", "d", "e"]))),
    Case("logit-bias-not-an-id", 400, ANY, post(chat(logit_bias={"hello": 5}))),
    Case("logit-bias-unicode-digit", 400, ANY, post(chat(logit_bias={"\u00b2": 5}))),
    Case("logit-bias-negative-id", 400, "logit_bias.-1", post(chat(logit_bias={"-1": 5}))),
    Case("logit-bias-id-past-vocab", 400, "logit_bias.999999999",
         post(chat(logit_bias={"999999999": 5}))),
    Case("response-format-unknown-type", 400, "response_format.type",
         post(chat(response_format={"type": "xml"}))),
    Case("image-placeholder-in-text", 400, "messages", post(chat("look: <|image_pad|>"))),
    Case("tool-schema-nested-800-deep", 400, "tools[0].function.parameters", post(raw=(
        b'{"model": "qwen3-vl", "max_tokens": 2, "messages": [{"role": "user", "content": '
        b'"x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": '
        + b'{"a":' * 800 + b"1" + b"}" * 800 + b"}}]}"))),
    # issue 27: every text counts before the template renders it
    Case("tools-description-over-the-text-limit", 400, "tools", post(chat(tools=[{
        "type": "function", "function": {"name": "f", "description": "d" * 300_000}}]))),
    Case("tool-call-arguments-over-the-text-limit", 400, "messages", post({
        "model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "f", "arguments": '"' + "a" * 300_000 + '"'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})),
    # too deep to parse: counted and rendered as text (no 500 from the estimate), then
    # longer than the context
    Case("tool-call-arguments-nested-90k-deep", 400, "messages", post({
        "model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "[" * 90_000 + "]" * 90_000}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
         code="context_length_exceeded"),
    Case("cache-salt-too-long", 400, "cache_salt", post(chat(cache_salt="s" * 300))),
    Case("schema-requires-an-undeclared-property", 400, "response_format", post(chat(
        response_format={"type": "json_schema", "json_schema": {"name": "g", "schema": {
            "type": "object", "required": ["ghost"], "properties": {}}}}))),
    Case("tool-call-arguments-nested-900-deep-ok", 200, ANY, post({
        "model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "[" * 900 + "]" * 900}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})),
    # --- images: data URLs ----------------------------------------------------------------
    Case("bad-base64", 400, IMG0, post(img("data:image/png;base64,iVBORw0KGgo@@@@"))),
    Case("data-url-not-image-mime", 400, IMG0,
         post(img("data:text/plain;base64," + base64.b64encode(b"hello").decode()))),
    Case("non-image-bytes", 400, IMG0,
         post(img(data_url(b"%PDF-1.7 this is not an image at all")))),
    Case("truncated-png", 400, IMG0, post(img(data_url(png_bytes(64, 64)[:120])))),
    Case("one-pixel-image-ok", 200, ANY, post(img(data_url(png_bytes(1, 1))))),
    Case("aspect-ratio-300-to-1", 400, IMG0, post(img(data_url(png_bytes(600, 2))))),
    Case("decompression-bomb-png", 400, IMG0, post(lambda ctx: img(data_url(bomb_png())))),
    Case("gif-1000-frames-first-frame", 200, ANY,
         post(lambda ctx: img(data_url(gif_frames(1000), "image/gif"))),
         check=_one_image_tokens),
    Case("tiff-unsupported", 400, IMG0,
         post(img(data_url(png_bytes(32, 32, fmt="TIFF"), "image/tiff")))),
    Case("image-over-max-image-bytes", 413, IMG0,
         post(lambda ctx: img(data_url(noise_png(400)))), code="payload_too_large"),
    Case("too-many-images", 400, "messages",
         post(img(*[data_url(png_bytes(8, 8))] * (MAX_IMAGES + 1)))),
    Case("image-in-system-message", 400, "messages[0].content[0]", post({
        "model": MODEL, "max_tokens": 4, "messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {
                "url": data_url(png_bytes(8, 8))}}]},
            {"role": "user", "content": "hi"}]})),
    Case("min-pixels-over-max-pixels", 400, "messages[0].content[0].image_url", post(chat([{
        "type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8)),
                                           "min_pixels": 10**9, "max_pixels": 4096}}]))),
    Case("video-url-private", 400, "messages[0].content[0].video_url.url",
         post(chat([{"type": "video_url", "video_url": {"url": "http://10.0.0.1/v.mp4"}}])),
         reason="host is not allowed"),
    Case("video-url-metadata", 400, "messages[0].content[0].video_url.url",
         post(chat([{"type": "video_url", "video_url": {
             "url": "http://169.254.169.254/latest/v.mp4"}}])), reason="host is not allowed"),
    Case("video-frame-list-private", 400, "messages[0].content[0].video_url.url[1]",
         post(chat([{"type": "video_url", "video_url": {
             "url": [data_url(png_bytes(8, 8)), "http://10.0.0.1/f.png"]}}])),
         reason="host is not allowed"),
    Case("video-other-spelling", 400, "messages[0].content[0]",
         post(chat([{"type": "video", "video": "http://localhost/v.mp4"}]))),
    # --- images: URLs (SSRF) ---------------------------------------------------------------
    Case("url-127.0.0.1", 400, IMG0,
         post(lambda ctx: img(ctx.origin.url("/direct.png", "127.0.0.1"))),
         check=_not_hit("/direct.png"), reason="host is not allowed"),
    Case("url-metadata-169.254.169.254", 400, IMG0,
         post(img("http://169.254.169.254/latest/meta-data/")), reason="host is not allowed"),
    Case("url-private-10.0.0.1", 400, IMG0, post(img("http://10.0.0.1/cam.jpg")), reason="host is not allowed"),
    Case("url-decimal-ip-2130706433", 400, IMG0, post(img("http://2130706433/")),
         reason="host is not allowed"),
    Case("url-ipv4-mapped-ipv6", 400, IMG0, post(img("http://[::ffff:127.0.0.1]/")),
         reason="host is not allowed"),
    Case("url-ipv6-loopback", 400, IMG0, post(img("http://[::1]/x.png")), reason="host is not allowed"),
    Case("url-unspecified-0", 400, IMG0, post(img("http://0/x.png")), reason="host is not allowed"),
    Case("url-with-credentials", 400, IMG0,
         post(lambda ctx: img(f"http://user:pw@localhost:{ctx.origin.port}/ok.png")),
         reason="credentials"),
    Case("url-gopher-scheme", 400, IMG0, post(img("gopher://localhost:70/1")),
         reason="unsupported image URL scheme"),
    Case("redirect-to-loopback", 400, IMG0,
         post(lambda ctx: img(ctx.origin.url("/redirect"))), check=_redirect_checked),
    Case("slow-host", 400, IMG0, post(lambda ctx: img(ctx.origin.url("/slow.png"))),
         check=_quick(FETCH_TIMEOUT + 4)),
    Case("endless-body", 413, IMG0, post(lambda ctx: img(ctx.origin.url("/endless.png"))),
         code="payload_too_large"),
    Case("url-declared-length-over-cap", 413, IMG0,
         post(lambda ctx: img(ctx.origin.url("/big.png"))), code="payload_too_large"),
    Case("url-404", 400, IMG0, post(lambda ctx: img(ctx.origin.url("/missing.png")))),
    Case("url-html-page", 400, IMG0, post(lambda ctx: img(ctx.origin.url("/page.html")))),
    Case("allowed-host-ok", 200, ANY, post(lambda ctx: img(ctx.origin.url("/ok.png")))),
    # --- images: local files ------------------------------------------------------------
    Case("file-etc-passwd", 400, IMG0, post(img("file:///etc/passwd")),
         reason="outside the allowed media directory"),
    Case("file-dotdot-traversal", 400, IMG0,
         post(lambda ctx: img(f"file://{ctx.media_dir}/../secret.png")), reason=r"'\.\.' segments"),
    Case("file-encoded-dotdot", 400, IMG0,
         post(lambda ctx: img(f"file://{ctx.media_dir}/%2e%2e/secret.png")),
         reason=r"'\.\.' segments|outside the allowed media directory"),
    Case("file-symlink-out", 400, IMG0,
         post(lambda ctx: img(f"file://{ctx.media_dir}/passwd-link.png")),
         reason="outside the allowed media directory"),
    Case("file-symlink-to-sibling", 400, IMG0,
         post(lambda ctx: img(f"file://{ctx.media_dir}/secret-link.png")),
         reason="outside the allowed media directory"),
    Case("file-missing", 400, IMG0, post(lambda ctx: img(f"file://{ctx.media_dir}/nope.png"))),
    Case("file-directory", 400, IMG0, post(lambda ctx: img(f"file://{ctx.media_dir}/"))),
    Case("file-allowed-ok", 200, ANY, post(lambda ctx: img(f"file://{ctx.media_dir}/ok.png"))),
    # --- limits ----------------------------------------------------------------------
    Case("n-1000", 400, "n", post(chat(n=1000))),
    Case("max-tokens-1e9", 400, "max_tokens", post(chat(max_tokens=10**9))),
    Case("max-completion-tokens-1e9", 400, "max_completion_tokens",
         post({**chat(), "max_completion_tokens": 10**9})),
    Case("context-length-exceeded", 400, "max_tokens", post(chat(max_tokens=4090)),
         code="context_length_exceeded"),
    Case("prompt-alone-too-long", 400, "messages",
         post({**chat("word " * 5000), "max_tokens": None}),
         code="context_length_exceeded"),
    Case("content-parts-over-max", 400, "messages",
         post(chat([{"type": "text", "text": "a"}] * 1025))),
    Case("body-over-max-body-bytes", 413, None, post(chat("x" * (BODY_CAP + 10))),
         code="payload_too_large"),
    Case("chunked-body-over-max-body-bytes", 413, None, lambda ctx: _chunked_over_cap(),
         code="payload_too_large"),
    Case("stream-with-bad-image-is-plain-json", 400, IMG0,
         post(img("data:image/png;base64,!!!!", stream=True))),
    # --- /tokenize, /detokenize and grounding (issue 32) ---------------------------------
    Case("tokenize-malformed-json", 400, None, post(raw=b'{"messages": [', path="/tokenize")),
    Case("tokenize-neither-messages-nor-prompt", 400, "prompt",
         post({"model": MODEL}, path="/tokenize")),
    Case("tokenize-unknown-model", 404, "model",
         post({**chat(), "model": "gpt-4o"}, path="/tokenize"), code="model_not_found"),
    Case("tokenize-bad-image", 400, IMG0,
         post(img("data:image/png;base64,!!!!"), path="/tokenize")),
    Case("tokenize-too-many-images", 400, "messages",
         post(img(*[data_url(png_bytes(8, 8))] * (MAX_IMAGES + 1)), path="/tokenize")),
    Case("tokenize-image-placeholder-in-prompt", 400, "prompt",
         post({"prompt": "a <|image_pad|> b"}, path="/tokenize")),
    Case("tokenize-prompt-wrong-type", 400, "prompt", post({"prompt": ["a"]}, path="/tokenize")),
    Case("tokenize-prompt-lone-surrogate", 400, "prompt",
         post(raw=b'{"prompt": "a\\ud800b"}', path="/tokenize")),
    Case("tokenize-without-key", 401, None, post(chat(), path="/tokenize", auth=False),
         code="invalid_api_key"),
    Case("tokenize-body-over-max-body-bytes", 413, None,
         post({"prompt": "x" * (BODY_CAP + 10)}, path="/tokenize"), code="payload_too_large"),
    Case("tokenize-wrong-method", 405, None, post(method="GET", path="/tokenize")),
    Case("detokenize-id-out-of-range", 400, "tokens",
         post({"tokens": [1, 2**40]}, path="/detokenize")),
    Case("detokenize-negative-id", 400, "tokens", post({"tokens": [-1]}, path="/detokenize")),
    Case("detokenize-wrong-type", 400, "tokens[0]",
         post({"tokens": ["a"]}, path="/detokenize")),
    Case("detokenize-missing-tokens", 400, "tokens", post({}, path="/detokenize")),
    Case("detokenize-over-the-context", 400, "tokens",
         post({"tokens": [1] * 5000}, path="/detokenize")),
    Case("detokenize-huge-integer", 400, ANY, post(raw=b'{"tokens": [1' + b"0" * 5000 + b"]}",
                                                   path="/detokenize")),
    Case("grounding-wrong-type", 400, "grounding", post(chat(grounding="yes please"))),
    # --- /v1/completions and /v1/responses (issue 33) ---------------------------------------
    Case("completions-malformed-json", 400, None,
         post(raw=b'{"model": "qwen3-vl", "prompt": ', path="/v1/completions")),
    Case("completions-prompt-missing", 400, "prompt", post({"model": MODEL},
                                                          path="/v1/completions")),
    Case("completions-prompt-wrong-type", 400, "prompt",
         post({"model": MODEL, "prompt": {"a": 1}}, path="/v1/completions")),
    Case("completions-several-prompts", 400, "prompt",
         post({"model": MODEL, "prompt": ["a", "b"]}, path="/v1/completions")),
    Case("completions-token-id-out-of-range", 400, "prompt",
         post({"model": MODEL, "prompt": [1, 2**40]}, path="/v1/completions")),
    Case("completions-unknown-model", 404, "model",
         post({"model": "gpt-3.5-turbo-instruct", "prompt": "x"}, path="/v1/completions"),
         code="model_not_found"),
    Case("completions-logprobs-over-20", 400, "logprobs",
         post({"model": MODEL, "prompt": "x", "logprobs": 21}, path="/v1/completions")),
    Case("completions-context-exceeded", 400, ANY,
         post({"model": MODEL, "prompt": "word " * 5000, "max_tokens": 4},
              path="/v1/completions"), code="context_length_exceeded"),
    Case("completions-without-key", 401, None,
         post({"model": MODEL, "prompt": "x"}, path="/v1/completions", auth=False),
         code="invalid_api_key"),
    Case("responses-malformed-json", 400, None,
         post(raw=b'{"model": "qwen3-vl", "input": [', path="/v1/responses")),
    Case("responses-input-missing", 400, "input", post({"model": MODEL}, path="/v1/responses")),
    Case("responses-unknown-item-type", 400, "input[0]",
         post({"model": MODEL, "input": [{"type": "computer_call"}]}, path="/v1/responses")),
    Case("responses-bad-image", 400, "input[0].content[1].image_url",
         post({"model": MODEL, "input": [{"role": "user", "content": [
             {"type": "input_text", "text": "look"},
             {"type": "input_image", "image_url": "data:image/png;base64,!!!!"}]}]},
              path="/v1/responses")),
    Case("responses-image-file-id", 400, "input[0].content[0].image_url",
         post({"model": MODEL, "input": [{"role": "user", "content": [
             {"type": "input_image", "file_id": "file-abc"}]}]}, path="/v1/responses")),
    Case("responses-previous-response-id", 400, "previous_response_id",
         post({"model": MODEL, "input": "hi", "previous_response_id": "resp_1"},
              path="/v1/responses")),
    Case("responses-hosted-tool", 400, "tools[0]",
         post({"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]},
              path="/v1/responses")),
    Case("responses-content-parts-over-max", 400, "input",
         post({"model": MODEL, "input": [{"role": "user", "content": [
             {"type": "input_text", "text": "a"}] * 1025}]}, path="/v1/responses")),
    Case("responses-max-output-tokens-over-limit", 400, "max_output_tokens",
         post({"model": MODEL, "input": "hi", "max_output_tokens": 10**7},
              path="/v1/responses")),
    Case("responses-too-many-images", 400, "input",
         post({"model": MODEL, "input": [{"role": "user", "content": [
             {"type": "input_image", "image_url": data_url(png_bytes(8, 8))}] * (MAX_IMAGES + 1)}]},
              path="/v1/responses")),
    Case("responses-max-output-tokens-zero", 400, "max_output_tokens",
         post({"model": MODEL, "input": "hi", "max_output_tokens": 0}, path="/v1/responses")),
    Case("responses-retrieve-stored", 404, None,
         post(method="GET", path="/v1/responses/resp_123"), code="not_found"),
    Case("responses-without-key", 401, None,
         post({"model": MODEL, "input": "hi"}, path="/v1/responses", auth=False),
         code="invalid_api_key"),
    # --- auth and routes -------------------------------------------------------------------
    Case("wrong-api-key", 401, None, post(chat(), headers={"Authorization": "Bearer nope"}),
         code="invalid_api_key"),
    Case("missing-api-key", 401, None, post(chat(), auth=False), code="invalid_api_key"),
    Case("empty-bearer", 401, None, post(chat(), headers={"Authorization": "Bearer"}),
         code="invalid_api_key"),
    Case("basic-auth-scheme", 401, None,
         post(chat(), headers={"Authorization": "Basic " + base64.b64encode(
             f"u:{KEY}".encode()).decode()}), code="invalid_api_key"),
    Case("models-without-key", 401, None, post(method="GET", path="/v1/models", auth=False)),
    Case("metrics-without-key", 401, None, post(method="GET", path="/metrics", auth=False)),
    Case("health-open-without-key", 200, ANY, post(method="GET", path="/health", auth=False)),
    Case("unknown-route", 404, None, post(chat(), path="/v1/completions-nope")),
    Case("wrong-method", 405, None, post(method="GET", path="/v1/chat/completions")),
]


_LEAKS = [re.compile(r"Traceback"), re.compile(r"\b0x[0-9a-fA-F]{4,}"),
          re.compile(r"site-packages"), re.compile(r"\.py\b"), re.compile(r"File \"")]


@dataclass
class Ctx:
    http: httpx.Client          # sends the API key
    anon: httpx.Client          # sends none
    origin: Origin
    media_dir: Path
    server: Any


@pytest.fixture(scope="module")
def ctx(keyed, origin, media_dir, hsrv) -> Ctx:
    with httpx.Client(base_url=hsrv.url, timeout=60, trust_env=False) as anon:
        c = Ctx(keyed, anon, origin, media_dir, hsrv)
        yield c
        # after the module's last test, whatever the order it ran in (an error here is
        # reported at the teardown of that test)
        _server_survived(c)


def _assert_clean(message: str, ctx: Ctx):
    for pat in _LEAKS:
        assert not pat.search(message), f"leak {pat.pattern!r} in {message!r}"
    for path in (str(ROOT), str(ctx.media_dir), "/etc/", "/tmp/", "/work/", "/root/"):
        assert path not in message, f"server path in {message!r}"


def test_case_ids_are_distinct_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx):
    kw = case.build(ctx)
    r = (ctx.http if kw.pop("auth") else ctx.anon).request(**kw)
    STATS["tried"] += 1
    STATS["cases"] += 1
    STATS["statuses"][str(r.status_code)] = STATS["statuses"].get(str(r.status_code), 0) + 1
    if r.status_code >= 500:
        STATS["5xx"] += 1
    assert r.status_code == case.status, r.text[:500]
    if case.status >= 400:
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and err["type"]
        if case.param is not ANY:
            assert err["param"] == case.param, err
        if case.code is not None:
            assert err["code"] == case.code, err
        _assert_clean(err["message"], ctx)
        if case.reason is not None:
            assert re.search(case.reason, err["message"]), err["message"]
        if case.status == 401:
            assert err["type"] == "authentication_error"
        elif case.status < 500:
            assert err["type"] == "invalid_request_error"
    else:
        if r.request.url.path == "/v1/chat/completions":
            data = r.json()
            assert data["object"] == "chat.completion" and data["choices"][0]["message"]
    if case.check is not None:
        case.check(ctx, r)


def test_cors_is_off_by_default(ctx: Ctx):
    r = ctx.http.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    STATS["tried"] += 1
    if r.status_code >= 500:
        STATS["5xx"] += 1
    assert r.status_code < 500
    assert "access-control-allow-origin" not in r.headers


def _server_survived(ctx: Ctx):
    """After every bad input: a normal request answers, and no 5xx anywhere."""
    r = ctx.http.post("/v1/chat/completions", json=img(data_url(png_bytes(40, 40)),
                                                       temperature=0, max_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert ctx.http.get("/health").status_code == 200
    assert STATS["5xx"] == 0, STATS
    metrics = ctx.http.get("/metrics").text
    # (the 503s /health answers while the model loads are expected: not counted)
    fives = [(route, v) for route, v in re.findall(
        r'qwen_vl_requests_total\{route="([^"]*)",status="5\d\d"\} ([0-9.]+)', metrics)
        if route != "/health" and float(v) > 0]
    assert not fives, fives
    assert "Traceback" not in ctx.server.log(), ctx.server.log()[-3000:]
