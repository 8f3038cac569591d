"""The engine assembled in one place: every part an ``AsyncEngine`` works with, built from
the loaded model and the settings, in the order they depend on each other.

1. The model's facts (device, context length, vocabulary, whether it takes video).
2. ``PromptBuilder`` (chat template, tokens, image and video preprocessing, image cache)
   and the output tokenizer: the worker decodes with its own Rust tokenizer, since the
   preparation thread's one may be mutably borrowed (padding state) while it reads.
3. Stop ids and the pad id, from the generation config or the tokenizer.
4. ``GrammarCache`` with its compile worker processes (structured output).
5. torch's CPU threads, then the KV budget (``KVBudget``: measured after the weights).
6. With the batching scheduler: the KV pool (the whole budget allocated once), its block
   manager, the encoder cache and the ``ModelRunner``; then the startup checks of the
   paged path and the encoder against the model's own forward, and the decode graphs.

``assemble`` returns them as ``EngineParts``; nothing here starts a thread or reads a
request.  The engine (``server.engine.core.AsyncEngine``) adds what works *for* it: the
scheduler, the output stage, the inbox and its threads.  A startup check that fails
closes the grammar workers it started (multiprocessing would join them at exit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from server.engine.kv_budget import KVBudget
from server.engine.kv_pool import BlockManager, KVPool
from server.engine.prompt import PromptBuilder
from server.engine.runner import ModelRunner
from server.engine.structured import GrammarCache
from server.engine.timers import StageTimers

log = logging.getLogger("qwen_vl.engine")

STARTUP_GRAPH_BLOCKS = 128  # decode graphs for tables up to this many blocks are captured
                            # at startup; wider ones on first use
GRAMMAR_WORKERS = 2       # compile processes: a slow compile leaves one for the others


@dataclass
class EngineParts:
    model: object
    device: object
    model_id: str
    max_model_len: int
    supports_video: bool
    vocab_size: int
    builder: PromptBuilder
    detok: Tokenizer                # the output thread's own tokenizer
    _hf_tokenizer: object
    eos_ids: set[int]
    pad_id: int
    grammars: GrammarCache
    opens_think: bool               # the chat template opens a <think> block itself
    generator: torch.Generator
    timers: StageTimers             # off unless a benchmark enables them
    kv_budget: KVBudget
    decode_path: str = "eager"
    # the batching scheduler's (None with the sequential baseline, which uses
    # generate()'s own cache)
    step_tokens: int | None = None  # one step's token budget
    pool: KVPool | None = None
    blocks: BlockManager | None = None
    runner: ModelRunner | None = None


def assemble(loaded, settings) -> EngineParts:
    """The engine's parts for ``loaded`` (``models.loader.LoadedModel``) and ``settings``."""
    model, device = loaded.model, loaded.device
    tok = loaded.processor.tokenizer
    builder = PromptBuilder(loaded.processor, max_model_len=loaded.max_model_len,
                            default_max_tokens=settings.max_new_tokens,
                            image_preprocess=settings.image_preprocess, device=device,
                            image_cache_bytes=settings.image_cache_mb * 2**20,
                            video_processor=_video_processor(loaded))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) or tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    vocab_size = model.config.get_text_config().vocab_size
    # structured output: specs compile in worker processes (LRU-cached), each within
    # --grammar-timeout and killed when its client leaves
    grammars = GrammarCache(tok, vocab_size=vocab_size, stop_ids=eos_ids,
                            max_bytes=settings.grammar_cache_mb * 2**20)
    grammars.start_workers(GRAMMAR_WORKERS, settings.grammar_memory_mb)
    if torch.device(device).type == "cpu":
        threads, why = cpu_threads(settings.cpu_threads)
        torch.set_num_threads(threads)
        log.info("CPU threads: %d for torch (%s)", threads, why)
    parts = EngineParts(
        model=model, device=device, model_id=loaded.model_id,
        max_model_len=loaded.max_model_len, supports_video=loaded.supports_video,
        vocab_size=vocab_size, builder=builder,
        detok=Tokenizer.from_str(tok.backend_tokenizer.to_str()), _hf_tokenizer=tok,
        eos_ids=eos_ids, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        grammars=grammars, opens_think=builder.opens_think,
        generator=torch.Generator().manual_seed(settings.seed), timers=StageTimers(device),
        kv_budget=KVBudget.measure(model, settings, device))
    if settings.scheduler == "batching":
        try:
            _build_kv(parts, settings)
        except BaseException:  # a failed startup check: the grammar workers would hold
            grammars.close()   # the process at exit (multiprocessing joins them)
            raise
    return parts


