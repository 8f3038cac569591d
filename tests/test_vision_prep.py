"""The torch image pipeline (models/vision_prep.py) against its slow twin, the HF PIL
processor (``Qwen2VLImageProcessorPil``), and through the real engine.

Stated tolerance: grids identical; pixel values within two 8-bit levels
(``2 * rescale_factor / std`` = 0.0157 for Qwen's std 0.5; measured: one level on photos,
two on noise and on 20000-pixel sides) and equal up to float32 rounding (1e-6) at all but
a small fraction of values (bound 2%, measured under 1%; bound 5% for sides of 10000
pixels or more, measured 3%, where float32 resampling positions lose precision).  Both resize kernels are checked on the CPU: the
uint8 one (what the CPU runs) and the float one (what a GPU runs).
"""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from bench.images import SERVER_BUDGET, synthetic_photo
from models.tiny import build_image_processor
from models.vision_prep import TorchImageProcessor, as_uint8_hwc
from server.engine.interface import EngineRequest, ImageInput, SamplingParams
from server.api.media import MediaPolicy, decode_image_bytes

LEVEL = 2 / 255  # one 8-bit level after rescale (1/255) and normalisation (std 0.5)
KERNELS = ("uint8", "float")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def exif_rotated_photo(width: int, height: int, orientation: int) -> Image.Image:
    """A photo saved as JPEG with an EXIF orientation, decoded as the server decodes it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    synthetic_photo(width, height, seed=orientation).save(buf, "JPEG", exif=exif.tobytes(),
                                                          quality=90)
    return decode_image_bytes(buf.getvalue(), MediaPolicy(), param="image",
                              max_pixels=SERVER_BUDGET[1])


CASES = {  # name: (image factory, expected (width, height) after decoding)
    "1x1": (lambda: synthetic_photo(1, 1), (1, 1)),
    "3x2": (lambda: noise(3, 2), (3, 2)),
    "10x10 noise upscaled": (lambda: noise(10, 10), (10, 10)),
    "37x53 odd noise": (lambda: noise(37, 53, 1), (37, 53)),
    "640x480": (lambda: synthetic_photo(640, 480), (640, 480)),
    "1024x1024 unresized": (lambda: synthetic_photo(1024, 1024), (1024, 1024)),
    "3840x2160 4k": (lambda: synthetic_photo(3840, 2160), (3840, 2160)),
    "4032x3024 phone": (lambda: synthetic_photo(4032, 3024), (4032, 3024)),
    "20000x100 wide": (lambda: noise(20000, 100, 2), (20000, 100)),
    "100x20000 tall": (lambda: synthetic_photo(100, 20000), (100, 20000)),
    "33x2000 narrow": (lambda: synthetic_photo(33, 2000), (33, 2000)),
    "EXIF 6 phone": (lambda: exif_rotated_photo(4032, 3024, 6), (1512, 2016)),
    "EXIF 8": (lambda: exif_rotated_photo(1200, 500, 8), (500, 1200)),
}


@pytest.fixture(scope="module")
def pil():
    return build_image_processor(*SERVER_BUDGET)


def assert_close_to_pil(got: torch.Tensor, ref: torch.Tensor, max_fraction: float):
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
    diff = (got - ref).abs()
    assert diff.max().item() <= 2 * LEVEL + 1e-6, f"max diff {diff.max().item() / LEVEL:.2f} levels"
    fraction = (diff > 1e-6).float().mean().item()
    assert fraction <= max_fraction, f"{fraction:.2%} of values differ"


@pytest.mark.parametrize("name", CASES)
def test_matches_pil_processor(pil, name):
    """Same grid, pixel values within the stated tolerance, for both resize kernels."""
    make, size = CASES[name]
    image = make()
    assert image.size == size
    ref = pil(images=[image], return_tensors="pt")
    max_fraction = 0.05 if max(size) >= 10_000 else 0.02
    for kernel in KERNELS:
        pixel_values, grid = TorchImageProcessor.from_hf(pil, resize_kernel=kernel)([image])
        assert torch.equal(grid, ref["image_grid_thw"]), kernel
        assert_close_to_pil(pixel_values, ref["pixel_values"], max_fraction)


def test_batch_with_own_budgets_equals_images_one_by_one(pil):
    """One call over mixed images, each with its own budget (two of them the same size, so
    resized together), gives the PIL processor's per-image results, concatenated in order."""
    images = [synthetic_photo(500, 300, 1), noise(64, 64), synthetic_photo(500, 300, 2),
              synthetic_photo(90, 700, 3)]
    budgets = [(4096, 65536), None, (4096, 65536), (32 * 32 * 4, 32 * 32 * 8)]
    refs = [pil(images=[im], return_tensors="pt",
                **({"size": {"shortest_edge": b[0], "longest_edge": b[1]}} if b else {}))
            for im, b in zip(images, budgets)]
    pixel_values, grids = TorchImageProcessor.from_hf(pil)(images, budgets)
    assert torch.equal(grids, torch.cat([r["image_grid_thw"] for r in refs]))
    assert grids[3].prod() // 4 <= 8  # the small budget was honoured
    assert_close_to_pil(pixel_values, torch.cat([r["pixel_values"] for r in refs]), 0.01)


