"""Settings problems as one plain line each, for people reading a terminal or a journal.

``load_or_exit(argv)`` returns the ``Settings`` or prints every problem on its own line
(``python -m server: error: <where>: <what>``) and exits with status 2, without a
traceback.  ``<where>`` names what the operator wrote: the flag (``--port``), the
environment variable (``QWEN_VL_PORT``) or the config file and line
(``configs/x.yaml line 3: port``), in the precedence the settings use (flag > env > file).
"""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from server.keys import KeyFileError, build_keys
from server.settings import (ENV_PREFIX, ConfigError, Settings, build_parser,
                             read_yaml_config)

PROG = "python -m server"


def _where(name: str, argv: list[str]) -> str:
    """Which source gave the field ``name`` its (bad) value."""
    flag = "--" + name.replace("_", "-")
    ns = vars(build_parser().parse_args(argv))
    if name in ns:
        return "--api-key" if name == "api_keys" and "--api-keys" not in argv else flag
    if ENV_PREFIX + name.upper() in os.environ:
        return ENV_PREFIX + name.upper()
    config = ns.get("config") or os.environ.get(ENV_PREFIX + "CONFIG")
    if config:
        try:
            line = read_yaml_config(config).get(name, (None, 0))[1]
        except ConfigError:
            line = 0
        return f"config file {config}" + (f" line {line}" if line else "") + f": {name}"
    return flag


def problems(exc: ValidationError, argv: list[str]) -> list[str]:
    out = []
    for e in exc.errors():
        loc = e.get("loc") or ("?",)
        name = str(loc[0])
        if name not in Settings.model_fields:  # extra="forbid": an unknown key in the file
            config = vars(build_parser().parse_args(argv)).get("config") or \
                os.environ.get(ENV_PREFIX + "CONFIG")
            out.append(f"config file {config}: unknown setting {name!r} (see --help)")
            continue
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")
        given = e.get("input")
        shown = f" (got {given!r})" if isinstance(given, (str, int, float)) else ""
        out.append(f"{_where(name, argv)}: {msg}{shown}")
    return out


def load_or_exit(argv: list[str]) -> Settings:
    try:
        settings = Settings.load(argv)
        # an unreadable or malformed key file is a configuration problem too
        build_keys(settings.api_keys, settings.api_key_file)
        return settings
    except (ConfigError, KeyFileError) as e:
        lines = [str(e)]
    except ValidationError as e:
        lines = problems(e, argv)
    for line in lines:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    sys.exit(2)
