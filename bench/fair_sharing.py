"""How fast one key is served while another key floods or trickles (the latency side of
tests/test_fair_sharing.py, which asserts counts and codes only).

    python -m bench.fair_sharing [--rounds 3] [--out bench/results/fair_sharing.json]

Starts two servers with the tiny model, as the tests do: ``keyed`` (support-bot
unlimited, tagger ``max_concurrent: 4``) and ``slow`` (one slot, ``--body-timeout 3``).
Each round measures the median of one-at-a-time 16-token requests idle, then

* ``flood``: while tagger sends 50 concurrent requests (retrying after Retry-After);
* ``slow_uploads``: while 50 connections trickle a body one byte a second;

and prints the ratio loaded/idle per round.  Medians of several requests against the
same server idle, side by side in one run: only the ratios mean anything on a shared box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.conftest import RunningServer, start_server
from tests.test_fair_sharing import (BODY_TIMEOUT, HEADER_TIMEOUT, KEYS_YAML, ask, client,
                                     run_flood, with_slow_uploads)


def timed(c) -> float:
    t0 = time.perf_counter()
    ask(c)
    return time.perf_counter() - t0


def medians(c, n: int) -> float:
    return statistics.median(timed(c) for _ in range(n))


def one_round(keyed: RunningServer, slow: RunningServer) -> dict:
    support, b = client(keyed, "sk-support-1234"), client(slow, "sk-b")
    idle_keyed, idle_slow = medians(support, 5), medians(b, 5)
    flood = run_flood(keyed, "sk-tagger-5678", lambda: medians(support, 7))
    _, uploads = with_slow_uploads(slow, lambda: medians(b, 5))
    return {"flood": {"idle_s": round(idle_keyed, 4), "loaded_s": round(flood["during"], 4),
                      "ratio": round(flood["during"] / idle_keyed, 2),
                      "tagger": flood["status"]},
            "slow_uploads": {"idle_s": round(idle_slow, 4), "loaded_s": round(uploads, 4),
                             "ratio": round(uploads / idle_slow, 2)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    import hashlib
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from models.tiny import build
        model = tmp / "tiny"
        build(model, seed=0, real_vocab=True)  # the tests' model
        keys = tmp / "keys.yaml"
        keys.write_text(KEYS_YAML.format(digest=hashlib.sha256(b"x").hexdigest()))
        ab = tmp / "ab.yaml"
        ab.write_text("keys:\n  - name: a\n    key: sk-a\n  - name: b\n    key: sk-b\n")
        keyed = start_server(model, tmp / "keyed.log", "--api-key-file", str(keys),
                             "--max-new-tokens", "16")
        slow = start_server(model, tmp / "slow.log", "--api-key-file", str(ab),
                            "--max-num-seqs", "1", "--body-timeout", str(BODY_TIMEOUT),
                            "--header-timeout", str(HEADER_TIMEOUT))
        rounds = []
        try:
            ask(client(keyed, "sk-support-1234"))  # warm-up
            ask(client(slow, "sk-b"))
            for i in range(args.rounds):
                rounds.append(one_round(keyed, slow))
                print(f"round {i}: {json.dumps(rounds[-1])}", flush=True)
        finally:
            keyed.stop()
            slow.stop()
    summary = {k: statistics.median(r[k]["ratio"] for r in rounds)
               for k in ("flood", "slow_uploads")}
    print(f"median ratio loaded/idle: {summary}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "median_ratio": summary},
                                             indent=1))


if __name__ == "__main__":
    main()
