"""The shared counter of CUDA-syncing operations (``tests/sync_counter.py``) sees each
kind of sync it lists, and nothing that does not sync."""

from __future__ import annotations

import pytest
import torch

from tests.sync_counter import HostSyncs

x = torch.arange(12.0).reshape(3, 4)
m = x > 5

SYNCS = {
    "item": lambda: x.sum().item(),
    "bool": lambda: bool(x.sum() > 0),
    "int": lambda: int(x[0, 1]),
    "tolist": lambda: x.tolist(),
    "cpu": lambda: x.cpu(),
    "numpy": lambda: x.numpy(),
    "nonzero": lambda: x.nonzero(),
    "where-one-arg": lambda: torch.where(m),
    "argwhere": lambda: torch.argwhere(m),
    "bool-mask-index": lambda: x[m],
    "bool-mask-assign": lambda: x.clone().__setitem__(m, 0.0),
    "masked_select": lambda: x.masked_select(m),
    "unique": lambda: torch.unique(x),
    "unique_consecutive": lambda: torch.unique_consecutive(x),
    "repeat_interleave-no-size": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
    "bincount": lambda: torch.bincount(torch.tensor([0, 2, 2])),
    "equal": lambda: torch.equal(x, x),
    "allclose": lambda: torch.allclose(x, x),
}
FREE = {
    "arithmetic": lambda: (x * 2 + 1).softmax(-1),
    "masked_fill": lambda: x.masked_fill(m, 0.0),
    "where-three-args": lambda: torch.where(m, x, 0.0),
    "long-index": lambda: x[torch.tensor([0, 2])],
    "repeat_interleave-sized": lambda: torch.repeat_interleave(
        torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3),
    "topk-sort-gather": lambda: x.topk(2).indices.sort().values.gather(1, torch.zeros(3, 1, dtype=torch.long)),
    "nonzero_static": lambda: torch.nonzero_static(m.flatten(), size=12),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_each_cuda_sync_is_counted(name):
    with HostSyncs() as s:
        SYNCS[name]()
    assert s.count >= 1, name


@pytest.mark.parametrize("name", list(FREE))
def test_sync_free_ops_are_not_counted(name):
    with HostSyncs() as s:
        FREE[name]()
    assert s.count == 0, (name, s.seen)


def test_patches_are_undone():
    orig = torch.Tensor.tolist
    with HostSyncs():
        assert torch.Tensor.tolist is not orig
    assert torch.Tensor.tolist is orig
