"""Qwen-VL image preprocessing as one torch pipeline, on the model's device.

The fast twin of the PIL image processor (``Qwen2VLImageProcessorPil``), which stays the
reference and the ``--image-preprocess pil`` fallback.

Contract
--------
``TorchImageProcessor.from_hf(image_processor, device=...)`` takes every constant (patch,
merge and temporal patch sizes, rescale factor, mean, std, default pixel budget) from the HF
processor it replaces, and refuses (``ValueError``) a configuration it does not reproduce
(no resize, not bicubic, no rescale or no normalisation).

``proc(images, budgets=None) -> (pixel_values, image_grid_thw)`` for a list of RGB images
(``PIL.Image``, ``(H, W, 3)`` uint8 numpy arrays or tensors), each with an optional
``(min_pixels, max_pixels)`` budget (``None``: the processor's default):

1. each image becomes an ``(H, W, 3)`` uint8 tensor on the host (no copy for arrays and
   tensors) and is moved to ``device`` as uint8 (a quarter of float32's bytes);
2. its target size comes from the HF processor's own ``smart_resize`` (so the grids are the
   HF grids, by construction); images with the same source and target size are resized in
   one call;
3. resize with antialiased bicubic, as Pillow does it: on the CPU torch's uint8 kernel
   (written to match Pillow); elsewhere two float32 passes, horizontal then vertical, each
   rounded half up and clamped to 0..255 like Pillow's 8-bit intermediate.  An unchanged
   size is not resampled (Pillow copies it), and an image over 100 times taller than wide
   that shrinks is resized vertically first, as ``Image.resize`` does;
4. patchify in uint8 (cheap) into one buffer for all images, then one rescale + normalise
   (HF's ``(x * rescale_factor - mean) / std``, fused into ``x * gain + shift`` when the
   channels share mean and std, as Qwen's do) and the temporal duplication.

``proc.patches(...)`` stops before the normalisation (uint8 patches, an eighth of the
bytes) and ``proc.normalise(patches)`` finishes them on whatever device they are on: the
server patchifies on the host and normalises on the model's device, so pixel data crosses
to the device once and never comes back.

``pixel_values`` is ``(sum of patches, 3 * temporal_patch * patch**2)`` float32 on
``device`` in HF's layout (rows: merge blocks row-major, then the 2x2 patches inside a
block; columns: channel, time, patch row, patch column).  ``image_grid_thw`` is
``(images, 3)`` int64 on the host: its values are known without touching the device.

Tolerance against the PIL processor (tested in ``tests/test_vision_prep.py`` on 13 images:
tiny, noise, extreme aspect ratios, 4k and phone photos, EXIF-rotated): grids identical;
the resize agrees with Pillow's to within one 8-bit level per pass, at a small fraction of
pixels (measured: under 1% of values for sides below 10000 pixels, 3% for the float path
at 20000, where float32 sample positions lose precision), so ``pixel_values`` differ by
at most ``2 * rescale_factor / std`` (0.0157 for Qwen's std 0.5: two levels) and are
equal elsewhere up to float32 rounding (1e-6: HF rescales in float64).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TorchImageProcessor", "as_uint8_hwc"]

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as the HF processors store it


def as_uint8_hwc(image: Any) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 host tensor of an RGB image (PIL image, array or tensor)."""
    if isinstance(image, torch.Tensor):
        t = image
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(image)
    else:  # a PIL image: other modes converted exactly as the HF processor does
        if image.mode != "RGB":
            from transformers.image_transforms import convert_to_rgb
            image = convert_to_rgb(image)
        t = torch.from_numpy(np.array(image))  # np.array: a writable copy torch can own
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {tuple(t.shape)} {t.dtype}")
    return t


def hf_smart_resize(image_processor: Any) -> Callable[..., tuple[int, int]]:
    """The ``smart_resize`` of the module that defines the HF processor's class (each
    Qwen-VL processor module carries its own copy), else the PIL processor's module."""
    for name in (type(image_processor).__module__,
                 "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"):
        fn = getattr(importlib.import_module(name), "smart_resize", None)
        if fn is not None:
            return fn
    raise ValueError(f"no smart_resize found for {type(image_processor).__name__}")


