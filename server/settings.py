"""One settings definition feeding YAML files, environment variables and CLI flags.

Every knob is one pydantic field with its default, bounds and description.  The CLI
flags (``--model-path`` ...) and ``--help`` are generated from those same fields, so
flags, env (``QWEN_VL_<FIELD>``) and YAML keys can never disagree.

Precedence: defaults < YAML (``--config FILE`` or ``QWEN_VL_CONFIG``) < env < CLI.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, PrivateAttr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.keys import build_keys

ENV_PREFIX = "QWEN_VL_"
HUB_ID = "Qwen/Qwen3-VL-2B-Instruct"


class ConfigError(Exception):
    """A configuration problem the launcher reports as one line (exit status 2)."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(v: Any) -> Any:
    """``8MiB``, ``512 KB``, ``1.5GiB`` or plain bytes -> bytes (KB = 1000, KiB = 1024)."""
    if not isinstance(v, str):
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", v)
    if not m:
        raise ValueError("not a size (e.g. 8MiB, 512KB, 1048576)")
    if m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} (use B, KB, KiB, MB, MiB, GB or GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, k in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


# a byte count that also accepts "8MiB"-style values (flags, env and YAML alike)
Bytes = Annotated[int, BeforeValidator(parse_size)]


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
    device_map: str = Field("cuda:0", description=(
        "One device (cuda:0, cuda:1, cpu) or a split across GPUs (auto, balanced: slower "
        "for a 2B model). No CUDA → cpu."))
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description=(
            "Attention kernel of the vision tower (and of --scheduler sequential); the batching "
            "engine's text attention is its own paged function."))
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="bitsandbytes quantization (4bit = nf4). Needs CUDA for speed.")
    max_model_len: int = Field(32768, ge=256, description=(
        "Context length served (prompt + completion); capped by the model's own."))

    # --- server ------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="API port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    api_keys: list[str] = Field(default_factory=list, description=(
        "Accepted API keys (Bearer); --api-key is the same flag. Empty = no auth. Also "
        "QWEN_VL_API_KEYS (comma-separated or a JSON list) or --api-key-file."))
    api_key_file: str | None = Field(None, description=(
        "File with one API key per line, or a .yaml/.yml file of named keys with limits; "
        "reloaded on SIGHUP and when it changes."))
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins; empty = CORS off.")
    shutdown_timeout: float = Field(30.0, ge=0, description=(
        "Seconds running requests may take to finish after SIGTERM; those still open "
        "near the end are answered 503 (streams: an error event and [DONE])."))
    access_log: bool = Field(True, description="One access log line per request.")
    log_health_checks: bool = Field(False, description=(
        "Also log GET /health in the access log (off: health probes would flood it)."))
    log_format: Literal["text", "json"] = Field("text", description=(
        "Log lines as text, or as one JSON object per line (for log shippers)."))

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
    max_batch_tokens: int = Field(8192, ge=64, description=(
        "Padded tokens of one prefill forward at most (prompts x longest chunk): bounds "
        "its activation memory."))
    max_queue: int = Field(256, ge=1, description="Requests waiting at most; beyond → 429.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description=(
        "Share of the GPU's memory this server may use (weights + KV cache); the KV budget "
        "is what is left of it after loading."))
    kv_cache_tokens: int | None = Field(None, ge=1, description=(
        "KV cache budget in tokens (overrides --gpu-memory-utilization; on CPU the "
        "default is max_num_seqs x max_model_len, at most 1 GiB)."))
    kv_block_size: int = Field(16, ge=1, le=1024, description=(
        "Tokens per KV block: the unit of KV allocation and of prefix-cache reuse."))
    max_num_batched_tokens: int | None = Field(None, ge=16, description=(
        "Tokens one engine step processes at most: one per decoding row plus the prompt "
        "tokens prefilled (a longer prompt is prefilled in chunks between decode steps), "
        "and as many image tokens through the vision encoder. Default by device: 8192 on "
        "a GPU with at least 70 GiB, 2048 on a smaller GPU, 1024 on the CPU (vLLM's "
        "--max-num-batched-tokens)."))
    max_prefill_chunk: int | None = Field(None, ge=16, description=(
        "Deprecated: the old name of --max-num-batched-tokens (used when that is not "
        "given)."))
    prefix_cache: bool = Field(True, description=(
        "Reuse the KV of earlier prompts' common prefixes (--no-prefix-cache: off)."))
    prefix_cache_share: float = Field(0.5, gt=0, le=1, description=(
        "Share of the KV blocks that unused cached prefixes may keep (LRU beyond)."))
    encoder_cache_mb: int = Field(256, ge=0, description=(
        "Vision-encoder outputs kept for resent images, in MiB (0: off)."))
    enforce_eager: bool = Field(False, description=(
        "Run the decode step eagerly, without CUDA graphs."))
    kernels: Literal["auto", "torch", "triton"] = Field("auto", description=(
        "The decode step's fused ops and paged attention: Triton kernels (GPU; the "
        "attention reads the KV blocks where they are) or their torch reference (the "
        "CPU's path; the attention gathers the blocks). auto: Triton on CUDA when it "
        "compiles and matches the reference at startup, else torch, with a log line saying "
        "why."))
    cpu_threads: int | None = Field(None, ge=1, description=(
        "torch's intra-op threads when the model runs on the CPU. Default: OMP_NUM_THREADS "
        "when set, else the process's cores minus one (at least 1): one core is left to the "
        "event loop, the output thread and request preparation (vLLM's CPU tuning guide "
        "reserves one the same way). No effect on a GPU."))
    compile: bool = Field(False, description=(
        "torch.compile the decode step (fuses its small kernels; checked against the eager "
        "step at startup, which it falls back to). Startup takes longer; not yet measured "
        "on a GPU."))

    # --- request limits ----------------------------------------------------------------
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask.")
    max_n: int = Field(8, ge=1, description="Largest n.")
    max_messages: int = Field(256, ge=1, description="Messages per request at most.")
    max_text_chars: int = Field(200_000, ge=1, description="Characters of text per request at most.")
    max_images_per_request: int = Field(16, ge=0, description="Images per request at most.")
    max_content_parts: int = Field(1024, ge=1, description=(
        "Content parts (text and image parts) over all messages of a request at most, "
        "counted before validation (400)."))
    max_body_bytes: Bytes = Field(64 * 1024 * 1024, ge=1024, description="Request body cap (413).")
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
    grammar_memory_mb: int = Field(1024, ge=256, description=(
        "MiB of memory one grammar compile may use in its worker process (RLIMIT_DATA); "
        "a compile that needs more gets a 400."))
    grammar_cache_mb: int = Field(256, ge=0, description=(
        "MiB of compiled grammars kept for reuse, each counted at its serialised size "
        "(0: none kept)."))
    decode_timeout: float = Field(10.0, gt=0, description=(
        "Seconds one image may take to decode, counted from when a decode worker takes "
        "it (400)."))

    # --- images ----------------------------------------------------------------------
    min_pixels: int = Field(64 * 32 * 32, ge=32 * 32, description="Default per-image pixel floor.")
    max_pixels: int = Field(1280 * 32 * 32, ge=32 * 32, description=(
        "Default per-image pixel budget (one token per 32x32 pixels)."))
    image_preprocess: Literal["torch", "pil"] = Field("torch", description=(
        "Image preprocessing: torch = one tensor pipeline, resized and patchified to uint8 "
        "on the host, normalised on the model's device as the encoder takes them; pil = "
        "the HF PIL processor on the CPU (the reference)."))
    image_cache_mb: int = Field(512, ge=0, description=(
        "MiB of host memory for preprocessed image pixels, keyed by the image's bytes and "
        "pixel budget: a resent photo is not preprocessed again (LRU). 0 = off."))
    prep_workers: int = Field(2, ge=1, le=64, description=(
        "Threads preparing requests (chat template, tokens, image preprocessing) in "
        "parallel, off the event loop and the model's thread."))
    max_image_bytes: Bytes = Field(10 * 1024 * 1024, ge=1, description="Image size cap (413).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decoded pixel cap (bomb guard).")
    max_request_image_pixels: int = Field(200_000_000, ge=1, description=(
        "Decoded pixels of all images of one request together (memory guard)."))
    fetch_timeout: float = Field(15.0, gt=0, description="Total seconds to fetch one image URL.")
    allowed_media_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts/CIDRs that image URLs may reach although private or loopback."))
    allowed_local_media_path: str | None = Field(None, description=(
        "Directory file:// image URLs may read from; unset = file:// refused."))

    # --- videos (video_url parts: a clip, or a list of frames) -----------------------------
    max_videos_per_request: int = Field(2, ge=0, description=(
        "Videos per request at most (0: video parts refused)."))
    video_fps: float = Field(2.0, gt=0, le=60, description=(
        "Frames sampled per second of a clip (Qwen3-VL's default), and the rate a frame "
        "list is taken to be at unless its part says its own fps."))
    video_min_frames: int = Field(4, ge=2, description="Frames sampled from a clip at least.")
    video_max_frames: int = Field(64, ge=2, description=(
        "Frames sampled from a clip (or given as a frame list) at most; a request's "
        "max_frames may lower it."))
    video_min_pixels: int = Field(4096, ge=32 * 32, description=(
        "Pixel floor of a whole video, all its sampled frames together (Qwen's shortest_edge)."))
    video_max_pixels: int = Field(25_165_824, ge=32 * 32, description=(
        "Pixel budget of a whole video, all its sampled frames together (Qwen's "
        "longest_edge: at most this / 2048 tokens), each frame also capped at 768 tokens."))
    max_video_bytes: Bytes = Field(64 * 1024 * 1024, ge=1, description="Video size cap (413).")
    max_video_seconds: float = Field(600.0, gt=0, description="Longest clip accepted, in seconds.")
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1, description=(
        "Largest frame of a clip (width x height), checked from its header."))
    max_video_decoded_pixels: int = Field(140_000_000, ge=1, description=(
        "Decoded pixels of one video's sampled frames together (memory guard, checked "
        "before decoding; 64 full-HD frames, ~400 MiB of RGB)."))
    video_decode_timeout: float = Field(30.0, gt=0, description=(
        "Seconds one video may take to decode, counted from when a decode worker takes it "
        "(400)."))

    # --- processes (issue 31) ---------------------------------------------------------------
    api_server_count: int | None = Field(None, ge=1, le=64, description=(
        "API-server processes (HTTP, auth, limits, media decoding, the chat template and "
        "tokens, SSE) in front of the one engine-core process, sharing the port. Unset = 1 "
        "(measured best on a 2-core box; more where cores are free)."))
    engine_restarts: int = Field(5, ge=0, description=(
        "Times the engine-core process is restarted after it dies (killed, out of memory) "
        "before the server gives up and exits 4 for its supervisor. 0 = exit at once."))

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

    # the --config file these settings came from (reported in the startup log)
    _config_file: str | None = PrivateAttr(None)

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
        """Parse CLI flags (and ``--config``) and merge with YAML and env.

        Raises ``ConfigError`` for an unreadable or malformed config file or env value,
        pydantic's ``ValidationError`` for a bad value; ``server.config_errors`` turns
        both into one line per problem."""
        parser = build_parser()
        ns = vars(parser.parse_args(argv))
        config = ns.pop("config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
        token = _YAML_FILE.set(config)
        try:
            s = cls(**{**ns, **overrides})
        finally:
            _YAML_FILE.reset(token)
        s._config_file = config
        return s


# --- sources ----------------------------------------------------------------------

_YAML_FILE: contextvars.ContextVar[str | None] = contextvars.ContextVar("yaml_file", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _YAML_FILE.get()
        if not path:
            return {}
        return {k: v for k, (v, _line) in read_yaml_config(path).items()}


def read_yaml_config(path: str) -> dict[str, tuple[Any, int]]:
    """The settings in a YAML file: ``{field: (value, line)}``; ``ConfigError`` names the
    file (and the line) when it cannot be read or parsed."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping of settings (key: value)")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    return {str(k).replace("-", "_"): (v, lines.get(str(k), 0)) for k, v in data.items()}


class _ListFriendlyEnv(PydanticBaseSettingsSource):
    """Env vars ``QWEN_VL_<FIELD>``; lists are comma-separated or a JSON list."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            env = ENV_PREFIX + name.upper()
            raw = os.environ.get(env)
            if raw is None:
                continue
            out[name] = raw
            if _is_list(field.annotation) and raw.lstrip().startswith("["):
                try:
                    items = json.loads(raw)
                except ValueError:
                    raise ConfigError(f"{env}: starts with '[' but is not a JSON list "
                                      "(use a JSON list or comma-separated values)") from None
                if not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
                    raise ConfigError(f"{env}: a JSON list must hold strings")
                out[name] = tuple(items)  # a tuple: _split_commas leaves its items whole
        return out


# --- CLI ----------------------------------------------------------------------------

def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_kwargs(name: str, field) -> dict[str, Any]:
    """argparse options for one field: choices, a metavar saying the unit, the default."""
    ann, desc = field.annotation, field.description or ""
    default = field.get_default(call_default_factory=True)
    kw: dict[str, Any] = {"dest": name}
    if typing.get_origin(ann) is Literal:
        kw["choices"] = list(typing.get_args(ann))
    elif ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif _is_list(ann):
        kw.update(action="append", metavar="VALUE")
        desc += " (repeat or comma-separate)"
    elif BeforeValidator(parse_size) in field.metadata:
        kw["metavar"] = "SIZE"
        desc += " Bytes; accepts 8MiB, 512KB, ..."
        default = format_size(default)
    elif ann in (int, float):
        kw["type"] = ann
        kw["metavar"] = ("SECONDS" if "seconds" in desc.lower() else
                         "PIXELS" if name.endswith("pixels") else ann.__name__.upper())
    else:
        kw["metavar"] = "PATH" if name.endswith(("_path", "_file")) else "TEXT"
    kw["help"] = f"{desc} [default: {default}]".replace("%", "%%")
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m server",
        description="OpenAI-compatible server for Qwen3-VL. Precedence: YAML < env "
                    f"({ENV_PREFIX}<NAME>) < flags.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", metavar="PATH",
                        help=f"YAML file with any of the settings below (env {ENV_PREFIX}CONFIG).")
    for name, field in Settings.model_fields.items():
        flags = ["--" + name.replace("_", "-")]
        if name == "api_keys":  # the singular is what the docs and most users type
            flags.append("--api-key")
        parser.add_argument(*flags, **_flag_kwargs(name, field))
    return parser
