"""Tests for server/api/media.py: decoding, data/file URLs, SSRF refusals and a local HTTP server.

All network traffic stays on 127.0.0.1; refused addresses are refused before any connection
(refusal tests use a transport that fails the test if it is ever called).
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.errors import APIError, InvalidRequest, PayloadTooLarge
from server.api.media import MediaFetcher, MediaPolicy, decode_image_bytes

PARAM = "messages[1].content[2].image_url.url"
LOOPBACK = ("127.0.0.1/32",)


# --------------------------------------------------------------------------- fixtures


def _png(size=(64, 48), mode="RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _exif_jpeg() -> bytes:
    # 40x20, left half red, right half blue, EXIF orientation 6 (rotate 90 deg clockwise)
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _rgba_png() -> bytes:
    return _png((10, 10), "RGBA", (255, 0, 0, 0))


def _many_frame_gif(frames=300) -> bytes:
    imgs = [Image.new("P", (16, 16), i % 256) for i in range(frames)]
    for im in imgs:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=10, loop=0)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(buf, "JPEG")  # red-ish
    return buf.getvalue()


def _crafted_png(width: int, height: int, bit_depth=1, color_type=0) -> bytes:
    """A tiny PNG whose header claims width x height (the pixel data is bogus)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


PNG = _png()
EXIF_JPEG = _exif_jpeg()
RGBA_PNG = _rgba_png()
GIF = _many_frame_gif()
CMYK_JPEG = _cmyk_jpeg()


RELEASE_BIG_CL = threading.Event()
ENDLESS_SENT, ENDLESS_DONE = [0], threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, body: bytes, ctype="image/png", status=200, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: C901 - a small router
        port = self.server.server_address[1]
        path = self.path
        try:
            if path == "/png":
                self._send(PNG)
            elif path == "/exif.jpg":
                self._send(EXIF_JPEG, "image/jpeg")
            elif path == "/rgba.png":
                self._send(RGBA_PNG)
            elif path == "/anim.gif":
                self._send(GIF, "image/gif")
            elif path == "/cmyk.jpg":
                self._send(CMYK_JPEG, "image/jpeg")
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])  # /redirect/N: exactly N redirects, then the PNG
                self._redirect("/png" if n <= 1 else f"/redirect/{n - 1}")
            elif path == "/to-ip":
                self._redirect(f"http://127.0.0.1:{port}/png")
            elif path == "/to-metadata":
                self._redirect("http://169.254.169.254/latest/meta-data")
            elif path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif path == "/host-echo":
                if self.headers.get("Host") == f"images.test:{port}":
                    self._send(PNG)
                else:
                    self._send(b"wrong host", "text/plain", 404)
            elif path == "/gzip.png":
                body = zlib.compress(PNG)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "deflate")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/html":
                self._send(b"<html><body>hello</body></html>", "text/html")
            elif path == "/html-octet":
                self._send(b"<html><body>hello</body></html>", "application/octet-stream")
            elif path == "/big-cl":
                # the headers only: the body waits until the test has its answer, so a
                # loader that read it would time out instead of refusing from the header
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(100 * 1024 * 1024))
                self.end_headers()
                self.wfile.flush()
                RELEASE_BIG_CL.wait(60)
                self.wfile.write(PNG)
            elif path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                chunk = b"\0" * 65536
                try:  # 256 MiB unless the reader stops first: count what it let through
                    for _ in range(4096):
                        self.wfile.write(chunk)
                        ENDLESS_SENT[0] += len(chunk)
                finally:
                    ENDLESS_DONE.set()
            elif path == "/slow":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(PNG[:8])
                for _ in range(40):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.25)
            else:
                self._send(b"not found", "text/plain", 404)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def run(coro):
    return asyncio.run(coro)


async def _load(url: str, policy: MediaPolicy | None = None, **kw):
    fetcher = MediaFetcher(policy or MediaPolicy(allowed_media_hosts=LOOPBACK), **kw)
    try:
        return await fetcher.load_image(url, param=PARAM)
    finally:
        await fetcher.aclose()


def _never_called(request):  # transport for refusal tests: must not be reached
    raise AssertionError(f"unexpected connection to {request.url}")


NO_NET = httpx.MockTransport(_never_called)

_ABS_PATH = re.compile(r"(^|[\s'\"(=:])/")


