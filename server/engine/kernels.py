"""The decode step's fused pieces, each one custom op (``qwen_vl::*``) with two
implementations: the torch reference (plain aten ops, what the CPU runs, what every test
compares against) and a Triton kernel (server/engine/triton_kernels.py, what a GPU runs).

Contract:

* ``rms_norm(x, w, eps)``, ``add_rms_norm(x, residual, w, eps) -> (normed, x + residual)``:
  Qwen3's RMSNorm (``w * x / rms(x)``, computed in float32), the second with the residual
  add before it, as a decoder layer does twice.
* ``qk_norm_rope(qkv, q_w, k_w, cos, sin, eps, heads, kv_heads) -> (q, k, v)``: the fused
  q/k/v projection's output ``[T, (heads + 2 kv_heads) * D]`` split per head, Qwen3's
  per-head RMSNorm on q and k, then rotary (``x cos + rotate_half(x) sin``, ``cos``/``sin``
  ``[T, D]``).  ``q`` ``[T, heads, D]``, ``k``/``v`` ``[T, kv_heads, D]``.
* ``silu_mul(x) -> silu(x[:, :I]) * x[:, I:]``: the fused gate/up projection's output.
* ``paged_attention(q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale)``: one
  query per row (``[B, heads, D]``): writes ``k``/``v`` at ``slots`` of one layer's pool
  ``kp``/``vp`` (``[N + 1, block_size, kv_heads, D]``), then attends each row's blocks
  ``tables`` up to ``kv_len``; returns ``[B, heads * D]``.  The reference gathers the
  blocks and runs SDPA under ``mask`` (server/engine/kv_pool.py); the Triton kernel reads
  the blocks where they are.

``use(backend)`` picks the implementation ("torch" or "triton") for every op at once;
``select(setting, device)`` chooses at startup: Triton on CUDA when it imports, compiles
and matches the reference on small inputs (any failure, a missing C compiler included,
keeps the reference, with a log line that says why); the reference on the CPU (Triton's
interpreter runs there, for the tests, but ~1000x slower than the aten ops).
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.nn.functional as F

log = logging.getLogger("qwen_vl.engine")

BACKENDS = ("torch", "triton")
_backend = "torch"


def backend() -> str:
    return _backend


def use(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}")
    if name == "triton":
        _triton()  # import now: a failure belongs to the caller, not to a step
    _backend = name


def _triton():
    from server.engine import triton_kernels
    return triton_kernels


# --- references ----------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_rms_norm(x, w, eps: float):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def ref_add_rms_norm(x, residual, w, eps: float):
    r = x + residual
    return F.rms_norm(r, (r.shape[-1],), w, eps), r


def ref_qk_norm_rope(qkv, q_w, k_w, cos, sin, eps: float, heads: int, kv_heads: int):
    t, d = qkv.shape[0], q_w.shape[0]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = F.rms_norm(q.view(t, heads, d), (d,), q_w, eps)
    k = F.rms_norm(k.view(t, kv_heads, d), (d,), k_w, eps)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s,
            v.reshape(t, kv_heads, d))


def ref_silu_mul(x):
    i = x.shape[-1] // 2
    return F.silu(x[:, :i]) * x[:, i:]


def ref_paged_attention(q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale: float):
    from server.engine.kv_pool import _paged
    b = q.shape[0]
    out = _paged(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), kp, vp, slots, tables,
                 mask, scale, False)
    return out.view(b, -1)


# --- the ops -------------------------------------------------------------------------------

@torch.library.custom_op("qwen_vl::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if _backend == "triton":
        return _triton().rms_norm(x, w, eps)
    return ref_rms_norm(x, w, eps)


@rms_norm.register_fake
def _(x, w, eps):
    return torch.empty_like(x)


@torch.library.custom_op("qwen_vl::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend == "triton":
        return _triton().add_rms_norm(x, residual, w, eps)
    return ref_add_rms_norm(x, residual, w, eps)


@add_rms_norm.register_fake
def _(x, residual, w, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("qwen_vl::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, heads: int,
                 kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend == "triton":
        return _triton().qk_norm_rope(qkv, q_w, k_w, cos, sin, eps, heads, kv_heads)
    q, k, v = ref_qk_norm_rope(qkv, q_w, k_w, cos, sin, eps, heads, kv_heads)
    # a custom op may not return a view of its input (one row's v slice is contiguous)
    # (inference tensors keep no view record: compare storages)
    same = v.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    return q, k, v.clone() if same else v


@qk_norm_rope.register_fake
def _(qkv, q_w, k_w, cos, sin, eps, heads, kv_heads):
    t, d = qkv.shape[0], q_w.shape[0]
    return qkv.new_empty((t, heads, d)), qkv.new_empty((t, kv_heads, d)), \
        qkv.new_empty((t, kv_heads, d))


@torch.library.custom_op("qwen_vl::silu_mul", mutates_args=())
def silu_mul(x: torch.Tensor) -> torch.Tensor:
    if _backend == "triton":
        return _triton().silu_mul(x)
    return ref_silu_mul(x)


@silu_mul.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("qwen_vl::paged_decode", mutates_args=("kp", "vp"))
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor,
                    vp: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                    q_start: torch.Tensor, kv_len: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    if _backend == "triton":
        write_kv(k, v, kp, vp, slots)
        b = q.shape[0]
        return _triton().paged_attention(q.unsqueeze(1), kp, vp, tables, q_start, kv_len,
                                         scale).view(b, -1)
    return ref_paged_attention(q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale)


@paged_attention.register_fake
def _(q, k, v, kp, vp, slots, tables, q_start, kv_len, mask, scale):
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


class _Reference:
    """The five ops as their references, called directly.  What the custom ops run on
    the torch backend anyway, without the dispatcher around each call (~5 us a call,
    measured on the CPU: 5 calls per layer per decode step, ~5% of the tiny model's
    step); a step being traced by torch.compile keeps the custom ops."""
    rms_norm = staticmethod(ref_rms_norm)
    add_rms_norm = staticmethod(ref_add_rms_norm)
    qk_norm_rope = staticmethod(ref_qk_norm_rope)
    silu_mul = staticmethod(ref_silu_mul)
    paged_attention = staticmethod(ref_paged_attention)


_direct = True


def call_directly(on: bool) -> None:
    """Whether ``ops()`` may hand out the references themselves (default): off, a step
    dispatches one custom op per fused piece on the torch backend too, which is what
    ``bench.step_ops`` counts (the launches a GPU's step makes; the references' own aten
    ops are the same either way)."""
    global _direct
    _direct = on


def ops():
    """The ops a decode step calls now: the custom ops (Triton, a traced step, or
    ``call_directly(False)``), else the references directly (``_Reference``)."""
    if _backend == "torch" and _direct and not torch.compiler.is_compiling():
        return _Reference
    return _CUSTOM


def paged_attention_in_place(q, kp, vp, tables, q_start, kv_len, scale: float):
    """The Triton kernel alone (keys/values already in the pool): ``q`` ``[B, Q, heads,
    D]`` -> ``[B, Q, heads, D]``; the prefill's attention over cached prefixes."""
    return _triton().paged_attention(q, kp, vp, tables, q_start, kv_len, scale)


