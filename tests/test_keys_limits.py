"""Issue 14, units: the key file (plain and YAML, hashed keys, reload), per-key limits
(token buckets, concurrency, Retry-After), the cost estimate and the fair queue."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import pytest

from server.api import protocol as p
from server.engine.fairqueue import FairQueue
from server.errors import RateLimited
from server.keys import ApiKey, KeyFileError, KeyLimits, KeyStore
from server.ratelimit import Limiter, estimate_tokens

YAML = """
keys:
  - name: support-bot
    key: sk-support-1234
    requests_per_minute: 600
    tokens_per_minute: 200000
    max_concurrent: 16
  - name: tagger
    sha256: {digest}
    max_concurrent: 4
"""


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_file_names_keys_and_limits(tmp_path):
    """Named keys with limits; a hashed key authenticates by its value; others don't."""
    store = KeyStore([], write(tmp_path / "k.yaml", YAML.format(digest=sha("sk-tagger-5678"))))
    support = store.authenticate("sk-support-1234")
    assert support.name == "support-bot"
    assert support.limits == KeyLimits(600, 200000, 16)
    tagger = store.authenticate("sk-tagger-5678")
    assert tagger.name == "tagger" and tagger.limits == KeyLimits(None, None, 4)
    assert tagger.plaintext is None  # only the digest was given
    for wrong in ("", "sk-support-123", "sk-support-12345", sha("sk-tagger-5678")):
        assert store.authenticate(wrong) is None


def test_plain_file_and_inline_keys_get_stable_names(tmp_path):
    store = KeyStore(["inline-1"], write(tmp_path / "keys", "# comment\nk4\n\n  k5  \n"))
    names = [store.authenticate(k).name for k in ("inline-1", "k4", "k5")]
    assert names == ["key-" + sha(k)[:8] for k in ("inline-1", "k4", "k5")]
    assert all("k4" not in n for n in names)


@pytest.mark.parametrize("text, problem", [
    ("keys:\n  - name: a\n", "exactly one of key or sha256"),
    ("keys:\n  - name: a\n    key: x\n    sha256: " + "a" * 64 + "\n", "exactly one"),
    ("keys:\n  - name: a\n    key: 0123\n", "valid string"),  # YAML reads a number
    ("keys:\n  - name: a\n    sha256: abc\n", "64 hex digits"),
    ("keys:\n  - name: a b\n    key: x\n", "name must be"),
    ("keys:\n  - name: a\n    key: x\n    request_per_minute: 5\n", "request_per_minute"),
    ("keys:\n  - name: a\n    key: x\n    max_concurrent: 0\n", "max_concurrent"),
    ("keys:\n  - name: a\n    key: x\n  - name: a\n    key: y\n", "two keys are named 'a'"),
    ("keys:\n  - name: a\n    key: x\n  - name: b\n    key: x\n", "listed twice"),
    ("keys: [\n", "not valid YAML"),
    ("- name: a\n", "expected a mapping"),
])
def test_bad_yaml_key_files_name_the_problem(tmp_path, text, problem):
    with pytest.raises(KeyFileError) as e:
        KeyStore([], write(tmp_path / "k.yml", text))
    assert problem in str(e.value)


def test_reload_keeps_old_keys_on_a_broken_file(tmp_path):
    path = write(tmp_path / "k.yaml", "keys:\n  - name: a\n    key: old\n")
    store = KeyStore([], path)
    write(tmp_path / "k.yaml", "keys:\n  - name: a\n    key: new\n")
    assert store.reload() is True
    assert store.authenticate("new").name == "a" and store.authenticate("old") is None
    write(tmp_path / "k.yaml", "keys:\n  - name: a\n")  # half-saved edit
    assert store.reload() is False
    assert store.authenticate("new").name == "a"


def test_watch_reloads_when_the_file_changes(tmp_path):
    path = write(tmp_path / "k.yaml", "keys:\n  - name: a\n    key: one\n")
    store = KeyStore([], path)

    async def main():
        task = asyncio.create_task(store.watch(interval=0.05))
        write(tmp_path / "k.yaml", "keys:\n  - name: b\n    key: two\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # coarse-mtime safe
        for _ in range(100):
            if store.authenticate("two") is not None:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert store.authenticate("two").name == "b" and store.authenticate("one") is None


def test_empty_key_file_refuses_everyone(tmp_path):
    store = KeyStore([], write(tmp_path / "keys", "# nobody yet\n"))
    assert store.enabled and store.authenticate("") is None


# --- limits ---------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def key(**limits) -> ApiKey:
    return ApiKey("bot", b"d", KeyLimits(**limits))


def test_requests_per_minute_bucket_and_retry_after():
    """60 a minute: a burst of 60, then one a second (Retry-After 1)."""
    clock = Clock()
    lim = Limiter(clock)
    k = key(requests_per_minute=60)
    tickets = [lim.admit(k, 0) for _ in range(60)]
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 0)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.headers["Retry-After"] == "1"
    assert "requests per minute" in e.value.message
    clock.t += 1.0  # one request refilled
    lim.admit(k, 0)
    for t in tickets:
        t.finish(0)


