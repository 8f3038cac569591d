"""Gradio web UI: a multimodal chat that talks to the OpenAI-compatible API.

    python -m server.ui [--api-base-url http://HOST:8080/v1] [--ui-port 7860] [--ui-host H]

It is a plain client of ``/v1/chat/completions`` through the ``openai`` package (images
as base64 data URLs, ``stream=True`` with ``include_usage``), so it works against this
server on any box and adds no second generation path.  It never imports torch.
``./launch_gradio_api.sh`` starts it next to the API; it tolerates an API that is still
loading (a status line polls ``/v1/models`` until the model is ready).

Auth: when the API answers 401, the page shows an "API key" field and each chat request
carries the key the person typed (as the Bearer token); without one the chat answers
with a readable "API key required" line, so the UI never opens a door the API's keys
closed.  ``--ui-api-key`` / ``OPENAI_API_KEY`` give every visitor one key: meant for a
UI bound to 127.0.0.1 (the default), and the UI warns at startup otherwise.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import gradio as gr
import httpx
import openai
from openai import AsyncOpenAI

from server.startup import is_loopback

log = logging.getLogger("qwen_vl.ui")

IMAGE_EXTS = [".jpg", ".jpeg", ".png", ".webp"]
DETAIL_CHOICES = ["auto", "low", "high"]
# Markers of the UI's own annotations inside assistant messages; they are stripped
# before the history goes back to the API.
USAGE_OPEN, USAGE_CLOSE = "<sub>tokens: ", "</sub>"
ERROR_PREFIX = "⚠ **"
_ANNOTATION = re.compile(r"\s*(?:<sub>tokens: [^\n]*</sub>|⚠ \*\*[^\n]*)\s*$")

THEME_FONT = ["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "PingFang SC",
              "Microsoft YaHei", "sans-serif"]  # system fonts only: no font download
CSS = """
#chat sub { font-size: 0.75em; opacity: 0.7; }
#api-status p { margin: 0; font-size: 0.85em; }
"""


# --- conversion: Gradio history -> OpenAI messages ---------------------------------------

def _sniff_mime(raw: bytes) -> str | None:
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if raw.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return None


class UserFacingError(Exception):
    """A problem the chat shows as a readable message (title, detail)."""

    def __init__(self, title: str, detail: str = ""):
        super().__init__(f"{title}: {detail}" if detail else title)
        self.title, self.detail = title, detail


def image_data_url(path: str | os.PathLike) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError:
        raise UserFacingError("Image unavailable",
                              f"{Path(path).name} is no longer on the UI server; clear the chat.")
    mime = _sniff_mime(raw)
    if mime is None:
        raise UserFacingError("Unsupported file",
                              f"{Path(path).name} is not a JPEG, PNG or WebP image.")
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _file_path(item: Any) -> str | None:
    """The local path of a Gradio file value in any of its shapes, else None."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict):
        if item.get("type") == "file":
            return _file_path(item.get("file"))
        if "path" in item and item.get("type") in (None, "file"):
            return item.get("path")
        return None
    path = getattr(item, "path", None)  # FileData
    if isinstance(path, str):
        return path
    value = getattr(item, "value", None)  # a component such as gr.Image(...)
    if value is not None and value is not item:
        return _file_path(value)
    return None


def _parts(content: Any) -> list[tuple[str, str]]:
    """Flatten one history message's content to [("text", s) | ("image", path)]."""
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    if isinstance(content, (list, tuple)):
        if isinstance(content, tuple):  # gradio's legacy (path, alt) file tuples
            return [("image", str(content[0]))] if content else []
        return [p for c in content for p in _parts(c)]
    if isinstance(content, dict) and content.get("type") == "text":
        return [("text", content.get("text") or "")]
    path = _file_path(content)
    return [("image", path)] if path else []


def strip_annotations(text: str) -> str:
    """Remove the usage line and error notes the UI appended to an answer."""
    prev = None
    while prev != text:
        prev, text = text, _ANNOTATION.sub("", text)
    return text


