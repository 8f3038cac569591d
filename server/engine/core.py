"""The engine: an async facade over one worker thread that owns the model.

Contract (see ``server.engine.interface``): ``reserve()`` takes a queue place or raises
``Overloaded``; ``generate()`` prepares the prompt on a preparation thread, hands it to
the worker and yields ``Output`` events as the worker produces them; leaving the
iteration early aborts the request.  All model work happens on the worker thread; text
and events are produced on the output thread (``server.engine.output``), which wakes the
event loop once per step.

Two schedulers run on the worker:

* ``BatchingScheduler`` — continuous batching over a paged KV pool
  (``server.engine.kv_pool``: the whole KV budget allocated once in blocks; the model
  is stepped by ``server.engine.runner``).  Each step: (1) finished and aborted rows
  leave, their blocks go back (full prompt blocks stay in the prefix cache); (2) admit
  waiting requests within ``max_num_seqs`` and the free blocks: the longest cached
  prefix of the prompt (token ids, image tokens keyed by the image's content) is reused,
  blocks are allocated for the rest of the prompt and promised for ``max_tokens``;
  (3) prefill up to ``--max-num-batched-tokens`` tokens less one per decoding row
  (``assemble.step_token_budget``), over the admitted prompts in order (a long prompt takes
  several steps; the images a step's chunks touch are encoded in one call, once, and
  their features sliced per chunk; M-RoPE positions come from the images' spans,
  ``mrope_positions``); prompts that complete sample each choice's first token and
  join the running rows (n > 1 choices share the full prompt blocks); (4) one decode
  step for every running row (a static-buffer step, replayed from a CUDA graph on a
  GPU); (5) drop finished rows.  So a running stream waits at most one chunk.  Sampling
  state lives on the device (``server.engine.sampler``); a decode step makes one
  device-to-host copy (the sampled tokens, with the logprob data packed in when a row
  asked for it).
* ``SequentialScheduler`` — the baseline the benchmark compares against: one request at
  a time through ``model.generate()``.

Waiting requests queue per API key and are admitted in turns (``FairQueue``); with
``--max-queue-wait`` one that waited longer without starting gets 503 instead.

Every stage is guarded: prefill (fails its group), join and leave (fail the rows whose
batch they build), decode and sampling (fail the batch), output (fails the request whose
events failed).  Out of memory is a 503, anything else a 500; memory is freed; failures
of shared stages count toward the health circuit: after repeated consecutive failures the
engine reports itself unhealthy.  ``FaultInjector`` reaches each stage for tests.

A request that could never fit in the KV budget, even alone, gets a 400 before any model
work.  At startup one short prefill through the paged path is compared with the model's
own forward (``ModelRunner.check``): a transformers that stopped routing attention
through the registered function would otherwise serve garbage silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from server.engine.assemble import assemble
from server.engine.kv_pool import BlockManager, chain_keys
from server.engine.runner import PrefillChunk, prefill_bucket
from server.engine.fairqueue import FairQueue
from server.engine.interface import (ChoiceEvents, EngineRequest, ImageGeometry,
                                     ImageInput, Output, PromptCount)
from server.engine.output import OutputStage, Sink, token_bytes, token_text
from server.engine.prompt import Prepared
from server.engine.sampler import SamplingState, stream_key
from server.engine.sequence import Sequence
from server.engine.structured import GrammarLogitsProcessor
from server.errors import (APIError, InternalError, InvalidRequest, Overloaded, QueueTimeout,
                           ServiceUnavailable)

log = logging.getLogger("qwen_vl.engine")
# a prompt an API server tokenised, up to this many tokens, is prepared on the engine's
# event loop (see AsyncEngine._prepare_async); a longer one still takes a prep thread
INLINE_PREP_TOKENS = 8192

UNHEALTHY_AFTER = 3      # consecutive failed batch steps make /health 503 ...
HEALTH_COOLDOWN_S = 30.0  # ... until this long without a new failure (then traffic may retry)


@dataclass
class Entry:
    """A request inside the engine."""
    request_id: str
    prepared: Prepared
    sink: object                   # callable(list[Output] | APIError), thread-safe
    reservation: object
    seqs: list[Sequence] = field(default_factory=list)
    t_arrival: float = field(default_factory=time.perf_counter)
    key: str = ""                  # API key name: the fair queue's unit of turn
    stream: bool = True            # False: events held between deliveries (OutputStage)
    on_prefill: object = None      # EngineRequest.on_prefill
    held: list = field(default_factory=list)  # output thread: events not yet delivered
    held_at: float | None = None   # output thread: when events were last delivered

    @property
    def n(self) -> int:
        return self.prepared.params.n




class _Reservation:
    def __init__(self, engine: "AsyncEngine"):
        self._engine = engine
        self._held = True

    def release(self):
        with self._engine._lock:
            if self._held:
                self._held = False
                self._engine._waiting -= 1


class FaultInjector:
    """Test hook.  ``QWEN_VL_FAULT_OOM_AT=N``: the Nth forward pass raises out-of-memory,
    once.  ``QWEN_VL_FAULT=stage:N[:error],...``: the Nth pass through ``stage`` (one of
    ``STAGES``) raises, once: out-of-memory, or a plain error with ``:error``.  Off
    unless configured."""

    STAGES = ("forward", "prefill", "join", "leave", "decode", "sample", "output")

    def __init__(self, oom_at: int | None = None, spec: str | None = None):
        self.calls = 0  # forward passes (tests read it)
        self.counts: dict[str, int] = {}
        self.plan: dict[str, tuple[int, bool, str]] = {}  # stage -> (n, and later, kind)
        if oom_at is not None:
            self.plan["forward"] = (oom_at, False, "oom")
        for part in filter(None, (spec or "").split(",")):
            stage, n, *kind = part.strip().split(":")
            if stage not in self.STAGES:
                raise ValueError(f"unknown fault stage {stage!r}: one of {self.STAGES}")
            self.plan[stage] = (int(n.rstrip("*")), n.endswith("*"), kind[0] if kind else "oom")

    def tick(self, stage: str = "forward"):
        if stage == "forward":
            self.calls += 1
        n = self.counts[stage] = self.counts.get(stage, 0) + 1
        at, later, kind = self.plan.get(stage, (0, False, ""))
        if n == at or (later and at and n > at):
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory fault ({stage})")
            raise RuntimeError(f"injected fault ({stage})")


class _SchedulerBase:
    def __init__(self, engine: "AsyncEngine"):
        self.engine = engine
        self.model = engine.model
        self.waiting = FairQueue()  # round robin between API keys
        self.eos_ids = engine.eos_ids

    def add(self, entry: Entry):
        self.waiting.append(entry)

    def abort(self, request_id: str):
        """The client left: forget the request if it still waits; a running one is
        dropped by the subclass."""
        self.waiting.discard(request_id)

    def _expire(self):
        """``--max-queue-wait``: fail requests that waited that long without starting
        (503 + Retry-After) rather than run them for a client that has given up."""
        wait = getattr(self.engine.settings, "max_queue_wait", None)
        if not wait or not self.waiting:
            return
        late = self.waiting.expire(time.perf_counter() - wait)
        if late:
            log.warning("%d request(s) waited over %.1f s in the queue: 503", len(late), wait)
        for e in late:
            e.reservation.release()
            e.sink(QueueTimeout(f"The request waited more than {wait:g} s in the queue "
                                "without starting; the server is busy, retry later.",
                                retry_after=max(1, math.ceil(wait))))

    def _start(self, entry: Entry) -> list[Sequence]:
        entry.reservation.release()  # running now (a no-op if already let go at admission)
        p = entry.prepared.params
        entry.seqs = []
        for i in range(p.n):
            s = Sequence(request_id=entry.request_id, index=i,
                         prompt_len=entry.prepared.num_tokens, params=p,
                         tokenizer=self.engine.detok, eos_ids=self.eos_ids, sink=entry,
                         image_tokens=entry.prepared.image_tokens,
                         video_tokens=entry.prepared.video_tokens)
            s.key = stream_key(p.seed, i, self.engine.generator)
            s.matcher = p.grammar.matcher() if p.grammar is not None else None
            entry.seqs.append(s)
        return entry.seqs

    def _guarded(self, stage: str, entries, fn, *, batch_step: bool = True):
        """Run one stage; if it raises, fail ``entries()`` (called then: the rows it
        concerns) and return None."""
        try:
            self.engine.faults.tick(stage)
            return fn()
        except Exception as exc:
            log.warning("%s failed: %r", stage, exc)
            self._fail(entries(), exc, batch_step=batch_step)
            return None

    def _fail(self, entries, exc: BaseException, *, batch_step: bool = True):
        """Fail ``entries`` with a typed error.  Only failures of a shared batch step count
        towards health: a prefill that fails on one request's own input says nothing about
        the model (and must not let a client turn /health red)."""
        if isinstance(exc, torch.OutOfMemoryError):
            err: APIError = ServiceUnavailable("The server ran out of memory on this batch; retry.")
        else:
            log.exception("engine step failed", exc_info=exc)
            err = InternalError("The model failed on this request.")
        if batch_step:
            self.engine._note_failure()
        entries = list(entries)
        for e in entries:
            e.reservation.release()
            for s in e.seqs:
                s.stopped = True
        self.engine.output.put_fail(entries, err)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class _Prompt:
    """An admitted request whose prompt is being prefilled, chunk by chunk."""
    entry: Entry
    ids: torch.Tensor              # (L,) long, host
    pos: torch.Tensor              # (3, L) long, host: M-RoPE positions of the whole prompt
    delta: int                     # decode position = context length + delta
    keys: list                     # chain keys of its full blocks (prefix cache)
    blocks: list[int]              # blocks covering the prompt
    cached: int                    # tokens served from the prefix cache
    done: int                      # tokens whose keys/values are written
    promise: list[int]             # blocks promised per choice for its generated tokens
    img_ord: torch.Tensor | None   # (L,) ordinal of each image token among the prompt's
    img_bounds: list[int]          # image i owns image-token ordinals [b[i], b[i+1])
    img_keys: list
    img_spans: list                # (position, tokens) of each image's placeholder run
    vision: dict = field(default_factory=dict)  # image index -> encoder features

    @property
    def length(self) -> int:
        return self.ids.numel()


class _Running:
    """The rows being decoded (in batch order), their sampling state, and their step
    inputs kept as arrays from step to step (``int64``, one entry per row): ``last`` (the
    token sampled last), ``pos`` (its position: context length + the row's M-RoPE offset),
    ``kv`` (tokens in the row's cache), ``nblk`` (its blocks) and ``tables`` (``[rows,
    width]``, the block ids, zero past ``nblk``).  A decode step updates them with a few
    vector operations; only a row crossing into a new block (one step in ``block_size``)
    is touched on its own.  ``Sequence.blocks`` stays the list the block manager
    releases."""

    def __init__(self, rows: list[Sequence], sampling: SamplingState, arrays=None):
        self.rows, self.sampling = rows, sampling
        if arrays is None:
            kv = np.array([s.kv_len for s in rows], dtype=np.int64)
            nblk = np.array([len(s.blocks) for s in rows], dtype=np.int64)
            tables = np.zeros((len(rows), max(nblk, default=1) + 8), dtype=np.int64)
            for i, s in enumerate(rows):
                tables[i, :len(s.blocks)] = s.blocks
            arrays = (np.zeros(len(rows), dtype=np.int64),
                      kv + np.array([s.delta for s in rows], dtype=np.int64), kv, nblk, tables)
        self.last, self.pos, self.kv, self.nblk, self.tables = arrays

    def __len__(self) -> int:
        return len(self.rows)

    def cat(self, other: "_Running") -> "_Running":
        w = max(self.tables.shape[1], other.tables.shape[1])
        tables = np.zeros((len(self) + len(other), w), dtype=np.int64)
        tables[:len(self), :self.tables.shape[1]] = self.tables
        tables[len(self):, :other.tables.shape[1]] = other.tables
        return _Running(self.rows + other.rows, self.sampling.cat(other.sampling), (
            *(np.concatenate([a, b]) for a, b in zip(
                (self.last, self.pos, self.kv, self.nblk),
                (other.last, other.pos, other.kv, other.nblk))), tables))

    def select(self, keep: list[int], sampling: SamplingState) -> "_Running":
        k = np.asarray(keep)
        return _Running([self.rows[i] for i in keep], sampling,
                        (self.last[k], self.pos[k], self.kv[k], self.nblk[k], self.tables[k]))

    def add_block(self, i: int, block: int):
        n = self.nblk[i]
        if n >= self.tables.shape[1]:  # widen by half (amortised: rare)
            wider = np.zeros((len(self), n + n // 2 + 8), dtype=np.int64)
            wider[:, :self.tables.shape[1]] = self.tables
            self.tables = wider
        self.tables[i, n] = block
        self.nblk[i] = n + 1


def image_spans(is_img: torch.Tensor, sizes: list[int]) -> list[tuple[int, int]]:
    """``(start, tokens)`` of each image's run of placeholder tokens in a prompt (host
    tensors: one ``nonzero``, then Python per image, never per image token)."""
    where = is_img.nonzero().view(-1)
    firsts = [0]
    for size in sizes[:-1]:
        firsts.append(firsts[-1] + size)
    return list(zip(where[firsts].tolist(), sizes)) if sizes else []


def mrope_positions(length: int, spans: list[tuple[int, int]],
                    grids: list[tuple[int, int, int]], merge: int) -> tuple[torch.Tensor, int]:
    """The prompt's M-RoPE positions ``[3, length]`` and its decode offset ``delta``, as
    transformers' ``get_rope_index`` computes them for images (text: the same position on
    all three axes; an image: (t, row, column) from where it starts, after which the text
    resumes ``max(h, w) / merge`` further), with tensor ops per image instead of its
    Python walk over every token.  ``tests/test_photo_burst.py`` holds them equal."""
    parts, cur, at, top = [], 0, 0, -1

    def text(n):
        nonlocal cur, top
        if n > 0:
            parts.append(torch.arange(cur, cur + n).expand(3, n))
            cur, top = cur + n, cur + n - 1
    for (start, size), (t, h, w) in zip(spans, grids):
        text(start - at)
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw),
                                    indexing="ij")
        parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
        top = max(top, cur + max(t, gh, gw) - 1)
        cur += max(h, w) // merge
        at = start + size
    text(length - at)
    return torch.cat(parts, 1), top + 1 - length


class BatchingScheduler(_SchedulerBase):
    """Continuous batching over the paged KV pool (``server.engine.kv_pool``); the model
    is stepped by ``server.engine.runner.ModelRunner``."""

    def __init__(self, engine):
        super().__init__(engine)
        s = engine.settings
        self.max_num_seqs, self.max_batch_tokens = s.max_num_seqs, s.max_batch_tokens
        self.chunk = engine.step_tokens  # the step's token budget
        self.timers = engine.timers
        self.runner = engine.runner
        self.blocks: BlockManager = engine.blocks
        self.bs = self.blocks.block_size
        self.batch: _Running | None = None
        self.prefilling: list[_Prompt] = []
        self.peak_kv_tokens = 0  # most KV tokens held at once, in block columns (tests)
        self.image_token_id = self.model.config.image_token_id
        # a video's frame pairs are vision items like images (``Prepared``), on their own
        # placeholder token
        self.video_token_id = getattr(self.model.config, "video_token_id", -1)
        self.spatial_merge = self.model.model.visual.spatial_merge_size
        self.merge = self.spatial_merge ** 2

    steps = 0  # engine steps taken (tests and metrics read it)
    # batched decode steps and the rows they decoded: rows / steps is the mean batch
    # size, the benchmark's split of tokens/s into batch occupancy and step time
    decode_steps = decode_rows = 0

    @property
    def num_running(self) -> int:
        batch = self.batch  # read once: the event loop asks while the engine thread steps
        return (len(batch) if batch else 0) + sum(p.entry.n for p in list(self.prefilling))

    def has_work(self) -> bool:
        return bool(self.waiting) or self.batch is not None or bool(self.prefilling)

    def step(self):
        # the sampler updates its state and the logits in place: all of it in inference
        # mode, like the forward whose outputs it works on
        with torch.inference_mode():
            self._step()

    # --- admission -----------------------------------------------------------------------
    def _need(self, e: Entry, matched: int = 0) -> tuple[int, list[int]]:
        """(blocks to allocate now, blocks promised per choice) for ``e`` when ``matched``
        of its prompt blocks come from the prefix cache."""
        n_tok, cap = e.prepared.num_tokens, e.prepared.num_tokens + e.prepared.params.max_tokens
        total, prompt = self.blocks.blocks_for(cap), self.blocks.blocks_for(n_tok)
        full = n_tok // self.bs
        return prompt - matched, [total - prompt] + [total - full] * (e.n - 1)

    def add(self, entry: Entry):
        if entry.n > self.max_num_seqs:  # its choices could never decode together
            entry.reservation.release()
            self.engine.output.put_fail([entry], InvalidRequest(
                f"n={entry.n} is more than the {self.max_num_seqs} sequences this server "
                "decodes together (--max-num-seqs); lower n.", param="n"))
            return
        now, promise = self._need(entry)
        need = now + sum(promise)
        if need > self.blocks.num_blocks:  # would wait forever: say so before any model work
            entry.reservation.release()
            self.engine.output.put_fail([entry], InvalidRequest(
                f"This request needs {need * self.bs} tokens of KV cache (prompt "
                f"{entry.prepared.num_tokens} + max_tokens {entry.prepared.params.max_tokens}"
                f", x{entry.n} choices) but the server's KV budget is "
                f"{self.blocks.num_blocks * self.bs} tokens; shorten the prompt or lower "
                "max_tokens or n.", param="max_tokens", code="kv_budget_exceeded"))
            return
        super().add(entry)

    def _admit(self):
        rows = self.num_running
        while self.waiting:
            e = self.waiting[0]
            if rows > 0 and rows + e.n > self.max_num_seqs:
                break
            try:
                prompt = self._reserve(e)
            except Exception as exc:  # this request's own input: fail it alone
                self.waiting.popleft()
                self._fail([e], exc, batch_step=False)
                continue
            if prompt is False:
                break  # waits for rows to leave rather than over-allocate
            self.waiting.popleft()
            self.prefilling.append(prompt)
            # a prefilling prompt counts as running (``num_running``): its queue place
            # goes now (after the append: never counted nowhere), or it would count twice
            # and shrink the queue while it prefills
            e.reservation.release()
            rows += e.n
            if e.on_prefill is not None:  # the key pays for this prefill from now on
                e.on_prefill(e.prepared.num_tokens)

    def _reserve(self, e: Entry):
        """Match the prefix cache, allocate the prompt's blocks and promise the rest; False
        when the blocks are not there now."""
        p = e.prepared
        ids = p.input_ids[0]
        n = ids.numel()
        img_ord, bounds, img_keys, spans, grids = None, [0], [], [], []
        if p.image_grid_thw is not None:
            is_img = (ids == self.image_token_id) | (ids == self.video_token_id)
            img_ord = torch.cumsum(is_img, 0) - 1
            grids = [tuple(g) for g in p.image_grid_thw.tolist()]
            sizes = [t * h * w // self.merge for t, h, w in grids]
            for size in sizes:
                bounds.append(bounds[-1] + size)
            spans = image_spans(is_img, sizes)
            img_keys = list(p.image_keys)  # content hash + pixel budget, per image
        keys = []
        if self.blocks.cache_blocks:
            entries = ids.tolist()
            for (start, size), key in zip(spans, img_keys):  # keyed by their image
                entries[start:start + size] = [key] * size
            keys = chain_keys(entries, self.bs, p.cache_salt)
        # before any block is taken (a video's frame pairs are items of t = 1, as
        # get_rope_index splits them)
        pos, delta = mrope_positions(n, spans, grids, self.spatial_merge)
        matched = self.blocks.match(keys, (n - 1) // self.bs)  # the last token is computed
        now, promise = self._need(e, len(matched))
        if now + sum(promise) > self.blocks.available:
            self.blocks.release(matched)
            return False
        blocks = matched + self._fresh(now)
        self.blocks.promise(sum(promise))
        cached = len(matched) * self.bs
        self.blocks.count(n, cached)
        self._note_allocation()
        return _Prompt(e, ids, pos, delta, keys, blocks, cached, cached,
                       promise, img_ord, bounds, img_keys, spans)

    def _fresh(self, n: int, *, promised: bool = False) -> list[int]:
        """``n`` blocks for a new owner, zeroed (``KVPool.clear``: no earlier request's
        keys or values survive in them)."""
        blocks = self.blocks.allocate(n, promised=promised)
        try:
            self.runner.pool.clear(blocks)
        except BaseException:  # as if never taken: the caller's failure path frees the rest
            self.blocks.release(blocks)
            if promised:
                self.blocks.promise(n)
            raise
        return blocks

    def _note_allocation(self):
        self.peak_kv_tokens = max(self.peak_kv_tokens, self.blocks.used * self.bs)

    # --- one step --------------------------------------------------------------------------
    def _step(self):
        self.steps += 1
        self._leave()  # rows that finished or whose client left
        self._expire()
        with self.timers.stage("admission"):
            self._admit()
        if self.prefilling:
            self._prefill_step()
        self._leave()
        if self.batch is not None:
            batch = self.batch
            with self.timers.stage("decode"):
                self._guarded("decode", lambda: _entries(batch.rows), self._decode)
            self._leave()

    def abort(self, request_id: str):
        super().abort(request_id)
        for s in self.batch.rows if self.batch is not None else []:
            if s.request_id == request_id:
                s.stopped = True  # leaves the batch at the start of the next step
        for p in self.prefilling:
            if p.entry.request_id == request_id:
                p.entry.dead = True

    def _prefill_step(self):
        """The step's token budget, less one token per decoding row (at least one block's
        worth is left to prefill, so prompts always move), over the prompts in admission
        order; the images their chunks touch go through the encoder in one call, within
        the same budget in image tokens (the first prompt always goes).  On CUDA the
        ``--max-batch-tokens`` check counts the padded (bucketed) length."""
        decoding = len(self.batch) if self.batch is not None else 0
        budget = max(self.chunk - decoding, min(self.chunk, self.bs))
        # the forward's padded size, as the runner will pad it (bucketed on CUDA)
        padded = prefill_bucket if self.runner.bucket_prefill else (lambda n: n)
        images, picked = self.chunk, []
        for p in self.prefilling:
            n = min(p.length - p.done, budget)
            width = padded(max([c for _, c in picked] + [n]))
            need = self._image_tokens_to_encode(p, p.done + n)
            if n <= 0 or (picked and (width * (len(picked) + 1) > self.max_batch_tokens
                                      or (need and need > images))):
                break
            picked.append((p, n))
            budget -= n
            images -= need
        if not picked:
            return
        group = [p for p, _ in picked]
        logits = self._guarded("prefill", lambda: [p.entry for p in group],
                               lambda: self._prefill(picked), batch_step=False)
        if logits is None:  # failed: its requests were failed (their blocks go at _leave)
            return
        done = [p for p in group if p.done == p.length]
        if not done:
            return
        self.prefilling = [p for p in self.prefilling if p not in done]
        new = self._guarded("join", lambda: [p.entry for p in done],
                            lambda: self._start_rows(done, logits))
        if new is None:  # its requests were failed; give back what their rows held
            for p in done:
                self._release_prompt(p)
                for s in p.entry.seqs:
                    self._release_seq(s)

    def _prefill(self, picked: list[tuple[_Prompt, int]]):
        with self.timers.stage("encoder"):
            self._encode(picked)
        chunks = []
        for p, n in picked:
            s, e = p.done, p.done + n
            runs = tuple((max(a, s) - s, min(a + size, e) - max(a, s))
                         for _, a, size in self._spans_in(p, s, e))
            chunks.append(PrefillChunk(p.ids[s:e], p.pos[:, s:e], s,
                                       p.blocks[:self.blocks.blocks_for(e)],
                                       self._chunk_vision(p, s, e), e == p.length, runs))
        self.engine.faults.tick()
        with self.timers.stage("prefill", tokens=sum(n for _, n in picked)):
            logits = self.runner.prefill(chunks)
        for p, n in picked:  # their keys/values are written: full blocks become cacheable
            first, p.done = p.done // self.bs, p.done + n
            for i in range(first, min(p.done // self.bs, len(p.keys))):
                self.blocks.commit(p.blocks[i], p.keys[i])
        return logits if logits is not None else ()

    @staticmethod
    def _spans_in(p: _Prompt, s: int, e: int) -> list[tuple[int, int, int]]:
        """``(index, position, tokens)`` of ``p``'s images with tokens in ``[s, e)``."""
        return [(i, a, size) for i, (a, size) in enumerate(p.img_spans)
                if a < e and a + size > s]

    def _images_to_encode(self, p: _Prompt, end: int) -> list[int]:
        """Indices of ``p``'s images with tokens in this chunk (``[p.done, end)``) and no
        features yet: later images wait for the steps that prefill them."""
        return [i for i, _, _ in self._spans_in(p, p.done, end) if i not in p.vision]

    def _image_tokens_to_encode(self, p: _Prompt, end: int) -> int:
        return sum(p.img_spans[i][1] for i in self._images_to_encode(p, end))

    def _encode(self, picked: list[tuple[_Prompt, int]]):
        """Vision features of every image the step's chunks touch, in one encoder call
        (the encoder cache answers resent images)."""
        want = [(p, i) for p, n in picked for i in self._images_to_encode(p, p.done + n)]
        if not want:
            return
        pix, grids, keys = [], [], []
        for p, i in want:
            g = p.entry.prepared.image_grid_thw
            sizes = g.prod(-1).tolist()
            off = sum(sizes[:i])
            pix.append(p.entry.prepared.pixel_values[off:off + sizes[i]])
            grids.append(g[i:i + 1])
            keys.append(p.img_keys[i])
        if len({(t.dtype, t.dim()) for t in pix}) > 1:  # photos' and videos' uint8 patches,
            # or either beside float pixels: each normalised as its own kind, then together
            pix = [self.runner.pixels(t, self.engine.device) for t in pix]
        feats = self.runner.encode(torch.cat(pix), torch.cat(grids), keys)
        for (p, i), f in zip(want, feats):
            p.vision[i] = f

    def _chunk_vision(self, p: _Prompt, s: int, e: int):
        if p.img_ord is None:
            return None
        before = int(p.img_ord[s - 1]) + 1 if s else 0
        upto = int(p.img_ord[e - 1]) + 1
        if upto == before:
            return None
        embeds, deep = [], []
        for i in range(len(p.img_bounds) - 1):
            a, b = max(before, p.img_bounds[i]), min(upto, p.img_bounds[i + 1])
            if a >= b:
                continue
            emb, ds = p.vision[i]
            lo, hi = a - p.img_bounds[i], b - p.img_bounds[i]
            embeds.append(emb[lo:hi])
            deep.append([d[lo:hi] for d in ds])
        return (torch.cat(embeds), [torch.cat(ls) for ls in zip(*deep)] if deep[0] else [])

    def _start_rows(self, done: list[_Prompt], logits) -> None:
        """Prompts fully prefilled: their choices become rows (n > 1 choices share the
        full prompt blocks and copy the partial one), sample each first token, join."""
        rows, counts = [], []
        for p in done:
            seqs = self._start(p.entry)
            full = p.length // self.bs
            # hand the prompt's blocks and promises over to its choices first (nothing here
            # can fail), so that on any failure below each block has exactly one owner
            for j, s in enumerate(seqs):
                # kv_len: the length at joining; from then on the batch's ``kv`` array
                s.delta, s.kv_len, s.promise = p.delta, p.length, p.promise[j]
                s.cached_tokens = p.cached
                s.blocks = list(p.blocks) if j == 0 else p.blocks[:full]
                if j:
                    self.blocks.fork(s.blocks)
            partial = p.blocks[full] if p.length % self.bs else None
            p.blocks, p.promise = [], [0] * len(p.promise)
            for s in seqs[1:] if partial is not None else ():
                blk = self.blocks.allocate(1, promised=True)[0]  # a copy of the partial block
                # (all of it, so nothing of an earlier owner is left there)
                s.promise -= 1
                s.blocks.append(blk)
                self.runner.pool.copy_block(partial, blk)
            rows += seqs
            counts.append(len(seqs))
        dev = self.engine.device
        if any(c > 1 for c in counts):
            logits = logits.repeat_interleave(torch.tensor(counts, device=logits.device), dim=0)
        prompts = {id(p.entry): p.ids for p in done}
        sampling = SamplingState.build(
            [s.params for s in rows], [s.key for s in rows],
            [prompts[id(s.sink)] for s in rows], self.engine.vocab_size, dev)
        new = _Running(rows, sampling)
        self._sample_into(new, logits)
        self.batch = new if self.batch is None else self.batch.cat(new)
        self._note_allocation()
        return True

    def _decode(self):
        batch = self.batch
        rows = batch.rows
        # rows crossing into a new block take it from their promise: all in one allocation
        # (one clear of the blocks), about one row in block_size per step
        grow = np.flatnonzero(batch.kv >= batch.nblk * self.bs).tolist()
        if grow:
            for i, blk in zip(grow, self._fresh(len(grow), promised=True)):
                rows[i].blocks.append(blk)
                rows[i].promise -= 1
                batch.add_block(i, blk)
        self.engine.faults.tick()
        lens = batch.kv + 1
        logits = self.runner.decode(batch.last, batch.pos, lens, batch.tables, batch.nblk)
        self.decode_steps += 1
        self.decode_rows += len(rows)
        batch.kv = lens
        batch.pos += 1
        self._note_allocation()
        self.engine.faults.tick("sample")
        self._sample_into(self.batch, logits)
        return True

    def _sample_into(self, batch: _Running, logits):
        rows = batch.rows
        matchers = [s.matcher for s in rows]
        res = batch.sampling.sample(logits, matchers if any(matchers) else None)
        tokens, lps = res.unpack(res.packed.tolist())  # the step's one device-to-host copy
        batch.last = np.array(tokens, dtype=np.int64)
        finishes = [s.accept(t) for s, t in zip(rows, tokens)]
        self.engine.output.put_step(list(rows), tokens, finishes,
                                    [s.hide_last for s in rows], lps)

    # --- leaving -----------------------------------------------------------------------------
    def _release_seq(self, s: Sequence):
        self.blocks.release(getattr(s, "blocks", []))
        self.blocks.unpromise(getattr(s, "promise", 0))
        s.blocks, s.promise = [], 0

    def _release_prompt(self, p: _Prompt):
        self.blocks.release(p.blocks)
        self.blocks.unpromise(sum(p.promise))
        p.blocks, p.promise = [], [0] * len(p.promise)

    def _leave(self):
        dead = [p for p in self.prefilling if getattr(p.entry, "dead", False)]
        if dead:
            self.prefilling = [p for p in self.prefilling if p not in dead]
            for p in dead:
                self._release_prompt(p)
        batch = self.batch
        if batch is None:
            return
        keep = [i for i, s in enumerate(batch.rows) if not s.finished]
        if len(keep) == len(batch.rows):
            return
        for i, s in enumerate(batch.rows):
            if s.finished:
                self._release_seq(s)
        if not keep:
            self.batch = None
            return
        kept_rows = [batch.rows[i] for i in keep]

        def select():
            idx = torch.tensor(keep, device=self.engine.device)
            return batch.select(keep, batch.sampling.select(idx, keep))

        kept = self._guarded("leave", lambda: _entries(kept_rows), select)
        if kept is None:  # its rows were failed with it
            for s in kept_rows:
                self._release_seq(s)
        self.batch = kept

    def _fail(self, entries, exc, *, batch_step: bool = True):
        entries = list(entries)
        for e in entries:
            e.dead = True  # a prompt still prefilling leaves at the next _leave
        super()._fail(entries, exc, batch_step=batch_step)