def _build_kv(parts: EngineParts, settings):
    """The KV pool (the whole budget, allocated once), its block manager and the runner;
    then the startup check of the paged path against the model's forward."""
    parts.step_tokens, step_why = step_token_budget(settings, parts.device)
    bs = settings.kv_block_size
    num_blocks = max(1, parts.kv_budget.tokens // bs)
    cache_blocks = (int(num_blocks * settings.prefix_cache_share)
                    if settings.prefix_cache else 0)
    parts.pool = KVPool(parts.model, num_blocks, bs, parts.device)
    parts.blocks = BlockManager(num_blocks, bs, cache_blocks=cache_blocks)
    encoder_cache = None
    if settings.encoder_cache_mb:
        try:
            from server.engine.lru import ByteLRU
            encoder_cache = ByteLRU(settings.encoder_cache_mb * 2**20)
        except ImportError:
            pass
    runner = parts.runner = ModelRunner(
        parts.model, parts.pool, device=parts.device, pad_id=parts.pad_id,
        max_num_seqs=settings.max_num_seqs, max_model_len=parts.max_model_len,
        enforce_eager=getattr(settings, "enforce_eager", False),
        kernels_setting=getattr(settings, "kernels", "auto"), encoder_cache=encoder_cache,
        pixels=parts.builder.model_pixels)
    probe = parts.blocks.allocate(min(3, num_blocks))
    try:
        runner.check(probe)
        runner.check_encoder()
        if getattr(settings, "compile", False):
            runner.compile_decode(probe)
    finally:
        parts.blocks.release(probe)
    runner.capture_all(max_width=STARTUP_GRAPH_BLOCKS)
    parts.decode_path = runner.decode_path
    log.info("KV blocks: %d x %d tokens (%.2f GiB); prefix cache %s; step budget %d "
             "tokens (%s); encoder cache %s", num_blocks, bs, parts.pool.nbytes / 2**30,
             f"up to {cache_blocks} idle blocks" if cache_blocks else "off",
             parts.step_tokens, step_why,
             f"{settings.encoder_cache_mb} MiB" if encoder_cache is not None else "off")


def step_token_budget(settings, device) -> tuple[int, str]:
    """Tokens one engine step may process, and why: ``--max-num-batched-tokens``, else
    the deprecated ``--max-prefill-chunk``, else by device as vLLM's API server does
    (8,192 on GPUs of >= 70 GiB, 2,048 on smaller ones) and 1,024 on the CPU, where a
    bigger step only makes running streams wait longer."""
    if settings.max_num_batched_tokens is not None:
        return settings.max_num_batched_tokens, "--max-num-batched-tokens"
    if settings.max_prefill_chunk is not None:
        log.warning("--max-prefill-chunk is deprecated: it sets --max-num-batched-tokens")
        return settings.max_prefill_chunk, "--max-prefill-chunk (deprecated)"
    device = torch.device(device)
    if device.type != "cuda":
        return 1024, "default on the CPU"
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return (8192 if gib >= 70 else 2048), f"default on a GPU of {gib:.0f} GiB"


def cpu_threads(configured: int | None) -> tuple[int, str]:
    """torch's intra-op threads for a model on the CPU, and why.  By default one core is
    left to the threads around the model (event loop, output thread, preparation): on a
    small box, intra-op threads that share cores with those wait for the scheduler at
    every parallel region (measured on 2 cores, tiny model: 1 thread 25k tok/s engine
    only, 2 threads 11-18k; a larger model's matmuls may want every core: set it)."""
    if configured:
        return configured, "--cpu-threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1), f"{cores} cores, one left to the serving threads"


def _video_processor(loaded):
    """The video preprocessing for a model that takes video (``LoadedModel.supports_video``),
    from its own video processor settings; None otherwise (video parts get a 400)."""
    if not loaded.supports_video:
        log.info("video input: off (the model has no video token, or PyAV is missing)")
        return None
    from models.video_prep import TorchVideoProcessor
    proc = TorchVideoProcessor.from_config(getattr(loaded, "video_config", None) or {})
    log.info("video input: PyAV decoding, torch preprocessing (no torchvision)")
    return proc
