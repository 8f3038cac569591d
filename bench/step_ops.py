"""What a GPU would pay per decode step, counted on the CPU: aten ops dispatched by one
``ModelRunner.decode`` step (each is a kernel launch in eager CUDA, none under a replayed
CUDA graph; each fused piece is one custom op, ``qwen_vl::*``), split into the ops inside
one decoder layer and the rest, extrapolated to the real model's 28 layers; and whether the
step copies KV blocks (a gather of the pool before attention).

    python -m bench.step_ops --model-path /tmp/tiny [--batch 64] [--context 40]
        [--reference] [--compiled]
    TRITON_INTERPRET=1 python -m bench.step_ops --model-path /tmp/tiny --kernels triton

The rows' contexts are mixed (1 to ``2 x --context`` tokens).  Ops per layer: the step's
count minus the count of the same step with one layer fewer (the fused step), or the ops
between the first layer's hooks (``--reference``: transformers' layers).  KV copies: a
profiler trace of the step (nested ops included, so also those inside the custom ops)
lists every ``index_select``/``gather``/``index``/``copy_``/``clone`` whose input is a
layer's whole pool ``[blocks + 1, block_size, kv_heads, head_dim]``.  ``--kernels triton``
counts the path a GPU runs (Triton's interpreter on the CPU); the default, the CPU's
reference path, gathers by design.

``--compiled`` counts the launches of the ``--compile`` step instead: the kernels inductor
generated and the calls it leaves to others (matmuls, the paged-attention op), read from
the code it generates on the CPU (a proxy for the GPU's Triton kernels: the same fusion
decisions, mostly).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.loader import load_model
from server.engine.core import AsyncEngine
from server.settings import Settings

REAL_LAYERS = 28
COPIES = ("aten::index_select", "aten::gather", "aten::index", "aten::copy_", "aten::clone",
          "aten::_to_copy", "aten::contiguous")


class _Count(TorchDispatchMode):
    def __init__(self, inside: list[bool]):
        super().__init__()
        self.inside, self.total, self.layer = inside, 0, 0
        self.names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.layer += self.inside[0]
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count(runner, step, inside=(False,)) -> _Count:
    with torch.inference_mode():
        runner.decode(*step)  # warm: buffers allocated
        count = _Count(list(inside) if isinstance(inside, tuple) else inside)
        with count:
            runner.decode(*step)
    return count


def kv_copies(runner, step) -> list[dict]:
    """The step's copies of a whole layer pool (nested ops included)."""
    pool = runner.pool
    layer = [list(pool.k.shape[1:])]
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.decode(*step)
    return [{"op": e.name, "input_shapes": e.input_shapes[:2]} for e in prof.events()
            if e.name in COPIES and e.input_shapes and e.input_shapes[0] in layer]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=40)
    ap.add_argument("--kernels", default="torch", choices=["torch", "triton"])
    ap.add_argument("--reference", action="store_true",
                    help="transformers' layers (the fused step's reference twin)")
    ap.add_argument("--compiled", action="store_true",
                    help="count the torch.compile'd step's kernels instead of aten ops")
    args = ap.parse_args()
    from server.engine import kernels
    kernels.call_directly(False)  # one op per fused piece, as a GPU's step dispatches them
    s = Settings(model_path=args.model_path, kernels=args.kernels, max_num_seqs=args.batch)
    engine = AsyncEngine(load_model(s), s)
    runner, layers = engine.runner, engine.model.config.get_text_config().num_hidden_layers
    if args.reference:
        runner.fused = None
    # mixed lengths: row i holds 1 + (i * 37) % (2 * context) tokens
    lens = [1 + (i * 37) % (2 * args.context) for i in range(args.batch)]
    tables = [engine.blocks.allocate(engine.blocks.blocks_for(n + 1)) for n in lens]
    step = runner.arrays([1] * args.batch, lens, [n + 1 for n in lens], tables)
    if args.compiled:
        blocks = [b for t in tables for b in t]
        print(json.dumps({"layers": layers, "batch": args.batch,
                          **compiled_launches(runner, blocks, step)}))
        engine.close()
        return
    if runner.fused is not None:
        count = _count(runner, step)
        full = runner.fused.layers
        runner.fused.layers = full[:-1]
        try:
            per_layer = count.total - _count(runner, step).total
        finally:
            runner.fused.layers = full
    else:
        inside = [False]
        first = engine.model.model.language_model.layers[0]
        first.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        first.register_forward_hook(lambda *a: inside.__setitem__(0, False))
        count = _count(runner, step, inside)
        per_layer = count.layer
    outside = count.total - layers * per_layer
    copies = kv_copies(runner, step)
    print(json.dumps({"layers": layers, "batch": args.batch, "kernels": runner.kernels,
                      "decode_layers": "fused" if runner.fused is not None else "transformers",
                      "ops": count.total, "per_layer": per_layer, "outside_layers": outside,
                      f"at_{REAL_LAYERS}_layers": outside + REAL_LAYERS * per_layer,
                      "op_names": dict(count.names.most_common()),
                      "kv_pool_copies": len(copies), "kv_pool_copy_ops": copies[:4]}))
    engine.close()  # (its worker processes would hold the exit up)


def compiled_launches(runner, blocks: list[int], step: dict) -> dict:
    """Kernels the compiled decode step launches, from inductor's generated ``call()``."""
    import re

    from torch._inductor.utils import run_and_get_code
    if not runner.compile_decode(blocks):
        raise SystemExit("the step did not compile (see the warning above)")
    with torch.inference_mode():
        runner.decode(*step)
        st = runner.step_for(len(step[0]), int(step[4].max()))
        _, codes = run_and_get_code(runner.compiled, st.ids, st.pos, st.kv_len, st.tables)
    call = codes[-1][codes[-1].index("def call("):]
    fused = len(re.findall(r"^\s+(?:cpp|triton)_\w+\(", call, re.M))
    other = Counter(re.findall(r"(extern_kernels\.\w+|torch\.ops\.[\w.]+)\(", call))
    return {"generated_kernels": fused, "other_calls": dict(other),
            "launches": fused + sum(other.values())}


if __name__ == "__main__":
    main()
