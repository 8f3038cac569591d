"""Triton kernels for the decode step's fused pieces (the ``triton`` backend of
server/engine/kernels.py).

Contract (every function takes and returns torch tensors on one device; float32,
bfloat16 or float16; math in float32, results stored in the input's dtype; sizes need not
be powers of two: each kernel works on a power-of-two tile with masks):

* ``rms_norm(x [T, H], w [H], eps) -> [T, H]``: ``F.rms_norm`` (Qwen3's ``w * x *
  rsqrt(mean(x^2) + eps)``).
* ``add_rms_norm(x, residual, w, eps) -> (rms_norm(r), r)`` with ``r = x + residual``
  rounded to the input dtype (as torch's add), the norm taken of the rounded ``r``.
* ``qk_norm_rope(qkv [T, (heads + 2 kv_heads) D], q_w [D], k_w [D], cos [T, D], sin [T, D],
  eps, heads, kv_heads) -> (q [T, heads, D], k [T, kv_heads, D], v [T, kv_heads, D])``:
  per-head RMSNorm of q and k, then rotary ``x cos + rotate_half(x) sin``; v copied out.
  All three are new contiguous tensors; ``qkv`` may be a row-strided view.
* ``silu_mul(x [T, 2I]) -> silu(x[:, :I]) * x[:, I:]``.
* ``paged_attention(q [B, Q, heads, D], kp, vp [N + 1, bs, kv_heads, D], tables [B, nb],
  q_start [B], kv_len [B], scale) -> [B, Q, heads, D]``: query ``i`` of row ``b`` sits at
  position ``q_start[b] + i`` and attends the row's keys ``0 .. min(q_start[b] + i,
  kv_len[b] - 1)``; key ``p`` lives in block ``tables[b, p // bs]`` at offset ``p % bs``.
  The new tokens' keys/values are in the pool already.  Queries past ``kv_len`` (padding)
  attend what the row's last real query attends, so they stay finite.  Query head ``h``
  reads KV head ``h // (heads // kv_heads)``.  Read in place (no gather), flash-attention
  style online softmax, each row's blocks only up to what its queries need.
* ``self_check(device) -> float``: every kernel against the torch references on small
  random inputs; raises ``RuntimeError`` on a mismatch, returns the largest relative error.

Only stable Triton API (load/store/dot/reductions, ``constexpr``), no TMA/descriptors: the
GPU box runs Triton 3.6, these tests run 3.7's interpreter.

On the CPU the kernels run under Triton's interpreter, which needs ``TRITON_INTERPRET=1``
in the environment *before ``triton`` is first imported* in the process: ``@triton.jit``
reads it when it decorates, and ``triton.language``'s own jit helpers (``tl.sum``,
``tl.max``, ``tl.zeros``, ``tl.cdiv``...) are decorated at ``import triton``.  A process
that imported triton without it cannot interpret (tests/test_kernels.py runs the kernels
in a child process for that reason).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# --- tiles -----------------------------------------------------------------------------------
#
# Paged attention: one program per (row, KV head, tile of query rows[, split of keys]).
# The M dimension of the dots is the tile's (query, query head) pairs of one KV head
# (query-major: pair g is query g // rep, head kv * rep + g % rep), so one K/V load serves
# every query head of that KV head (GQA) and a decode step (Q = 1) still fills M >= 16,
# the smallest MMA tile.  BLOCK_M = next power of two of Q * rep, between 16 and 128:
# 16 for decode (rep 2: 2 of 16 rows used; decode is bound by reading K/V, so the idle
# rows cost MMA time only, which is not the bottleneck), 128 for prefill chunks (the usual
# FA2 tile on H100/H200, 8 warps).  BLOCK_N = 64 keys per iteration: four 16-token pool
# blocks; a [64, 128] bf16 K or V tile is 16 KiB, two stages of K and V fit shared memory
# easily.  The block id is looked up per key, so any pool block size works.  float32
# inputs (the self check, a float32 model) halve both (64 x 32): float32 tiles are twice
# the bytes, and 128 x 128 + staged 64 x 128 K/V tiles would not fit shared memory.
# Under the interpreter a bfloat16 ``tl.dot`` is wrong (Triton 3.7's interpreter keeps
# bfloat16 as raw uint16 and ``np.matmul``s the bit patterns), so there (UPCAST_DOT) the
# operands are rounded to bfloat16 as on the GPU, then multiplied in float32: bf16 x bf16
# products are exact in float32, the same values a tensor core accumulates.
# Split-K (flash-decoding): when the grid has fewer programs than ~2 per SM (a small decode
# batch over a long context), each program takes 1/S of the keys and a second kernel merges
# the partial softmaxes.  S depends on shapes only (never on kv_len values: no host sync,
# CUDA-graph safe).
_BLOCK_N, _BLOCK_N_F32 = 64, 32
_MAX_BLOCK_M, _MAX_BLOCK_M_F32 = 128, 64
_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 512
_LOG2E = 1.4426950408889634


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _row_warps(block: int) -> int:
    # one row per program: keep ~8-32 elements per thread
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _interpreted() -> bool:
    """Whether this module's kernels were decorated for Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_rms_norm_kernel, InterpretedFunction)


