"""Videos in the engine (issue 34): a video's frame pairs are vision items like images, and
the batching engine gives, token for token (float32, greedy), what HF ``generate()`` gives
with ``pixel_values_videos`` / ``video_grid_thw`` (the sequential scheduler, the reference
twin): alone, batched with image and text requests, chunked across frame pairs, resent
(prefix and encoder caches), with n > 1."""

from __future__ import annotations

import asyncio

import pytest

from models.video import decode_video_bytes, make_test_clip
from server.engine.interface import EngineRequest, SamplingParams, VideoInput
from tests.test_batching import img, make_engine, run  # noqa: F401 - make_engine: a fixture

CLIP = dict(max_seconds=60, max_frame_pixels=10**7, max_source_frames=10**4,
            max_decoded_pixels=10**9)


def video(seconds=3.0, size=(160, 120), fps=2.0, max_frames=64, seed=0) -> VideoInput:
    data = make_test_clip(seconds=seconds, size=size, background=(30 + 40 * seed, 60, 90))
    d = decode_video_bytes(data, fps=fps, min_frames=4, max_frames=max_frames, **CLIP)
    return VideoInput(d, 4096, 25_165_824, digest=f"clip{seed}:{seconds}:{size}:{fps}")


def request(rid, parts, videos=(), images=(), max_tokens=12, **params) -> EngineRequest:
    return EngineRequest(rid, [{"role": "user", "content": parts}], list(images),
                         SamplingParams(max_tokens=max_tokens, temperature=0,
                                        ignore_eos=True, **params), videos=list(videos))


def video_request(rid="v", v=None, text="What happens?", **kw):
    return request(rid, [{"type": "video"}, {"type": "text", "text": text}],
                   videos=[v or video()], **kw)


def mixed():
    """A video, a video with an image, two videos, an image, text."""
    return [
        video_request("v0"),
        request("vi", [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video"}],
                videos=[video(seconds=2.2, size=(200, 90), seed=1)], images=[img(64, 48, 3)]),
        request("vv", [{"type": "video"}, {"type": "video"}, {"type": "text", "text": "?"}],
                videos=[video(seconds=1.0, seed=2), video(seconds=2.0, size=(96, 64), seed=3)]),
        request("i", [{"type": "image"}, {"type": "text", "text": "Describe."}],
                images=[img(80, 40, 5)]),
        request("t", "Say something long."),
    ]


async def test_video_prompt_counts_and_items(make_engine):
    """A 3 s clip at 2 fps: 6 frames, 3 frame pairs; each pair its own timestamp and run
    of placeholders; usage counts the video tokens apart from the image tokens."""
    engine = make_engine()
    v = video()
    prep = engine.builder.build(video_request(v=v))
    t, h, w = prep.video_grid_thw[0].tolist()
    assert (t, prep.item_video) == (3, [0, 0, 0])
    per_pair = h * w // 4
    assert prep.video_tokens == 3 * per_pair and prep.image_tokens == 0
    text = engine.builder.tokenizer.decode(prep.input_ids[0])
    stamps = [f"<{s:.1f} seconds>" for s in engine.builder.videos.timestamps(
        v.video.frame_indices, v.video.fps)]
    assert all(s in text for s in stamps) and len(stamps) == 3
    count = await engine.count(video_request(v=v))
    assert count.token_ids == prep.input_ids[0].tolist() and count.video_tokens == 3 * per_pair
    ids, _, _ = await run(engine, video_request(v=v))
    assert len(ids[0]) == 12


async def test_batching_matches_hf_generate_with_videos(make_engine):
    """Token for token against HF ``generate()`` with ``pixel_values_videos`` (the
    reference twin), each alone, then all together in one batch."""
    batching, reference = make_engine(), make_engine(scheduler="sequential")
    reqs = mixed()
    expected = [(await run(reference, r))[0] for r in reqs]
    alone = [(await run(batching, r))[0] for r in reqs]
    assert alone == expected
    together = await asyncio.gather(*(run(batching, r) for r in reqs))
    assert [g[0] for g in together] == expected


async def test_video_chunked_resent_and_n(make_engine):
    """A step budget smaller than one frame pair's tokens (the prefill is chunked inside
    the video), the same video resent (prefix and encoder caches hit) and n = 2: the same
    tokens as the uncached, unchunked reference."""
    reference = make_engine(scheduler="sequential")
    req = video_request("c", v=video(seconds=2.0, size=(256, 192)))
    want = (await run(reference, req))[0]
    chunked = make_engine(max_num_batched_tokens=32)
    assert (await run(chunked, req))[0] == want
    hits = chunked.runner.encoder_hits
    again = (await run(chunked, video_request("c2", v=req.videos[0])))[0]
    assert again == want
    assert chunked.blocks.hit_tokens > 0 or chunked.runner.encoder_hits > hits
    two = (await run(chunked, video_request("n2", v=req.videos[0], n=2)))[0]
    assert two[0] == want[0] and two[1] == want[0]


async def test_video_placeholder_in_text_is_refused(make_engine):
    from server.errors import InvalidRequest
    engine = make_engine()
    bad = request("x", "<|video_pad|> hi")
    with pytest.raises(InvalidRequest):
        engine.builder.build(bad)
    extra = request("y", [{"type": "video"}, {"type": "text", "text": "<|video_pad|>"}],
                    videos=[video()])
    with pytest.raises(InvalidRequest):
        engine.builder.build(extra)


def test_video_token_bound_covers_the_processor(make_engine):
    """The key limits' per-video charge (``video_token_bound``) is never below what the
    processor makes of a video, over frame counts (odd and even), sizes and budgets."""
    from server.ratelimit import video_token_bound
    proc = make_engine().builder.videos
    worst = 0.0
    for max_px, min_px in [(25_165_824, 4096), (1_000_000, 4096), (200_000, 65536)]:
        for frames in [2, 3, 4, 5, 7, 9, 16, 63, 64]:
            for h, w in [(120, 160), (1080, 1920), (2160, 3840), (16, 3000), (3000, 16), (33, 6000), (720, 1280)]:
                grid = proc.grid(frames, h, w, min_px, max_px)
                real = proc.tokens(grid) + grid[0] * 12 + 2
                bound = video_token_bound(max_px, min_px, 64)
                assert real <= bound, (max_px, min_px, frames, h, w, real, bound)
                worst = max(worst, real / bound)
    assert worst > 0.4  # and not uselessly loose


def test_video_keys_are_salted_per_tenant(make_engine):
    """The same clip from two tenants: different keys for its pixels, encoder outputs and
    prefix blocks (no cross-tenant hit), equal keys within one tenant."""
    engine = make_engine()
    v = video()
    a = video_request("a", v=v)
    a.cache_salt = "tenant-a"
    b = video_request("b", v=v)
    b.cache_salt = "tenant-b"
    a2 = video_request("a2", v=v)
    a2.cache_salt = "tenant-a"
    ka, kb, ka2 = (engine.builder.build(r).image_keys for r in (a, b, a2))
    assert ka == ka2 and not set(ka) & set(kb)