def to_openai_messages(message: Any, history: list[dict], detail: str,
                       system_prompt: str = "") -> list[dict]:
    """Gradio's history plus the new multimodal message -> OpenAI chat messages.

    Earlier images are sent again (as data URLs); the UI's usage lines and error notes
    are dropped, a turn whose answer is only an error is left out, and consecutive
    messages of one role are merged."""
    out: list[dict] = []

    def add(role: str, parts: list[tuple[str, str]]):
        content: list[dict] = []
        for kind, value in parts:
            if kind == "text":
                if role == "assistant":
                    value = strip_annotations(value)
                if value.strip():
                    content.append({"type": "text", "text": value})
            else:
                content.append({"type": "image_url",
                                "image_url": {"url": image_data_url(value), "detail": detail}})
        if not content:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(content)
        else:
            out.append({"role": role, "content": content})

    for msg in history:
        if isinstance(msg, dict):
            role, content, meta = msg.get("role"), msg.get("content"), msg.get("metadata")
        else:
            role, content = getattr(msg, "role", None), getattr(msg, "content", None)
            meta = getattr(msg, "metadata", None)
        if role not in ("user", "assistant") or (meta and meta.get("title")):
            continue
        parts = _parts(content)
        if role == "assistant" and any(k == "text" and v.lstrip().startswith(ERROR_PREFIX)
                                       for k, v in parts[:1]):
            # a turn that failed outright (413, 429, ...) never reached the model: drop
            # the question too, or its offending image would fail every later turn
            if out and out[-1]["role"] == "user":
                out.pop()
            continue
        add(role, parts)

    if isinstance(message, dict):
        parts = [("image", p) for p in (_file_path(f) for f in message.get("files") or []) if p]
        parts.append(("text", message.get("text") or ""))
    else:
        parts = _parts(message)
    add("user", parts)

    # the assistant's side may be text-only: flatten it for the widest compatibility
    for m in out:
        if m["role"] == "assistant":
            m["content"] = "\n\n".join(p["text"] for p in m["content"])
    if system_prompt.strip():
        out.insert(0, {"role": "system", "content": system_prompt.strip()})
    return out


# --- rendering --------------------------------------------------------------------------

def format_usage(usage: Any, elapsed: float, first_token: float | None,
                 finish_reason: str | None) -> str:
    bits = []
    if usage is not None:
        bits.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion")
    else:
        bits.append("usage not reported")
    bits.append(f"{elapsed:.2f} s")
    if first_token is not None:
        bits.append(f"first token {first_token:.2f} s")
        if usage is not None and usage.completion_tokens > 1 and elapsed > first_token:
            rate = (usage.completion_tokens - 1) / (elapsed - first_token)
            bits.append(f"{rate:.1f} tok/s")
    if finish_reason == "length":
        bits.append("stopped at max tokens")
    return USAGE_OPEN + " · ".join(bits) + USAGE_CLOSE


def _api_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    try:
        return e.response.json()["error"]["message"]
    except Exception:
        return e.message or ""


def describe_error(e: BaseException, base_url: str) -> str:
    """One readable chat line for any failure (no stack traces in the chat)."""
    if isinstance(e, UserFacingError):
        title, detail = e.title, e.detail
    elif isinstance(e, openai.APIStatusError):
        detail, status = _api_message(e), e.status_code
        title = {
            400: "Request rejected (400)",
            401: "API key required (401): enter a valid key in the API key field",
            403: "Forbidden (403)",
            404: "Not found (404)",
            413: "Too large (413): use a smaller image or fewer images",
            422: "Request rejected (422)",
            429: "Server busy (429): too many requests in flight; try again shortly",
            503: "Server unavailable (503): the model may still be loading",
        }.get(status, f"API error ({status})")
    elif isinstance(e, openai.APITimeoutError):
        title, detail = "The API timed out", base_url
    elif isinstance(e, openai.APIConnectionError):
        title, detail = "Cannot reach the API", f"{base_url} (is the server running?)"
    elif isinstance(e, openai.APIError):  # an error event in the middle of a stream
        title, detail = "The server stopped this answer", e.message
    else:
        log.exception("unexpected UI error", exc_info=e)
        title, detail = "Unexpected error in the UI", type(e).__name__
    detail = " ".join(str(detail).split())[:500]
    return f"{ERROR_PREFIX}{title}**" + (f" — {detail}" if detail else "")


# --- the app ------------------------------------------------------------------------------

