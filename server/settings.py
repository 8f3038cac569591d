"""One settings definition feeding YAML files, environment variables and CLI flags.

Every knob is one pydantic field with its default, bounds and description.  The CLI
flags (``--model-path`` ...) and ``--help`` are generated from those same fields, so
flags, env (``QWEN_VL_<FIELD>``) and YAML keys can never disagree.

Precedence: defaults < YAML (``--config FILE`` or ``QWEN_VL_CONFIG``) < env < CLI.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.keys import build_keys

ENV_PREFIX = "QWEN_VL_"
HUB_ID = "Qwen/Qwen3-VL-2B-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      validate_default=True)

    # --- model -------------------------------------------------------------------
    model_path: str = Field(HUB_ID, description="Local folder or hub id of the model.")
    served_model_name: str = Field("qwen3-vl", description="Name listed by /v1/models.")
    model_aliases: list[str] = Field(default_factory=list, description=(
        "Extra names accepted as `model` (the served name and the model's hub id always are)."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device_map: str = Field("auto", description="auto, cuda:0, cpu, ... (no CUDA → cpu).")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="Attention kernel.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="bitsandbytes quantization (4bit = nf4). Needs CUDA for speed.")
    max_model_len: int = Field(32768, ge=256, description=(
        "Context length served (prompt + completion); capped by the model's own."))

    # --- server ------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="API port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    api_keys: list[str] = Field(default_factory=list, description=(
        "Accepted API keys (Bearer). Empty = no auth. Also QWEN_VL_API_KEYS or --api-key-file."))
    api_key_file: str | None = Field(None, description=(
        "File with one API key per line, or a .yaml/.yml file of named keys with limits; "
        "reloaded on SIGHUP and when it changes."))
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins; empty = CORS off.")
    shutdown_timeout: float = Field(30.0, ge=0, description=(
        "Seconds running requests may take to finish after SIGTERM."))

    # --- generation defaults (used when a request leaves a field out) ---------------
    max_new_tokens: int = Field(1024, ge=1, description="Default max_tokens for a request.")
    temperature: float = Field(0.7, ge=0, le=2, description="Default temperature (0 = greedy).")
    top_p: float = Field(0.8, gt=0, le=1, description="Default top_p.")
    top_k: int = Field(20, ge=0, description="Default top_k (0 = off).")
    seed: int = Field(0, description="Seed of the engine's generator for unseeded requests.")

    # --- scheduler -------------------------------------------------------------------
    scheduler: Literal["batching", "sequential"] = Field("batching", description=(
        "batching = continuous batching; sequential = one generate() at a time (baseline)."))
    max_num_seqs: int = Field(64, ge=1, description="Sequences decoded together at most.")
    max_batch_tokens: int = Field(8192, ge=64, description="Prefill token budget per step.")
    max_queue: int = Field(256, ge=1, description="Requests waiting at most; beyond → 429.")

    # --- request limits ----------------------------------------------------------------
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask.")
    max_n: int = Field(8, ge=1, description="Largest n.")
    max_messages: int = Field(256, ge=1, description="Messages per request at most.")
    max_text_chars: int = Field(200_000, ge=1, description="Characters of text per request at most.")
    max_images_per_request: int = Field(16, ge=0, description="Images per request at most.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Request body cap (413).")
    max_json_elements: int = Field(500_000, ge=1000, description=(
        "JSON values per request body at most, counted cheaply as commas and brackets "
        "before parsing (413)."))
    max_tools: int = Field(128, ge=0, description="Tools per request at most.")
    max_grammar_repeat: int = Field(1000, ge=1, description=(
        "Largest repetition bound in a schema (pattern {m,n}, maxLength, maxItems ...); "
        "grammar compile time grows with it."))
    grammar_timeout: float = Field(10.0, gt=0, description=(
        "Seconds one grammar (response_format / forced tools) may take to compile; its "
        "worker process is killed after that (400)."))
    decode_timeout: float = Field(10.0, gt=0, description=(
        "Seconds one image may take to decode, counted from when a decode worker takes "
        "it (400)."))

    # --- images ----------------------------------------------------------------------
    min_pixels: int = Field(64 * 32 * 32, ge=32 * 32, description="Default per-image pixel floor.")
    max_pixels: int = Field(1280 * 32 * 32, ge=32 * 32, description=(
        "Default per-image pixel budget (one token per 32x32 pixels)."))
    image_preprocess: Literal["torch", "pil"] = Field("torch", description=(
        "Image preprocessing: torch = one tensor pipeline on the model's device (GPU when "
        "there is one); pil = the HF PIL processor on the CPU (the reference)."))
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Image size cap (413).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decoded pixel cap (bomb guard).")
    max_request_image_pixels: int = Field(200_000_000, ge=1, description=(
        "Decoded pixels of all images of one request together (memory guard)."))
    fetch_timeout: float = Field(15.0, gt=0, description="Total seconds to fetch one image URL.")
    allowed_media_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts/CIDRs that image URLs may reach although private or loopback."))
    allowed_local_media_path: str | None = Field(None, description=(
        "Directory file:// image URLs may read from; unset = file:// refused."))

    # --- replicas (issue 15; only these flags make the launcher import Ray) ---------------
    replicas: int = Field(1, ge=1, description=(
        "Engine replicas behind the one endpoint, through Ray Serve (one GPU each on a GPU "
        "box). 1 without --ray-address = a plain single process, no Ray."))
    ray_address: str | None = Field(None, description=(
        "Join this Ray cluster (auto or HOST:PORT) instead of starting a local one."))
    routing: Literal["least_loaded", "affinity"] = Field("least_loaded", description=(
        "How requests pick a replica: least_loaded, or affinity (same system prompt and "
        "first image -> same replica, for its prefix cache, unless it is much busier)."))
    # --- fair sharing: deadlines and slow clients (per-key limits live in the key file) --
    max_queue_wait: float | None = Field(None, gt=0, description=(
        "Seconds a request may wait in the queue before starting; beyond → 503 with "
        "Retry-After. Unset = no deadline."))
    body_timeout: float = Field(60.0, gt=0, description=(
        "Seconds a request body may take to arrive; beyond → 408 and the connection closed."))
    header_timeout: float = Field(15.0, gt=0, description=(
        "Seconds a client may take to send a request's headers; beyond → 408, closed."))
    max_connections_per_client: int = Field(256, ge=0, description=(
        "Open connections per client address at most; beyond → 429, closed. 0 = no cap."))

    @field_validator("model_aliases", "api_keys", "cors_origins", "allowed_media_hosts",
                     mode="before")
    @classmethod
    def _split_commas(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return [s.strip() for i in items for s in i.split(",") if s.strip()]
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, _ListFriendlyEnv(settings_cls), _YamlSource(settings_cls))

    def all_api_keys(self) -> list[str]:
        """The keys known in clear (a YAML key file may hold only digests)."""
        return [k.plaintext for k in build_keys(self.api_keys, self.api_key_file)
                if k.plaintext]

    @classmethod
    def load(cls, argv: list[str] | None = None, **overrides: Any) -> "Settings":
        """Parse CLI flags (and ``--config``) and merge with YAML and env."""
        parser = build_parser()
        ns = vars(parser.parse_args(argv))
        config = ns.pop("config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
        token = _YAML_FILE.set(config)
        try:
            return cls(**{**ns, **overrides})
        finally:
            _YAML_FILE.reset(token)


# --- sources ----------------------------------------------------------------------

_YAML_FILE: contextvars.ContextVar[str | None] = contextvars.ContextVar("yaml_file", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _YAML_FILE.get()
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        return {k.replace("-", "_"): v for k, v in data.items()}


class _ListFriendlyEnv(PydanticBaseSettingsSource):
    """Env vars ``QWEN_VL_<FIELD>``; lists are comma-separated (not JSON)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out = {}
        for name in self.settings_cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                out[name] = raw
        return out


# --- CLI ----------------------------------------------------------------------------

def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible server for Qwen3-VL. Precedence: YAML < env "
                    f"({ENV_PREFIX}<NAME>) < flags.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with any of the settings below.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [default: {field.get_default(call_default_factory=True)!r}]"
        if _is_list(field.annotation):
            parser.add_argument(flag, dest=name, action="append", metavar="VALUE",
                                help=help_text + " (repeat or comma-separate)")
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    # the one alias the launch docs use
    parser.add_argument("--api-key", dest="api_keys", action="append", help=argparse.SUPPRESS)
    return parser
