"""Per-row sampling for a whole batch, with its state on the model's device.

Contract:

* ``SamplingState`` holds every row's parameters as device tensors (temperature, top_k,
  top_p, min_p, penalties, greedy flag, the key of its random stream and its step
  counter), plus the per-row token counts that presence/frequency/repetition penalties
  need and the dense logit bias.  They are built when rows join (``build``), and
  re-indexed when rows join or leave (``cat``, ``select``); nothing in a step
  turns a Python list into a tensor.
* ``SamplingState.sample(logits)`` is a pure function of device tensors (plus Python
  flags derived from the parameters, never from device values): no host sync.  It
  returns a ``SampleResult`` whose ``packed`` tensor is the one thing the engine copies
  to the host per step (tokens, and logprob data when a row asked for it).
* Randomness is counter-based: the uniform number of row r at its step s is a hash of
  (r's key, s) computed with integer tensor ops, identical on CPU and GPU.  The key is
  derived from (seed, choice) for seeded requests, from the engine's generator
  otherwise.  A seeded row draws the same numbers alone or in any batch.
* Top-k/top-p/min-p work on the top-k candidates when every sampling row bounds them
  with top_k; a full vocabulary sort happens only when a sampling row has no top_k.
  Probabilities are never normalised over the batch: each row's candidates are weighed
  by ``exp(logit - row max)``, so a row's draw does not depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.interface import SamplingParams
from server.engine.structured import apply_masks

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int):
    """``x * c mod 2**32`` for 32-bit ``x`` held in int64, without signed overflow (the
    constant is split in 16-bit halves, so no product reaches 2**48), so every backend
    computes the same bits."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """A 32-bit integer hash (the 'lowbias32' xorshift-multiply construction).  Works on
    Python ints and on int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_base(key_lo, key_hi):
    """The stream's part of every draw, hashed once when a row joins (a step hashes only
    ``base + step``)."""
    return mix32(mix32(key_lo) ^ key_hi)


def draw(base, step):
    """The draw of the stream with ``stream_base`` ``base`` at ``step``: a float in [0, 1)
    with 24 bits."""
    h = mix32((base + step) & _M32)
    if isinstance(h, int):
        return (h >> 8) / float(1 << 24)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform(key_lo, key_hi, step):
    """The draw of stream (key_lo, key_hi) at ``step``."""
    return draw(stream_base(key_lo, key_hi), step)


def stream_key(seed: int | None, choice: int, fallback: torch.Generator) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of a row's stream key."""
    if seed is None:
        k = int(torch.randint(0, 2**62, (1,), generator=fallback))
    else:
        k = (seed * 1_000_003 + choice) % 2**64
    return k & _M32, (k >> 32) & _M32


@dataclass
class SampleResult:
    tokens: torch.Tensor              # (B,) long, on the logits' device
    packed: torch.Tensor              # what the engine copies to the host (see unpack)
    top_k: int = 0                    # top logprobs packed per row
    with_logprobs: bool = False

    def unpack(self, host: list) -> tuple[list[int], "LogprobRows | None"]:
        """``host`` = ``packed.tolist()``: token ids, and per row ``(logprob, top_ids,
        top_logprobs)`` when logprobs were asked for (read lazily: ``LogprobRows``)."""
        if not self.with_logprobs:
            return host, None
        return [int(r[0]) for r in host], LogprobRows(host, self.top_k)


class LogprobRows:
    """Per row ``(logprob, top_ids, top_logprobs)`` of a step, read from its host copy
    when asked for: the model thread only hands the copy on, the output thread reads the
    rows (``entry(i, k)``: the row's own ``top_logprobs`` count, ``k`` <= the packed one)."""

    __slots__ = ("host", "k")

    def __init__(self, host: list, k: int):
        self.host, self.k = host, k

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, i: int) -> tuple[float, list[int], list[float]]:
        return self.entry(i, self.k)

    def entry(self, i: int, k: int) -> tuple[float, list[int], list[float]]:
        r, w = self.host[i], 2 + self.k
        return r[1], [int(t) for t in r[2:2 + k]], r[w:w + k]


_FLOAT = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
_LONG = ("top_k", "key", "step")
_OPTIONAL = ("counts", "hist", "seen", "bias")  # present only when a row needs one


