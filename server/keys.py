"""API keys: who is calling, and with which limits.

A ``KeyStore`` holds the accepted keys, each with a name and optional limits.  Keys come
from ``--api-key`` (inline) and ``--api-key-file``, which is either one key per line or,
when its name ends in ``.yaml``/``.yml``, a list of named keys::

    keys:
      - name: support-bot
        key: sk-support-1234          # or  sha256: <hex digest of the key>
        requests_per_minute: 600      # optional; absent = unlimited
        tokens_per_minute: 200000     # optional; prompt + completion
        max_concurrent: 16            # optional; sequences running or queued at once (n counts)
        cache_group: shop-a           # optional; keys of one group share cached prompts,
                                      # photos and grammars (default: the key alone)
        operator: true                # optional; may read /metrics (per-key series)

Contract:
* Only SHA-256 digests are kept; ``authenticate`` compares the digest of the presented
  key with every stored digest in constant time (no early exit), so neither the match
  position nor a prefix leaks through timing.
* A key is known everywhere by its name (logs, metrics, the engine's fair queue), never
  by its value.  Keys without a name (plain lines, ``--api-key``) are named
  ``key-<first 8 hex of their digest>``: stable across restarts, useless to an attacker.
* Keys are tenants: ``ApiKey.cache_salt`` keeps each key's cached prompts, photos and
  grammars apart from every other key's (the engine mixes it into every cache key), except
  among keys of one ``cache_group``; a server without keys has one tenant (salt "").
  Only ``operator`` keys may read ``/metrics``, where every key's name and counts are.
* ``reload()`` re-reads the file; a file that no longer parses keeps the previous keys
  (and logs why), so a half-saved edit never locks every client out.  ``watch()`` reloads
  when the file's mtime, size or inode changes; the app also reloads on SIGHUP.
  Requests in flight keep the ``ApiKey`` they were admitted with.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("qwen_vl.keys")

POLL_S = 1.0            # how often watch() looks at the key file
ANONYMOUS = "anonymous"  # the key name of requests to a server without keys
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes                     # sha256 of the key; the key itself is not kept
    limits: KeyLimits = KeyLimits()
    plaintext: str | None = None      # only for keys given in clear (the UI launcher reads it)
    cache_group: str | None = None    # keys of one group share their cache entries
    operator: bool = False            # may read /metrics

    @property
    def cache_salt(self) -> str:
        """What the engine mixes into this key's cache keys: its group's, else its own."""
        if not self.digest:  # the anonymous tenant of a server without keys
            return ""
        return f"group:{self.cache_group}" if self.cache_group else f"key:{self.name}"


UNLIMITED_ANONYMOUS = ApiKey(ANONYMOUS, b"")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _unnamed(key: str) -> ApiKey:
    d = digest(key)
    return ApiKey("key-" + d.hex()[:8], d, plaintext=key)


class _Entry(BaseModel):
    """One key of a YAML key file (unknown fields are refused: a typo'd limit must not
    silently mean 'unlimited')."""
    model_config = ConfigDict(extra="forbid")
    name: str
    key: str | None = None
    sha256: str | None = None
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    cache_group: str | None = None
    operator: bool = False

    @model_validator(mode="after")
    def _one_secret(self):
        if not _NAME.match(self.name):
            raise ValueError("name must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if self.cache_group is not None and not _NAME.match(self.cache_group):
            raise ValueError("cache_group must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        if self.key is not None and not self.key.strip():
            raise ValueError("key is empty")
        if self.sha256 is not None and not _HEX.match(self.sha256):
            raise ValueError("sha256 must be 64 hex digits")
        return self

    def to_key(self) -> ApiKey:
        d = digest(self.key.strip()) if self.key is not None else bytes.fromhex(self.sha256)
        return ApiKey(self.name, d, KeyLimits(self.requests_per_minute, self.tokens_per_minute,
                                              self.max_concurrent),
                      plaintext=self.key.strip() if self.key is not None else None,
                      cache_group=self.cache_group, operator=self.operator)


def parse_key_file(path: str | Path) -> list[ApiKey]:
    """The keys of a plain or YAML key file; ``KeyFileError`` says what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise KeyFileError(f"key file {path}: cannot read it ({e.strerror})") from None
    if path.suffix.lower() not in (".yaml", ".yml"):
        lines = (ln.strip() for ln in text.splitlines())
        return [_unnamed(ln) for ln in lines if ln and not ln.startswith("#")]
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise KeyFileError(f"key file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or set(data) - {"keys"} or not isinstance(
            data.get("keys", []), list):
        raise KeyFileError(f"key file {path}: expected a mapping with one list 'keys:'")
    keys = []
    for i, item in enumerate(data.get("keys") or []):
        try:
            keys.append(_Entry.model_validate(item).to_key())
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}"
                            for x in e.errors())
            raise KeyFileError(f"key file {path}: keys[{i}]: {why}") from None
    return keys


def build_keys(inline: list[str], path: str | None) -> list[ApiKey]:
    keys = [_unnamed(k) for k in inline] + (parse_key_file(path) if path else [])
    names, digests = set(), set()
    for k in keys:
        if k.digest in digests:
            raise KeyFileError(f"key '{k.name}' is listed twice")
        if k.name in names:
            raise KeyFileError(f"two keys are named '{k.name}'")
        names.add(k.name)
        digests.add(k.digest)
    return keys


class KeyStore:
    def __init__(self, inline: list[str], path: str | None):
        self.inline, self.path = list(inline), path
        self.keys: list[ApiKey] = build_keys(self.inline, path)  # a bad file fails startup
        self._stamp = self._file_stamp()
        self._log_keys("loaded")

    @property
    def enabled(self) -> bool:
        """Whether requests must carry a key (a key file may be empty on purpose: then
        every request is refused rather than the server silently opening up)."""
        return bool(self.keys) or self.path is not None

    def authenticate(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None.  Every stored digest is compared (constant time
        per comparison, no early exit)."""
        presented = digest(token)
        found = None
        for k in self.keys:
            if hmac.compare_digest(presented, k.digest) and found is None:
                found = k
        return found

    def reload(self) -> bool:
        """Re-read the key file; on error keep the current keys.  True if it changed them."""
        self._stamp = self._file_stamp()
        try:
            keys = build_keys(self.inline, self.path)
        except KeyFileError as e:
            log.error("api keys not reloaded, keeping the previous ones: %s", e)
            return False
        changed = keys != self.keys
        self.keys = keys
        self._log_keys("reloaded" if changed else "reloaded (unchanged)")
        return changed

    async def watch(self, interval: float = POLL_S):
        """Reload whenever the file changes on disk (polling: no extra dependency, and it
        sees editors that replace the file as well as those that rewrite it)."""
        while True:
            await asyncio.sleep(interval)
            if self._file_stamp() != self._stamp:
                self.reload()

    def _file_stamp(self):
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return "missing"
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _log_keys(self, what: str):
        if self.enabled:
            log.info("api keys %s: %d (%s)", what, len(self.keys),
                     ", ".join(k.name for k in self.keys) or "none: every request is refused")
