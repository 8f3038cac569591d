"""Video decoding and frame sampling for Qwen3-VL, with PyAV and without torch.

This module runs in the API server's decode worker processes: it must not import torch
(or torchvision).  The tensor side (resize, normalise, patchify, placeholder text) is
``models/video_prep.py``.

Contract
--------
``decode_video_bytes(data, *, fps=2.0, min_frames=4, max_frames=768, max_seconds,
max_frame_pixels, max_source_frames, max_decoded_pixels=None) -> DecodedVideo`` decodes a video held in memory and
returns only the frames Qwen3-VL samples from it, the way transformers does it
(``Qwen3VLVideoProcessor.sample_frames`` on the metadata of transformers' PyAV reader,
``video_utils.read_video_pyav``):

1. open the bytes with PyAV (``io.BytesIO``; nothing touches the file system) and take the
   first video stream;
2. read, from container/stream metadata only and before any pixel is decoded: the frame
   count (``stream.frames``), the frame rate (``stream.average_rate``, else
   ``stream.guessed_rate``), the size and the codec.  Where the container does not state a
   frame count (``stream.frames == 0``: Matroska/WebM, for one) the video packets are
   counted by demuxing (no decoding), bounded by ``max_source_frames``;
3. refuse with :class:`VideoError` (fixed, client-safe messages): empty data, data PyAV
   cannot open, no video stream, a codec without a decoder, a zero or too large frame
   (``width * height > max_frame_pixels``), an aspect ratio over 200, an unknown frame rate, a duration
   (``frames / fps``, as transformers computes it) ``<= 0`` or ``> max_seconds``, a frame
   count of 0 or ``> max_source_frames``; and, once the frames to sample are known,
   their pixels together ``> max_decoded_pixels``;
4. ``sample_indices(total, fps_source, fps=..., min_frames=..., max_frames=...)``;
5. decode sequentially from the start, stop after the last needed index (so no more than
   ``max_source_frames`` frames are ever decoded, whatever the container says), and keep
   the sampled frames as ``frame.to_ndarray(format="rgb24")`` (transformers' conversion).
   Every decoded frame must have the stream's declared size.  Any exception while
   decoding becomes ``VideoError("video data could not be decoded")``.

A container that declares more frames than it holds: decoding never runs past the
last sampled index (``<= total - 1``), so frames beyond what it declares are never
decoded at all.  Truncated streams (fewer decodable frames than declared): a cut inside a
packet makes FFmpeg's decoder fail, which is a ``VideoError`` (transformers fails there
too, with ``InvalidDataError``); a stream that simply ends early (cut at a packet
boundary) is treated like transformers treats it: the sampled frames that were decoded
are used, and ``frame_indices`` lists only those (transformers keeps the full index list
while returning fewer frames, so its timestamps can disagree with its frames; ours
cannot).  No decodable sampled frame at all is a ``VideoError``.  Repeated indices
(impossible with ``sample_indices``, which never asks for more frames than exist, but
handled) are served from one decode.

The size checked in step 3 is what FFmpeg's stream probe (``av.open``) reports, from the
container's header or the codec's extradata; a header that gives no size is refused.

``frames_from_images(images, fps)`` wraps already-decoded RGB uint8 frames, all the same
size, as a ``DecodedVideo`` (every frame is "sampled"; ``frame_indices = range(n)``).

``make_test_clip(...)`` writes a small deterministic MP4 (a moving square whose colour
changes every frame) for the tests and the reference generator.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "DecodedVideo",
    "VideoError",
    "decode_video_bytes",
    "frames_from_images",
    "make_test_clip",
    "sample_indices",
]


MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses more
MAX_SOURCE_FPS = 240  # the source frame count a clip may declare: this x its longest duration
DECODE_THREADS = 2


class VideoError(ValueError):
    """A video the server refuses; the message is fixed text, safe to show a client."""


@dataclass
class DecodedVideo:
    """The sampled frames of one video and what the prompt needs to know about them."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, the sampled frames in order
    fps: float  # the source's frame rate (for a frame list: the fps given)
    frame_indices: list[int]  # source index of each sampled frame
    total_frames: int  # frames in the source (declared by the container, or counted)
    duration: float  # seconds

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)


