"""The Triton kernels (server/engine/triton_kernels.py) against the torch references
(server/engine/kernels.py, kv_pool._paged), run by Triton's interpreter on the CPU.

Why a child process: the interpreter needs ``TRITON_INTERPRET=1`` before ``triton`` is
first imported (``@triton.jit`` reads it when it decorates, and ``triton.language``'s own
jit helpers -- ``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.cdiv`` -- are decorated at
``import triton``; with triton imported first, an interpreted kernel dies with "Cannot
call @triton.jit'd outside of the scope of a kernel").  In the shared pytest process
another test may have imported triton already (torch.compile's inductor does), and
setting the variable here would leak into every later test and every server they start
(``kernels.select`` takes it as leave to run Triton on the CPU).  So the cases below run
in one child process with the variable set, started once per module; each test here
asserts one case's result (the child's traceback on a failure).  The pytest process
itself never imports triton through this file.

``python tests/test_kernels.py [case ...]`` runs the cases directly (the child's mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "@@kernel-results@@"

CASES = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


# --- helpers (child only) -------------------------------------------------------------------

def _tk():
    from server.engine import triton_kernels
    assert triton_kernels._interpreted(), "kernels not decorated for the interpreter"
    return triton_kernels


def _tol(dtype):
    import torch
    return 1e-5 if dtype == torch.float32 else 2e-2  # float32 lands at ~1e-7


def _close(name, got, want, dtype):
    err = _tk().rel_err(got, want)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert err <= _tol(dtype), f"{name} ({dtype}): relative error {err:.2e}"
    return err


def _rnd(*shape, dtype, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _dtypes():
    import torch
    return (torch.float32, torch.bfloat16)


def _check_paged(dtype, **kw):
    """One paged-attention comparison; returns the relative error over the real queries
    and asserts the padding queries are finite."""
    import torch
    tk = _tk()
    block_m, splits = kw.pop("block_m", None), kw.pop("num_splits", None)
    q, kp, vp, tables, qs, kl, want, real, scale = tk.paged_case("cpu", dtype, **kw)
    pool_k, pool_v = kp.clone(), vp.clone()
    got = tk.paged_attention(q, kp, vp, tables, qs, kl, scale, block_m=block_m,
                             num_splits=splits)
    assert torch.equal(kp, pool_k) and torch.equal(vp, pool_v), "the kernel wrote the pool"
    assert got.is_contiguous() and got.shape == q.shape and got.dtype == dtype
    assert torch.isfinite(got).all(), "non-finite output (padding queries included)"
    return _close(f"paged_attention {kw}", got[real], want[real], dtype)


# --- cases ----------------------------------------------------------------------------------

@case
def case_rms_norm():
    import torch
    from server.engine import kernels as K
    tk = _tk()
    for dtype in _dtypes() + (torch.float16,):
        for t, h in ((1, 16), (5, 40), (3, 300), (2, 1000)):
            x, w = _rnd(t, h, dtype=dtype, seed=h), _rnd(h, dtype=dtype, seed=h + 1)
            _close("rms_norm", tk.rms_norm(x, w, 1e-6), K.ref_rms_norm(x, w, 1e-6), dtype)
    wide = _rnd(4, 56, dtype=torch.float32)
    x, w = wide[:, :40], _rnd(40, dtype=torch.float32, seed=3)  # a row-strided view
    _close("rms_norm view", tk.rms_norm(x, w, 1e-5), K.ref_rms_norm(x, w, 1e-5), torch.float32)


@case
def case_add_rms_norm():
    import torch
    from server.engine import kernels as K
    tk = _tk()
    for dtype in _dtypes() + (torch.float16,):
        for t, h in ((1, 16), (5, 40), (3, 300), (2, 1000)):
            x, res = _rnd(t, h, dtype=dtype, seed=h), _rnd(t, h, dtype=dtype, seed=h + 7)
            w = _rnd(h, dtype=dtype, seed=h + 1)
            out, r = tk.add_rms_norm(x, res, w, 1e-6)
            want_out, want_r = K.ref_add_rms_norm(x, res, w, 1e-6)
            if dtype == torch.bfloat16:
                # the interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest,
                # as torch does): within one bf16 ulp, not bit-equal, here
                _close("add_rms_norm residual", r, want_r, dtype)
            else:
                assert torch.equal(r, want_r), f"residual {dtype} {t}x{h}"
            _close("add_rms_norm", out, want_out, dtype)


@case
def case_qk_norm_rope():
    import torch
    from server.engine import kernels as K
    tk = _tk()
    for dtype in _dtypes():
        for t, heads, kv_heads, d, pad in ((3, 4, 2, 16, 0), (5, 6, 2, 24, 8),
                                           (2, 2, 1, 128, 0), (1, 3, 3, 40, 4)):
            width = (heads + 2 * kv_heads) * d
            wide = _rnd(t, width + pad, dtype=dtype, seed=d)
            qkv = wide[:, :width]  # a row-strided view when pad > 0
            qw, kw = _rnd(d, dtype=dtype, seed=d + 1), _rnd(d, dtype=dtype, seed=d + 2)
            ang = _rnd(t, d // 2, dtype=torch.float32, seed=d + 3) * 3
            ang = torch.cat((ang, ang), dim=-1)  # real rotary tables: cos/sin of one angle
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            got = tk.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, heads, kv_heads)
            want = K.ref_qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, heads, kv_heads)
            for name, a, b in zip("qkv", got, want):
                assert a.is_contiguous() and a.data_ptr() != qkv.data_ptr()
                _close(f"qk_norm_rope {name} {t},{heads},{kv_heads},{d}", a, b, dtype)
            assert torch.equal(got[2], want[2].contiguous()), "v is a plain copy"


@case
def case_silu_mul():
    import torch
    from server.engine import kernels as K
    tk = _tk()
    for dtype in _dtypes():
        for t, i in ((1, 7), (3, 40), (2, 1500)):  # 1500: two column blocks of 1024
            x = _rnd(t, 2 * i, dtype=dtype, seed=i) * 4
            got = tk.silu_mul(x)
            assert got.shape == (t, i)
            _close(f"silu_mul {t}x{i}", got, K.ref_silu_mul(x), dtype)


# decode at batch 10: lengths around block edges, one row long enough for several key tiles
MIXED = dict(batch=10, q_start=[0, 14, 15, 16, 39, 2, 32, 63, 1, 149],
             kv_len=[1, 15, 16, 17, 40, 3, 33, 64, 2, 150])


@case
def case_paged_decode_gqa_rep2():
    for dtype in _dtypes():
        _check_paged(dtype, q_len=1, heads=4, kv_heads=2, d=32, bs=16, seed=1, **MIXED)
        _check_paged(dtype, q_len=1, heads=4, kv_heads=2, d=16, bs=4, seed=2, **MIXED)


@case
def case_paged_decode_rep1():
    for dtype in _dtypes():
        _check_paged(dtype, q_len=1, heads=2, kv_heads=2, d=16, bs=8, seed=3, **MIXED)


@case
def case_paged_decode_split_k():
    import torch
    for splits in (2, 3, 5):
        _check_paged(torch.float32, batch=4, q_len=1, heads=4, kv_heads=2, d=16, bs=16,
                     q_start=[0, 99, 200, 16], kv_len=[1, 100, 201, 17], seed=splits,
                     num_splits=splits)
    _check_paged(torch.bfloat16, q_len=1, heads=4, kv_heads=2, d=16, bs=4, seed=4,
                 num_splits=3, **MIXED)


# chunks of 12, 4, 5 and 12 tokens after prefixes of 16, 0, 100 and 7
PREFILL = dict(batch=4, q_len=12, q_start=[16, 0, 100, 7], kv_len=[28, 4, 105, 19])


@case
def case_paged_prefill_cached_prefix():
    for dtype in _dtypes():
        _check_paged(dtype, heads=4, kv_heads=2, d=16, bs=8, seed=5, **PREFILL)
        # several query tiles per row (24 query rows, tiles of 16), and GQA rep 1
        _check_paged(dtype, heads=4, kv_heads=2, d=16, bs=8, seed=6, block_m=16, **PREFILL)
        _check_paged(dtype, heads=2, kv_heads=2, d=24, bs=4, seed=7, block_m=16, **PREFILL)


@case
def case_paged_prefill_default_tiles_and_fp16():
    import torch
    # 70 queries x rep 2 = 140 query rows: several tiles, the last one mostly empty; the
    # rows' chunks are 70, 33 and 1 tokens over prefixes of 9, 0 and 80
    for dtype in _dtypes():  # tiles of 64 (float32) and 128 (bfloat16) query rows
        _check_paged(dtype, batch=3, q_len=70, heads=4, kv_heads=2, d=16, bs=16,
                     q_start=[9, 0, 80], kv_len=[79, 33, 81], seed=13)
    _check_paged(torch.float16, seed=14, heads=4, kv_heads=2, d=16, bs=8, **PREFILL)
    _check_paged(torch.float16, q_len=1, heads=4, kv_heads=2, d=16, bs=4, seed=15,
                 **MIXED)


@case
def case_split_choice():
    tk = _tk()
    saved = tk._sm_count
    try:
        tk._sm_count = lambda device: 132  # an H100's SMs
        dev = "cuda"
        assert tk._num_splits(64 * 8, 2048 * 16, dev) == 1      # decode, 64 rows: one wave
        assert tk._num_splits(1 * 8, 2048 * 16, dev) == 16      # one row at 32k: capped
        assert tk._num_splits(2 * 8, 64 * 16, dev) == 2         # short tables: >= 512 keys
        assert tk._num_splits(4 * 8, 16, dev) == 1              # a 16-token table: no split
    finally:
        tk._sm_count = saved


@case
def case_paged_prefill_split_k():
    import torch
    _check_paged(torch.float32, heads=4, kv_heads=2, d=16, bs=8, seed=8, block_m=16,
                 num_splits=3, **PREFILL)


@case
def case_paged_head_dim_128():
    for dtype in _dtypes():
        _check_paged(dtype, batch=2, q_len=1, heads=4, kv_heads=2, d=128, bs=16,
                     q_start=[20, 70], kv_len=[21, 71], seed=9)
    _check_paged(_dtypes()[1], batch=2, q_len=3, heads=4, kv_heads=2, d=128, bs=16,
                 q_start=[20, 0], kv_len=[23, 2], seed=10)


@case
def case_paged_padding_stays_finite_and_follows_last_query():
    import torch
    tk = _tk()
    q, kp, vp, tables, qs, kl, want, real, scale = tk.paged_case(
        "cpu", torch.float32, heads=4, kv_heads=2, d=16, bs=8, seed=11, **PREFILL)
    got = tk.paged_attention(q, kp, vp, tables, qs, kl, scale)
    assert not real.all()
    assert torch.isfinite(got).all()
    # a padding query attends what the row's last real query attends: SDPA under the
    # pool's mask gives it the same weights; only its own query vector differs
    _close("padding queries", got[~real], want[~real], torch.float32)


@case
def case_layout_helper_matches_kv_pool():
    import types
    import torch
    from server.engine.kv_pool import KVPool, StepInputs
    tk = _tk()
    pool = types.SimpleNamespace(block_size=8)
    tables = torch.tensor([[3, 5, 1, 0, 0], [2, 0, 0, 0, 0], [4, 6, 7, 8, 9]])
    qs, kl = torch.tensor([16, 0, 30]), torch.tensor([20, 3, 40])
    inp = StepInputs(tables, qs, kl)
    for q_len in (1, 4, 10):
        got = tk.ref_layout(tables, qs, kl, q_len, 8)
        want = KVPool._layout_any(pool, inp, q_len)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), q_len
    one = KVPool._layout_one(pool, StepInputs(tables, kl - 1, kl))
    got = tk.ref_layout(tables, kl - 1, kl, 1, 8)
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


@case
def case_custom_ops_dispatch_to_triton():
    import torch
    from server.engine import kernels as K
    from server.engine.kv_pool import _paged
    tk = _tk()
    calls = {}
    originals = {}

    def counting(name):
        fn = originals[name] = getattr(tk, name)

        def wrapper(*a, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **kw)
        return wrapper

    names = ("rms_norm", "add_rms_norm", "qk_norm_rope", "silu_mul", "paged_attention")
    dtype = torch.float32
    x, res, w = _rnd(3, 40, dtype=dtype), _rnd(3, 40, dtype=dtype, seed=1), _rnd(40, dtype=dtype)
    qkv = _rnd(3, (4 + 2 * 2) * 16, dtype=dtype, seed=2)
    qw, kw = _rnd(16, dtype=dtype, seed=3), _rnd(16, dtype=dtype, seed=4)
    cos, sin = _rnd(3, 16, dtype=dtype, seed=5), _rnd(3, 16, dtype=dtype, seed=6)
    q4, kp, vp, tables, qs, kl, _, _, scale = tk.paged_case(
        "cpu", dtype, batch=5, q_len=1, heads=4, kv_heads=2, d=16, bs=4,
        q_start=[0, 3, 4, 9, 20], kv_len=[1, 4, 5, 10, 21], seed=12)
    q = q4[:, 0]                                           # [B, heads, D]
    k, v = _rnd(5, 2, 16, dtype=dtype, seed=7), _rnd(5, 2, 16, dtype=dtype, seed=8)
    slots, mask = tk.ref_layout(tables, qs, kl, 1, 4)
    try:
        for name in names:
            setattr(tk, name, counting(name))
        K.use("triton")
        assert K.backend() == "triton"
        got = {
            "rms_norm": K.rms_norm(x, w, 1e-6),
            "add_rms_norm": K.add_rms_norm(x, res, w, 1e-6),
            "qk_norm_rope": K.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, 4, 2),
            "silu_mul": K.silu_mul(qkv),
        }
        kp_t, vp_t = kp.clone(), vp.clone()
        got["paged_attention"] = K.paged_attention(q, k, v, kp_t, vp_t, slots, tables, qs, kl,
                                                   mask, scale)
        assert calls == dict.fromkeys(names, 1), calls
        K.use("torch")  # the reference backend calls no Triton function
        kp_r, vp_r = kp.clone(), vp.clone()
        want = {
            "rms_norm": K.rms_norm(x, w, 1e-6),
            "silu_mul": K.silu_mul(qkv),
            "paged_attention": K.paged_attention(q, k, v, kp_r, vp_r, slots, tables, qs, kl,
                                                 mask, scale),
        }
        assert calls == dict.fromkeys(names, 1), calls
    finally:
        K.use("torch")
        for name, fn in originals.items():
            setattr(tk, name, fn)
    assert K.backend() == "torch"
    # the ops returned exactly what the Triton functions return
    assert torch.equal(got["rms_norm"], tk.rms_norm(x, w, 1e-6))
    for a, b in zip(got["add_rms_norm"], tk.add_rms_norm(x, res, w, 1e-6)):
        assert torch.equal(a, b)
    for a, b in zip(got["qk_norm_rope"], tk.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, 4, 2)):
        assert torch.equal(a, b)
    assert torch.equal(got["silu_mul"], tk.silu_mul(qkv))
    assert torch.equal(got["paged_attention"],
                       tk.paged_attention(q.unsqueeze(1), kp_t, vp_t, tables, qs, kl,
                                          scale).view(5, -1))
    # ... and, within float32 tolerance, what the torch backend gives (kv_pool._paged
    # underneath), with the same pool writes
    assert torch.equal(kp_r, kp_t) and torch.equal(vp_r, vp_t), "the ops wrote the pool alike"
    for name, ref in want.items():
        _close(f"{name} op", got[name], ref, dtype)
    ref = _paged(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), kp.clone(), vp.clone(), slots,
                 tables, mask, scale, False)
    _close("paged op vs _paged", got["paged_attention"], ref.view(5, -1), dtype)


@case
def case_self_check_cpu():
    import torch
    worst = _tk().self_check(torch.device("cpu"))
    assert 0 <= worst < 2e-2, worst


# --- the child ------------------------------------------------------------------------------

def _run_cases(names) -> dict:
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            CASES[name]()
            out[name] = {"ok": True}
        except BaseException:  # noqa: BLE001 - reported to the parent as text
            out[name] = {"ok": False, "error": traceback.format_exc()}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _child(names) -> None:
    sys.path.insert(0, str(ROOT))
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in the environment, in a fresh process")
    print(MARKER + json.dumps(_run_cases(names or list(CASES))), flush=True)


# --- the tests ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    """Every case, run in two child processes (this box has 2 cores; the interpreter is
    CPU-bound), once per module."""
    names = sorted(CASES, key=lambda n: -("paged" in n))  # the slow ones spread first
    halves = [names[0::2], names[1::2]]
    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *half], cwd=ROOT,
                              env={**{k: v for k, v in os.environ.items()
                                      if k != "TRITON_INTERPRET"}, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for half in halves]
    got = {}
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"kernel test child failed (rc {proc.returncode}):\n{stdout[-3000:]}\n"
                        f"{stderr[-6000:]}")
        got.update(json.loads(lines[-1][len(MARKER):]))
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_case(results, name):
    res = results.get(name)
    if res is None:
        pytest.fail(f"case {name} did not run", pytrace=False)
    if not res["ok"]:
        pytest.fail(f"{name} ({res['seconds']} s), in the child:\n{res['error']}",
                    pytrace=False)


def test_every_case_ran(results):
    assert sorted(results) == sorted(CASES)


def test_cpu_without_interpreter_is_a_clear_error_and_import_is_safe():
    """Imported without TRITON_INTERPRET (as in a process where triton came first), the
    module imports fine and a CPU call says what is missing instead of crashing."""
    code = ("import sys; sys.path.insert(0, '.'); import torch, triton\n"
            "from server.engine import triton_kernels as tk\n"
            "try:\n"
            "    tk.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERR" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout


if __name__ == "__main__":
    _child(sys.argv[1:])