def assert_error(excinfo, cls=InvalidRequest, status=400):
    err = excinfo.value
    assert type(err) is cls, type(err)
    assert err.status == status
    assert err.param == PARAM
    msg = err.message
    assert msg and str(err) == msg
    assert "0x" not in msg
    assert not _ABS_PATH.search(msg), msg
    assert "/etc" not in msg and "/tmp" not in msg and "Traceback" not in msg
    return msg


def load_err(url, policy=None, cls=InvalidRequest, status=400, **kw):
    with pytest.raises(APIError) as ei:
        run(_load(url, policy, **kw))
    return assert_error(ei, cls, status)


# --------------------------------------------------------------------------- http: success


def test_png_over_http(server):
    img = run(_load(f"{server}/png"))
    assert img.mode == "RGB" and img.size == (64, 48)
    assert img.getpixel((0, 0)) == (10, 200, 30)


def test_exif_orientation_applied(server):
    img = run(_load(f"{server}/exif.jpg"))
    assert img.mode == "RGB" and img.size == (20, 40)
    # rotated 90 deg clockwise: the red (left) half is now on top
    r, g, b = img.getpixel((10, 5))
    assert r > 200 and b < 60
    r, g, b = img.getpixel((10, 35))
    assert b > 200 and r < 60


def test_rgba_flattened_on_white(server):
    img = run(_load(f"{server}/rgba.png"))
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)


def test_many_frame_gif_first_frame_only(server, monkeypatch):
    img = run(_load(f"{server}/anim.gif"))
    assert img.mode == "RGB" and img.size == (16, 16)
    assert img.getpixel((0, 0)) == (0, 255, 0)  # palette index 0 of frame 0
    # a count, not a clock: decoding (here in-process) never moves past frame 0 of 300
    from PIL import GifImagePlugin
    frames, real_seek = [], GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek",
                        lambda self, frame, *a, **k: (frames.append(frame),
                                                      real_seek(self, frame, *a, **k))[1])
    assert decode_image_bytes(GIF, MediaPolicy(), param=PARAM).getpixel((0, 0)) == (0, 255, 0)
    assert frames and set(frames) == {0}, frames


def test_cmyk_jpeg_converted(server):
    img = run(_load(f"{server}/cmyk.jpg"))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((6, 6))
    assert r > 200 and g < 60 and b < 60


def test_two_redirects_ok(server):
    img = run(_load(f"{server}/redirect/2"))
    assert img.size == (64, 48)


def test_three_redirects_ok_at_limit(server):
    assert run(_load(f"{server}/redirect/3")).size == (64, 48)


def test_allowed_hostname_localhost(server):
    port = server.rsplit(":", 1)[1]
    img = run(_load(f"http://localhost:{port}/png", MediaPolicy(allowed_media_hosts=("localhost",))))
    assert img.size == (64, 48)


# --------------------------------------------------------------------------- http: refusals


def test_four_redirects_refused(server):
    msg = load_err(f"{server}/redirect/4")
    assert "redirect" in msg


def test_redirect_to_unlisted_loopback_refused(server):
    # only the host NAME "localhost" is allowed; the redirect target 127.0.0.1 is not
    port = server.rsplit(":", 1)[1]
    msg = load_err(f"http://localhost:{port}/to-ip", MediaPolicy(allowed_media_hosts=("localhost",)))
    assert "not allowed" in msg


def test_redirect_to_metadata_refused(server):
    load_err(f"{server}/to-metadata")


def test_redirect_to_file_refused(server, tmp_path):
    load_err(f"{server}/to-file", MediaPolicy(allowed_media_hosts=LOOPBACK,
                                              allowed_local_media_path="/etc"))


def test_404(server):
    assert load_err(f"{server}/nope") == "image URL returned HTTP 404"


def test_html_page_refused(server):
    load_err(f"{server}/html")


def test_html_as_octet_stream_refused(server):
    msg = load_err(f"{server}/html-octet")
    assert "unsupported image format" in msg


def test_content_length_over_cap_immediately(server):
    # refused from the header: the body is never sent until the answer is in, and the
    # total timeout (60 s) is far off, so reading it would not end in a 413
    policy = MediaPolicy(allowed_media_hosts=LOOPBACK, total_timeout=60)
    try:
        load_err(f"{server}/big-cl", policy, cls=PayloadTooLarge, status=413)
    finally:
        RELEASE_BIG_CL.set()


