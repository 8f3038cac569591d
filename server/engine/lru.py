"""A thread-safe LRU map within a byte budget, with hit/miss counters.

Contract
--------
``cache = ByteLRU(capacity_bytes)``; ``cache.put(key, value, nbytes)`` stores ``value``
charged ``nbytes`` and evicts least recently used entries until the total fits the
capacity; ``cache.get(key)`` returns the value (now most recently used) or ``None``, and
counts a hit or a miss.  ``peek`` reads without touching order or counters.

* A value larger than the whole capacity is not stored (``put`` returns False), and
  neither is anything when the capacity is 0 (the cache is off: ``enabled`` is False,
  ``get`` still counts misses so that hit rates stay honest).
* Re-putting a key replaces its value and charge.
* Values are shared, not copied: callers must treat them as immutable (e.g. tensors that
  nobody writes in place).
* Every method takes one lock: use one instance from any number of threads.  Two threads
  that miss the same key at once both compute it; the second ``put`` simply replaces the
  first (computing twice is rare and harmless, holding the lock while computing is not).

``stats()`` returns the counters: ``hits``, ``misses``, ``queries`` (hits + misses),
``evictions``, ``bytes`` (charged now), ``entries`` and ``capacity``.

Used for preprocessed image pixels (``server.engine.prompt``) and meant for the vision
encoder's outputs as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity = int(capacity_bytes)
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: Hashable) -> V | None:
        """The value without counting a query or refreshing its place."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> bool:
        """Store ``value`` charged ``nbytes``; False when it cannot fit at all."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if nbytes > self.capacity:
                return False
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.capacity:
                _, (_, n) = self._items.popitem(last=False)
                self.bytes -= n
                self.evictions += 1
            return True

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses,
                    "queries": self.hits + self.misses, "evictions": self.evictions,
                    "bytes": self.bytes, "entries": len(self._items),
                    "capacity": self.capacity}