def _budget(size: Any) -> tuple[int, int]:
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    return int(get("shortest_edge")), int(get("longest_edge"))


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """Pillow's 8-bit store: round half up, clamp to 0..255 (in place, stays float)."""
    return x.add_(0.5).floor_().clamp_(0, 255)


class TorchImageProcessor:
    """See the module docstring."""

    def __init__(self, *, smart_resize: Callable[..., tuple[int, int]], patch_size: int,
                 temporal_patch_size: int, merge_size: int, rescale_factor: float,
                 image_mean: Sequence[float], image_std: Sequence[float], min_pixels: int,
                 max_pixels: int, device: torch.device | str = "cpu",
                 resize_kernel: str = "auto"):
        self.smart_resize = smart_resize
        self.patch, self.temporal, self.merge = patch_size, temporal_patch_size, merge_size
        self.rescale_factor = float(rescale_factor)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.device = torch.device(device)
        # torch's uint8 antialiased kernel exists on the CPU only; "float" forces the
        # device path there too (tests check both against Pillow)
        if resize_kernel == "auto":
            resize_kernel = "uint8" if self.device.type == "cpu" else "float"
        if resize_kernel not in ("uint8", "float"):
            raise ValueError(f"resize_kernel must be auto, uint8 or float, not {resize_kernel!r}")
        self.resize_kernel = resize_kernel
        mean, std = [float(m) for m in image_mean], [float(s) for s in image_std]
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1)
        # channels that agree (Qwen: 0.5 everywhere) allow one fused pass, x * gain + shift
        self._fused = None
        if len(set(mean)) == 1 and len(set(std)) == 1:
            self._fused = (self.rescale_factor / std[0],
                           torch.tensor(-mean[0] / std[0], device=self.device))

    @classmethod
    def from_hf(cls, image_processor: Any, *, device: torch.device | str = "cpu",
                resize_kernel: str = "auto") -> "TorchImageProcessor":
        ip = image_processor
        unsupported = [name for name, ok in (
            ("do_resize", getattr(ip, "do_resize", True)),
            ("bicubic resample", int(getattr(ip, "resample", PIL_BICUBIC)) == PIL_BICUBIC),
            ("do_rescale", getattr(ip, "do_rescale", True)),
            ("do_normalize", getattr(ip, "do_normalize", True))) if not ok]
        if unsupported:
            raise ValueError(f"the torch image pipeline needs {', '.join(unsupported)}")
        min_pixels, max_pixels = _budget(ip.size)
        return cls(smart_resize=hf_smart_resize(ip), patch_size=ip.patch_size,
                   temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size,
                   rescale_factor=ip.rescale_factor, image_mean=ip.image_mean,
                   image_std=ip.image_std, min_pixels=min_pixels, max_pixels=max_pixels,
                   device=device, resize_kernel=resize_kernel)

    def target_size(self, height: int, width: int, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> tuple[int, int]:
        """(height, width) the image is resized to: the HF processor's arithmetic."""
        return self.smart_resize(height, width, factor=self.patch * self.merge,
                                 min_pixels=min_pixels or self.min_pixels,
                                 max_pixels=max_pixels or self.max_pixels)

    def __call__(self, images: Sequence[Any],
                 budgets: Sequence[tuple[int | None, int | None] | None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        patches, grids = self.patches(images, budgets)
        return self.normalise(patches), grids

    def patches(self, images: Sequence[Any],
                budgets: Sequence[tuple[int | None, int | None] | None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 and the patchify of step 4: ``(patches, 3, patch**2)`` uint8 on
        ``device`` (an eighth of the float32 pixel values' bytes) and the grids;
        ``normalise`` finishes them, possibly later and on another device."""
        if not images:
            raise ValueError("no images to preprocess")
        budgets = budgets or [None] * len(images)
        # (1) host uint8 tensors and (2) target sizes
        hosts = [as_uint8_hwc(im) for im in images]
        targets = [self.target_size(h.shape[0], h.shape[1], *(b or (None, None)))
                   for h, b in zip(hosts, budgets)]
        # (3) resize, one call per (source size, target size) group
        resized: list[torch.Tensor | None] = [None] * len(hosts)
        groups: dict[tuple, list[int]] = {}
        for i, (h, t) in enumerate(zip(hosts, targets)):
            groups.setdefault((tuple(h.shape[:2]), t), []).append(i)
        for (size, (th, tw)), idx in groups.items():
            if size == (th, tw):  # nothing to resample: no need to stack
                for i in idx:
                    resized[i] = hosts[i].to(self.device, non_blocking=True).permute(2, 0, 1)
                continue
            batch = hosts[idx[0]][None] if len(idx) == 1 else torch.stack([hosts[i] for i in idx])
            batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # N, 3, H, W
            out = self._resize(batch, th, tw)
            for j, i in enumerate(idx):
                resized[i] = out[j]
        # (4) patchify in uint8 into one buffer, then one normalise + temporal duplication
        counts = [(th // self.patch) * (tw // self.patch) for th, tw in targets]
        patches = torch.empty(sum(counts), 3, self.patch ** 2, dtype=torch.uint8,
                              device=self.device)
        for image, part in zip(resized, patches.split(counts)):
            self._patchify(image, part)
        grids = torch.tensor([[1, th // self.patch, tw // self.patch] for th, tw in targets],
                             dtype=torch.int64)
        return patches, grids

    def _resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, height, width) uint8, as Pillow's ``Image.resize``."""
        h, w = x.shape[-2:]
        if h > 100 * w and height < h:  # Pillow shrinks very tall images vertically first
            return self._resample(self._resample(x, height, w), height, width)
        return self._resample(x, height, width)

    def _resample(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One Pillow resample: horizontal pass, then vertical, 8 bits in between; an
        unchanged axis is not resampled."""
        if tuple(x.shape[-2:]) == (height, width):
            return x
        if self.resize_kernel == "uint8":
            return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True,
                                 align_corners=False)
        y = x.float()
        if y.shape[-1] != width:
            y = _round_u8(F.interpolate(y, size=(y.shape[-2], width), mode="bicubic",
                                        antialias=True, align_corners=False))
        if y.shape[-2] != height:
            y = _round_u8(F.interpolate(y, size=(height, width), mode="bicubic",
                                        antialias=True, align_corners=False))
        return y.to(torch.uint8)

    def _patchify(self, image: torch.Tensor, out: torch.Tensor) -> None:
        """(3, H, W) -> ``out`` (grid_h * grid_w, 3, patch**2), rows in HF's merge-block
        order.  Splitting H and W is a view whatever the strides: one copy, into ``out``."""
        c, h, w = image.shape
        p, m = self.patch, self.merge
        x = image.reshape(c, h // (p * m), m, p, w // (p * m), m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, c, py, px
        out.view(x.shape).copy_(x)

    def normalise(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 3, P) uint8 -> (N, 3 * temporal * P) float32 on the patches' device: HF's
        rescale and normalise, then the single frame repeated ``temporal`` times, written
        straight into the output (no float intermediate of the batch's size, few passes
        over memory)."""
        n, c, pp = patches.shape
        if self._mean.device != patches.device:  # the host half's constants, moved once
            self._mean, self._std = (self._mean.to(patches.device),
                                     self._std.to(patches.device))
            if self._fused is not None:
                self._fused = (self._fused[0], self._fused[1].to(patches.device))
        out = torch.empty(n, c, self.temporal, pp, device=patches.device)
        first = out[:, :, 0]
        if self._fused is not None:  # x * (scale / std) - mean / std, in one pass
            gain, shift = self._fused
            torch.add(shift, patches, alpha=gain, out=first)
        else:  # per-channel constants: HF's operations in HF's order
            first.copy_(patches)
            first.mul_(self.rescale_factor).sub_(self._mean).div_(self._std)
        out[:, :, 1:] = first.unsqueeze(2)
        return out.view(n, c * self.temporal * pp)
