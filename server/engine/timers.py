"""Per-stage timers of the engine, for benchmarks (off unless enabled).

``timers.stage(name)`` is a context manager around one stage of a step (``admission``,
``encoder``, ``prefill``, ``decode``) or of a request's preparation (``preparation``, on
the preparation threads).  When enabled it adds the stage's host time (``perf_counter``)
and, on CUDA, records a pair of CUDA events on the current stream, whose elapsed device
time is read only by ``report()`` (after one synchronize): timing never makes a step
wait.  Disabled (the default), ``stage`` returns a shared no-op context.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import torch

_NOOP = contextlib.nullcontext()


class StageTimers:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = False
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.host = defaultdict(float)
            self.calls = defaultdict(int)
            self.tokens = defaultdict(int)      # stages given ``tokens=``: their sum
            self.max_tokens = defaultdict(int)  # ... and the most in one call
            self.events: dict[str, list] = defaultdict(list)

    def enable(self, on: bool = True):
        self.enabled = on

    def stage(self, name: str, tokens: int | None = None):
        return self._timed(name, tokens) if self.enabled else _NOOP

    @contextlib.contextmanager
    def _timed(self, name: str, tokens: int | None):
        pair = None
        if self.cuda and threading.current_thread().name == "engine":
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            if pair is not None:
                pair[1].record()
            with self._lock:
                self.host[name] += dt
                self.calls[name] += 1
                if tokens is not None:
                    self.tokens[name] += tokens
                    self.max_tokens[name] = max(self.max_tokens[name], tokens)
                if pair is not None:
                    self.events[name].append(pair)

    def report(self) -> dict:
        """``{stage: {"calls", "host_s", "device_s" (CUDA only), "tokens" and "max_tokens"
        (stages timed with ``tokens=``)}}`` since the last reset."""
        with self._lock:  # (a stage still running appends its pair after this: not read)
            for pairs in self.events.values():
                for _, end in pairs:
                    end.synchronize()
            out = {}
            for name in self.host:
                row = {"calls": self.calls[name], "host_s": round(self.host[name], 4)}
                if name in self.tokens:
                    row["tokens"] = self.tokens[name]
                    row["max_tokens"] = self.max_tokens[name]
                if self.events.get(name):
                    row["device_s"] = round(sum(a.elapsed_time(b) for a, b in
                                                self.events[name]) / 1000, 4)
                out[name] = row
            return out
