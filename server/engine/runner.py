"""The model runner: steps transformers' Qwen3-VL modules over the paged KV pool.

Contract (the scheduler decides what runs; this module only runs it):

* ``prefill(chunks)``: one forward pass over prompt chunks of several rows (right-padded
  to the longest), writing their keys/values into the rows' blocks and attending each
  row's whole context (cached prefix, earlier chunks, this chunk).  Image tokens take
  the vision encoder's features (and the deepstack features of the first layers) for
  exactly the tokens in the chunk, so an image may span chunk borders.  Returns the
  logits of the last token of each chunk that ends its prompt.
* ``encode(pixel_values, grids, keys)``: the vision encoder, once for all images of a
  step; results are cached per image key (content hash + pixel budget) in a byte-bounded
  LRU, so a resent photo is not encoded again.  The encoder is server/engine/vision.py's
  (one attention call per block, no host sync) once ``check_encoder()`` has matched it
  against the model's own vision forward at startup; else the model's own.
* ``decode(ids, pos, kv_len, tables, widths)``: one token per row (``int64`` arrays the
  scheduler keeps between steps; ``arrays()`` builds them from lists) through a
  static-buffer step: every input lives in one device buffer per (batch bucket,
  table-width bucket), written through numpy (no torch op on the host) and, on CUDA,
  copied up once from pinned memory; the layers are ``fused.FusedDecoder``'s (~9 ops
  each) where the model allows, else transformers' own; slots and masks are computed on the device; logits land in
  a static buffer.  No host sync, no data-dependent shape: on CUDA each bucket's step is
  captured once in a CUDA graph (shared memory pool) and replayed; on CPU, or with
  ``--enforce-eager``, or when capture fails, the same step runs eagerly.  ``decode_path``
  says which ("cuda-graphs" or "eager"), and startup logs it with the reason.
* ``check()``: at startup, the paged path's logits for a short prompt must match the
  model's own forward (transformers' SDPA path): a transformers version that stopped
  routing attention through the registered function fails loudly instead of serving
  garbage.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from server.engine import kernels, vision
from server.engine.fused import FusedDecoder, fuse_weights
from server.engine.kv_pool import KVPool, StepInputs, install
from server.engine.transfer import to_device

log = logging.getLogger("qwen_vl.engine")


# a decode step runs as two forward passes when one pass would gather this many more KV
# tokens per layer (~4 KiB each for the 2B model: 32k x 28 layers, read and written, is a
# few ms on an H200, against ~0.7 ms for reading the weights once more)
SPLIT_MIN_TOKENS = 32768


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond (vLLM-like)."""
    out = [b for b in (1, 2, 4) if b < max_num_seqs]
    b = 8
    while b < max_num_seqs:
        out.append(b)
        b += 8 if b < 64 else 16
    return out + [max_num_seqs]


def prefill_bucket(tokens: int) -> int:
    """A prefill chunk's padded length: a multiple of 64 up to 1,024 tokens, of 256 beyond
    (at most ~44 lengths up to an 8,192-token step; padding under 64 tokens per row, ~6%
    of a full chunk).  Padding queries write the pool's scratch slot (``KVPool.layout``)."""
    step = 64 if tokens <= 1024 else 256
    return -(-tokens // step) * step


def width_buckets(max_blocks: int, smallest: int = 4) -> list[int]:
    """Block-table widths: 4, 6, 8, 12, 16, 24, ... (x1.5 then x4/3): the attention
    gathers at most a third more blocks than a row needs."""
    out, w = [], smallest
    while w < max_blocks:
        out.append(w)
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3
    return out + [max_blocks]


def _pick(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@contextlib.contextmanager
def _gc_collect_skipped():
    collect = gc.collect
    gc.collect = lambda *a, **k: 0
    try:
        yield
    finally:
        gc.collect = collect


_FUSABLE_NORMS = ("Qwen3VLTextRMSNorm", "Qwen3VLMoeTextRMSNorm")  # weight * x / rms(x)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # torch would not fuse; keep the original
        return type(self).forward(self, hidden_states)
    return torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],),
                                        self.weight, self.variance_epsilon)


