"""The running batch: a left-padded KV cache in preallocated slabs, plus per-row state.

Design (TGI's ``Batch.filter`` / ``Batch.concatenate`` contract on HF modules):

* Every layer's keys/values live in one slab ``[B, H, capacity, D]``; the valid window is
  ``[start, end)``.  A decode step writes one column in place (no ``torch.cat`` of the
  whole cache per step, which is what ``DynamicCache`` does).  The scheduler sizes the
  slab when it is created (``capacity``: the width the rows can reach, which is what the
  KV budget counted); growing past it (doubling) is only a fallback.
* Rows are left-padded: a row's real tokens end at ``end``; a 2-D ``mask`` (B x T) marks
  padding with zeros.  Attention masks it out, so padding never changes a row's result.
  Each row's real length is also kept in Python (``lens``), so trimming columns that
  became pure padding needs no look at device values.
* ``concat`` joins a freshly prefilled batch into the running one (re-padding the shorter
  one on the left); ``filter`` keeps some rows and trims columns that became pure
  padding.  Both build a new batch and copy the cache once, leaving the old one intact if
  they fail; decode steps copy nothing.
* Positions are M-RoPE: each row keeps its own next position (``prompt_len + generated +
  rope_delta``), the same value on the three axes during decode.  The model's own
  ``rope_deltas`` attribute is never used.
* ``sampling`` (``server.engine.sampler.SamplingState``) follows the rows through joins
  and leaves.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_MIN_HEADROOM = 64


class SlabLayer(DynamicLayer):
    """A cache layer whose storage is a preallocated slab appended to in place."""

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.start = self.end = 0
        self.capacity_hint = capacity

    # --- DynamicLayer protocol ---------------------------------------------------------
    def lazy_initialization(self, key_states, value_states, *args):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.k_buf is None:
            self._alloc_like(key_states, max(q, self.capacity_hint or q + _MIN_HEADROOM))
        elif self.end + q > self.k_buf.shape[-2]:
            self._reallocate(2 * (self.end - self.start + q) + _MIN_HEADROOM)
        self.k_buf[:, :, self.end:self.end + q] = key_states
        self.v_buf[:, :, self.end:self.end + q] = value_states
        self.end += q
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        return self.end - self.start

    def batch_select_indices(self, indices):
        self.k_buf = self.k_buf.index_select(0, indices)
        self.v_buf = self.v_buf.index_select(0, indices)
        self._refresh_views()

    # --- slab management ---------------------------------------------------------------
    def _alloc_like(self, like: torch.Tensor, capacity: int, batch: int | None = None):
        b, h, _, d = like.shape
        shape = (batch if batch is not None else b, h, capacity, d)
        self.k_buf = like.new_zeros(shape)
        self.v_buf = like.new_zeros(shape)
        self.start = self.end = 0

    def _reallocate(self, capacity: int):
        k, v = self.keys, self.values
        self._alloc_like(k, capacity)
        n = k.shape[-2]
        self.k_buf[:, :, :n] = k
        self.v_buf[:, :, :n] = v
        self.end = n
        self._refresh_views()

    def _refresh_views(self):
        self.keys = self.k_buf[:, :, self.start:self.end]
        self.values = self.v_buf[:, :, self.start:self.end]

    def selected(self, idx: torch.Tensor, drop: int) -> "SlabLayer":
        """A new layer with rows ``idx`` and the first ``drop`` valid columns cut (the
        slab keeps its capacity: the rows that stay were budgeted for it)."""
        out = SlabLayer()
        out.lazy_initialization(self.keys, self.values)
        out.k_buf = self.k_buf.index_select(0, idx)
        out.v_buf = self.v_buf.index_select(0, idx)
        out.start, out.end = self.start + drop, self.end
        out._refresh_views()
        return out

    @staticmethod
    def concat(a: "SlabLayer", b: "SlabLayer", capacity: int | None = None) -> "SlabLayer":
        """Rows of ``a`` then rows of ``b``, right-aligned (left padding)."""
        ta, tb = a.get_seq_length(), b.get_seq_length()
        t = max(ta, tb)
        out = SlabLayer()
        out.lazy_initialization(a.keys, a.values)
        ba = a.keys.shape[0]
        out._alloc_like(a.keys, max(t, capacity or t + _MIN_HEADROOM),
                        batch=ba + b.keys.shape[0])
        out.k_buf[:ba, :, t - ta:t] = a.keys
        out.v_buf[:ba, :, t - ta:t] = a.values
        out.k_buf[ba:, :, t - tb:t] = b.keys
        out.v_buf[ba:, :, t - tb:t] = b.values
        out.end = t
        out._refresh_views()
        return out


def new_cache(num_layers: int, capacity: int | None = None) -> Cache:
    return Cache(layers=[SlabLayer(capacity) for _ in range(num_layers)])


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x.new_zeros(x.shape[0], width - x.shape[1]), x], dim=1)


class DecodeBatch:
    """Tensors for the rows being decoded together; ``rows`` holds the engine's per-row
    objects in the same order as the batch dimension, ``lens`` their real lengths."""

    def __init__(self, cache: Cache, mask: torch.Tensor, next_pos: torch.Tensor,
                 last_tokens: torch.Tensor, rows: list, lens: list[int] | None = None,
                 sampling=None, cache_kw: str = "past_key_values"):
        self.cache, self.mask, self.next_pos, self.last_tokens = cache, mask, next_pos, last_tokens
        self.rows = rows
        self.width = mask.shape[1]
        self.lens = lens if lens is not None else [self.width] * len(rows)
        self.sampling = sampling
        self.cache_kw = cache_kw

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def capacity(self) -> int:
        """Columns allocated per row (what the KV budget counts)."""
        buf = self.cache.layers[0].k_buf
        return buf.shape[2] - self.cache.layers[0].start if buf is not None else self.width

    def decode_inputs(self, sdpa_mask: bool = False) -> dict:
        """Inputs for one decode step (one new token per row).  With ``sdpa_mask`` the
        4-D boolean mask is passed ready-made: for one query token it is just the padding
        mask, and HF would otherwise rebuild it from the 2-D one at every step."""
        b = len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)
        self.width += 1
        self.lens = [n + 1 for n in self.lens]
        pos = self.next_pos.view(1, b, 1).expand(3, b, 1)
        self.next_pos = self.next_pos + 1
        mask = self.mask.bool()[:, None, None, :] if sdpa_mask else self.mask
        return {"input_ids": self.last_tokens.view(b, 1), "attention_mask": mask,
                "position_ids": pos, self.cache_kw: self.cache, "use_cache": True,
                "logits_to_keep": 1}

    def advance(self, tokens: torch.Tensor):
        """The tokens just sampled become the next step's inputs."""
        self.last_tokens = tokens

    def concat(self, other: "DecodeBatch", capacity: int | None = None) -> "DecodeBatch":
        t = max(self.width, other.width)
        layers = [SlabLayer.concat(a, b, capacity)
                  for a, b in zip(self.cache.layers, other.cache.layers)]
        sampling = (self.sampling.cat(other.sampling)
                    if self.sampling is not None and other.sampling is not None else None)
        return DecodeBatch(Cache(layers=layers),
                           torch.cat([_left_pad(self.mask, t), _left_pad(other.mask, t)]),
                           torch.cat([self.next_pos, other.next_pos]),
                           torch.cat([self.last_tokens, other.last_tokens]),
                           self.rows + other.rows, self.lens + other.lens, sampling,
                           self.cache_kw)

    def filter(self, keep: list[int]) -> "DecodeBatch | None":
        """Rows at ``keep`` (in order), without the columns that are padding for all of
        them.  A new batch: this one is left untouched (and intact if this fails)."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        idx = torch.tensor(keep, device=self.mask.device)
        lens = [self.lens[i] for i in keep]
        drop = self.width - max(lens)  # known in Python: no look at the mask
        layers = [layer.selected(idx, drop) for layer in self.cache.layers]
        return DecodeBatch(Cache(layers=layers), self.mask.index_select(0, idx)[:, drop:],
                           self.next_pos.index_select(0, idx),
                           self.last_tokens.index_select(0, idx),
                           [self.rows[i] for i in keep], lens,
                           self.sampling.select(idx, keep) if self.sampling is not None else None,
                           self.cache_kw)

    def repeat_rows(self, counts: list[int]) -> "DecodeBatch":
        """Row i repeated counts[i] times (``n > 1`` shares one prefill)."""
        if all(c == 1 for c in counts):
            return self
        idx = torch.repeat_interleave(torch.arange(len(counts), device=self.mask.device),
                                      torch.tensor(counts, device=self.mask.device))
        self.mask = self.mask.index_select(0, idx)
        for layer in self.cache.layers:
            layer.batch_select_indices(idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        self.last_tokens = self.last_tokens.index_select(0, idx)
        self.lens = [n for n, c in zip(self.lens, counts) for _ in range(c)]
        return self
