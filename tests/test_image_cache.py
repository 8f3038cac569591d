"""Image identity, the preprocessed-pixel cache, parallel preparation and the cache
reporting plumbing (issue 12 items 2 and 4, issue 11 item 4).

* ``ByteLRU`` (server/engine/lru.py): counters, LRU order, byte budget, thread safety.
* Image keys: the same photo resent with the same budget gets the same key; two different
  photos of the same size never share one; the budget is part of the key.
* ``PromptBuilder`` with the cache: a resent image is preprocessed once, cached pixels
  equal freshly computed ones, eviction under a tiny budget; many requests prepared on
  several threads at once equal the same requests prepared one by one.
* Greedy output through the real engine is the same with the cache on and off.
* ``usage.prompt_tokens_details.cached_tokens`` from ``Output.cached_tokens`` (fake engine)
  and through the openai SDK against the real server; the cache metrics in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench.images import synthetic_photo
from server.engine.interface import EngineRequest, ImageInput, Output, SamplingParams
from server.engine.lru import ByteLRU
from tests.conftest import data_url, png_bytes

BUDGET = (4096, 65536)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def request(rid: str, images: list[ImageInput], text: str = "what is this?") -> EngineRequest:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return EngineRequest(rid, [{"role": "user", "content": content}], images,
                         SamplingParams(max_tokens=8, temperature=0))


# --- ByteLRU -------------------------------------------------------------------------------

def test_lru_counts_hits_and_misses():
    c = ByteLRU(100)
    assert c.get("a") is None
    assert c.put("a", 1, 10) and c.get("a") == 1 and c.peek("a") == 1
    assert c.stats() == {"hits": 1, "misses": 1, "queries": 2, "evictions": 0, "bytes": 10,
                         "entries": 1, "capacity": 100}
    assert "a" in c and len(c) == 1


def test_lru_evicts_least_recently_used_within_budget():
    c = ByteLRU(30)
    for k in "abc":
        c.put(k, k, 10)
    c.get("a")                       # b is now the least recently used
    c.put("d", "d", 10)
    assert "b" not in c and all(k in c for k in "acd")
    assert c.bytes == 30 and c.evictions == 1
    c.put("big", "x", 25)            # evicts as many as it takes
    assert c.bytes <= 30 and "big" in c and c.evictions == 4


def test_lru_replace_oversize_and_off():
    c = ByteLRU(50)
    c.put("a", 1, 20)
    c.put("a", 2, 30)                # replaced: charged once
    assert c.get("a") == 2 and c.bytes == 30 and len(c) == 1
    assert not c.put("huge", 0, 51) and "huge" not in c and c.bytes == 30
    assert c.pop("a") == 2 and c.bytes == 0 and c.pop("a") is None
    off = ByteLRU(0)
    assert not off.enabled and not off.put("a", 1, 0 + 1) and off.get("a") is None
    assert off.stats()["misses"] == 1
    with pytest.raises(ValueError):
        ByteLRU(-1)


def test_lru_is_thread_safe():
    c = ByteLRU(1000)

    def work(t):
        for i in range(3000):
            k = (t * 7 + i) % 150
            if c.get(k) is None:
                c.put(k, k, 1 + k % 13)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, range(8)))
    s = c.stats()
    assert s["queries"] == 8 * 3000 and s["bytes"] <= 1000
    # the charge agrees with the entries left
    assert s["bytes"] == sum(1 + k % 13 for k in range(150) if c.peek(k) is not None)


# --- image identity ------------------------------------------------------------------------

def test_image_keys():
    from server.engine.prompt import image_key
    a, b = noise(64, 48, 1), noise(64, 48, 2)        # same size, different content
    assert image_key(ImageInput(a, *BUDGET)) != image_key(ImageInput(b, *BUDGET))
    assert image_key(ImageInput(a, *BUDGET)) == image_key(ImageInput(a.copy(), *BUDGET))
    assert image_key(ImageInput(a, 4096, 65536)) != image_key(ImageInput(a, 4096, 16384))
    assert image_key(ImageInput(a, 4096, 65536)) != image_key(ImageInput(a, 8192, 65536))
    # a digest of the bytes received wins over the pixels, and never meets a pixel key
    assert image_key(ImageInput(a, *BUDGET, digest="ab12")) == "ab12:4096:65536"
    assert image_key(ImageInput(a, *BUDGET)).startswith("px")
    arr = np.asarray(a)                                # arrays and tensors too
    assert image_key(ImageInput(arr, *BUDGET)) == image_key(ImageInput(arr.copy(), *BUDGET))
    assert image_key(ImageInput(torch.from_numpy(arr.copy()), *BUDGET)) == \
        image_key(ImageInput(arr, *BUDGET))
    assert image_key(ImageInput(arr, *BUDGET)) != image_key(ImageInput(np.asarray(b), *BUDGET))


async def test_fetcher_digest_is_the_bytes_hash():
    """``MediaFetcher.load`` returns the image and the hash of the bytes as received: the
    same bytes resent give the same digest, other bytes another."""
    from server.api.media import MediaFetcher, MediaPolicy, image_digest
    one, two = png_bytes(64, 48, (10, 20, 30)), png_bytes(64, 48, (10, 20, 31))
    async with MediaFetcher(MediaPolicy()) as fetcher:
        (im1, d1), (_, d1b), (im2, d2) = await asyncio.gather(
            fetcher.load(data_url(one), param="p"), fetcher.load(data_url(one), param="p"),
            fetcher.load(data_url(two), param="p"))
    assert d1 == d1b == image_digest(one) and d2 == image_digest(two) and d1 != d2
    assert len(d1) == 32 and im1.size == im2.size == (64, 48)


# --- the pixel cache in PromptBuilder ------------------------------------------------------

@pytest.fixture(scope="module")
def processor(toy_model):
    from models.processor import load_processor
    return load_processor(toy_model)


def builder(processor, cache_bytes: int, mode: str = "torch"):
    from server.engine.prompt import PromptBuilder
    b = PromptBuilder(processor, max_model_len=4096, default_max_tokens=16,
                      image_preprocess=mode, image_cache_bytes=cache_bytes)
    calls = []
    inner = b._images

    def counted(images):
        calls.append(len(images))
        return inner(images)
    b._images = counted
    return b, calls


@pytest.mark.parametrize("mode", ["torch", "pil"])
def test_resent_image_is_preprocessed_once(processor, mode):
    cached, calls = builder(processor, 64 << 20, mode)
    plain, _ = builder(processor, 0, mode)
    photo = synthetic_photo(300, 200, 1)
    first = cached.build(request("a", [ImageInput(photo, *BUDGET, digest="d1")]))
    again = cached.build(request("b", [ImageInput(photo.copy(), *BUDGET, digest="d1")],
                                 text="and now?"))
    assert calls == [1]                                   # preprocessed once
    assert cached.image_cache.stats()["hits"] == 1 and cached.image_cache.stats()["queries"] == 2
    ref = plain.build(request("c", [ImageInput(photo, *BUDGET)]))
    for p in (first, again):
        assert torch.equal(p.pixel_values, ref.pixel_values)
        assert torch.equal(p.image_grid_thw, ref.image_grid_thw)
    assert first.image_keys == again.image_keys == ["d1:4096:65536"]
    assert torch.equal(first.input_ids, ref.input_ids)


def test_different_images_of_one_size_do_not_share_pixels(processor):
    b, calls = builder(processor, 64 << 20)
    x, y = noise(128, 96, 1), noise(128, 96, 2)
    px = b.build(request("a", [ImageInput(x, *BUDGET)]))
    py = b.build(request("b", [ImageInput(y, *BUDGET)]))
    assert calls == [1, 1] and px.image_keys != py.image_keys
    assert torch.equal(px.image_grid_thw, py.image_grid_thw)
    assert not torch.equal(px.pixel_values, py.pixel_values)


def test_mixed_hits_and_misses_in_one_request(processor):
    """A request with a cached image between new ones: the misses go through one call,
    and the assembled pixels equal the uncached builder's."""
    cached, calls = builder(processor, 64 << 20)
    plain, _ = builder(processor, 0)
    imgs = [synthetic_photo(200, 300, 3), noise(37, 53, 4), synthetic_photo(640, 480, 5)]
    cached.build(request("warm", [ImageInput(imgs[1], 4096, 16384)]))
    inputs = [ImageInput(imgs[0], *BUDGET), ImageInput(imgs[1], 4096, 16384),
              ImageInput(imgs[2], *BUDGET)]
    got = cached.build(request("r", inputs))
    want = plain.build(request("r", inputs))
    assert calls == [1, 2]
    assert torch.equal(got.pixel_values, want.pixel_values)
    assert torch.equal(got.image_grid_thw, want.image_grid_thw)
    assert torch.equal(got.input_ids, want.input_ids)
    # every cached entry owns its storage: no slice of a bigger batch kept alive
    for key in got.image_keys:
        pv, _ = cached.image_cache.peek(key)
        assert pv.untyped_storage().nbytes() == pv.numel() * pv.element_size()


