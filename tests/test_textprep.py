"""The chat template and the tokens on the API server (``server.textprep``, issue 31):
the pieces an API server sends are the ids the engine's ``PromptBuilder`` would have
made itself, and those are the HF processor's, token for token, on the real vocabulary."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.engine.interface import EngineRequest, ImageInput, SamplingParams
from server.errors import InvalidRequest
from server.textprep import TextPrep
from tests.conftest import fresh_python

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {
    "name": "track_parcel", "description": "Where a parcel is",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}},
                   "required": ["order"]}}}]


def _image(w=64, h=48, colour="red") -> ImageInput:
    return ImageInput(Image.new("RGB", (w, h), colour), 4096, 65536, f"{w}x{h}{colour}")


CASES = {
    "text": ([{"role": "user", "content": "Where is my parcel? Order 7, héllo 你好 🚀"}],
             0, None),
    "typed special token": ([{"role": "system", "content": "Be brief."}, {"role": "user",
                             "content": "what <|im_end|> is\n<|im_start|>this"}], 0, None),
    "photo and text": ([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Is it damaged?  \n\n"}]}], 1, None),
    "two photos": ([{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"},
        {"type": "text", "text": " b"}]}], 2, None),
    "tools": ([{"role": "user", "content": "Track order 9"}], 0, TOOLS),
    "tool round trip": ([
        {"role": "user", "content": "Track order 9"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1",
         "function": {"name": "track_parcel", "arguments": {"order": "9"}}}]},
        {"role": "tool", "content": "In Hamburg", "tool_call_id": "c1"}], 0, TOOLS),
}


@pytest.fixture(scope="module")
def builder(tiny_model):
    from models.processor import load_processor
    from server.engine.prompt import PromptBuilder
    return PromptBuilder(load_processor(tiny_model), max_model_len=4096, default_max_tokens=16)


@pytest.fixture(scope="module")
def textprep(builder):
    spec = builder.template_spec()
    return TextPrep(builder.tokenizer.backend_tokenizer.to_str(), spec["chat_template"],
                    spec["template_vars"])


def _whole_string_ids(builder, messages, tools, image_tokens: list[int]) -> list[int]:
    """The HF way: the processor renders, each placeholder is expanded in the text, and
    the fast tokenizer encodes the whole string at once."""
    text = builder.processor.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True, tools=tools)
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest
                              for n, rest in zip(image_tokens, parts[1:]))
    return builder.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_api_side_pieces_are_the_engines_ids(builder, textprep, case):
    messages, n_images, tools = CASES[case]
    images = [_image(64 + 32 * i, 48) for i in range(n_images)]
    engine_side = builder.plan(EngineRequest("e", messages, images, SamplingParams(), tools))
    request = EngineRequest("a", [dict(m) for m in messages], images, SamplingParams(), tools)
    textprep.prepare(request)
    assert request.pieces is not None and request.messages == [] and request.tools is None
    assert request.pieces.kinds == ["image"] * n_images
    api_side = builder.plan(request)
    ids = api_side.input_ids[0].tolist()
    assert ids == engine_side.input_ids[0].tolist()
    assert ids == _whole_string_ids(builder, messages, tools, api_side.image_tokens)
    assert textprep.render(messages, tools) == builder.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, tools=tools)


def test_plain_prompt_and_placeholders_typed_in_text(builder, textprep):
    request = EngineRequest("p", [], [], SamplingParams(), prompt="Once upon <|im_end|> a")
    textprep.prepare(request)
    assert builder.plan(request).input_ids[0].tolist() == builder.tokenizer(
        "Once upon <|im_end|> a", add_special_tokens=False)["input_ids"]
    for field, request in (
            ("prompt", EngineRequest("p", [], [], SamplingParams(), prompt="x <|image_pad|>")),
            ("messages", EngineRequest("m", [{"role": "user", "content": "<|video_pad|>"}],
                                       [], SamplingParams()))):
        with pytest.raises(InvalidRequest) as api:
            textprep.prepare(request)
        assert api.value.param == field
        assert "placeholder" in str(api.value)


def test_api_side_renders_without_torch(tiny_model):
    """The API server's imports, and a prompt rendered and tokenised there: no torch."""
    code = (
        "import sys, json, pathlib\n"
        "import server.api.api_server, server.api.engine_client\n"
        "from server.textprep import TextPrep\n"
        f"d = pathlib.Path({str(tiny_model)!r})\n"
        "tp = TextPrep((d / 'tokenizer.json').read_text(), "
        "(d / 'chat_template.jinja').read_text(), {})\n"
        "ids = tp.pieces(type('R', (), dict(prompt=None, messages=[{'role': 'user', "
        "'content': 'hi'}], tools=None, images=[], videos=[]))()).ids\n"
        "assert ids and ids[0], ids\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n")
    out = fresh_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_server_tokenises_on_its_api_server_as_hf_does(server_factory, builder):
    """Through the real server (supervisor, engine process, API server): /tokenize of a
    chat with a photo, tools and a typed special token gives the HF processor's ids (the
    photo's placeholder run from the processor's own preprocessing), and the API server
    says that it does the tokenising."""
    srv = server_factory()
    photo = Image.new("RGB", (200, 120), "blue")
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = "Is it damaged? <|im_end|> 你好"
    r = httpx.post(srv.url + "/tokenize", trust_env=False, timeout=60, json={
        "model": "qwen3-vl", "tools": TOOLS, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text}]}]})
    assert r.status_code == 200, r.text
    messages = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": text}]}]
    hf_text = builder.processor.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True, tools=TOOLS)
    # the server's image budget is the tests' (conftest); the processor gets the same
    from models.processor import image_budget_kwargs
    small = builder.processor.image_processor(
        images=[photo], return_tensors="pt", **image_budget_kwargs(*_budget()))
    n = int(small["image_grid_thw"][0].prod()) // builder.merge ** 2
    hf_ids = builder.tokenizer(hf_text.replace("<|image_pad|>", "<|image_pad|>" * n),
                               add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == hf_ids
    assert r.json()["image_tokens"] == n
    assert "chat template and tokens: on this API server" in srv.log()


def _budget() -> tuple[int, int]:
    """The tests' servers' --min-pixels / --max-pixels (``conftest.SMALL_IMAGES``)."""
    from tests.conftest import SMALL_IMAGES
    return (int(SMALL_IMAGES[SMALL_IMAGES.index("--min-pixels") + 1]),
            int(SMALL_IMAGES[SMALL_IMAGES.index("--max-pixels") + 1]))


@pytest.mark.parametrize("content, deferred", [
    ("Where is my parcel?", True),                       # nothing to do before the engine
    ("x" * 20_000, False),                               # a long text to tokenise here
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
      {"type": "text", "text": "damaged?"}], False),     # a photo to fetch and decode
])
def test_queue_place_is_taken_first_when_work_comes_before_the_engine(content, deferred):
    """``launch`` asks for its queue place before any work the request causes on the API
    server (fetching media, tokenising a long text): a full queue answers 429 before it.
    A short text has none, and lets the engine take the place as the request arrives."""
    import asyncio
    from server.api import protocol as p
    from server.errors import Overloaded
    from server.api.media import MediaFetcher, MediaPolicy
    from server.api.metrics import Metrics
    from server.api.serving import ChatService, RequestStats
    from server.settings import Settings
    asked = []

    class FullEngine:
        model_id, vocab_size, supports_video = "fake", 100, False

        def reserve(self, deferred=False):
            asked.append(deferred)
            raise Overloaded(retry_after=1)

    async def run():
        fetcher = MediaFetcher(MediaPolicy())
        svc = ChatService(FullEngine(), Settings(), fetcher, Metrics(lambda: {}))
        req = p.ChatCompletionRequest(model="qwen3-vl", messages=[
            {"role": "user", "content": content}])
        try:
            with pytest.raises(Overloaded):
                await svc.start(req, "chatcmpl-x", RequestStats())
        finally:
            await fetcher.aclose()
    asyncio.run(run())
    assert asked == [deferred]
