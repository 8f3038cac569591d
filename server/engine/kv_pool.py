"""Static KV storage: one pool of fixed-size blocks allocated once, a block manager with
a prefix cache, and the attention function that reads and writes the pool.

Contract:

* ``KVPool(model, num_blocks, block_size, device)`` allocates every layer's keys and
  values once: ``k``/``v`` of shape ``[layers, num_blocks + 1, block_size, kv_heads,
  head_dim]``.  Block 0 is a scratch block never handed out: padding tokens write there
  and padding rows read it, so every index stays in range without a branch.
* A forward pass runs inside ``pool.step(ctx)``: ``StepInputs`` say, per row, which
  blocks hold its context (``tables``, ``[B, nb]``), where its new tokens start
  (``q_start``) and how long its context is with them (``kv_len``).  Slots for the new
  tokens and the attention mask are derived from those on the device (no host sync, no
  data-dependent shape), so the same code captures into a CUDA graph.
* ``paged_attention`` is registered with transformers' ``AttentionInterface`` under
  ``ATTN_NAME``; the text model's config is switched to it (``install``), so the model
  classes stay transformers' own: each layer's attention writes its new keys/values into
  the pool (``index_copy_``), gathers the rows' blocks and runs SDPA over them with the
  mask.  Outside ``pool.step`` (``generate()`` of the sequential baseline, the startup
  comparison) it is plain SDPA.
* ``BlockManager`` hands out block ids, keeps reference counts (``n > 1`` choices share
  their prompt's full blocks) and the prefix cache: a full prompt block whose keys and
  values are written is registered under a hash chain over its tokens (image tokens
  keyed by the image's content key), so a later prompt with the same prefix reuses it.
  Unused cached blocks are evicted least recently used first, and only up to
  ``cache_blocks`` of them are kept; a block in use is never evicted.  ``promise``
  reserves blocks a row will need later (its generated tokens), so admission never
  over-commits and no running row is ever preempted.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine import kernels
from server.engine.transfer import to_device

ATTN_NAME = "qwen_vl_paged"


# --- the pool and the attention function -------------------------------------------------

@dataclass
class StepInputs:
    """Per-row layout of one forward pass (device tensors, long)."""
    tables: torch.Tensor   # [B, nb] block ids of each row's context (0 = scratch)
    q_start: torch.Tensor  # [B] position in the row's context of its first new token
    kv_len: torch.Tensor   # [B] context length including the new tokens (>= 1)


class _Ctx:
    """What the attention function reads during one forward pass."""
    __slots__ = ("pool", "slots", "rows", "mask", "fresh", "q_start", "kv_len")

    def __init__(self, pool, slots, rows, mask, fresh=False, q_start=None, kv_len=None):
        self.pool, self.slots, self.rows, self.mask = pool, slots, rows, mask
        self.fresh = fresh  # one row, its context is exactly the new tokens
        self.q_start, self.kv_len = q_start, kv_len  # what the Triton kernel reads


_local = threading.local()  # the step in progress on this thread (another thread may be
                            # running generate() on the same model: it must see none)


class KVPool:
    def __init__(self, model, num_blocks: int, block_size: int, device):
        cfg = model.config.get_text_config()
        self.layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:  # quantised weights: the cache is in the compute dtype
            dtype = torch.float16
        self.dtype, self.device = dtype, torch.device(device)
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (self.layers, num_blocks + 1, block_size, self.kv_heads, self.head_dim)
        # zeros: padding reads scratch/free blocks under the mask; they must hold no NaN
        self.k, self.v = _zeros(shape, dtype, self.device), _zeros(shape, dtype, self.device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def clear(self, blocks: list[int]):
        """Zero ``blocks`` in every layer, before a new owner uses them.  A row's last
        block holds, past its length, whatever an earlier owner wrote; attention masks
        those columns, but a masked column still multiplies its value by 0, and a
        non-finite value left by another request (an fp16 overflow) would turn this row's
        output into NaN.  Two kernels for all the blocks (one ``index_fill_`` each for
        keys and values), their index copied up once without a stall (pinned memory,
        ``non_blocking``), where one ``zero_`` per block and tensor cost ~260 launches for
        a photo's prompt."""
        if not blocks:
            return
        index = to_device(torch.tensor(blocks, dtype=torch.long), self.k.device)
        self.k.index_fill_(1, index, 0)
        self.v.index_fill_(1, index, 0)

    def copy_block(self, src: int, dst: int):
        """Every layer's block ``src`` into ``dst`` (a forked choice's partial block)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    @contextlib.contextmanager
    def step(self, inp: StepInputs, q_len: int, *, fresh: bool = False):
        """Route the text model's attention through this pool for one forward pass of
        ``q_len`` new tokens per row (rows shorter than that are right-padded).
        ``fresh``: one row whose context is exactly these tokens (a prompt's first chunk):
        attention is plain causal over them, SDPA's fastest path, with nothing gathered."""
        slots, mask = self.layout(inp, q_len)
        ctx = _Ctx(self, slots, inp.tables, mask, fresh, inp.q_start, inp.kv_len)
        prev, _local.ctx = getattr(_local, "ctx", None), ctx
        try:
            yield ctx
        finally:
            _local.ctx = prev

    def layout(self, inp: StepInputs, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the new tokens ``[B * q_len]`` and the boolean mask ``[B, 1, q_len,
        nb * block_size]``, from device tensors only.  A padding query (past ``kv_len``)
        writes the scratch slot and attends what the row's last real token attends, so
        its values stay finite."""
        return self._layout_one(inp) if q_len == 1 else self._layout_any(inp, q_len)

    def _layout_any(self, inp: StepInputs, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs, dev = self.block_size, inp.tables.device
        b, nb = inp.tables.shape
        ar = torch.arange(q_len, device=dev)
        pos = inp.q_start.view(-1, 1) + ar.view(1, -1)                   # [B, q]
        valid = pos < inp.kv_len.view(-1, 1)
        blk = inp.tables.gather(1, (pos // bs).clamp(max=nb - 1))
        slots = torch.where(valid, blk * bs + pos % bs, torch.zeros_like(pos)).view(-1)
        qpos = torch.minimum(pos, inp.kv_len.view(-1, 1) - 1)
        keys = torch.arange(nb * bs, device=dev)
        mask = (keys.view(1, 1, -1) <= qpos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, q, T]
        return slots, mask

    def _layout_one(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``layout`` of one query per row (a decode step, or one-token chunks): each row's
        query is a real token, so there is no padding query to route; half the ops of the
        general case, the same slots and mask (a test compares them)."""
        bs = self.block_size
        b, nb = inp.tables.shape
        keys = torch.arange(nb * bs, device=inp.tables.device)
        pos = inp.q_start
        blk = inp.tables.gather(1, (pos // bs).view(-1, 1)).view(-1)
        mask = (keys.view(1, -1) <= pos.view(-1, 1)).view(b, 1, 1, -1)
        return blk * bs + pos % bs, mask


def _zeros(shape, dtype, device) -> torch.Tensor:
    """Zeros; on CPU from ``calloc`` (via numpy), so pages are committed only when a block
    is first written: a large CPU budget costs what is used (tests start many engines)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np
    raw = np.zeros(math.prod(shape) * torch.finfo(dtype).bits // 8, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    ctx = getattr(_local, "ctx", None)
    if ctx is None:  # not an engine step: the model's ordinary SDPA path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    pool, layer = ctx.pool, module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        # under torch.compile the pool write must stay an in-place write into the pool:
        # traced, it would be functionalised into a copy of the whole pool per layer
        out = _paged_op(query, key, value, pool.k[layer], pool.v[layer], ctx.slots,
                        ctx.rows, ctx.mask, scale, ctx.fresh, ctx.q_start, ctx.kv_len)
    else:
        out = _paged(query, key, value, pool.k[layer], pool.v[layer], ctx.slots, ctx.rows,
                     ctx.mask, scale, ctx.fresh, ctx.q_start, ctx.kv_len)
    return out, None


def _paged(query, key, value, kp, vp, slots, rows, mask, scale: float, fresh: bool,
           q_start=None, kv_len=None):
    """Write the new keys/values into one layer's pool ``kp``/``vp`` (``[N + 1, bs, H,
    D]``) at ``slots``, then attend each row's blocks ``rows`` under ``mask``; returns
    ``[B, q, heads, D]`` (contiguous).  With the Triton kernels on (server/engine/
    kernels.py) the blocks are read where they are, from ``q_start``/``kv_len``; the
    gather below is their reference twin and the CPU's path."""
    b, h, q, d = key.shape
    kernels.write_kv(key.transpose(1, 2), value.transpose(1, 2), kp, vp, slots)
    if not fresh and q_start is not None and kernels.backend() == "triton":
        return kernels.paged_attention_in_place(query.transpose(1, 2), kp, vp, rows,
                                                q_start, kv_len, scale)
    if fresh:
        out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype),
                                             is_causal=True, scale=scale,
                                             enable_gqa=query.shape[1] != h)
        return out.transpose(1, 2).contiguous()
    idx = rows.reshape(-1)
    t = rows.shape[1] * kp.shape[1]
    k = _as(_gather(kp, idx, 0).view(b, t, h, d).transpose(1, 2), query.dtype)
    v = _as(_gather(vp, idx, 1).view(b, t, h, d).transpose(1, 2), query.dtype)
    heads = query.shape[1]
    rep = heads // h
    if rep > 1:
        # grouped-query attention without copying K/V once per query head: query head
        # kv * rep + r reads KV head kv (HF's repeat_kv), so the rep query heads of a KV
        # head become rep x q query rows of one attention over that head (with one query
        # per row, the row's mask [B, 1, 1, T] already broadcasts over them)
        query = query.reshape(b, h, rep * q, d)
        if q > 1:
            mask = mask.unsqueeze(2).expand(b, 1, rep, q, t).reshape(b, 1, rep * q, t)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous()


