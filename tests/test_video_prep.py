"""Video input without torchvision: ``models/video.py`` (PyAV decode + sampling) and
``models/video_prep.py`` (``TorchVideoProcessor``) against HF's own pipeline.

The reference values (``tests/data/video_reference.json``) were made by HF's
``Qwen3VLVideoProcessor`` + ``Qwen3VLProcessor`` with torchvision, from the committed clips
in ``tests/data`` (``tests/data/make_video_reference.py`` says how to regenerate them).
Sampled indices, grids, timestamps, decoded frames and ``pixel_values`` are compared
bit for bit (sha256 of the bytes), the prompt ids exactly.  Missing reference data fail
the run; nothing here skips.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from models import video as video_mod
from models.video import (DecodedVideo, VideoError, decode_video_bytes, frames_from_images,
                          make_test_clip, sample_indices)
from models.video_prep import TorchVideoProcessor, load_video_config
from tests.conftest import fresh_python

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
REFERENCE = DATA / "video_reference.json"
TEMPLATE_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
LIMITS = dict(max_seconds=600.0, max_frame_pixels=10**8, max_source_frames=100_000)


def _load_reference() -> dict:
    # a missing or unreadable reference is a failure (collection error), never a skip
    assert REFERENCE.is_file(), (
        f"{REFERENCE} is missing: run /tmp/tvvenv/bin/python tests/data/make_video_reference.py")
    return json.loads(REFERENCE.read_text())


REF = _load_reference()
CASES = REF["cases"]
assert len(CASES) >= 10, "the video reference has too few cases"


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def case_id(case: dict) -> str:
    return f"{case['clip'].removesuffix('.mp4')}-{case['setting']}"


def processor_for(case: dict) -> TorchVideoProcessor:
    return TorchVideoProcessor.from_config({**REF["video_config"], **case["processor_config"]})


def budget(case: dict) -> tuple[int | None, int | None]:
    size = case["call_kwargs"].get("size") or {}
    return size.get("shortest_edge"), size.get("longest_edge")


def decode_case(case: dict, proc: TorchVideoProcessor) -> DecodedVideo:
    data = (DATA / case["clip"]).read_bytes()
    return decode_video_bytes(data, fps=case["call_kwargs"].get("fps", proc.fps),
                              min_frames=proc.min_frames, max_frames=proc.max_frames, **LIMITS)


@pytest.fixture(scope="module")
def processor(real_vocab_model):
    from models.processor import load_processor
    return load_processor(real_vocab_model)


# -- the committed reference --------------------------------------------------------------

def test_reference_data_is_complete():
    assert REF["cap_pixels_per_frame"] is True
    assert set(REF["versions"]) >= {"torch", "torchvision", "transformers", "av"}
    assert "make_video_reference.py" in REF["command"]
    assert len(REF["clips"]) >= 3
    for name, info in REF["clips"].items():
        path = DATA / name
        assert path.is_file(), f"{path} is missing"
        data = path.read_bytes()
        assert len(data) < 100_000
        assert sha256(data) == info["sha256"], f"{name} is not the clip the reference used"
    assert {c["clip"] for c in CASES} == set(REF["clips"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_and_pixels_match_hf(case):
    proc = processor_for(case)
    v = decode_case(case, proc)
    assert v.frame_indices == case["frame_indices"]
    assert v.total_frames == case["total_frames"]
    assert v.fps == case["source_fps"]
    assert list(v.frames.shape) == case["frames_shape"]
    assert v.frames.dtype == np.uint8
    assert sha256(v.frames.tobytes()) == case["frames_sha256"], "decoded frames differ from HF's"
    assert v.nbytes == v.frames.nbytes

    lo, hi = budget(case)
    pv, grid = proc(v.frames, lo, hi)
    assert list(grid) == case["grid"]
    assert all(type(g) is int for g in grid)
    assert proc.grid(len(v.frames), v.frames.shape[1], v.frames.shape[2], lo, hi) == grid
    assert pv.dtype == torch.float32
    assert list(pv.shape) == case["pixel_values_shape"]
    a = pv.numpy()
    summary = (float(a.astype(np.float64).sum()), float(np.abs(a).max()))
    assert sha256(np.ascontiguousarray(a).tobytes()) == case["pixel_values_sha256"], (
        f"pixel_values differ from HF's: sum/absmax {summary} vs "
        f"{(case['pixel_values_sum'], case['pixel_values_abs_max'])}, first row "
        f"{a[0, :8].tolist()} vs {case['pixel_values_first_row_head']}")
    assert proc.timestamps(v.frame_indices, v.fps) == case["timestamps"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prompt_ids_match_hf(case, processor):
    """The server's own prompt (``PromptBuilder``: template, video slot, timestamps,
    placeholders) is HF's ``Qwen3VLProcessor`` prompt, token for token; and its pixels are
    the reference's."""
    from server.engine.interface import EngineRequest, SamplingParams, VideoInput
    from server.engine.prompt import PromptBuilder
    proc = processor_for(case)
    v = decode_case(case, proc)
    lo, hi = budget(case)
    text = processor.apply_chat_template(REF["messages"], tokenize=False,
                                         add_generation_prompt=True)
    assert text == case["prompt"] and text.count(TEMPLATE_VIDEO) == 1
    builder = PromptBuilder(processor, max_model_len=32768, default_max_tokens=8,
                            video_processor=proc)
    prep = builder.build(EngineRequest("r", REF["messages"], [], SamplingParams(),
                                       videos=[VideoInput(v, lo or proc.min_pixels,
                                                          hi or proc.max_pixels, "d")]))
    expected = [i for i, n in case["input_ids_rle"] for _ in range(n)]
    assert prep.input_ids[0].tolist() == expected
    grid = tuple(case["grid"])
    assert prep.video_tokens == proc.tokens(grid) and prep.video_grid_thw[0].tolist() == \
        list(grid)
    pixels = builder.model_pixels(prep.pixel_values, "cpu")
    assert sha256(np.ascontiguousarray(pixels.numpy()).tobytes()) == \
        case["pixel_values_sha256"]


