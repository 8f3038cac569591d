"""Image-only Qwen3-VL processor that works without torchvision.

Contract
--------
``load_processor(model_path, *, min_pixels=None, max_pixels=None)`` returns an object
``proc`` that behaves like ``transformers.Qwen3VLProcessor`` for text and images:

* ``proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
  tools=None)`` renders the model's chat template to a prompt string. Image parts
  (``{"type": "image"}``) become ``<|vision_start|><|image_pad|><|vision_end|>``.
* ``proc(text=[...], images=[PIL.Image, ...] or None, return_tensors="pt",
  images_kwargs={...})`` returns a ``BatchFeature`` with ``input_ids``,
  ``attention_mask`` and ``mm_token_type_ids`` (0 text, 1 image, 2 video), plus
  ``pixel_values`` and ``image_grid_thw`` when images are given. Every
  ``<|image_pad|>`` in the text is expanded to ``image_grid_thw[i].prod() // merge_size**2``
  copies, in order, exactly as the upstream processor does.
* Per-call pixel budgets: pass ``images_kwargs=image_budget_kwargs(min_pixels, max_pixels)``
  (transformers 5.23: ``{"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}``;
  the older ``min_pixels``/``max_pixels`` call kwargs still work but emit a FutureWarning).
  ``min_pixels``/``max_pixels`` given to ``load_processor`` change the processor's defaults.
* ``proc.tokenizer`` is a fast (``tokenizers``-backed) tokenizer; ``proc.image_processor``
  is ``Qwen2VLImageProcessorPil`` when torchvision is absent.

Without torchvision the returned processor is an :class:`ImageOnlyQwen3VLProcessor`: it has
no video processor and raises :class:`VideoNotSupportedError` for ``videos=`` or for text that
contains ``<|video_pad|>`` (upstream would silently leave a single, meaningless video token).
When torchvision *is* importable, ``load_processor`` returns the full ``AutoProcessor``
(same image behaviour, video supported) and falls back to the image-only class if that fails.
``has_video_support()`` says whether torchvision is importable.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "ImageOnlyQwen3VLProcessor",
    "VideoNotSupportedError",
    "has_video_support",
    "image_budget_kwargs",
    "load_processor",
]


class VideoNotSupportedError(ValueError):
    """Raised when video input reaches a processor that has no video processor."""


@functools.lru_cache(maxsize=1)
def has_video_support() -> bool:
    """True when torchvision is importable (the Qwen3-VL video processor needs it)."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def image_budget_kwargs(min_pixels: int | None, max_pixels: int | None, *, processor: Any = None) -> dict:
    """``images_kwargs`` that set a per-call pixel budget for each image.

    transformers 5.23 resizes with ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``
    (both keys are required at resize time; they are pixel *areas*, not edge lengths).
    A ``None`` bound is taken from ``processor.image_processor.size`` when a processor is given;
    with no processor both bounds must be given (or both ``None``, which returns ``{}``).
    """
    if min_pixels is None and max_pixels is None:
        return {}
    if min_pixels is None or max_pixels is None:
        if processor is None:
            raise ValueError("image_budget_kwargs needs both bounds, or a processor to take the missing one from")
        default_min, default_max = default_pixel_budget(processor)
        min_pixels = default_min if min_pixels is None else min_pixels
        max_pixels = default_max if max_pixels is None else max_pixels
    min_pixels, max_pixels = int(min_pixels), int(max_pixels)
    if min_pixels <= 0 or max_pixels <= 0:
        raise ValueError("pixel budgets must be positive")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}


def default_pixel_budget(processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor's image processor uses by default."""
    size = processor.image_processor.size
    get = size.get if hasattr(size, "get") else lambda k, d=None: getattr(size, k, d)
    return int(get("shortest_edge")), int(get("longest_edge"))


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the (torchvision-only) video processor.

    ``__init__`` takes only ``image_processor``, ``tokenizer`` and ``chat_template`` so that
    ``ProcessorMixin`` treats image processor and tokenizer as the only sub-processors.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Same token bookkeeping as Qwen3VLProcessor.__init__, minus the video processor.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = getattr(
            tokenizer, "vision_start_token_id", None
        ) or tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = getattr(tokenizer, "vision_end_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.vision_end_token
        )

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None:
            raise VideoNotSupportedError("video input needs torchvision, which is not installed")
        if text is not None:
            samples = [text] if isinstance(text, str) else text
            if any(isinstance(s, str) and self.video_token in s for s in samples):
                raise VideoNotSupportedError(
                    f"prompt contains {self.video_token} but video input needs torchvision, which is not installed"
                )
        return super().__call__(images=images, text=text, videos=None, audio=audio, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        # Save under the upstream class name so AutoProcessor (with torchvision) can load the folder.
        out = super().to_dict()
        out["processor_class"] = "Qwen3VLProcessor"
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        # ProcessorMixin stamps our class name into tokenizer_config.json; use the upstream one.
        cfg_path = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            if cfg.get("processor_class") == type(self).__name__:
                cfg["processor_class"] = "Qwen3VLProcessor"
                with open(cfg_path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        self.tokenizer._set_processor_class("Qwen3VLProcessor")
        return files


def _set_default_budget(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels is None and max_pixels is None:
        return
    size = image_budget_kwargs(min_pixels, max_pixels, processor=processor)["size"]
    ip = processor.image_processor
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else dict(size)
    # Keep the legacy attributes (if any) consistent with size.
    for attr, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(ip, attr):
            setattr(ip, attr, value)
    # The full processor's video processor keeps its own budget: leave it alone.


def _load_image_only(model_path: str, **hub_kwargs: Any) -> ImageOnlyQwen3VLProcessor:
    tokenizer = AutoTokenizer.from_pretrained(model_path, **hub_kwargs)
    if not getattr(tokenizer, "is_fast", True):
        raise TypeError(f"expected a fast tokenizer for {model_path}, got {type(tokenizer).__name__}")
    try:
        image_processor = AutoImageProcessor.from_pretrained(
            model_path, backend="torchvision" if has_video_support() else "pil", **hub_kwargs
        )
    except ImportError:  # transformers < 5.2x has no backend= and asks for torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path, **hub_kwargs)
    # Chat template: processor-level files (chat_template.jinja / chat_template.json /
    # processor_config.json) first, then the tokenizer's own.
    processor_dict, _ = ProcessorMixin.get_processor_dict(model_path, **hub_kwargs)
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_processor(
    model_path: str,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **hub_kwargs: Any,
) -> ImageOnlyQwen3VLProcessor:
    """Load tokenizer + image processor + chat template from ``model_path``.

    ``model_path`` is a local folder or a hub id (anything ``from_pretrained`` accepts);
    ``hub_kwargs`` (``revision``, ``local_files_only``, ...) go to every ``from_pretrained``.
    ``min_pixels``/``max_pixels`` override the default per-image pixel budget.
    """
    processor = None
    if has_video_support():
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model_path, **hub_kwargs)
            if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
                processor = None
        except Exception:
            processor = None
    if processor is None:
        processor = _load_image_only(model_path, **hub_kwargs)
    if processor.chat_template is None and getattr(processor.tokenizer, "chat_template", None):
        processor.chat_template = processor.tokenizer.chat_template
    _set_default_budget(processor, min_pixels, max_pixels)
    return processor
