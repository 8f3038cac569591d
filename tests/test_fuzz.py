"""Issue 5: schemathesis fuzzes the live server from its own ``/openapi.json``: zero 5xx.

Positive and negative cases for every operation (chat completions gets nearly all of
them), against a server whose token limits keep CPU generation short
(``--max-tokens-limit 16 --max-new-tokens 8``).  Every 4xx must carry OpenAI's error
envelope.  Image URLs that the server would fetch over http(s) are swapped for a data URL
before sending, so that no case makes the server resolve or contact another host (SSRF is
the hardening suite's job).  The count is written to the terminal summary
(``fuzz: N cases run, 0 5xx``) and to ``<pytest basetemp>/fuzz-summary.json``.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import summary_fixture

# a plain import: without schemathesis (the test extra installs it) this module fails
# loudly instead of skipping, so a broken install cannot pass as "0 cases, 0 5xx"
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

MAX_EXAMPLES = 60                       # per operation; the GET ones run out far sooner
STATS: dict = {"cases": 0, "5xx": 0, "statuses": {}, "by_operation": {}, "messages": {},
               "failures": []}
SAFE_URL = "data:image/png;base64,iVBORw0KGgo="   # refused locally, fetches nothing


summary = summary_fixture("fuzz", STATS, lambda: f"fuzz: {STATS['cases']} cases run, {STATS['5xx']} 5xx")


@pytest.fixture(scope="module")
def fuzz_server(server_factory):
    return server_factory("--max-tokens-limit", "16", "--max-new-tokens", "8",
                          "--fetch-timeout", "2", "--max-body-bytes", "2000000")


def _app_openapi() -> dict:
    """The document the server serves at /openapi.json, built without loading a model.

    (schemathesis' lazy ``from_fixture`` loader is broken on pytest 9, so the schema has to
    exist at collection time; ``test_live_schema_is_the_fuzzed_one`` checks the live one.)
    """
    from server.api.app import create_app
    from server.settings import Settings
    return create_app(Settings(), lambda: None).openapi()


OPENAPI = _app_openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_live_schema_is_the_fuzzed_one(fuzz_server):
    import httpx
    live = httpx.get(fuzz_server.url + "/openapi.json", timeout=10, trust_env=False).json()
    assert live == OPENAPI


def _defang(obj):
    """Replace every string the server would fetch as an http(s) URL."""
    if isinstance(obj, str):
        scheme = obj.strip().split(":", 1)[0].lower() if ":" in obj else ""
        return SAFE_URL if scheme in ("http", "https") else obj
    if isinstance(obj, dict):
        return {k: _defang(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_defang(v) for v in obj]
    return obj


def _deepen(body: dict) -> dict:
    """For schema-valid cases: the served model name and a content for every message that
    needs one, so that most of them get past the semantic checks into the engine."""
    if isinstance(body.get("model"), str):
        body["model"] = "qwen3-vl"
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("content") is None and not m.get("tool_calls"):
            m["content"] = "hello"
    return body


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    if isinstance(case.body, (dict, list)):
        case.body = _defang(case.body)
        mode = getattr(getattr(case.meta, "generation", None), "mode", None)
        if isinstance(case.body, dict) and str(getattr(mode, "value", mode)) == "positive":
            case.body = _deepen(case.body)
    response = case.call(base_url=fuzz_server.url, timeout=60)
    op = f"{case.method} {case.path}"
    STATS["cases"] += 1
    STATS["statuses"][str(response.status_code)] = STATS["statuses"].get(
        str(response.status_code), 0) + 1
    STATS["by_operation"][op] = STATS["by_operation"].get(op, 0) + 1
    if response.status_code >= 500:
        STATS["5xx"] += 1
        STATS["failures"].append({"op": op, "status": response.status_code,
                                  "body": json.dumps(case.body, default=str)[:2000],
                                  "response": response.text[:500]})
    assert response.status_code < 500, (response.status_code, response.text[:500],
                                        case.body)
    if response.status_code >= 400:
        err = response.json()["error"]
        msg = re.sub(r"\d+", "N", err["message"])[:70]
        STATS["messages"][msg] = STATS["messages"].get(msg, 0) + 1
        assert set(err) == {"message", "type", "param", "code"}, err
        assert "Traceback" not in err["message"]