def test_retry_after_says_when_the_request_would_be_accepted():
    clock = Clock()
    lim = Limiter(clock)
    k = key(requests_per_minute=2)
    lim.admit(k, 0).finish()
    lim.admit(k, 0).finish()
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 0)
    wait = int(e.value.headers["Retry-After"])
    assert wait == 30  # 2 per minute: one every 30 s
    clock.t += wait - 1
    with pytest.raises(RateLimited):
        lim.admit(k, 0)
    clock.t += 1
    lim.admit(k, 0)


def test_tokens_are_charged_at_admission_and_corrected_at_the_end():
    clock = Clock()
    lim = Limiter(clock)
    k = key(tokens_per_minute=1000)
    t = lim.admit(k, 800)          # estimate: prompt + max_tokens
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 300)          # 200 left
    assert e.value.headers["Retry-After"] == "6"  # 100 tokens at 1000/60 per s
    assert "tokens per minute" in e.value.message
    t.finish(150)                  # it really used 150: 650 refunded
    lim.admit(k, 300).finish(300)
    t.finish(0)                    # idempotent
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 1001)         # larger than the bucket: no wait would help
    assert "Retry-After" not in e.value.headers and "too large" in e.value.message


def test_max_concurrent_counts_until_the_response_ends():
    """Retry-After: 1 s until a request has finished, then when the oldest running one
    should end by the key's average duration."""
    clock = Clock()
    lim = Limiter(clock)
    k = key(max_concurrent=2)
    a, b = lim.admit(k, 10), lim.admit(k, 10)
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 10)
    assert e.value.headers["Retry-After"] == "1" and "2 concurrent" in e.value.message
    clock.t += 8
    a.finish(5)                    # took 8 s
    c = lim.admit(k, 10)
    assert lim.running("bot") == 2
    clock.t += 2                   # b has run 10 s, c 2 s: c should end in ~6 s
    b.finish(5)
    d = lim.admit(k, 10)
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 10)
    avg = 0.8 * 8 + 0.2 * 10
    assert e.value.headers["Retry-After"] == str(math.ceil(avg - 2))
    c.finish(), d.finish()


def test_rejected_request_charges_nothing_and_unlimited_keys_pass():
    clock = Clock()
    lim = Limiter(clock)
    k = key(requests_per_minute=10, tokens_per_minute=100)
    lim.admit(k, 90)
    for _ in range(5):  # refused on tokens: must not eat the request budget
        with pytest.raises(RateLimited):
            lim.admit(k, 50)
    clock.t += 30  # 50 tokens back
    lim.admit(k, 50)
    free = ApiKey("free", b"f")
    assert all(lim.admit(free, 10**9) for _ in range(1000))


def test_reloaded_limits_keep_the_spent_budget():
    clock = Clock()
    lim = Limiter(clock)
    for _ in range(10):
        lim.admit(key(requests_per_minute=10), 0).finish()
    with pytest.raises(RateLimited):  # same name, new limit: still spent
        lim.admit(key(requests_per_minute=20), 0)
    clock.t += 3  # 20/min: one per 3 s
    lim.admit(key(requests_per_minute=20), 0)


def test_estimate_counts_text_images_n_and_max_tokens():
    req = p.ChatCompletionRequest.model_validate({
        "model": "m", "n": 2, "max_tokens": 10, "messages": [
            {"role": "system", "content": "x" * 40},
            {"role": "user", "content": [{"type": "text", "text": "y" * 8},
                                         {"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,AA"}}]}]})
    # text: its UTF-8 bytes + 2 per string, + 8 template tokens per message and the reply
    text = (40 + 2) + (8 + 2) + 8 * 3
    assert estimate_tokens(req, 1024, 64 * 32 * 32) == text + 64 + 2 * 10
    req.max_tokens = None
    assert estimate_tokens(req, 1024, 64 * 32 * 32) == text + 64 + 2 * 1024
    # a video is charged at its full budget (video_token_bound), an image still at its own
    req.messages[1].content.append(p.VideoPart(type="video_url",
                                               video_url={"url": "data:video/mp4;base64,AA"}))
    assert (req.image_count, req.video_count) == (1, 1)
    assert estimate_tokens(req, 1024, 64 * 32 * 32, 5000) == text + 64 + 5000 + 2 * 1024


