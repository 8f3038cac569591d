"""Loading request images safely: data URLs, remote http(s) URLs and (optionally) local files.

Contract
--------
``MediaFetcher.load_image(url, param=...)`` returns a fully decoded ``PIL.Image.Image`` in
mode ``RGB`` (EXIF orientation applied, alpha composited on white, palette / CMYK / L /
16-bit converted, animated images reduced to their first frame) or raises one of the typed
errors from :mod:`server.errors`:

* ``PayloadTooLarge`` (413) when the encoded image exceeds ``MediaPolicy.max_image_bytes``
  (checked from the base64 length of a data URL, from ``Content-Length`` and while
  streaming a body, and from the size of a local file, always before reading it all);
* ``InvalidRequest`` (400) for everything else the client can cause: bad scheme, bad
  base64, refused or unresolvable host, non-2xx status, too many redirects, timeouts,
  non-image content, unsupported format, decompression bombs, corrupt or truncated data,
  zero-sized images and extreme aspect ratios.

The image may be smaller than the photo sent (large ones are decoded at a reduced scale,
below); ``original_size(image)`` is the photo's own (width, height) after EXIF orientation
(what ``server.api.grounding`` maps coordinates to), kept in ``image.info``.

``MediaFetcher.load(url, param=...)`` returns ``(pixels, digest)``: the same image as
``server.engine.interface.RGBPixels`` (its bytes packed once, in the decode worker, as the
engine reads them) and ``image_digest`` of the bytes as received (the fetched body, the data URL's decoded bytes or
the file's content), hashed on a thread while the image decodes.  Equal bytes give equal
digests; the engine keys an image's cached pixels and KV by it and the pixel budget.

Every error carries the caller's ``param`` (the JSON path of the image part) and a fixed,
client-safe message: never exception text, server file paths or memory addresses.

Network safety (SSRF)
---------------------
Only ``http`` and ``https`` are fetched.  For every hop (the first URL and each redirect,
followed manually, at most ``max_redirects``) the host is resolved off the event loop with
``getaddrinfo`` (which also normalises decimal / hex / octal / short IPv4 spellings) and the
fetch is refused when ANY resolved address is loopback, private (10/8, 172.16/12,
192.168/16, fc00::/7), CGNAT (100.64/10), link-local (169.254/16 incl. cloud metadata,
fe80::/10), unspecified, multicast, reserved or otherwise non-global.  IPv4-mapped,
6to4 and NAT64 IPv6 addresses are unwrapped and their IPv4 address checked too.  Entries of
``allowed_media_hosts`` widen this: an exact (case-insensitive) host name match allows all
of that name's addresses, a CIDR / IP entry allows addresses inside it.

DNS rebinding: the request is sent to the *checked IP address* itself (the URL host is
replaced by the pinned IP) while the ``Host`` header keeps the original host and, for
https, the ``sni_hostname`` request extension keeps TLS SNI and certificate verification
bound to the original host name.  There is therefore no second, unchecked resolution.
Keep-alive is disabled on the default transport so a TLS connection verified for one host
name is never reused for another name on the same IP, and ``trust_env`` is off so no
environment proxy can bypass the pinning.  Residual risks: a hostile *public* server can
still be fetched (by design), and an allow-listed host name is trusted for whatever its
DNS returns.

Local files
-----------
``file://`` URLs are refused unless ``allowed_local_media_path`` is set; then the path is
resolved with ``os.path.realpath`` (symlinks followed) and must lie inside the resolved
directory, ``..`` segments are refused outright, and the file is opened with
``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file.  Residual risk: a local user able
to swap a *parent* directory for a symlink between the check and the open could race it.

Decoding
--------
``decode_image_bytes`` (synchronous) only lets Pillow try the plugins in
``allowed_formats`` (``MPO``, the multi-picture JPEG phones write, counts as ``JPEG``),
checks ``width * height`` against ``max_image_pixels`` from the header before any pixel
data is decoded, and maps Pillow's own decompression-bomb error/warning to 400.
``check_decode_cost`` refuses, from the bytes alone, what decodes slowly per byte: JPEGs
of more than ``MAX_JPEG_SCANS`` scans (a progressive "scan bomb" repeats tiny scans, each
one a pass over the whole image) and RLE-compressed BMPs (decoded by Pillow in Python).
``MediaFetcher`` runs the decode in a small pool of worker processes
(``server.workers``): ``decode_timeout`` counts from when a worker takes the image, and a
decode that runs out of time (or whose client left) has its worker killed and replaced,
so that it never keeps a decode slot.  Images over ``BIG_IMAGE_PIXELS`` may occupy all
workers but one: small images always find a free one.

Videos
------
``MediaFetcher.load_video(url or [frame URLs], param=..., options=VideoOptions(...))``
returns ``(models.video.DecodedVideo, digest)``: a clip's bytes come through the same
sources and checks as an image's (its own byte cap, ``max_video_bytes``), then
``models.video.decode_video_bytes`` (PyAV) samples and decodes it in a decode worker under
the policy's caps on duration, frame size, source frames and decoded pixels, all checked
from the container's header before a frame is decoded, and ``video_decode_timeout``.  A
frame list is loaded image by image.  This module must not import torch.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
import ipaddress
import math
import os
import re
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable
from urllib.parse import unquote, urlsplit

import httpx
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from server.engine.interface import RGBPixels
from server.errors import APIError, InvalidRequest, PayloadTooLarge
from server.workers import ProcessPool, WorkerDied

if TYPE_CHECKING:
    from models.video import DecodedVideo

__all__ = ["MediaPolicy", "MediaFetcher", "decode_image_bytes", "image_digest"]

Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_FORMAT_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEG (phone cameras) is a JPEG
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "qwen3-vl-server-media/1.0"


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 1
    max_aspect_ratio: float = 200.0
    connect_timeout: float = 5.0
    total_timeout: float = 15.0
    max_redirects: int = 3
    allowed_media_hosts: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    decode_timeout: float = 10.0
    # videos (``load_video``)
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_frame_pixels: int = 3840 * 2160
    max_video_decoded_pixels: int = 140_000_000
    video_decode_timeout: float = 30.0


@dataclass(frozen=True)
class VideoOptions:
    """How one video is sampled (``fps``, ``min_frames``/``max_frames``) and the pixel
    budget of all its frames together (passed on to the engine)."""
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 64
    min_pixels: int = 4096
    max_pixels: int = 25_165_824


# --------------------------------------------------------------------------- helpers


def _too_large(policy: MediaPolicy, param: str, limit: int | None = None) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"image exceeds the maximum size of {limit or policy.max_image_bytes} bytes",
        param=param)


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _formats_text(policy: MediaPolicy) -> str:
    return ", ".join(policy.allowed_formats)


def _embedded_ipv4(ip: ipaddress._BaseAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: ipaddress._BaseAddress) -> bool:
    for a in (ip, _embedded_ipv4(ip)):
        if a is None:
            continue
        if (not a.is_global or a.is_private or a.is_loopback or a.is_link_local
                or a.is_unspecified or a.is_multicast or a.is_reserved):
            return False
        if isinstance(a, ipaddress.IPv6Address) and a.is_site_local:
            return False
    return True


def _parse_ip(text: str) -> ipaddress._BaseAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _parse_allow_list(entries: Iterable[str]):
    names: set[str] = set()
    nets: list[ipaddress._BaseNetwork] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return frozenset(names), tuple(nets)


async def _default_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


# --------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        img = img.convert("I") if mode != "I" else img
        _lo, hi = img.getextrema()
        if mode.startswith("I;16") or hi > 255:
            img = img.point(lambda v: v * (1 / 256))
        img = img.convert("L")
    elif mode == "F":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# an image is kept at most this many times its pixel budget: the processor resizes it into
# the budget anyway, and a request must not hold 16 full-size decoded photos meanwhile
KEEP_BUDGET_FACTOR = 2
DECODE_WORKERS = 2
BIG_IMAGE_PIXELS = 4_000_000   # larger images may take all decode workers but one
MAX_JPEG_SCANS = 64            # libjpeg's progressive scripts use ~10; a scan bomb thousands
_JPEG_SOS = re.compile(b"\xff\xda")


class PixelBudget:
    """Decoded pixels one request may still spend, shared by its images (thread-safe).
    Each image is charged its header size before it is decoded."""

    def __init__(self, limit: int):
        self.limit, self.left = limit, limit
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if pixels > self.left:
                return False
            self.left -= pixels
            return True


def _peek_size(data: bytes, policy: MediaPolicy) -> tuple[int, int] | None:
    """Width and height from the header alone (cheap); None if unreadable (decoding then
    reports the problem)."""
    try:
        with Image.open(io.BytesIO(data), formats=[f.upper() for f in policy.allowed_formats]) as im:
            return im.size
    except Exception:
        return None


def check_decode_cost(data: bytes, param: str) -> None:
    """Refuse, from the bytes alone, images whose decoding is slow per byte."""
    if data[:2] == b"\xff\xd8":
        # SOS markers: entropy-coded data escapes every 0xFF as FF 00, so FF DA only ever
        # starts a scan
        # (a regex scan, ~3x bytes.count for a two-byte needle, stopping at the first
        # scan over the limit; on the event loop for every image)
        if next(islice(_JPEG_SOS.finditer(data), MAX_JPEG_SCANS, None), None) is not None:
            raise _bad(f"JPEG images may have at most {MAX_JPEG_SCANS} scans", param)
    elif data[:2] == b"BM" and len(data) >= 34:
        (compression,) = struct.unpack_from("<I", data, 30)
        if compression in (1, 2):  # BI_RLE8 / BI_RLE4: decoded in pure Python by Pillow
            raise _bad("RLE-compressed BMP images are not supported; send PNG or JPEG",
                       param)


async def gather_all(jobs: list) -> list:
    """Run a request's fetches at once; when one fails (or the client leaves) the others
    are cancelled rather than left to fetch and decode for nobody."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def image_digest(data: bytes) -> str:
    """The content key of an image's bytes: BLAKE2b-128, hex.  ~1 GB/s: a 10 MB photo costs
    ~10 ms, spent on a thread while the image decodes (hashlib releases the GIL); 128 bits:
    two different images do not collide in practice."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def video_digest(sources: list[str], video: "DecodedVideo") -> str:
    """A video's content key: the digests of its bytes (a clip's, or each frame's of a frame
    list) and what was sampled from them (the frames' source indices and the rate that
    dates them, exactly: both change the pixels or the timestamps in the prompt)."""
    h = hashlib.blake2b(digest_size=16)
    for s in sources:
        h.update(s.encode() + b"\0")
    h.update(f"{video.fps!r}:{video.frame_indices}".encode())
    return "v" + h.hexdigest()


EXIF_ORIENTATION = 0x0112
ORIGINAL_SIZE = "qwen_vl_original_size"


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo as sent, after EXIF orientation: the image's own size
    unless it was decoded at a reduced scale (``decode_image_bytes``)."""
    size = image.info.get(ORIGINAL_SIZE)
    return tuple(size) if size is not None else image.size