# -- the arithmetic against HF's own functions (no torchvision needed to call them) --------

def test_sample_indices_is_hf_sample_frames():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    for min_frames, max_frames in ((4, 768), (4, 6), (2, 3)):
        hf_self = SimpleNamespace(fps=2, min_frames=min_frames, max_frames=max_frames)
        for total in (1, 2, 3, 4, 5, 7, 30, 31, 299, 1000, 7201):
            for src_fps in (1.0, 7.5, 10.0, 23.976, 30.0, 60.0):
                for fps in (0.5, 1, 2, 4.5):
                    meta = VideoMetadata(total_num_frames=total, fps=src_fps)
                    hf = Qwen3VLVideoProcessor.sample_frames(hf_self, meta, fps=fps)
                    ours = sample_indices(total, src_fps, fps=fps, min_frames=min_frames,
                                          max_frames=max_frames)
                    assert ours == hf.tolist(), (total, src_fps, fps, min_frames, max_frames)
                    assert all(type(i) is int for i in ours)
                    assert ours == sorted(set(ours))  # never repeats (n <= total)


def test_token_counts_are_hf_get_num_of_video_patches():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    proc = TorchVideoProcessor.from_config(REF["video_config"])
    for lo, hi in ((4096, 25165824), (4096, 6 * 8192), (1_000_000, 25165824),
                   (128 * 32 * 32, 768 * 32 * 32)):
        hf_self = SimpleNamespace(size={"shortest_edge": lo, "longest_edge": hi}, patch_size=16,
                                  merge_size=2, temporal_patch_size=2, max_video_tokens=768,
                                  cap_pixels_per_frame=True)
        for t in (2, 3, 4, 5, 6, 31, 64, 768):
            for h, w in ((120, 160), (90, 200), (1080, 1920), (2160, 3840), (33, 4000),
                         (720, 1280), (17, 29)):
                n = Qwen3VLVideoProcessor.get_num_of_video_patches(hf_self, t, h, w)
                assert proc.tokens(proc.grid(t, h, w, lo, hi)) == n // 4, (lo, hi, t, h, w)


def test_one_frame_is_processed_as_the_frame_twice():
    proc = TorchVideoProcessor.from_config(REF["video_config"])
    v = decode_case(CASES[0], proc)
    one, g1 = proc(v.frames[:1])
    two, g2 = proc(np.repeat(v.frames[:1], 2, axis=0))
    assert g1 == g2 and g1[0] == 1
    assert torch.equal(one, two)
    assert proc.timestamps([7], 10.0) == [0.7]


def test_unchanged_size_is_not_resampled():
    proc = TorchVideoProcessor.from_config(REF["video_config"])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)  # multiples of 32
    assert proc.target_size(4, 64, 96) == (64, 96)
    pv, grid = proc(frames)
    assert grid == (2, 4, 6)
    # row 0: merge block (0, 0), patch (0, 0); columns: channel, time, row, column
    first = pv[0].view(3, 2, 16, 16)
    want = (torch.from_numpy(frames[:2, :16, :16]).permute(3, 0, 1, 2).float() - 127.5) / 127.5
    assert torch.equal(first, want)