_gathered = threading.local()  # per thread: the two reusable gather buffers (CPU)
_KEEP_BYTES = 256 << 20       # the largest gather a buffer is kept for


def _gather(layer_pool: torch.Tensor, idx: torch.Tensor, which: int) -> torch.Tensor:
    """``layer_pool.index_select(0, idx)``.  On the CPU into a buffer kept per thread and
    reused by every layer and step (``which``: 0 keys, 1 values): a fresh gather of a few
    MiB or more is a fresh ``mmap`` that the kernel zero-fills page by page, which cost
    ~12x the copy itself (mid-size model, 64 rows: 14.5 vs 1.2 ms per gather).  The buffer
    grows to the largest gather seen up to ``_KEEP_BYTES``; a larger one (a long prompt's
    chunk over wide rows) is gathered fresh rather than held for good.  Elsewhere the
    caching allocator (and a CUDA graph's static memory) already reuse memory: a plain
    gather; so does a call outside inference mode (every engine step runs inside it; the
    buffer is an inference tensor, which nothing outside may write, and autograd does
    not take ``out=``)."""
    shape = (idx.numel(),) + tuple(layer_pool.shape[1:])
    need = math.prod(shape)
    if layer_pool.device.type != "cpu" or not torch.is_inference_mode_enabled() \
            or need * layer_pool.element_size() > _KEEP_BYTES:
        return layer_pool.index_select(0, idx)
    bufs = getattr(_gathered, "bufs", None)
    if bufs is None:
        bufs = _gathered.bufs = [None, None]
    buf = bufs[which]
    if buf is None or buf.numel() < need or buf.dtype != layer_pool.dtype:
        buf = bufs[which] = layer_pool.new_empty(need)
    return torch.index_select(layer_pool, 0, idx, out=buf[:need].view(shape))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without a dispatch when it is one already (four per layer per step)."""
    return x if x.dtype == dtype else x.to(dtype)


@torch.library.custom_op("qwen_vl::paged_attention", mutates_args=("kp", "vp"))
def _paged_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              kp: torch.Tensor, vp: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
              mask: torch.Tensor, scale: float, fresh: bool, q_start: torch.Tensor,
              kv_len: torch.Tensor) -> torch.Tensor:
    return _paged(query, key, value, kp, vp, slots, rows, mask, scale, fresh, q_start, kv_len)


@_paged_op.register_fake
def _(query, key, value, kp, vp, slots, rows, mask, scale, fresh, q_start, kv_len):
    b, heads, q, d = query.shape
    return query.new_empty((b, q, heads, d))


def install(model) -> None:
    """Register ``paged_attention`` and switch the text model to it (the vision tower
    keeps its own attention)."""
    from transformers import AttentionInterface
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # generate() builds SDPA masks
    except ImportError:  # pragma: no cover - older 5.x keep masks by name elsewhere
        pass
    AttentionInterface.register(ATTN_NAME, paged_attention)
    text = model.model.language_model
    text.config._attn_implementation = ATTN_NAME
    for layer in text.layers:  # the layers hold the same config object; be sure
        layer.self_attn.config._attn_implementation = ATTN_NAME


# --- blocks ------------------------------------------------------------------------------

def chain_keys(entries: list, block_size: int, salt: str = "") -> list[bytes]:
    """Hash chain over the full blocks of ``entries`` (token ids, image tokens replaced
    by their image's key): block i's key covers blocks 0..i.  A cryptographic hash, not
    Python's ``hash``: a client must not be able to craft a block that collides with
    another client's cached prefix (vLLM's CVE-2025-25183).  ``salt`` (the tenant) seeds
    the chain: equal prompts of two tenants share no block (vLLM's ``cache_salt``)."""
    keys = []
    h = hashlib.blake2b(b"salt:" + salt.encode(), digest_size=16).digest() if salt else b""
    for i in range(len(entries) // block_size):
        block = repr(tuple(entries[i * block_size:(i + 1) * block_size])).encode()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        keys.append(h)
    return keys


class NoBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, cache_blocks: int = 0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cache_blocks = cache_blocks          # 0: prefix cache off
        self.free: list[int] = list(range(num_blocks, 0, -1))  # never-cached blocks; pop() = 1 first
        self.ref = [0] * (num_blocks + 1)
        self.key_of: dict[int, bytes] = {}         # block -> chain key (cached content)
        self.block_of: dict[bytes, int] = {}       # chain key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, unused: LRU first
        self.promised = 0                          # blocks reserved for rows' future tokens
        # statistics (tokens)
        self.query_tokens = self.hit_tokens = 0
        self.evicted = 0                           # cached blocks reused for new content

    # --- accounting ----------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks that could be handed out now without breaking a promise."""
        return len(self.free) + len(self.idle) - self.promised

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free) - len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    # --- prefix cache --------------------------------------------------------------------
    def match(self, keys: list[bytes], limit: int) -> list[int]:
        """The cached blocks of the longest prefix of ``keys`` (at most ``limit`` blocks),
        taken: their reference counts rise, so they cannot be evicted."""
        got: list[int] = []
        if self.cache_blocks:
            for key in keys[:limit]:
                blk = self.block_of.get(key)
                if blk is None:
                    break
                got.append(blk)
            for blk in got:
                self._take(blk)
        return got

    def count(self, query_tokens: int, hit_tokens: int):
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def commit(self, block: int, key: bytes):
        """``block`` now holds the full prompt block keyed ``key``."""
        if self.cache_blocks and key not in self.block_of and block not in self.key_of:
            self.key_of[block] = key
            self.block_of[key] = block

    # --- allocation ----------------------------------------------------------------------
    def allocate(self, n: int, *, promised: bool = False) -> list[int]:
        """``n`` fresh blocks; ``promised``: taken from what was promised earlier."""
        if promised:
            self.promised -= n
        if len(self.free) + len(self.idle) < n:
            if promised:
                self.promised += n
            raise NoBlocks(f"{n} KV blocks needed, {len(self.free) + len(self.idle)} free")
        out = []
        for _ in range(n):
            if self.free:
                blk = self.free.pop()
            else:  # evict the least recently used cached block
                blk, _ = self.idle.popitem(last=False)
                self._forget(blk)
                self.evicted += 1
            self.ref[blk] = 1
            out.append(blk)
        return out

    def promise(self, n: int):
        self.promised += n

    def unpromise(self, n: int):
        self.promised -= n

    def fork(self, blocks: list[int]):
        """Another owner for ``blocks`` (shared full prompt blocks of n > 1 choices)."""
        for blk in blocks:
            self.ref[blk] += 1

    def release(self, blocks: list[int]):
        for blk in blocks:
            self.ref[blk] -= 1
            if self.ref[blk]:
                continue
            if blk in self.key_of:
                self.idle[blk] = None  # most recently used last
            else:
                self.free.append(blk)
        while len(self.idle) > self.cache_blocks:
            blk, _ = self.idle.popitem(last=False)
            self._forget(blk)
            self.free.append(blk)

    def _take(self, blk: int):
        if self.ref[blk] == 0:
            self.idle.pop(blk, None)
        self.ref[blk] += 1

    def _forget(self, blk: int):
        key = self.key_of.pop(blk, None)
        if key is not None and self.block_of.get(key) == blk:
            del self.block_of[key]

    def stats(self) -> dict[str, float]:
        return {"kv_blocks_used": self.used, "kv_blocks_free": len(self.free) + len(self.idle),
                "kv_blocks_cached": len(self.key_of),
                "prefix_cache_query_tokens": self.query_tokens,
                "prefix_cache_hit_tokens": self.hit_tokens}
