"""Issue 29, photo bursts: the encoder takes many images in one call with no host sync
inside it (server/engine/vision.py), checked against its slow twin, the model's own
vision forward run one image at a time (float32), and counted with the shared counter of
CUDA-syncing ops; a step's token budget (--max-num-batched-tokens) prefills a burst of
photos in a few steps, several images per encoder call."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from PIL import Image

from server.engine import vision
from server.engine.core import AsyncEngine
from server.engine.interface import EngineRequest, ImageInput, SamplingParams
from models.loader import load_model
from server.settings import Settings
from tests.sync_counter import HostSyncs, Ops

# (t, h, w) in patches: equal sizes (one view, no padding) and a mix (padded layout)
EQUAL = [(1, 8, 8)] * 3
MIXED = [(1, 8, 8), (1, 4, 12), (1, 16, 8), (1, 4, 4)]
VIDEO = [(3, 8, 8), (1, 4, 4)]  # a 3-frame grid: each frame its own attention segment


@pytest.fixture(scope="module")
def loaded(toy_model):
    return load_model(Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536))


@pytest.fixture(scope="module")
def visual(loaded):
    return loaded.model.model.visual


def pixels(visual, grids, seed=0):
    cfg = visual.config
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def own_forward_one_at_a_time(visual, pix, grids):
    merged, deep, start = [], [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        res = visual(pix[start:start + n], grid_thw=torch.tensor([g]), return_dict=True)
        merged.append(res.pooler_output)
        deep.append(res.deepstack_features)
        start += n
    return torch.cat(merged), [torch.cat(d) for d in zip(*deep)]


@pytest.mark.parametrize("grids", [EQUAL, MIXED, VIDEO], ids=["equal", "mixed", "video"])
def test_batched_encoder_equals_the_models_own_forward_one_image_at_a_time(visual, grids):
    assert visual.dtype == torch.float32 and len(visual.deepstack_visual_indexes) > 0
    pix = pixels(visual, grids)
    p = vision.plan(grids, visual, "cpu")
    assert (p.gather is None) == (grids is EQUAL)  # both layouts are exercised
    assert len(p.lengths) == sum(t for t, _, _ in grids)
    with torch.inference_mode():
        merged, deep = vision.encode(visual, pix, p)
        ref_merged, ref_deep = own_forward_one_at_a_time(visual, pix, grids)
    assert merged.shape == ref_merged.shape and len(deep) == len(ref_deep)
    for ours, ref in zip([merged, *deep], [ref_merged, *ref_deep]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_patch_embed_is_the_models_convolution_as_one_matmul(visual):
    """The patch embed as a matmul equals the model's Conv3d (float32), in one op; a
    convolution whose kernel is not its stride is left to the module."""
    pix = pixels(visual, MIXED)
    with torch.inference_mode():
        with Ops() as ops:
            ours = vision.patch_embed(visual.patch_embed, pix)
        ref = visual.patch_embed(pix)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ops.seen["aten::linear"] == 1 and not any("conv" in n for n in ops.seen), ops.seen

    class Overlapping(torch.nn.Module):  # kernel 2, stride 1: not a per-patch map
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv3d(1, 2, kernel_size=2, stride=1)

        def forward(self, x):
            return ("the module", x)
    assert vision.patch_embed(Overlapping(), pix)[0] == "the module"


@pytest.mark.parametrize("grids", [EQUAL, MIXED], ids=["equal", "mixed"])
def test_encoder_call_makes_no_host_sync(visual, grids):
    """The device side of one call (everything after the host-side plan) reads nothing
    back; the model's own forward syncs in every block (the baseline it replaces)."""
    pix = pixels(visual, grids)
    p = vision.plan(grids, visual, "cpu")
    with torch.inference_mode():
        with HostSyncs() as ours:
            vision.encode(visual, pix, p)
        with HostSyncs() as own:
            visual(pix, grid_thw=torch.tensor(grids), return_dict=True)
    assert ours.count == 0, ours.seen
    assert own.count >= len(visual.blocks), own.seen
    print(f"host syncs per encoder call over {len(grids)} images, {len(visual.blocks)} "
          f"blocks: batched {ours.count}, the model's own {own.count} ({dict(own.seen)})")


