"""Load Qwen3-VL (or the tiny test model) with its image-only processor.

``load_model(settings)`` honours ``--dtype``, ``--device-map``, ``--attn-implementation``
and ``--quantization``; with no CUDA device it says so and falls back to CPU and float32
instead of failing.  It logs progress and the time the load took.  ``--device-map``
defaults to one device (``cuda:0``): the batch's index tensors must live with every
layer, and a 2B model split across GPUs only gets slower; ``auto``/``balanced`` split it
when asked.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText

from models.processor import load_processor
from models.video_prep import load_video_config

log = logging.getLogger("qwen_vl.loader")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    model_id: str
    max_model_len: int
    device: torch.device
    supports_video: bool
    # the model's video processor settings (``models.video_prep.load_video_config``)
    video_config: dict = field(default_factory=dict)


def video_support(model) -> bool:
    """Video parts work when the model has a video placeholder token and PyAV (the clip
    decoder, ``models.video``) imports: no torchvision needed."""
    return getattr(model.config, "video_token_id", None) is not None \
        and importlib.util.find_spec("av") is not None


def _pick_dtype(name: str, cuda: bool) -> torch.dtype:
    if not cuda:
        if name not in ("auto", "float32"):
            log.warning("dtype %s requested without CUDA: using float32 on CPU", name)
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_model(settings) -> LoadedModel:
    cuda = torch.cuda.is_available()
    device_map = settings.device_map
    if not cuda:
        if device_map not in ("auto", "cpu", "cuda:0"):
            log.warning("device_map %s requested but no CUDA device is present", device_map)
        log.warning("No CUDA device found: running on CPU in float32. Generation will be slow.")
        device_map = "cpu"
    dtype = _pick_dtype(settings.dtype, cuda)
    attn = settings.attn_implementation
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        log.warning("flash_attn is not installed: using sdpa attention")
        attn = "sdpa"
    kwargs = dict(dtype=dtype, device_map=device_map, attn_implementation=attn)
    if settings.quantization != "none":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype if cuda else torch.float32)
            if settings.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))

    log.info("Loading %s (dtype=%s, device_map=%s, attn=%s, quantization=%s) ...",
             settings.model_path, dtype, device_map, attn, settings.quantization)
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(settings.model_path, **kwargs).eval()
    processor = load_processor(settings.model_path, min_pixels=settings.min_pixels,
                               max_pixels=settings.max_pixels)
    text_cfg = model.config.get_text_config()
    max_len = min(settings.max_model_len, text_cfg.max_position_embeddings)
    device = next(model.parameters()).device
    log.info("Model loaded in %.1f s on %s (%.1fM parameters, context %d tokens)",
             time.perf_counter() - t0, device,
             sum(p.numel() for p in model.parameters()) / 1e6, max_len)
    return LoadedModel(model=model, processor=processor,
                       model_id=getattr(model.config, "_name_or_path", settings.model_path),
                       max_model_len=max_len, device=device, supports_video=video_support(model),
                       video_config=load_video_config(settings.model_path))
