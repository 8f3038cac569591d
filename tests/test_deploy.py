"""deploy/: the systemd unit passes `systemd-analyze verify` (Debian's systemd package), the
nginx example passes `nginx -t` (Debian's nginx-light; tests/run.sh installs both), and the
environment file holds only settings the server knows (issue 13)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from server.settings import ENV_PREFIX, Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    # the unit names its install paths (/opt/..., /etc/qwen-vl/...): verify it with this
    # checkout in their place, since verify checks that ExecStart exists and is executable
    unit = (DEPLOY / "qwen-vl.service").read_text()
    assert "/opt/qwen3-vl-server" in unit and "Restart=on-failure" in unit
    assert "EnvironmentFile=/etc/qwen-vl/qwen-vl.env" in unit
    local = (unit.replace("/opt/qwen3-vl-server", str(ROOT))
             .replace("/etc/qwen-vl/qwen-vl.env", str(DEPLOY / "qwen-vl.env")))
    path = tmp_path / "qwen-vl.service"
    path.write_text(local)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), \
        r.stdout + r.stderr


def test_env_file_settings_are_known():
    names = set()
    for line in (DEPLOY / "qwen-vl.env").read_text().splitlines():
        line = line.lstrip("#").strip()
        if line.startswith(ENV_PREFIX) and "=" in line:
            names.add(line.split("=", 1)[0][len(ENV_PREFIX):].lower())
    assert names and names - {"config"} <= set(Settings.model_fields), names


def test_nginx_example_passes_nginx_t(tmp_path):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is missing: apt-get install nginx-light (tests/run.sh does it)")
    conf = (DEPLOY / "nginx.conf").read_text()
    # a throwaway certificate where the example expects one, inside a minimal main config
    cert, key = tmp_path / "qwen-vl.crt", tmp_path / "qwen-vl.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=qwen-vl.shop.lan", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    site = tmp_path / "qwen-vl.conf"
    site.write_text(conf.replace("/etc/nginx/tls/qwen-vl.crt", str(cert))
                    .replace("/etc/nginx/tls/qwen-vl.key", str(key)))
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                    f"events {{}}\nhttp {{ access_log off; include {site}; }}\n")
    r = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-t", "-q", "-c", str(main),
                        "-p", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
