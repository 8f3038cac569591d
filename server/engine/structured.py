"""Structured output: grammar specs, their compilation (xgrammar) and per-row token masks.

Three layers, each on the thread that owns it:

* ``GrammarSpec`` (torch-free, built by the HTTP layer): *what* to enforce — any JSON
  object, a JSON schema, or Qwen tool calls (``<tool_call>\\n{"name": .., "arguments": ..}
  \\n</tool_call>`` for one named function or for any of the tools).  It travels in
  ``SamplingParams.grammar``.  ``check_schema`` refuses schema features the grammar engine
  would silently not enforce, so that "finish_reason stop ⇒ the output validates" holds.
* ``GrammarCache`` (engine): compiles a spec against the served tokenizer — vocabulary
  padded to the model's ``vocab_size``, special tokens and raw control-character tokens
  excluded, end-of-turn ids as the stop tokens — and keeps the results in an LRU bounded
  in entries and in bytes, each entry counted at the larger of xgrammar's own estimate
  and its serialised size (the estimate missed 95 MiB grammars by 45x).  Entries are
  keyed by the tenant's salt too: one key's compiled schema is never another key's hit.
  ``compile`` (synchronous) returns a ``CompiledSpec``; ``compile_async`` compiles in a
  worker process (``server.workers``) with a time budget, killed when the budget is spent
  (400) or the client leaves, under a memory limit (``RLIMIT_DATA``: a compile that needs
  more fails with a 400), the queue taken in turns by API key.  A bad schema becomes
  ``InvalidRequest`` naming the request field.  ``check_cost`` refuses, before anything
  is queued, repetition bounds past the server's limit (compile time grows with them:
  ``[a-z]{1,20000}`` alone takes tens of seconds).
* ``apply_masks`` / ``GrammarLogitsProcessor`` (engine worker thread): each constrained
  row owns a ``xgrammar.GrammarMatcher`` (``Sequence.matcher``); before sampling, each
  such row fills its line of a shared bitmask and the batch's logits are masked in place,
  rows without a grammar untouched.  The end-of-turn token is allowed exactly when the
  grammar can terminate; ``Sequence.append`` advances the matcher with every sampled token
  and finishes the row with ``stop`` once it has terminated.

This module imports neither torch nor xgrammar at import time (the HTTP layer imports
``GrammarSpec``); both are loaded on first compile / first mask.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from server.workers import ProcessPool, WorkerDied

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


# --- the spec (HTTP side) --------------------------------------------------------------

@dataclass(frozen=True)
class GrammarSpec:
    """What to enforce.  ``kind``: ``json_object`` | ``json_schema`` | ``tool_calls``.

    ``payload`` is canonical JSON text (the schema, or ``[[name, parameters], ...]``), so
    that the spec is hashable and is its own cache key."""
    kind: str
    payload: str = ""
    parallel: bool = True            # tool_calls: one or more calls (else exactly one)
    param: str = "response_format"   # the request field errors name

    @staticmethod
    def json_object() -> "GrammarSpec":
        return GrammarSpec("json_object")

    @staticmethod
    def json_schema(schema: Any) -> "GrammarSpec":
        return GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False))

    @staticmethod
    def tool_calls(tools: list[tuple[str, dict | None]], *, parallel: bool,
                   param: str = "tool_choice") -> "GrammarSpec":
        return GrammarSpec("tool_calls", json.dumps([[n, p] for n, p in tools],
                                                    ensure_ascii=False), parallel, param)

    @property
    def key(self) -> tuple:
        return (self.kind, self.payload, self.parallel)


# --- schema features the grammar would not enforce -----------------------------------

_REFUSED = {
    "allOf": "allOf", "oneOf": "oneOf", "not": "not", "if": "if/then/else",
    "then": "if/then/else", "else": "if/then/else", "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas", "dependencies": "dependencies",
    "contains": "contains", "minContains": "minContains", "maxContains": "maxContains",
    "$dynamicRef": "$dynamicRef", "$recursiveRef": "$recursiveRef",
    "unevaluatedItems": "unevaluatedItems",
}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties",
               "additionalItems")
_SCHEMA_LIST = ("anyOf", "prefixItems")
# regex constructs the grammar engine misreads silently (lookahead, \A, \Z, ...); the
# ones it rejects (lookbehind, backreferences, \b) fail at compile time with a 400 anyway
_BAD_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[AZzG]")
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


# size limits: compile time grows fast past these (1000 optional properties: seconds), and
# compilation runs on the one preparation thread
MAX_SCHEMA_CHARS = 128 * 1024
MAX_DEPTH = 32
MAX_PROPERTIES = 512          # in one object
MAX_ENUM = 2000


def check_schema(schema: Any, *, where: str = "schema") -> None:
    """Raise ``ValueError`` naming the unsupported features found in ``schema``."""
    found: list[str] = []
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema exceeds {MAX_SCHEMA_CHARS} characters")
    _walk(schema, where, found)
    if found:
        uniq = list(dict.fromkeys(found))
        raise ValueError("unsupported JSON schema feature(s): " + ", ".join(uniq[:8]))


def _walk(s: Any, path: str, found: list[str], depth: int = 0) -> None:
    if isinstance(s, bool):
        return
    if not isinstance(s, dict):
        found.append(f"non-object schema at {path}")
        return
    if depth > MAX_DEPTH:
        found.append(f"nesting deeper than {MAX_DEPTH} (at {path})")
        return
    if isinstance(s.get("properties"), dict) and len(s["properties"]) > MAX_PROPERTIES:
        found.append(f"more than {MAX_PROPERTIES} properties (at {path})")
    req, props = s.get("required"), s.get("properties")
    # an object schema (a bare {"required": [...]} inside anyOf is left to its parent)
    if isinstance(req, list) and req and (isinstance(props, dict) or s.get("type") == "object"):
        # the grammar only writes declared properties: an undeclared required name would
        # give "stop" outputs that fail their own schema
        missing = [str(r) for r in req if not (isinstance(props, dict) and r in props)]
        if missing:
            names = ", ".join(json.dumps(m)[:40] for m in missing[:5])
            found.append(f"required names not in properties: {names} (at {path})")
    if isinstance(s.get("enum"), list) and len(s["enum"]) > MAX_ENUM:
        found.append(f"enum of more than {MAX_ENUM} values (at {path})")
    for k, label in _REFUSED.items():
        if k in s:
            found.append(f"{label} (at {path})")
    if s.get("uniqueItems") is True:
        found.append(f"uniqueItems (at {path})")
    ref = s.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append(f"remote $ref (at {path})")
    if "multipleOf" in s and not (s.get("type") == "integer"
                                  and isinstance(s["multipleOf"], int)):
        found.append(f"multipleOf on non-integers (at {path})")
    mp = s.get("minProperties")
    if isinstance(mp, int) and mp > len(s.get("required") or []) and (
            s.get("additionalProperties", False) is not False or "patternProperties" in s
            or s.get("unevaluatedProperties", False) is not False):
        # open objects may repeat a key, which a parser then counts once
        found.append(f"minProperties on objects with undeclared keys (at {path})")
    if isinstance(s.get("pattern"), str) and _BAD_REGEX.search(s["pattern"]):
        found.append(f"pattern with lookahead or \\A/\\Z anchors (at {path})")
    for k in _SCHEMA_MAPS:
        sub = s.get(k)
        if isinstance(sub, dict):
            for name, v in sub.items():
                if k == "patternProperties" and _BAD_REGEX.search(name):
                    found.append(f"patternProperties regex with lookahead (at {path})")
                _walk(v, f"{path}.{k}.{name}", found, depth + 1)
    for k in _SCHEMA_ONE:
        if isinstance(s.get(k), dict):
            _walk(s[k], f"{path}.{k}", found, depth + 1)
    for k in _SCHEMA_LIST:
        if isinstance(s.get(k), list):
            for i, v in enumerate(s[k]):
                _walk(v, f"{path}.{k}[{i}]", found, depth + 1)


_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_REPEAT_KEYS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties",
                "minProperties")


def check_cost(spec: GrammarSpec, max_repeat: int) -> None:
    """Refuse a spec whose regex quantifiers ({m,n}) or length/item bounds exceed
    ``max_repeat`` (cheap: one walk over the schema, before any compile).  Raises
    ``InvalidRequest`` naming the limit."""
    if spec.kind == "json_object":
        return
    stack = [json.loads(spec.payload)]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
            continue
        if not isinstance(o, dict):
            continue
        regexes = [o["pattern"]] if isinstance(o.get("pattern"), str) else []
        if isinstance(o.get("patternProperties"), dict):
            regexes += list(o["patternProperties"])
        bounds = [int(n) for r in regexes for m in _QUANTIFIER.finditer(r)
                  for n in m.groups() if n]
        bounds += [o[k] for k in _REPEAT_KEYS if isinstance(o.get(k), int)
                   and not isinstance(o.get(k), bool)]
        if bounds and max(bounds) > max_repeat:
            raise InvalidRequest(f"The schema repeats up to {max(bounds)} times; this server "
                                 f"allows at most {max_repeat} (--max-grammar-repeat).",
                                 param=spec.param)
        stack.extend(o.values())


def tool_parameters(params: dict | None) -> dict:
    return params if params else {"type": "object", "properties": {}}


# --- compilation (engine preparation thread) ------------------------------------------

class CompiledSpec:
    """A compiled grammar; ``matcher()`` gives a fresh per-row matcher."""

    def __init__(self, spec: GrammarSpec, compiled):
        self.spec, self.compiled = spec, compiled

    def matcher(self):
        import xgrammar as xgr
        return xgr.GrammarMatcher(self.compiled)

    def __repr__(self) -> str:
        return f"CompiledSpec({self.spec.kind})"


def _clean_error(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and source location."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    msg = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", msg)
    return msg[:300]


class GrammarCache:
    """Compiles ``GrammarSpec``s for one tokenizer; thread-safe LRU of the results, bounded
    in entries and in bytes (a tool grammar can hold tens of MB)."""

    def __init__(self, hf_tokenizer, *, vocab_size: int, stop_ids, capacity: int = 128,
                 max_bytes: int = 256 * 1024 * 1024):
        self._tokenizer, self.vocab_size = hf_tokenizer, int(vocab_size)
        self.stop_ids = sorted(int(i) for i in stop_ids)
        self.capacity, self.max_bytes = capacity, max_bytes
        self._cache: OrderedDict[tuple, CompiledSpec] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self.bytes = 0
        self._lock = threading.Lock()
        self._compiler = None
        self._info = None
        self._pool = None
        self.hits = self.misses = 0

    def start_workers(self, size: int, memory_mb: int | None = None) -> None:
        """Compile in ``size`` worker processes from now on (``compile_async``), each
        allowed ``memory_mb`` MiB of data beyond what it holds after starting.  Builds the
        tokenizer description here (the caller's thread: seconds for a large vocab)."""
        try:
            import xgrammar as xgr
        except ImportError:
            return  # compile_async then answers the "needs xgrammar" 400
        parts = self._tokenizer_parts(xgr)
        self._info = _tokenizer_info_from(xgr, parts)
        self._pool = ProcessPool("grammar", size, init=_init_worker,
                                 initargs=(parts, memory_mb))
        self._pool.start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _lookup(self, key: tuple) -> "CompiledSpec | None":
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return hit

    def _store(self, key: tuple, compiled: "CompiledSpec", serialized: int) -> None:
        size = max(_grammar_bytes(compiled.compiled), serialized)
        with self._lock:
            self.misses += 1
            if size > self.max_bytes:
                return  # used once, never cached
            if key in self._cache:
                self.bytes -= self._sizes.pop(key)
            self._cache[key], self._sizes[key] = compiled, size
            self.bytes += size
            while len(self._cache) > self.capacity or self.bytes > self.max_bytes:
                old, _ = self._cache.popitem(last=False)
                self.bytes -= self._sizes.pop(old)

    async def compile_async(self, spec: GrammarSpec, *, timeout: float, salt: str = "",
                            turn: str = "") -> "CompiledSpec":
        """``compile`` in a worker process, within ``timeout`` seconds of compiling (400
        past it); cancelling the awaiting task kills the compile.  ``salt``: the tenant
        (cache key); ``turn``: the API key whose turn in the compile queue it takes."""
        key = (salt, spec.key)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        if self._pool is None:
            self._get_compiler()  # raises the "needs xgrammar" 400 when it is missing
            raise RuntimeError("GrammarCache.start_workers was not called")
        try:
            text = await self._pool.run(_compile_job, spec, timeout=timeout, turn=turn)
        except WorkerDied:  # e.g. killed for memory by a huge grammar
            raise InvalidRequest("The grammar could not be compiled (its compile worker "
                                 "ended); simplify the schema or tools.",
                                 param=spec.param) from None
        except TimeoutError:
            raise InvalidRequest(f"The grammar took longer than {timeout:g} s to compile "
                                 "(--grammar-timeout); simplify the schema or tools.",
                                 param=spec.param) from None
        import xgrammar as xgr
        # deserializing a large grammar takes a while: off the event loop; its transient
        # peak (~10x the text) goes back to the OS at once, or the heap keeps it
        grammar = await asyncio.to_thread(xgr.CompiledGrammar.deserialize_json, text,
                                          self._info)
        compiled = CompiledSpec(spec, grammar)
        self._store(key, compiled, len(text))
        del text
        await asyncio.to_thread(_trim_heap)
        return compiled

    def _get_compiler(self):
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError as e:  # optional dependency: pip install '.[structured]'
                raise InvalidRequest("Structured output needs the xgrammar package, which "
                                     "this server does not have.", param="response_format") from e
            self._compiler = xgr.GrammarCompiler(self._tokenizer_info(xgr), cache_enabled=False)
        return self._compiler

    def _tokenizer_info(self, xgr):
        return _tokenizer_info_from(xgr, self._tokenizer_parts(xgr))

    def _tokenizer_parts(self, xgr) -> dict:
        """What ``xgr.TokenizerInfo`` is built from, as plain (picklable) values."""
        tok = self._tokenizer
        base = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_ids)
        # Tokens the grammar may never produce get an empty string (xgrammar's "special"):
        # * special tokens (their text is dropped when decoding, which would change the JSON);
        # * tokens holding raw control characters other than "\n" (xgrammar's
        #   length-bounded strings would otherwise admit them, and strict JSON parsers don't);
        # * tokens that start a UTF-16 surrogate (ED A0..BF) or end in a bare ED byte:
        #   xgrammar takes an encoded surrogate for one character, the decoder makes three
        #   U+FFFD of it, which breaks maxLength/enum/pattern.  (Hangul U+D000..U+D7FF then
        #   needs a token holding both of its first two bytes.)
        encoded = [""] * self.vocab_size
        for text, i in tok.get_vocab().items():
            if i < self.vocab_size:
                encoded[i] = text
        banned = set(getattr(tok, "all_special_ids", []) or [])
        for i, raw in enumerate(base.decoded_vocab[:self.vocab_size]):
            if any(b < 0x20 and b != 0x0A for b in raw) or _SURROGATE.search(raw) \
                    or raw.endswith(b"\xed"):
                banned.add(i)
        for i in banned:
            if 0 <= i < self.vocab_size and i not in self.stop_ids:
                encoded[i] = ""
        return dict(encoded=encoded, vocab_type=int(base.vocab_type.value),
                    vocab_size=self.vocab_size, stop_token_ids=self.stop_ids,
                    add_prefix_space=base.add_prefix_space)

    def compile(self, spec: GrammarSpec, salt: str = "") -> CompiledSpec:
        key = (salt, spec.key)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        grammar = self._compile(spec)
        compiled = CompiledSpec(spec, grammar)
        self._store(key, compiled, len(grammar.serialize_json()))
        return compiled

    def _compile(self, spec: GrammarSpec):
        return _compile_with(self._get_compiler(), spec)

    @staticmethod
    def _tool_grammar(xgr, tools: list, parallel: bool):
        return _tool_grammar(xgr, tools, parallel)


