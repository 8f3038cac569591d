"""Units of the engine with small inputs: detokenization, stop strings, sampler, KV slabs."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from server.engine.kv_pool import BlockManager, KVPool, NoBlocks, StepInputs, chain_keys
from server.engine.output import coalesce as _coalesce
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
    """Text split across byte-level tokens (Chinese, rare CJK and emoji, which even the
    real vocabulary writes as byte pieces): every delta is whole characters."""
    text = "您好，我的订单什么时候到？谢谢 😀🚚 龘𠜎"
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


def test_greedy_with_top_logprobs_is_argmax_ties_included():
    """Greedy rows that ask for top logprobs take their token from the top-k (no separate
    argmax pass) only where that is the argmax: a row whose two best logits tie gets the
    lower id, as argmax gives it, whatever order top-k returned them in."""
    from tests.sync_counter import Ops
    torch.manual_seed(0)
    logits = torch.randn(8, 300)
    rows = [Row(temperature=0, logprobs=True, top_logprobs=3) for _ in range(8)]
    with Ops() as ops:
        res = sample(logits.clone(), rows)
    assert res.tokens.tolist() == logits.argmax(-1).tolist()
    assert "aten::argmax" not in ops.seen, ops.seen  # taken from the top-k
    tied = logits.clone()
    tied[3, 17] = tied[3, 250] = tied[3].max() + 1  # ids 17 and 250 share the best logit
    tied[5, 40] = tied[5, 41] = tied[5].max() + 1
    with Ops() as ops:
        res = sample(tied.clone(), rows)
    assert res.tokens.tolist() == tied.argmax(-1).tolist()
    assert res.tokens[3].item() == 17 and res.tokens[5].item() == 40
    assert ops.seen["aten::argmax"] == 1  # the tie sent the batch to argmax


def test_blocks_prefix_cache_lru_and_in_use():
    """Committed full blocks are found again by their chain keys; unused cached blocks are
    evicted least recently used first when blocks run out; a block in use never is."""
    bm = BlockManager(4, 2, cache_blocks=4)
    keys_a = chain_keys([1, 2, 3, 4], 2)
    keys_b = chain_keys([9, 9, 3, 4], 2)
    assert keys_a[1] != keys_b[1]          # same second block, different prefix
    a = bm.allocate(2)
    for blk, key in zip(a, keys_a):
        bm.commit(blk, key)
    bm.release(a)                           # idle, still cached
    assert bm.available == 4 and bm.used == 0
    hit = bm.match(keys_a, 2)
    assert hit == a and bm.used == 2        # in use again
    other = bm.allocate(2)                  # the two never-cached blocks
    with pytest.raises(NoBlocks):
        bm.allocate(1)                      # the cached blocks in use are not evicted
    bm.release(hit)
    fresh = bm.allocate(1)                  # evicts the least recently used cached block
    assert fresh[0] in a and bm.match(keys_a, 2) == []
    bm.release(other + fresh)


def test_blocks_cache_share_and_off():
    bm = BlockManager(8, 2, cache_blocks=1)
    a = bm.allocate(3)
    for i, blk in enumerate(a):
        bm.commit(blk, 100 + i)
    bm.release(a)
    assert len(bm.idle) == 1                # only the share is kept
    off = BlockManager(8, 2, cache_blocks=0)
    b = off.allocate(1)
    off.commit(b[0], 5)
    off.release(b)
    assert off.match([5], 1) == []


def test_blocks_promises_bound_admission():
    bm = BlockManager(6, 4)
    bm.allocate(2)
    bm.promise(3)
    assert bm.available == 1
    got = bm.allocate(1, promised=True)
    assert len(got) == 1 and bm.promised == 2 and bm.available == 1


def test_layout_slots_and_mask():
    """Slots of new tokens come from the rows' block tables; a padding query writes the
    scratch slot and attends like the row's last real token."""
    pool = KVPool.__new__(KVPool)
    pool.block_size = 2
    inp = StepInputs(torch.tensor([[3, 1, 2], [4, 0, 0]]), torch.tensor([3, 0]),
                     torch.tensor([5, 1]))
    slots, mask = pool.layout(inp, 2)
    assert slots.tolist() == [3, 4, 8, 0]   # pos 3: block 1 + 1; pos 4: block 2; pad: scratch
    assert mask.shape == (2, 1, 2, 6)
    assert mask[0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0]
    assert mask[0, 0, 1].tolist() == [1, 1, 1, 1, 1, 0]
    assert mask[1, 0, 1].tolist() == [1, 0, 0, 0, 0, 0]  # padding query: finite, like pos 0


def test_coalesce_merges_per_choice():
    outs = [Output(0, "a", [1]), Output(1, "x", [5]), Output(0, "b", [2], "stop", 3, 2)]
    merged = {o.index: o for o in _coalesce(outs)}
    assert merged[0].text == "ab" and merged[0].token_ids == [1, 2]
    assert merged[0].finish_reason == "stop" and merged[0].completion_tokens == 2
    assert merged[1].text == "x"


def test_token_bytes_are_the_real_bytes(tok):
    """Logprob ``bytes``: byte-level tokens map back to their raw bytes, so the tokens of a
    sentence split inside characters (rare CJK and emoji, in either vocabulary) concatenate
    to its exact UTF-8."""
    from server.engine.output import _BYTE_OF_CHAR
    text = "您好，我的订单什么时候到？😀🚚 龘𠜎"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = [bytes(_BYTE_OF_CHAR[c] for c in tok.id_to_token(i)) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(len(p) and p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces) \
        or len(ids) == len(text)


def test_cpu_threads_leave_one_core_unless_told(monkeypatch):
    from server.engine.assemble import cpu_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_threads(None)[0] == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_threads(None)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(None) == (3, "OMP_NUM_THREADS")
    assert cpu_threads(5) == (5, "--cpu-threads")
