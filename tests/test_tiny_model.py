"""The tiny Qwen3-VL built by ``models.tiny`` loads and generates offline, on CPU, without torchvision."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models import tiny  # noqa: E402
from models.processor import (  # noqa: E402
    ImageOnlyQwen3VLProcessor,
    VideoNotSupportedError,
    has_video_support,
    image_budget_kwargs,
    load_processor,
)

CHINESE = "你好，请问我的订单什么时候发货？谢谢！"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(tiny_dir)).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(str(tiny_dir))


def _images():
    # Two sizes, not solid colours, so the vision tower sees something.
    small = Image.linear_gradient("L").resize((200, 120)).convert("RGB")
    large = Image.radial_gradient("L").resize((640, 480)).convert("RGB")
    return [small, large]


def _generate(model, enc, n=20):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_loads_as_the_real_model_class(model, processor, tiny_dir):
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.text_config.max_position_embeddings == 4096
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    tok = processor.tokenizer
    assert tok.is_fast
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.text_config.vocab_size == len(tok)
    assert 1000 <= len(tok) <= 2100
    gen = model.generation_config
    assert list(gen.eos_token_id) == [tok.eos_token_id, tok.pad_token_id]
    assert gen.pad_token_id == tok.pad_token_id
    # Ordinary (non-special) added tokens stay single tokens and survive skip_special_tokens.
    for t in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and t not in tok.all_special_tokens
    assert "<tool_call>" in tok.decode(tok.encode("<tool_call>x</tool_call>"), skip_special_tokens=True)


def test_text_only_generation(model, processor):
    text = processor.apply_chat_template(
        [{"role": "user", "content": "Where is my order?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    enc = processor(text=[text], images=None, return_tensors="pt")
    assert set(enc.keys()) >= {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert "pixel_values" not in enc
    assert int(enc["mm_token_type_ids"].sum()) == 0
    new = _generate(model, enc)
    assert len(set(new)) > 3, new


def test_two_images_generation_and_placeholder_count(model, processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare these two pictures."},
                {"type": "image"},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    enc = processor(text=[text], images=_images(), return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert key in enc, key

    grid = enc["image_grid_thw"]
    assert grid.shape == (2, 3)
    per_image = (grid.prod(-1) // 4).tolist()
    assert per_image[0] != per_image[1]  # different sizes, different token counts
    assert all(4 <= n <= 64 for n in per_image), per_image  # the tiny model's small budget

    ids = enc["input_ids"][0]
    image_id = model.config.image_token_id
    assert int((ids == image_id).sum()) == sum(per_image)
    # Each <|vision_start|> ... <|vision_end|> run holds exactly that image's tokens, in order.
    starts = (ids == model.config.vision_start_token_id).nonzero().flatten().tolist()
    ends = (ids == model.config.vision_end_token_id).nonzero().flatten().tolist()
    assert [e - s - 1 for s, e in zip(starts, ends)] == per_image
    assert torch.equal(enc["mm_token_type_ids"][0] == 1, ids == image_id)
    assert enc["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)

    new = _generate(model, enc)
    assert len(set(new)) > 3, new


def test_per_call_pixel_budget(processor, tiny_dir):
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    big = _images()[1]
    default = processor(text=[text], images=[big], return_tensors="pt")["image_grid_thw"]
    kwargs = image_budget_kwargs(32 * 32 * 4, 32 * 32 * 8)
    assert kwargs == {"size": {"shortest_edge": 4096, "longest_edge": 8192}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the supported spelling does not warn
        small = processor(text=[text], images=[big], return_tensors="pt", images_kwargs=kwargs)["image_grid_thw"]
    assert int(small.prod()) // 4 <= 8 < int(default.prod()) // 4
    # One bound alone is filled in from the processor's defaults.
    only_max = image_budget_kwargs(None, 32 * 32 * 8, processor=processor)
    assert only_max["size"]["shortest_edge"] == 32 * 32 * 4
    # Load-time override changes the default.
    reloaded = load_processor(str(tiny_dir), max_pixels=32 * 32 * 8)
    assert reloaded.image_processor.size["longest_edge"] == 32 * 32 * 8
    again = reloaded(text=[text], images=[big], return_tensors="pt")["image_grid_thw"]
    assert torch.equal(again, small)


def test_build_is_deterministic(tiny_dir, tmp_path_factory):
    # Second build in a fresh process, through the CLI.
    other = tmp_path_factory.mktemp("tiny_again") / "model"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(
        [sys.executable, "-m", "models.tiny", str(other), "--seed", "0"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        assert digest(tiny_dir / name) == digest(other / name), name


def test_chinese_round_trip(processor):
    tok = processor.tokenizer
    ids = tok.encode(CHINESE, add_special_tokens=False)
    assert tok.decode(ids) == CHINESE
    assert len(ids) < len(CHINESE.encode("utf-8"))  # multi-byte merges exist
    pieces = [tok.decode([i]) for i in ids]
    assert any(len(p) >= 1 and all(ord(c) > 0x2E80 for c in p) for p in pieces)


def test_chat_template_tools_and_tool_calls(processor):
    tools = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "You are a shop assistant."},
        {"role": "user", "content": "Where is order 42?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_order", "arguments": {"id": "42"}}}],
        },
        {"role": "tool", "content": '{"status": "shipped"}'},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools)
    assert text.startswith("<|im_start|>system\nYou are a shop assistant.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_order"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_order", "arguments": {"id": "42"}}\n</tool_call><|im_end|>\n' in text
    assert '<|im_start|>user\n<tool_response>\n{"status": "shipped"}\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_no_torchvision_needed(processor):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here; this checks the torchvision-free path")
    assert has_video_support() is False
    assert isinstance(processor, ImageOnlyQwen3VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert "torchvision" not in sys.modules
    with pytest.raises(VideoNotSupportedError):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], return_tensors="pt")
