"""Qwen's real vocabulary end to end (issue 26): the ids, stop strings that cut through
real tokens, and streamed detokenisation of CJK and emoji forced by a grammar.

The shared ``server`` runs the real-vocabulary tiny model unless TEST_VOCAB=toy, when
these skip (the toy vocabulary has none of these ids).
"""

from __future__ import annotations

import json

import pytest

from conftest import TEST_VOCAB

pytestmark = pytest.mark.skipif(TEST_VOCAB != "real", reason="TEST_VOCAB=toy")

NI_HAO = 108386  # "你好", one token in Qwen's vocabulary


def test_known_ids(tiny_model):
    from models.processor import load_processor
    from models.tiny import REAL_VOCAB_CHECKS
    tok = load_processor(tiny_model).tokenizer
    for text, ids in REAL_VOCAB_CHECKS.items():
        assert tok.encode(text) == ids
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                      "<|vision_start|>", "<|image_pad|>", "<tool_call>",
                                      "<think>", "</think>"]) == [
        151643, 151644, 151645, 151652, 151655, 151657, 151667, 151668]
    assert len(tok) == 151669
    assert json.load(open(f"{tiny_model}/config.json"))["text_config"]["vocab_size"] == 151936


def test_stop_string_cuts_through_real_tokens(client):
    """logit_bias makes every token "你好"; the stop string "好你" spans two of them."""
    kw = dict(model="qwen3-vl", messages=[{"role": "user", "content": "说你好"}],
              temperature=0, max_tokens=8, logit_bias={str(NI_HAO): 100}, stop=["好你"])
    r = client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("你", "stop")
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "你" and chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_cjk_and_emoji_never_split_a_character(client):
    """A grammar forces "😀 你好 🚚" (emoji that the BPE writes as byte pieces): each streamed
    delta is whole characters, and the pieces join to the exact JSON."""
    value = "😀 你好 🚚 ok"
    schema = {"type": "object", "additionalProperties": False, "required": ["t"],
              "properties": {"t": {"enum": [value]}}}
    kw = dict(model="qwen3-vl", messages=[{"role": "user", "content": "emoji"}],
              temperature=0, max_tokens=64,
              response_format={"type": "json_schema",
                               "json_schema": {"name": "t", "schema": schema, "strict": True}})
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any("\ufffd" in d for d in deltas), deltas
    assert json.loads("".join(deltas)) == {"t": value}
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].message.content == "".join(deltas)
