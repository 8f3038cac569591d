"""What the operator must know at startup, as log lines: which config file was loaded,
whether API keys are required, and a warning when the API is open to the network; and
``engine_factory``, the one place a launcher (``server.__main__``, a Ray replica in
``server.cluster``) loads the model and starts the engine."""

from __future__ import annotations

import ipaddress
import logging
import os

log = logging.getLogger("qwen_vl.startup")


def engine_factory(settings, **engine_kw):
    """Load the model and start the engine: the only place a launcher touches torch.
    ``engine_kw`` go to ``AsyncEngine`` (the engine-core process's ``output``)."""
    def build():
        from server.load_errors import check_model_path
        check_model_path(settings.model_path, timeout=settings.fetch_timeout)
        if settings.log_format == "json":
            from server.logs import json_library_logs
            json_library_logs()
        from models.loader import load_model
        from server.engine.core import AsyncEngine
        oom_at = os.environ.get("QWEN_VL_FAULT_OOM_AT")
        return AsyncEngine(load_model(settings), settings,
                           fault_oom_at=int(oom_at) if oom_at else None,
                           fault=os.environ.get("QWEN_VL_FAULT"), **engine_kw)
    return build


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def report(settings, keys: list[str]) -> None:
    config = settings._config_file
    log.info("config: %s", f"loaded {config}" if config else "no config file (defaults, env, flags)")
    if keys:
        log.info("auth: on (%d API key%s; /v1 and /metrics need one)", len(keys),
                 "" if len(keys) == 1 else "s")
    elif settings.api_key_file:  # as the KeyStore: an empty key file refuses every request
        log.warning("auth: on, but the key file %s holds no key: every request is refused "
                    "until one is added (the file is reloaded on change)",
                    settings.api_key_file)
    else:
        log.info("auth: off (no --api-key, --api-key-file or QWEN_VL_API_KEYS)")
        if not is_loopback(settings.host):
            log.warning("the API listens on %s with no API key: anyone who can reach this "
                        "box can use the model; set --api-key-file or --host 127.0.0.1",
                        settings.host)