class ChatBackend:
    """Holds the OpenAI client and the served model id (found via /v1/models)."""

    def __init__(self, base_url: str, api_key: str, model: str | None = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.client = AsyncOpenAI(base_url=self.base_url, api_key=api_key or "unused",
                                  max_retries=0,
                                  # the SDK's own Timeout type: openai 1.x re-exports
                                  # httpx's, 2.x+ its httpx2 one (an httpx.Timeout there
                                  # is a TypeError at start-up)
                                  timeout=openai.Timeout(timeout, connect=5.0))
        self.fixed_model = model
        self.model: str | None = model

    def _client(self, api_key: str = "") -> AsyncOpenAI:
        """The client, with the key the person typed (if any) as the Bearer token."""
        key = (api_key or "").strip()
        return self.client.with_options(api_key=key) if key else self.client

    async def resolve_model(self, client: AsyncOpenAI | None = None) -> str:
        if self.model is None:
            models = await (client or self.client).models.list()
            if not models.data:
                raise UserFacingError("The API lists no model", self.base_url)
            self.model = models.data[0].id
        return self.model

    async def status(self) -> tuple[str, bool, bool]:
        """(status line, ready, the API wants a key the UI does not have)."""
        try:
            models = await self.client.models.list()
        except openai.AuthenticationError:
            try:  # /health is open: it tells loading from ready without a key
                async with httpx.AsyncClient(timeout=5) as http:
                    health = await http.get(self.base_url.removesuffix("/v1") + "/health")
                ok = health.status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                return f"○ API at `{self.base_url}`: model loading…", False, True
            return (f"● API at `{self.base_url}` ready · it requires an API key: enter "
                    "yours in the API key field", True, True)
        except openai.APIStatusError as e:
            if e.status_code == 503:
                return f"○ API at `{self.base_url}`: model loading… (the chat works once it has loaded)", False, False
            return f"⚠ API at `{self.base_url}`: HTTP {e.status_code} — {_api_message(e)}", False, False
        except openai.APIConnectionError:
            return f"○ API at `{self.base_url}`: not reachable yet…", False, False
        ids = [m.id for m in models.data]
        if self.fixed_model is None and ids:
            self.model = ids[0]
        return f"● API at `{self.base_url}` ready · model `{self.model or '?'}`", True, False

    async def chat(self, message: Any, history: list[dict], system_prompt: str,
                   temperature: float, top_p: float, max_tokens: int,
                   detail: str, api_key: str = "") -> AsyncIterator[str]:
        """The ChatInterface function: yields the growing answer, then answer + usage."""
        text = ""
        t0 = time.perf_counter()
        try:
            messages = to_openai_messages(message, history, detail or "auto", system_prompt or "")
            if not messages or messages[-1]["role"] != "user":
                raise UserFacingError("Nothing to send", "type a question or attach an image")
            client = self._client(api_key)
            model = await self.resolve_model(client)
            first = usage = finish = None
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True,
                stream_options={"include_usage": True},
                temperature=float(temperature), top_p=float(top_p),
                max_tokens=int(max_tokens))
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            if first is None:
                                first = time.perf_counter() - t0
                            text += choice.delta.content
                            yield text
                        if choice.finish_reason:
                            finish = choice.finish_reason
            finally:  # also on Stop (cancellation): closing the stream aborts generation
                await stream.close()
            yield (text + "\n\n" if text else "") + format_usage(
                usage, time.perf_counter() - t0, first, finish)
        except Exception as e:  # noqa: BLE001 - every failure becomes a chat line
            if isinstance(e, openai.NotFoundError) and self.fixed_model is None:
                self.model = None  # the server may serve another name now: ask again
            yield (text + "\n\n" if text else "") + describe_error(e, self.base_url)