@pytest.fixture(scope="module")
def engine(toy_model, loaded):
    s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536)
    e = AsyncEngine(loaded, s)
    yield e
    e.close()


def test_runner_encode_reads_the_host_grids_once(engine, visual):
    """A whole ``ModelRunner.encode`` of a burst (the grid tables of its sizes already
    known, as in any burst after the first photo of a size): at most one read, of the
    grids' host tensor, which on a GPU is no sync at all."""
    runner = engine.runner
    assert runner.encoder_path == "batched"
    grids = MIXED * 4  # 16 images
    pix = pixels(visual, grids)
    keys = [None] * len(grids)  # uncached: all encoded in this one call
    with torch.inference_mode():
        runner.encode(pix, torch.tensor(grids), keys)  # first sight of these sizes
        with HostSyncs() as syncs:
            out = runner.encode(pixels(visual, grids, seed=1), torch.tensor(grids), keys)
    assert syncs.count <= 1, syncs.seen
    assert [o[0].shape[0] for o in out] == [t * h * w // 4 for t, h, w in grids]


def test_startup_check_falls_back_to_the_models_forward(engine, monkeypatch, caplog):
    """A batched encoder that disagrees with the model's own forward (here: one block's
    attention output scaled) is not used; the log says which path runs."""
    runner = engine.runner
    real = vision._attention
    monkeypatch.setattr(vision, "_attention", lambda *a: real(*a) * 1.01)
    with caplog.at_level(logging.INFO, logger="qwen_vl.engine"):
        assert runner.check_encoder() == "model"
    assert "vision encoder: the model's own forward" in caplog.text
    monkeypatch.setattr(vision, "_attention", real)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen_vl.engine"):
        assert runner.check_encoder() == "batched"
    assert "vision encoder: batched" in caplog.text


# --------------------------------------------------------------- many images per step

def photo(seed: int) -> ImageInput:
    """A 1024x1024 photo at a 1,024-token budget: 1,024 image tokens."""
    im = Image.effect_noise((1024, 1024), 40 + seed).convert("RGB")
    return ImageInput(im, 1024 * 32 * 32, 1024 * 32 * 32)


def burst(n: int) -> list[EngineRequest]:
    return [EngineRequest(f"p{i}", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"Is parcel {i} damaged?"}]}],
        [photo(i)], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        for i in range(n)]


@pytest.mark.parametrize("budget,most_steps", [(8192, 3), (1024, None)])
async def test_burst_of_16_photos_prefilled_in_few_steps(toy_model, loaded, budget, most_steps):
    """16 requests of one 1,024-token photo each, all waiting when the engine starts:
    with an 8,192-token step budget they are prefilled in at most 3 steps, several photos
    per encoder call (at 1,024 tokens, as before: one photo per step, 16 or more)."""
    engine = AsyncEngine(loaded, Settings(model_path=toy_model, max_num_batched_tokens=budget,
                                          max_num_seqs=16))
    sched, runner = engine.scheduler, engine.runner
    prefills, encoded = [], []
    real_prefill, real_encode, real_step = runner.prefill, runner.encode, sched.step
    gate = threading.Event()
    runner.prefill = lambda chunks: (prefills.append(sum(c.ids.numel() for c in chunks)),
                                     real_prefill(chunks))[1]
    runner.encode = lambda pix, grids, keys: (encoded.append(len(keys)),
                                              real_encode(pix, grids, keys))[1]

    def gated_step():  # the first step waits until all 16 are in, then takes them all
        if not gate.is_set():
            gate.wait(120)
            while not engine._inbox.empty():
                engine._take(engine._inbox.get_nowait())
        real_step()
    sched.step = gated_step
    try:
        async def one(r):
            return [o async for o in engine.generate(r, engine.reserve())]
        tasks = [asyncio.create_task(one(r)) for r in burst(16)]
        deadline = time.monotonic() + 120
        # an event: all 16 prepared and handed to the engine (taken, or in its inbox)
        while len(sched.waiting) + engine._inbox.qsize() < 16:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
    finally:
        gate.set()
        engine.close()
    print(f"budget {budget}: prefill steps {len(prefills)} (tokens {prefills}), "
          f"images per encoder call {encoded}")
    assert sum(encoded) == 16 and sum(prefills) >= 16 * 1024
    assert max(prefills) <= budget
    if most_steps is not None:
        assert len(prefills) <= most_steps and max(encoded) > 1
    else:
        assert len(prefills) >= 16 and max(encoded) == 1


