"""The vision encoder, batched (server/engine/vision.py) against the model's own forward:
host syncs and dispatched ops per call (what a GPU would pay), and CPU time.

    python -m bench.encoder [--images 16] [--side 16] [--out bench/results/encoder_cpu.json]

Builds a vision tower of the real model's depth (24 blocks, deepstack after blocks 5, 11
and 17) at a small width (random weights, float32), then for ``--images`` images of
``--side`` x ``--side`` patches each counts, with the tests' counter of CUDA-syncing ops
(tests/sync_counter.py), the syncs and the aten ops of one call of each path, and times
both side by side (median of alternating rounds).  The counts do not depend on the width;
the times on this CPU say nothing about a GPU beyond "no worse".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from server.engine import vision
from tests.sync_counter import HostSyncs, Ops


def tower():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    cfg = Qwen3VLVisionConfig(depth=24, hidden_size=64, intermediate_size=128, num_heads=4,
                              out_hidden_size=64, deepstack_visual_indexes=[5, 11, 17],
                              num_position_embeddings=2304, patch_size=16,
                              spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(0)
    return Qwen3VLVisionModel._from_config(cfg, attn_implementation="sdpa").eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=16, help="patches per side (16: 64 tokens)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    v = tower()
    grids = [(1, args.side, args.side)] * args.images
    cfg = v.config
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pix = torch.randn(sum(t * h * w for t, h, w in grids), width)

    def own():
        return v(pix, grid_thw=torch.tensor(grids), return_dict=True).pooler_output

    def batched():
        return vision.encode(v, pix, vision.plan(grids, v, "cpu"))[0]

    out = {"images": args.images, "patches_per_image": args.side ** 2, "blocks": 24}
    with torch.inference_mode():
        torch.testing.assert_close(batched(), own(), rtol=1e-5, atol=1e-5)
        for name, fn in (("model_own", own), ("batched", batched)):
            with HostSyncs() as syncs:
                fn()
            with Ops() as ops:
                fn()
            out[name] = {"host_syncs": syncs.count, "syncs_by_op": dict(syncs.seen),
                         "aten_ops": ops.count}
        times = {"model_own": [], "batched": []}
        for _ in range(args.rounds):
            for name, fn in (("model_own", own), ("batched", batched)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name in times:
        out[name]["cpu_ms_median"] = round(1000 * statistics.median(times[name]), 2)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
