"""One settings definition: YAML < env < CLI, lists, and the shipped configs load."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings, build_parser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_precedence_yaml_env_cli(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9001\ntemperature: 0.3\nmax_num_seqs: 5\n")
    monkeypatch.setenv("QWEN_VL_TEMPERATURE", "0.4")
    monkeypatch.setenv("QWEN_VL_MAX_NUM_SEQS", "6")
    s = Settings.load(["--config", str(cfg), "--max-num-seqs", "7"])
    assert (s.port, s.temperature, s.max_num_seqs) == (9001, 0.4, 7)


def test_lists_from_flags_env_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_VL_CORS_ORIGINS", "http://a,http://b")
    s = Settings.load(["--api-key", "k1,k2", "--api-key", "k3"])
    assert s.api_keys == ["k1", "k2", "k3"] and s.cors_origins == ["http://a", "http://b"]
    keyfile = tmp_path / "keys"
    keyfile.write_text("# comment\nk4\n\nk5\n")
    assert Settings.load(["--api-key-file", str(keyfile)]).all_api_keys() == ["k4", "k5"]


def test_bad_values_rejected():
    with pytest.raises(ValidationError):
        Settings.load(["--port", "0"])
    with pytest.raises(SystemExit):  # a choice: argparse refuses it (one line, exit 2)
        Settings.load(["--dtype", "int3"])


@pytest.mark.parametrize("name", ["default.yaml", "cpu.yaml", "4bit.yaml"])
def test_shipped_configs_load(name):
    s = Settings.load(["--config", str(CONFIGS / name)])
    assert s.model_path == "Qwen/Qwen3-VL-2B-Instruct"


def test_help_lists_every_setting():
    text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
    assert "--max-new-tokens" in text and "--temperature" in text and "--device-map" in text


def test_readme_documents_every_flag():
    readme = (CONFIGS.parent / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`--{n.replace('_', '-')}`" not in readme]
    assert not missing, f"README lacks flags: {missing}"