def _tokenizer_info_from(xgr, parts: dict):
    return xgr.TokenizerInfo(parts["encoded"], vocab_type=xgr.VocabType(parts["vocab_type"]),
                             vocab_size=parts["vocab_size"],
                             stop_token_ids=parts["stop_token_ids"],
                             add_prefix_space=parts["add_prefix_space"])


def _trim_heap() -> None:
    """glibc's malloc_trim: freed heap pages back to the OS (a 237 MB grammar text took
    the process up 2.3 GB while deserialising and kept it until trimmed; 212 MB after)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _grammar_bytes(compiled) -> int:
    try:
        return int(compiled.memory_size_bytes)
    except Exception:  # an older xgrammar: count it as large
        return 16 * 1024 * 1024


# --- the compile worker process (server.workers) ---------------------------------------
# A worker process compiles for one tokenizer all its life: its compiler is process
# state, set once by the pool's initializer.

_WORKER_COMPILER = None


def _init_worker(parts: dict, memory_mb: int | None = None) -> None:
    global _WORKER_COMPILER, _WORKER_MEMORY_MB
    import xgrammar as xgr
    _WORKER_COMPILER = xgr.GrammarCompiler(_tokenizer_info_from(xgr, parts),
                                           cache_enabled=False)
    if memory_mb:
        _limit_data(memory_mb)
        _WORKER_MEMORY_MB = memory_mb


_WORKER_MEMORY_MB = None


def _limit_data(memory_mb: int) -> None:
    """Cap this process's data (heap and private mappings: ``RLIMIT_DATA``) at what it
    holds now plus ``memory_mb``: an allocation past it fails (MemoryError, or a C++
    bad_alloc that xgrammar raises as an error), a job can never take the box's memory."""
    import resource
    held = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                held = int(line.split()[1]) * 1024
    limit = held + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _compile_job(spec: GrammarSpec) -> str:
    try:
        return _compile_with(_WORKER_COMPILER, spec).serialize_json()
    except (MemoryError, RuntimeError, InvalidRequest) as exc:
        # past RLIMIT_DATA: a MemoryError, or xgrammar's std::bad_alloc as a RuntimeError
        # (from the compile, wrapped as InvalidRequest, or from the serialisation)
        if not isinstance(exc, MemoryError) and "bad_alloc" not in str(exc) \
                and not isinstance(exc.__context__, MemoryError):
            raise
        raise InvalidRequest(f"The grammar needs more than the {_WORKER_MEMORY_MB} MiB a "
                             "compile may use (--grammar-memory-mb); simplify the schema or "
                             "tools.", param=spec.param) from None


