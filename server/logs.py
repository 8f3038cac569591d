"""Log setup for the server process: plain text lines or one JSON object per line.

``setup_logging(level, fmt)`` configures the root logger once; uvicorn's own loggers
propagate to it (the launcher passes ``log_config=None``), so every line has one format.
With ``fmt="json"`` a line is ``{"ts", "level", "logger", "message"}`` plus the fields a
caller passed as ``extra={"fields": {...}}`` (the access log does), and ``exc`` for a
traceback, so a log shipper never has to parse free text.
"""

from __future__ import annotations

import json
import logging
import os
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if fmt == "json":
        # what else writes to stderr, as JSON too: Python warnings, and no progress bars
        # (the weights loader's); transformers' own handler is swapped in the engine
        # factory (``json_library_logs``), where importing transformers is allowed
        logging.captureWarnings(True)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def json_library_logs() -> None:
    """transformers logs through its own stderr handler: send its records to ours."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