def test_same_image_twice_in_one_request_is_preprocessed_once(processor):
    cached, calls = builder(processor, 64 << 20)
    plain, _ = builder(processor, 0)
    photo = synthetic_photo(200, 150, 9)
    inputs = [ImageInput(photo, *BUDGET, digest="same"), ImageInput(noise(40, 40), *BUDGET),
              ImageInput(photo, *BUDGET, digest="same")]
    got = cached.build(request("r", inputs))
    want = plain.build(request("r", inputs))
    assert calls == [2] and got.image_keys[0] == got.image_keys[2]
    assert torch.equal(got.pixel_values, want.pixel_values)
    assert torch.equal(got.image_grid_thw, want.image_grid_thw)


def test_eviction_under_a_tiny_budget(processor):
    one_image = builder(processor, 64 << 20)[0].build(
        request("x", [ImageInput(noise(64, 64, 0), *BUDGET)])).pixel_values
    size = one_image.numel() * one_image.element_size() + 3 * 8
    b, calls = builder(processor, int(size * 1.5))        # room for one image
    a, c = noise(64, 64, 1), noise(64, 64, 2)
    for im in (a, c, a):
        b.build(request("r", [ImageInput(im, *BUDGET)]))
    assert calls == [1, 1, 1]                              # a was evicted by c
    s = b.image_cache.stats()
    assert s["evictions"] == 2 and s["entries"] == 1 and s["bytes"] <= int(size * 1.5)
    b.build(request("r", [ImageInput(a, *BUDGET)]))
    assert calls == [1, 1, 1] and b.image_cache.stats()["hits"] == 1