def _compile_with(compiler, spec: GrammarSpec):
    import xgrammar as xgr
    try:
        if spec.kind == "json_object":
            return compiler.compile_json_schema({"type": "object"}, any_whitespace=False,
                                                strict_mode=False)
        if spec.kind == "json_schema":
            schema = json.loads(spec.payload)
            check_schema(schema)
            return compiler.compile_json_schema(schema if isinstance(schema, dict)
                                                else json.dumps(schema),
                                                any_whitespace=False, strict_mode=True)
        if spec.kind == "tool_calls":
            return compiler.compile_grammar(_tool_grammar(xgr, json.loads(spec.payload),
                                                          spec.parallel),
                                            root_rule_name="toolcall_seq")
    except InvalidRequest:
        raise
    except Exception as exc:  # xgrammar: RuntimeError / ValueError on the schema
        what = "tool parameters" if spec.kind == "tool_calls" else "JSON schema"
        raise InvalidRequest(f"The {what} cannot be enforced: {_clean_error(exc)}",
                             param=spec.param) from None
    raise InvalidRequest(f"Unknown grammar kind {spec.kind!r}.", param=spec.param)


def _tool_grammar(xgr, tools: list, parallel: bool):
    """``<tool_call>\\n{"name": "<name>", "arguments": <parameters>}\\n</tool_call>``,
    for any of ``tools``; one call, or several separated by "\\n" when parallel — the
    text Qwen's chat template renders for assistant tool calls."""
    calls = []
    for name, params in tools:
        params = tool_parameters(params)
        try:
            check_schema(params)
        except ValueError as e:
            raise ValueError(f"function {name!r}: {e}") from None
        head = TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + \
            ', "arguments": '
        calls.append(xgr.Grammar.concat(
            xgr.Grammar.from_ebnf("root ::= " + json.dumps(head, ensure_ascii=False)),
            xgr.Grammar.from_json_schema(params, any_whitespace=False, strict_mode=True),
            xgr.Grammar.from_ebnf("root ::= " + json.dumps("}\n" + TOOL_CALL_CLOSE))))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    seq = 'toolcall_seq ::= root ("\\n" root)*' if parallel else "toolcall_seq ::= root"
    return xgr.Grammar.from_ebnf(str(one) + "\n" + seq + "\n", root_rule_name="toolcall_seq")