def _entries(rows) -> list[Entry]:
    """The distinct requests of ``rows``."""
    return list({id(s.sink): s.sink for s in rows}.values())


class _Streamer:
    """``generate()`` streamer feeding our ``Sequence``; the first ``put`` is the prompt."""

    def __init__(self, seq: Sequence, entry: Entry):
        self.seq, self.entry, self.prompt_seen = seq, entry, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tok in value.view(-1).tolist():
            if not self.seq.finished:
                self.entry.sink([self.seq.append(tok)])

    def end(self):
        pass


class SequentialScheduler(_SchedulerBase):
    """Baseline: one request at a time, one ``generate()`` call per choice."""

    num_running = 0

    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self):
        from transformers import StoppingCriteria, StoppingCriteriaList

        self._expire()
        if not self.waiting:
            return
        entry = self.waiting.popleft()
        seqs = self._start(entry)
        self.num_running = len(seqs)
        prep, dev = entry.prepared, self.engine.device
        engine = self.engine

        class _Stop(StoppingCriteria):
            def __init__(self, seq):
                self.seq = seq

            def __call__(self, input_ids, scores, **kw):
                engine.faults.tick()
                done = self.seq.finished or self.seq.request_id in engine.aborted
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                                  device=input_ids.device)

        try:
            for s in seqs:
                p = s.params
                if p.seed is not None:
                    torch.manual_seed((p.seed + s.index) % 2**63)  # per-request seeding, HF style
                inputs = dict(input_ids=prep.input_ids.to(dev),
                              attention_mask=torch.ones_like(prep.input_ids).to(dev),
                              mm_token_type_ids=prep.mm_token_type_ids.to(dev))
                inputs.update({k: v.to(dev) for k, v in prep.hf_vision_inputs(
                    lambda px: self.engine.builder.model_pixels(px, dev)).items()})
                gen = dict(max_new_tokens=p.max_tokens, do_sample=not p.greedy,
                           repetition_penalty=p.repetition_penalty,
                           streamer=_Streamer(s, entry),
                           stopping_criteria=StoppingCriteriaList([_Stop(s)]))
                if s.matcher is not None:
                    from transformers import LogitsProcessorList
                    gen["logits_processor"] = LogitsProcessorList([GrammarLogitsProcessor(s)])
                if not p.greedy:
                    gen.update(temperature=p.temperature, top_p=p.top_p,
                               top_k=p.top_k if p.top_k > 0 else None,
                               min_p=p.min_p or None)
                if p.ignore_eos:
                    gen["min_new_tokens"] = p.max_tokens
                with torch.inference_mode():
                    self.model.generate(**inputs, **gen)
                if not s.finished:  # generate() stopped on its own eos handling
                    s.finish_reason = "length" if len(s.output_ids) >= p.max_tokens else "stop"
                    entry.sink([Output(index=s.index, text=s.text[s.emitted:], token_ids=[],
                                       finish_reason=s.finish_reason,
                                       prompt_tokens=s.prompt_len,
                                       completion_tokens=len(s.output_ids),
                                       image_tokens=s.image_tokens,
                                       video_tokens=s.video_tokens)])
        except Exception as exc:
            self._fail([entry], exc, batch_step=False)
        finally:
            self.num_running = 0


