"""Issue 32 point 3: ``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes, against a
real server subprocess with a key file.

The count of a chat request must be the ``usage.prompt_tokens`` of the same request run
for real through the ``openai`` SDK (images at several ``detail`` values, tools), its
``image_tokens`` the usage's; the prompt form and the round trip through /detokenize;
the context window reported, not enforced; one request of the key's request rate; and
no cache read or written (a count is nobody's hit).
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.conftest import data_url, png_bytes

KEYS = """\
keys:
  - name: shop-bot
    key: sk-shop-1111
    operator: true
  - name: counter
    key: sk-count-2222
    requests_per_minute: 2
"""
BOT, COUNTER = "sk-shop-1111", "sk-count-2222"
TOOLS = [{"type": "function", "function": {
    "name": "order_status", "description": "Look an order up by its number.",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}},
                   "required": ["order"]}}}]


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok-keys") / "keys.yaml"
    path.write_text(KEYS)
    return server_factory("--api-key-file", str(path), "--max-new-tokens", "4")


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=120, trust_env=False,
                      headers={"Authorization": f"Bearer {BOT}"}) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key=BOT, max_retries=0, timeout=120)


def photo_msgs(*details: str | None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": "Is this the mug I ordered?"}]
    for i, d in enumerate(details):
        url = {"url": data_url(png_bytes(640 - 100 * i, 480, color=(20 * i, 90, 200)))}
        if d is not None:
            url["detail"] = d
        parts.append({"type": "image_url", "image_url": url})
    return [{"role": "system", "content": "You are the shop's assistant."},
            {"role": "user", "content": parts}]


@pytest.mark.parametrize("case", ["text", "one-image", "low-auto-high", "tools"])
def test_count_equals_the_real_prompt_tokens(case, http, sdk):
    kw: dict = {"messages": photo_msgs()}
    if case == "one-image":
        kw["messages"] = photo_msgs(None)
    elif case == "low-auto-high":
        kw["messages"] = photo_msgs("low", "auto", "high")
    elif case == "tools":
        kw = {"messages": photo_msgs("high"), "tools": TOOLS, "tool_choice": "auto"}
    counted = http.post("/tokenize", json={"model": "qwen3-vl", **kw})
    assert counted.status_code == 200, counted.text
    t = counted.json()
    real = sdk.chat.completions.create(model="qwen3-vl", max_tokens=1, **kw)
    assert t["count"] == real.usage.prompt_tokens == len(t["tokens"])
    assert t["image_tokens"] == real.usage.prompt_tokens_details.image_tokens
    assert (t["image_tokens"] > 0) == (case != "text")
    assert t["max_model_len"] - t["count"] == t["max_tokens_room"]


def test_detail_values_change_the_count(http):
    def count(detail):
        return http.post("/tokenize", json={"messages": photo_msgs(detail)}).json()
    low, high = count("low"), count("high")
    assert low["image_tokens"] < high["image_tokens"]
    assert high["count"] - low["count"] == high["image_tokens"] - low["image_tokens"]


def test_prompt_form_and_detokenize_round_trip(http):
    text = "Order #4711: one blue mug, 2 × saucers — shipped?"
    t = http.post("/tokenize", json={"prompt": text}).json()
    assert t["count"] == len(t["tokens"]) > 5 and t["image_tokens"] == 0
    back = http.post("/detokenize", json={"model": "qwen3-vl", "tokens": t["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # the chat form's ids decode to the rendered template, image placeholders included
    chat = http.post("/tokenize", json={"messages": photo_msgs(None)}).json()
    prompt = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are the shop's assistant.")
    assert prompt.count("<|image_pad|>") == chat["image_tokens"]


def test_context_window_is_reported_not_enforced(http, sdk):
    """A prompt over the window is counted (room 0); the same chat request is refused."""
    window = http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"]
    long = [{"role": "user", "content": "word " * (window + 50)}]
    t = http.post("/tokenize", json={"messages": long}).json()
    assert t["count"] > window and t["max_tokens_room"] == 0
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="qwen3-vl", messages=long, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_same_checks_as_chat(http):
    """The chat request's checks apply: a model it does not serve, a bad image, video."""
    r = http.post("/tokenize", json={"model": "gpt-4o", "messages": photo_msgs()})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    bad = photo_msgs()
    bad[1]["content"].append({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}})
    r = http.post("/tokenize", json={"messages": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == \
        "messages[1].content[1].image_url.url"
    r = http.post("/detokenize", json={"tokens": [1, -3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def _metric(http, name: str) -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_a_count_touches_no_cache(http):
    """The photo is fetched and counted, but neither the pixel cache nor the prefix cache
    is read or written: another key's count or chat can learn nothing from it."""
    msgs = photo_msgs(None)
    before = {n: _metric(http, n) for n in ("qwen_vl_image_cache_queries_total",
                                            "qwen_vl_prefix_cache_queries_tokens_total")}
    for _ in range(2):
        assert http.post("/tokenize", json={"messages": msgs}).status_code == 200
    after = {n: _metric(http, n) for n in before}
    assert after == before


def test_a_count_is_one_request_of_the_key(srv):
    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as anon:
        assert anon.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        assert anon.post("/detokenize", json={"tokens": [1]}).status_code == 401
        auth = {"Authorization": f"Bearer {COUNTER}"}
        assert anon.post("/tokenize", json={"prompt": "hi"}, headers=auth).status_code == 200
        assert anon.post("/detokenize", json={"tokens": [1]}, headers=auth).status_code == 200
        third = anon.post("/tokenize", json={"prompt": "hi"}, headers=auth)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
        assert "requests per minute" in third.json()["error"]["message"]
        chat = anon.post("/v1/chat/completions", headers=auth, json={
            "model": "qwen3-vl", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 429  # the same bucket