def fuse_rms_norms(module: torch.nn.Module) -> int:
    """Run the text model's RMSNorms (4 per layer: input, post-attention, q and k) through
    ``torch.nn.functional.rms_norm``: on CUDA that is one fused kernel instead of eight
    (cast, pow, mean, add, rsqrt, mul, cast, mul), about half of a decode step's launches
    (measured on the H200: 1,780 kernels per step, 113 norms); on the CPU torch
    decomposes it into fewer ops than transformers' module (66 instead of 94 per layer).
    transformers marks these classes for exactly this swap
    (``use_kernel_forward_from_hub("RMSNorm")``).  Only the classes known to compute
    ``weight * x / rms(x)`` are switched (not, say, a ``(1 + weight)`` norm), and only
    when input and weight share a dtype (else torch would not fuse and the output dtype
    would differ): the result is equal on the CPU in float32; in bf16 and on CUDA it is
    rounded once, within one ulp of the original.  Returns how many modules were
    switched."""
    n = 0
    for m in module.modules():
        if type(m).__name__ in _FUSABLE_NORMS and getattr(m, "weight", None) is not None \
                and m.weight.dim() == 1:
            m.forward = _rms_norm_forward.__get__(m)
            n += 1
    return n


def deepstack_by_index(lm) -> None:
    """Let the text model take the deepstack positions as a flat index into ``[rows *
    tokens]`` (what the runner passes) as well as the boolean mask its own callers pass:
    ``hidden[mask] += features`` reads a count back from the device (a boolean index),
    ``index_add`` does not.  The same single addition per element either way."""
    own = lm._deepstack_process

    def process(hidden_states, visual_pos_masks, visual_embeds):
        if visual_pos_masks.dtype == torch.bool:
            return own(hidden_states, visual_pos_masks, visual_embeds)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return flat.index_add(0, visual_pos_masks,
                              visual_embeds.to(flat.dtype)).view_as(hidden_states)
    lm._deepstack_process = process


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value (NaN stays NaN)."""
    return (got - ref).abs().max().item() / (ref.abs().max().item() or 1.0)


def _compiler_error(exc: BaseException) -> bool:
    """An error of torch.compile itself (tracing, a guard's recompilation, inductor), as
    opposed to one the step would raise eagerly too (out of memory, bad inputs)."""
    kinds = [torch._dynamo.exc.TorchDynamoException]
    inductor = getattr(getattr(torch, "_inductor", None), "exc", None)
    if inductor is not None and hasattr(inductor, "InductorError"):
        kinds.append(inductor.InductorError)
    return isinstance(exc, tuple(kinds))


@dataclass
class PrefillChunk:
    ids: torch.Tensor          # (n,) long, host: the chunk's tokens
    pos: torch.Tensor          # (3, n) long, host: their M-RoPE positions
    start: int                 # position of the chunk's first token in the row's context
    table: list[int]           # the row's blocks, covering start + n tokens
    vision: tuple | None       # (embeds [m, H], [deepstack [m, H], ...]) for its m image tokens
    last: bool                 # the chunk ends the prompt: its last token's logits are wanted
    image_runs: tuple = ()     # (offset in the chunk, tokens) of each run of its image tokens


class _DecodeStep:
    """Static buffers of one (batch, width) bucket and, on CUDA, its graph."""

    def __init__(self, runner: "ModelRunner", batch: int, width: int):
        self.batch, self.width = batch, width
        dev = runner.device
        # one buffer, one copy per step: ids | positions | kv_len | tables.  Ordinary
        # tensors even when made inside inference mode (as steps made while serving
        # are): a compiled step's guards tell the two kinds apart
        # on the CPU the host writes the inputs straight into ``inp``, through ``host``
        # (a numpy array sharing its memory)
        self.host = np.zeros(batch * (3 + width), dtype=np.int64) if dev.type == "cpu" else None
        with torch.inference_mode(False):
            self.inp = torch.from_numpy(self.host) if self.host is not None else \
                torch.zeros(batch * (3 + width), dtype=torch.long, device=dev)
            self.ids = self.inp[:batch]
            self.pos = self.inp[batch:2 * batch]
            self.kv_len = self.inp[2 * batch:3 * batch]
            self.tables = self.inp[3 * batch:].view(batch, width)
        self.graph = None
        self.logits: torch.Tensor | None = None
        self.runner = runner
        if runner.dynamic_buffers:  # --compile: one compilation for every bucket (a size
            # of 1 is always specialised: marking it would raise)
            if batch > 1:
                for t in (self.ids, self.pos, self.kv_len, self.tables):
                    torch._dynamo.mark_dynamic(t, 0)
            if width > 1:
                torch._dynamo.mark_dynamic(self.tables, 1)

    def forward(self) -> torch.Tensor:
        r, b = self.runner, self.batch
        last = None
        if r.compiled is not None:  # --compile: the same step, through torch.compile
            try:
                last = r.compiled(self.ids, self.pos, self.kv_len, self.tables)
            except Exception as exc:
                # a compiler failure (a recompilation for a new bucket): the buckets not
                # yet captured run the eager step from now on.  Anything else fails as the
                # eager step would, and so does anything inside a graph capture, which
                # handles its own failures
                capturing = r.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
                if capturing or not _compiler_error(exc):
                    raise
                log.warning("--compile: the compiled decode step failed at batch %d x %d "
                            "blocks (%r); steps not yet captured run eagerly from now on",
                            b, self.width, exc)
                r.compiled = None
        if last is None:
            last = r.decode_hidden(self.ids, self.pos, self.kv_len, self.tables)
        # every bucket writes into one shared output buffer (a graph's own output would
        # cost batch x vocab per graph), straight from the matmul when lm_head is a plain
        # linear layer (no batch x vocab copy per step)
        dst = r.logits_buffer(last)[:b]
        w = getattr(r.lm_head, "weight", None)
        if type(r.lm_head) is torch.nn.Linear and r.lm_head.bias is None and w.dtype == last.dtype:
            torch.mm(last, w.t(), out=dst)
        else:  # quantised head
            dst.copy_(r.lm_head(last))
        return dst

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        self.logits = self.forward()
        return self.logits


class ModelRunner:
    def __init__(self, model, pool: KVPool, *, device, pad_id: int, max_num_seqs: int,
                 max_model_len: int, enforce_eager: bool = False, encoder_cache=None,
                 pixels=None, kernels_setting: str = "auto"):
        self.model, self.pool, self.device = model, pool, torch.device(device)
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.visual = model.model.visual
        self.embed = self.lm.get_input_embeddings()
        self.image_token_id = model.config.image_token_id
        self.pad_id = pad_id
        install(model)
        deepstack_by_index(self.lm)
        log.info("RMSNorm: %d modules through torch's fused rms_norm", fuse_rms_norms(self.lm))
        self.kernels_setting = kernels_setting
        self.kernels, why = kernels.select(kernels_setting, self.device)
        log.info("kernels: %s (%s)", self.kernels, why)
        why = fuse_weights(self.lm)
        if why is None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the separate weights' old segments
        # the fused step reads the rotary table (built below); None: transformers' layers
        self.fused = FusedDecoder(self.lm, pool) if why is None else None
        log.info("decode layers: %s", "fused (q/k/v and gate/up merged; 9 ops per layer)"
                 if self.fused is not None else f"transformers' modules ({why})")
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.max_blocks = max(1, math.ceil(max_model_len / pool.block_size))
        self.width_buckets = width_buckets(self.max_blocks)
        self.steps: dict[tuple[int, int], _DecodeStep] = {}
        self.prefill_shapes: set[tuple[int, int, int]] = set()  # (rows, tokens, blocks) seen
        self.bucket_prefill = self.device.type == "cuda"  # tests turn it on on the CPU
        self.encoder_cache = encoder_cache
        self.encoder_hits = 0
        self.encoder_path = "model"  # check_encoder() (at startup) chooses "batched"
        # prepared pixels -> the encoder's input on the device (PromptBuilder.model_pixels:
        # uint8 patches copied up once and normalised there)
        self.pixels = pixels or (lambda pv, device: pv.to(device))
        self._staging = None
        self._flip = 0
        self._logits: torch.Tensor | None = None
        self._capture_failures = 0
        self.compiled = None  # compile_decode(): the decode step through torch.compile
        self.dynamic_buffers = False  # mark step buffers' batch and width dynamic (compile)
        self.decode_path, why = self._choose_path(enforce_eager)
        log.info("decode path: %s (%s)", self.decode_path, why)
        self._mempool = None
        self.rope = self._rope_table()

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin ``[positions, head_dim]`` of every position a decode step can reach,
        computed once by the text model's own rotary module.  A decode token is text, its
        three M-RoPE components are equal (``t + delta``), and the module computes each
        position on its own: a step's rows are the table's rows, two index lookups instead
        of the module's ~30 ops.  (``delta`` <= 0: an image advances positions by at most
        its token count, so ``t + delta`` < ``max_model_len``.)  None for a rope type that
        rescales with the sequence length: those run the module every step."""
        rot = self.lm.rotary_emb
        if getattr(rot, "rope_type", None) != "default":
            return None
        n = self.max_blocks * self.pool.block_size
        like = torch.empty(0, dtype=self.embed.weight.dtype, device=self.device)
        cos, sin = [], []
        with torch.inference_mode(False), torch.no_grad():
            for at in range(0, n, 8192):  # in slices: the module's float32 temporaries
                # for a whole long context would be several times the table
                m = min(8192, n - at)
                pos = torch.arange(at, at + m, device=self.device).view(1, 1, m).expand(3, 1, m)
                c, s = rot(like, pos)
                cos.append(c[0])
                sin.append(s[0])
            return torch.cat(cos), torch.cat(sin)

    # --- decode ---------------------------------------------------------------------------
    def decode_hidden(self, ids, pos, kv_len, tables) -> torch.Tensor:
        """The last hidden state ``[B, H]`` of one decode step (one new token per row).

        The text model's own modules, called in the order its ``forward`` calls them for
        text tokens without a cache (embedding, rotary embedding (read from its table,
        ``_rope_table``), decoder layers, final norm), but not through that ``forward``:
        its wrappers (output capture, kwarg checks, mask construction) cost as much host
        time per step as a decoder layer of a small model, and the pool's step carries the
        mask.  Equal to the model's forward: the decode tests compare with ``generate()``
        token for token."""
        b = ids.shape[0]
        inp = StepInputs(tables, kv_len - 1, kv_len)
        with self.pool.step(inp, 1) as ctx:
            if self.fused is not None and self.rope is not None:  # the same numbers in ~9
                # ops per layer (fused.py)
                cos, sin = (t.index_select(0, pos) for t in self.rope)
                return self.fused(self.embed(ids), cos, sin, ctx, inp.q_start, kv_len)
            h = self.embed(ids.view(b, 1))
            if self.rope is not None:
                pe = tuple(t.index_select(0, pos).view(b, 1, -1) for t in self.rope)
            else:
                pe = self.lm.rotary_emb(h, pos.view(1, b, 1).expand(3, b, 1))
            for layer in self.lm.layers:
                h = layer(h, attention_mask=ctx.mask, position_embeddings=pe)
                if isinstance(h, tuple):  # transformers versions whose layers return tuples
                    h = h[0]
            h = self.lm.norm(h)
        return h[:, -1]

    def compile_decode(self, blocks: list[int]) -> bool:
        """``--compile``: ``torch.compile`` the decode step (inductor fuses the chains of
        small kernels between the matmuls: RMSNorm, rotary, SiLU-mul, residual adds; the
        pool's write and gather stay one opaque in-place op, ``qwen_vl::paged_attention``),
        compiled here, at startup: the step buffers mark batch and table width dynamic,
        so two compilations (batch 2, and batch 1, which torch specialises) serve every
        bucket.  Each is checked against the eager step, and so are both at the next
        width (no recompilation); any failure or a mismatch leaves the step eager, with a
        warning.  (``dynamic=True``, every size symbolic, gave wrong logits with torch
        2.13: not used.)  Returns whether it is on."""
        t0 = time.perf_counter()
        self.dynamic_buffers = True
        try:
            # the hidden state only: the logits stay one matmul into the shared buffer
            compiled = torch.compile(self.decode_hidden)
            widths = self.width_buckets[:2]
            batches = [b for b in (2, 1) if b in self.batch_buckets]
            for b, w in [(b, widths[0]) for b in batches] + [(b, widths[-1]) for b in batches]:
                step = _DecodeStep(self, b, w)
                # rows with their own block and length, as serving has them; a row
                # beyond the probe's blocks is padding (the scratch block, one token)
                for i in range(b):
                    if i < len(blocks):
                        step.tables[i, 0] = blocks[i]
                        step.kv_len[i] = min(7 - i, self.pool.block_size)
                    else:
                        step.kv_len[i] = 1
                step.pos.copy_(step.kv_len - 1)
                step.ids.copy_(torch.arange(1, b + 1))
                with torch.inference_mode():
                    ref = step.forward().float().clone()
                    hidden = compiled(step.ids, step.pos, step.kv_len, step.tables)
                    got = self.lm_head(hidden).float()
                err = _relative_error(got, ref)
                tol = 1e-4 if self.pool.dtype == torch.float32 else 2e-2
                if not err <= tol:
                    raise RuntimeError(f"compiled step differs from the eager step at batch "
                                       f"{b} (relative error {err:.2e})")
        except Exception as exc:
            log.warning("--compile: the decode step stays eager (%s)", exc)
            self.dynamic_buffers = False
            return False
        self.compiled = compiled
        log.info("--compile: decode step compiled and checked in %.1f s",
                 time.perf_counter() - t0)
        return True

    def logits_buffer(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._logits is None:
            vocab = self.model.config.get_text_config().vocab_size
            self._logits = hidden.new_empty((self.batch_buckets[-1], vocab))
        return self._logits

    def _choose_path(self, enforce_eager: bool) -> tuple[str, str]:
        if self.device.type != "cuda":
            return "eager", f"no CUDA graphs on {self.device.type}"
        if enforce_eager:
            return "eager", "--enforce-eager"
        return "cuda-graphs", f"one graph per batch bucket {self.batch_buckets}, captured " \
                              "on first use of each table width"

    def step_for(self, batch: int, width: int) -> _DecodeStep:
        key = (_pick(self.batch_buckets, batch), _pick(self.width_buckets, width))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = _DecodeStep(self, *key)
            if self.decode_path == "cuda-graphs":
                self._capture(step)
        return step

    def _capture(self, step: _DecodeStep):
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(self.device)
        try:
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            step.kv_len.fill_(1)  # padding rows: one scratch token each
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(2):  # warm up (allocator, lazy inits) off the capture
                    step.forward()
            torch.cuda.current_stream(self.device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            # thread_local: preparation threads may use the GPU (image preprocessing)
            # while a bucket is captured on first use.  torch.cuda.graph runs a full
            # gc.collect() on entry: over a hundred captures of a large heap would take
            # tens of seconds (vLLM skips it the same way)
            with _gc_collect_skipped(), torch.inference_mode(), \
                    torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                step.logits = step.forward()
            step.graph = graph
        except Exception as exc:  # this bucket runs eagerly rather than not at all
            step.graph, step.logits = None, None
            self._capture_failures += 1
            if self._capture_failures >= 3:
                self.decode_path = "eager"
                for other in self.steps.values():
                    other.graph = None
            log.warning("CUDA graph capture failed for batch %d x width %d (%r): that bucket "
                        "runs eagerly%s", step.batch, step.width, exc,
                        "; three failures: decode runs eagerly from now on"
                        if self.decode_path == "eager" else "")
            return
        log.info("captured decode graph batch %d x %d blocks in %.0f ms (+%.1f MiB)",
                 step.batch, step.width, (time.perf_counter() - t0) * 1e3,
                 (torch.cuda.memory_allocated(self.device) - before) / 2**20)

    def capture_all(self, max_width: int | None = None):
        """Capture every batch bucket at the table widths up to ``max_width`` blocks now
        (startup), rather than on first use."""
        if self.decode_path != "cuda-graphs":
            return
        t0 = time.perf_counter()
        for w in self.width_buckets:
            if max_width is not None and w > max_width:
                break
            for b in self.batch_buckets:
                self.step_for(b, w)
        log.info("CUDA graphs: %d captured in %.1f s", len(self.steps), time.perf_counter() - t0)

    def _host_inputs(self, step: _DecodeStep) -> np.ndarray:
        """Where the host writes a step's inputs (a numpy view, so filling it dispatches no
        torch op and never releases the GIL mid-step): on the CPU the step's own buffer;
        on CUDA a pinned staging buffer, double-buffered (the copy up is asynchronous; the
        step's one sync guarantees the buffer used two steps ago is free)."""
        n = step.inp.numel()
        if step.host is not None:
            return step.host
        if self._staging is None or self._staging[0].numel() < n:
            size = max(n, 1 << 16)
            self._staging = [torch.empty(size, dtype=torch.long).pin_memory() for _ in range(2)]
            self._staging_np = [t.numpy() for t in self._staging]
        self._flip ^= 1
        return self._staging_np[self._flip][:n]

    def decode(self, ids: np.ndarray, pos: np.ndarray, kv_len: np.ndarray,
               tables: np.ndarray, widths: np.ndarray) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step (valid until the next step), from the rows'
        ``int64`` arrays (the scheduler keeps them between steps): token, position, context
        length with the new token, block table ``[B, >= max(widths)]`` (zero past a row's
        ``widths`` blocks).

        Every row gathers as many blocks as the widest row's bucket, so one long
        conversation would make all its neighbours read its width: when that would gather
        ``SPLIT_MIN_TOKENS`` more than two groups would (narrow rows, wide rows), the step
        runs as two forward passes, which costs one more read of the weights."""
        split = self._split(widths)
        if split is None:
            return self._decode_one(ids, pos, kv_len, tables, int(widths.max()))
        out = None
        for rows in split:
            r = np.asarray(rows)
            part = self._decode_one(ids[r], pos[r], kv_len[r], tables[r], int(widths[r].max()))
            if out is None:
                out = part.new_empty((len(ids), part.shape[-1]))
            out.index_copy_(0, torch.tensor(rows, device=out.device), part)
        return out

    @staticmethod
    def arrays(ids: list[int], pos: list[int], kv_len: list[int],
               tables: list[list[int]]) -> tuple[np.ndarray, ...]:
        """``decode``'s arguments from per-row lists (tests, benchmarks)."""
        widths = np.array([len(t) for t in tables], dtype=np.int64)
        table = np.zeros((len(tables), max(1, int(widths.max()))), dtype=np.int64)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        return (np.array(ids, dtype=np.int64), np.array(pos, dtype=np.int64),
                np.array(kv_len, dtype=np.int64), table, widths)

    def _split(self, widths: np.ndarray) -> tuple[list[int], list[int]] | None:
        widest = _pick(self.width_buckets, max(1, int(widths.max())))
        if (len(widths) - 1) * widest * self.pool.block_size < SPLIT_MIN_TOKENS:
            return None  # even the other rows skipping every block would save less
        widths = [_pick(self.width_buckets, max(1, w)) for w in widths.tolist()]
        order = sorted(range(len(widths)), key=widths.__getitem__)
        best, cut = 0, 0
        for k in range(1, len(order)):
            if widths[order[k]] == widths[order[k - 1]]:
                continue
            saved = k * (widest - widths[order[k - 1]])  # blocks the narrow rows skip
            if saved > best:
                best, cut = saved, k
        if best * self.pool.block_size < SPLIT_MIN_TOKENS:
            return None
        return sorted(order[:cut]), sorted(order[cut:])

    def _decode_one(self, ids: np.ndarray, pos: np.ndarray, kv_len: np.ndarray,
                    tables: np.ndarray, width: int) -> torch.Tensor:
        b = len(ids)
        if self.rope is not None and pos.max() >= self.rope[0].shape[0]:  # unreachable (see
            # _rope_table); an index past the table would be a device-side assert on a GPU
            raise RuntimeError(f"decode position {pos.max()} is past the rotary table")
        step = self.step_for(b, max(1, width))
        bb, w = step.batch, step.width
        host = self._host_inputs(step)  # ids | positions | kv_len | tables, padding rows:
        host[:b] = ids                  # the pad token at position 0, one scratch token
        host[b:bb] = self.pad_id
        host[bb:bb + b] = pos
        host[bb + b:2 * bb] = 0
        host[2 * bb:2 * bb + b] = kv_len
        host[2 * bb + b:3 * bb] = 1
        t = host[3 * bb:].reshape(bb, w)
        n = min(w, tables.shape[1])
        t[:b, :n] = tables[:, :n]
        t[:b, n:] = 0
        t[b:] = 0
        if self.device.type == "cuda":
            step.inp.copy_(torch.from_numpy(host), non_blocking=True)  # pinned: asynchronous
        return step.run()[:b]

    # --- prefill --------------------------------------------------------------------------
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor | None:
        dev, bs = self.device, self.pool.block_size
        b = len(chunks)
        # shapes that repeat: the attention plans (cuDNN's, ~40 ms of host time each on
        # the H200) and kernels of one shape serve every later step of that shape
        # (on CUDA; the CPU has no plans to reuse and would only pay for the padding)
        q = max(c.ids.numel() for c in chunks)
        width = max(math.ceil((c.start + c.ids.numel()) / bs) for c in chunks)
        if self.bucket_prefill:
            q = prefill_bucket(q)
            width = next((w for w in self.width_buckets if w >= width), width)
        self.prefill_shapes.add((b, q, width))
        ids = torch.full((b, q), self.pad_id, dtype=torch.long)
        pos = torch.zeros((3, b, q), dtype=torch.long)
        tables = torch.zeros((b, width), dtype=torch.long)
        for i, c in enumerate(chunks):
            n = c.ids.numel()
            ids[i, :n] = c.ids
            pos[:, i, :n] = c.pos
            row = c.table[:width]  # blocks past the chunk's end are not read
            tables[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        starts = torch.tensor([c.start for c in chunks], dtype=torch.long)
        lens = torch.tensor([c.start + c.ids.numel() for c in chunks], dtype=torch.long)
        vis = [c.vision for c in chunks if c.vision is not None]
        if vis:  # where the image tokens are, from the host's spans: no mask read back
            where = torch.cat([torch.arange(i * q + o, i * q + o + n)
                               for i, c in enumerate(chunks) for o, n in c.image_runs])
        ids, pos, tables = to_device(ids, dev), to_device(pos, dev), to_device(tables, dev)
        emb = self.embed(ids)
        extra = {}
        if vis:
            where = to_device(where, dev)
            feats = torch.cat([v[0] for v in vis]).to(emb.dtype)
            emb = emb.view(b * q, -1).index_copy(0, where, feats).view(b, q, -1)
            if vis[0][1]:  # an index, not a mask: see deepstack_by_index
                extra = dict(visual_pos_masks=where, deepstack_visual_embeds=[
                    torch.cat([v[1][k] for v in vis]) for k in range(len(vis[0][1]))])
        inp = StepInputs(tables, to_device(starts, dev), to_device(lens, dev))
        fresh = b == 1 and chunks[0].start == 0
        with self.pool.step(inp, q, fresh=fresh) as ctx:
            h = self.lm(inputs_embeds=emb, attention_mask=ctx.mask, position_ids=pos,
                        use_cache=False, **extra).last_hidden_state
        rows = [i for i, c in enumerate(chunks) if c.last]
        if not rows:
            return None
        last = torch.tensor([chunks[i].ids.numel() - 1 for i in rows], device=dev)
        return self.lm_head(h[torch.tensor(rows, device=dev), last])

    # --- vision ---------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, grids: torch.Tensor,
               keys: list[str | None]) -> list[tuple]:
        """Per image ``(embeds [m, H], [deepstack [m, H], ...])`` on the device, from the
        encoder cache when its key is known, else from one encoder call for the rest."""
        out: list[tuple | None] = [None] * len(keys)
        if self.encoder_cache is not None:
            for i, k in enumerate(keys):
                if k is not None:
                    out[i] = self.encoder_cache.get(k)
                    self.encoder_hits += out[i] is not None
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            every = [tuple(g) for g in grids.tolist()]  # a host tensor: no device read
            patches = [t * h * w for t, h, w in every]
            offs = [0]
            for p in patches:
                offs.append(offs[-1] + p)
            pix = torch.cat([pixel_values[offs[i]:offs[i + 1]] for i in todo])
            g = [every[i] for i in todo]
            merged, deep = self._vision(self.pixels(pix, self.device).type(self.visual.dtype), g)
            merge = self.visual.spatial_merge_size ** 2
            sizes = [t * h * w // merge for t, h, w in g]
            embeds = torch.split(merged, sizes)
            deep = [torch.split(f, sizes) for f in deep]
            for j, i in enumerate(todo):
                item = (embeds[j], [d[j] for d in deep])
                if len(todo) > 1 and self.encoder_cache is not None:
                    # a slice would keep the whole call's outputs alive in the cache
                    item = (item[0].clone(), [d.clone() for d in item[1]])
                out[i] = item
                if self.encoder_cache is not None and keys[i] is not None:
                    nbytes = sum(t.numel() * t.element_size() for t in [item[0], *item[1]])
                    self.encoder_cache.put(keys[i], item, nbytes)
        return out

    def _vision(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]):
        """``(merged embeds, [deepstack features])`` of one encoder call, by the batched
        encoder (server/engine/vision.py) or, where the startup check chose it, the
        model's own vision forward."""
        if self.encoder_path == "batched":
            return vision.encode(self.visual, pixels, vision.plan(grids, self.visual,
                                                                  self.device))
        res = self.visual(pixels, grid_thw=torch.tensor(grids, device=self.device),
                          return_dict=True)
        return res.pooler_output, list(res.deepstack_features or [])

    def check_encoder(self) -> str:
        """The batched encoder against the model's own vision forward on small images of
        equal and of different sizes; sets and returns ``encoder_path`` ("batched", or
        "model" when they disagree or the batched one fails), logging which and why."""
        v = self.visual
        cfg = v.config
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        m = v.spatial_merge_size
        gen = torch.Generator().manual_seed(0)
        errors, failure = [], None
        with torch.inference_mode():
            for grids in ([(1, 2 * m, 2 * m)] * 2, [(1, 2 * m, 2 * m), (1, 2 * m, 4 * m)]):
                n = sum(t * h * w for t, h, w in grids)
                pix = torch.randn(n, width, generator=gen).to(self.device, v.dtype)
                self.encoder_path = "model"
                ref = self._vision(pix, grids)
                self.encoder_path = "batched"
                try:  # e.g. a transformers whose vision block is built differently
                    ours = self._vision(pix, grids)
                    if len(ours[1]) != len(ref[1]):
                        raise ValueError("a different number of deepstack features")
                    errors += [_relative_error(a, b) for a, b in
                               zip([ours[0], *ours[1]], [ref[0], *ref[1]])]
                except Exception as exc:
                    failure = exc
                    break
        # float32 on CPU agrees to ~1e-6 (one attention call per image or per block: the
        # same sums; the patch embed as a matmul rounds differently from the convolution);
        # a 1% error in one block's attention moves the tiny model's output by ~5e-5, so
        # the bound still catches it.  bf16 noise on a GPU is ~1e-2.
        tol = 1e-5 if v.dtype == torch.float32 else 2e-2
        worst = max(errors, default=0.0)
        if failure is None and all(e <= tol for e in errors):  # (NaN fails)
            self.encoder_path = "batched"
            log.info("vision encoder: batched (one attention call per block, no host "
                     "sync; relative error %.1e against the model's own forward)", worst)
        else:
            self.encoder_path = "model"
            why = repr(failure) if failure is not None else f"relative error {worst:.2e}"
            log.warning("vision encoder: the model's own forward (the batched encoder "
                        "disagrees with it: %s)", why)
        return self.encoder_path

    # --- startup check --------------------------------------------------------------------
    def check(self, blocks: list[int]):
        """The paged path against the model's own forward on a short prompt: a prefill in
        two chunks (the fresh causal path, then one over the pool's blocks: the paged
        kernel a cached prefix takes), then, where the blocks leave room, one decode step
        (the fused step and its kernels, or transformers' layers).  With the Triton
        kernels chosen by ``--kernels auto``, a failure or a mismatch at the model's own
        shapes switches to the torch reference (logged) and checks again.  The decode
        step's buffers (and graph) are dropped afterwards: ``--compile`` and the startup
        captures build every bucket afresh, on the path finally chosen."""
        try:
            self._check(blocks)
        except RuntimeError as exc:
            if self.kernels != "triton" or self.kernels_setting != "auto":
                raise
            log.warning("kernels: the Triton kernels fail the startup check at the model's "
                        "shapes (%s); the torch reference runs instead", exc)
            kernels.use("torch")
            self.kernels = "torch"
            self.steps.clear()
            self._check(blocks)
        finally:
            self.steps.clear()

    def _check(self, blocks: list[int]):
        bs = self.pool.block_size
        blocks = blocks[:self.max_blocks]  # a step's table is at most max_blocks wide
        n = min(len(blocks) * bs, 2 * bs + 3)
        decode = n < len(blocks) * bs  # room for one more token (and in the rotary table)
        ids = torch.arange(1, n + 2)  # the prompt, then the decoded token
        pos = torch.arange(n + 1).view(1, n + 1).expand(3, n + 1)
        errors, failure, ours = [], None, []
        with torch.inference_mode():
            self.pool.k[:, blocks] = 0  # what the check finds there was written by it
            try:  # e.g. a transformers whose attention bypasses ours
                cut = max(1, n - 5)
                self.prefill([PrefillChunk(ids[:cut], pos[:, :cut], 0, blocks, None, False)])
                ours.append(self.prefill([PrefillChunk(ids[cut:n], pos[:, cut:n], cut, blocks,
                                                       None, True)])[0].float())
                if decode:
                    ours.append(self.decode(*self.arrays([n + 1], [n], [n + 1], [blocks]))[0]
                                .float())
            except Exception as exc:
                ours, failure = None, exc
            for m in (n, n + 1)[:1 + decode]:
                ref = self.model(input_ids=ids[:m].view(1, m).to(self.device),
                                 position_ids=pos[:, :m].reshape(3, 1, m).to(self.device),
                                 use_cache=False).logits[0, -1].float()
                errors.append(_relative_error(ours[m - n], ref) if ours else math.inf)
            written = self.pool.k[:, blocks[0]].abs().sum().item()
        err = max(errors)
        tol = 1e-3 if self.pool.dtype == torch.float32 else 5e-2
        import transformers
        if not written or not err <= tol:  # NaN fails too
            raise RuntimeError(
                f"the engine's paged attention disagrees with the model's own forward under "
                f"transformers {transformers.__version__} (relative error {err:.2e}, pool "
                f"written: {bool(written)}{'' if ours is not None else f'; {failure!r}'}; "
                f"kernels: {self.kernels}): this transformers version is not supported")
        log.info("paged attention check: transformers %s, relative error %.1e (a prefill "
                 "over cached blocks%s; kernels %s)", transformers.__version__, err,
                 " and a decode step" if decode else "", self.kernels)