def write_kv(k, v, kp, vp, slots):
    """New keys/values ``[..., kv_heads, D]`` (one row per slot, in order) into one
    layer's pool at ``slots``: the write of every attention path, reference or Triton."""
    h, d = k.shape[-2:]
    for new, pool in ((k, kp), (v, vp)):
        new = new.reshape(-1, h, d)
        # (no dispatch for a cast to the dtype it has: two per layer per step)
        pool.view(-1, h, d).index_copy_(0, slots, new if new.dtype == pool.dtype
                                        else new.to(pool.dtype))


# --- choosing ------------------------------------------------------------------------------

def select(setting: str, device: torch.device) -> tuple[str, str]:
    """The backend for ``setting`` ("auto", "torch" or "triton") on ``device``, switched
    on; returns it and why.  "triton" on the CPU needs ``TRITON_INTERPRET=1``."""
    if setting == "torch":
        use("torch")
        return "torch", "--kernels torch"
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        use("torch")
        why = "no Triton on the CPU" + (" (--kernels triton needs TRITON_INTERPRET=1 there)"
                                        if setting == "triton" else "")
        return "torch", why
    try:
        use("triton")
        worst = _triton().self_check(device)
    except Exception as exc:  # no C compiler, an unsupported GPU, a wrong result...
        use("torch")
        return "torch", f"Triton kernels unavailable ({type(exc).__name__}: {exc})"
    return "triton", f"Triton kernels match the reference (largest relative error {worst:.1e})"


_CUSTOM = sys.modules[__name__]  # the custom ops above, as ``ops()`` hands them out