class SamplingState:
    """The sampling parameters and penalty state of the batch's rows, in batch order."""

    def __init__(self, params: list[SamplingParams], t: dict[str, torch.Tensor], vocab: int,
                 steps: list[int] | None = None):
        self.params, self.t, self.vocab = params, t, vocab
        self.steps = steps if steps is not None else [0] * len(params)  # Python mirror of t["step"]
        self._outside = None  # candidates past each row's top_k (_draw)
        self._derive_flags()

    # --- building and re-indexing (rows join or leave) ------------------------------------
    @classmethod
    def build(cls, params: list[SamplingParams], keys: list[tuple[int, int]],
              prompt_ids: list[torch.Tensor], vocab: int, device) -> "SamplingState":
        """State for new rows; ``prompt_ids[i]`` seeds row i's repetition-penalty mask."""
        b = len(params)
        rows = [dict(temperature=1.0 if p.greedy else max(p.temperature, 1e-5),
                     top_p=p.top_p, min_p=p.min_p, presence=p.presence_penalty,
                     frequency=p.frequency_penalty, repetition=p.repetition_penalty,
                     top_k=p.top_k if 0 < p.top_k < vocab else vocab,
                     key=stream_base(k[0], k[1]), step=0) for p, k in zip(params, keys)]
        t = {n: torch.tensor([r[n] for r in rows], dtype=torch.float32, device=device)
             for n in _FLOAT}
        t.update({n: torch.tensor([r[n] for r in rows], dtype=torch.long, device=device)
                  for n in _LONG})
        t["greedy"] = torch.tensor([p.greedy for p in params], device=device)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            t["counts"] = torch.zeros(b, vocab, device=device)
            # the tokens sampled so far, by step: penalties touch only these columns
            t["hist"] = torch.zeros(b, max(p.max_tokens or 1 for p in params), dtype=torch.long,
                                    device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
            for i, ids in enumerate(prompt_ids):
                seen[i, ids.to(device)] = True
            t["seen"] = seen
        if any(p.logit_bias for p in params):  # one scatter for all rows' biases
            rows_i = [i for i, p in enumerate(params) for _ in p.logit_bias]
            cols = [c for p in params for c in p.logit_bias]
            vals = [v for p in params for v in p.logit_bias.values()]
            t["bias"] = torch.zeros(b, vocab, device=device).index_put_(
                (torch.tensor(rows_i, device=device), torch.tensor(cols, device=device)),
                torch.tensor(vals, device=device), accumulate=True)
        return cls(params, t, vocab)

    def _derive_flags(self):
        ps = self.params
        sampling = [p for p in ps if not p.greedy]
        self.any_sampling = bool(sampling)
        self.any_greedy = len(sampling) < len(ps)
        self.bounded = all(0 < p.top_k < self.vocab for p in sampling)
        self.kmax = max((p.top_k for p in sampling), default=0) if self.bounded else self.vocab
        self.any_top_p = any(p.top_p < 1.0 for p in sampling)
        self.any_min_p = any(p.min_p > 0 for p in sampling)
        self.any_penalty = any(p.presence_penalty or p.frequency_penalty for p in ps)
        self.any_repetition = any(p.repetition_penalty != 1.0 for p in ps)
        self.any_bias = any(p.logit_bias for p in ps)
        self.want_logprobs = any(p.logprobs for p in ps)
        self.top_logprobs = max((p.top_logprobs for p in ps), default=0)

    def __len__(self) -> int:
        return len(self.params)

    def select(self, idx: torch.Tensor, keep: list[int]) -> "SamplingState":
        """Rows ``keep`` (``idx`` is the same list on the device)."""
        params = [self.params[i] for i in keep]
        t = {n: v.index_select(0, idx) for n, v in self.t.items()}
        out = SamplingState(params, t, self.vocab, [self.steps[i] for i in keep])
        out._drop_unused()
        return out

    def cat(self, other: "SamplingState") -> "SamplingState":
        t = {}
        for n in set(self.t) | set(other.t):
            a, b = self.t.get(n), other.t.get(n)
            if a is None or b is None:  # an optional tensor only one side needs
                like = a if a is not None else b
                a = a if a is not None else like.new_zeros((len(self),) + like.shape[1:])
                b = b if b is not None else like.new_zeros((len(other),) + like.shape[1:])
            if a.dim() == 2 and a.shape[1] != b.shape[1]:  # histories of different lengths
                w = max(a.shape[1], b.shape[1])
                a, b = (torch.nn.functional.pad(x, (0, w - x.shape[1])) for x in (a, b))
            t[n] = torch.cat([a, b])
        return SamplingState(self.params + other.params, t, self.vocab, self.steps + other.steps)

    def _drop_unused(self):
        for n, needed in (("counts", self.any_penalty), ("hist", self.any_penalty),
                          ("seen", self.any_repetition),
                          ("bias", self.any_bias)):
            if not needed:
                self.t.pop(n, None)

    # --- one step ------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, matchers: list | None = None) -> SampleResult:
        """``logits``: (B, V) for the last position of each row, owned by the caller and
        modified in place.  ``matchers``: per row an xgrammar matcher or None (the
        grammar rows' masks are applied in place)."""
        t = self.t
        logits = logits.float()
        constrained = [i for i, m in enumerate(matchers or ()) if m is not None]
        if self.want_logprobs:  # OpenAI reports the model's distribution, before any filter
            # (log_softmax is the fastest fused way to the normaliser on CPU, and a copy,
            # so the filters below may work in place)
            raw = torch.log_softmax(logits, dim=-1)
            if self.top_logprobs:
                top_lp, top_ids = raw.topk(self.top_logprobs, dim=-1)
        if self.any_bias:
            logits += t["bias"]
        if self.any_repetition:
            rep = t["repetition"].view(-1, 1)
            logits = torch.where(t["seen"], torch.where(logits > 0, logits / rep, logits * rep),
                                 logits)
        if self.any_penalty and max(self.steps) > 0:
            # only the columns of tokens already sampled (a duplicate writes the same value)
            hist = t["hist"][:, :max(self.steps)]
            c = t["counts"].gather(1, hist)
            pen = t["frequency"].view(-1, 1) * c + t["presence"].view(-1, 1) * (c > 0)
            logits.scatter_(1, hist, logits.gather(1, hist) - pen)
        if constrained:
            apply_masks(logits, [matchers[i] for i in constrained], constrained)

        if not self.any_sampling:
            tokens = None
            if (self.want_logprobs and self.top_logprobs >= 2 and logits.device.type == "cpu"
                    and not constrained
                    and not (self.any_bias or self.any_repetition or self.any_penalty)):
                # the logits are the ones the top logprobs were taken from: where each
                # row's best is strictly above its second, it is the argmax (one read on
                # the CPU, and argmax's unvectorised pass over the vocabulary saved); a
                # tie anywhere goes to argmax, which takes the lowest id
                if bool((top_lp[:, 0] > top_lp[:, 1]).all()):
                    tokens = top_ids[:, 0]
            if tokens is None:
                tokens = logits.argmax(dim=-1)
        elif not self.any_greedy:
            tokens = self._draw(logits)
        else:
            tokens = torch.where(t["greedy"], logits.argmax(dim=-1), self._draw(logits))
        if self.any_penalty:
            if max(self.steps) >= t["hist"].shape[1]:  # a row past the planned length
                t["hist"] = torch.nn.functional.pad(t["hist"], (0, t["hist"].shape[1] + 64))
            t["hist"].scatter_(1, t["step"].view(-1, 1), tokens.view(-1, 1))
            t["counts"].scatter_add_(1, tokens.view(-1, 1),
                                     torch.ones_like(tokens, dtype=torch.float32).view(-1, 1))
        if self.any_repetition:
            t["seen"].scatter_(1, tokens.view(-1, 1), True)
        t["step"] += 1
        self.steps = [n + 1 for n in self.steps]

        if not self.want_logprobs:
            return SampleResult(tokens, tokens)
        parts = [tokens.view(-1, 1).float(), raw.gather(1, tokens.view(-1, 1))]
        k = self.top_logprobs
        if k:
            parts += [top_ids.float(), top_lp]  # ids < 2**24 are exact in float32
        return SampleResult(tokens, torch.cat(parts, dim=1), k, True)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.t
        # candidates by raw logit (a positive temperature keeps the order); only they
        # are scaled
        if self.bounded:
            vals, idx = logits.topk(self.kmax, dim=-1)        # sorted, descending
        else:
            vals, idx = logits.sort(dim=-1, descending=True)
        k = vals.shape[-1]
        if self._outside is None:  # fixed while the rows are (a new state when they change)
            self._outside = torch.arange(k, device=vals.device).view(1, -1) \
                >= t["top_k"].view(-1, 1)
        # weights relative to the row's best candidate: no normalisation across the batch
        w = torch.exp((vals - vals[:, :1]) / t["temperature"].view(-1, 1))
        w = w.masked_fill(self._outside, 0.0)
        if self.any_top_p:
            cum = w.cumsum(dim=-1)
            above = cum - w                                   # mass strictly above each one
            w = w.masked_fill(above > t["top_p"].view(-1, 1) * cum[:, -1:], 0.0)
        if self.any_min_p:  # the best candidate has weight 1: min_p is the floor itself
            w = w.masked_fill(w < t["min_p"].view(-1, 1), 0.0)
        cum = w.cumsum(dim=-1)
        u = draw(t["key"], t["step"])
        pick = torch.searchsorted(cum, (u * cum[:, -1]).view(-1, 1), right=True)
        return idx.gather(1, pick.clamp_(max=k - 1)).view(-1)


def sample(logits: torch.Tensor, rows: list, vocab: int | None = None) -> SampleResult:
    """One-off sampling of rows with ``params``, ``key``, ``prompt_ids`` and ``output_ids``
    (unit tests and tools; the engine keeps a ``SamplingState`` per batch)."""
    vocab = vocab or logits.shape[-1]
    state = SamplingState.build([r.params for r in rows], [r.key for r in rows],
                                [r.prompt_ids for r in rows], vocab, logits.device)
    for i, r in enumerate(rows):  # replay the history into the penalty state
        for j, tok in enumerate(r.output_ids):
            if "counts" in state.t:
                state.t["counts"][i, tok] += 1
                state.t["hist"][i, j] = tok
            if "seen" in state.t:
                state.t["seen"][i, tok] = True
        state.t["step"][i] = len(r.output_ids)
    state.steps = [len(r.output_ids) for r in rows]
    return state.sample(logits.clone(), [getattr(r, "matcher", None) for r in rows])
