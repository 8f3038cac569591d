"""Units of the engine with small inputs: detokenization, stop strings, sampler, KV slabs."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from server.engine.batch import DecodeBatch, SlabLayer, new_cache
from server.engine.core import _coalesce
from server.engine.interface import Output, SamplingParams
from server.engine.sampler import SamplingState, mix32, sample, stream_key, uniform
from server.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_file(f"{tiny_model}/tokenizer.json")


def feed(tok, text, **params):
    ids = tok.encode(text, add_special_tokens=False).ids
    p = SamplingParams(max_tokens=len(ids) + 5, **params)
    seq = Sequence(request_id="r", index=0, prompt_len=3, params=p, tokenizer=tok,
                   eos_ids={10**6}, sink=None)
    outs = [o for o in map(seq.append, ids) if o is not None]  # None once the choice closed
    return seq, outs, ids


def test_multibyte_text_streams_whole_characters(tok):
    """Chinese text split across byte-level tokens: every delta is whole characters."""
    text = "您好，我的订单什么时候到？谢谢"
    seq, outs, ids = feed(tok, text)
    assert len(ids) > 3
    assert "".join(o.text for o in outs) == text
    assert all("\ufffd" not in o.text for o in outs)
    assert any(o.text == "" for o in outs) or len(ids) == len(text)


def test_stop_string_across_tokens_is_held_back_and_cut(tok):
    seq, outs, _ = feed(tok, "your order has shipped today", stop=["shipped"])
    assert seq.finish_reason == "stop"
    assert "".join(o.text for o in outs) == "your order has "
    assert outs[-1].finish_reason == "stop"


def test_earliest_stop_wins(tok):
    seq, outs, _ = feed(tok, "refund then return", stop=["return", "then"])
    assert seq.text == "refund "


def test_length_finish(tok):
    ids = tok.encode("one two three four five", add_special_tokens=False).ids
    seq = Sequence(request_id="r", index=0, prompt_len=1, params=SamplingParams(max_tokens=2),
                   tokenizer=tok, eos_ids=set(), sink=None)
    outs = [seq.append(i) for i in ids[:2]]
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 2


def test_eos_finishes_with_stop_unless_ignored(tok):
    for ignore, reason in ((False, "stop"), (True, None)):
        seq = Sequence(request_id="r", index=0, prompt_len=1,
                       params=SamplingParams(max_tokens=5, ignore_eos=ignore),
                       tokenizer=tok, eos_ids={7}, sink=None)
        assert seq.append(7).finish_reason == reason


class Row:
    def __init__(self, seed=None, **kw):
        self.params = SamplingParams(**kw)
        self.key = stream_key(seed, 0, torch.Generator().manual_seed(0))
        self.prompt_ids = torch.tensor([1, 2, 3])
        self.output_ids = [4]


def test_sampler_rows_are_independent():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    rows = [Row(temperature=0), Row(temperature=1.0, top_k=1), Row(temperature=1.0, top_p=1e-6),
            Row(temperature=1.0, logit_bias={7: 100.0})]
    toks = sample(logits, rows).tokens.tolist()
    assert toks[0] == int(logits[0].argmax()) and toks[1] == int(logits[1].argmax())
    assert toks[2] == int(logits[2].argmax()) and toks[3] == 7


def test_min_p_and_seeded_rows_reproduce():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    a = [sample(logits, [Row(seed=5, temperature=1.0), Row(temperature=1.0),
                         Row(seed=9, temperature=1.0)]).tokens[0].item() for _ in range(1)]
    b = [sample(logits[:1], [Row(seed=5, temperature=1.0)]).tokens[0].item()]
    assert a == b
    peaked = torch.full((1, 40), -10.0)
    peaked[0, 3] = 10.0
    peaked[0, 4] = 9.0
    assert sample(peaked, [Row(seed=1, temperature=1.0, min_p=0.5)]).tokens.item() == 3


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0   # token 4 is in output_ids
    logits[0, 5] = 0.9
    assert sample(logits, [Row(temperature=0, repetition_penalty=2.0)]).tokens.item() == 5


def test_logprobs_shape():
    logits = torch.randn(2, 30)
    res = sample(logits, [Row(temperature=0, logprobs=True, top_logprobs=5), Row(temperature=0)])
    toks, lps = res.unpack(res.packed.tolist())
    assert len(lps[0][1]) == 5 and all(lp[0] <= 0 for lp in lps)
    assert abs(lps[0][0] - lps[0][2][0]) < 1e-6 and lps[0][1][0] == toks[0]


def _kv(b, t, fill):
    return torch.full((b, 2, t, 4), float(fill))


def test_slab_appends_in_place_and_grows():
    layer = SlabLayer()
    k, v = layer.update(_kv(2, 3, 1), _kv(2, 3, 1))
    buf = layer.k_buf
    for step in range(70):
        k, v = layer.update(_kv(2, 1, step), _kv(2, 1, step))
    assert k.shape == (2, 2, 73, 4) and layer.get_seq_length() == 73
    assert layer.k_buf is not buf  # grew once past the headroom
    assert k[0, 0, -1, 0].item() == 69.0 and k[0, 0, 0, 0].item() == 1.0


def test_batch_concat_left_pads_and_filter_trims():
    def batch(b, t, fill):
        cache = new_cache(1)
        cache.layers[0].update(_kv(b, t, fill), _kv(b, t, fill))
        return DecodeBatch(cache, torch.ones(b, t, dtype=torch.long), torch.full((b,), t),
                           torch.zeros(b, dtype=torch.long), rows=[f"{fill}{i}" for i in range(b)])
    joined = batch(1, 5, 1).concat(batch(2, 2, 2))
    assert joined.mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert joined.cache.layers[0].keys[1, 0, :3].abs().sum() == 0
    kept = joined.filter([1, 2])
    assert kept.width == 2 and kept.rows == ["20", "21"]
    assert kept.cache.layers[0].keys.shape[2] == 2 and (kept.cache.layers[0].keys == 2).all()


def test_coalesce_merges_per_choice():
    outs = [Output(0, "a", [1]), Output(1, "x", [5]), Output(0, "b", [2], "stop", 3, 2)]
    merged = {o.index: o for o in _coalesce(outs)}
    assert merged[0].text == "ab" and merged[0].token_ids == [1, 2]
    assert merged[0].finish_reason == "stop" and merged[0].completion_tokens == 2
    assert merged[1].text == "x"


def test_token_bytes_are_the_real_bytes(tok):
    """Logprob ``bytes``: byte-level tokens map back to their raw bytes, so the tokens of a
    Chinese sentence (split inside characters) concatenate to its exact UTF-8."""
    from server.engine.core import _BYTE_OF_CHAR
    text = "您好，我的订单什么时候到？"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = [bytes(_BYTE_OF_CHAR[c] for c in tok.id_to_token(i)) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(len(p) and p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces) \
        or len(ids) == len(text)
