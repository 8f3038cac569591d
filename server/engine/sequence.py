"""One choice of one request, token by token: detokenization, stop handling, finish reason.

Shared by both schedulers.  A token goes through two halves, which the batching engine
runs on two threads:

* ``accept(token)`` (model thread): counts it, advances the grammar matcher (the next
  step's mask needs it) and decides what the token ids alone decide: end-of-turn,
  ``max_tokens``, grammar termination.  Cheap: no text.
* ``emit(token, logprob, finish)`` (output thread): detokenises, looks for stop strings
  and returns the ``Output`` event.  A stop string sets ``stopped``; the model thread
  reads it and drops the row at its next step, and the token it sampled meanwhile is
  never emitted nor counted (``emit`` returns None once the choice is closed).

``append(token)`` runs both (the sequential scheduler, tests).  Text is decoded incrementally with ``tokenizers``' ``DecodeStream`` (which
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
                 tokenizer: Tokenizer, eos_ids: set[int], sink, reservation=None,
                 image_tokens: int = 0, video_tokens: int = 0):
        self.request_id, self.index, self.prompt_len, self.params = request_id, index, prompt_len, params
        self.image_tokens, self.video_tokens = image_tokens, video_tokens
        self.tokenizer, self.eos_ids, self.sink = tokenizer, eos_ids, sink
        self.reservation = reservation
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None  # output side: what the client is told
        self.n_accepted = 0                      # model side: tokens sampled so far
        self.model_finish: str | None = None     # model side: eos / length / grammar
        self.hide_last = False                   # model side: the last token has no text
        self.stopped = False                     # set by the output side or an abort
        self.key: tuple[int, int] = (0, 0)       # random stream key (server.engine.sampler)
        self.matcher = None  # xgrammar matcher of a constrained row (server.engine.structured)
        self.cached_tokens = 0  # prompt tokens the prefix cache served (set at admission)
        self.announced = False  # its counts were sent to the API server (engine process)
        self._stream = DecodeStream(skip_special_tokens=True)

    @property
    def finished(self) -> bool:
        """The model thread's view: the row leaves the batch at the next step."""
        return self.model_finish is not None or self.stopped

    @property
    def remaining(self) -> int:
        """Tokens this row may still sample (the KV budget counts them)."""
        return max(0, self.params.max_tokens - self.n_accepted)

    def accept(self, token: int) -> str | None:
        """Model thread: the finish reason the token ids decide, or None."""
        p = self.params
        self.n_accepted += 1
        self.hide_last = False
        done = self._advance_grammar(token)
        if self.model_finish is not None:  # the grammar refused the token
            self.hide_last = True
        elif token in self.eos_ids and (not p.ignore_eos or done):
            self.model_finish, self.hide_last = "stop", True
        elif done:
            self.model_finish = "stop"
        elif self.n_accepted >= p.max_tokens:
            self.model_finish = "length"
        return self.model_finish

    def emit(self, token: int, logprob: TokenLogprob | str | None = None,
             finish: str | None = None, hide: bool = False) -> Output | None:
        """Output thread: the event for ``token``; None once the choice is closed."""
        if self.finish_reason is not None or self.stopped:
            return None
        self.output_ids.append(token)
        if not hide:
            piece = self._stream.step(self.tokenizer, token)
            if piece:
                self._add_text(piece)
        if self.finish_reason is not None:  # a stop string
            self.stopped = True
        else:
            self.finish_reason = finish
        end = len(self.text) if self.finish_reason else len(self.text) - _held_back(
            self.text[self.emitted:], self.params.stop)
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return Output(index=self.index, text=delta, token_ids=[token],
                      finish_reason=self.finish_reason, prompt_tokens=self.prompt_len,
                      completion_tokens=len(self.output_ids),
                      logprobs=[logprob] if logprob is not None else None,
                      cached_tokens=self.cached_tokens, image_tokens=self.image_tokens,
                      video_tokens=self.video_tokens)

    def append(self, token: int, logprob: TokenLogprob | None = None) -> Output:
        finish = self.accept(token)
        return self.emit(token, logprob, finish, self.hide_last)

    def _advance_grammar(self, token: int) -> bool:
        """Feed ``token`` to the row's grammar; True once the grammar has terminated (its
        end-of-turn token was accepted), which finishes the row with ``stop``."""
        m = self.matcher
        if m is None:
            return False
        if not m.accept_token(token):  # the mask makes this unreachable; never emit past it
            self.matcher = None
            self.model_finish = "length"
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
