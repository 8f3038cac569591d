"""Video input through the real server and the ``openai`` SDK (issue 34): a generated MP4
(a moving coloured square) as a data URL, as an http URL and as a frame list, streamed and
not; ``fps`` / ``max_frames`` change the video tokens as documented; videos batched with
image and text requests answer as they do alone (greedy, float32); ``/tokenize`` counts
them; bad videos get 400s in OpenAI's envelope and the server keeps serving.  Hostile
videos beside an innocent request: ``tests/test_no_monopoly.py``."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from models.video import make_test_clip
from tests.conftest import data_url, png_bytes
from tests.test_api import serve_png

MODEL = "qwen3-vl"
# small caps, so that the refusals below are cheap to provoke: 5 s, frames of at most
# 200,000 pixels, 2 MB; a source frame count above 5 x 240 = 1,200
FLAGS = ("--allowed-media-hosts", "127.0.0.1/32", "--max-video-seconds", "5",
         "--max-video-frame-pixels", "200000", "--max-video-bytes", "2000000",
         "--video-decode-timeout", "20")


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_test_clip(seconds=3.0, fps=10, size=(160, 120))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, clip):
    d = tmp_path_factory.mktemp("media")
    (d / "unboxing.mp4").write_bytes(clip)
    return d


@pytest.fixture(scope="module")
def srv(server_factory, media_dir):
    return server_factory(*FLAGS, "--allowed-local-media-path", str(media_dir))


@pytest.fixture(scope="module")
def video_host(clip):
    httpd, url = serve_png(clip, mime="video/mp4", name="unboxing.mp4")
    yield url
    httpd.shutdown()


@pytest.fixture
def c(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)


def video_part(url, **opts) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **opts}}


def ask(c, part, *, text="What happens in this clip?", max_tokens=8, **kw):
    return c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [part, {"type": "text",
                                                                   "text": text}]}],
        max_tokens=max_tokens, temperature=0, **kw)


def tokenize(srv, content) -> dict:
    r = httpx.post(srv.url + "/tokenize", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def video_tokens(r) -> int:
    return r.usage.prompt_tokens_details.video_tokens


def test_clip_as_data_url_streamed_and_not(c, clip):
    r = ask(c, video_part(data_url(clip, "video/mp4")))
    assert r.choices[0].message.content and r.usage.completion_tokens == 8
    # 3 s sampled at 2 fps: 6 frames, 3 frame pairs of 160x128 px (a token per 32x32 px)
    assert video_tokens(r) == 3 * 20 and r.usage.prompt_tokens_details.image_tokens == 0
    chunks = list(ask(c, video_part(data_url(clip, "video/mp4")), stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert video_tokens(chunks[-1]) == 60 and chunks[-1].usage.prompt_tokens == \
        r.usage.prompt_tokens


def test_clip_as_http_and_file_url_and_frame_list(c, srv, clip, video_host, media_dir):
    by_data = ask(c, video_part(data_url(clip, "video/mp4")))
    for url in (video_host, (media_dir / "unboxing.mp4").as_uri()):
        other = ask(c, video_part(url))
        assert other.choices[0].message.content == by_data.choices[0].message.content
        assert other.usage.prompt_tokens == by_data.usage.prompt_tokens
    outside = httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
            video_part((media_dir.parent / "elsewhere.mp4").as_uri())]}]})
    assert outside.status_code == 400 and "outside" in outside.json()["error"]["message"]
    # a frame list: every frame is used, at its own fps (timestamps 0.5 s apart at 2 fps)
    frames = [data_url(png_bytes(160, 120, color=(40 * i, 90, 200))) for i in range(4)]
    r = ask(c, video_part(frames, fps=2))
    assert video_tokens(r) == 2 * 20
    slow = ask(c, video_part(frames, fps=1))
    assert video_tokens(slow) == 40
    # the timestamps differ ("<0.2 seconds>" vs "<0.5 seconds>"), so does the prompt text
    tok = tokenize(srv, [video_part(frames, fps=2)])
    slow_tok = tokenize(srv, [video_part(frames, fps=1)])
    assert tok["video_tokens"] == slow_tok["video_tokens"] == 40
    assert tok["tokens"] != slow_tok["tokens"]


def test_fps_and_max_frames_change_the_video_tokens(c, srv, clip):
    """Documented: a clip is sampled at ``fps`` (default 2), at least 4 frames, at most
    ``max_frames``; frames go in pairs, each pair 20 tokens here."""
    url = data_url(clip, "video/mp4")
    assert video_tokens(ask(c, video_part(url))) == 60            # 6 frames
    assert video_tokens(ask(c, video_part(url, fps=1))) == 40     # 3 -> at least 4 frames
    assert video_tokens(ask(c, video_part(url, fps=4))) == 120    # 12 frames
    assert video_tokens(ask(c, video_part(url, max_frames=2))) == 20
    # fps is kept exactly: 2.3333333 samples 6 frames, 2.3333334 samples 7 (4 pairs), and
    # the second is not served the first one's cached pixels
    assert video_tokens(ask(c, video_part(url, fps=2.3333333))) == 60
    assert video_tokens(ask(c, video_part(url, fps=2.3333334))) == 80
    # a request's min_pixels may not lift the frames past the video's budget
    from server.ratelimit import video_token_bound
    from server.settings import Settings
    s = Settings()
    big = ask(c, video_part(url, min_pixels=s.video_max_pixels))
    assert 60 < video_tokens(big) <= video_token_bound(s.video_max_pixels, s.video_min_pixels,
                                                       s.video_max_frames)
    # /tokenize counts what a request would run
    tok = tokenize(srv, [video_part(url, fps=1),
                         {"type": "text", "text": "What happens in this clip?"}])
    r = ask(c, video_part(url, fps=1))
    assert tok["video_tokens"] == 40 and tok["count"] == r.usage.prompt_tokens


async def test_video_batched_with_images_and_text_equals_alone(srv, clip):
    ac = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(96, 64))}}
    parts = [
        [video_part(data_url(clip, "video/mp4")), {"type": "text", "text": "What moves?"}],
        [video_part(data_url(make_test_clip(seconds=2.0, size=(96, 64), background=(200, 90, 10)),
                             "video/mp4"), fps=3), image, {"type": "text", "text": "Same?"}],
        [image, {"type": "text", "text": "Describe the photo."}],
        "Tell me about parcels.",
    ]

    async def one(content):
        r = await ac.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12,
            temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content, r.usage.prompt_tokens
    from bench.hostpath import decode_counters
    alone = [await one(p) for p in parts]
    steps, rows = decode_counters(srv.base_url)
    together = await asyncio.gather(*(one(p) for p in parts * 2))
    assert together == alone * 2
    steps2, rows2 = decode_counters(srv.base_url)
    assert (rows2 - rows) / (steps2 - steps) > 1.5  # they were decoded together


def audio_only_mp4() -> bytes:
    """An MP4 holding an AAC sound track and no video stream."""
    import io

    import av
    import numpy as np
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("aac", rate=16000)
        st.layout = "mono"
        for i in range(10):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32),
                                            format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def _bad_clips() -> dict[str, tuple[str, int]]:
    clip = make_test_clip(seconds=3.0, fps=10, size=(160, 120))
    return {
        "truncated": (data_url(clip[:len(clip) // 2], "video/mp4"), 400),
        "garbage": (data_url(b"\x00\x01garbage" * 100, "video/mp4"), 400),
        "wrong codec: sound only": (data_url(audio_only_mp4(), "video/mp4"), 400),
        "an image, not a video": (data_url(png_bytes(), "video/mp4"), 400),
        "image mime type": (data_url(png_bytes()), 400),
        "huge frames": (data_url(make_test_clip(seconds=1.0, size=(640, 480)), "video/mp4"),
                        400),
        "too long": (data_url(make_test_clip(seconds=8.0, fps=2, size=(32, 32)),
                              "video/mp4"), 400),
        "thousands of frames": (data_url(make_test_clip(seconds=2.5, fps=1000, size=(16, 16)),
                                         "video/mp4"), 400),
        # PyAV writes no file at all for a stream without frames: that is what arrives
        "zero duration (no frames)": ("data:video/mp4;base64,", 400),
        "header only": (data_url(clip[:200], "video/mp4"), 400),
        "too many bytes": ("data:video/mp4;base64," + "A" * 2_800_000, 413),
    }


def test_bad_videos_get_400_and_the_server_keeps_serving(srv, clip):
    for name, (url, status) in _bad_clips().items():
        r = httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
                video_part(url), {"type": "text", "text": "?"}]}]})
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, (name, err)
        assert err["param"].startswith("messages[0].content[0]"), (name, err)
    # other spellings, roles and counts
    cases = [
        [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}],
        [{"role": "user", "content": [{"type": "input_video", "video_url": "x"}]}],
        [{"role": "system", "content": [video_part(data_url(clip, "video/mp4"))]},
         {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [video_part(data_url(clip, "video/mp4"))] * 3}],
        [{"role": "user", "content": [video_part([])]}],
        [{"role": "user", "content": [video_part(data_url(clip, "video/mp4"), fps=0)]}],
    ]
    for messages in cases:
        r = httpx.post(srv.base_url + "/chat/completions", timeout=60,
                       json={"model": MODEL, "max_tokens": 2, "messages": messages})
        assert r.status_code == 400, (messages, r.text[:300])
        assert "error" in r.json()
    ok = httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


async def test_decodes_are_queued_in_turns_by_key(clip):
    """A request's images and video decode under its API key's turn in the decode pool
    (``ProcessPool``: a free worker takes the oldest job of the key served longest ago), so
    one key's slow clips do not make another key's photos wait behind all of them."""
    from server.api import protocol as p
    from server.api.media import MediaFetcher, MediaPolicy
    from server.api.metrics import Metrics
    from server.api.serving import ChatService
    from server.settings import Settings

    class Engine:
        supports_video, model_id, vocab_size = True, "m", 100
    async with MediaFetcher(MediaPolicy()) as fetcher:
        turns = []
        run = fetcher._decode_pool.run

        async def spy(fn, *args, turn="", **kw):
            turns.append((fn.__name__, turn))
            return await run(fn, *args, turn=turn, **kw)
        fetcher._decode_pool.run = spy
        svc = ChatService(Engine(), Settings(), fetcher, Metrics(lambda: {}))
        req = p.ChatCompletionRequest(model="qwen3-vl", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
            video_part(data_url(clip, "video/mp4"))]}])
        _, images, videos = await svc._convert(req, "key-a")
    assert len(images) == len(videos) == 1
    assert sorted(turns) == [("_decode_job", "key-a"), ("_decode_video_job", "key-a")]
