"""Image preprocessing throughput: the PIL processor vs the torch pipeline, side by side.

    python -m bench.images --out bench/results/images_cpu.json

Both paths get the same decoded RGB images (synthetic photos: smooth gradients plus
sensor-like noise, so neither path meets a degenerate input) with the server's default
budget (64..1280 tokens) and the real model's processor constants (patch 16, merge 2,
temporal patch 2, mean and std 0.5).  The PIL path runs as the engine ran it before: one
``Qwen2VLImageProcessorPil`` call per image, the pixel values then concatenated into one
tensor (what the torch path returns).  The torch path gets the batch in one call
(``models.vision_prep.TorchImageProcessor``) on ``--device`` (default: CUDA when there is
one, else CPU).  Rounds alternate between the two paths and the median round is
reported, to damp the noise of a shared machine; every torch result is checked against
the PIL one (same grids, pixel values within the pipeline's stated tolerance).  Prints a
Markdown table (images/s per path and the ratio) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.tiny import build_image_processor
from models.vision_prep import TorchImageProcessor

SERVER_BUDGET = (64 * 32 * 32, 1280 * 32 * 32)  # Settings.min_pixels / max_pixels defaults


def synthetic_photo(width: int, height: int, seed: int = 0):
    """A deterministic RGB ``PIL.Image`` that resizes like a photo: smooth gradients in each
    channel plus mild noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    phase = rng.uniform(0, 6.28, size=(1, 1, 3)).astype(np.float32)
    base = 128 + 70 * np.sin(7 * x + 5 * y + phase) * np.cos(3 * y - 4 * x)
    noise = rng.normal(0, 8, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(side: int, batch: int, rounds: int, device: str, pil, fast) -> dict:
    images = [synthetic_photo(side, side, seed=i) for i in range(batch)]

    def run_pil():  # as the engine ran it: one call per image, the request's images concatenated
        outs = [pil(images=[im], return_tensors="pt") for im in images]
        return (torch.cat([o["pixel_values"] for o in outs]),
                torch.cat([o["image_grid_thw"] for o in outs]))

    def run_torch():
        out = fast(images)
        if out[0].is_cuda:
            torch.cuda.synchronize()
        return out

    # check once, outside the timing: the fast path must agree with the slow one
    (ref_pv, ref_grid), (pv, grid) = run_pil(), run_torch()
    assert torch.equal(grid, ref_grid)
    diff = (pv.cpu() - ref_pv).abs().max().item()
    level = fast.rescale_factor / 0.5
    assert diff <= 2 * level + 1e-6, f"torch pipeline differs by {diff / level:.1f} levels"
    pil_s, torch_s = [], []
    for _ in range(rounds):
        pil_s.append(_time(run_pil))
        torch_s.append(_time(run_torch))
    p, t = statistics.median(pil_s), statistics.median(torch_s)
    return {"side": side, "batch": batch, "device": device, "pil_images_per_s": batch / p,
            "torch_images_per_s": batch / t, "ratio": p / t,
            "tokens_per_image": int(grid[0].prod()) // 4, "max_abs_diff": diff}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                    help="torch intra-op threads to measure the torch path with (CPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    pil = build_image_processor(*SERVER_BUDGET)
    fast = TorchImageProcessor.from_hf(pil, device=args.device)
    rows = []
    threads = sorted(set(args.threads), reverse=True) if args.device == "cpu" else [None]
    for n in threads:
        if n is not None:
            torch.set_num_threads(n)
        for side in args.sides:
            for batch in args.batches:
                r = measure(side, batch, args.rounds, args.device, pil, fast)
                r["torch_threads"] = n
                rows.append(r)
                print(f"{side}x{side} batch {batch:3d} threads {n}: PIL {r['pil_images_per_s']:7.1f} "
                      f"img/s, torch {r['torch_images_per_s']:7.1f} img/s ({r['ratio']:.2f}x)",
                      flush=True)
    print("\n| image | tokens | batch | torch threads | PIL img/s | torch img/s | torch / PIL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['side']}x{r['side']} | {r['tokens_per_image']} | {r['batch']} | "
              f"{r['torch_threads'] or r['device']} | {r['pil_images_per_s']:.1f} | "
              f"{r['torch_images_per_s']:.1f} | {r['ratio']:.2f}x |")
    if args.out:
        meta = {"torch": torch.__version__, "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "device": args.device,
                "rounds": args.rounds}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
