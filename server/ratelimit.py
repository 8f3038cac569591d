"""Per-key limits: token buckets for requests and tokens, and a cap on concurrent sequences.

``Limiter.admit(key, cost, seqs)`` either returns a ``Ticket`` (the request holds ``seqs``
of the key's concurrent places, one per sequence it decodes: its ``n``, and has been
charged one request and ``cost`` tokens) or raises
``RateLimited`` (429, ``rate_limit_exceeded``) with a ``Retry-After`` in whole seconds
that says when the same request would be accepted (for the concurrency cap: when the
key's oldest running request should end, by the key's average request duration).  ``Ticket.finish(tokens)`` runs once
the response has ended: it frees the concurrent place and corrects the token charge
from the estimate to the real prompt + completion count (a refund, or a debt the key
pays off before its next request).

Buckets hold a minute's worth (``per_minute``) and refill continuously at
``per_minute / 60`` per second.  State is kept per key *name*, so a reloaded key file
keeps each key's spent budget; changed limits apply from the next request.  Everything
runs on the event loop: no locks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from server.errors import RateLimited
from server.keys import ApiKey, KeyLimits

EWMA = 0.2  # weight of the latest request in a key's average duration


class TokenBucket:
    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level, self.t = self.capacity, now

    def refill(self, now: float):
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 = now)."""
        return max(0.0, (amount - self.level) / self.rate)

    def resize(self, per_minute: int):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level = min(self.level, self.capacity)


@dataclass
class _KeyState:
    limits: KeyLimits
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    running: int = 0
    starts: dict[int, float] = field(default_factory=dict)  # running tickets' start times
    avg_s: float | None = None       # the key's average request duration (EWMA)
    next_id: int = 0

    def place_frees_in(self, now: float) -> float:
        """When the oldest running request should end, going by the key's average
        duration (1 s before any request has finished)."""
        if self.avg_s is None or not self.starts:
            return 1.0
        return min(self.starts.values()) + self.avg_s - now

    def apply(self, limits: KeyLimits, now: float):
        """(Re)configure the buckets for ``limits``, keeping what was already spent."""
        self.limits = limits
        for attr, per_minute in (("requests", limits.requests_per_minute),
                                 ("tokens", limits.tokens_per_minute)):
            bucket = getattr(self, attr)
            if per_minute is None:
                setattr(self, attr, None)
            elif bucket is None:
                setattr(self, attr, TokenBucket(per_minute, now))
            else:
                bucket.refill(now)
                bucket.resize(per_minute)


@dataclass
class Ticket:
    state: _KeyState | None
    charged: int
    clock: object = field(default=time.monotonic, repr=False)
    done: bool = False
    id: int = 0
    seqs: int = 1
    # the prompt tokens the engine scheduled for prefill (set from the engine-core
    # process's model thread, ``server.engine.proc``): the least ``finish`` charges, even
    # when the client left before its API server heard of the prefill
    prefilled: int = 0

    def finish(self, tokens_used: int | None = None):
        """The response ended: free the place; charge the real token count (None: keep
        the estimate), at least the prompt it prefilled.  Idempotent."""
        if self.done or self.state is None:
            self.done = True
            return
        if tokens_used is not None:
            tokens_used = max(tokens_used, self.prefilled)
        self.done = True
        now = self.clock()
        state = self.state
        state.running -= self.seqs
        took = now - state.starts.pop(self.id, now)
        state.avg_s = took if state.avg_s is None else (1 - EWMA) * state.avg_s + EWMA * took
        bucket = state.tokens
        if bucket is not None and tokens_used is not None:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level + self.charged - tokens_used)


