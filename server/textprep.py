"""The chat template and the tokens, on an API server (issue 31): no torch.

An API server in front of an engine-core process (``server.api.engine_client``) renders each
request's chat template (transformers' torch-free ``render_jinja_template``, with the
template and special-token variables the engine's processor uses, sent in its ``ready``)
and tokenises the text with the engine's own Rust tokenizer (the ``tokenizers`` library,
the backend of the HF fast tokenizer the engine would call).  The engine gets
``EngineRequest.pieces``: the token ids of the text *between* the vision slots and each
slot's kind, and expands them with each image's token count (which it knows from the
image's size and budget) and each video's frame text.  Cutting at the slots changes no
id: ``<|image_pad|>`` and ``<|video_pad|>`` are added tokens, which the tokenizer splits
out before anything else, so the text on either side of one is tokenised on its own
either way (``tests/test_textprep.py`` holds the engine's own ``PromptBuilder`` to it,
token for token).

``split_slots`` is the one definition of that cut and of its check (message text may not
write the placeholders itself), used here and by the engine's ``PromptBuilder``.

Without a template from the engine (a processor with none, or several) the API server
sends the messages as before and the engine renders them; the log says which path runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from server.errors import InvalidRequest

IMAGE_PAD = "<|image_pad|>"
# the chat template writes "<|vision_start|><|video_pad|><|vision_end|>" for a video part;
# the engine replaces the <|video_pad|> (only) with the video's frame text
VIDEO_PAD = "<|video_pad|>"
_SLOTS = re.compile(re.escape(IMAGE_PAD) + "|" + re.escape(VIDEO_PAD))
# above this many characters the tokenizer runs on a worker thread (it releases the GIL),
# not on the event loop: a 100k-character prompt takes ~10 ms
THREAD_CHARS = 16_384

log = logging.getLogger("qwen_vl.api")


@dataclass
class PromptPieces:
    """A rendered, tokenised prompt: ``ids[i]`` the tokens before slot ``i`` (``ids[-1]``
    after the last), ``kinds[i]`` "image" or "video"."""
    ids: list[list[int]]
    kinds: list[str]


def split_slots(text: str, images: int, videos: int, param: str) -> tuple[list[str], list[str]]:
    """``text`` cut at its image and video placeholders: (the pieces, each slot's kind).
    A count that is not the request's images and videos means the message text wrote a
    placeholder itself: a 400, since it would stand for pixels the request does not have."""
    kinds = ["image" if m.group(0) == IMAGE_PAD else "video" for m in _SLOTS.finditer(text)]
    if kinds.count("image") != images or kinds.count("video") != videos:
        raise InvalidRequest("Message text may not contain the image or video placeholder "
                             "tokens.", param=param)
    return _SLOTS.split(text), kinds


class TextPrep:
    """Renders and tokenises ``EngineRequest``s the way the engine's ``PromptBuilder``
    would (see the module doc)."""

    def __init__(self, tokenizer_json: str, chat_template: str, template_vars: dict):
        from tokenizers import Tokenizer
        from transformers.utils.chat_template_utils import render_jinja_template
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # as the HF tokenizer calls it (add_special_tokens=False, nothing cut or padded),
        # whatever state the engine's copy was serialised in
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.chat_template = chat_template
        self.template_vars = template_vars
        self._render_jinja = render_jinja_template

    @classmethod
    def from_info(cls, info: dict) -> "TextPrep | None":
        """From the engine's ``ready`` info; None (the engine renders) without a template."""
        template = info.get("chat_template")
        if not isinstance(template, str):
            log.info("chat template and tokens: in the engine process (its processor has "
                     "no single chat template to send)")
            return None
        log.info("chat template and tokens: on this API server")
        return cls(info["tokenizer"], template, info.get("template_vars") or {})

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        """The processor's ``apply_chat_template(..., tokenize=False,
        add_generation_prompt=True)``: the same template, variables and call."""
        prompts, _ = self._render_jinja(
            conversations=[messages], tools=tools, documents=None,
            chat_template=self.chat_template, return_assistant_tokens_mask=False,
            continue_final_message=False, add_generation_prompt=True, **self.template_vars)
        return prompts[0]

    def pieces(self, request) -> PromptPieces:
        """``request``'s prompt (its messages through the template, or its plain prompt),
        cut at its vision slots and tokenised."""
        if request.prompt is not None:
            text, param = request.prompt, "prompt"
        else:
            text, param = self.render(request.messages, request.tools), "messages"
        parts, kinds = split_slots(text, len(request.images), len(request.videos), param)
        if sum(map(len, parts)) > THREAD_CHARS:
            # a long text, on a worker thread: encode_batch releases the GIL for the loop
            ids = [e.ids for e in self.tokenizer.encode_batch(parts, add_special_tokens=False)]
        else:
            # part by part on this thread: encode_batch hands even a chat turn's two short
            # parts to the tokenizers' thread pool, whose threads then spin for more work
            # (measured: 48 us wall and 75 us CPU, against 22 us, per turn; more on 2 busy
            # cores, where the spinning takes CPU from the decode workers and the engine)
            ids = [self.tokenizer.encode(x, add_special_tokens=False).ids for x in parts]
        return PromptPieces(ids, kinds)

    def prepare(self, request) -> None:
        """Fill ``request.pieces`` (and drop what the engine no longer needs to see:
        the messages and tools, the plain prompt).  A prompt given as token ids is left
        as it is (the engine checks it)."""
        if request.prompt_token_ids is not None or request.pieces is not None:
            return  # ids given, or prepared already (the messages are gone by then)
        request.pieces = self.pieces(request)
        request.messages, request.tools, request.prompt = [], None, None


def text_chars(request) -> int:
    """The characters ``TextPrep.prepare`` renders for ``request`` (roughly: message
    text and tools), to decide whether it runs on a worker thread."""
    if request.prompt is not None:
        return len(request.prompt)
    n = 0
    for m in request.messages:
        c = m.get("content")
        if isinstance(c, str):
            n += len(c)
        elif isinstance(c, list):
            n += sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
    return n + (len(repr(request.tools)) if request.tools else 0)