def test_endless_body_capped(server):
    # 256 MiB on offer; the reader stops past 256 KiB (what got through is bounded by the
    # cap plus the sockets' buffers), and the 413 comes long before the 60 s timeout
    policy = MediaPolicy(allowed_media_hosts=LOOPBACK, max_image_bytes=256 * 1024,
                         total_timeout=60)
    ENDLESS_DONE.clear()
    ENDLESS_SENT[0] = 0
    load_err(f"{server}/endless", policy, cls=PayloadTooLarge, status=413)
    assert ENDLESS_DONE.wait(30), "the server was still sending"
    assert ENDLESS_SENT[0] < 64 * 1024 * 1024, ENDLESS_SENT[0]


def test_slow_drip_times_out(server):
    # one byte every 0.25 s for 10 s: each read is quick, so only the total deadline ends
    # it ("timed out"); without it the drip would finish and fail as a corrupt image
    policy = MediaPolicy(allowed_media_hosts=LOOPBACK, total_timeout=1.0)
    msg = load_err(f"{server}/slow", policy)
    assert "timed out" in msg


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::7f00:1]/",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/",
    "http://10.0.0.5/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "https://127.0.0.1:8443/x.png",
])
def test_ssrf_refused(url):
    msg = load_err(url, MediaPolicy(), transport=NO_NET)
    # httpx itself rejects some spellings (e.g. octal "0177.0.0.1") as malformed: also a refusal
    assert "not allowed" in msg or msg == "malformed image URL"


def test_cidr_allow_list_does_not_open_other_ranges():
    load_err("http://169.254.169.254/", MediaPolicy(allowed_media_hosts=LOOPBACK), transport=NO_NET)
    load_err("http://10.0.0.5/", MediaPolicy(allowed_media_hosts=("localhost",)), transport=NO_NET)


@pytest.mark.parametrize("url", ["ftp://x", "gopher://x:70/_", "ftp://127.0.0.1/a.png",
                                 "javascript:alert(1)", "x", "//example.com/a.png",
                                 "http://user:pw@example.com/a.png", "http:///a.png"])
def test_bad_scheme_or_url_refused(url):
    load_err(url, MediaPolicy(), transport=NO_NET)


def test_any_private_address_refuses_mixed_resolution():
    calls = []

    async def resolver(host, port):
        calls.append((host, port))
        return ["93.184.216.34", "10.0.0.5"]

    msg = load_err("http://mixed.test/a.png", MediaPolicy(), transport=NO_NET, resolver=resolver)
    assert "not allowed" in msg and calls == [("mixed.test", 80)]


def test_unresolvable_host():
    async def resolver(host, port):
        raise OSError("no such host /etc/resolv.conf 0xdeadbeef")

    msg = load_err("http://nx.test/a.png", MediaPolicy(), transport=NO_NET, resolver=resolver)
    assert msg == "could not resolve image host"


def test_request_pinned_to_checked_ip_https():
    seen = {}

    async def resolver(host, port):
        return ["93.184.216.34"]

    def handler(request: httpx.Request):
        seen["host"] = request.url.host
        seen["Host"] = request.headers["host"]
        seen["sni"] = request.extensions.get("sni_hostname")
        return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})

    img = run(_load("https://images.test/a.png", MediaPolicy(),
                    transport=httpx.MockTransport(handler), resolver=resolver))
    assert img.size == (64, 48)
    assert seen == {"host": "93.184.216.34", "Host": "images.test", "sni": "images.test"}


def test_request_pinned_to_checked_ip_real_socket(server):
    # "images.test" resolves (via our resolver) to 127.0.0.1; the server only answers when
    # the Host header still names images.test, proving we connect to the pinned address.
    port = server.rsplit(":", 1)[1]
    resolved = []

    async def resolver(host, p):
        resolved.append(host)
        return ["127.0.0.1"]

    img = run(_load(f"http://images.test:{port}/host-echo", resolver=resolver))
    assert img.size == (64, 48) and resolved == ["images.test"]


# --------------------------------------------------------------------------- data URLs


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_url_ok():
    img = run(_load(_data_url(PNG), MediaPolicy()))
    assert img.mode == "RGB" and img.size == (64, 48)


def test_data_url_bad_base64():
    assert "invalid base64" in load_err("data:image/png;base64,iVBO$$$$", MediaPolicy())
    assert "invalid base64" in load_err("data:image/png;base64,iVBORw0", MediaPolicy())
    assert "invalid base64" in load_err("data:image/png;base64,iVBO\nRw0K", MediaPolicy())


