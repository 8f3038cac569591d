"""The OpenAI-compatible surface through the real server and the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import http.server
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT, data_url, png_bytes

USER = [{"role": "user", "content": "What is the status of order 1234?"}]


def image_msg(*urls: str, text: str = "What colour is this product?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def test_models_lists_served_name(client):
    """/v1/models lists the served name."""
    assert [m.id for m in client.models.list().data] == ["qwen3-vl"]


@pytest.mark.parametrize("name", ["qwen3-vl", "Qwen/Qwen3-VL-2B-Instruct"])
def test_served_name_and_hub_id_accepted(client, name):
    r = client.chat.completions.create(model=name, messages=USER, max_tokens=3)
    assert r.model == name and r.choices[0].message.role == "assistant"


def test_unknown_model_is_404_envelope(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=3)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_text_completion_shape_and_usage(client):
    """A non-streamed answer in OpenAI's shape, with honest usage and finish_reason."""
    r = client.chat.completions.create(model="qwen3-vl", messages=USER, max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].message.content


def test_max_completion_tokens_alias(client):
    r = client.chat.completions.create(model="qwen3-vl", messages=USER,
                                       max_completion_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_image_data_url_counts_image_tokens(client):
    """An image adds its patch tokens to the prompt; two images add more."""
    text_only = client.chat.completions.create(model="qwen3-vl", messages=image_msg(),
                                               max_tokens=2)
    one = client.chat.completions.create(
        model="qwen3-vl", messages=image_msg(data_url(png_bytes(64, 64))), max_tokens=2)
    two = client.chat.completions.create(
        model="qwen3-vl", messages=image_msg(data_url(png_bytes(64, 64)),
                                             data_url(png_bytes(200, 100, fmt="JPEG"), "image/jpeg")),
        max_tokens=2)
    assert text_only.usage.prompt_tokens < one.usage.prompt_tokens < two.usage.prompt_tokens
    # usage.prompt_tokens_details.image_tokens: what the images cost, their markers aside
    # (<|vision_start|> and <|vision_end|> per image)
    details = [r.usage.prompt_tokens_details for r in (text_only, one, two)]
    assert details[0].image_tokens == 0
    assert details[1].image_tokens == one.usage.prompt_tokens - text_only.usage.prompt_tokens - 2
    assert details[2].image_tokens == two.usage.prompt_tokens - text_only.usage.prompt_tokens - 4
    streamed = list(client.chat.completions.create(
        model="qwen3-vl", messages=image_msg(data_url(png_bytes(64, 64))), max_tokens=2,
        stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.image_tokens == details[1].image_tokens


def test_detail_low_uses_fewer_tokens_than_high(client):
    big = data_url(png_bytes(640, 480))

    def tokens(detail):
        msg = [{"role": "user", "content": [{"type": "image_url",
                                             "image_url": {"url": big, "detail": detail}}]}]
        return client.chat.completions.create(model="qwen3-vl", messages=msg,
                                              max_tokens=1).usage.prompt_tokens

    assert tokens("low") <= tokens("auto") <= tokens("high")
    assert tokens("low") < tokens("high")


def test_images_in_earlier_turns(client):
    msgs = image_msg(data_url(png_bytes())) + [
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "And the size?"}]
    r = client.chat.completions.create(model="qwen3-vl", messages=msgs, max_tokens=3)
    msgs[0]["content"] = msgs[0]["content"][:1]  # the same conversation without the image
    text = client.chat.completions.create(model="qwen3-vl", messages=msgs, max_tokens=3)
    # the image adds its markers and at least the 4 tokens of the smallest budget
    assert r.usage.prompt_tokens >= text.usage.prompt_tokens + 2 + 4


def serve_png(body: bytes, hits: list | None = None, mime: str = "image/png",
              name: str = "product.png"):
    """A local HTTP server on loopback that answers every GET with ``body`` (a PNG, or
    ``mime``) and records the paths asked for in ``hits``.  Returns (server, url)."""
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if hits is not None:
                hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def image_host():
    srv, url = serve_png(png_bytes(80, 60))
    yield url
    srv.shutdown()


def test_http_image_url_when_host_allowed(server_factory, image_host):
    """An http(s) image URL is fetched by the server; loopback needs an explicit allow."""
    srv = server_factory("--allowed-media-hosts", "127.0.0.1/32")
    c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    r = c.chat.completions.create(model="qwen3-vl", messages=image_msg(image_host), max_tokens=3)
    text = c.chat.completions.create(model="qwen3-vl", messages=image_msg(), max_tokens=3)
    assert r.usage.prompt_tokens >= text.usage.prompt_tokens + 2 + 4  # the image was read
    srv.stop()


def test_loopback_image_url_refused_by_default(client, image_host):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen3-vl", messages=image_msg(image_host),
                                       max_tokens=3)
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"


def test_stream_matches_non_stream_and_usage_chunk(client):
    """Streaming: role first, deltas add up to the non-streamed text, one finish per
    choice, a usage chunk with empty choices only when asked, then [DONE]."""
    kw = dict(model="qwen3-vl", messages=USER, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    no_usage = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in no_usage)


def test_stream_is_sse_with_done(server):
    body = {"model": "qwen3-vl", "messages": USER, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_n_choices(client):
    r = client.chat.completions.create(model="qwen3-vl", messages=USER, n=3, max_tokens=5,
                                       temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    assert len({c.message.content for c in r.choices}) > 1  # different samples


def test_stop_string_truncates(client):
    kw = dict(model="qwen3-vl", messages=USER, max_tokens=30, temperature=0,
              extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = text[10:13]
    r = client.chat.completions.create(**kw, stop=[stop, "never-appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


def test_seed_reproducible(client):
    kw = dict(model="qwen3-vl", messages=USER, max_tokens=12, temperature=1.0, top_p=1.0,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=43).choices[0].message.content
    assert a == b and a != c


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(
        model="qwen3-vl", messages=USER, max_tokens=5, temperature=0.8, top_p=0.9,
        presence_penalty=1.5, frequency_penalty=0.5, user="bot-7",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "unknown_field": 1})
    assert r.choices[0].finish_reason in ("stop", "length")


# --- each sampling field reaches the engine and does what it should ----------------------

def _tokens(client, **kw) -> list[str]:
    """The completion's tokens (from logprobs), 40 of them, eos ignored."""
    extra = kw.pop("extra_body", {})
    r = client.chat.completions.create(
        model="qwen3-vl", messages=USER, max_tokens=40, logprobs=True,
        extra_body={"ignore_eos": True, **extra}, **kw)
    return [t.token + repr(t.bytes) for t in r.choices[0].logprobs.content]


@pytest.fixture
def greedy(client):
    return _tokens(client, temperature=0)


def test_temperature_zero_ignores_the_seed_and_one_uses_it(client, greedy):
    assert _tokens(client, temperature=0, seed=1) == _tokens(client, temperature=0, seed=2) == greedy
    assert _tokens(client, temperature=1.0, seed=1) != _tokens(client, temperature=1.0, seed=2)


@pytest.mark.parametrize("field", ["top_p", "top_k", "min_p"])
def test_truncation_to_one_candidate_is_greedy(client, greedy, field):
    """temperature 1 draws differ from greedy (seeds 1-3); cut to the single most likely
    token by ``field`` they are greedy."""
    cut = {"top_p": {"top_p": 1e-6}, "top_k": {"extra_body": {"top_k": 1}},
           "min_p": {"extra_body": {"min_p": 1.0}}}[field]
    assert any(_tokens(client, temperature=1.0, seed=s) != greedy for s in (1, 2, 3))
    for s in (1, 2, 3):
        assert _tokens(client, temperature=1.0, seed=s, **cut) == greedy, (field, s)


# the random model's next-token logits differ by ~0.01-0.1: a bias of 1.0 on one token
# makes greedy repeat it every step, which each penalty must then break
BIASED = {"logit_bias": {"15": 1.0}}  # token 15: "0"


def test_logit_bias_forces_a_token(client, greedy):
    got = _tokens(client, temperature=0, **BIASED)
    assert got == [got[0]] * 40 and got[0].startswith("0") and got != greedy, got[:3]


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
def test_each_penalty_breaks_a_forced_repeat(client, field):
    """Greedy with the bias repeats one token 40 times; each penalty alone (2.0) makes
    it step aside: more than one distinct token, the same again on a second run."""
    kw = {"extra_body": {"repetition_penalty": 2.0}} if field == "repetition_penalty" \
        else {field: 2.0}
    got = _tokens(client, temperature=0, **BIASED, **kw)
    assert len(set(got)) > 1, (field, got[:5])
    assert _tokens(client, temperature=0, **BIASED, **kw) == got


def test_frequency_penalty_grows_with_the_count_and_presence_does_not(client):
    """0.6 each against the bias: the presence penalty is paid once, so the biased token
    keeps coming back; the frequency penalty is paid per use and soon keeps it out."""
    presence = _tokens(client, temperature=0, presence_penalty=0.6, **BIASED)
    frequency = _tokens(client, temperature=0, frequency_penalty=0.6, **BIASED)
    zero = presence[0]
    assert frequency[0] == zero and zero.startswith("0")
    assert presence.count(zero) > frequency.count(zero) + 2, (presence.count(zero),
                                                               frequency.count(zero))


async def test_async_client_concurrent(aclient):
    """The async SDK: 8 concurrent requests (they share batches), streamed and not."""
    async def one(i):
        if i % 2:
            r = await aclient.chat.completions.create(model="qwen3-vl", messages=USER, max_tokens=6)
            return r.usage.completion_tokens
        s = await aclient.chat.completions.create(model="qwen3-vl", messages=USER, max_tokens=6,
                                                  stream=True, stream_options={"include_usage": True})
        last = None
        async for c in s:
            last = c
        return last.usage.completion_tokens
    assert all(1 <= n <= 6 for n in await asyncio.gather(*(one(i) for i in range(8))))


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen3-vl", messages=USER, max_tokens=4090)
    assert e.value.body["code"] == "context_length_exceeded"


def test_validation_errors_are_400_not_422(server):
    r = httpx.post(server.base_url + "/chat/completions", timeout=30,
                   json={"model": "qwen3-vl", "messages": USER, "temperature": "hot"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"


def test_video_part_with_a_bad_url_is_400(server):
    msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]
    r = httpx.post(server.base_url + "/chat/completions", timeout=30,
                   json={"model": "qwen3-vl", "messages": msg})
    err = r.json()["error"]
    assert r.status_code == 400 and "video URL scheme" in err["message"]
    assert err["param"] == "messages[0].content[0].video_url.url"


def test_health_docs_and_request_id(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    r = httpx.get(server.base_url + "/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_health_503_while_loading(server_factory, tiny_model, tmp_path):
    """/health answers 503 until the model is loaded, then 200."""
    from tests.conftest import free_port
    port = free_port()
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model-path", tiny_model,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    seen = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline and 200 not in seen:
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                          json={"model": "qwen3-vl", "messages": USER, "max_tokens": 2})
    finally:
        proc.terminate()
        proc.wait(30)
    assert seen[0] == 503 and seen[-1] == 200, seen
    assert chat.status_code == 200
    assert "Model loaded in" in log.read_text()


def test_test_api_script_passes(server):
    out = subprocess.run(["bash", str(ROOT / "test_api.sh"), server.url], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout


def test_test_api_script_fails_on_dead_server():
    from tests.conftest import free_port
    out = subprocess.run(["bash", str(ROOT / "test_api.sh"), f"http://127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


def test_http_layer_never_imports_torch():
    """Every module of the API side (``server/api/``), with the engine's tensor-free
    interface and the shared modules it pulls in, imports without torch."""
    code = ("import importlib, pkgutil, sys, server.api, server.engine.interface\n"
            "names = [m.name for m in pkgutil.iter_modules(server.api.__path__, 'server.api.')]\n"
            "assert len(names) >= 15, names\n"
            "for n in names: importlib.import_module(n)\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_queue_full_is_429_before_any_image_is_fetched(server_factory):
    """With the one slot busy and the one queue place taken, a request is refused at once
    with 429 and Retry-After, and its image URL is never fetched."""
    hits: list[str] = []
    host, url = serve_png(png_bytes(40, 40), hits)
    srv = server_factory("--max-num-seqs", "1", "--max-queue", "1",
                         "--allowed-media-hosts", "127.0.0.1/32")
    api = srv.base_url + "/chat/completions"
    long = {"model": "qwen3-vl", "messages": USER, "max_tokens": 2000, "ignore_eos": True}
    with httpx.stream("POST", api, json={**long, "stream": True}, timeout=120) as running:
        lines = running.iter_lines()                 # (kept: dropping it closes the stream)
        next(lines)                                  # the slot is taken
        waiter = threading.Thread(target=lambda: httpx.post(
            api, json={**long, "max_tokens": 2}, timeout=120))
        waiter.start()
        deadline = time.monotonic() + 60  # until the queue place is taken (an event)
        while not re.search(r"^qwen_vl_queue_depth 1\.0$",
                            httpx.get(srv.url + "/metrics").text, re.M):
            assert time.monotonic() < deadline, "the waiter never took the queue place"
            time.sleep(0.02)
        r = httpx.post(api, timeout=30, json={"model": "qwen3-vl", "max_tokens": 2,
                                              "messages": image_msg(url)})
        # a text request takes its place where the engine is (no media to fetch first):
        # the same 429
        text = httpx.post(api, timeout=30, json={**long, "max_tokens": 2})
        lines.close()                                # leave: frees the slot for the waiter
    waiter.join(120)
    host.shutdown()
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert text.status_code == 429 and int(text.headers["retry-after"]) >= 1, text.text
    assert text.json()["error"]["type"] == "rate_limit_error"
    # at once: a queued request would have waited for the slot, held until after this
    # answer, and its image would have been fetched first
    assert hits == []
    srv.stop()


def test_empty_stop_string_is_ignored(client):
    r = client.chat.completions.create(model="qwen3-vl", messages=USER, max_tokens=4,
                                       stop=[""], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