def test_placeholder_text():
    proc = TorchVideoProcessor.from_config(REF["video_config"])
    text = proc.placeholder((2, 4, 6), [0.25, 1.45])
    group = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    # what replaces the template's <|video_pad|> (its own markers stay around it)
    assert text == "<0.2 seconds>" + group + "<1.4 seconds>" + group
    with pytest.raises(ValueError):
        proc.placeholder((3, 4, 6), [0.0, 1.0])


def test_from_config_defaults_and_refusals(tmp_path):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    d = TorchVideoProcessor.from_config(None)
    assert (d.min_pixels, d.max_pixels) == (Qwen3VLVideoProcessor.size["shortest_edge"],
                                            Qwen3VLVideoProcessor.size["longest_edge"])
    assert (d.patch_size, d.merge_size, d.temporal_patch_size, d.fps, d.min_frames,
            d.max_frames) == (16, 2, 2, 2.0, 4, 768)
    real = TorchVideoProcessor.from_config(REF["video_config"])
    assert (real.min_pixels, real.max_pixels) == (4096, 25165824)
    for bad in ({"resample": 2}, {"do_resize": False}, {"do_normalize": False},
                {"do_rescale": False}):
        with pytest.raises(ValueError):
            TorchVideoProcessor.from_config(bad)

    assert load_video_config(tmp_path) == {}
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {}, "video_processor": {"fps": 1}}))
    assert load_video_config(tmp_path) == {"fps": 1}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(REF["video_config"]))
    assert load_video_config(tmp_path) == REF["video_config"]


# -- decode_video_bytes: bounds and broken input ------------------------------------------

@pytest.fixture(scope="module")
def clip() -> bytes:
    return (DATA / "clip_160x120_3s.mp4").read_bytes()


@pytest.fixture(scope="module")
def faststart_clip() -> bytes:
    # index first, so a truncated copy still opens and declares 30 frames
    return make_test_clip(faststart=True)


def refused(data: bytes, message: str, **limits) -> None:
    with pytest.raises(VideoError) as e:
        decode_video_bytes(data, **{**LIMITS, **limits})
    assert str(e.value) == message


@pytest.mark.parametrize("data", [b"", b"\x00" * 1000, b"not a video at all " * 50,
                                  bytes(range(256)) * 40], ids=["empty", "zeros", "text",
                                                                 "bytes"])
def test_garbage_is_refused(data):
    with pytest.raises(VideoError) as e:
        decode_video_bytes(data, **LIMITS)
    assert str(e.value) in ("video data is empty", "video data could not be decoded")


