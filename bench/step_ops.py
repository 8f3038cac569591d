"""What a GPU would pay per decode step, counted on the CPU: aten ops dispatched by one
``ModelRunner.decode`` step (each is a kernel launch in eager CUDA, none under a replayed
CUDA graph), split into the ops inside one decoder layer and the rest, extrapolated to the
real model's 28 layers.

    python -m bench.step_ops --model-path /tmp/tiny [--batch 16] [--context 40] [--compiled]

``--compiled`` counts the launches of the ``--compile`` step instead: the kernels inductor
generated and the calls it leaves to others (matmuls, the paged-attention op), read from
the code it generates on the CPU (a proxy for the GPU's Triton kernels: the same fusion
decisions, mostly).  Run it on two models of different depth to split per layer.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.loader import load_model
from server.engine.core import AsyncEngine
from server.settings import Settings

REAL_LAYERS = 28


class _Count(TorchDispatchMode):
    def __init__(self, inside: list[bool]):
        super().__init__()
        self.inside, self.total, self.layer = inside, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.layer += self.inside[0]
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=40)
    ap.add_argument("--compiled", action="store_true",
                    help="count the torch.compile'd step's kernels instead of aten ops")
    args = ap.parse_args()
    s = Settings(model_path=args.model_path)
    engine = AsyncEngine(load_model(s), s)
    runner, layers = engine.runner, engine.model.config.get_text_config().num_hidden_layers
    inside = [False]
    first = engine.model.model.language_model.layers[0]
    first.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    first.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    per_row = engine.blocks.blocks_for(args.context + 1)
    blocks = engine.blocks.allocate(args.batch * per_row)
    tables = [blocks[i * per_row:(i + 1) * per_row] for i in range(args.batch)]
    step = dict(ids=[1] * args.batch, pos=[args.context] * args.batch,
                kv_len=[args.context + 1] * args.batch, tables=tables)
    if args.compiled:
        print(json.dumps({"layers": layers, "batch": args.batch,
                          **compiled_launches(runner, blocks, step)}))
        engine._stopping = True
        return
    with torch.inference_mode():
        runner.decode(**step)  # warm: buffers allocated
        count = _Count(inside)
        with count:
            runner.decode(**step)
    outside = count.total - layers * count.layer
    print(json.dumps({"layers": layers, "batch": args.batch, "ops": count.total,
                      "per_layer": count.layer, "outside_layers": outside,
                      f"at_{REAL_LAYERS}_layers": outside + REAL_LAYERS * count.layer}))
    engine._stopping = True


def compiled_launches(runner, blocks: list[int], step: dict) -> dict:
    """Kernels the compiled decode step launches, from inductor's generated ``call()``."""
    import re
    from collections import Counter

    from torch._inductor.utils import run_and_get_code
    if not runner.compile_decode(blocks):
        raise SystemExit("the step did not compile (see the warning above)")
    with torch.inference_mode():
        runner.decode(**step)
        st = runner.step_for(len(step["ids"]), max(len(t) for t in step["tables"]))
        _, codes = run_and_get_code(runner.compiled, st.ids, st.pos, st.kv_len, st.tables)
    call = codes[-1][codes[-1].index("def call("):]
    fused = len(re.findall(r"^\s+(?:cpp|triton)_\w+\(", call, re.M))
    other = Counter(re.findall(r"(extern_kernels\.\w+|torch\.ops\.[\w.]+)\(", call))
    return {"generated_kernels": fused, "other_calls": dict(other),
            "launches": fused + sum(other.values())}


if __name__ == "__main__":
    main()