@pytest.mark.parametrize("mode", ["torch", "pil"])
def test_concurrent_preparation_equals_sequential(processor, mode):
    """40 requests (text, one or two images, resent images) prepared on 4 threads at once:
    the same ids, pixels and keys as prepared one by one on an uncached builder."""
    cached, _ = builder(processor, 64 << 20, mode)
    plain, _ = builder(processor, 0, mode)
    photos = [synthetic_photo(160 + 16 * i, 120 + 8 * i, i) for i in range(5)]
    reqs = []
    for i in range(40):
        imgs = [ImageInput(photos[i % 5], *BUDGET)] if i % 3 else []
        if i % 4 == 0:
            imgs.append(ImageInput(photos[(i + 2) % 5], 4096, 16384))
        reqs.append(request(f"r{i}", imgs, text=f"question number {i} " + "word " * (i % 7)))
    want = [plain.build(r) for r in reqs]
    start = threading.Barrier(4)

    def prepare(chunk):
        start.wait()
        return [cached.build(r) for r in chunk]

    with ThreadPoolExecutor(4) as ex:
        parts = list(ex.map(prepare, [reqs[k::4] for k in range(4)]))
    got = [None] * len(reqs)
    for k, part in enumerate(parts):
        for j, p in enumerate(part):
            got[k + 4 * j] = p
    for g, w in zip(got, want):
        assert torch.equal(g.input_ids, w.input_ids)
        assert g.image_keys == w.image_keys
        assert (g.pixel_values is None) == (w.pixel_values is None)
        if w.pixel_values is not None:
            assert torch.equal(g.pixel_values, w.pixel_values)
            assert torch.equal(g.image_grid_thw, w.image_grid_thw)