def test_errors_carry_no_exception_text(clip):
    with pytest.raises(VideoError) as e:
        decode_video_bytes(clip[: len(clip) // 2], **LIMITS)  # index at the end: cut off
    assert str(e.value) == "video data could not be decoded"
    assert e.value.__suppress_context__  # raised "from None": no av/ffmpeg text chained


def test_truncated_files(faststart_clip):
    data = faststart_clip
    full = decode_video_bytes(data, **LIMITS)
    assert full.frame_indices == [0, 6, 12, 17, 23, 29]
    # cut inside a packet: the decoder fails, as in HF (InvalidDataError)
    for frac in (0.5, 0.9, 0.99):
        refused(data[: int(len(data) * frac)], "video data could not be decoded")
    # index only, no frame data at all
    refused(data[: data.find(b"mdat") + 8], "video data could not be decoded")
    # cut at a packet boundary: the frames that were decoded are used, and the indices say
    # which (HF returns the same frames but keeps all six indices)
    with av.open(io.BytesIO(data)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    v = decode_video_bytes(data[: packets[-1][0]], **LIMITS)
    assert v.total_frames == 30  # what the container declares
    assert v.frame_indices == full.frame_indices[: len(v.frame_indices)]
    assert 1 <= len(v.frame_indices) < 6
    assert np.array_equal(v.frames, full.frames[: len(v.frame_indices)])


def test_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("mp2", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 44100
        for _ in range(5):
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    refused(buf.getvalue(), "video data has no video stream")


def test_unknown_codec(clip):
    assert clip.count(b"avc1") >= 1
    refused(clip.replace(b"avc1", b"zzzz"), "video codec is not supported")


def test_frame_size_limit(clip):
    refused(clip, "video frames are too large", max_frame_pixels=160 * 120 - 1)
    assert decode_video_bytes(clip, **{**LIMITS, "max_frame_pixels": 160 * 120}).frames.shape \
        == (6, 120, 160, 3)


def test_huge_declared_frames_are_refused_before_decoding():
    # 4096x4096 plain frames compress to almost nothing; the stream header gives them away
    data = make_test_clip(seconds=0.2, fps=10, size=(4096, 4096), square=8,
                          faststart=True)
    refused(data, "video frames are too large", max_frame_pixels=1920 * 1080)
    assert decode_video_bytes(data, **LIMITS).frames.shape == (2, 4096, 4096, 3)
    # the header alone (no frame data): refused as too large, not as undecodable, so the
    # size check runs before any decoding
    header = data[: data.find(b"mdat") + 8]
    refused(header, "video data could not be decoded")
    refused(header, "video frames are too large", max_frame_pixels=1920 * 1080)


def test_frame_count_and_duration_limits(clip):
    refused(clip, "video has too many frames", max_source_frames=29)
    assert decode_video_bytes(clip, **{**LIMITS, "max_source_frames": 30}).total_frames == 30
    refused(clip, "video is too long", max_seconds=2.9)
    assert decode_video_bytes(clip, **{**LIMITS, "max_seconds": 3.0}).duration == 3.0


def test_container_without_frame_count():
    mkv = make_test_clip(container_format="matroska")
    with av.open(io.BytesIO(mkv)) as c:
        assert c.streams.video[0].frames == 0  # HF's reader fails here (IndexError)
    v = decode_video_bytes(mkv, **LIMITS)
    ref = decode_video_bytes(make_test_clip(), **LIMITS)
    assert (v.total_frames, v.frame_indices, v.duration) == (30, ref.frame_indices, 3.0)
    assert np.array_equal(v.frames, ref.frames)
    refused(mkv, "video has too many frames", max_source_frames=29)
    refused(mkv, "video is too long", max_seconds=2.5)


def test_repeated_indices_are_served(clip, monkeypatch):
    monkeypatch.setattr(video_mod, "sample_indices", lambda *a, **k: [0, 0, 3, 3, 3, 29])
    v = decode_video_bytes(clip, **LIMITS)
    assert v.frame_indices == [0, 0, 3, 3, 3, 29]
    assert np.array_equal(v.frames[0], v.frames[1])
    assert np.array_equal(v.frames[2], v.frames[4])
    assert not np.array_equal(v.frames[0], v.frames[2])


def test_few_frames_and_fps(clip):
    v = decode_video_bytes(clip, fps=100, max_frames=768, **LIMITS)  # more than it has
    assert v.frame_indices == list(range(30))
    v = decode_video_bytes(clip, fps=0.1, min_frames=4, **LIMITS)
    assert v.frame_indices == [0, 10, 19, 29]
    two = make_test_clip(seconds=0.2, fps=10)  # 2 frames < min_frames
    assert decode_video_bytes(two, **LIMITS).frame_indices == [0, 1]


# -- frames_from_images --------------------------------------------------------------------

def test_frames_from_images():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]
    v = frames_from_images(images, fps=2.0)
    assert v.frames.shape == (5, 48, 64, 3) and v.frames.dtype == np.uint8
    assert v.frame_indices == [0, 1, 2, 3, 4]
    assert (v.total_frames, v.fps, v.duration) == (5, 2.0, 2.5)
    assert np.array_equal(v.frames[3], images[3])
    proc = TorchVideoProcessor.from_config(REF["video_config"])
    assert proc.timestamps(v.frame_indices, v.fps) == [0.25, 1.25, 2.0]
    with pytest.raises(VideoError, match="same size"):
        frames_from_images(images + [np.zeros((48, 65, 3), np.uint8)], fps=2.0)
    with pytest.raises(VideoError):
        frames_from_images([], fps=2.0)
    with pytest.raises(VideoError):
        frames_from_images([images[0].astype(np.float32)], fps=2.0)
    with pytest.raises(VideoError):
        frames_from_images([images[0][..., :2]], fps=2.0)
    for bad_fps in (0, -1, float("nan"), float("inf")):
        with pytest.raises(VideoError):
            frames_from_images(images, fps=bad_fps)


def test_video_module_does_not_import_torch():
    code = ("import sys; import models.video as v; "
            "d = v.decode_video_bytes(open('tests/data/clip_200x90_2s.mp4','rb').read(), "
            "max_seconds=60, max_frame_pixels=10**6, max_source_frames=1000); "
            "v.frames_from_images(list(d.frames), 2.0); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'torchvision' not in sys.modules; print('ok')")
    out = fresh_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
