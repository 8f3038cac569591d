"""Why the model did not load, in one line an operator can act on (torch-free).

``check_model_path(path, timeout)`` runs before the weights load and raises
``ModelLoadError`` for the common mistakes, so they read as what they are rather than as
a loader traceback: a path that is a file, a folder without ``config.json``, a path that
does not exist, a hub id the hub cannot provide (unreachable, offline, unknown repo).
``describe_load_error(exc, path)`` turns any load failure (those, out of memory, the rest)
into the one line the server logs before it exits non-zero.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OFFLINE_HINT = ("on a box without internet, download the weights into a folder "
                "(huggingface-cli download REPO --local-dir DIR) and pass --model-path DIR")


class ModelLoadError(Exception):
    """A model that cannot load, with the reason as its message."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def check_model_path(path: str, timeout: float = 10.0) -> None:
    p = Path(path).expanduser()
    if p.is_file():
        raise ModelLoadError(f"--model-path {path} is a file, not a model folder")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"--model-path {path}: the folder has no config.json "
                                 "(not a Hugging Face model folder)")
        return
    if not _HUB_ID.match(path):
        raise ModelLoadError(f"--model-path {path}: no such folder (and not a hub id "
                             "such as Qwen/Qwen3-VL-2B-Instruct)")
    # a hub id: fetching its config.json (or finding it in the cache) shows the hub can
    # provide it.  huggingface_hub retries an unreachable hub for ~25 s whatever its
    # timeout, so the fetch runs in a daemon thread and is given up after `timeout`
    from huggingface_hub import hf_hub_download
    box: list[BaseException | None] = []

    def fetch():
        try:
            hf_hub_download(path, "config.json", etag_timeout=timeout)
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box.append(e)

    worker = threading.Thread(target=fetch, name="hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if box and box[0] is None:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline
           else _first_line(box[0]) if box else f"no answer within {timeout:g} s")
    raise ModelLoadError(f"--model-path {path} is not a local folder, and the Hugging "
                         f"Face hub could not provide it ({why}); {OFFLINE_HINT}")


def describe_load_error(e: BaseException, path: str) -> str:
    if isinstance(e, ModelLoadError):
        return str(e)
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return (f"out of memory while loading {path} ({_first_line(e)}); try "
                "--quantization 4bit, a smaller --max-model-len, or free the GPU")
    if isinstance(e, OSError) and "does not appear to have a file named" in text:
        return f"{path}: incomplete model folder or repo ({_first_line(e)})"
    return f"{path}: {_first_line(e)}"