def test_data_url_not_image_or_not_base64():
    load_err("data:text/plain;base64,aGVsbG8=", MediaPolicy())
    load_err("data:image/png,rawbytes", MediaPolicy())
    load_err("data:image/png;base64", MediaPolicy())


def test_data_url_size_checked_before_decoding():
    policy = MediaPolicy(max_image_bytes=1000)
    load_err("data:image/png;base64," + "A" * 4000, policy, cls=PayloadTooLarge, status=413)
    # invalid characters but over the cap: 413 from the length alone
    load_err("data:image/png;base64," + "!" * 4000, policy, cls=PayloadTooLarge, status=413)


# --------------------------------------------------------------------------- file URLs


def test_file_inside_allowed_dir_ok(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a b.png").write_bytes(PNG)
    policy = MediaPolicy(allowed_local_media_path=str(media))
    img = run(_load(f"file://{media}/a%20b.png", policy))
    assert img.size == (64, 48)


def test_file_refusals(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", media / "link.png")
    os.symlink("/etc/passwd", media / "passwd.png")
    policy = MediaPolicy(allowed_local_media_path=str(media))
    assert "outside" in load_err("file:///etc/passwd", policy)
    assert ".." in load_err(f"file://{media}/../secret.png", policy)
    assert ".." in load_err(f"file://{media}/%2e%2e/secret.png", policy)
    assert "outside" in load_err(f"file://{media}/link.png", policy)
    assert "outside" in load_err(f"file://{media}/passwd.png", policy)
    assert "not found" in load_err(f"file://{media}/missing.png", policy)
    load_err(f"file://{media}", policy)  # the directory itself
    load_err(f"file://evil.example{media}/x.png", policy)
    # sibling directory sharing the prefix is not "inside"
    (tmp_path / "media2").mkdir()
    (tmp_path / "media2" / "x.png").write_bytes(PNG)
    assert "outside" in load_err(f"file://{tmp_path}/media2/x.png", policy)


def test_file_without_allowed_dir_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    msg = load_err(f"file://{tmp_path}/a.png", MediaPolicy())
    assert "not enabled" in msg


def test_file_size_cap(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path), max_image_bytes=100)
    load_err(f"file://{tmp_path}/a.png", policy, cls=PayloadTooLarge, status=413)


# --------------------------------------------------------------------------- decoding


def decode_err(data: bytes, policy: MediaPolicy | None = None, cls=InvalidRequest, status=400):
    with pytest.raises(APIError) as ei:
        decode_image_bytes(data, policy or MediaPolicy(), param=PARAM)
    return assert_error(ei, cls, status)


def test_decompression_bomb_pillow_limit():
    data = _crafted_png(20000, 20000)
    assert len(data) < 200
    assert "dimensions" in decode_err(data)


def test_decompression_bomb_policy_limit_from_header():
    # 8000x8000 = 64M pixels: under Pillow's own limit, over the policy's 40M
    assert "dimensions" in decode_err(_crafted_png(8000, 8000))


def test_zero_sized_refused():
    decode_err(_crafted_png(0, 10))


def test_truncated_png():
    data = _png((200, 200), "RGB", (1, 2, 3))
    noisy = Image.effect_noise((200, 200), 64).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    decode_err(buf.getvalue()[: len(buf.getvalue()) // 2])
    decode_err(data[:40])


def test_non_image_bytes():
    assert "unsupported image format" in decode_err(b"hello, this is not an image at all")


def test_empty_bytes():
    decode_err(b"")


def test_one_pixel_ok():
    img = decode_image_bytes(_png((1, 1)), MediaPolicy(), param=PARAM)
    assert img.size == (1, 1) and img.mode == "RGB"


def test_aspect_ratio_refused():
    assert "aspect ratio" in decode_err(_png((300, 1)))
    assert decode_image_bytes(_png((200, 1)), MediaPolicy(), param=PARAM).size == (200, 1)


def test_bmp_ok():
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (1, 2, 3)).save(buf, "BMP")
    img = decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM)
    assert img.size == (5, 7) and img.getpixel((0, 0)) == (1, 2, 3)


def test_webp_ok():
    buf = io.BytesIO()
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(buf, "WEBP", lossless=True)
    img = decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_tiff_unsupported():
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, "TIFF")
    assert "unsupported image format" in decode_err(buf.getvalue())


def test_format_not_in_policy_refused():
    assert "unsupported" in decode_err(PNG, MediaPolicy(allowed_formats=("JPEG",)))


