"""What differs between the transformers versions the engine runs on.

* ``cache_keyword(model)``: the forward keyword that takes our KV cache.  transformers
  5.24 renamed ``past_key_values=`` to ``cache=`` (the old name is deprecated, to be
  removed in 5.40); older 5.x only know ``past_key_values``.  The model's own forward
  signature says which one this install has.
* ``check_cache_used(model, keyword, device)``: one short prefill at startup into a
  fresh engine cache, which must then hold the prompt.  A model that did not recognise
  the keyword builds its own cache silently and the engine would decode from an empty
  one: garbage with no error.  This fails loudly instead.
"""

from __future__ import annotations

import inspect
import logging

import torch
import transformers

from server.engine.batch import new_cache

log = logging.getLogger("qwen_vl.engine")


def cache_keyword(model=None) -> str:
    forward = type(model).forward if model is not None else None
    if forward is None:  # no model at hand: decide by the version
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        return "cache" if (major, minor) >= (5, 24) else "past_key_values"
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CacheNotUsed(RuntimeError):
    pass


def check_cache_used(model, keyword: str, device) -> None:
    n = 4
    cfg = model.config.get_text_config()
    ids = torch.arange(1, n + 1, device=device).view(1, n)
    pos = torch.arange(n, device=device).view(1, 1, n).expand(3, 1, n)
    cache = new_cache(cfg.num_hidden_layers, n)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
              use_cache=True, logits_to_keep=1, **{keyword: cache})
    written = [layer.get_seq_length() for layer in cache.layers]
    if written != [n] * len(written):
        raise CacheNotUsed(
            f"transformers {transformers.__version__} did not write into the engine's KV "
            f"cache when passed as {keyword}= (layers hold {written[:3]}... tokens, expected "
            f"{n}): this transformers version is not supported by the engine")
    log.info("cache check: transformers %s takes the KV cache as %s=",
             transformers.__version__, keyword)
