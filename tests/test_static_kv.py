"""The paged KV pool, the capturable decode step, the prefix cache and chunked prefill,
each against its slow twin (float32, greedy, tiny model): HF ``generate()``, the
uncached engine, the unchunked engine."""

from __future__ import annotations

import asyncio

import pytest

import torch
from PIL import Image

from server.engine.interface import EngineRequest, ImageInput, SamplingParams
from server.engine.kv_pool import StepInputs
from tests.test_batching import Paced, PeakRows, after_steps, mixed_requests
from tests.sync_counter import HostSyncs
from tests.test_hostpath import loaded, make_engine  # noqa: F401 (fixtures)


async def run(engine, req, delay=0.0, after_step=0):
    await asyncio.sleep(delay)
    await after_steps(engine, after_step)
    ids: dict[int, list[int]] = {}
    async for o in engine.generate(req, engine.reserve()):
        ids.setdefault(o.index, []).extend(o.token_ids)
    return ids


def photo(seed: int, w=96, h=64) -> ImageInput:
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return ImageInput(Image.fromarray(px.numpy()), 4096, 65536)


SYSTEM = "You are the support assistant of Example Shop. " + " ".join(
    f"Rule {i}: answer politely about orders, returns and parcels." for i in range(12))


def turn(i: int, image: ImageInput, *, follow_up: bool = False, max_tokens=12) -> EngineRequest:
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this my parcel?"}]}]
    if follow_up:
        msgs += [{"role": "assistant", "content": "It looks like a brown box."},
                 {"role": "user", "content": f"When does order {i} arrive?"}]
    return EngineRequest(f"t{i}{follow_up}", msgs, [image],
                         SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


# --- the static pool against HF generate --------------------------------------------------

async def test_batches_that_grow_and_shrink_match_hf_generate(make_engine):
    """Requests of different lengths arriving at staggered times (the batch grows and
    shrinks, rows join and leave without moving anyone's KV) reproduce ``generate()``."""
    engine, reference = make_engine(prefix_cache=False), make_engine(scheduler="sequential")
    reqs = mixed_requests(8)
    for i, r in enumerate(reqs):
        r.params.max_tokens = 8 + 5 * (i % 4)
    expected = [await run(reference, r) for r in reqs]
    # two arrivals per engine step (the batch grows while it decodes), all in before the
    # shortest (8 tokens) leaves; then rows leave at 8, 13, 18 and 23 tokens (it shrinks)
    base, rows = engine.scheduler.steps, PeakRows(engine)
    paced = Paced(engine, base, [i // 2 for i in range(len(reqs))])
    got = await asyncio.gather(*(run(engine, r, after_step=base + i // 2)
                                 for i, r in enumerate(reqs)))
    paced.close()
    rows.close()
    assert got == expected
    assert rows.peak == len(reqs), rows.peak
    for _ in range(200):  # the last rows leave at the engine's next step
        if engine.scheduler.batch is None:
            break
        await asyncio.sleep(0.01)
    assert engine.blocks.used == 0 and engine.blocks.promised == 0  # everything given back


async def test_capturable_step_no_sync_fixed_buffers(make_engine):
    """The decode step (what a CUDA graph captures) makes no host sync, and its input and
    output buffers keep their data pointers from step to step."""
    engine = make_engine()
    runner = engine.runner
    blocks = engine.blocks.allocate(4)
    try:
        ptrs, logits = set(), []
        mode = HostSyncs()
        with torch.inference_mode():
            for t in range(1, 6):
                with mode:
                    out = runner.decode(*runner.arrays([5, 7, 9], [t, t, t], [t + 1] * 3,
                                                       [blocks[:2], blocks[2:3], blocks[3:]]))
                step = runner.step_for(3, 2)
                ptrs.add((step.inp.data_ptr(), step.logits.data_ptr(), out.data_ptr()))
                logits.append(out.clone())
        assert mode.count == 0, mode.seen
        assert len(ptrs) == 1
        assert engine.decode_path == "eager"  # CPU: the same step, run eagerly
    finally:
        engine.blocks.release(blocks)


async def test_graph_fallback_is_logged(make_engine, caplog):
    with caplog.at_level("INFO", logger="qwen_vl.engine"):
        make_engine(enforce_eager=True)
    assert any("decode path: eager" in r.getMessage() for r in caplog.records)


# --- prefix cache --------------------------------------------------------------------------

async def test_cached_equals_uncached_on_mixed_set(make_engine):
    """Every request twice on a caching engine (the second time from the cache) gives
    what an engine without the cache gives: text, images, multi-image, multi-turn."""
    cached, plain = make_engine(), make_engine(prefix_cache=False)
    reqs = mixed_requests(8)
    expected = [await run(plain, r) for r in reqs]
    first = [await run(cached, r) for r in reqs]
    hits = cached.blocks.hit_tokens
    again = await asyncio.gather(*(run(cached, r) for r in reqs))
    assert first == expected and list(again) == expected
    assert cached.blocks.hit_tokens > hits  # the second round did come from the cache


async def test_follow_up_turn_reuses_system_prompt_and_photo(make_engine):
    engine, plain = make_engine(), make_engine(prefix_cache=False)
    pic = photo(1)
    first = await run(engine, turn(1, pic))
    q0, h0 = engine.blocks.query_tokens, engine.blocks.hit_tokens
    follow = await run(engine, turn(1, pic, follow_up=True))
    q, h = engine.blocks.query_tokens - q0, engine.blocks.hit_tokens - h0
    assert h >= 0.5 * q, (h, q)  # system prompt and photo came from the cache
    assert first == await run(plain, turn(1, pic))
    assert follow == await run(plain, turn(1, pic, follow_up=True))


async def test_different_images_same_grid_never_share(make_engine):
    """Two photos of the same size (identical token ids) share only the text before them."""
    engine, plain = make_engine(), make_engine(prefix_cache=False)
    a, b = photo(1), photo(2)
    await run(engine, turn(1, a))
    h0 = engine.blocks.hit_tokens
    got = await run(engine, turn(2, b))
    hit = engine.blocks.hit_tokens - h0
    ids = engine.builder.build(turn(2, b)).input_ids[0]
    first_image = int((ids == engine.model.config.image_token_id).nonzero()[0])
    assert 0 < hit <= first_image  # the system prompt, never the image's blocks
    assert got == await run(plain, turn(2, b))


async def test_eviction_under_a_tiny_budget(make_engine):
    """A pool that holds only a few prompts: cached blocks are evicted LRU, the idle cache
    never exceeds its share, and answers stay those of the uncached engine."""
    engine = make_engine(kv_cache_tokens=1024, prefix_cache_share=0.25, kv_block_size=16)
    plain = make_engine(prefix_cache=False)
    reqs = [turn(i, photo(i)) for i in range(6)]
    for r in reqs + reqs[:2]:
        assert await run(engine, r) == await run(plain, r)
        assert len(engine.blocks.idle) <= engine.blocks.cache_blocks
    assert engine.blocks.cache_blocks == 16


async def test_cache_entry_in_use_survives_pressure(make_engine):
    """A long request holding cached prefix blocks keeps them while other requests fill
    the pool and evict everything evictable; its answer is unchanged."""
    engine = make_engine(kv_cache_tokens=800, prefix_cache_share=1.0, kv_block_size=16)
    plain = make_engine(prefix_cache=False)
    pic = photo(3)
    long = turn(3, pic, max_tokens=300)
    long.request_id = "long"
    await run(engine, turn(3, pic))  # its prefix is now cached
    task = asyncio.create_task(run(engine, long))

    def long_row():
        rows = engine.scheduler.batch.rows if engine.scheduler.batch else []
        return next((r for r in rows if r.request_id == "long"), None)
    while long_row() is None:
        await asyncio.sleep(0.005)
    held = list(long_row().blocks)
    others = await asyncio.gather(*(run(engine, EngineRequest(
        f"o{i}", [{"role": "user", "content": f"other customer {i} asks " * 12}], [],
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))) for i in range(10)))
    assert all(len(o[0]) == 12 for o in others)
    assert not task.done()  # still decoding: its blocks (cached prefix included) held
    assert all(engine.blocks.ref[b] > 0 for b in held)
    assert engine.blocks.evicted > 0  # there was pressure: cached blocks were reused
    assert await task == await run(plain, long)


# --- chunked prefill -----------------------------------------------------------------------

async def test_chunked_equals_unchunked(make_engine):
    """Prompts prefilled 16 tokens at a time (images cut across chunks, several prompts
    per chunk step, decode steps in between) give the unchunked answers."""
    chunked = make_engine(max_prefill_chunk=16, prefix_cache=False)
    whole = make_engine(max_prefill_chunk=8192, prefix_cache=False)
    reqs = mixed_requests(8) + [turn(5, photo(5), follow_up=True)]
    expected = [await run(whole, r) for r in reqs]
    got = await asyncio.gather(*(run(chunked, r, delay=0.01 * i) for i, r in enumerate(reqs)))
    assert list(got) == expected


async def test_long_prompt_does_not_stall_running_streams(make_engine):
    """While a long prompt is prefilled in chunks, a running stream keeps getting tokens:
    the engine interleaves one chunk and one decode step."""
    engine = make_engine(max_prefill_chunk=32, prefix_cache=False)
    stream = EngineRequest("s", [{"role": "user", "content": "count"}], [],
                           SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    long = EngineRequest("l", [{"role": "user", "content": "word " * 600}], [],
                         SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    seen, during = [], []

    async def watch():
        async for o in engine.generate(stream, engine.reserve()):
            seen.append(len(o.token_ids))
            if engine.scheduler.prefilling:
                during.append(len(o.token_ids))
    t = asyncio.create_task(watch())
    while not seen:
        await asyncio.sleep(0.002)
    await run(engine, long)
    await t
    assert len(during) >= 5  # tokens kept flowing while the long prompt was prefilled


async def test_cached_tokens_reported_exactly(make_engine):
    """``cached_tokens``: 0 the first time; for the same prompt again, every full block
    but the one holding the last prompt token (which is always computed)."""
    engine = make_engine(kv_block_size=16)
    req = turn(7, photo(7))
    n = engine.builder.build(req).num_tokens

    async def cached():
        outs = [o async for o in engine.generate(req, engine.reserve())]
        assert len({o.cached_tokens for o in outs}) == 1
        return outs[-1].cached_tokens
    assert await cached() == 0
    assert await cached() == (n - 1) // 16 * 16


async def test_failed_graph_capture_falls_back_to_eager(make_engine, caplog):
    """A capture that fails (here: no CUDA at all) leaves that bucket eager with a warning;
    after three failures the whole decode path is eager; answers are unchanged."""
    engine, plain = make_engine(prefix_cache=False), make_engine(prefix_cache=False)
    reqs = mixed_requests(4)
    expected = [await run(plain, r) for r in reqs]
    runner = engine.runner
    runner.decode_path, runner.steps = "cuda-graphs", {}  # as on a GPU
    with caplog.at_level("WARNING", logger="qwen_vl.engine"):
        got = await asyncio.gather(*(run(engine, r, delay=0.02 * i) for i, r in enumerate(reqs)))
    assert list(got) == expected
    failed = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert failed and all(s.graph is None for s in runner.steps.values())
    # fewer than three failures leave the other buckets to graphs; the third makes the
    # whole path eager (more buckets are asked for here until it does)
    assert runner.decode_path == ("eager" if len(failed) >= 3 else "cuda-graphs"), len(failed)
    with caplog.at_level("WARNING", logger="qwen_vl.engine"):
        for batch in (1, 2, 4, 8, 16, 32):
            if runner.decode_path == "eager":
                break
            runner.step_for(batch, 1)
    failed = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(failed) == 3 and runner.decode_path == "eager", (len(failed), runner.decode_path)
    assert "three failures: decode runs eagerly from now on" in failed[-1].getMessage()


async def test_failed_join_gives_back_every_block_once(make_engine, monkeypatch):
    """A failure while n > 1 choices join (after the prompt's blocks were handed to them)
    fails the request and returns each block and promise exactly once."""
    engine = make_engine(prefix_cache=False)
    sched = engine.scheduler
    real = sched._sample_into
    calls = {"n": 0}

    def failing(batch, logits):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected sampling failure at join")
        return real(batch, logits)
    monkeypatch.setattr(sched, "_sample_into", failing)
    req = EngineRequest("n2", [{"role": "user", "content": "two answers " * 7}], [],
                        SamplingParams(max_tokens=5, temperature=1.0, n=2, seed=1, ignore_eos=True))
    from server.errors import APIError
    with pytest.raises(APIError):
        await run(engine, req)
    bm = engine.blocks
    for _ in range(200):  # the error reaches the client before the engine thread cleans up
        if not sched.prefilling and sched.batch is None and bm.used == 0:
            break
        await asyncio.sleep(0.01)
    assert bm.promised == 0 and bm.used == 0 and min(bm.ref) == 0
    assert len(set(bm.free)) == len(bm.free)  # no block twice on the free list
    ok = await run(engine, req)
    assert sorted(ok) == [0, 1] and all(len(v) == 5 for v in ok.values())


async def test_n_above_max_num_seqs_is_a_400(make_engine):
    from server.errors import APIError
    engine = make_engine(max_num_seqs=2)
    req = EngineRequest("n4", [{"role": "user", "content": "four"}], [],
                        SamplingParams(max_tokens=3, temperature=1.0, n=4))
    with pytest.raises(APIError) as err:
        await run(engine, req)
    assert err.value.status == 400 and err.value.param == "n"
    assert engine.healthy


async def test_wide_row_splits_the_decode_step(make_engine, monkeypatch):
    """One long conversation beside short ones: the decode step runs as two passes (so the
    short rows do not gather the long row's width), and every row's tokens are unchanged."""
    import server.engine.runner as runner_mod
    reqs = [EngineRequest("long", [{"role": "user", "content": "word " * 400}], [],
                          SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))]
    reqs += mixed_requests(4)
    engine = make_engine(prefix_cache=False)
    expected = [await run(engine, r) for r in reqs]  # alone: no split possible
    monkeypatch.setattr(runner_mod, "SPLIT_MIN_TOKENS", 64)
    splits = {"n": 0}
    real = engine.runner._split

    def counted(tables):
        out = real(tables)
        splits["n"] += out is not None
        return out
    monkeypatch.setattr(engine.runner, "_split", counted)
    got = await asyncio.gather(*(run(engine, r, delay=0.01 * i) for i, r in enumerate(reqs)))
    assert list(got) == expected
    assert splits["n"] > 0


async def test_decode_layout_and_rotary_table_equal_the_general_path(make_engine):
    """The decode step's shortcuts compute what the general code computes: the
    one-query layout gives the general layout's slots and mask (contexts ending anywhere
    in a block, padding rows of one scratch token), and the rotary table's rows are the
    rotary module's output for the same positions, so the decode step's logits are
    bitwise those of a runner without the table (float32)."""
    engine = make_engine()
    runner, pool = engine.runner, engine.runner.pool
    bs = pool.block_size
    g = torch.Generator().manual_seed(3)
    for b, nb in ((1, 1), (5, 3), (16, 4)):
        tables = torch.randint(1, pool.num_blocks + 1, (b, nb), generator=g)
        kv_len = torch.randint(1, nb * bs + 1, (b,), generator=g)
        kv_len[-1] = 1  # a padding row: the scratch block, one token
        tables[-1] = 0
        inp = StepInputs(tables, kv_len - 1, kv_len)
        slots, mask = pool._layout_one(inp)
        want_slots, want_mask = pool._layout_any(inp, 1)
        assert torch.equal(slots, want_slots) and torch.equal(mask, want_mask)
    assert runner.rope is not None
    n = runner.rope[0].shape[0]
    assert n >= engine.max_model_len
    pos = torch.tensor([0, 1, 17, n // 2, n - 1], device=runner.device)
    h = torch.zeros(1, dtype=runner.embed.weight.dtype, device=runner.device)
    cos, sin = runner.lm.rotary_emb(h, pos.view(1, -1, 1).expand(3, -1, 1))
    assert torch.equal(runner.rope[0][pos], cos[:, 0])
    assert torch.equal(runner.rope[1][pos], sin[:, 0])
    blocks = engine.blocks.allocate(8)
    try:
        step = runner.arrays([5, 9, 2, 7], [3, 30, 8, 0], [4, 31, 9, 1],
                             [blocks[:1], blocks[1:3], blocks[3:4], blocks[4:5]])
        runner.fused = None  # transformers' layers in both (tests/test_fused.py: the fused step)
        with torch.inference_mode():
            runner.decode(*step)  # writes the rows' keys and values
            table = runner.decode(*step).clone()
            saved, runner.rope = runner.rope, None
            try:
                module = runner.decode(*step).clone()
            finally:
                runner.rope = saved
        assert torch.equal(table, module)
    finally:
        engine.blocks.release(blocks)


def test_cpu_block_gather_reuses_its_buffers_and_equals_index_select(monkeypatch):
    """On the CPU a step's block gathers write into two buffers reused by every layer and
    step (keys, values), grown when a gather needs more, but not past ``_KEEP_BYTES``;
    outside inference mode the gather is a plain ``index_select``."""
    from server.engine import kv_pool
    from server.engine.kv_pool import _gather
    pool = torch.randn(9, 4, 2, 8)
    with torch.inference_mode():
        a = _gather(pool, torch.tensor([3, 1, 4]), 0)
        assert torch.equal(a, pool.index_select(0, torch.tensor([3, 1, 4])))
        ptr = a.data_ptr()
        b = _gather(pool, torch.tensor([8, 2]), 0)
        assert b.data_ptr() == ptr and torch.equal(b, pool[[8, 2]])
        v = _gather(pool, torch.tensor([5]), 1)
        assert v.data_ptr() != ptr and torch.equal(v, pool[[5]])
        assert torch.equal(b, pool[[8, 2]])  # the values' buffer is another one
        big = _gather(pool, torch.arange(9), 0)
        assert torch.equal(big, pool)
        kept = _gather(pool, torch.tensor([1]), 0).data_ptr()
        monkeypatch.setattr(kv_pool, "_KEEP_BYTES", 1024)  # 1 block: 256 bytes, 9: 2,304
        fresh = _gather(pool, torch.arange(9), 0)
        assert torch.equal(fresh, pool) and fresh.data_ptr() != kept
        assert _gather(pool, torch.tensor([1]), 0).data_ptr() == kept
    plain = _gather(pool, torch.tensor([3, 1, 4]), 0)
    assert not plain.is_inference() and torch.equal(plain, pool[[3, 1, 4]])


def test_fused_rms_norm_matches_transformers_forward():
    """The runner's RMSNorm swap (torch's fused rms_norm) computes what transformers'
    Qwen3VLTextRMSNorm computes: exactly in float32, within one bf16 ulp in bfloat16."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    from server.engine.runner import fuse_rms_norms
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 2 ** -7)):
        ref = Qwen3VLTextRMSNorm(96, eps=1e-6)
        ref.weight.data.normal_()
        ref = ref.to(dtype)
        fused = Qwen3VLTextRMSNorm(96, eps=1e-6).to(dtype)
        fused.load_state_dict(ref.state_dict())
        wrapper = torch.nn.Sequential(fused)
        assert fuse_rms_norms(wrapper) == 1
        x = (torch.randn(3, 5, 96) * 4).to(dtype)
        a, b = ref(x).float(), fused(x).float()
        assert b.dtype == a.dtype and b.shape == a.shape
        assert ((a - b).abs() <= tol * a.abs().clamp(min=1)).all(), (dtype, (a - b).abs().max())
    # only norms are touched
    assert fuse_rms_norms(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))) == 0


async def test_compiled_decode_step_matches_eager(make_engine):
    """``--compile``: the decode step through ``torch.compile`` (checked at startup against
    the eager step) gives the eager engine's tokens on the mixed set, and is what the
    decode steps run; a compiled step that fails at run time leaves the engine eager with
    the same answers."""
    from torch._dynamo.utils import counters
    eager = make_engine(prefix_cache=False)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = make_engine(prefix_cache=False, compile=True)
    assert eager.runner.compiled is None
    inner = compiled.runner.compiled
    assert inner is not None, "the compiled step did not pass its startup check"
    calls = []
    compiled.runner.compiled = lambda *a: calls.append(1) or inner(*a)
    reqs = mixed_requests(8)
    expected = await asyncio.gather(*(run(eager, r) for r in reqs))
    got = await asyncio.gather(*(run(compiled, r) for r in reqs))
    assert got == expected
    assert len(calls) >= 19  # every decode step of the longest request went through it
    # batch and width are dynamic: batch 2 and batch 1 were all it compiled
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2

    # the pool's write and gather are the opaque op in the generated code, once per layer
    # (traced, the in-place write would be functionalised into a copy of the whole pool)
    from torch._inductor.utils import run_and_get_code
    st = compiled.runner.step_for(2, compiled.runner.width_buckets[0])
    st.kv_len.fill_(1)
    with torch.inference_mode():
        torch._dynamo.reset()  # compile again so that the code is generated here
        _, codes = run_and_get_code(torch.compile(compiled.runner.decode_hidden),
                                    st.ids, st.pos, st.kv_len, st.tables)
    layers = compiled.model.config.get_text_config().num_hidden_layers
    # (the fused step's op, paged_decode; transformers' layers go through paged_attention)
    assert sum(c.count("torch.ops.qwen_vl.paged_decode") for c in codes) >= layers
    assert not any("index_copy" in c for c in codes)

    # an error the eager step would raise too is not the compiler's: it propagates, and
    # the compiled step stays on
    def oom(*args):
        raise torch.OutOfMemoryError("injected")
    compiled.runner.compiled = oom
    step = compiled.runner.step_for(2, compiled.runner.width_buckets[0])
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        step.forward()
    assert compiled.runner.compiled is oom

    # a compiler failure (a recompilation for a new bucket): eager from then on, same answers
    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("injected: a recompilation failed")
    compiled.runner.compiled = broken
    got = await asyncio.gather(*(run(compiled, r) for r in reqs))
    assert got == expected and compiled.runner.compiled is None


def test_paged_attention_custom_op_passes_opcheck():
    """The op torch.compile sees (``qwen_vl::paged_attention``): schema (it mutates the
    pool), fake implementation and eager results agree (``torch.library.opcheck``)."""
    from server.engine.kv_pool import _paged_op
    torch.manual_seed(0)
    b, heads, kv, d, bs, blocks = 2, 4, 2, 8, 4, 5
    kp, vp = torch.zeros(blocks + 1, bs, kv, d), torch.zeros(blocks + 1, bs, kv, d)
    tables = torch.tensor([[1, 2], [3, 0]])
    kv_len = torch.tensor([6, 3])
    slots = torch.tensor([1 * bs + 1, 3 * bs + 2])  # position kv_len - 1 of each row
    mask = (torch.arange(2 * bs).view(1, 1, 1, -1) < kv_len.view(-1, 1, 1, 1))
    args = (torch.randn(b, heads, 1, d), torch.randn(b, kv, 1, d), torch.randn(b, kv, 1, d),
            kp, vp, slots, tables, mask, d ** -0.5, False, kv_len - 1, kv_len)
    torch.library.opcheck(_paged_op, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


async def test_compile_that_fails_at_startup_stays_eager(make_engine, monkeypatch, caplog):
    def no_compile(*args, **kwargs):
        raise RuntimeError("injected: no compiler")
    monkeypatch.setattr(torch, "compile", no_compile)
    with caplog.at_level("WARNING", logger="qwen_vl.engine"):
        engine = make_engine(prefix_cache=False, compile=True)
    assert engine.runner.compiled is None
    assert any("stays eager" in r.getMessage() for r in caplog.records)
    assert (await run(engine, mixed_requests(1)[0]))[0]


async def test_stale_non_finite_kv_in_reused_blocks_cannot_poison_a_row(make_engine):
    """A block comes to a new owner zeroed: NaN / inf that an earlier request left in the
    pool (an fp16 overflow) must not reach a later row through its masked columns (a
    masked column's value is still multiplied by 0, and 0 x inf is NaN)."""
    reqs = mixed_requests(4)
    reference = make_engine(prefix_cache=False, kv_cache_tokens=2048)
    expected = [await run(reference, r) for r in reqs]
    engine = make_engine(prefix_cache=False, kv_cache_tokens=2048)
    pool = engine.runner.pool
    pool.k[:, 1:] = float("nan")  # every block but the scratch one
    pool.v[:, 1:] = float("inf")
    got = await asyncio.gather(*(run(engine, r, delay=0.01 * i) for i, r in enumerate(reqs)))
    assert got == expected