def test_prep_settings():
    from server.settings import Settings
    s = Settings()
    assert s.prep_workers == 2 and s.image_cache_mb == 512
    s = Settings.load(["--prep-workers", "3", "--image-cache-mb", "0"])
    assert s.prep_workers == 3 and s.image_cache_mb == 0


# --- through the engine --------------------------------------------------------------------

async def test_greedy_output_same_with_cache_on_and_off(toy_model):
    from models.loader import load_model
    from server.engine.core import AsyncEngine
    from server.settings import Settings

    photo = synthetic_photo(640, 480, 7)
    reqs = [request(f"r{i}", [ImageInput(photo, *BUDGET, digest="fixed")], text=t)
            for i, t in enumerate(["describe", "describe", "and the colour?"])]
    for r in reqs:
        r.params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    out, hits = {}, {}
    for mb in (0, 64):
        s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536, image_cache_mb=mb)
        engine = AsyncEngine(load_model(s), s)
        try:
            toks = []
            for r in reqs:  # one after another: the later ones find the first's pixels
                toks.append([t async for o in engine.generate(r, engine.reserve())
                             for t in o.token_ids])
            out[mb] = toks
            hits[mb] = engine.stats()
        finally:
            await engine.shutdown(5)
    assert all(len(t) == 10 for t in out[0]) and out[64] == out[0]
    assert hits[64]["image_cache_hits"] == 2 and hits[64]["image_cache_queries"] == 3
    assert hits[0]["image_cache_hits"] == 0


async def test_cached_tokens_reach_every_output_of_a_choice(toy_model):
    """The engine's prefix cache: the same long prompt resent is partly served from the
    cache, and every Output of each choice says how much (``Output.cached_tokens``)."""
    from models.loader import load_model
    from server.engine.core import AsyncEngine
    from server.settings import Settings

    s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536)
    engine = AsyncEngine(load_model(s), s)
    text = "The store ships within two days and takes returns for thirty days. " * 12
    try:
        runs = []
        for rid in ("first", "again"):
            req = request(rid, [ImageInput(synthetic_photo(96, 64, 3), *BUDGET, digest="p")],
                          text=text)
            req.params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=2)
            runs.append([o async for o in engine.generate(req, engine.reserve())])
    finally:
        await engine.shutdown(5)
    first, again = runs
    prompt = first[0].prompt_tokens
    assert {o.cached_tokens for o in first} == {0}
    cached = {o.cached_tokens for o in again}
    assert len(cached) == 1 and 0 < cached.pop() < prompt
    for i in (0, 1):
        assert [t for o in first if o.index == i for t in o.token_ids] == \
            [t for o in again if o.index == i for t in o.token_ids]


def test_coalesce_keeps_cached_tokens():
    from server.engine.output import coalesce as _coalesce
    outs = [Output(0, "a", [1], prompt_tokens=9, completion_tokens=1, cached_tokens=6),
            Output(0, "b", [2], prompt_tokens=9, completion_tokens=2, cached_tokens=6)]
    (merged,) = _coalesce(outs)
    assert merged.text == "ab" and merged.cached_tokens == 6


# --- reporting -----------------------------------------------------------------------------

async def test_cached_tokens_flow_from_output_to_usage():
    """A fake engine's ``Output.cached_tokens`` becomes usage.prompt_tokens_details in the
    JSON answer and in the streamed usage chunk."""
    from server.api import protocol as p
    from server.api.media import MediaFetcher, MediaPolicy
    from server.api.metrics import Metrics
    from server.api.serving import ChatService, RequestStats
    from server.settings import Settings

    class FakeEngine:
        model_id = "fake"
        vocab_size = 100

    async def outputs():
        yield Output(0, "Hel", [1], prompt_tokens=20, completion_tokens=1, cached_tokens=16,
                     image_tokens=4)
        yield Output(0, "lo", [2], finish_reason="stop", prompt_tokens=20, completion_tokens=2,
                     cached_tokens=16, image_tokens=4)

    async with MediaFetcher(MediaPolicy()) as fetcher:
        svc = ChatService(FakeEngine(), Settings(), fetcher, Metrics(lambda: {}))
        body = dict(model=Settings().served_model_name, messages=[{"role": "user", "content": "hi"}])
        got = json.loads(await svc.collect(p.ChatCompletionRequest(**body), "x", outputs(),
                                           RequestStats()))
        sreq = p.ChatCompletionRequest(**body, stream=True, stream_options={"include_usage": True})
        lines = [x async for x in svc.stream(sreq, "x", outputs(), RequestStats())]
    assert got["usage"] == {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22,
                            "prompt_tokens_details": {"cached_tokens": 16, "image_tokens": 4,
                                                      "video_tokens": 0}}
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 16, "image_tokens": 4, "video_tokens": 0}


