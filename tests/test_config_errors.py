"""Configuration errors read as one line each, exit 2, no traceback; sizes, JSON-list env,
no abbreviations, choices and units in --help (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config_errors import load_or_exit
from server.settings import Settings, build_parser, format_size, parse_size
from tests.conftest import ROOT
from tests.test_ui_browser import _launcher_extras


def _fail(argv, capsys) -> list[str]:
    """Run the launcher's settings step; return its stderr lines (it must exit 2)."""
    with pytest.raises(SystemExit) as e:
        load_or_exit(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not any("Traceback" in ln for ln in lines), lines
    return lines


@pytest.fixture
def broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("port: 8080\nhost: [127.0.0.1\nseed: 1\n")
    return str(path)


@pytest.mark.parametrize("argv,env,expect", [
    (["--config", "/nope/missing.yaml"], {}, "config file /nope/missing.yaml: no such file"),
    (["--dtype", "float64"], {}, "argument --dtype: invalid choice: 'float64'"),
    (["--port", "abc"], {}, "argument --port: invalid int value: 'abc'"),
    (["--port", "0"], {}, "--port: Input should be greater than or equal to 1 (got 0)"),
    (["--max-pixel", "5"], {}, "unrecognized arguments: --max-pixel 5"),
    (["--max-body-bytes", "8XB"], {}, "--max-body-bytes: unknown size unit 'XB'"),
    ([], {"QWEN_VL_PORT": "abc"}, "QWEN_VL_PORT: Input should be a valid integer"),
    ([], {"QWEN_VL_API_KEYS": '["a", "b"'}, "QWEN_VL_API_KEYS: starts with '[' but is not"),
    (["--api-key-file", "/nope/keys"], {}, "key file /nope/keys: cannot read it"),
])
def test_one_line_per_problem(argv, env, expect, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lines = _fail(argv, capsys)
    assert len(lines) == 1 and expect in lines[0], lines
    assert lines[0].startswith("python -m server: error: ")


def test_yaml_errors_name_file_and_line(tmp_path, broken_yaml, capsys):
    (line,) = _fail(["--config", broken_yaml], capsys)
    assert f"config file {broken_yaml} line 3: not valid YAML" in line, line
    bad = tmp_path / "bad.yaml"
    bad.write_text("# settings\nport: 8080\ntemperature: hot\nmax_num_seqs: -1\n")
    lines = _fail(["--config", str(bad)], capsys)
    assert len(lines) == 2, lines
    assert f"config file {bad} line 3: temperature: Input should be a valid number" in lines[0]
    assert f"config file {bad} line 4: max_num_seqs: Input should be greater" in lines[1]
    bad.write_text("prot: 8080\n")
    (line,) = _fail(["--config", str(bad)], capsys)
    assert "unknown setting 'prot'" in line


def test_real_entry_point_prints_one_line_and_exits_2(broken_yaml):
    for argv in (["--dtype", "float64"], ["--config", broken_yaml]):
        r = subprocess.run([sys.executable, "-m", "server", *argv], cwd=ROOT, timeout=60,
                           capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout, r.stderr


def test_sizes_accept_units():
    assert parse_size("8MiB") == 8 * 1024**2 and parse_size("512KB") == 512_000
    assert parse_size("1.5 GiB") == 3 * 1024**3 // 2 and parse_size("4096") == 4096
    assert format_size(64 * 1024**2) == "64MiB" and format_size(1000) == "1000"
    s = Settings.load(["--max-body-bytes", "8MiB"])
    assert s.max_body_bytes == 8 * 1024**2


def test_json_list_env_and_api_key_alias(monkeypatch):
    monkeypatch.setenv("QWEN_VL_API_KEYS", '["x", "y,z"]')
    assert Settings.load([]).api_keys == ["x", "y,z"]  # a JSON item is taken whole
    monkeypatch.setenv("QWEN_VL_API_KEYS", "x,y")
    assert Settings.load([]).api_keys == ["x", "y"]
    assert Settings.load(["--api-key", "z"]).api_keys == ["z"]


def test_help_shows_choices_units_and_api_key():
    text = " ".join(build_parser().format_help().split())
    assert "--dtype {auto,bfloat16,float16,float32}" in text
    assert "--api-keys VALUE, --api-key VALUE" in text
    assert "--max-body-bytes SIZE" in text and "[default: 64MiB]" in text
    assert "--fetch-timeout SECONDS" in text and "--max-pixels PIXELS" in text
    assert "--access-log, --no-access-log" in text


def test_no_traceback_for_config_error_in_gradio_launcher():
    env = {**os.environ, "EXTRAS": _launcher_extras()}
    r = subprocess.run(["./launch_gradio_api.sh", "--port", "abc"], cwd=ROOT, env=env,
                       timeout=120, capture_output=True, text=True)
    assert r.returncode == 2
    assert "argument --port: invalid int value: 'abc'" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
