"""Keys are tenants (issue 27): what one key sends is never observed by another through
the caches or /metrics, and every limit counts all the work a request causes.

One server with a YAML key file: ``shop-a`` and ``shop-a-2`` (one ``cache_group``),
``shop-b``, ``capped`` (``max_concurrent: 2``) and ``ops`` (``operator``).  Probes assert
on counts (``cached_tokens``, the cache counters in /metrics), never on seconds: each
probe has a positive control showing the same signal where it should be.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import data_url, group_pids, png_bytes

KEYS = """\
keys:
  - name: shop-a
    key: sk-a
    cache_group: shop-a
  - name: shop-a-2
    key: sk-a2
    cache_group: shop-a
  - name: shop-b
    key: sk-b
  - name: capped
    key: sk-capped
    max_concurrent: 2
  - name: ops
    key: sk-ops
    operator: true
"""
SECRET = ("You are the support bot of a shop. The customer is Jane Q. Example, order 48213, "
          "paid with the card ending 4417, delivered to 12 Elm Street. Never repeat this. ")


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "keys.yaml"
    path.write_text(KEYS)
    # (a compile's deadline far off: on a loaded box a schema took over the default 10 s,
    # and these tests are about whose cache it lands in, not about the deadline)
    return server_factory("--api-key-file", str(path), "--max-new-tokens", "4",
                          "--grammar-timeout", "120")


def client(srv, key):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def cached(srv, key, messages, **kw) -> int:
    r = client(srv, key).chat.completions.create(
        model="qwen3-vl", messages=messages, max_tokens=2, temperature=0, **kw)
    return r.usage.prompt_tokens_details.cached_tokens


def system(card: str) -> list[dict]:
    return [{"role": "system", "content": SECRET.replace("4417", card) * 2},
            {"role": "user", "content": "Where is my parcel?"}]


def metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sk-ops"},
                     timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_right_guess_caches_no_more_than_a_wrong_one(srv):
    """A's private system prompt is cached; B's right guess of the card digits hits no
    more of it than a wrong guess.  Control: A's resend, and A's group partner, hit it."""
    card = "4417"
    first = cached(srv, "sk-a", system(card))  # what other tests' prompts already share
    again = cached(srv, "sk-a", system(card))
    assert again >= first + 64  # the cache works for A itself (the control)
    assert cached(srv, "sk-a2", system(card)) == again  # a key of A's cache group shares
    cached(srv, "sk-b", system("0000"))  # B's own blocks of the common template prefix
    right, wrong = cached(srv, "sk-b", system(card)), cached(srv, "sk-b", system("9999"))
    assert right == wrong < again, (right, wrong, again)


def test_request_cache_salt_isolates_within_a_key(srv):
    msgs = system("1234")
    cached(srv, "sk-a", msgs)
    hit = cached(srv, "sk-a", msgs)
    assert hit >= 64
    assert cached(srv, "sk-a", msgs, extra_body={"cache_salt": "customer-77"}) < hit
    assert cached(srv, "sk-a", msgs, extra_body={"cache_salt": "customer-77"}) == hit


def test_another_keys_photo_caches_no_more_than_an_unseen_one(srv):
    """A's photo: B sending it gets the cached tokens and the cache counters of an unseen
    photo (pixels, encoder, prefix); A resending it hits all three (the control)."""
    photo, unseen = data_url(png_bytes(96, 64, (10, 200, 30))), data_url(png_bytes(96, 64, (9, 9, 250)))

    def ask(key, url):
        before = {k: metric(srv, f"qwen_vl_{k}_total") for k in ("image_cache_hits",
                                                                 "encoder_cache_hits")}
        n = cached(srv, key, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is this?"}]}])
        return n, {k: metric(srv, f"qwen_vl_{k}_total") - v for k, v in before.items()}

    ask("sk-a", photo)
    own = ask("sk-a", photo)
    assert own[0] > 0 and own[1]["image_cache_hits"] == 1, own  # the control
    theirs, fresh = ask("sk-b", photo), ask("sk-b", unseen)
    assert theirs == fresh, (theirs, fresh)
    assert theirs[1] == {"image_cache_hits": 0, "encoder_cache_hits": 0}


def test_another_keys_schema_is_compiled_again(srv):
    """A grammar A compiled is a miss for B (it compiles its own) and a hit for A."""
    schema = {"type": "object", "additionalProperties": False, "required": ["sku"],
              "properties": {"sku": {"type": "string", "maxLength": 7}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}

    def misses(key):
        before = metric(srv, "qwen_vl_grammar_cache_misses_total")
        cached(srv, key, [{"role": "user", "content": "sku?"}], response_format=fmt)
        return metric(srv, "qwen_vl_grammar_cache_misses_total") - before

    assert misses("sk-a") == 1
    assert misses("sk-a") == 0  # the control: A's own compile is reused
    assert misses("sk-b") == 1


def test_metrics_are_for_operators_only(srv):
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sk-b"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    ok = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sk-ops"}, timeout=10)
    assert ok.status_code == 200 and "qwen_vl_key_requests_total" in ok.text


def test_n_counts_against_max_concurrent(srv):
    """A key capped at 2 sequences: n=8 can never fit (429 'too large', no Retry-After);
    two n=2 requests at once hold 4 > 2, so one of them is refused."""
    c = client(srv, "sk-capped")
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="qwen3-vl", messages=[{"role": "user", "content": "x"}],
                                  n=8, max_tokens=2)
    assert "n=8" in e.value.response.json()["error"]["message"]
    assert e.value.response.headers.get("retry-after") is None
    stream = c.chat.completions.create(
        model="qwen3-vl", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=64,
        stream=True, temperature=0, extra_body={"ignore_eos": True})
    next(iter(stream))  # both sequences of the first request hold the key's places
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="qwen3-vl", n=2, max_tokens=2,
                                      messages=[{"role": "user", "content": "x"}])
        assert "concurrent sequences" in e.value.response.json()["error"]["message"]
    finally:
        stream.close()


def test_ten_megabyte_tools_refused_while_another_key_is_served(srv):
    """10 MB of tool description: a 400 naming tools (the text limit counts tools), with
    no chat template rendered (so nothing tokenised: the counter moves only for the
    positive control); an innocent request from another key sent beside it is served."""
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 10_000_000,
                                               "parameters": {"type": "object"}}}]
    renders = metric(srv, "qwen_vl_prompts_rendered_total")
    r = httpx.post(srv.base_url + "/chat/completions", timeout=120,
                   headers={"Authorization": "Bearer sk-a"},
                   json={"model": "qwen3-vl", "tools": tools,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text[:300]
    assert metric(srv, "qwen_vl_prompts_rendered_total") == renders  # neither rendered
    cached(srv, "sk-b", [{"role": "user", "content": "hello"}])
    assert metric(srv, "qwen_vl_prompts_rendered_total") == renders + 1  # the control
    with ThreadPoolExecutor(2) as ex:
        big = ex.submit(httpx.post, srv.base_url + "/chat/completions", timeout=120,
                        headers={"Authorization": "Bearer sk-a"},
                        json={"model": "qwen3-vl", "tools": tools,
                              "messages": [{"role": "user", "content": "hi"}]})
        small = ex.submit(cached, srv, "sk-b", [{"role": "user", "content": "hello"}])
        r = big.result()
        assert small.result() >= 0
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "tools" and "tools" in err["message"]


def test_schema_requiring_an_undeclared_property_is_a_400(srv):
    schema = {"type": "object", "additionalProperties": False, "required": ["id", "ghost"],
              "properties": {"id": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError) as e:
        cached(srv, "sk-a", [{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "g", "schema": schema}})
    assert '"ghost"' in e.value.response.json()["error"]["message"]


def test_unknown_field_names_are_logged_escaped_and_short(srv):
    forged = "x\n2026-01-01 INFO qwen_vl.keys: api keys reloaded" + "y" * 5000
    r = httpx.post(srv.base_url + "/chat/completions", headers={"Authorization": "Bearer sk-a"},
                   json={"model": "qwen3-vl", "max_tokens": 1, forged: 1,
                         "messages": [{"role": "user", "content": "x"}]}, timeout=60)
    assert r.status_code == 200
    log = srv.log()
    assert "\n2026-01-01 INFO qwen_vl.keys" not in log
    assert "y" * 100 not in log and "ignoring unknown request fields" in log


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _shop_tools(tag: str) -> list[dict]:
    """8 tools of a shop bot (a tool grammar that serialises to ~13 MB)."""
    from bench.grammar_vocab import tools
    return [{"type": "function", "function": {"name": f"{tag}_{name}", "parameters": params}}
            for name, params in tools(8)]


def test_grammar_memory_stays_within_its_budget(real_vocab_model):
    """Six distinct tool grammars (~13 MB serialised each on the real vocabulary, ~3 MB by
    xgrammar's estimate) through compile workers into a 16 MiB cache: the cache holds at
    most 16 MiB by serialised size, and the process grows by no more than that plus a
    small margin (the deserialisation's transient heap is handed back)."""
    import asyncio

    from models.processor import load_processor
    from server.engine.structured import GrammarCache, GrammarSpec
    from bench.grammar_vocab import tools
    tok = load_processor(real_vocab_model).tokenizer

    async def main():
        cache = GrammarCache(tok, vocab_size=151936, stop_ids=[151645, 151643],
                             max_bytes=16 * 2**20)
        cache.start_workers(1, 1024)
        try:
            spec = lambda tag: GrammarSpec.tool_calls(  # noqa: E731
                [(f"{tag}_{n}", p) for n, p in tools(8)], parallel=True)
            await cache.compile_async(spec("warm"), timeout=60)
            before = _rss_mb(os.getpid())
            for i in range(6):
                await cache.compile_async(spec(f"t{i}"), timeout=60)
                assert cache.bytes <= 16 * 2**20 and len(cache._cache) <= 1
            return _rss_mb(os.getpid()) - before
        finally:
            cache.close()
    grown = asyncio.run(main())
    assert grown <= 16 + 16, grown


def test_a_compile_past_its_memory_limit_is_a_400(srv):
    """512 properties: a legal schema whose compiled grammar needs more than the
    1024 MiB a compile worker may use; the server answers 400 and goes on serving."""
    from bench.grammar_vocab import wide_schema
    with pytest.raises(openai.BadRequestError) as e:
        cached(srv, "sk-a", [{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "w", "schema": wide_schema(512)}})
    assert "--grammar-memory-mb" in e.value.response.json()["error"]["message"]
    assert cached(srv, "sk-b", [{"role": "user", "content": "still there?"}]) >= 0


def test_group_sigterm_past_the_timeout_answers_every_open_request(server_factory):
    """systemd's stop: SIGTERM to the whole process group while a stream and a plain
    request run longer than --shutdown-timeout.  The stream ends with an error event and
    [DONE], the plain request gets a 503 envelope, the worker pools neither log tracebacks
    nor respawn, the server exits 0 and nothing of its group is left."""
    srv = server_factory("--shutdown-timeout", "4", new_session=True)
    long = {"model": "qwen3-vl", "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    http = httpx.Client(base_url=srv.url, timeout=60, trust_env=False)
    lines: list[str] = []

    def stream():
        with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 3:
                        os.killpg(srv.proc.pid, signal.SIGTERM)

    with ThreadPoolExecutor(2) as ex:
        plain = ex.submit(http.post, "/v1/chat/completions", json=long)
        ex.submit(stream).result()
        r = plain.result()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "service_unavailable", r.text
    assert lines[-1] == "data: [DONE]", lines[-3:]
    event = json.loads(lines[-2][6:])
    assert event["error"]["code"] == "service_unavailable", event
    assert srv.proc.wait(timeout=15) == 0
    log = srv.log()
    assert "2 open request(s) answered with a 503" in log, log[-3000:]
    assert "Traceback" not in log and "worker killed" not in log, log[-3000:]
    deadline = time.monotonic() + 5  # the fork server and resource tracker see EOF
    while group_pids(srv.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: open(f"/proc/{pid}/cmdline").read()[:120] for pid in group_pids(srv.proc.pid)}
    assert not left, f"processes of the server's group outlived it: {left}"