def _check_device(*ts: torch.Tensor) -> None:
    """A clear error where a launch would fail obscurely: CPU tensors but kernels compiled
    for a GPU (TRITON_INTERPRET was not set before triton was imported)."""
    if ts[0].device.type == "cpu":
        if not _interpreted():
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set "
                               "before triton is first imported in the process")
    dev = ts[0].device
    for t in ts[1:]:
        if t.device != dev:
            raise ValueError(f"tensors on {dev} and {t.device}")


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --- RMSNorm ---------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, r_out_ptr,
                     stride_x, stride_res, stride_out, stride_r_out, H, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: T * H may pass 2^31
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        r = x.to(r_out_ptr.dtype.element_ty)
        tl.store(r_out_ptr + row * stride_r_out + cols, r, mask=ok)
        x = r.to(tl.float32)  # normalise the residual as stored (torch rounds the add)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty),
             mask=ok)


def _norm(x, residual, w, eps):
    t, h = x.shape
    x = _last_contig(x)
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if residual is None:
        res, r_out = x, out  # unused (HAS_RES is off): any valid pointers
    else:
        res = _last_contig(residual)
        r_out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t:
        block = _pow2(h)
        _rms_norm_kernel[(t,)](x, res, w.contiguous(), out, r_out,
                               x.stride(0), res.stride(0), out.stride(0), r_out.stride(0),
                               h, float(eps), HAS_RES=residual is not None, BLOCK=block,
                               num_warps=_row_warps(block))
    return out, r_out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    _check_device(x, w)
    return _norm(x, None, w, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(x, residual, w)
    if residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return _norm(x, residual, w, eps)


# --- q/k norm + rotary -----------------------------------------------------------------------

@triton.jit
def _norm_rope_head(src, w_ptr, dst, c, s, d, partner, ok, eps,
                    D: tl.constexpr, HALF: tl.constexpr):
    # rotate_half(y)[d] = -y[d + D/2] (d < D/2), y[d - D/2] (d >= D/2): the partner lane is
    # loaded a second time (an L1 hit) rather than shuffled between registers
    x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * rstd * tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    yp = xp * rstd * tl.load(w_ptr + partner, mask=ok, other=0.0).to(tl.float32)
    rot = tl.where(d < HALF, -yp, yp)
    tl.store(dst + d, (y * c + rot * s).to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                         stride_qkv, stride_cos, stride_sin, eps, HEADS, KV_HEADS,
                         D: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (T, heads + kv_heads): a program per q head, or per KV head (its k and its v)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    c = tl.load(cos_ptr + t * stride_cos + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + d, mask=ok, other=0.0).to(tl.float32)
    row = qkv_ptr + t * stride_qkv
    if h < HEADS:
        _norm_rope_head(row + h * D, qw_ptr, q_ptr + (t * HEADS + h) * D, c, s, d, partner,
                        ok, eps, D, HALF)
    else:
        kh = h - HEADS
        _norm_rope_head(row + (HEADS + kh) * D, kw_ptr, k_ptr + (t * KV_HEADS + kh) * D,
                        c, s, d, partner, ok, eps, D, HALF)
        v = tl.load(row + (HEADS + KV_HEADS + kh) * D + d, mask=ok, other=0.0)
        tl.store(v_ptr + (t * KV_HEADS + kh) * D + d, v.to(v_ptr.dtype.element_ty), mask=ok)


def qk_norm_rope(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, heads: int, kv_heads: int):
    _check_device(qkv, q_w, k_w, cos, sin)
    t, d = qkv.shape[0], q_w.shape[0]
    if qkv.shape[1] != (heads + 2 * kv_heads) * d or d % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [T, ({heads} + 2 * {kv_heads}) * "
                         f"{d}] with an even head dim")
    qkv, cos, sin = _last_contig(qkv), _last_contig(cos), _last_contig(sin)
    q = torch.empty((t, heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, kv_heads, d), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty((t, kv_heads, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        _qk_norm_rope_kernel[(t, heads + kv_heads)](
            qkv, q_w.contiguous(), k_w.contiguous(), cos, sin, q, k, v,
            qkv.stride(0), cos.stride(0), sin.stride(0), float(eps), heads, kv_heads,
            D=d, HALF=d // 2, BLOCK_D=_pow2(d), num_warps=1 if d <= 128 else 2)
    return q, k, v


# --- SiLU * up ------------------------------------------------------------------------------

@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=ok, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u  # exp overflow for g << 0 gives g / inf = -0: fine
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    _check_device(x)
    t, two_i = x.shape
    i = two_i // 2
    x = _last_contig(x)
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t and i:
        block = min(1024, _pow2(i))
        _silu_mul_kernel[(t, triton.cdiv(i, block))](x, out, x.stride(0), out.stride(0), i,
                                                     BLOCK=block, num_warps=4)
    return out


# --- paged attention ------------------------------------------------------------------------

@triton.jit
def _paged_attn_kernel(q_ptr, kp_ptr, vp_ptr, tab_ptr, qs_ptr, kvl_ptr, out_ptr,
                       part_ptr, ml_ptr,
                       stride_qb, stride_qq, stride_qh,
                       stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_tab,
                       Q, HEADS, KV_HEADS, REP, qk_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, IS_F32: tl.constexpr,
                       UPCAST_DOT: tl.constexpr):
    rows = Q * REP
    # the last tiles (latest queries, longest causal span) first: the heavy programs start
    # early and the short ones fill the tail of the wave
    tile = tl.cdiv(rows, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // KV_HEADS).to(tl.int64)
    kvh = bh % KV_HEADS
    split = tl.program_id(2)

    g = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = g < rows
    qi = g // REP                    # query index in the chunk
    hq = kvh * REP + g % REP         # its query head
    q_start = tl.load(qs_ptr + b).to(tl.int32)  # positions fit 32 bits: cheaper index math
    kv_len = tl.load(kvl_ptr + b).to(tl.int32)
    # causal limit (inclusive); a padding query (past kv_len) stops at the last real key
    limit = tl.minimum(q_start + qi, kv_len - 1)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + qi[:, None] * stride_qq + hq[:, None] * stride_qh
                + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # keys this tile needs: up to the largest limit among its real rows
    last_q = (tl.minimum(tile * BLOCK_M + BLOCK_M, rows) - 1) // REP
    n_keys = tl.minimum(q_start + last_q, kv_len - 1) + 1
    if NUM_SPLITS == 1:
        lo = 0
        hi = n_keys
    else:
        per = tl.cdiv(tl.cdiv(n_keys, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = split * per
        hi = tl.minimum(lo + per, n_keys)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        key_ok = p < hi
        blk = tl.load(tab_ptr + b * stride_tab + p // BS, mask=key_ok, other=0).to(tl.int64)
        tok = p % BS
        kv_ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(kp_ptr + blk[:, None] * stride_kb + tok[:, None] * stride_kt
                    + kvh * stride_kh + d[None, :], mask=kv_ok, other=0.0)
        if IS_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        elif UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(q.dtype).to(tl.float32)),
                       input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = s * qk_scale  # base-2 logits: exp2 below
        visible = (p[None, :] <= limit[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with no visible key yet (only possible in a later split) keeps m = -inf:
        # subtract 0 instead so that exp2(-inf - -inf) never makes a NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        pr = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(vp_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vt
                    + kvh * stride_vh + d[None, :], mask=kv_ok, other=0.0)
        if IS_F32:
            acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        elif UPCAST_DOT:  # the same rounding of p as below, then exact products
            acc = acc * alpha[:, None] + tl.dot(pr.to(q.dtype).to(tl.float32),
                                                v.to(q.dtype).to(tl.float32),
                                                input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    o_row = (b * Q + qi) * HEADS + hq  # [B, Q, heads] flattened
    st_ok = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + o_row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=st_ok)
    else:
        slot = o_row * NUM_SPLITS + split
        tl.store(part_ptr + slot[:, None] * D + d[None, :], acc, mask=st_ok)
        tl.store(ml_ptr + slot * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, out_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    # one program per (row, query, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < NUM_SPLITS
    m = tl.load(ml_ptr + (r * NUM_SPLITS + sp) * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ml_ptr + (r * NUM_SPLITS + sp) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # an empty split (m = -inf) weighs 0
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.load(part_ptr + (r * NUM_SPLITS + sp[:, None]) * D + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no parallelism to fill
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


def _num_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Key splits per program: enough for ~2 programs per SM, each split at least
    ``_MIN_KEYS_PER_SPLIT`` of the widest context the tables allow (shapes only)."""
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), max_keys // _MIN_KEYS_PER_SPLIT,
                      _MAX_SPLITS))


def paged_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, tables: torch.Tensor,
                    q_start: torch.Tensor, kv_len: torch.Tensor, scale: float, *,
                    block_m: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """See the module docstring.  ``block_m`` / ``num_splits`` override the tile choice
    (tests; ``block_m`` a power of two >= 16)."""
    _check_device(q, kp, vp, tables, q_start, kv_len)
    b, nq, heads, d = q.shape
    _, bs, kv_heads, dk = kp.shape
    if dk != d or vp.shape != kp.shape or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the pool {tuple(kp.shape)} / "
                         f"{tuple(vp.shape)}")
    rep = heads // kv_heads
    q, kp, vp = _last_contig(q), _last_contig(kp), _last_contig(vp)
    tables = _last_contig(tables)
    q_start, kv_len = q_start.contiguous(), kv_len.contiguous()
    out = torch.empty((b, nq, heads, d), dtype=q.dtype, device=q.device)
    if not (b and nq):
        return out
    rows = nq * rep
    f32 = q.dtype == torch.float32
    bm = block_m or min(_MAX_BLOCK_M_F32 if f32 else _MAX_BLOCK_M, _pow2(rows, 16))
    tiles = triton.cdiv(rows, bm)
    splits = num_splits or _num_splits(tiles * b * kv_heads, tables.shape[1] * bs, q.device)
    if splits > 1:
        part = torch.empty((b * nq * heads * splits * d,), dtype=torch.float32, device=q.device)
        ml = torch.empty((b * nq * heads * splits * 2,), dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    block_d = _pow2(d, 16)
    _paged_attn_kernel[(tiles, b * kv_heads, splits)](
        q, kp, vp, tables, q_start, kv_len, out, part, ml,
        q.stride(0), q.stride(1), q.stride(2),
        kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), tables.stride(0),
        nq, heads, kv_heads, rep, float(scale) * _LOG2E,
        D=d, BLOCK_D=block_d, BS=bs, BLOCK_M=bm, BLOCK_N=_BLOCK_N_F32 if f32 else _BLOCK_N,
        NUM_SPLITS=splits, IS_F32=f32,
        UPCAST_DOT=_interpreted() and q.dtype == torch.bfloat16,
        num_warps=8 if bm >= 128 else 4, num_stages=2)
    if splits > 1:
        _merge_splits_kernel[(b * nq * heads,)](part, ml, out, D=d, BLOCK_D=block_d,
                                                NUM_SPLITS=splits, BLOCK_S=_pow2(splits),
                                                num_warps=4)
    return out


# --- self check ------------------------------------------------------------------------------

def ref_layout(tables: torch.Tensor, q_start: torch.Tensor, kv_len: torch.Tensor, q_len: int,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots ``[B * q_len]`` and mask ``[B, 1, q_len, nb * bs]``: the formula of
    ``KVPool._layout_any`` (without a pool), for the reference attention."""
    bs, dev = block_size, tables.device
    nb = tables.shape[1]
    pos = q_start.view(-1, 1) + torch.arange(q_len, device=dev).view(1, -1)
    valid = pos < kv_len.view(-1, 1)
    blk = tables.gather(1, (pos // bs).clamp(max=nb - 1))
    slots = torch.where(valid, blk * bs + pos % bs, torch.zeros_like(pos)).view(-1)
    qpos = torch.minimum(pos, kv_len.view(-1, 1) - 1)
    keys = torch.arange(nb * bs, device=dev)
    return slots, (keys.view(1, 1, -1) <= qpos.unsqueeze(-1)).unsqueeze(1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def paged_case(device, dtype, *, batch, q_len, heads, kv_heads, d, bs, q_start, kv_len,
               seed=0, num_blocks=None):
    """Random pool, shuffled block tables and new tokens for one paged-attention check;
    returns ``(q [B, Q, heads, D], kp, vp, tables, q_start, kv_len, reference output
    [B, Q, heads, D], real [B, Q] bool)`` with the new keys already written (by the
    reference, ``kv_pool._paged``)."""
    from server.engine.kv_pool import _paged
    gen = torch.Generator().manual_seed(seed)
    q_start = torch.tensor(q_start, dtype=torch.long)
    kv_len = torch.tensor(kv_len, dtype=torch.long)
    need = [(int(n) + bs - 1) // bs for n in kv_len]
    nb = max(need)
    total = sum(need)
    num_blocks = num_blocks or total + 3
    ids = (torch.randperm(num_blocks, generator=gen)[:total] + 1).tolist()  # never 0
    tables = torch.zeros((batch, nb), dtype=torch.long)
    for r, n in enumerate(need):
        tables[r, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    shape = (num_blocks + 1, bs, kv_heads, d)
    kp = torch.randn(shape, generator=gen).to(dtype)
    vp = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn((batch, heads, q_len, d), generator=gen).to(dtype)
    k = torch.randn((batch, kv_heads, q_len, d), generator=gen).to(dtype)
    v = torch.randn((batch, kv_heads, q_len, d), generator=gen).to(dtype)
    q, k, v, kp, vp = (t.to(device) for t in (q, k, v, kp, vp))
    tables, q_start, kv_len = tables.to(device), q_start.to(device), kv_len.to(device)
    slots, mask = ref_layout(tables, q_start, kv_len, q_len, bs)
    scale = d ** -0.5
    want = _paged(q, k, v, kp, vp, slots, tables, mask, scale, False)  # writes k/v first
    real = (q_start.view(-1, 1) + torch.arange(q_len, device=device).view(1, -1)
            < kv_len.view(-1, 1))
    return q.transpose(1, 2), kp, vp, tables, q_start, kv_len, want, real, scale


def self_check(device) -> float:
    """Every kernel on small random inputs on ``device`` against the references; the
    largest relative error, or ``RuntimeError`` naming the first mismatch."""
    # the float32 references must not run their matmuls in TF32 (the 1e-4 bound)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _self_check(torch.device(device))
    finally:
        torch.set_float32_matmul_precision(precision)


def _self_check(device: torch.device) -> float:
    from server.engine import kernels as K
    worst = 0.0

    def check(name, dtype, got, want):
        nonlocal worst
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        err = rel_err(got, want)
        if not err <= tol:
            raise RuntimeError(f"Triton {name} ({dtype}) differs from the reference: "
                               f"relative error {err:.2e} > {tol:.0e}")
        worst = max(worst, err)

    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape, dtype):
        return torch.randn(shape, generator=gen).to(dtype).to(device)

    for dtype in (torch.float32, torch.bfloat16):
        t, h, eps = 3, 40, 1e-6
        x, res, w = rnd(t, h, dtype=dtype), rnd(t, h, dtype=dtype), rnd(h, dtype=dtype)
        check("rms_norm", dtype, rms_norm(x, w, eps), K.ref_rms_norm(x, w, eps))
        out, r = add_rms_norm(x, res, w, eps)
        want_out, want_r = K.ref_add_rms_norm(x, res, w, eps)
        check("add_rms_norm residual", dtype, r, want_r)
        check("add_rms_norm", dtype, out, want_out)

        heads, kv_heads, d = 4, 2, 24
        wide = rnd(t, (heads + 2 * kv_heads) * d + 8, dtype=dtype)
        qkv = wide[:, :(heads + 2 * kv_heads) * d]  # a row-strided view, as a split gives
        qw, kw = rnd(d, dtype=dtype), rnd(d, dtype=dtype)
        cos, sin = rnd(t, d, dtype=dtype), rnd(t, d, dtype=dtype)
        got = qk_norm_rope(qkv, qw, kw, cos, sin, eps, heads, kv_heads)
        want = K.ref_qk_norm_rope(qkv, qw, kw, cos, sin, eps, heads, kv_heads)
        for name, a, b in zip("qkv", got, want):
            check(f"qk_norm_rope {name}", dtype, a, b)

        x2 = rnd(t, 2 * 36, dtype=dtype)
        check("silu_mul", dtype, silu_mul(x2), K.ref_silu_mul(x2))

        # GQA (rep 2), mixed lengths: decode (Q = 1), and a chunk over cached prefixes
        # with a shorter row padded to Q; the split-K path as well
        for q_len, q_start, kv_len, splits in (
                (1, [0, 14, 16, 39], [1, 15, 17, 40], None),
                (1, [0, 14, 16, 39], [1, 15, 17, 40], 3),
                (5, [0, 16, 21, 3], [5, 21, 23, 8], None),
                (5, [0, 16, 21, 3], [5, 21, 23, 8], 2)):
            q, kp, vp, tables, qs, kl, want, real, scale = paged_case(
                device, dtype, batch=4, q_len=q_len, heads=4, kv_heads=2, d=16, bs=4,
                q_start=q_start, kv_len=kv_len, seed=q_len)
            got = paged_attention(q, kp, vp, tables, qs, kl, scale, num_splits=splits)
            if not torch.isfinite(got).all():
                raise RuntimeError(f"Triton paged_attention ({dtype}) gave a non-finite value")
            check(f"paged_attention Q={q_len} splits={splits}", dtype, got[real], want[real])
    return worst
