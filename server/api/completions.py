"""Legacy completions (``POST /v1/completions``) on the chat service's engine path.

A plain prompt, text or token ids, is run without the chat template through the same
queue, key limits, fairness and engine as a chat request (``ChatService.launch``); the
sampling fields mean what they mean for chat (``ChatService.sampling_params``).  What this
route adds: ``max_tokens`` defaults to 16 (OpenAI's default here, capped by
``--max-tokens-limit``), ``echo`` puts the prompt's text before each choice's, and
``logprobs`` is the legacy integer form (``tokens``, ``token_logprobs``, ``top_logprobs``
as {token: logprob} holding the sampled token and the k best, ``text_offset``).

One prompt per request (a list of one is unwrapped); several, ``suffix``, ``best_of``
other than ``n`` and ``echo`` with ``logprobs`` (prompt logprobs) are refused with a 400
naming the field.  No tensors here.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from server.api import protocol as p
from server.engine.interface import Output
from server.errors import APIError, InvalidRequest
from server.api.serving import ChatService, RequestStats, usage
from server.textprep import THREAD_CHARS

DEFAULT_MAX_TOKENS = 16


class CompletionService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    def _check(self, req: p.CompletionRequest) -> str | list[int]:
        self.chat.check_common(req)
        prompt = req.single_prompt
        if prompt is None:
            raise InvalidRequest("One prompt per request: send a string or a list of token "
                                 "ids (a list of several prompts is not supported).",
                                 param="prompt")
        if not prompt:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if isinstance(prompt, str):
            self.chat.check_prompt_text(prompt)
        if isinstance(prompt, list):
            vocab = self.chat.vocab_size
            bad = next((i for i, t in enumerate(prompt) if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"prompt[{bad}] is not a token id (0 to {vocab - 1}).",
                                     param="prompt")
        if req.suffix:
            raise InvalidRequest("suffix is not supported by this model.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequest("best_of is not supported (other than equal to n).",
                                 param="best_of")
        if req.echo and req.logprobs is not None:
            raise InvalidRequest("echo with logprobs (the prompt's logprobs) is not "
                                 "supported.", param="echo")
        return prompt

    async def start(self, req: p.CompletionRequest, request_id: str, stats: RequestStats,
                    key: str = "", salt: str = "") -> tuple[AsyncIterator[Output], str]:
        """The engine's output stream (first event in) and the text ``echo`` puts first."""
        prompt = self._check(req)
        params = self.chat.sampling_params(req, logprobs=req.logprobs is not None,
                                           top_logprobs=req.logprobs or 0, grammar=None)
        if params.max_tokens is None:
            params = params.replace(max_tokens=min(DEFAULT_MAX_TOKENS,
                                                   self.chat.settings.max_tokens_limit))
        ids = prompt if isinstance(prompt, list) else None
        echo = ""
        if req.echo:  # before any work: an id the tokenizer cannot spell is a 400 now
            try:
                echo = prompt if ids is None else await self.chat.engine.detokenize(ids)
            except InvalidRequest as e:
                e.param = "prompt"
                raise

        async def load() -> dict:
            return {"prompt_token_ids": ids} if ids is not None else {"prompt": prompt}
        outputs = await self.chat.launch(
            req, request_id, stats, params, load, key=key, salt=salt,
            work_first=ids is None and len(prompt) > THREAD_CHARS)  # a long text to tokenise
        return outputs, echo

    async def collect(self, req: p.CompletionRequest, request_id: str,
                      outputs: AsyncIterator[Output], echo: str, stats: RequestStats) -> str:
        texts = [echo] * req.n
        finish: list[str | None] = [None] * req.n
        logprobs = [_Legacy(len(echo)) for _ in range(req.n)] if req.logprobs is not None \
            else None
        counts = [0] * req.n
        async for o in outputs:
            texts[o.index] += o.text
            counts[o.index] = o.completion_tokens
            stats.tally(o, counts)
            if logprobs is not None and o.logprobs:
                logprobs[o.index].add(o.logprobs)
            if o.finish_reason:
                finish[o.index] = o.finish_reason
        choices = [p.CompletionChoice(index=i, text=texts[i], finish_reason=finish[i],
                                      logprobs=logprobs[i].model() if logprobs else None)
                   for i in range(req.n)]
        return p.Completion(id=request_id, model=req.model, choices=choices,
                            usage=usage(stats)).model_dump_json()

    async def stream(self, req: p.CompletionRequest, request_id: str,
                     outputs: AsyncIterator[Output], echo: str,
                     stats: RequestStats) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, use=None) -> str:
            c = p.Completion(id=request_id, created=created, model=req.model, choices=choices,
                             usage=use)
            return "data: " + c.model_dump_json() + "\n\n"

        counts = [0] * req.n
        offsets = [len(echo)] * req.n
        if echo:
            for i in range(req.n):
                yield chunk([p.CompletionChoice(index=i, text=echo)])
        try:
            async for o in outputs:
                counts[o.index] = o.completion_tokens
                stats.tally(o, counts)
                lp = None
                if req.logprobs is not None and o.logprobs:
                    legacy = _Legacy(offsets[o.index])
                    legacy.add(o.logprobs)
                    offsets[o.index] = legacy.offset
                    lp = legacy.model()
                if o.text or lp is not None or o.finish_reason:
                    yield chunk([p.CompletionChoice(index=o.index, text=o.text, logprobs=lp,
                                                    finish_reason=o.finish_reason)])
        except APIError as e:  # mid-stream: OpenAI's error event, then a clean end
            yield "data: " + json.dumps(e.envelope()) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage(stats))
        yield "data: [DONE]\n\n"


class _Legacy:
    """A choice's logprobs in the legacy form, from the engine's entries (``TokenLogprob``
    objects or their chat-form JSON, see ``interface.Output.logprobs``)."""

    def __init__(self, offset: int):
        self.offset = offset
        self.tokens: list[str] = []
        self.values: list[float | None] = []
        self.tops: list[dict[str, float] | None] = []
        self.offsets: list[int] = []

    def add(self, entries) -> None:
        for e in entries:
            if isinstance(e, str):
                d = json.loads(e)
                token, lp = d["token"], d["logprob"]
                top = [(t["token"], t["logprob"]) for t in d["top_logprobs"]]
            else:
                token, lp, top = e.token, e.logprob, [(t[0], t[1]) for t in e.top]
            self.tokens.append(token)
            self.values.append(lp)
            # a logprob written as null (not finite) has no place in a {token: float} map
            both = [(token, lp)] + [(t, v) for t, v in top if t != token]
            self.tops.append({t: v for t, v in both if v is not None})
            self.offsets.append(self.offset)
            self.offset += len(token)

    def model(self) -> p.CompletionLogprobs:
        return p.CompletionLogprobs(tokens=self.tokens, token_logprobs=self.values,
                                    top_logprobs=self.tops, text_offset=self.offsets)