def _decode_job(data: bytes, policy: "MediaPolicy", param: str,
                max_pixels: int | None) -> RGBPixels:
    """What a decode worker process runs: the image's pixels packed once, here, as the
    engine reads them (``RGBPixels``: no PIL repack on the way back, to the engine or in
    it)."""
    return RGBPixels.from_pil(decode_image_bytes(data, policy, param=param,
                                                 max_pixels=max_pixels))


def _decode_video_job(data: bytes, param: str, options: VideoOptions, max_seconds: float,
                      max_frame_pixels: int, max_decoded_pixels: int):
    """What a decode worker runs for a clip: ``models.video.decode_video_bytes`` under the
    policy's caps; its client-safe errors become 400s naming the part."""
    from models.video import MAX_SOURCE_FPS, VideoError, decode_video_bytes
    try:
        return decode_video_bytes(
            data, fps=options.fps, min_frames=options.min_frames,
            max_frames=options.max_frames, max_seconds=max_seconds,
            max_frame_pixels=max_frame_pixels, max_decoded_pixels=max_decoded_pixels,
            max_source_frames=int(max_seconds * MAX_SOURCE_FPS))
    except VideoError as exc:
        raise _bad(str(exc), param) from None


def _shrink(img: Image.Image, max_pixels: int | None) -> Image.Image:
    """Box-reduce by an integer factor to within KEEP_BUDGET_FACTOR x ``max_pixels``."""
    if not max_pixels:
        return img
    factor = int(math.sqrt(img.width * img.height / (KEEP_BUDGET_FACTOR * max_pixels)))
    return img.reduce(factor) if factor >= 2 else img


