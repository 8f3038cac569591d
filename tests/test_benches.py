"""The benchmarks of issues 11 and 12 run end to end on CPU, so they are known to work before
anyone spends GPU time (or ten minutes) on them.

* ``bench.gpu_check --device cpu`` runs in a subprocess where fastapi, pydantic,
  pydantic-settings, xgrammar, openai, uvicorn, bitsandbytes and prometheus_client cannot be
  imported (as on the H200 image) and writes every field of its report, with a passing
  correctness line.
* ``bench.prefix_cache`` runs its whole workload, scaled down, against the tiny model.
* ``bench.hostpath``'s clients (the openai SDK, aiohttp) against the real server.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# not on the H200 image (shared/QWEN3VL-NOTES.md): the HTTP layer's packages, xgrammar,
# bitsandbytes; and prometheus_client, which only the HTTP layer's metrics may import
BLOCKED = ("fastapi", "pydantic", "pydantic_settings", "xgrammar", "openai", "uvicorn",
           "bitsandbytes", "prometheus_client")

# runs bench.gpu_check as __main__ behind a finder that refuses the server-only packages
WRAPPER = textwrap.dedent(f"""
    import json, runpy, sys
    BLOCKED = {BLOCKED!r}
    tried = set()

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                tried.add(name)
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import importlib.util
    _find_spec = importlib.util.find_spec

    def find_spec(name, package=None):  # "is it installed?" answers no, as it would there
        if name.split(".")[0] in BLOCKED:
            tried.add(name)
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = find_spec
    sys.argv = ["bench.gpu_check"] + sys.argv[1:]
    try:
        runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("BLOCKED-REPORT " + json.dumps({{"tried": sorted(tried), "loaded": loaded}}))