def sample_indices(total_frames: int, source_fps: float, *, fps: float = 2.0,
                   min_frames: int = 4, max_frames: int = 768) -> list[int]:
    """The source frames Qwen3-VL samples: ``Qwen3VLVideoProcessor.sample_frames`` with
    ``fps`` given (``fps`` frames a second, at least ``min_frames``, at most ``max_frames``
    and never more than the video has, spread evenly from the first frame to the last)."""
    num_frames = int(total_frames / source_fps * fps)
    num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def _positive_finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _count_packets(data: bytes, limit: int) -> int:
    """Video packets (= frames) of the first video stream, demuxed, not decoded; stops
    counting past ``limit``."""
    import av

    n = 0
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size:  # the flush packet at the end has no data
                n += 1
                if n > limit:
                    break
    return n


def decode_video_bytes(data: bytes, *, fps: float = 2.0, min_frames: int = 4,
                       max_frames: int = 768, max_seconds: float, max_frame_pixels: int,
                       max_source_frames: int,
                       max_decoded_pixels: int | None = None) -> DecodedVideo:
    """Decode ``data`` (a whole video file) and return the frames Qwen3-VL samples; see
    the module docstring for the checks and the error policy.  ``max_decoded_pixels``
    bounds the sampled frames' pixels together (the memory they take), checked before
    any frame is decoded."""
    import av

    if not data:
        raise VideoError("video data is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception:
        raise VideoError("video data could not be decoded") from None
    try:
        with container:
            if not container.streams.video:
                raise VideoError("video data has no video stream")
            stream = container.streams.video[0]
            try:
                ctx = stream.codec_context
                codec_ok = ctx is not None and ctx.codec is not None and ctx.codec.is_decoder
            except Exception:
                codec_ok = False
            if not codec_ok:
                raise VideoError("video codec is not supported")
            # FFmpeg's default takes every core for one decode, beside the model's thread
            # and the other decode workers: a couple each (the frames are the same)
            ctx.thread_count = DECODE_THREADS
            width, height = int(ctx.width or 0), int(ctx.height or 0)
            if width <= 0 or height <= 0:
                raise VideoError("video frame size is invalid")
            if width * height > max_frame_pixels:
                raise VideoError("video frames are too large")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                # Qwen's resize refuses these (as the image policy does for photos)
                raise VideoError("video frames have an extreme aspect ratio")
            # the frame rate transformers' reader uses (average_rate); guessed_rate as a
            # fallback where the container has no average
            source_fps = _positive_finite(stream.average_rate) or _positive_finite(
                stream.guessed_rate)
            if source_fps is None:
                raise VideoError("video frame rate is unknown")
            total = int(stream.frames or 0)
            if total > 0:
                duration = total / source_fps  # as transformers computes it
            else:
                # no frame count in the container: its duration bounds the work first
                duration = 0.0
                if stream.duration is not None and stream.time_base is not None:
                    duration = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    duration = container.duration / av.time_base
                if not math.isfinite(duration) or duration <= 0:
                    raise VideoError("video duration is invalid")
                if duration > max_seconds:
                    raise VideoError("video is too long")
                if duration * source_fps > max_source_frames * 1.5 + 16:
                    raise VideoError("video has too many frames")
                total = _count_packets(data, max_source_frames)
                duration = total / source_fps
            if total <= 0:
                raise VideoError("video has no frames")
            if total > max_source_frames:
                raise VideoError("video has too many frames")
            if not math.isfinite(duration) or duration <= 0:
                raise VideoError("video duration is invalid")
            if duration > max_seconds:
                raise VideoError("video is too long")

            indices = sample_indices(total, source_fps, fps=fps, min_frames=min_frames,
                                     max_frames=max_frames)
            if max_decoded_pixels is not None and \
                    len(indices) * width * height > max_decoded_pixels:
                raise VideoError("video's sampled frames hold too many pixels together")
            wanted = set(indices)
            last = indices[-1]
            kept: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(stream)):
                if frame.width != width or frame.height != height:
                    raise VideoError("video frame size changes mid-stream")
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= last:  # nothing after the last sampled frame is decoded
                    break
    except VideoError:
        raise
    except Exception:
        raise VideoError("video data could not be decoded") from None

    # truncated stream: the sampled frames reached (a prefix of ``indices``) are used
    reached = [i for i in indices if i in kept]
    if not reached:
        raise VideoError("video data could not be decoded")
    frames = np.stack([kept[i] for i in reached])
    return DecodedVideo(frames=frames, fps=float(source_fps), frame_indices=reached,
                        total_frames=total, duration=float(duration))