def decode_image_bytes(data: bytes, policy: MediaPolicy, *, param: str,
                       max_pixels: int | None = None,
                       budget: PixelBudget | None = None) -> Image.Image:
    """Decode ``data`` to an RGB image under ``policy`` (synchronous; run it off-loop).
    With ``max_pixels`` (the image's token budget in pixels) a large JPEG is decoded at a
    reduced scale and any image is shrunk to a few times that budget right away."""
    if not data:
        raise _bad("image data is empty", param)
    if len(data) > policy.max_image_bytes:
        raise _too_large(policy, param)
    bomb = _bad(f"image dimensions exceed the maximum of {policy.max_image_pixels} pixels",
                param)
    unsupported = _bad("unsupported image format; supported formats are "
                       f"{_formats_text(policy)}", param)
    allowed = {f.upper() for f in policy.allowed_formats}
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=list(allowed))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bomb from None
    except UnidentifiedImageError:
        raise unsupported from None
    except Exception:
        raise _bad("image data could not be decoded (corrupt or not an image)", param) from None
    source, out = img, None
    try:
        fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
        if fmt not in allowed:
            raise unsupported
        width, height = img.size
        min_side = max(1, policy.min_image_side)
        if width <= 0 or height <= 0:
            raise _bad("image has zero width or height", param)
        if width < min_side or height < min_side:
            raise _bad(f"image sides must be at least {min_side} pixels", param)
        if width * height > policy.max_image_pixels:  # header only: nothing decoded yet
            raise bomb
        if max(width, height) / min(width, height) > policy.max_aspect_ratio:
            raise _bad("image aspect ratio exceeds the maximum of "
                       f"{policy.max_aspect_ratio:g}:1", param)
        if budget is not None and not budget.take(width * height):
            raise _bad(f"the request's images exceed {budget.limit} pixels in total", param)
        img.seek(0)  # animated: first frame only (never touch n_frames, which scans all)
        if max_pixels and fmt == "JPEG" and width * height > KEEP_BUDGET_FACTOR * max_pixels:
            scale = math.sqrt(KEEP_BUDGET_FACTOR * max_pixels / (width * height))
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()
        oriented = (width, height)
        try:
            orientation = img.getexif().get(EXIF_ORIENTATION)
            if orientation in (5, 6, 7, 8):  # a quarter turn
                oriented = (height, width)
            if orientation not in (None, 1):  # (it copies an upright image too)
                img = ImageOps.exif_transpose(img)
        except Exception:
            oriented = (width, height)  # unreadable EXIF: keep the image as stored
        out = _shrink(_to_rgb(img), max_pixels)
        out.load()
        out.info[ORIGINAL_SIZE] = oriented  # survives the pickle back from the worker
        return out
    except (InvalidRequest, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bomb from None
    except Exception:
        raise _bad("image data is truncated or corrupt", param) from None
    finally:
        if out is not source:  # release the source unless it is what we return
            try:
                source.close()
            except Exception:
                pass


# --------------------------------------------------------------------------- sources


def _decode_data_url(url: str, policy: MediaPolicy, param: str, limit: int | None = None,
                     kind: str = "image") -> bytes:
    limit = limit or policy.max_image_bytes
    header, sep, payload = url.partition(",")
    params = [p.strip().lower() for p in header[len("data:"):].split(";")]
    if not sep or len(params) < 2 or params[-1] != "base64" or not params[0].startswith(
            kind + "/"):
        raise _bad(f"{kind} data URLs must look like data:{kind}/<format>;base64,<data>",
                   param)
    n = len(payload)
    if n % 4:
        raise _bad("invalid base64 in image data URL", param)
    padding = len(payload) - len(payload.rstrip("=")) if n else 0
    if (n // 4) * 3 - min(padding, 2) > limit:
        raise _too_large(policy, param, limit)
    try:
        # pybase64: the same strict alphabet check (binascii.Error) at SIMD speed; this
        # runs on the event loop, once per image of every request
        return pybase64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _bad("invalid base64 in image data URL", param) from None


def _read_local_file(url: str, policy: MediaPolicy, param: str,
                     limit: int | None = None) -> bytes:
    limit = limit or policy.max_image_bytes
    if policy.allowed_local_media_path is None:
        raise _bad("file URLs are not enabled on this server", param)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _bad("malformed file URL", param) from None
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _bad("malformed file URL", param)
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise _bad("malformed file URL", param)
    if ".." in path.split("/"):
        raise _bad("file URL must not contain '..' segments", param)
    root = os.path.realpath(policy.allowed_local_media_path)
    real = os.path.realpath(path)
    if real == root or os.path.commonpath([root, real]) != root:
        raise _bad("file URL is outside the allowed media directory", param)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise _bad("local image file not found", param) from None
    except OSError:
        raise _bad("local image file could not be read", param) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _bad("local image path is not a regular file", param)
        if st.st_size > limit:
            raise _too_large(policy, param, limit)
        try:
            data = f.read(limit + 1)
        except OSError:
            raise _bad("local image file could not be read", param) from None
    if len(data) > limit:
        raise _too_large(policy, param, limit)
    return data


class MediaFetcher:
    """Loads images for one server; share one instance and ``await aclose()`` at shutdown.

    ``transport`` replaces the default pinned-address httpx transport (tests use
    ``httpx.MockTransport``); ``resolver`` (``async (host, port) -> [ip, ...]``) replaces
    ``getaddrinfo``.  Host checks and IP pinning happen regardless of either.
    """

    def __init__(self, policy: MediaPolicy, transport: httpx.AsyncBaseTransport | None = None,
                 *, resolver: Resolver | None = None):
        self.policy = policy
        self._allow_names, self._allow_nets = _parse_allow_list(policy.allowed_media_hosts)
        self._resolve = resolver or _default_resolve
        if transport is None:
            transport = httpx.AsyncHTTPTransport(
                retries=0, limits=httpx.Limits(max_connections=64, max_keepalive_connections=0))
        # decoding is the memory-hungry, uninterruptible step: at most DECODE_WORKERS images
        # decode at once, each in a process that can be killed when its time is up
        self._decode_pool = ProcessPool("decode", DECODE_WORKERS)
        self._client = httpx.AsyncClient(
            transport=transport, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(policy.total_timeout, connect=policy.connect_timeout),
            headers={"User-Agent": _USER_AGENT, "Accept": "image/*",
                     "Accept-Encoding": "identity"})

    def start(self) -> None:
        """Start the decode workers in the background now rather than at the first image
        (the first start boots the fork server: seconds, which the event loop must not
        wait for)."""
        threading.Thread(target=self._decode_pool.start, name="decode-start",
                         daemon=True).start()

    def close_pool(self) -> None:
        self._decode_pool.close()

    async def aclose(self) -> None:
        await self._client.aclose()
        self.close_pool()

    async def __aenter__(self) -> "MediaFetcher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ public

    async def load_image(self, url: str, *, param: str, max_pixels: int | None = None,
                         budget: PixelBudget | None = None) -> Image.Image:
        pixels = (await self.load(url, param=param, max_pixels=max_pixels, budget=budget))[0]
        return pixels.to_pil()

    async def load(self, url: str, *, param: str, max_pixels: int | None = None,
                   budget: PixelBudget | None = None, turn: str = "") -> tuple[RGBPixels, str]:
        """The decoded image (``RGBPixels``) and ``image_digest`` of its bytes as received.  ``turn`` (the
        API key): queued decodes are taken in turns by key (``ProcessPool``)."""
        if not isinstance(url, str) or not url.strip():
            raise _bad("image URL must be a non-empty string", param)
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = _decode_data_url(url, self.policy, param)
        elif scheme in ("http", "https"):
            data = await self._fetch(url, param)
        elif scheme == "file":
            data = await asyncio.to_thread(_read_local_file, url, self.policy, param)
        else:
            raise _bad("unsupported image URL scheme; use http, https or a base64 data URL",
                       param)
        # charge the request's pixel budget from the header now, so that a request over it
        # is refused at once instead of after queueing for the decode pool
        size = _peek_size(data, self.policy)
        if budget is not None and size is not None and not budget.take(size[0] * size[1]):
            raise _bad(f"the request's images exceed {budget.limit} pixels in total", param)
        check_decode_cost(data, param)
        big = size is None or size[0] * size[1] > BIG_IMAGE_PIXELS
        digest = asyncio.ensure_future(asyncio.to_thread(image_digest, data))
        try:
            image = await self._decode_pool.run(_decode_job, data, self.policy, param,
                                                max_pixels, timeout=self.policy.decode_timeout,
                                                big=big, turn=turn)
            return image, await digest
        except WorkerDied:  # e.g. killed for memory: the image's doing
            raise _bad("image data could not be decoded", param) from None
        except TimeoutError:
            raise _bad(f"timed out decoding image (over {self.policy.decode_timeout:g} s)",
                       param) from None

    async def load_video(self, url: str | list[str], *, param: str, options: VideoOptions,
                         budget: PixelBudget | None = None, turn: str = ""
                         ) -> tuple["DecodedVideo", str]:
        """A video part: ``(DecodedVideo, digest)``.  A string is a clip (``data:video/...``,
        http(s) or file:// within the media policy, at most ``max_video_bytes``), decoded
        and sampled in a decode worker (killed after ``video_decode_timeout``; a "big"
        job, so small images keep a worker); its duration, frame size, frame count and
        the decoded pixels of the sampled frames are checked from the header before any
        frame is decoded.  A list is a video given as frames: image URLs, each loaded as
        an image, under the same caps on frame size and decoded pixels (from each image's
        header) and on duration (frames / fps).  The sampled frames' pixels are charged to
        the request's ``budget``.  The digest: ``video_digest``."""
        if isinstance(url, list):
            return await self._load_frames(url, param=param, options=options, budget=budget,
                                           turn=turn)
        if not isinstance(url, str) or not url.strip():
            raise _bad("video URL must be a non-empty string", param)
        url, limit = url.strip(), self.policy.max_video_bytes
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        try:
            if scheme == "data":  # up to ~48 MB of base64: off the event loop
                data = await asyncio.to_thread(_decode_data_url, url, self.policy, param,
                                               limit, "video")
            elif scheme in ("http", "https"):
                data = await self._fetch(url, param, limit)
            elif scheme == "file":
                data = await asyncio.to_thread(_read_local_file, url, self.policy, param, limit)
            else:
                raise _bad("unsupported video URL scheme; use http, https or a base64 data "
                           "URL", param)
        except APIError as exc:  # the byte readers speak of images
            exc.message = exc.message.replace("image", "video")
            raise
        digest = asyncio.ensure_future(asyncio.to_thread(image_digest, data))
        p = self.policy
        try:
            video = await self._decode_pool.run(
                _decode_video_job, data, param, options, p.max_video_seconds,
                p.max_video_frame_pixels, p.max_video_decoded_pixels,
                timeout=p.video_decode_timeout, big=True, turn=turn)
        except WorkerDied:  # e.g. killed for memory: the video's doing
            raise _bad("video data could not be decoded", param) from None
        except TimeoutError:
            raise _bad(f"timed out decoding video (over {p.video_decode_timeout:g} s)",
                       param) from None
        self._charge(budget, video, param)
        return video, video_digest([await digest], video)

    @staticmethod
    def _charge(budget: PixelBudget | None, video: "DecodedVideo", param: str) -> None:
        if budget is not None and not budget.take(video.frames[..., 0].size):
            raise _bad(f"the request's images and video frames exceed {budget.limit} pixels "
                       "in total", param)

    async def _load_frames(self, urls: list[str], *, param: str, options: VideoOptions,
                           budget: PixelBudget | None, turn: str = ""
                           ) -> tuple["DecodedVideo", str]:
        from models.video import VideoError, frames_from_images
        p = self.policy
        if len(urls) / options.fps > p.max_video_seconds:
            raise _bad(f"video is longer than {p.max_video_seconds:g} s ({len(urls)} frames at "
                       f"{options.fps:g} fps)", param)
        # the video's own cap on decoded pixels, charged from each frame's header before it
        # decodes; the request's budget when all are in
        frames_budget = PixelBudget(p.max_video_decoded_pixels)
        loaded = await gather_all([self.load(u, param=f"{param}[{i}]", budget=frames_budget,
                                             turn=turn) for i, u in enumerate(urls)])
        if any(im.width * im.height > p.max_video_frame_pixels for im, _ in loaded):
            raise _bad("video frames are too large", param)
        import numpy as np
        try:
            video = frames_from_images([np.asarray(im) for im, _ in loaded], options.fps)
        except VideoError as exc:
            raise _bad(str(exc), param) from None
        self._charge(budget, video, param)
        return video, video_digest([d for _, d in loaded], video)

    # ------------------------------------------------------------------ http

    def _parse_http_url(self, url: str, param: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise _bad("malformed image URL", param) from None
        if parsed.scheme not in ("http", "https"):
            raise _bad("unsupported image URL scheme; use http, https or a base64 data URL",
                       param)
        if not parsed.raw_host:
            raise _bad("image URL has no host", param)
        if parsed.userinfo:
            raise _bad("credentials in image URLs are not supported", param)
        return parsed

    async def _checked_addresses(self, url: httpx.URL, param: str) -> list[str]:
        refused = _bad("image URL host is not allowed (it resolves to a private, loopback, "
                       "link-local or otherwise non-public address)", param)
        try:
            host = url.raw_host.decode("ascii").lower()
        except UnicodeDecodeError:
            raise _bad("malformed image URL", param) from None
        port = url.port or (443 if url.scheme == "https" else 80)
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [host]
        else:
            try:
                addresses = await asyncio.wait_for(self._resolve(host, port),
                                                   self.policy.connect_timeout)
            except TimeoutError:
                raise _bad("timed out resolving image host", param) from None
            except (OSError, UnicodeError, ValueError):
                raise _bad("could not resolve image host", param) from None
        if not addresses:
            raise _bad("could not resolve image host", param)
        name_allowed = host.rstrip(".") in self._allow_names
        checked: list[str] = []
        for text in addresses:
            ip = _parse_ip(text)
            if ip is None:
                raise refused
            if not name_allowed and not _is_public(ip):
                inner = _embedded_ipv4(ip)
                if not any(ip in net or (inner is not None and inner in net)
                           for net in self._allow_nets):
                    raise refused
            if text not in checked:
                checked.append(text)
        return checked

    async def _send_pinned(self, url: httpx.URL, addresses: list[str],
                           param: str) -> httpx.Response:
        host = url.raw_host.decode("ascii")
        headers = {"Host": url.netloc.decode("ascii")}
        extensions = {}
        if url.scheme == "https" and _parse_ip(host) is None:
            extensions["sni_hostname"] = host
        for address in addresses:
            try:
                target = url.copy_with(host=address)
            except (httpx.InvalidURL, ValueError):
                continue
            request = self._client.build_request("GET", target, headers=headers,
                                                 extensions=extensions)
            try:
                return await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                continue  # try the next checked address
            except httpx.InvalidURL:
                # httpx prepares the next hop of a redirect even when not following it,
                # and fails on a non-http(s) Location (data:, mailto:, x:y)
                raise _bad("image URL redirected to an unsupported location (only http "
                           "and https redirects are followed)", param) from None
        raise _bad("could not connect to image host", param)

    async def _read_body(self, response: httpx.Response, param: str,
                         limit: int | None = None) -> bytes:
        limit = limit or self.policy.max_image_bytes
        length = response.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > limit:
                raise _too_large(self.policy, param, limit)
        if response.headers.get("content-encoding", "identity").strip().lower() not in (
                "", "identity"):
            # we asked for identity; decompressing would let a small body expand past the cap
            raise _bad("image URL returned a compressed (Content-Encoding) response", param)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.startswith("text/") or content_type in (
                "application/json", "application/xml", "application/xhtml+xml"):
            raise _bad("image URL did not return an image", param)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise _too_large(self.policy, param, limit)
        return bytes(body)

    async def _fetch_hops(self, url: str, param: str, limit: int | None = None) -> bytes:
        current = self._parse_http_url(url, param)
        for hop in range(self.policy.max_redirects + 1):
            addresses = await self._checked_addresses(current, param)
            response = await self._send_pinned(current, addresses, param)
            try:
                status = response.status_code
                if status in _REDIRECT_CODES:
                    location = response.headers.get("location")
                    if not location:
                        raise _bad("image URL returned a redirect without a location", param)
                    if hop >= self.policy.max_redirects:
                        raise _bad("too many redirects fetching image", param)
                    try:
                        target = current.join(location)
                    except (httpx.InvalidURL, ValueError, TypeError):
                        raise _bad("image URL redirected to a malformed URL", param) from None
                    current = self._parse_http_url(str(target), param)
                    continue
                if not 200 <= status < 300:
                    raise _bad(f"image URL returned HTTP {status}", param)
                return await self._read_body(response, param, limit)
            finally:
                await response.aclose()
        raise _bad("too many redirects fetching image", param)  # pragma: no cover

    async def _fetch(self, url: str, param: str, limit: int | None = None) -> bytes:
        try:
            async with asyncio.timeout(self.policy.total_timeout):
                return await self._fetch_hops(url, param, limit)
        except (TimeoutError, httpx.TimeoutException):
            raise _bad("timed out fetching image", param) from None
        except httpx.HTTPError:
            raise _bad("error fetching image", param) from None
