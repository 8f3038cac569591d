"""The README's Python examples run, unchanged but for the server address, against the
tiny model (issue 13), so they cannot rot.  Each ```python block runs alone in a fresh
interpreter: a block that needs something from another one fails here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from models.video import make_test_clip
from tests.conftest import ROOT, png_bytes

README_URL = "http://127.0.0.1:8080/v1"
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3 and all(README_URL in b for b in BLOCKS)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, server, tmp_path):
    # the files the examples open
    (tmp_path / "photo.jpg").write_bytes(png_bytes(96, 64, fmt="JPEG"))
    (tmp_path / "order.png").write_bytes(png_bytes(120, 80))
    (tmp_path / "unboxing.mp4").write_bytes(make_test_clip(seconds=3.0))
    code = BLOCKS[index].replace(README_URL, server.base_url)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode == 0, f"README example {index + 1} failed:\n{code}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), "the example printed nothing"