""")

MODE_FIELDS = {"decode_path", "decode_path_end", "graphs_captured", "engine_startup_s",
               "tpot_batch1_ms", "decode", "image_ttft_ms", "image_prompt_tokens", "image_batch",
               "peak_gpu_memory_gib", "decode_compiled"}


def test_gpu_check_cpu_without_server_packages(tmp_path):
    out = tmp_path / "gpu_check.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    report_line = next(line for line in r.stdout.splitlines() if line.startswith("BLOCKED-REPORT"))
    blocked = json.loads(report_line.split(" ", 1)[1])
    assert blocked["loaded"] == [], blocked
    assert "xgrammar" in blocked["tried"], blocked  # the blocker was in the way (the engine
    # tries xgrammar at startup for its grammar workers, and goes on without it)

    rep = json.loads(out.read_text())
    assert set(rep) >= {"device", "device_name", "dtype", "torch", "transformers", "python",
                        "model", "workload", "modes", "correctness", "complete", "elapsed_s"}
    assert rep["complete"] is True
    assert rep["device"] == "cpu" and rep["dtype"] == "float32"
    assert set(rep["modes"]) == {"eager", "graphs"}
    for mode in rep["modes"].values():
        assert set(mode) == MODE_FIELDS, mode.keys()
        assert mode["decode_path"] == mode["decode_path_end"] == "eager"  # no graphs on CPU
        assert not mode["graphs_captured"] and mode["decode_compiled"] is False
        assert mode["peak_gpu_memory_gib"] is None
        assert mode["tpot_batch1_ms"] > 0 and mode["image_ttft_ms"] > 0
        assert [d["batch"] for d in mode["decode"]] == list(rep["workload"]["decode_batches"])
        for d in mode["decode"]:
            assert set(d) == {"batch", "context_tokens", "output_tokens", "tokens_per_s", "step_ms",
                              "window_s"}
            assert d["tokens_per_s"] > 0 and d["context_tokens"] >= rep["workload"]["decode_context"]
        assert set(mode["image_batch"]) == {"requests", "output_tokens", "tokens_per_s",
                                            "requests_per_s", "wall_s", "ttft_p50_ms",
                                            "ttft_max_ms", "step_budget", "stages"}
        assert mode["image_batch"]["stages"]["encoder"]["calls"] >= 1
    c = rep["correctness"]
    assert c == {"batch": 8, "sequences_equal": 8, "equal": True, "first_divergence": [None] * 8,
                 "decode_paths": ["eager", "eager"]}
    # the table, as on a GPU; on a CPU both columns decode eagerly, and the correctness
    # line says it compared eager with eager (it must not claim graphs == eager)
    assert "| decode path | eager | eager |" in r.stdout
    assert ("correctness: eager tokens == eager tokens (no CUDA graphs here: only a "
            "determinism check, not graphs against eager) at batch 8 (greedy, float32): PASS"
            ) in r.stdout
    print(f"gpu_check --device cpu took {took:.1f} s (report: {rep['elapsed_s']} s)")


def test_settings_defaults_without_pydantic_match_settings():
    from bench.gpu_check import engine_settings, settings_defaults
    from server.settings import Settings

    expected = {n: f.get_default(call_default_factory=True) for n, f in Settings.model_fields.items()}
    assert settings_defaults() == expected
    assert expected["enforce_eager"] is False
    s = engine_settings(enforce_eager=True, max_num_seqs=4)
    assert s.enforce_eager is True and s.max_num_seqs == 4 and s.max_model_len == 32768
    with pytest.raises(KeyError):
        engine_settings(no_such_setting=1)


def test_enforce_eager_flag():
    from server.settings import Settings

    assert Settings.load([]).enforce_eager is False
    assert Settings.load(["--enforce-eager"]).enforce_eager is True


def test_mid_size_shapes():
    from models.tiny import build_config, build_tokenizer

    tok = build_tokenizer()
    mid = build_config(tok, mid_size=True)
    assert (mid.text_config.num_hidden_layers, mid.text_config.hidden_size) == (8, 384)
    assert mid.vision_config.out_hidden_size == 384
    assert mid.text_config.max_position_embeddings >= 8192
    custom = build_config(tok, layers=3, hidden_size=96, vision_depth=1)
    assert (custom.text_config.num_hidden_layers, custom.text_config.hidden_size) == (3, 96)
    assert custom.vision_config.out_hidden_size == 96 and custom.vision_config.depth == 1
    assert custom.vision_config.deepstack_visual_indexes == [0]
    tiny = build_config(tok)
    assert (tiny.text_config.num_hidden_layers, tiny.text_config.hidden_size) == (2, 64)


def test_longest_gap():
    from bench.prefix_cache import longest_gap

    times = [0.0, 0.1, 0.2, 1.5, 1.6, 1.7, 3.0]
    assert longest_gap(times, 0.25, 2.0) == pytest.approx(1.3)  # 0.2 -> 1.5 spans the send
    assert longest_gap(times, 1.55, 1.65) == pytest.approx(0.1)
    assert longest_gap(times, 1.75, 2.5) == pytest.approx(1.3)  # 1.7 -> 3.0 crosses the end
    assert longest_gap([], 1.0, 2.0) == pytest.approx(1.0)      # silent stream
    assert longest_gap(times, 1.75, 2.5, clip=True) == pytest.approx(0.8)  # 1.7 -> 2.5 only


def test_prefix_cache_args():
    from bench.prefix_cache import DEFAULT_SERVER_ARGS, parse_args

    a = parse_args([])
    assert a.system_tokens >= 2000 and a.long_tokens >= 6000 and a.streams == 4
    assert a.image_size == 448 and a.label == "after" and a.before is None
    assert "--max-model-len 8192" in DEFAULT_SERVER_ARGS
    a = parse_args(["--before", "/tmp/x", "--after-args", "--max-prefill-chunk 512"])
    assert a.before == "/tmp/x" and a.after_args.split() == ["--max-prefill-chunk", "512"]
    assert parse_args(["--after-args=--no-prefix-cache"]).after_args == "--no-prefix-cache"
    with pytest.raises(SystemExit):
        parse_args(["--before", "/tmp/x", "--label", "before"])


def test_prefix_cache_reduced_run(tiny_model, tmp_path):
    """The whole prefix-cache workload, scaled down, against the tiny model."""
    from bench.prefix_cache import main

    out = tmp_path / "pc.json"
    rep = main(["--model-path", tiny_model, "--rounds", "1", "--conversations", "2",
                "--system-tokens", "300", "--long-tokens", "600", "--image-size", "128",
                "--answer-tokens", "6", "--warm-s", "0.3", "--after-s", "0.3",
                "--server-args", "--max-model-len 4096 --max-num-seqs 8", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == rep["summary"]
    s = rep["summary"]["after"]
    for key in ("first_turn_ttft_s", "follow_up_ttft_s", "new_conversation_ttft_s",
                "long_ttft_s", "longest_gap_s", "follow_up_ratio", "new_conversation_ratio",
                "gap_ratio", "longest_gap_prefill_s", "gap_prefill_ratio",
                "longest_gap_after_first_token_s"):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert s["first_turn_prompt_tokens"] >= 300 and s["long_prompt_tokens"] >= 600
    assert s["follow_up_prompt_tokens"] > s["first_turn_prompt_tokens"]
    assert len(rep["rounds"]["after"][0]["cold_first_turns_s"]) == 2
    assert rep["rounds"]["after"][0]["streams_finished_before_long_first_token"] == 0


def test_decode_rate_window():
    from bench.gpu_check import decode_rate

    # two rows: one starts at 0, the other at 1; both emit one token per 0.1 s until 3 / 4
    a = {"events": [(round(0.1 * i, 1), 1) for i in range(0, 31)]}
    b = {"events": [(round(1 + 0.1 * i, 1), 1) for i in range(0, 31)]}
    rate, window = decode_rate([a, b])
    assert window == pytest.approx(2.0) and rate == pytest.approx(20, rel=0.06)
    # rows that never decode together: the whole span instead, window 0
    c = {"events": [(5.0 + 0.1 * i, 1) for i in range(11)]}
    rate, window = decode_rate([a, c])
    assert window == 0.0 and rate > 0


def test_gpu_session_script_dry_run_on_cpu(tmp_path):
    """``bench/gpu_session.sh`` (the GPU session's one command) runs its one check on the
    CPU and leaves 3 files: the JSON, the profiles and the log (versions first); the photo
    burst is measured at the step budget and at 1,024 tokens, with per-stage timers and a
    profile of mid-burst steps."""
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600,
                       env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path),
                            "PYTHONPATH": str(ROOT),  # a budget above 1,024: both bursts
                            "GPU_CHECK_ARGS": "--set max_num_batched_tokens=4096"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check-profiles.tgz", "gpu_check.json", "log.txt"]
    log = (tmp_path / "log.txt").read_text()
    assert "torch " in log and "gcc:" in log and "nvcc:" in log
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["complete"] and set(report["modes"]) == {"graphs", "reference", "compiled"}
    for name in ("reference", "compiled"):  # decode-only columns (issue 30)
        col = report["modes"][name]
        assert col["tpot_batch1_ms"] > 0 and len(col["decode"]) == 2 and "profile" in col
        assert "image_batch" not in col
    assert report["modes"]["compiled"]["decode_compiled"]
    graphs = report["modes"]["graphs"]
    assert "profile" in graphs and graphs["image_batch"]["profile_trace"]
    stages = graphs["image_batch"]["stages"]
    assert {"preparation", "admission", "encoder", "prefill", "decode"} <= set(stages)
    assert graphs["image_batch"]["step_budget"] == 4096
    again = graphs["image_batch_budget_1024"]
    # how many steps a burst takes depends on when its requests arrive; what each step
    # holds does not: no prefill step above its budget, the same prompts in both bursts
    first, second = graphs["image_batch"]["stages"]["prefill"], again["stages"]["prefill"]
    assert again["step_budget"] == 1024 and 0 < second["max_tokens"] <= 1024
    assert 0 < first["max_tokens"] <= 4096 and second["tokens"] > 0
    import tarfile
    with tarfile.open(tmp_path / "gpu_check-profiles.tgz") as tar:
        names = tar.getnames()
    assert any("profile_burst_graphs" in n for n in names), names
    assert any("profile_decode_batch8_graphs" in n for n in names), names


def test_hostpath_clients_and_decode_split(server):
    """``bench.hostpath``'s two clients send the same requests to the real server (each
    response counted from its usage, every one of them), and ``/metrics`` counts the
    decode rows they took: 4 requests x 4 tokens, the first of each from its prefill."""
    import argparse
    import asyncio

    pytest.importorskip("aiohttp")  # the bench extra's
    from bench.hostpath import decode_counters, run_mode
    url = server.url + "/v1"
    for client in ("sdk", "aiohttp"):
        for mode in ("greedy", "sampling", "logprobs"):
            before = decode_counters(url)
            args = argparse.Namespace(requests=4, concurrency=2, max_tokens=4, client=client)
            tokens, seconds = asyncio.run(run_mode(url, mode, args))
            assert tokens == 4 * 4 and seconds > 0, (client, mode, tokens)
            after = decode_counters(url)
            assert after[1] - before[1] == 4 * 3 and after[0] > before[0], (client, mode)


def test_decode_host_reduced_run(tiny_model, tmp_path):
    """``bench.decode_host`` (issue 30's host-time baseline) end to end, scaled down: every
    full-batch step is split into forward, sample and host time, which add up."""
    out = tmp_path / "decode_host.json"
    r = subprocess.run([sys.executable, "-m", "bench.decode_host", "--model-path", tiny_model,
                        "--batch", "4", "--tokens", "6", "--rounds", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rounds"]
    assert row["steps_full_batch"] >= 4
    assert row["forward_ms"] > 0 and row["sample_ms"] > 0 and row["host_ms"] > 0
    assert row["host_ms"] < row["decode_ms"]
    # --stub-device: the model's step and the sampler return cached results after the
    # warm-up round, so the whole step is the host's
    r = subprocess.run([sys.executable, "-m", "bench.decode_host", "--model-path", tiny_model,
                        "--batch", "4", "--tokens", "6", "--rounds", "1", "--stub-device",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rounds"]
    assert row["forward_ms"] == 0 and row["sample_ms"] == 0 and row["host_ms"] > 0


def _step_ops(model: str, *args: str, env=None) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.step_ops", "--model-path", model,
                        "--batch", "16", "--context", "40", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_decode_step_ops_per_layer_and_no_kv_block_copies(tiny_model):
    """Issue 30's counted gates at batch 16 with mixed lengths: the fused step dispatches
    at most 20 ops per decoder layer (each fused piece one ``qwen_vl::`` op); the path a
    GPU runs (the Triton kernels, here under Triton's interpreter) copies no KV block of
    the pool, while the CPU's reference path gathers every layer's blocks (so the count can
    see a copy), and transformers' layers take ~60 ops per layer."""
    cpu = _step_ops(tiny_model)
    assert cpu["decode_layers"] == "fused" and cpu["kernels"] == "torch"
    assert cpu["per_layer"] <= 20, cpu
    assert {"qwen_vl.add_rms_norm", "qwen_vl.qk_norm_rope", "qwen_vl.paged_decode",
            "qwen_vl.silu_mul"} <= set(cpu["op_names"])
    assert cpu["kv_pool_copies"] == 2 * cpu["layers"], cpu  # keys and values, each layer
    gpu = _step_ops(tiny_model, "--kernels", "triton", env={"TRITON_INTERPRET": "1"})
    assert gpu["kernels"] == "triton" and gpu["per_layer"] == cpu["per_layer"]
    assert gpu["kv_pool_copies"] == 0, gpu["kv_pool_copy_ops"]
    ref = _step_ops(tiny_model, "--reference")
    assert ref["decode_layers"] == "transformers" and ref["per_layer"] > 40


def test_video_bench_quick(tmp_path):
    """``bench.video`` times a clip's decode and preprocessing and reports its tokens."""
    from bench.video import main
    out = tmp_path / "video.json"
    assert main(["--quick", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["sampled_frames"] == 6 and row["video_tokens"] == 60 and row["decode_ms"] > 0
