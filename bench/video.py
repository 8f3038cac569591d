"""What a customer's clip costs before the model sees it: decode + sampling (PyAV, in a
decode worker on the server) and preprocessing (resize, patchify; ``TorchVideoProcessor``
on a preparation thread), per clip, at the server's default video settings.

    python -m bench.video --out bench/results/video_cpu.json [--quick]

Clips are generated (``models.video.make_test_clip``: a moving square, H.264): a 3 s
160x120 thumbnail, a 10 s 720p phone clip, a 30 s 1080p one.  Each is timed ``--rounds``
times, the median reported, with the tokens it stands for and the bytes of its sampled
frames and uint8 patches (what the pixel cache holds).  Nothing here needs a model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

CLIPS = [("3s 160x120", 3.0, 10, (160, 120)), ("10s 720p", 10.0, 30, (1280, 720)),
         ("30s 1080p", 30.0, 30, (1920, 1080))]


def measure(name: str, seconds: float, fps: int, size, rounds: int) -> dict:
    from models.video import MAX_SOURCE_FPS, decode_video_bytes, make_test_clip
    from models.video_prep import TorchVideoProcessor
    from models.tiny import REAL_VIDEO_CONFIG
    from server.settings import Settings

    s = Settings()
    proc = TorchVideoProcessor.from_config(REAL_VIDEO_CONFIG)
    data = make_test_clip(seconds=seconds, fps=fps, size=size)
    decode, prep = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        v = decode_video_bytes(data, fps=s.video_fps, min_frames=s.video_min_frames,
                               max_frames=s.video_max_frames, max_seconds=s.max_video_seconds,
                               max_frame_pixels=s.max_video_frame_pixels,
                               max_source_frames=int(s.max_video_seconds * MAX_SOURCE_FPS),
                               max_decoded_pixels=s.max_video_decoded_pixels)
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        patches, grid = proc.patches(v.frames, s.video_min_pixels, s.video_max_pixels)
        prep.append(time.perf_counter() - t)
    return {"clip": name, "bytes": len(data), "source_frames": v.total_frames,
            "sampled_frames": len(v.frame_indices), "grid": list(grid),
            "video_tokens": proc.tokens(grid), "frames_mb": round(v.frames.nbytes / 2**20, 1),
            "patches_mb": round(patches.numel() / 2**20, 1),
            "decode_ms": round(1000 * statistics.median(decode), 1),
            "preprocess_ms": round(1000 * statistics.median(prep), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the first clip only, 1 round")
    a = ap.parse_args(argv)
    clips = CLIPS[:1] if a.quick else CLIPS
    rows = [measure(*c, rounds=1 if a.quick else a.rounds) for c in clips]
    report = {"machine": platform.processor() or platform.machine(), "rows": rows}
    for r in rows:
        print(f"{r['clip']:>12}: {r['sampled_frames']} of {r['source_frames']} frames, "
              f"{r['video_tokens']} tokens, decode {r['decode_ms']} ms, preprocess "
              f"{r['preprocess_ms']} ms, frames {r['frames_mb']} MiB, patches "
              f"{r['patches_mb']} MiB")
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