def test_other_modes_converted_like_hf(pil):
    """RGBA (composited on white) and greyscale inputs: HF's own conversion to RGB."""
    rgba = Image.new("RGBA", (80, 60), (255, 0, 0, 90))
    grey = synthetic_photo(80, 60).convert("L")
    for image in (rgba, grey):
        ref = pil(images=[image], return_tensors="pt")["pixel_values"]
        assert_close_to_pil(TorchImageProcessor.from_hf(pil)([image])[0], ref, 0.01)
    assert as_uint8_hwc(np.zeros((4, 5, 3), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        as_uint8_hwc(torch.zeros(4, 5, 3))  # float: not an 8-bit image


def test_per_channel_mean_and_std(pil):
    """Constants that differ per channel (CLIP's) take the unfused normalisation."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    clip = build_image_processor(*SERVER_BUDGET)
    clip.image_mean, clip.image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    image = synthetic_photo(300, 200)
    ref = clip(images=[image], return_tensors="pt")["pixel_values"]
    got = TorchImageProcessor.from_hf(clip)([image])[0]
    assert (got - ref).abs().max() <= 2 / 255 / min(OPENAI_CLIP_STD) + 1e-6
    assert ((got - ref).abs() > 1e-6).float().mean() <= 0.02


def test_unsupported_processor_configuration_is_refused(pil):
    """A processor the pipeline does not mirror is refused, not approximated."""
    other = build_image_processor(*SERVER_BUDGET)
    other.do_normalize = False
    with pytest.raises(ValueError, match="do_normalize"):
        TorchImageProcessor.from_hf(other)


def test_builder_selects_and_logs_the_path(tiny_model, caplog):
    """``--image-preprocess`` picks the path, the log says which, and a processor the torch
    pipeline cannot mirror falls back to PIL with a warning."""
    from models.processor import load_processor
    from server.engine.prompt import PromptBuilder
    from server.settings import Settings

    assert Settings.load(["--image-preprocess", "pil"]).image_preprocess == "pil"
    assert Settings().image_preprocess == "torch"
    processor = load_processor(tiny_model)
    caplog.set_level(logging.INFO, logger="qwen_vl.engine")
    kw = dict(max_model_len=4096, default_max_tokens=16)
    assert PromptBuilder(processor, image_preprocess="torch", **kw).fast_images is not None
    assert ("image preprocessing: torch pipeline, uint8 patches on the host (uint8 resize), "
            "normalised on cpu") in caplog.text
    assert PromptBuilder(processor, image_preprocess="pil", **kw).fast_images is None
    assert "image preprocessing: PIL processor (Qwen2VLImageProcessorPil)" in caplog.text
    processor.image_processor.do_rescale = False
    assert PromptBuilder(processor, image_preprocess="torch", **kw).fast_images is None
    assert "torch image preprocessing unavailable" in caplog.text


def test_pixels_stay_uint8_on_the_host_until_the_encoder(tiny_model):
    """Issue 29: a prepared request holds uint8 patches on the host (an eighth of the
    float32 pixels' bytes) and nothing is read back from a device while it is prepared;
    ``model_pixels`` (copy up once, normalise there) gives exactly the full pipeline's
    pixel values."""
    from models.processor import load_processor
    from server.engine.prompt import PromptBuilder
    from tests.sync_counter import HostSyncs

    builder = PromptBuilder(load_processor(tiny_model), max_model_len=4096, default_max_tokens=16)
    assert not builder.normalise_on_device  # the model on the CPU: normalised when prepared
    builder.normalise_on_device = True      # what a GPU's builder does
    images = [synthetic_photo(640, 480, 1), noise(37, 53)]
    req = EngineRequest("r", [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
                        [ImageInput(im, 4096, 65536) for im in images], SamplingParams())
    with HostSyncs() as syncs:
        prepared = builder.build(req)
    assert "Tensor.cpu" not in syncs.seen, syncs.seen
    pv = prepared.pixel_values
    assert pv.dtype == torch.uint8 and pv.device.type == "cpu" and pv.dim() == 3
    full, grids = builder.fast_images([im for im in images], [(4096, 65536)] * 2)
    assert torch.equal(grids, prepared.image_grid_thw)
    # float32 (4 bytes) and the frame twice (temporal patch 2): 8x the bytes
    assert pv.numel() * pv.element_size() * 8 == full.numel() * full.element_size()
    assert torch.equal(builder.model_pixels(pv, "cpu"), full)


async def test_out_of_memory_normalising_on_the_device_is_a_503(toy_model):
    """Device memory running out where the pixels are normalised (the engine's prefill)
    fails that request with 503, and the engine serves the next one."""
    from models.loader import load_model
    from server.engine.core import AsyncEngine
    from server.errors import APIError
    from server.settings import Settings

    s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536)
    engine = AsyncEngine(load_model(s), s)
    engine.builder.normalise_on_device = True  # the GPU's path: normalised in the engine
    fast, real = engine.builder.fast_images, engine.builder.fast_images.normalise
    fails = [1]

    def oom(patches):
        if fails:
            fails.pop()
            raise torch.OutOfMemoryError("injected")
        return real(patches)
    fast.normalise = oom

    def req(i):
        return EngineRequest(f"r{i}", [{"role": "user", "content": [{"type": "image"}]}],
                             [ImageInput(noise(40 + i, 40), 4096, 65536)],
                             SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))

    async def run(r):
        try:
            return [t async for o in engine.generate(r, engine.reserve()) for t in o.token_ids]
        except APIError as exc:
            return exc
    try:
        first = await run(req(0))
        second = await run(req(1))
    finally:
        await engine.shutdown(5)
    assert isinstance(first, APIError) and first.status == 503, first
    assert isinstance(second, list) and len(second) == 3


async def test_greedy_output_unchanged_through_the_engine(toy_model):
    """The tiny model, greedy, through the real batching engine: the same tokens with the
    torch pipeline as with the PIL processor, on a fixed set of images.  (The toy
    vocabulary: the two pipelines' pixels differ in the last bits, which near-ties among
    151,936 random lm_head rows turn into other tokens.)"""
    from models.loader import load_model
    from server.engine.core import AsyncEngine
    from server.settings import Settings

    images = [synthetic_photo(640, 480, 1), noise(37, 53), synthetic_photo(300, 1200, 2),
              synthetic_photo(1024, 1024, 3), exif_rotated_photo(900, 600, 6),
              synthetic_photo(2000, 40, 4)]
    requests = [EngineRequest(
        f"r{i}", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
        [ImageInput(im, 4096, 65536)], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        for i, im in enumerate(images)]
    requests.append(EngineRequest(  # two images in one request
        "pair", [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
        [ImageInput(images[0], 4096, 65536), ImageInput(images[2], 4096, 16384)],
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))

    async def tokens(engine):
        async def one(req):
            return [t async for o in engine.generate(req, engine.reserve()) for t in o.token_ids]
        return await asyncio.gather(*(one(r) for r in requests))

    out = {}
    for mode in ("pil", "torch"):
        s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536, image_preprocess=mode)
        engine = AsyncEngine(load_model(s), s)
        try:
            assert (engine.builder.fast_images is not None) == (mode == "torch")
            out[mode] = await tokens(engine)
        finally:
            await engine.shutdown(5)
    assert all(len(t) == 12 for t in out["pil"])
    assert out["torch"] == out["pil"]