def test_engine_stats_metrics_only_when_reported():
    from server.api.metrics import Metrics
    stats = {"queue_depth": 0, "running_seqs": 0, "prefix_cache_query_tokens": 100,
             "prefix_cache_hit_tokens": 60, "image_cache_hits": 3, "image_cache_queries": 5,
             "encoder_cache_hits": 2, "kv_blocks_used": 7, "kv_blocks_free": 25,
             "decode_steps": 9, "decode_rows": 40}
    text = Metrics(lambda: stats).render().decode()
    for line in ("qwen_vl_prefix_cache_queries_tokens_total 100.0",
                 "qwen_vl_prefix_cache_hits_tokens_total 60.0",
                 "qwen_vl_image_cache_hits_total 3.0", "qwen_vl_image_cache_queries_total 5.0",
                 "qwen_vl_encoder_cache_hits_total 2.0", "qwen_vl_kv_blocks_used 7.0",
                 "qwen_vl_kv_blocks_free 25.0", "qwen_vl_decode_steps_total 9.0",
                 "qwen_vl_decode_rows_total 40.0"):
        assert line in text.splitlines(), line
    assert "# TYPE qwen_vl_kv_blocks_used gauge" in text
    assert "# TYPE qwen_vl_image_cache_hits_total counter" in text
    bare = Metrics(lambda: {"queue_depth": 0}).render().decode()
    assert "prefix_cache" not in bare and "kv_blocks" not in bare and "decode_" not in bare


def test_usage_details_and_cache_metrics_on_the_real_server(client, server):
    """Through the openai SDK: ``usage.prompt_tokens_details.cached_tokens`` is an int in
    plain and streamed answers; the same photo sent twice is one image-cache hit."""
    def hits():
        text = httpx.get(server.url + "/metrics").text
        values = {}
        for line in text.splitlines():
            for name in ("qwen_vl_image_cache_hits_total", "qwen_vl_image_cache_queries_total"):
                if line.startswith(name + " "):
                    values[name] = float(line.split()[1])
        return values

    photo = data_url(png_bytes(80, 64, (12, 200, 77)))
    kw = dict(model="qwen3-vl", max_tokens=3, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": "what?"}]}])
    before = hits()
    assert set(before) == {"qwen_vl_image_cache_hits_total", "qwen_vl_image_cache_queries_total"}
    r1 = client.chat.completions.create(**kw)
    r2 = client.chat.completions.create(**kw)
    details = r1.usage.prompt_tokens_details
    assert details is not None and isinstance(details.cached_tokens, int)
    assert details.cached_tokens >= 0 and r2.usage.prompt_tokens == r1.usage.prompt_tokens
    assert r2.choices[0].message.content == r1.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert isinstance(chunks[-1].usage.prompt_tokens_details.cached_tokens, int)
    # a long prompt resent: the second answer says part of it came from the prefix cache
    long = dict(model="qwen3-vl", max_tokens=2, temperature=0, messages=[
        {"role": "system", "content": f"Store {uuid.uuid4().hex} rules: be polite, answer "
                                      "briefly. " + "Returns within thirty days. " * 20},
        {"role": "user", "content": "Where is my order?"}])
    first = client.chat.completions.create(**long).usage
    second = list(client.chat.completions.create(**long, stream=True,
                                                 stream_options={"include_usage": True}))[-1].usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    after = hits()
    assert after["qwen_vl_image_cache_queries_total"] - before["qwen_vl_image_cache_queries_total"] == 3
    assert after["qwen_vl_image_cache_hits_total"] - before["qwen_vl_image_cache_hits_total"] == 2
