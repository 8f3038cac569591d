"""The fused decode step (server/engine/fused.py) against its reference twin, transformers'
own decoder layers (``runner.fused = None``), float32, greedy, tiny model on the CPU:

* whole engines: the same requests give the same tokens, token for token, at batch 1, at
  a batch of ~64 rows with mixed context lengths, over cached prefixes, with n > 1 and
  with chunked prefill;
* one decode step: the fused step's hidden state and the keys/values it writes equal the
  transformers layers' (~1e-5 relative), at batch 1 and at batch 9 with mixed lengths;
* ``fuse_weights``: q/k/v and gate/up become views into one storage each (no second
  copy); a model it cannot fuse keeps transformers' layers and still serves the same
  tokens; every custom op of server/engine/kernels.py passes ``torch.library.opcheck``;
* the Triton kernels end to end: an engine with ``kernels="triton"`` run by Triton's
  interpreter in a child process (``TRITON_INTERPRET=1`` must be set before triton is
  first imported: see tests/test_kernels.py) gives the torch engine's tokens, the
  prefill over cached blocks going through the Triton paged-attention kernel.

The in-process engines are on the toy vocabulary (``toy_model``, as the other engine
twins: the comparison does not depend on the vocabulary's size)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from models.loader import load_model
from server.engine import kernels as K
from server.engine.core import AsyncEngine
from server.engine.fused import fuse_weights, fusable
from server.engine.interface import EngineRequest, SamplingParams
from server.settings import Settings
from tests.test_batching import PeakRows, mixed_requests
from tests.test_hostpath import loaded, make_engine  # noqa: F401 (fixtures)
from tests.test_static_kv import SYSTEM, photo, run, turn

ROOT = Path(__file__).resolve().parents[1]
MARKER = "@@fused-triton@@"


# --- helpers ----------------------------------------------------------------------------------

class CountingFused:
    """Stands in for ``runner.fused``, counting the steps that went through it."""

    def __init__(self, runner):
        self.inner, self.calls = runner.fused, 0
        assert self.inner is not None, "the engine did not fuse its decode step"
        runner.fused = self

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


def twins(make, **settings):
    """Two engines of the same settings: the fused decode step (counted) and transformers'
    layers (``runner.fused = None``)."""
    fused, ref = make(**settings), make(**settings)
    counter = CountingFused(fused.runner)
    ref.runner.fused = None
    return fused, ref, counter


async def run_all(engine, reqs, stagger=0.0):
    """Each request's token ids per choice (``run`` of tests/test_static_kv.py), all sent
    together."""
    return list(await asyncio.gather(*(run(engine, r, delay=stagger * i)
                                       for i, r in enumerate(reqs))))


async def run_cached(engine, req):
    """(token ids per choice, cached_tokens) of one request."""
    ids: dict[int, list[int]] = {}
    cached = set()
    async for o in engine.generate(req, engine.reserve()):
        ids.setdefault(o.index, []).extend(o.token_ids)
        cached.add(o.cached_tokens)
    assert len(cached) == 1, cached
    return ids, cached.pop()


def text(i: int, words: int, max_tokens=12, **params) -> EngineRequest:
    params.setdefault("temperature", 0)
    return EngineRequest(f"x{i}-{words}", [{"role": "user", "content": " ".join(
        f"parcel{(i * 7 + k) % 50}" for k in range(words))}], [],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))


def system_req(i: int, max_tokens=10) -> EngineRequest:
    return EngineRequest(f"s{i}", [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": f"Where is order {i} now?"}],
                         [], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def assert_equal_tokens(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: fused {g} != transformers' layers {w}"


# --- 1. whole engines: fused decode vs transformers' layers -----------------------------------

async def test_batch_1_fused_equals_transformers_layers(make_engine):
    fused, ref, counter = twins(make_engine, prefix_cache=False)
    reqs = [text(0, 3, max_tokens=16), text(1, 40, max_tokens=16)] + mixed_requests(4, 12)
    want = [await run(ref, r) for r in reqs]
    got = [await run(fused, r) for r in reqs]
    assert_equal_tokens(got, want)
    assert counter.calls >= len(reqs) * 11  # every decode step went through the fused one


async def test_batch_64_mixed_lengths_fused_equals_transformers_layers(make_engine):
    """64 rows decoding together, contexts from ~20 to ~260 tokens (1 to 17 blocks),
    images included: the rows' tables have different widths and their last blocks
    different fill levels."""
    # a step budget that admits every prompt within a step or two (the CPU's default,
    # 1,024 tokens, would let the first rows finish before the last join)
    fused, ref, counter = twins(make_engine, prefix_cache=False, max_num_seqs=64,
                                max_num_batched_tokens=16384, max_batch_tokens=32768)
    reqs = mixed_requests(8, 16) + [text(i, 2 + (i * 37) % 240, max_tokens=16)
                                    for i in range(56)]
    want = await run_all(ref, reqs)
    rows = PeakRows(fused)
    got = await run_all(fused, reqs)
    rows.close()
    assert_equal_tokens(got, want)
    assert rows.peak >= 56, rows.peak  # they really decoded as one wide batch
    assert counter.calls >= 15


async def test_cached_prefix_fused_equals_transformers_layers(make_engine):
    """A second round sharing a long system prompt (and a photo) with the first: its
    prefill reads the cached blocks, its decode steps read them through the pool."""
    fused, ref, counter = twins(make_engine)
    pic = photo(4)
    first = [system_req(0), turn(1, pic, max_tokens=10)]
    second = [system_req(i) for i in range(1, 6)] + [turn(1, pic, follow_up=True, max_tokens=10),
                                                       turn(2, pic, max_tokens=10)]
    out = {}
    for name, engine in (("fused", fused), ("ref", ref)):
        r1 = [await run_cached(engine, r) for r in first]
        r2 = await asyncio.gather(*(run_cached(engine, r) for r in second))
        assert r1[0][1] == 0  # (the second shares the system prompt with the first)
        assert all(c > 0 for _, c in r2), (name, [c for _, c in r2])
        out[name] = ([ids for ids, _ in r1 + list(r2)], [c for _, c in r2])
    assert_equal_tokens(out["fused"][0], out["ref"][0])
    assert out["fused"][1] == out["ref"][1]  # the same blocks came from the cache
    assert counter.calls > 0


async def test_n_above_1_fused_equals_transformers_layers(make_engine):
    """n > 1: the choices share the prompt's blocks (forked) and decode as separate rows,
    greedy and seeded sampling, next to other rows."""
    fused, ref, counter = twins(make_engine, prefix_cache=False)
    reqs = [text(0, 30, max_tokens=10, n=3),
            text(1, 45, max_tokens=10, n=2, temperature=1.0, seed=11),
            text(2, 5, max_tokens=10), mixed_requests(2, 10)[1]]
    reqs[-1].params = reqs[-1].params.replace(n=2)
    want = await run_all(ref, reqs)
    got = await run_all(fused, reqs)
    assert_equal_tokens(got, want)
    assert sorted(got[0]) == [0, 1, 2] and sorted(got[1]) == [0, 1]
    assert counter.calls > 0


async def test_chunked_prefill_fused_equals_transformers_layers(make_engine):
    """A step budget of 32 tokens: prompts (images included) prefilled in chunks between
    the other rows' decode steps."""
    fused, ref, counter = twins(make_engine, prefix_cache=False, max_num_batched_tokens=32)
    reqs = mixed_requests(6, 10) + [text(9, 120, max_tokens=10), text(10, 4, max_tokens=10)]
    want = await run_all(ref, reqs, stagger=0.01)
    chunks = []
    prefill = fused.runner.prefill
    fused.runner.prefill = lambda cs: chunks.extend(cs) or prefill(cs)
    try:
        got = await run_all(fused, reqs, stagger=0.01)
    finally:
        fused.runner.prefill = prefill
    assert_equal_tokens(got, want)
    assert counter.calls > 0
    assert max(c.ids.numel() for c in chunks) <= 32
    assert sum(c.start > 0 for c in chunks) >= 5  # prompts continued over earlier chunks


