"""One choice of one request, token by token: detokenization, stop handling, finish reason.

Shared by both schedulers.  ``Sequence.append(token)`` returns the ``Output`` event for
that token.  Text is decoded incrementally with ``tokenizers``' ``DecodeStream`` (which
holds back an incomplete UTF-8 character), and text that might be the start of a stop
string is held back until it is known not to be one.  ``finish_reason`` is computed:
``stop`` for an end-of-turn token or a stop string, ``length`` at ``max_tokens``.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from server.engine.interface import Output, SamplingParams, TokenLogprob


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Sequence:
    def __init__(self, *, request_id: str, index: int, prompt_len: int, params: SamplingParams,
                 tokenizer: Tokenizer, eos_ids: set[int], sink, reservation=None):
        self.request_id, self.index, self.prompt_len, self.params = request_id, index, prompt_len, params
        self.tokenizer, self.eos_ids, self.sink = tokenizer, eos_ids, sink
        self.reservation = reservation
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.matcher = None  # xgrammar matcher of a constrained row (server.engine.structured)
        self._stream = DecodeStream(skip_special_tokens=True)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: TokenLogprob | None = None) -> Output:
        p = self.params
        self.output_ids.append(token)
        done = self._advance_grammar(token)
        if self.finished:  # the grammar refused the token (see _advance_grammar)
            pass
        elif token in self.eos_ids and (not p.ignore_eos or done):
            self.finish_reason = "stop"
        else:
            piece = self._stream.step(self.tokenizer, token)
            if piece:
                self._add_text(piece)
            if done:
                self.finish_reason = "stop"
            elif not self.finished and len(self.output_ids) >= p.max_tokens:
                self.finish_reason = "length"
        end = len(self.text) if self.finished else len(self.text) - _held_back(
            self.text[self.emitted:], p.stop)
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return Output(index=self.index, text=delta, token_ids=[token],
                      finish_reason=self.finish_reason, prompt_tokens=self.prompt_len,
                      completion_tokens=len(self.output_ids),
                      logprobs=[logprob] if logprob is not None else None)

    def _advance_grammar(self, token: int) -> bool:
        """Feed ``token`` to the row's grammar; True once the grammar has terminated (its
        end-of-turn token was accepted), which finishes the row with ``stop``."""
        m = self.matcher
        if m is None:
            return False
        if not m.accept_token(token):  # the mask makes this unreachable; never emit past it
            self.matcher = None
            self.finish_reason = "length"
            return False
        return m.is_terminated()

    def _add_text(self, piece: str):
        start = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text += piece
        hits = [at for s in self.params.stop if (at := self.text.find(s, start)) != -1]
        if hits:  # the earliest stop string wins
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
        self.emitted = min(self.emitted, len(self.text))
