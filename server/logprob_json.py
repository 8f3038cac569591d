"""``LogprobJSON``: the logprob entries of a chat completion written straight as JSON.

Byte for byte what pydantic writes for ``server.api.protocol.TokenLogprob`` (field order,
pydantic's float format, NaN/inf as null; tests/test_logprobs_json.py compares them),
without building a model per token.  Its own module because both sides write it: the
engine's output stage (``server.engine.output``, in-process mode) and the API server's
serving layer; it needs only ``pydantic_core``, so the engine imports no HTTP wire types.
"""

from __future__ import annotations

import pydantic_core


def _jstr(x) -> str:
    return pydantic_core.to_json(x).decode()


class LogprobJSON:
    """Writes lists of logprob entries as the JSON array of ``ChoiceLogprobs.content``.

    An entry is either a str, the entry already written (``write``: the batching engine's
    output thread writes each step's entries, so that a response's logprobs are joined,
    not built, here), or an object with ``token``, ``logprob``, ``bytes`` (None: the
    token's UTF-8), ``top`` (``(token, logprob, bytes)`` tuples) and optionally
    ``token_id`` / ``top_ids``: with ids the fragments are cached per id (one server has
    one vocabulary).  One instance per thread (the cache is not locked)."""

    def __init__(self):
        self._by_id: dict[int, tuple[str, str]] = {}

    @staticmethod
    def _frags(token: str, raw) -> tuple[str, str]:
        return ('{"token":' + _jstr(token) + ',"logprob":',
                ',"bytes":' + _jstr(raw if raw is not None else list(token.encode())))

    def _frag(self, tid, token: str, raw) -> tuple[str, str]:
        if tid is None:
            return self._frags(token, raw)
        f = self._by_id.get(tid)
        if f is None:
            f = self._by_id[tid] = self._frags(token, raw)
        return f

    def write(self, items, info) -> list[str]:
        """The entries of ``items``, ``(token_id, logprob, top_ids, top_logprobs)`` each,
        written; ``info(id)`` gives a token's ``(text, bytes)`` the first time its id is
        seen.  All the floats in one ``to_json``, the rest from the per-id fragments."""
        floats: list[float] = []
        for _, lp, _, vals in items:
            floats.append(lp)
            floats += vals
        fl = pydantic_core.to_json(floats, inf_nan_mode="null").decode()[1:-1].split(",")
        by_id, frag = self._by_id, self._frag
        out = []
        j = 0
        for tid, _, ids, _ in items:
            head, tail = by_id.get(tid) or frag(tid, *info(tid))
            x = fl[j]
            j += 1
            tops = []
            for i in ids:
                f = by_id.get(i) or frag(i, *info(i))
                tops.append(f"{f[0]}{fl[j]}{f[1]}}}")
                j += 1
            out.append(f'{head}{x}{tail},"top_logprobs":[{",".join(tops)}]}}')
        return out

    def array(self, entries) -> str:
        objs = [e for e in entries if type(e) is not str]
        if not objs:
            return "[" + ",".join(entries) + "]"
        written = iter(self._objects(objs))
        return "[" + ",".join(e if type(e) is str else next(written) for e in entries) + "]"

    def _objects(self, entries) -> list[str]:
        floats: list[float] = []
        for e in entries:
            floats.append(e.logprob)
            floats += [t[1] for t in e.top]
        fl = pydantic_core.to_json(floats, inf_nan_mode="null").decode()[1:-1].split(",")
        out = []
        j = 0
        frag, by_id = self._frag, self._by_id
        for e in entries:
            tid, ids = getattr(e, "token_id", None), getattr(e, "top_ids", None)
            head, tail = frag(tid, e.token, e.bytes)
            x = fl[j]
            j += 1
            if ids is not None and len(ids) == len(e.top):
                tops = []
                for i, (t, _, b) in zip(ids, e.top):
                    f = by_id.get(i) or frag(i, t, b)
                    tops.append(f"{f[0]}{fl[j]}{f[1]}}}")
                    j += 1
            else:
                tops = []
                for t, _, b in e.top:
                    f = self._frags(t, b)
                    tops.append(f"{f[0]}{fl[j]}{f[1]}}}")
                    j += 1
            out.append(f'{head}{x}{tail},"top_logprobs":[{",".join(tops)}]}}')
        return out