# --- 2. one decode step ------------------------------------------------------------------------

def _both_steps(runner, ids, pos, kv_len, tables):
    """The fused step's and transformers' layers' hidden states and pools after the step,
    from the same pool contents."""
    pool = runner.pool
    fused = runner.fused
    assert fused is not None and runner.rope is not None
    saved = pool.k.clone(), pool.v.clone()
    with torch.inference_mode():
        h_fused = runner.decode_hidden(ids, pos, kv_len, tables).clone()
        kv_fused = pool.k.clone(), pool.v.clone()
        pool.k.copy_(saved[0])
        pool.v.copy_(saved[1])
        runner.fused = None
        try:
            h_ref = runner.decode_hidden(ids, pos, kv_len, tables).clone()
        finally:
            runner.fused = fused
        kv_ref = pool.k.clone(), pool.v.clone()
    return h_fused, h_ref, kv_fused, kv_ref, saved


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("lengths", [[23], [1, 16, 17, 5, 48, 33, 64, 9, 70]],
                         ids=["batch1", "batch9-mixed"])
def test_fused_step_equals_transformers_layers_step(make_engine, lengths):
    engine = make_engine(prefix_cache=False, kv_cache_tokens=4096)
    runner, pool = engine.runner, engine.runner.pool
    bs = pool.block_size
    b = len(lengths)
    per_row = [-(-n // bs) for n in lengths]
    blocks = engine.blocks.allocate(sum(per_row))
    try:
        g = torch.Generator().manual_seed(len(lengths))
        with torch.inference_mode():  # the rows' earlier keys/values: random, as if prefilled
            idx = torch.tensor(blocks)
            pool.k[:, idx] = torch.randn(pool.k[:, idx].shape, generator=g)
            pool.v[:, idx] = torch.randn(pool.v[:, idx].shape, generator=g)
        width = max(per_row)
        tables = torch.zeros(b, width, dtype=torch.long)
        at = 0
        for i, n in enumerate(per_row):
            tables[i, :n] = torch.tensor(blocks[at:at + n])
            at += n
        kv_len = torch.tensor(lengths)
        pos = kv_len - 1
        vocab = runner.embed.weight.shape[0]
        ids = torch.randint(0, vocab, (b,), generator=g)
        h_f, h_r, kv_f, kv_r, before = _both_steps(runner, ids, pos, kv_len, tables)
        assert h_f.shape == h_r.shape == (b, runner.embed.weight.shape[1])
        assert torch.isfinite(h_f).all()
        err = _rel(h_f, h_r)
        assert err <= 1e-5, f"hidden state: relative error {err:.2e}"
        for i in range(b):  # row by row: no row may hide in another's scale
            assert _rel(h_f[i], h_r[i]) <= 1e-5, (i, _rel(h_f[i], h_r[i]))
        # both wrote each row's new key/value at its last position, and nothing else
        for f, r, old in zip(kv_f, kv_r, before):
            assert _rel(f, r) <= 1e-5
            changed = (f != old).flatten(3).any(-1)  # [layers, blocks + 1, block_size]
            want = torch.zeros_like(changed)
            for i, n in enumerate(lengths):
                want[:, tables[i, (n - 1) // bs], (n - 1) % bs] = True
            assert torch.equal(changed, want)
    finally:
        engine.blocks.release(blocks)


# --- 3. fuse_weights, the unfusable model, the custom ops -------------------------------------

def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _settings(model_path, **kw) -> Settings:
    return Settings(model_path=model_path, min_pixels=4096, max_pixels=65536, **kw)


def test_fuse_weights_keeps_no_second_copy(toy_model):
    fresh = load_model(_settings(toy_model)).model
    before = _storage_bytes(fresh.parameters())
    numel_before = sum(p.numel() for p in fresh.parameters())
    lm = fresh.model.language_model
    names = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    originals = [{(m, n): getattr(getattr(layer, m), n).weight.detach().clone()
                  for m, ns in names.items() for n in ns} for layer in lm.layers]
    old = [weakref.ref(getattr(getattr(layer, m), n).weight)
           for layer in lm.layers for m, ns in names.items() for n in ns]
    assert fuse_weights(lm) is None
    gc.collect()
    assert all(r() is None for r in old), "an old weight is still referenced"
    for layer, orig in zip(lm.layers, originals):
        for m, merged_name in (("self_attn", "qkv_weight"), ("mlp", "gate_up_weight")):
            merged = getattr(getattr(layer, m), merged_name)
            assert not isinstance(merged, torch.nn.Parameter)
            at = 0
            for n in names[m]:
                w = getattr(getattr(layer, m), n).weight
                assert isinstance(w, torch.nn.Parameter) and not w.requires_grad
                # a view at its rows of the merged storage, with its old values
                assert w.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()
                assert w.data_ptr() == merged[at].data_ptr()
                assert torch.equal(w, orig[(m, n)])
                at += w.shape[0]
            assert at == merged.shape[0]
            assert torch.equal(merged, torch.cat([orig[(m, n)] for n in names[m]]))
    # the parameters and the merged weights together: no byte more than the fresh model
    merged = [getattr(getattr(layer, m), a) for layer in lm.layers
              for m, a in (("self_attn", "qkv_weight"), ("mlp", "gate_up_weight"))]
    after = _storage_bytes(list(fresh.parameters()) + merged)
    assert after <= before, (after, before)
    assert sum(p.numel() for p in fresh.parameters()) == numel_before
    # twice: nothing more happens
    ptr = merged[0].data_ptr()
    assert fuse_weights(lm) is None and lm.layers[0].self_attn.qkv_weight.data_ptr() == ptr


async def test_unfusable_model_keeps_transformers_layers(toy_model, make_engine, caplog):
    """A q_proj with a bias (zero: the same numbers) or a non-SiLU activation in the
    config: ``fuse_weights`` says why and changes nothing; the engine decodes through
    transformers' layers and serves the fused engine's tokens."""
    reqs = [text(0, 20, max_tokens=10), text(1, 70, max_tokens=10)] + mixed_requests(2, 10)
    want = await run_all(make_engine(prefix_cache=False), reqs)

    def with_bias(lm):
        a = lm.layers[1].self_attn
        lin = torch.nn.Linear(a.q_proj.in_features, a.q_proj.out_features, bias=True)
        with torch.no_grad():
            lin.weight.copy_(a.q_proj.weight)
            lin.bias.zero_()
        a.q_proj = lin.eval()
        return "plain bias-free"

    def gelu(lm):
        lm.config.hidden_act = "gelu"  # (the MLPs were built with SiLU: numbers unchanged)
        return "activation 'gelu'"

    for spoil in (with_bias, gelu):
        loaded_model = load_model(_settings(toy_model))
        lm = loaded_model.model.model.language_model
        expect = spoil(lm)
        why = fusable(lm)
        assert why is not None and expect in why, why
        assert fuse_weights(lm) == why
        assert not any(hasattr(layer.self_attn, "qkv_weight")
                       or hasattr(layer.mlp, "gate_up_weight") for layer in lm.layers)
        caplog.clear()
        with caplog.at_level("INFO", logger="qwen_vl.engine"):
            engine = AsyncEngine(loaded_model, _settings(toy_model, prefix_cache=False))
        try:
            assert engine.runner.fused is None
            assert any("decode layers: transformers' modules" in r.getMessage()
                       and why in r.getMessage() for r in caplog.records)
            got = await run_all(engine, reqs)
        finally:
            engine.close()
        assert_equal_tokens(got, want)


def _op_cases():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g)
    t, h, heads, kv, d, bs = 3, 40, 4, 2, 16, 4
    qkv = rnd(t, (heads + 2 * kv) * d)
    # paged: 3 rows, contexts 1, 5 and 9 tokens over blocks of 4 (block 0: scratch)
    tables = torch.tensor([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
    kv_len = torch.tensor([1, 5, 9])
    slots = torch.stack([tables[i, (n - 1) // bs] * bs + (n - 1) % bs
                         for i, n in enumerate(kv_len.tolist())])
    mask = torch.arange(3 * bs).view(1, 1, 1, -1) < kv_len.view(-1, 1, 1, 1)
    return {
        "rms_norm": (K.rms_norm, (rnd(t, h), rnd(h), 1e-6)),
        "add_rms_norm": (K.add_rms_norm, (rnd(t, h), rnd(t, h), rnd(h), 1e-6)),
        "qk_norm_rope": (K.qk_norm_rope, (qkv, rnd(d), rnd(d), rnd(t, d), rnd(t, d), 1e-6,
                                          heads, kv)),
        "silu_mul": (K.silu_mul, (rnd(t, 2 * h),)),
        "paged_attention": (K.paged_attention, (
            rnd(3, heads, d), rnd(3, kv, d), rnd(3, kv, d), rnd(7, bs, kv, d),
            rnd(7, bs, kv, d), slots, tables, kv_len - 1, kv_len, mask, d ** -0.5)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_custom_op_passes_opcheck(name):
    """Schema (``paged_attention`` mutates the pool), fake implementation and eager
    results agree, as torch.compile needs them to."""
    assert K.backend() == "torch"
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_paged_attention_op_writes_the_pool_and_matches_sdpa():
    """The decode op's two effects, against plain SDPA over each row's context: the new
    key/value at the row's last slot, and the attention over keys 0..kv_len-1."""
    op, args = _op_cases()["paged_attention"]
    q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale = args
    kp, vp = kp.clone(), vp.clone()
    out = op(q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale)
    heads, d = q.shape[1:]
    kvh = k.shape[1]
    for i, n in enumerate(kv_len.tolist()):
        rows = kp[tables[i]].reshape(-1, kvh, d)[:n], vp[tables[i]].reshape(-1, kvh, d)[:n]
        assert torch.equal(rows[0][-1], k[i]) and torch.equal(rows[1][-1], v[i])
        keys = rows[0].repeat_interleave(heads // kvh, 1).transpose(0, 1)    # [heads, n, d]
        vals = rows[1].repeat_interleave(heads // kvh, 1).transpose(0, 1)
        want = torch.softmax(q[i].unsqueeze(1) @ keys.transpose(1, 2) * scale, -1) @ vals
        assert torch.allclose(out[i].view(heads, d), want.squeeze(1), atol=1e-5), i


# --- 4. the Triton kernels end to end (interpreter, child process) ----------------------------

def _triton_requests():
    """Short greedy requests of mixed lengths, an image, a cached-prefix round, n > 1."""
    first = [system_req(0, max_tokens=8), text(1, 3, max_tokens=8),
             text(2, 50, max_tokens=8, n=2),
             text(3, 9, max_tokens=8, n=2, temperature=1.0, seed=5), mixed_requests(2, 8)[1]]
    second = [system_req(1, max_tokens=8), system_req(2, max_tokens=8)]
    return first, second


async def _serve_rounds(engine):
    first, second = _triton_requests()
    r1 = await asyncio.gather(*(run_cached(engine, r) for r in first))
    r2 = await asyncio.gather(*(run_cached(engine, r) for r in second))
    return {"ids": [{str(k): v for k, v in ids.items()} for ids, _ in r1 + r2],
            "cached": [c for _, c in r1 + r2]}


def _triton_child(model: str) -> None:
    """The child's side: an engine with ``kernels="triton"`` under the interpreter.  Ends
    with ``os._exit``: an engine that failed in its constructor (its startup check) leaves
    threads behind that would keep the process alive until the parent's timeout."""
    import traceback
    code = 1
    try:
        _triton_child_run(model)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent prints it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _triton_child_run(model: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    t0 = time.perf_counter()
    from server.engine import triton_kernels as tk
    assert tk._interpreted(), "kernels not decorated for the interpreter"
    calls = {"paged_attention": 0, "in_place": 0, "rms_norm": 0, "add_rms_norm": 0,
             "qk_norm_rope": 0, "silu_mul": 0}

    def counting(mod, name, key):
        fn = getattr(mod, name)

        def wrapper(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        setattr(mod, name, wrapper)
    for name in ("paged_attention", "rms_norm", "add_rms_norm", "qk_norm_rope", "silu_mul"):
        counting(tk, name, name)
    counting(K, "paged_attention_in_place", "in_place")
    s = _settings(model, kernels="triton", max_num_seqs=8, kv_cache_tokens=2048)
    engine = AsyncEngine(load_model(s), s)
    try:
        out = {"kernels": engine.runner.kernels, "backend": K.backend(),
               "fused": engine.runner.fused is not None}
        out.update(asyncio.run(_serve_rounds(engine)))
    finally:
        engine.close()
    out["calls"] = calls
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(MARKER + json.dumps(out), flush=True)


async def test_triton_engine_equals_torch_engine_under_the_interpreter(toy_model, make_engine):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    code = "import sys; from tests.test_fused import _triton_child; _triton_child(sys.argv[1])"
    child = subprocess.Popen([sys.executable, "-c", code, toy_model], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the torch engine's answers, here, while the child runs
        torch_engine = make_engine(kernels="torch", max_num_seqs=8, kv_cache_tokens=2048)
        assert torch_engine.runner.kernels == "torch" and torch_engine.runner.fused is not None
        want = await _serve_rounds(torch_engine)
        stdout, stderr = await asyncio.to_thread(child.communicate, timeout=150)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
    assert child.returncode == 0 and lines, \
        f"child failed (rc {child.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    got = json.loads(lines[-1][len(MARKER):])
    assert got["kernels"] == "triton" and got["backend"] == "triton" and got["fused"], got
    calls = got["calls"]
    # decode: the fused step's ops, Triton's; prefill over the cached system prompt (and
    # any batched prefill): the paged kernel reading the blocks in place
    assert all(calls[n] > 0 for n in ("rms_norm", "add_rms_norm", "qk_norm_rope",
                                      "silu_mul")), calls
    assert calls["in_place"] > 0 and calls["paged_attention"] > calls["in_place"], calls
    assert all(c > 0 for c in got["cached"][-2:]), got["cached"]
    assert got["cached"] == want["cached"]
    assert_equal_tokens(got["ids"], want["ids"])


async def test_startup_check_fits_a_short_context_and_leaves_no_step(toy_model, make_engine):
    """The startup check's decode step fits whatever the blocks allow: with blocks of 128
    tokens and a 256-token context (two blocks of a step's table at most) it still starts
    (review finding: the probe's third block made the step too wide); and it leaves no
    decode step behind, so ``--compile`` and the CUDA graphs build every bucket afresh."""
    s = Settings(model_path=toy_model, kv_block_size=128, max_model_len=256)
    engine = AsyncEngine(load_model(s), s)
    try:
        assert engine.runner.max_blocks == 2 and engine.runner.steps == {}
        assert (await run(engine, text(0, 12, max_tokens=6)))[0]
    finally:
        engine.close()
    assert make_engine().runner.steps == {}


async def test_triton_failing_the_startup_check_falls_back_to_torch(make_engine, monkeypatch,
                                                                    caplog):
    """``--kernels auto``: Triton kernels that fail the model-shaped startup check (a
    compile error, a mismatch) leave the engine on the torch reference, logged, instead of
    failing the start.  Simulated on the CPU: the backend reports "triton" and the check
    fails while it does."""
    from server.engine import runner as runner_mod
    monkeypatch.setattr(K, "select", lambda setting, device: ("triton", "pretend"))
    own = runner_mod.ModelRunner._check

    def check(self, blocks):
        if self.kernels == "triton":
            raise RuntimeError("injected: a Triton kernel disagrees")
        return own(self, blocks)
    monkeypatch.setattr(runner_mod.ModelRunner, "_check", check)
    with caplog.at_level("WARNING", logger="qwen_vl.engine"):
        engine = make_engine()
    assert engine.runner.kernels == "torch" and K.backend() == "torch"
    assert any("torch reference runs instead" in r.getMessage() for r in caplog.records)
    assert (await run(engine, text(0, 12, max_tokens=6)))[0]
    # asked for explicitly, the failure stops the start
    monkeypatch.setattr(K, "select", lambda setting, device: ("triton", "pretend"))
    with pytest.raises(RuntimeError, match="injected"):
        make_engine(kernels="triton")
