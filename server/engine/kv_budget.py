"""The KV-cache budget: how many tokens of keys and values the engine's pool holds.

Contract:

* ``KVBudget.measure(model, settings, device)`` runs once after loading.  On CUDA it
  reads the device's free memory and keeps ``--gpu-memory-utilization`` of the whole
  device for this process (vLLM's meaning), minus what is already used, and sets aside
  the decode workspace (each layer's attention gathers its rows' blocks: about
  ``2 x 2 / layers`` of the pool's bytes at the peak, K and V with grouped-query heads
  repeated); on CPU there is nothing reliable to measure, so the budget is
  ``max_num_seqs x max_model_len`` tokens, at most 1 GiB.  ``--kv-cache-tokens``
  always wins.
* The engine allocates the whole budget once as a pool of blocks
  (``server.engine.kv_pool``); admission counts blocks, padding never costs any.
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


@dataclass
class KVBudget:
    tokens: int
    bytes_per_token: int

    @property
    def gib(self) -> float:
        return self.tokens * self.bytes_per_token / GIB

    @classmethod
    def measure(cls, model, settings, device: torch.device) -> "KVBudget":
        per_token = bytes_per_token(model)
        if settings.kv_cache_tokens is not None:
            tokens, how = settings.kv_cache_tokens, "--kv-cache-tokens"
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            spare = free - (1.0 - settings.gpu_memory_utilization) * total
            layers = model.config.get_text_config().num_hidden_layers
            tokens = int(max(0.0, spare) // (per_token * (1 + 4 / layers)))
            how = (f"{settings.gpu_memory_utilization:.2f} of {total / GIB:.1f} GiB, "
                   f"{free / GIB:.1f} GiB free after loading")
            if tokens == 0:
                raise RuntimeError(
                    f"no device memory left for the KV cache ({how}); raise "
                    "--gpu-memory-utilization or set --kv-cache-tokens")
        else:
            tokens = min(settings.max_num_seqs * settings.max_model_len, GIB // per_token)
            how = "max_num_seqs x max_model_len on CPU, at most 1 GiB; set --kv-cache-tokens"
        budget = cls(tokens, per_token)
        log.info("KV cache: %d tokens (%.2f GiB) [%s]", budget.tokens, budget.gib, how)
        return budget
