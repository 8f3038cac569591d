"""Qwen3-VL video preprocessing in torch, without torchvision.

The twin of transformers' ``Qwen3VLVideoProcessor`` (which needs torchvision) for frames
already decoded and sampled by ``models/video.py``.

Contract
--------
``TorchVideoProcessor.from_config(cfg)`` takes its constants from a video processor config
dict (the keys of ``video_preprocessor_config.json``: ``size`` {shortest_edge,
longest_edge}, ``patch_size``, ``temporal_patch_size``, ``merge_size``, ``image_mean``,
``image_std``, ``rescale_factor``, ``fps``, ``min_frames``, ``max_frames``,
``max_video_tokens``); a missing key takes ``Qwen3VLVideoProcessor``'s class default.  It
refuses (``ValueError``) what it does not reproduce: no resize, rescale or normalisation,
or a resample other than bicubic.  ``load_video_config(model_path)`` reads that dict from
a model folder.

The per-frame pixel cap of qwen-vl-utils is always on (HF's ``cap_pixels_per_frame=True``,
whatever the config says): a frame gets at most ``max_video_tokens * (patch*merge)**2``
pixels, at most its share ``max_pixels // frames`` of the budget, and at least
``1.05 * min_pixels``.

``proc(frames, min_pixels=None, max_pixels=None) -> (pixel_values, (t, gh, gw))`` for a
``(T, H, W, 3)`` uint8 RGB array equals HF's ``pixel_values_videos`` / ``video_grid_thw``
for the same frames (bit for bit on the CPU; tested against committed HF output in
``tests/test_video_prep.py``):

1. the target size is HF's ``smart_resize`` (imported, not rewritten) on HF's capped budget;
2. the frames, as ``(T, 3, H, W)``, are resized the way torchvision's ``resize_image``
   resizes a uint8 tensor with BICUBIC and ``antialias=True``: on the CPU torch's native
   uint8 antialiased bicubic kernel (torchvision hands uint8 straight to it there); on
   other devices float32 interpolation, clamp to 0..255, round, back to uint8 (its GPU
   path).  An unchanged size is not resampled (torchvision returns the input);
3. patchify in uint8 (HF's layout: rows are merge blocks row-major then the patches in a
   block, columns are channel, time, patch row, patch column), the time axis padded to a
   multiple of ``temporal_patch_size`` by repeating the last frame;
4. rescale + normalise as HF's fused ``rescale_and_normalize``: ``(float32(x) - mean*255)
   / (std*255)`` with the same float32 constants, per element (so the order relative to
   patchify does not change a bit).

``pixel_values`` is ``(t*gh*gw, 3*temporal_patch*patch**2)`` float32 on the processor's
device.  One frame (``T == 1``; HF refuses it in ``smart_resize``) is processed as the
frame repeated twice, which is what HF's temporal padding makes of it anyway.
``smart_resize`` raises ``ValueError`` for aspect ratios over 200.

``timestamps(frame_indices, fps)`` is HF's ``Qwen3VLProcessor._calculate_timestamps``
(one per temporal group: the mean time of its first and last frame, the last index
repeated to fill the final group) and ``placeholder(grid, timestamps)`` the text that
replaces one ``<|vision_start|><|video_pad|><|vision_end|>`` of the chat template in HF's
processed prompt: per temporal group ``<{t:.1f} seconds>`` + ``<|vision_start|>`` +
``<|video_pad|>`` * (gh*gw/merge**2) + ``<|vision_end|>``; it replaces the template's
``<|video_pad|>`` only, so all of it sits inside the template's own
``<|vision_start|>``/``<|vision_end|>``, as in HF's prompt.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TorchVideoProcessor", "load_video_config"]

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as the HF configs store it
VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"


def load_video_config(model_path: str | os.PathLike) -> dict:
    """The video processor config of a model folder: ``video_preprocessor_config.json``,
    else ``processor_config.json``'s ``video_processor`` entry, else ``{}``."""
    path = os.path.join(model_path, "video_preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    path = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            entry = json.load(f).get("video_processor")
        if isinstance(entry, dict):
            return entry
    return {}


def _smart_resize():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    return smart_resize


class TorchVideoProcessor:
    """Frames in, HF's ``pixel_values_videos`` and grid out; see the module docstring."""

    def __init__(self, *, patch_size: int, temporal_patch_size: int, merge_size: int,
                 min_pixels: int, max_pixels: int, image_mean, image_std,
                 rescale_factor: float, fps: float, min_frames: int, max_frames: int,
                 max_video_tokens: int, device: str | torch.device = "cpu"):
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)
        self.fps = float(fps)
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        self.max_video_tokens = int(max_video_tokens)
        self.device = torch.device(device)
        # HF's fused constants (_fuse_mean_std_and_rescale_factor + tvF.normalize): float32
        # tensors times 1/rescale_factor, in float32
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        per_channel = self.temporal_patch_size * self.patch_size ** 2
        self._mean_col = mean.to(torch.float32).repeat_interleave(per_channel).to(self.device)
        self._std_col = std.to(torch.float32).repeat_interleave(per_channel).to(self.device)

    @classmethod
    def from_config(cls, cfg: dict | None, device: str | torch.device = "cpu"
                    ) -> "TorchVideoProcessor":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor as D)

        cfg = dict(cfg or {})
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if cfg.get(key, True) is False:
                raise ValueError(f"video processor config: {key}=false is not supported")
        resample = cfg.get("resample", int(D.resample))
        if int(resample) != PIL_BICUBIC:
            raise ValueError(f"video processor config: resample={resample} is not supported "
                             "(bicubic only)")
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge", cfg.get("min_pixels", D.size["shortest_edge"]))
        max_pixels = size.get("longest_edge", cfg.get("max_pixels", D.size["longest_edge"]))

        def get(key):
            v = cfg.get(key)
            return getattr(D, key) if v is None else v

        return cls(patch_size=get("patch_size"), temporal_patch_size=get("temporal_patch_size"),
                   merge_size=get("merge_size"), min_pixels=min_pixels, max_pixels=max_pixels,
                   image_mean=get("image_mean"), image_std=get("image_std"),
                   rescale_factor=get("rescale_factor"), fps=get("fps"),
                   min_frames=get("min_frames"), max_frames=get("max_frames"),
                   max_video_tokens=get("max_video_tokens"), device=device)

    # -- sizes and token counts -------------------------------------------------------

    def target_size(self, num_frames: int, height: int, width: int,
                    min_pixels: int | None = None, max_pixels: int | None = None
                    ) -> tuple[int, int]:
        """The resized ``(height, width)`` of every frame: HF's ``resize`` arithmetic with
        ``cap_pixels_per_frame=True``."""
        min_pixels = self.min_pixels if min_pixels is None else int(min_pixels)
        max_pixels = self.max_pixels if max_pixels is None else int(max_pixels)
        n = max(int(num_frames), self.temporal_patch_size)  # one frame: as if repeated
        factor = self.patch_size * self.merge_size
        frame_cap = self.max_video_tokens * factor * factor
        per_frame = max(min(frame_cap, max_pixels // n), int(min_pixels * 1.05))
        h, w = _smart_resize()(num_frames=n, height=int(height), width=int(width),
                               temporal_factor=self.temporal_patch_size, factor=factor,
                               min_pixels=min_pixels, max_pixels=per_frame * n)
        return int(h), int(w)

    def grid(self, num_frames: int, height: int, width: int, min_pixels: int | None = None,
             max_pixels: int | None = None) -> tuple[int, int, int]:
        h, w = self.target_size(num_frames, height, width, min_pixels, max_pixels)
        t = math.ceil(int(num_frames) / self.temporal_patch_size)
        return t, h // self.patch_size, w // self.patch_size

    def frame_tokens(self, grid: tuple[int, int, int]) -> int:
        """Language tokens of one temporal group."""
        return grid[1] * grid[2] // self.merge_size ** 2

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """``<|video_pad|>`` tokens of the whole video."""
        return grid[0] * grid[1] * grid[2] // self.merge_size ** 2

    # -- pixels ---------------------------------------------------------------------

    def _resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """torchvision's ``resize_image`` of a uint8 ``(N, 3, H, W)`` tensor, BICUBIC,
        antialias=True."""
        if x.device.type == "cpu":
            # torchvision passes uint8 to torch's native kernel on the CPU for bicubic
            return F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False,
                                 antialias=True)
        y = F.interpolate(x.to(torch.float32), size=[h, w], mode="bicubic",
                          align_corners=False, antialias=True)
        return y.clamp_(min=0, max=255).round_().to(torch.uint8)

    def patches(self, frames: np.ndarray | torch.Tensor, min_pixels: int | None = None,
                max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized, patchified uint8 ``(t*gh*gw, 3*temporal*patch**2)`` and the grid."""
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) \
            else frames
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3 or x.shape[0] < 1:
            raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(x.shape)} "
                             f"{x.dtype}")
        num_frames, height, width = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
        h, w = self.target_size(num_frames, height, width, min_pixels, max_pixels)
        # (T, 3, H, W) contiguous, the layout HF resizes
        x = x.to(self.device).permute(0, 3, 1, 2).contiguous()
        if (h, w) != (height, width):
            x = self._resize(x, h, w)
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -num_frames % tp:
            x = torch.cat((x, x[-1:].expand(pad, -1, -1, -1)), dim=0)
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)

    def normalise(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches -> HF's float32 ``pixel_values_videos`` (same device)."""
        mean, std = self._mean_col.to(patches.device), self._std_col.to(patches.device)
        return patches.to(torch.float32).sub_(mean).div_(std)

    def __call__(self, frames: np.ndarray | torch.Tensor, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        patches, grid = self.patches(frames, min_pixels, max_pixels)
        return self.normalise(patches), grid

    # -- prompt text ----------------------------------------------------------------

    def timestamps(self, frame_indices: list[int], fps: float) -> list[float]:
        """One timestamp (seconds) per temporal group, as HF's processor computes them."""
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        # it does not use ``self``; it extends the list it is given, hence the copy
        return list(Qwen3VLProcessor._calculate_timestamps(
            None, [int(i) for i in frame_indices], float(fps), self.temporal_patch_size))

    def placeholder(self, grid: tuple[int, int, int], timestamps: list[float]) -> str:
        """The text HF's processor puts in place of the ``<|video_pad|>`` of the chat
        template's ``<|vision_start|><|video_pad|><|vision_end|>`` for this video (it
        replaces the pad only: the template's markers stay around it)."""
        t = int(grid[0])
        if len(timestamps) < t:
            raise ValueError(f"{len(timestamps)} timestamps for {t} temporal groups")
        group = VISION_START + VIDEO_PAD * self.frame_tokens(grid) + VISION_END
        return "".join(f"<{timestamps[i]:.1f} seconds>" + group for i in range(t))

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
            "image_mean", "image_std", "rescale_factor", "fps", "min_frames", "max_frames",
            "max_video_tokens")}
