"""``bench.processes`` (issue 31's benchmark) end to end, scaled down, against one server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_processes_bench_reports_figures_and_cpu_per_process(tiny_model, tmp_path):
    """Short requests and a burst of two photos: each cell has its figure and, for its
    round, the server's processes (the server itself among them) with their CPU time, and
    the client's; structure only, not speed."""
    out = tmp_path / "processes.json"
    r = subprocess.run([sys.executable, "-m", "bench.processes", "--model-path", tiny_model,
                        "--only", "short,photos", "--requests", "16", "--rounds", "1",
                        "--photos", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]["after"]
    assert set(cells) == {"short", "photos"}
    assert (cells["short"]["unit"], cells["photos"]["unit"]) == ("req/s", "s")
    for cell in cells.values():
        run = cell["rounds"][cell["best_round"]]
        assert cell["best"] > 0 and run["wall_s"] > 0 and run["client_cpu_s"] >= 0
        names = [p["name"] for p in run["processes"]]
        assert any("-m server" in n or "--model-path" in n for n in names), names
        cpu = sum(p["cpu_s"] for p in run["processes"])
        assert run["server_cpu_s"] == pytest.approx(cpu, abs=0.01) and cpu > 0
    assert "client (this process)" in r.stdout
