"""The engine's waiting queue, fair between API keys.

Entries (anything with ``key``, ``request_id`` and ``t_arrival``) wait in one FIFO per
key; keys take turns (round robin): the head of the queue is the oldest entry of the key
whose turn it is, and once served a key goes to the back of the line.  So a key that
queued 200 requests delays another key's request by at most one of its own per
admission, instead of by all 200.  Within a key, order is arrival order.

It offers the ``deque`` operations the schedulers use (``append``, ``[0]``,
``popleft``, ``len``, truth) plus ``discard(request_id)`` for aborts and
``expire(cutoff)`` for the queue deadline.  The global cap (``--max-queue``) is the
engine's reservation count, not this class's business.  Worker thread only.
"""

from __future__ import annotations

from collections import deque


class FairQueue:
    def __init__(self):
        self._queues: dict[str, deque] = {}
        self._turns: deque[str] = deque()   # keys with waiting entries, whose turn first
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self):
        """Entries in the order ``popleft`` would serve them (if nothing else arrived)."""
        queues = {k: list(q) for k, q in self._queues.items()}
        turns = deque(self._turns)
        while turns:
            key = turns.popleft()
            yield queues[key].pop(0)
            if queues[key]:
                turns.append(key)

    def __getitem__(self, i: int):
        if i != 0 or not self._len:
            raise IndexError("FairQueue gives only its head, [0]")
        return self._queues[self._turns[0]][0]

    def append(self, entry):
        key = entry.key
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._turns.append(key)
        q.append(entry)
        self._len += 1

    def popleft(self):
        if not self._len:
            raise IndexError("pop from an empty FairQueue")
        key = self._turns.popleft()
        q = self._queues[key]
        entry = q.popleft()
        self._len -= 1
        if q:
            self._turns.append(key)  # served: to the back of the line
        else:
            del self._queues[key]
        return entry

    def discard(self, request_id: str) -> list:
        """Remove the entries of ``request_id`` (its client left); returns them."""
        return self._remove(lambda e: e.request_id == request_id)

    def expire(self, cutoff: float) -> list:
        """Remove and return the entries that arrived before ``cutoff``."""
        return self._remove(lambda e: e.t_arrival < cutoff)

    def _remove(self, drop) -> list:
        gone = []
        for key in list(self._turns):
            q = self._queues[key]
            kept = deque(e for e in q if not drop(e))
            if len(kept) == len(q):
                continue
            gone += [e for e in q if drop(e)]
            self._len -= len(q) - len(kept)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
                self._turns.remove(key)
        return gone