class AsyncEngine:
    """Implements ``server.engine.interface.Engine``."""

    def __init__(self, loaded, settings, *, fault_oom_at: int | None = None,
                 fault: str | None = None, output=None):
        self.settings = settings
        self.faults = FaultInjector(fault_oom_at, fault)
        # the parts, built in one place (``assemble``), become the engine's attributes:
        # the scheduler, the output stage and the tests read ``engine.runner`` and the rest
        vars(self).update(vars(assemble(loaded, settings)))
        # where sampled tokens become events: here (``OutputStage``), or, in the
        # engine-core process, sent raw to the API servers (``proc.RemoteOutput``)
        self.output = (output or OutputStage)(self)
        # request ids whose client left; read by the sequential scheduler's stopping
        # criterion while generate() blocks the worker.  The worker itself learns of an
        # abort from the inbox, where it is queued behind the request's own entry.
        self.aborted: set[str] = set()
        self._lock = threading.Lock()
        self._waiting = 0
        self._consecutive_failures = 0
        self._last_failure = 0.0
        # every failed batch step so far: orders the health reports an engine-core process
        # sends on two sockets (``server.engine.proc``), so a stale one loses to a newer
        self.failed_steps = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # several requests' templates, tokens and images are prepared at once
        # (PromptBuilder is thread-safe; the torch image pipeline releases the GIL)
        self._prep = ThreadPoolExecutor(settings.prep_workers, thread_name_prefix="prep")
        self.scheduler = (SequentialScheduler if settings.scheduler == "sequential"
                          else BatchingScheduler)(self)
        self._stopping = False
        # the output queues of the requests now open (``generate``), for ``close_requests``
        self._open: set[asyncio.Queue] = set()
        self._closed_with: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # --- interface ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        failing = (self._consecutive_failures >= UNHEALTHY_AFTER
                   and time.monotonic() - self._last_failure < HEALTH_COOLDOWN_S)
        return self._thread.is_alive() and not failing

    def _note_failure(self):
        self._consecutive_failures += 1
        self._last_failure = time.monotonic()
        self.failed_steps += 1

    def reserve(self, deferred: bool = False) -> _Reservation:
        # in this process a place costs no round trip: ``deferred`` changes nothing
        # a request that will take a free batch slot at the next step is not queued
        free = max(0, getattr(self.scheduler, "max_num_seqs", 1) - self.scheduler.num_running)
        with self._lock:
            if self._waiting >= self.settings.max_queue + free:
                raise Overloaded(retry_after=1)
            self._waiting += 1
        return _Reservation(self)

    async def generate(self, request: EngineRequest, reservation):
        q: asyncio.Queue = asyncio.Queue()
        await self.submit(request, reservation, Sink(asyncio.get_running_loop(), q.put_nowait))
        self._open.add(q)
        events = ChoiceEvents(q, request.params.n)
        try:
            async for out in events:
                yield out
        finally:
            self._open.discard(q)
            reservation.release()
            if events.left:
                self.abort(request.request_id)

    async def submit(self, request: EngineRequest, reservation, sink) -> Entry:
        """Prepare ``request`` (``_prepare_async``) and queue it; its events go to ``sink``
        (``output.Sink``: lists of ``Output``, or an ``APIError``).  Raises what the
        preparation raises (the reservation is then released); ``generate`` and the
        engine-core process (``server.engine.proc``) start requests here."""
        try:
            prepared = await self._prepare_async(request)
        except BaseException:  # refused, or the client left (cancelled): free the place now
            reservation.release()
            raise
        if self._closed_with is not None:  # shutting down: no new work
            reservation.release()
            raise self._closed_with
        entry = Entry(request.request_id, prepared, sink, reservation, key=request.key,
                      stream=request.stream, on_prefill=request.on_prefill)
        self._inbox.put(entry)
        return entry

    def abort(self, request_id: str) -> None:
        """The client of a submitted request left: the engine drops it at its next step."""
        self.aborted.add(request_id)
        self._inbox.put(("abort", request_id))

    async def _prepare_async(self, request: EngineRequest) -> Prepared:
        """Cheap checks first: (1) template, token count and context length on the
        preparation thread; (2) the grammar in a compile worker process, within
        --grammar-timeout; (3) image preprocessing on the preparation thread.  Each step
        is abandoned at once when the client leaves (the awaiting task is cancelled).
        A text prompt an API server has tokenised (``request.pieces``, no pixels, up to
        ``INLINE_PREP_TOKENS``) is prepared on the event loop instead: expanding its
        pieces and the context check take microseconds, less than the two hops through a
        preparation thread."""
        loop = asyncio.get_running_loop()
        inline = (request.pieces is not None and not request.images and not request.videos
                  and sum(map(len, request.pieces.ids)) <= INLINE_PREP_TOKENS)

        async def step(fn, *args):
            if inline:
                return self._timed_prep(fn, *args)
            return await loop.run_in_executor(self._prep, self._timed_prep, fn, *args)
        plan = await step(self.builder.plan, request)
        request = await self._compiled(request)
        return await step(self.builder.finish, request, plan)

    async def _compiled(self, request: EngineRequest) -> EngineRequest:
        """``request`` with its grammar compiled (in a compile worker process, within
        --grammar-timeout), or as it is without one."""
        spec = request.params.grammar
        if spec is None or hasattr(spec, "matcher"):
            return request
        compiled = await self.grammars.compile_async(
            spec, timeout=self.settings.grammar_timeout, salt=request.cache_salt,
            turn=request.key)
        return dataclasses.replace(request, params=request.params.replace(grammar=compiled))

    def image_geometry(self, images: list[ImageInput]) -> list[ImageGeometry | None]:
        return [self.builder.geometry(im) for im in images]

    async def count(self, request: EngineRequest) -> PromptCount:
        """``PromptBuilder.count`` on the preparation thread (``/tokenize``)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._prep, self._timed_prep, self.builder.count, request)

    async def detokenize(self, token_ids: list[int]) -> str:
        size = self.detok.get_vocab_size(with_added_tokens=True)
        for i, t in enumerate(token_ids):
            if not 0 <= t < size:
                raise InvalidRequest(f"tokens[{i}] is {t}; token ids run from 0 to "
                                     f"{size - 1}.", param="tokens")
        return await asyncio.get_running_loop().run_in_executor(
            self._prep, partial(self.detok.decode, token_ids, skip_special_tokens=False))

    def _timed_prep(self, fn, *args):
        with self.timers.stage("preparation"):
            return fn(*args)

    def stats(self) -> dict[str, float]:
        images = self.builder.image_cache.stats()
        out = {"queue_depth": self._waiting, "running_seqs": self.scheduler.num_running,
               "image_cache_hits": images["hits"], "image_cache_queries": images["queries"],
               "grammar_cache_hits": self.grammars.hits,
               "grammar_cache_misses": self.grammars.misses,
               "grammar_cache_bytes": self.grammars.bytes,
               "prompts_rendered": self.builder.renders}
        blocks = getattr(self, "blocks", None)
        if blocks is not None:
            out.update(blocks.stats())
            out["encoder_cache_hits"] = self.runner.encoder_hits
            out["decode_steps"] = self.scheduler.decode_steps
            out["decode_rows"] = self.scheduler.decode_rows
        return out

    def token_text(self, token_id: int) -> str:
        return token_text(self.detok, token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        return token_bytes(self.detok, token_id)

    def close_requests(self, exc: BaseException) -> int:
        """End every open request with ``exc`` (called on the event loop when a SIGTERM's
        drain runs out of time): each stream raises it, so a streamed answer ends with an
        error event and ``[DONE]`` and a plain one with its envelope, instead of a cut
        connection; their rows are aborted as for a client that left.  Requests still being
        prepared get it when they reach the queue."""
        self._closed_with = exc
        for q in list(self._open):
            q.put_nowait(exc)
        return len(self._open)

    async def shutdown(self, timeout: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine from any thread: compile workers killed (shutdown never waits
        for them), the model thread joined within ``timeout``, output and preparation
        threads stopped.  Idempotent."""
        self._stopping = True
        self.grammars.close()
        self._inbox.put(None)
        self._thread.join(timeout)
        self.output.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)

    # --- worker thread ---------------------------------------------------------------
    def _run(self):
        sched = self.scheduler
        while not self._stopping:
            # the output stage's turn: an engine-core process's retries what it could not
            # send yet (an API server still connecting) and asks to come back soon for it
            wait = self.output.tick() or 0.5
            try:
                item = self._inbox.get(timeout=wait) if not sched.has_work() else None
            except queue.Empty:
                continue
            self._take(item)
            while True:  # drain without blocking
                try:
                    self._take(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if not sched.has_work():
                continue
            failures = self._consecutive_failures
            try:
                sched.step()
                if self._consecutive_failures == failures:
                    self._consecutive_failures = 0
            except Exception:  # a bug outside the per-batch guards: keep serving
                self._note_failure()
                log.exception("scheduler step failed")

    def _take(self, item):
        if isinstance(item, Entry):
            self.scheduler.add(item)
        elif isinstance(item, tuple):  # ("abort", request_id), always after its entry
            self.scheduler.abort(item[1])
            self.aborted.discard(item[1])
