"""Per-row sampling for a whole batch in one pass.

Each row keeps its own temperature, top_k, top_p, min_p, penalties, logit bias and
random generator; the work is vectorised over the batch, and the expensive parts (sort
for top_p/min_p, penalty counts) run only when some row asks for them.

Randomness: a row draws one uniform number per token from *its own* generator (seeded
rows) and picks the token by inverse CDF.  A seeded row therefore gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.interface import SamplingParams
from server.engine.structured import apply_masks


def row_generator(seed: int | None, choice: int, fallback: torch.Generator) -> torch.Generator:
    if seed is None:
        return fallback
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + choice) % (2**63))
    return g


@dataclass
class RowState:
    """What the sampler needs of one row."""
    params: SamplingParams
    generator: torch.Generator
    prompt_ids: torch.Tensor          # 1-D, on the model's device (for repetition_penalty)
    output_ids: list[int]
    matcher: object = None            # xgrammar.GrammarMatcher of a constrained row


@dataclass
class SampleResult:
    tokens: torch.Tensor              # (B,) long, on the logits' device
    logprobs: torch.Tensor | None     # (B,) chosen-token logprobs, when any row asked
    top_ids: torch.Tensor | None      # (B, K)
    top_logprobs: torch.Tensor | None


def _penalise(logits: torch.Tensor, rows: list[RowState]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()),
                                                      device=logits.device, dtype=logits.dtype))
        if p.repetition_penalty != 1.0:
            seen = torch.cat([r.prompt_ids, torch.tensor(r.output_ids, dtype=torch.long,
                                                         device=logits.device)]).unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                          vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            out = torch.tensor(r.output_ids, device=logits.device)
            counts = torch.zeros_like(logits[i]).index_add_(
                0, out, torch.ones(len(out), device=logits.device, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def sample(logits: torch.Tensor, rows: list[RowState]) -> SampleResult:
    """``logits``: (B, V) for the last position of each row."""
    logits = logits.float()
    raw_logprobs = None
    want_logprobs = any(r.params.logprobs for r in rows)
    if want_logprobs:
        # OpenAI reports the model's distribution, before sampling filters
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    penalised = any(r.params.logit_bias or r.params.repetition_penalty != 1.0
                    or r.params.presence_penalty or r.params.frequency_penalty for r in rows)
    constrained = [i for i, r in enumerate(rows) if getattr(r, "matcher", None) is not None]
    if penalised or constrained:
        logits = logits.clone()
    if penalised:
        _penalise(logits, rows)
    if constrained:  # grammar rows: a bitmask per row; free rows share the batch untouched
        apply_masks(logits, [rows[i].matcher for i in constrained], constrained)

    greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        tokens = torch.where(greedy, tokens, _sample_rows(logits, rows))

    result = SampleResult(tokens, None, None, None)
    if want_logprobs:
        result.logprobs = raw_logprobs.gather(1, tokens.view(-1, 1)).squeeze(1)
        k = max(r.params.top_logprobs for r in rows)
        if k:
            result.top_logprobs, result.top_ids = raw_logprobs.topk(k, dim=-1)
    return result


def _sample_rows(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    dev = logits.device
    temp = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=dev)
    logits = logits / temp.view(-1, 1)
    vocab = logits.shape[-1]

    ks = [r.params.top_k if r.params.top_k and r.params.top_k > 0 else vocab for r in rows]
    if min(ks) < vocab:
        kmax = max(k for k in ks if k < vocab)
        kth = logits.topk(kmax, dim=-1).values  # (B, kmax)
        k_idx = torch.tensor([min(k, kmax) - 1 for k in ks], device=dev)
        thresh = kth.gather(1, k_idx.view(-1, 1))
        thresh = torch.where(torch.tensor(ks, device=dev).view(-1, 1) >= vocab,
                             torch.full_like(thresh, -float("inf")), thresh)
        logits = logits.masked_fill(logits < thresh, -float("inf"))

    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p      # mass strictly above each token
        drop_sorted = before > top_p.view(-1, 1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if bool((min_p > 0).any()):
        floor = probs.max(dim=-1, keepdim=True).values * min_p.view(-1, 1)
        probs = probs.masked_fill(probs < floor, 0.0)

    # one uniform per row from the row's own generator, then inverse CDF
    u = _uniforms(rows).to(dev)
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).view(-1, 1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    return idx.view(-1)


def _uniforms(rows) -> torch.Tensor:
    """One uniform per row: rows sharing a generator (unseeded ones share the engine's)
    draw together, a seeded row draws from its own."""
    u = torch.empty(len(rows))
    by_gen: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_gen.setdefault(id(r.generator), []).append(i)
    for idx in by_gen.values():
        u[idx] = torch.rand(len(idx), generator=rows[idx[0]].generator)
    return u