# ------------------------------------------------------------------ admission

LAYOUTS = {  # (text tokens before, [(grid, text tokens after)]) per prompt
    "text-only": (12, []),
    "one-image": (5, [((1, 8, 8), 3)]),
    "image-first": (0, [((1, 4, 12), 7)]),
    "two-images": (4, [((1, 8, 8), 2), ((1, 16, 4), 6)]),
    "image-last": (3, [((1, 6, 10), 0)]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_mrope_positions_equal_the_models_get_rope_index(loaded, name):
    from server.engine.core import image_spans, mrope_positions
    before, images = LAYOUTS[name]
    types, grids = [0] * before, []
    for grid, after in images:
        types += [1] * (grid[0] * grid[1] * grid[2] // 4) + [0] * after
        grids.append(grid)
    tt = torch.tensor([types])
    ref_pos, ref_delta = loaded.model.model.get_rope_index(
        tt, mm_token_type_ids=tt, image_grid_thw=torch.tensor(grids) if grids else None,
        attention_mask=torch.ones_like(tt))
    spans = image_spans(tt[0] == 1, [g[0] * g[1] * g[2] // 4 for g in grids])
    pos, delta = mrope_positions(len(types), spans, grids, 2)
    assert torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta.view(-1)[0])


def python_calls(fn, *args):
    """Python and C function calls made by ``fn(*args)`` (sys.setprofile)."""
    import sys
    calls = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    sys.setprofile(prof)
    try:
        return fn(*args), calls[0]
    finally:
        sys.setprofile(None)


async def test_admission_does_no_python_per_image_token(toy_model, loaded):
    """Admitting a 1,024-token photo's prompt costs the same Python calls as a 64-token
    one (positions, prefix keys and block clears work per image and per block, not per
    image token); its ~66 blocks are cleared with a couple of ops, not two per block."""
    engine = AsyncEngine(loaded, Settings(model_path=toy_model))
    sched = engine.scheduler
    counted, real = [], sched._reserve
    sched._reserve = lambda e: (lambda r: (counted.append(r[1]), r[0])[1])(
        python_calls(real, e))
    try:
        for side in (256, 1024):
            r = EngineRequest(f"s{side}", [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "Damaged?"}]}],
                [ImageInput(Image.effect_noise((side, side), 50).convert("RGB"),
                            side * side, side * side)],
                SamplingParams(max_tokens=1, temperature=0))
            [o async for o in engine.generate(r, engine.reserve())]
        blocks = list(range(1, 67))
        with Ops() as ops:
            engine.runner.pool.clear(blocks)
    finally:
        engine.close()
    small, big = counted
    print(f"Python calls admitting a 64-token photo {small}, a 1,024-token one {big}; "
          f"clearing 66 blocks: {dict(ops.seen)}")
    # 60 more blocks (960 more tokens): a few calls per block for the prefix keys; the
    # old per-token walk (positions, keys) made 2,400 more
    assert big - small <= 8 * 60, (small, big)
    assert ops.count <= 4, ops.seen


async def test_image_prefill_reads_nothing_back(toy_model, loaded):
    """Every prefill step of a prompt whose two images are cut across 16-token chunks
    (image features placed and deepstack features added by index, inputs copied up
    without a stall; chunks padded to 64 tokens, as on a GPU) makes no host sync, and
    the answer equals the unchunked, unpadded one."""
    images = [Image.effect_noise(size, 40).convert("RGB") for size in ((256, 192), (128, 320))]

    def req():  # (effect_noise draws new noise each call: the same images for both runs)
        return EngineRequest("two", [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same parcel?"}]}],
            [ImageInput(im, 4096, 65536) for im in images],
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    answers, counts = [], []
    for budget in (16, 4096):
        engine = AsyncEngine(loaded, Settings(model_path=toy_model, max_num_batched_tokens=budget,
                                              prefix_cache=False))
        runner, real = engine.runner, engine.runner.prefill
        runner.bucket_prefill = budget == 16  # padded chunks (the GPU's) against exact ones

        def counted(chunks, real=real):
            with HostSyncs() as syncs:
                out = real(chunks)
            counts.append(syncs.count)
            return out
        runner.prefill = counted
        try:
            answers.append([t async for o in engine.generate(req(), engine.reserve())
                            for t in o.token_ids])
        finally:
            engine.close()
    assert len(counts) > 5 and counts == [0] * len(counts), counts  # many chunks, no sync
    assert answers[0] == answers[1] and len(answers[0]) == 6


async def test_prefill_shapes_repeat(toy_model, loaded):
    """Twelve prompts of twelve different lengths, one at a time: their prefills run in
    three padded shapes (lengths to multiples of 64, block tables to the decode
    widths), not twelve, so attention plans and kernels are reused."""
    from server.engine.runner import prefill_bucket
    assert [prefill_bucket(n) for n in (1, 64, 65, 1024, 1025, 8000)] == \
        [64, 64, 128, 1024, 1280, 8192]
    engine = AsyncEngine(loaded, Settings(model_path=toy_model, prefix_cache=False))
    runner = engine.runner
    assert not runner.bucket_prefill  # on the CPU it only costs; here as on a GPU
    runner.bucket_prefill = True
    runner.prefill_shapes.clear()
    lengths = set()
    try:
        for i in range(12):
            r = EngineRequest(f"t{i}", [{"role": "user", "content": "parcel " * (3 + 2 * i)}],
                              [], SamplingParams(max_tokens=1, temperature=0))
            [o async for o in engine.generate(r, engine.reserve())]
            lengths.add(engine.builder.build(r).input_ids.shape[1])
    finally:
        engine.close()
    shapes = runner.prefill_shapes
    assert len(lengths) == 12 and len(shapes) <= 3, (lengths, shapes)
    assert all(q % 64 == 0 and w in runner.width_buckets for _, q, w in shapes), shapes


async def test_images_are_encoded_as_the_chunks_reach_them(toy_model, loaded):
    """A prompt of three photos prefilled in 64-token chunks: each encoder call takes the
    images its chunk touches, not every image of the prompt at its first chunk (the
    encoder's memory then follows the step budget, not the prompt)."""
    engine = AsyncEngine(loaded, Settings(model_path=toy_model, max_num_batched_tokens=64,
                                          prefix_cache=False, encoder_cache_mb=0))
    runner, calls = engine.runner, []
    real = runner.encode
    runner.encode = lambda pix, grids, keys: (calls.append(len(keys)), real(pix, grids, keys))[1]
    images = [Image.effect_noise((256, 256), 20 + 10 * i).convert("RGB") for i in range(3)]
    r = EngineRequest("three", [{"role": "user", "content": [{"type": "image"}] * 3 + [
        {"type": "text", "text": "Which is damaged?"}]}],
        [ImageInput(im, 4096, 65536) for im in images],  # 64 tokens each
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    try:
        out = [t async for o in engine.generate(r, engine.reserve()) for t in o.token_ids]
    finally:
        engine.close()
    assert len(out) == 2 and sum(calls) == 3 and max(calls) <= 2, calls
