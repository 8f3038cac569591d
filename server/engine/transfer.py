"""Host tensors to the model's device without stalling the host.

A copy from pageable host memory makes the host wait for the device's stream (CUDA
stages it through a bounce buffer); one from pinned memory with ``non_blocking`` is
queued and returns.  PyTorch's caching host allocator keeps the pinned block alive until
the copy has run, so the source may be dropped at once.  Off CUDA it is a plain ``to``.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
