"""Issue 29, the encoder: many images in one call with no host sync inside it
(server/engine/vision.py), against its slow twin, the model's own vision forward run one
image at a time (float32), and counted with the shared counter of CUDA-syncing ops."""

from __future__ import annotations

import logging

import pytest
import torch

from server.engine import vision
from server.engine.core import AsyncEngine
from models.loader import load_model
from server.settings import Settings
from tests.sync_counter import HostSyncs

# (t, h, w) in patches: equal sizes (one view, no padding) and a mix (padded layout)
EQUAL = [(1, 8, 8)] * 3
MIXED = [(1, 8, 8), (1, 4, 12), (1, 16, 8), (1, 4, 4)]


@pytest.fixture(scope="module")
def loaded(toy_model):
    return load_model(Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536))


@pytest.fixture(scope="module")
def visual(loaded):
    return loaded.model.model.visual


def pixels(visual, grids, seed=0):
    cfg = visual.config
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def own_forward_one_at_a_time(visual, pix, grids):
    merged, deep, start = [], [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        res = visual(pix[start:start + n], grid_thw=torch.tensor([g]), return_dict=True)
        merged.append(res.pooler_output)
        deep.append(res.deepstack_features)
        start += n
    return torch.cat(merged), [torch.cat(d) for d in zip(*deep)]


@pytest.mark.parametrize("grids", [EQUAL, MIXED], ids=["equal", "mixed"])
def test_batched_encoder_equals_the_models_own_forward_one_image_at_a_time(visual, grids):
    assert visual.dtype == torch.float32 and len(visual.deepstack_visual_indexes) > 0
    pix = pixels(visual, grids)
    p = vision.plan(grids, visual, "cpu")
    assert (p.gather is None) == (grids is EQUAL)  # both layouts are exercised
    with torch.inference_mode():
        merged, deep = vision.encode(visual, pix, p)
        ref_merged, ref_deep = own_forward_one_at_a_time(visual, pix, grids)
    assert merged.shape == ref_merged.shape and len(deep) == len(ref_deep)
    for ours, ref in zip([merged, *deep], [ref_merged, *ref_deep]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grids", [EQUAL, MIXED], ids=["equal", "mixed"])
def test_encoder_call_makes_no_host_sync(visual, grids):
    """The device side of one call (everything after the host-side plan) reads nothing
    back; the model's own forward syncs in every block (the baseline it replaces)."""
    pix = pixels(visual, grids)
    p = vision.plan(grids, visual, "cpu")
    with torch.inference_mode():
        with HostSyncs() as ours:
            vision.encode(visual, pix, p)
        with HostSyncs() as own:
            visual(pix, grid_thw=torch.tensor(grids), return_dict=True)
    assert ours.count == 0, ours.seen
    assert own.count >= len(visual.blocks), own.seen
    print(f"host syncs per encoder call over {len(grids)} images, {len(visual.blocks)} "
          f"blocks: batched {ours.count}, the model's own {own.count} ({dict(own.seen)})")


@pytest.fixture(scope="module")
def engine(toy_model, loaded):
    s = Settings(model_path=toy_model, min_pixels=4096, max_pixels=65536)
    e = AsyncEngine(loaded, s)
    yield e
    e.close()


def test_runner_encode_reads_the_host_grids_once(engine, visual):
    """A whole ``ModelRunner.encode`` of a burst (the grid tables of its sizes already
    known, as in any burst after the first photo of a size): at most one read, of the
    grids' host tensor, which on a GPU is no sync at all."""
    runner = engine.runner
    assert runner.encoder_path == "batched"
    grids = MIXED * 4  # 16 images
    pix = pixels(visual, grids)
    keys = [None] * len(grids)  # uncached: all encoded in this one call
    with torch.inference_mode():
        runner.encode(pix, torch.tensor(grids), keys)  # first sight of these sizes
        with HostSyncs() as syncs:
            out = runner.encode(pixels(visual, grids, seed=1), torch.tensor(grids), keys)
    assert syncs.count <= 1, syncs.seen
    assert [o[0].shape[0] for o in out] == [t * h * w // 4 for t, h, w in grids]


def test_startup_check_falls_back_to_the_models_forward(engine, monkeypatch, caplog):
    """A batched encoder that disagrees with the model's own forward (here: one block's
    attention output scaled) is not used; the log says which path runs."""
    runner = engine.runner
    real = vision._attention
    monkeypatch.setattr(vision, "_attention", lambda *a: real(*a) * 1.01)
    with caplog.at_level(logging.INFO, logger="qwen_vl.engine"):
        assert runner.check_encoder() == "model"
    assert "vision encoder: the model's own forward" in caplog.text
    monkeypatch.setattr(vision, "_attention", real)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen_vl.engine"):
        assert runner.check_encoder() == "batched"
    assert "vision encoder: batched" in caplog.text