def build_ui(backend: ChatBackend, *, concurrency: int = 16,
             max_tokens_limit: int = 8192) -> gr.Blocks:
    with gr.Blocks(title="Qwen3-VL chat", analytics_enabled=False, fill_height=True,
                   delete_cache=(3600, 24 * 3600)) as demo:  # uploads live a day
        gr.Markdown("## Qwen3-VL chat")
        status = gr.Markdown("○ connecting to the API…", elem_id="api-status")
        # shown once the API turns out to require a key; the typed key stays in the page
        api_key = gr.Textbox(label="API key", type="password", elem_id="api-key",
                             placeholder="This server requires an API key", visible=False)
        chatbot = gr.Chatbot(
            elem_id="chat", height=560, label="Chat", show_label=False,
            buttons=["copy", "copy_all"], feedback_options=None, layout="bubble",
            placeholder="Ask about an image: attach JPEG/PNG/WebP files with the clip, "
                        "type a question (English or 中文) and press Enter.")
        textbox = gr.MultimodalTextbox(
            elem_id="msg", file_types=IMAGE_EXTS, file_count="multiple",
            placeholder="Type a message, attach images…", show_label=False,
            sources=["upload"], autofocus=True, submit_btn=True, stop_btn=True)
        acc = gr.Accordion("Sampling settings", open=False, render=False)
        inputs = [
            gr.Textbox(label="System prompt", lines=2, value="", render=False),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", render=False),
            gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top p", render=False),
            gr.Slider(1, max_tokens_limit, value=min(1024, max_tokens_limit), step=1,
                      label="Max tokens", render=False),
            gr.Radio(DETAIL_CHOICES, value="auto", label="Image detail", render=False),
            api_key,  # rendered above, so ChatInterface leaves it where it is
        ]
        gr.ChatInterface(
            backend.chat, multimodal=True, chatbot=chatbot, textbox=textbox,
            additional_inputs=inputs, additional_inputs_accordion=acc,
            concurrency_limit=concurrency, fill_height=True, autoscroll=True,
            show_progress="minimal")

        timer = gr.Timer(2.0)

        async def poll():
            text, ready, needs_key = await backend.status()
            return text, gr.Timer(active=not ready), gr.Textbox(visible=needs_key)

        outputs = [status, timer, api_key]
        demo.load(poll, outputs=outputs, show_progress="hidden", queue=False)
        timer.tick(poll, outputs=outputs, show_progress="hidden", queue=False)
    return demo


# --- CLI ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m server.ui",
        description="Gradio web UI for an OpenAI-compatible Qwen3-VL server.")
    ap.add_argument("--api-base-url", default=os.environ.get("OPENAI_BASE_URL",
                                                             "http://127.0.0.1:8080/v1"),
                    help="Base URL of the API, ending in /v1 [default: %(default)s; "
                         "env OPENAI_BASE_URL]")
    ap.add_argument("--ui-api-key", default=None,
                    help="API key that every visitor of the UI uses (keep such a UI on "
                         "127.0.0.1); without one the page asks for a key when the API "
                         "needs one [default: env OPENAI_API_KEY, which "
                         "launch_gradio_api.sh does not pass on]")
    ap.add_argument("--ui-host", default="127.0.0.1", help="Address the UI listens on "
                    "[default: %(default)s]")
    ap.add_argument("--ui-port", type=int, default=7860, help="UI port [default: %(default)s]")
    ap.add_argument("--ui-model", default=None,
                    help="Model name to request [default: the first one /v1/models lists]")
    ap.add_argument("--ui-concurrency", type=int, default=16,
                    help="Chats the UI streams at once [default: %(default)s]")
    ap.add_argument("--ui-max-tokens", type=int, default=8192,
                    help="Upper end of the max-tokens slider [default: %(default)s]")
    ap.add_argument("--ui-timeout", type=float, default=600.0,
                    help="Seconds one answer may take [default: %(default)s]")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for name in ("httpx", "httpx2", "httpcore"):  # one INFO line per API call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    api_key = args.ui_api_key or os.environ.get("OPENAI_API_KEY", "")
    if not is_loopback(args.ui_host):
        log.warning("the UI listens on %s: anyone who can reach it can chat%s", args.ui_host,
                    " with the configured API key (--ui-api-key / OPENAI_API_KEY)" if api_key
                    else " if the API has no keys")
    backend = ChatBackend(args.api_base_url, api_key, args.ui_model, args.ui_timeout)
    demo = build_ui(backend, concurrency=args.ui_concurrency,
                    max_tokens_limit=args.ui_max_tokens)
    demo.queue(default_concurrency_limit=args.ui_concurrency)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    demo.launch(server_name=args.ui_host, server_port=args.ui_port, prevent_thread_lock=True,
                share=False, ssr_mode=False, show_error=False, quiet=True, footer_links=[],
                max_file_size="64mb", theme=gr.themes.Soft(font=THEME_FONT), css=CSS)
    log.info("UI on http://%s:%d (API %s)", args.ui_host, args.ui_port, backend.base_url)
    while not stop.wait(0.5):
        pass
    log.info("UI stopping")
    demo.close()


if __name__ == "__main__":
    main()
