"""Write ``tests/data/video_reference.json``: HF's own Qwen3-VL video pipeline on the
committed test clips, for ``tests/test_video_prep.py``.

Run, from the repository root, in a venv that has torchvision (the main one cannot: PyPI
has no CPU torchvision build for its torch), e.g.::

    /tmp/tvvenv/bin/python tests/data/make_video_reference.py

(/tmp/tvvenv: torch 2.14.1 + torchvision 0.29.1 + transformers 5.24.0 + av 18.1.0 + pillow
+ numpy + jinja2.)  It needs the real-vocabulary tiny model folder for the tokenizer and
chat template (``--model``, default /tmp/tinyrv; build it with
``.venv/bin/python -m models.tiny /tmp/tinyrv --real-vocab``).

What is HF here, and nothing of ours: decoding and sampling are transformers'
``load_video(path, backend="pyav", sample_indices_fn=Qwen3VLVideoProcessor.sample_frames
with fps)`` (what the processor itself does for a video path, with the PyAV backend; the
processor's own path loader wants torchcodec), the pixels are ``Qwen3VLVideoProcessor`` with
Qwen3-VL-2B-Instruct's ``video_preprocessor_config.json`` values and
``cap_pixels_per_frame=True``, and the prompt ids are a full ``Qwen3VLProcessor`` call on a
chat with one video.  Only the clips come from ``models.video.make_test_clip``, and only
when a clip file is missing (the committed bytes are the input; ``--regen-clips`` rewrites
them, after which the reference must be regenerated and committed with them).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent
COMMAND = "/tmp/tvvenv/bin/python tests/data/make_video_reference.py"

# Qwen3-VL-2B-Instruct's video_preprocessor_config.json (the values that matter here)
REAL_VIDEO_CONFIG = {
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_sample_frames": True,
}

# name -> make_test_clip arguments
CLIPS = {
    # 30 frames: 6 sampled at 2 fps, 3 temporal groups; 120 rows round up to 128
    "clip_160x120_3s.mp4": dict(seconds=3.0, fps=10, size=(160, 120)),
    # 39 frames at 15 fps: 5 sampled (odd: the last group repeats the last frame)
    "clip_160x120_2.6s_odd.mp4": dict(seconds=2.6, fps=15, size=(160, 120), square=30),
    # sides that are not multiples of 32 (200x90 -> 192x96)
    "clip_200x90_2s.mp4": dict(seconds=2.0, fps=8, size=(200, 90), square=24,
                               background=(200, 190, 170)),
}

# name -> (per-processor config overrides, per-call processor kwargs)
SETTINGS = {
    "default": ({}, {}),
    "fps1": ({}, {"fps": 1}),
    # HF reads max_frames from the processor, not from the call
    "max_frames4": ({"max_frames": 4}, {}),
    # a small budget: frames shrink (cap: 8192 pixels a frame)
    "small_budget": ({}, {"size": {"shortest_edge": 4096, "longest_edge": 6 * 8192}}),
    # a large floor: frames grow (smart_resize compares it with T*H*W, all frames)
    "large_floor": ({}, {"size": {"shortest_edge": 1_000_000, "longest_edge": 25165824}}),
}

MESSAGES = [{"role": "user", "content": [
    {"type": "video"}, {"type": "text", "text": "What moves in this video?"}]}]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def rle(ids: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][0] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def ensure_clips(regen: bool) -> dict[str, bytes]:
    sys.path.insert(0, str(ROOT))
    from models.video import make_test_clip

    out = {}
    for name, kwargs in CLIPS.items():
        path = DATA / name
        if regen or not path.exists():
            make_test_clip(path, **kwargs)
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        out[name] = path.read_bytes()
        if len(out[name]) >= 100_000:
            raise SystemExit(f"{name} is {len(out[name])} bytes: keep clips under 100 KB")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/tinyrv", help="real-vocab tiny model folder")
    ap.add_argument("--out", default=str(DATA / "video_reference.json"))
    ap.add_argument("--regen-clips", action="store_true")
    args = ap.parse_args(argv)

    import av
    import torch
    import torchvision
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import load_video

    torch.set_num_threads(1)
    clips = ensure_clips(args.regen_clips)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    chat_template = (Path(args.model) / "chat_template.jinja").read_text()

    results = []
    for name in CLIPS:
        path = str(DATA / name)
        for setting, (cfg_over, call) in SETTINGS.items():
            vp = Qwen3VLVideoProcessor(**{**REAL_VIDEO_CONFIG, **cfg_over},
                                       cap_pixels_per_frame=True)
            fps = call.get("fps", vp.fps)
            # HF's own loader, sampling with the processor's own sample_frames
            frames, meta = load_video(path, backend="pyav",
                                      sample_indices_fn=functools.partial(vp.sample_frames,
                                                                          fps=fps))
            kwargs = {"cap_pixels_per_frame": True, **{k: v for k, v in call.items()
                                                       if k != "fps"}}
            out = vp(videos=[frames], video_metadata=[meta], do_sample_frames=False,
                     return_metadata=True, return_tensors="pt", **kwargs)
            pv = out["pixel_values_videos"]
            assert pv.dtype == torch.float32, pv.dtype
            grid = [int(v) for v in out["video_grid_thw"][0]]
            meta_out = out["video_metadata"][0]

            processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=vp, chat_template=chat_template)
            text = processor.apply_chat_template(MESSAGES, tokenize=False,
                                                 add_generation_prompt=True)
            enc = processor(text=[text], videos=[frames], video_metadata=[meta],
                            do_sample_frames=False, return_tensors="pt", **kwargs)
            assert torch.equal(enc["pixel_values_videos"], pv)
            assert enc["video_grid_thw"][0].tolist() == grid
            ids = enc["input_ids"][0].tolist()
            timestamps = processor._calculate_timestamps(
                list(meta_out.frames_indices.tolist()
                     if hasattr(meta_out.frames_indices, "tolist")
                     else meta_out.frames_indices), meta_out.fps, vp.temporal_patch_size)

            arr = pv.numpy()
            results.append({
                "clip": name,
                "setting": setting,
                "processor_config": cfg_over,
                "call_kwargs": call,
                "frame_indices": [int(i) for i in meta_out.frames_indices],
                "source_fps": float(meta_out.fps),
                "total_frames": int(meta_out.total_num_frames),
                "frames_shape": list(frames.shape),
                "frames_sha256": sha256(np.ascontiguousarray(frames).tobytes()),
                "grid": grid,
                "timestamps": [float(t) for t in timestamps],
                "pixel_values_shape": list(arr.shape),
                "pixel_values_sha256": sha256(np.ascontiguousarray(arr).tobytes()),
                "pixel_values_sum": float(arr.astype(np.float64).sum()),
                "pixel_values_abs_max": float(np.abs(arr).max()),
                "pixel_values_first_row_head": [float(v) for v in arr[0, :8]],
                "prompt": text,
                # run-length: [[id, count], ...] (the video pads repeat)
                "input_ids_rle": rle(ids),
            })
            print(f"{name} {setting}: indices {results[-1]['frame_indices']} grid {grid} "
                  f"timestamps {[round(t, 3) for t in timestamps]} ids {len(ids)}")

    ref = {
        "command": COMMAND,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "av": av.__version__,
                     "numpy": np.__version__},
        "video_config": REAL_VIDEO_CONFIG,
        "cap_pixels_per_frame": True,
        "messages": MESSAGES,
        "clips": {name: {"sha256": sha256(b), "bytes": len(b), "make_test_clip": {
            k: list(v) if isinstance(v, tuple) else v for k, v in CLIPS[name].items()}}
            for name, b in clips.items()},
        "cases": results,
    }
    Path(args.out).write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