class Limiter:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._states: dict[str, _KeyState] = {}

    def running(self, name: str) -> int:
        s = self._states.get(name)
        return s.running if s else 0

    def admit(self, key: ApiKey, cost: int, seqs: int = 1) -> Ticket:
        lim = key.limits
        if lim == KeyLimits():
            return Ticket(None, 0, self.clock)
        now = self.clock()
        state = self._states.get(key.name)
        if state is None:
            state = self._states[key.name] = _KeyState(lim)
            state.apply(lim, now)
        elif state.limits != lim:
            state.apply(lim, now)
        if lim.max_concurrent is not None and seqs > lim.max_concurrent:
            raise RateLimited(  # no wait would make it fit
                f"Request too large for key '{key.name}': n={seqs} sequences, more than its "
                f"limit of {lim.max_concurrent} concurrent sequences. Lower n.",
                retry_after=None)
        if lim.max_concurrent is not None and state.running + seqs > lim.max_concurrent:
            raise RateLimited(
                f"Rate limit reached for key '{key.name}': {lim.max_concurrent} concurrent "
                "sequences at most (n counts each); retry when one of its requests has "
                "finished.", retry_after=max(1, math.ceil(state.place_frees_in(now))))
        tokens, requests = state.tokens, state.requests
        if tokens is not None and cost > tokens.capacity:
            # like OpenAI's "Request too large": no wait would make it fit
            raise RateLimited(
                f"Request too large for key '{key.name}': it may use up to {cost} tokens "
                f"(prompt + max_tokens), more than its limit of {lim.tokens_per_minute} "
                "tokens per minute. Lower max_tokens or the prompt.", retry_after=None)
        waits = []
        for bucket, amount in ((requests, 1), (tokens, cost)):
            if bucket is not None:
                bucket.refill(now)
                waits.append(bucket.wait(amount))
        wait = max(waits, default=0.0)
        if wait > 0:
            which = ("requests" if requests is not None and requests.wait(1) >= wait
                     else "tokens")
            limit = lim.requests_per_minute if which == "requests" else lim.tokens_per_minute
            raise RateLimited(
                f"Rate limit reached for key '{key.name}' on {which} per minute "
                f"(limit {limit}); retry in {math.ceil(wait)} s.",
                retry_after=max(1, math.ceil(wait)))
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= cost
        state.running += seqs
        state.next_id += 1
        state.starts[state.next_id] = now
        return Ticket(state, cost, self.clock, id=state.next_id, seqs=seqs)


TOKENS_PX = 32 * 32


def video_token_bound(max_pixels: int, min_pixels: int, max_frames: int) -> int:
    """The most prompt tokens one video can stand for under the server's video budget.
    Qwen's processor sizes a video's frames so that ``frames x height x width`` stays
    within ``max_pixels``, counting the frames rounded to an even number, while the tokens
    come in frame pairs with an odd last frame doubled: at most 1.5 x ``max_pixels / 2048``
    (5 frames: 4 counted, 3 pairs), plus what rounding up to the 32-pixel grid adds under
    the ``min_pixels`` floor; a frame's short side never shrinks below 32 pixels, which
    for a thin frame (aspect ratio up to 200) can keep up to 32 x 6,400 pixels, 200 tokens
    a pair, whatever the budget; and per pair the ``<t seconds>`` text and the start/end
    markers the processor writes (12 tokens), plus the template's own 2.
    ``tests/test_video_engine.py`` checks it against the processor's arithmetic."""
    pairs = (max_frames + 1) // 2
    return math.ceil(1.5 * max_pixels / (2 * TOKENS_PX)) + math.ceil(4 * min_pixels / TOKENS_PX) \
        + pairs * (200 + 12) + 2


def estimate_tokens(req, default_max_tokens: int, max_pixels: int,
                    video_tokens: int = 0) -> int:
    """What a chat (or legacy completion) request may cost at most, before its prompt is
    tokenized: an upper bound for any text (``text_size``: the UTF-8 bytes of every text
    the template renders, tools and tool-call arguments included, plus the template's own
    tokens; a token-id prompt's length), each image at its full pixel budget, plus ``n``
    x max_tokens (each video at ``video_tokens``: ``video_token_bound``).  The charge is
    corrected to the tokens really used when the response ends."""
    prompt = req.text_size.token_bound + req.image_count * (max_pixels // TOKENS_PX) \
        + req.video_count * video_tokens
    max_tokens = req.requested_max_tokens or default_max_tokens
    return prompt + req.n * max_tokens
