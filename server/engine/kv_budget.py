"""The KV-cache budget: how many token columns the engine may allocate, and what a
batch layout costs.

Contract:

* ``KVBudget.measure(model, settings, device)`` runs once after loading.  On CUDA it
  reads the device's free memory and keeps ``--gpu-memory-utilization`` of the whole
  device for this process (vLLM's meaning), minus what is already used; on CPU there is
  nothing reliable to measure, so the budget is ``--kv-cache-tokens`` or
  ``max_num_seqs x max_model_len``.  ``--kv-cache-tokens`` always wins.
* Costs are counted in token columns of the layout as it really allocates them, padding
  included: a left-padded slab costs ``rows x columns`` (``slab_tokens``).  The scheduler
  adds up what exists at the peak of a join (running slab + the new group's prefill slab +
  the joined slab) and admits only what fits.  The accountant knows nothing of the
  storage beyond that formula, so a slot or block layout swaps in its own cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("qwen_vl.engine")

GIB = 1 << 30


def bytes_per_token(model) -> int:
    """K and V of every layer for one token, in the model's dtype."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:  # quantised weights: the cache is in the compute dtype
        dtype = torch.float16
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def slab_tokens(rows: int, width: int, reserve: int) -> int:
    """Token columns of a left-padded slab: every row gets ``width + reserve`` columns."""
    return rows * (width + reserve)


@dataclass
class KVBudget:
    tokens: int
    bytes_per_token: int

    @property
    def gib(self) -> float:
        return self.tokens * self.bytes_per_token / GIB

    def fits(self, tokens: int) -> bool:
        return tokens <= self.tokens

    @classmethod
    def measure(cls, model, settings, device: torch.device) -> "KVBudget":
        per_token = bytes_per_token(model)
        if settings.kv_cache_tokens is not None:
            tokens, how = settings.kv_cache_tokens, "--kv-cache-tokens"
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            spare = free - (1.0 - settings.gpu_memory_utilization) * total
            tokens = int(max(0.0, spare) // per_token)
            how = (f"{settings.gpu_memory_utilization:.2f} of {total / GIB:.1f} GiB, "
                   f"{free / GIB:.1f} GiB free after loading")
            if tokens == 0:
                raise RuntimeError(
                    f"no device memory left for the KV cache ({how}); raise "
                    "--gpu-memory-utilization or set --kv-cache-tokens")
        else:
            tokens = settings.max_num_seqs * settings.max_model_len
            how = "max_num_seqs x max_model_len on CPU; set --kv-cache-tokens to change"
        budget = cls(tokens, per_token)
        log.info("KV cache: %d tokens (%.2f GiB) [%s]", budget.tokens, budget.gib, how)
        return budget