# --- fair queue ---------------------------------------------------------------------

@dataclass
class E:
    key: str
    request_id: str
    t_arrival: float = field(default_factory=time.perf_counter)


def test_fair_queue_serves_keys_in_turn():
    """A burst of 5 from one key, then one from another: the second key's request is
    served second, not sixth; within a key the order is arrival order."""
    q = FairQueue()
    for i in range(5):
        q.append(E("tagger", f"t{i}"))
    q.append(E("support", "s0"))
    q.append(E("support", "s1"))
    assert len(q) == 7 and q[0].request_id == "t0"
    assert [e.request_id for e in q] == ["t0", "s0", "t1", "s1", "t2", "t3", "t4"]
    assert [q.popleft().request_id for _ in range(7)] == [
        "t0", "s0", "t1", "s1", "t2", "t3", "t4"]
    assert not q
    with pytest.raises(IndexError):
        q.popleft()


def test_fair_queue_discard_and_expire():
    q = FairQueue()
    q.append(E("a", "a0", t_arrival=1.0))
    q.append(E("b", "b0", t_arrival=2.0))
    q.append(E("a", "a1", t_arrival=3.0))
    assert [e.request_id for e in q.discard("b0")] == ["b0"]
    assert [e.request_id for e in q.expire(2.5)] == ["a0"]
    assert len(q) == 1 and q.popleft().request_id == "a1" and not q
    q.append(E("c", "c0"))
    assert q[0].request_id == "c0"


def test_n_takes_one_concurrent_place_per_sequence():
    """max_concurrent counts sequences: n=3 holds three places; n beyond the cap can never
    fit (no Retry-After); finishing frees all of them."""
    lim, k = Limiter(clock=lambda: 0.0), key(max_concurrent=4)
    t = lim.admit(k, 10, seqs=3)
    assert lim.running(k.name) == 3
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 10, seqs=2)
    assert e.value.headers.get("Retry-After")
    with pytest.raises(RateLimited) as e:
        lim.admit(k, 10, seqs=5)
    assert "n=5" in str(e.value) and not e.value.headers.get("Retry-After")
    lim.admit(k, 10, seqs=1)
    t.finish(5)
    assert lim.running(k.name) == 1


@pytest.mark.parametrize("text", [
    "Where is my parcel? " * 20,
    "龘𠜎鬱 " * 50,                                  # rare CJK: several tokens a character
    "😀🚚🧾" * 40,                                    # emoji: byte pieces
    "\x01\x02<>&'\"\\" * 30,                          # escapes in the tools' JSON
])
def test_estimate_is_an_upper_bound_for_any_text_and_counts_tools(tiny_model, text):
    """The admission estimate never undercounts the rendered prompt, tools and tool-call
    arguments included, whatever the characters (the old 4-characters-a-token rule let
    rare characters through at ~8x the budget)."""
    from models.processor import load_processor
    from server.api import protocol as p
    tok = load_processor(tiny_model)
    tools = [{"type": "function", "function": {"name": "lookup", "description": text,
                                               "parameters": {"type": "object", "properties": {
                                                   "q": {"type": "string", "description": text}}}}}]
    messages = [{"role": "system", "content": text}, {"role": "user", "content": text},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "c1", "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "%s"}' % text.replace(
                        "\\", "\\\\").replace('"', '\\"').replace("\x01", "").replace("\x02", "")}}]},
                {"role": "tool", "tool_call_id": "c1", "content": text}]
    req = p.ChatCompletionRequest(model="m", messages=messages, tools=tools, max_tokens=1)
    rendered = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages],
                                       tools=[t.model_dump(exclude_none=True) for t in req.tools],
                                       add_generation_prompt=True, tokenize=False)
    real = len(tok.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert estimate_tokens(req, 16, 65536) - 1 >= real
    assert req.text_size.tool_chars > 2 * len(text)  # the tools were counted


def test_estimate_counts_arguments_as_the_template_renders_them(tiny_model):
    """Compact JSON arguments grow when the template re-dumps them (separators, 1e15 as
    1000000000000000.0): the estimate follows the rendering, not the bytes sent."""
    from models.processor import load_processor
    from server.api import protocol as p
    tok = load_processor(tiny_model)
    args = '{"x":[' + ",".join(["1e15"] * 300) + "]}"
    req = p.ChatCompletionRequest(model="m", max_tokens=1, messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}])
    msgs = [m.model_dump(exclude_none=True) for m in req.messages]
    msgs[1]["tool_calls"][0]["function"]["arguments"] = json.loads(args)  # as serving does
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    real = len(tok.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert real > len(args) and estimate_tokens(req, 16, 65536) - 1 >= real