def test_sixteen_bit_and_grey_converted():
    img16 = Image.new("I;16", (4, 4))
    img16.putpixel((0, 0), 65535)
    buf = io.BytesIO()
    img16.save(buf, "PNG")
    out = decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 0)
    for mode in ("L", "1", "LA", "P"):
        out = decode_image_bytes(_png((3, 3), mode, 255 if mode != "LA" else (255, 255)),
                                 MediaPolicy(), param=PARAM)
        assert out.mode == "RGB"


def test_decode_bytes_over_cap():
    decode_err(PNG, MediaPolicy(max_image_bytes=10), cls=PayloadTooLarge, status=413)


def _slow_decode_job(data, policy, param, max_pixels):
    """Runs in a decode worker process (imported there by name); ``param`` names a file
    it writes once its 30 s decode ends."""
    time.sleep(30)
    Path(param).write_text("decoded")
    return Image.new("RGB", (1, 1))


def test_decode_timeout(monkeypatch, tmp_path):
    """A decode past its budget answers 400 at the budget, not when the decode ends: its
    worker process is killed (counted by the pool, and the decode never finishes)."""
    import server.api.media as media

    monkeypatch.setattr(media, "_decode_job", _slow_decode_job)
    ended = tmp_path / "decode-ended"

    async def load():
        fetcher = MediaFetcher(MediaPolicy(decode_timeout=1.0))
        try:
            with pytest.raises(APIError) as ei:
                await fetcher.load_image(_data_url(PNG), param=str(ended))
            return ei, fetcher._decode_pool.killed
        finally:
            await fetcher.aclose()
    ei, killed = run(load())
    assert type(ei.value) is InvalidRequest and ei.value.status == 400
    assert ei.value.message.startswith("timed out decoding image")
    assert killed == 1 and not ended.exists()


# --------------------------------------------------------------------------- memory bounds


def test_compressed_response_refused(server):
    """A body the server compresses anyway could expand past the byte cap: refused."""
    assert "compressed" in load_err(f"{server}/gzip.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_image_kept_near_its_budget(fmt):
    """A 4000x3000 photo with a 64-token budget is not kept at full size: JPEG decodes at a
    reduced scale, any format is box-reduced, to within a few times the budget."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (120, 30, 200)).save(buf, fmt)
    budget = 64 * 32 * 32
    img = decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM, max_pixels=budget)
    assert img.mode == "RGB" and budget <= img.width * img.height <= 4 * budget
    assert abs(img.width / img.height - 4 / 3) < 0.05
    full = decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM)
    assert full.size == (4000, 3000)


def test_request_pixel_budget_is_shared_and_checked_before_decoding():
    """Images of one request draw on one pixel budget; the image that would overdraw it is
    refused from its header, before being decoded."""
    from server.api.media import PixelBudget
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(buf, "PNG")
    budget = PixelBudget(10_000_000)
    decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM, budget=budget)
    with pytest.raises(InvalidRequest) as ei:
        decode_image_bytes(buf.getvalue(), MediaPolicy(), param=PARAM, budget=budget)
    assert "in total" in ei.value.message and ei.value.param == PARAM
    assert budget.left == 4_000_000


def test_jpeg_scan_limit_is_exact():
    """``check_decode_cost`` counts start-of-scan markers up to the limit: exactly
    ``MAX_JPEG_SCANS`` pass, one more is refused; an escaped FF followed by DA (``FF 00
    DA``, as entropy-coded data has them) is not a scan."""
    from server.api.media import MAX_JPEG_SCANS, check_decode_cost
    head, sos, noise = b"\xff\xd8", b"\xff\xda\x00\x08", b"\xff\x00\xda" * 50
    check_decode_cost(head + (sos + noise) * MAX_JPEG_SCANS, "p")
    with pytest.raises(InvalidRequest, match="scans"):
        check_decode_cost(head + (sos + noise) * (MAX_JPEG_SCANS + 1), "p")


def test_json_value_count_matches_the_byte_count():
    """The vectorised count of commas and opening brackets equals ``bytes.count``, across
    the megabyte chunks it counts in (marks on both sides of a boundary)."""
    from server.api.body import _COUNT_CHUNK, count_values
    for raw in (b"{}", b'{"a": [1, 2, {"b": 3}]}',
                b",[{" * (_COUNT_CHUNK // 3 + 5) + b"x" * 7 + b"{" * 3,
                os.urandom(3 * _COUNT_CHUNK + 11)):
        assert count_values(raw) == raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
