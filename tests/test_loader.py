"""Model loading options on a machine without CUDA."""

import logging

import pytest
import torch

from models.loader import load_model
from server.settings import Settings


def test_no_cuda_falls_back_to_cpu_float32(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="qwen_vl.loader")
    loaded = load_model(Settings(model_path=tiny_model, dtype="bfloat16", device_map="cuda:0"))
    assert loaded.device.type == "cpu"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert "No CUDA device found" in caplog.text and "Model loaded in" in caplog.text
    # video without torchvision (PyAV), with the model's own video processor settings
    assert loaded.max_model_len == 4096 and loaded.supports_video is True
    assert loaded.video_config["size"]["longest_edge"] == 25165824


def test_flash_attention_missing_falls_back(tiny_model, caplog):
    """flash_attn is not installed here (nor on PyPI for CPU): asking for it loads with
    sdpa, and says so."""
    import importlib.util
    assert importlib.util.find_spec("flash_attn") is None  # the premise
    caplog.set_level(logging.WARNING, logger="qwen_vl.loader")
    loaded = load_model(Settings(model_path=tiny_model, attn_implementation="flash_attention_2"))
    assert loaded.model.config.get_text_config()._attn_implementation == "sdpa"
    assert "flash_attn is not installed: using sdpa attention" in caplog.text


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_bitsandbytes_quantization_generates(tiny_model, quant):
    pytest.importorskip("bitsandbytes")
    loaded = load_model(Settings(model_path=tiny_model, quantization=quant))
    assert type(loaded.model.model.language_model.layers[0].mlp.gate_proj).__module__.startswith("bitsandbytes")
    ids = loaded.processor.tokenizer("hello", return_tensors="pt")["input_ids"]
    out = loaded.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