# --- masking (engine worker thread) ---------------------------------------------------

class _Bitmasks:
    """One reusable int32 bitmask buffer, grown on demand (worker thread only)."""
    buf = None

    @classmethod
    def get(cls, rows: int, vocab: int):
        import xgrammar as xgr
        words = (vocab + 31) // 32
        if cls.buf is None or cls.buf.shape[0] < rows or cls.buf.shape[1] != words:
            cls.buf = xgr.allocate_token_bitmask(max(rows, 8), vocab)
        return cls.buf


def apply_masks(logits, matchers: list, indices: list[int]) -> None:
    """Mask ``logits`` (B, V) in place: row ``indices[j]`` keeps only the tokens that
    ``matchers[j]`` allows next.  Other rows are untouched."""
    import xgrammar as xgr
    bm = _Bitmasks.get(logits.shape[0], logits.shape[-1])
    for m, i in zip(matchers, indices):
        m.fill_next_token_bitmask(bm, i)
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, bm[:logits.shape[0]], indices=indices)
    else:
        apply_bitmask_torch(logits, bm, indices)


def apply_bitmask_torch(logits, bm, indices: list[int]) -> None:
    """Accelerators: unpack the bits with plain torch ops (no kernel to compile)."""
    import torch
    vocab = logits.shape[-1]
    dev = logits.device

    def upload(x):  # on CUDA through pinned memory: a pageable copy waits for the device
        return (x.pin_memory() if dev.type == "cuda" else x).to(dev, non_blocking=True)
    idx = upload(torch.tensor(indices))
    words = upload(bm[indices])
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(indices), -1)[:, :vocab].bool()
    rows = logits.index_select(0, idx).masked_fill_(~allowed, -float("inf"))
    logits.index_copy_(0, idx, rows)


class GrammarLogitsProcessor:
    """For ``model.generate()`` (the sequential baseline): mask one row's scores with its
    sequence's matcher; the streamer advances the matcher as tokens come out."""

    def __init__(self, seq):
        self.seq = seq

    def __call__(self, input_ids, scores):
        if self.seq.matcher is not None and not self.seq.matcher.is_terminated():
            scores = scores.clone()
            apply_masks(scores, [self.seq.matcher], [0])
        return scores