def frames_from_images(images: list[np.ndarray], fps: float) -> DecodedVideo:
    """A video given as its frames: ``(H, W, 3)`` uint8 RGB arrays, all the same size,
    ``fps`` frames a second.  They are all used (no sampling)."""
    if not images:
        raise VideoError("video has no frames")
    if _positive_finite(fps) is None:
        raise VideoError("video frame rate is invalid")
    first = images[0]
    for im in images:
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 \
                or im.shape[2] != 3:
            raise VideoError("video frames must be RGB images")
        if im.shape != first.shape:
            raise VideoError("video frames must all have the same size")
    if first.shape[0] <= 0 or first.shape[1] <= 0:
        raise VideoError("video frame size is invalid")
    n = len(images)
    return DecodedVideo(frames=np.stack(images), fps=float(fps), frame_indices=list(range(n)),
                        total_frames=n, duration=n / float(fps))


def _clip_frame(i: int, n: int, width: int, height: int, background, square: int) -> np.ndarray:
    """Frame ``i`` of ``n``: a square crossing the picture diagonally, its colour shifting
    every frame, on a plain background."""
    a = np.empty((height, width, 3), np.uint8)
    a[:] = background
    side = max(2, min(square, width, height))
    f = i / max(1, n - 1)
    x = round(f * (width - side))
    y = round(f * (height - side))
    colour = ((40 + 7 * i) % 256, (220 - 5 * i) % 256, (90 + 11 * i) % 256)
    a[y:y + side, x:x + side] = colour
    return a


def make_test_clip(path: str | Path | None = None, *, seconds: float = 3.0, fps: int = 10,
                   size: tuple[int, int] = (160, 120), codec: str | None = None,
                   background: tuple[int, int, int] = (30, 60, 90), square: int = 40,
                   container_format: str = "mp4", faststart: bool = False) -> bytes:
    """A small test video: ``round(seconds * fps)`` frames of ``size = (W, H)`` (even
    sides: yuv420p), a moving square on a plain ``background``, encoded with ``codec``
    (default: libx264 when this PyAV has it, else mpeg4) into ``container_format``.

    Returns the bytes (also written to ``path`` unless it is None).  libx264 runs with one
    thread and no lookahead, so the same arguments give the same bytes on the same PyAV
    build.
    ``faststart`` puts the MP4 index first (a truncated copy then still opens)."""
    import av

    width, height = size
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    n = max(1, round(seconds * fps))
    # one thread and no rate-control lookahead: x264 is otherwise not reproducible run to
    # run (measured: 5 different outputs in 20 runs with threads=1 alone)
    options = {"threads": "1", "x264-params": "rc-lookahead=0"} if codec == "libx264" else {}
    if faststart:  # the muxer rewrites its output to move the index: a real file
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "clip"
            _encode(av, str(target), container_format, {"movflags": "faststart"}, codec,
                    options, fps, n, width, height, background, square)
            data = target.read_bytes()
    else:
        buf = io.BytesIO()
        _encode(av, buf, container_format, {}, codec, options, fps, n, width, height,
                background, square)
        data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _encode(av, target, container_format, container_options, codec, options, fps, n, width,
            height, background, square) -> None:
    with av.open(target, mode="w", format=container_format, options=container_options) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.time_base = Fraction(1, fps)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(
                _clip_frame(i, n, width, height, background, square), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
