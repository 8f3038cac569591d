"""Issue 33: legacy completions (``POST /v1/completions``) through the real ``openai`` SDK.

A plain prompt runs without the chat template: its ``usage.prompt_tokens`` is what
``/tokenize`` counts for the same prompt, and the same prompt given as those token ids
gives the same greedy text.  Then the route's own fields: ``max_tokens`` 16 by default,
streaming (the same text and logprobs as the plain answer), the legacy ``logprobs``,
``echo``, ``n``, ``stop``, and the refusals.
"""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "qwen3-vl"
PROMPT = "Order 4711 was shipped on"


def tokenize(server, prompt: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=60,
                      trust_env=False).json()["tokens"]


def test_plain_prompt_no_template_and_token_ids(client, server):
    ids = tokenize(server, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(ids)          # no chat template around it
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    one_of_list = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=6,
                                            temperature=0)
    assert one_of_list.choices[0].text == r.choices[0].text


def test_max_tokens_defaults_to_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_streamed_equals_plain_with_logprobs(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == plain.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    lp = plain.choices[0].logprobs
    streamed = [x for c in body if c.choices[0].logprobs for x in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    assert [x for c in body if c.choices[0].logprobs
            for x in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_legacy_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=3,
                                  temperature=1.0, seed=7)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[tok] == value           # the sampled token is listed
        assert 3 <= len(top) <= 4                         # with the 3 best
        assert max(top.values()) >= value


def test_echo_n_seed_and_stop(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True,
                                  temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)
    two = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=11,
                                    temperature=1.0)
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=11,
                                      temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param", [
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": "a <|image_pad|> b"}, "prompt"),
    ({"prompt": [151655]}, "prompt"),                     # the image placeholder's id
    ({"prompt": [151700], "echo": True}, "prompt"),       # a model row with no text
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_refused(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, **kw)
    assert e.value.body["param"] == param, e.value.body
