"""Prefix cache, image cache and chunked prefill (issue 12): TTFT of repeated prompts and the
stall a long prompt causes, through the real server, streamed.

    python -m bench.prefix_cache [--model-path DIR] [--before CHECKOUT] [--label after]
        [--after-args "--max-prefill-chunk 512"] [--out bench/results/prefix_cache.json]

Without ``--model-path`` it builds a mid-size random Qwen3-VL (``python -m models.tiny DIR
--mid-size``: 8 layers, hidden 384, ~17M parameters, where prefill compute dominates on a CPU)
into ``--model-dir`` once, then starts this checkout's server (labelled ``--label``, default
``after``) and, with ``--before``, the server of another checkout (labelled ``before``; e.g.
``git worktree add /tmp/main-before main``), and measures through the ``openai`` SDK, all
requests streamed and greedy:

1. **follow-up**: a conversation with a ~2.2k-token system prompt (store rules) and a 448x448
   photo; its second turn resends the system prompt, the photo, the first answer and a new
   question.  Ratio: follow-up TTFT / first-turn TTFT (target after the change <= 0.2).
2. **new conversation**: the same system prompt with a new, different photo.  Ratio: its
   TTFT / the first turn's (target <= 0.5).
3. **long prompt**: a ~6k-token prompt arrives while 4 streams run.  Ratio: the longest gap
   between chunks in those 4 streams (from the long prompt's arrival until ``--after-s``
   after it finished (it asks for ``--probe-tokens``), so the streams' steps beside the long
   row count too) / the long prompt's TTFT (target <= 0.3).  Also reported, split at the
   long prompt's first token: the longest gap until then (``longest_gap_prefill_s``,
   ``gap_prefill_ratio``: the chunked-prefill stall alone) and after it
   (``longest_gap_after_first_token_s``: decode steps beside a 6k-token row); and each
   stream's chunk times around it (``stream_chunks_at_s``, seconds from its arrival).

Each round uses its own system prompt (a different first token: no cache entry from an
earlier round can help its first turn), ``--conversations`` conversations (the first one's
first turn is cold; the others are new conversations with new photos), ``--cold-samples``
cold first turns in all (the extra ones with system prompts of their own; their median is
the round's first-turn TTFT) and one long prompt.
Servers take turns per round, so both see the same machine load.  The ratios are medians
over rounds.  Prints a table and the ratios and writes JSON to ``--out``.

``--server-args`` go to every server (they set ``--max-model-len 8192`` so the 6k prompt
fits); ``--after-args`` only to this checkout's server (flags such as
``--max-prefill-chunk N`` or ``--no-prefix-cache`` that an older server does not know; a
single flag goes as ``--after-args=--no-prefix-cache``, or argparse takes it for an option).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SERVER_ARGS = "--max-model-len 8192 --max-num-seqs 8"
QUESTIONS_1 = ["Is the product in this photo damaged? Check it against the return rules.",
               "Which of our products is in this photo, and can I still return it?",
               "What colour is the item in the photo, and is it in stock?"]
QUESTIONS_2 = ["Thanks. How long does the refund take?",
               "Can I exchange it for a larger size instead?",
               "Do I need to print the return label myself?"]


def load_tokenizer(model_path: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))


def sized_text(tok, tokens: int, seed: int, head: str) -> str:
    """``head`` then shop-support text of about ``tokens`` tokens in all (seeded)."""
    from models.tiny import corpus
    lines = corpus()[:70]  # the plain lines (not the chat-formatted copies)
    rng = random.Random(seed)
    parts = [head]
    while len(tok.encode("\n".join(parts)).ids) < tokens:
        parts += [f"{len(parts)}. {rng.choice(lines)}" for _ in range(max(1, tokens // 400))]
    ids = tok.encode("\n".join(parts)).ids[:tokens]
    return tok.decode(ids)


def photo_url(seed: int, size: int) -> str:
    from bench.gpu_check import noise_image
    buf = io.BytesIO()
    noise_image(size, seed).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def stream(client, model: str, messages: list, max_tokens: int, *, until=None,
                 times: list | None = None) -> dict:
    """One streamed greedy request: TTFT, chunk times (appended to ``times`` as they come),
    text, usage.  ``until`` (an ``asyncio.Event``) ends the stream early (closing it aborts
    the request)."""
    t0 = time.perf_counter()
    s = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        logprobs=True)  # a chunk for every step, even where the text is held back
    times = [] if times is None else times
    text, usage = [], None
    try:
        async for chunk in s:
            if chunk.choices and chunk.choices[0].delta.role is None:  # not the role chunk
                times.append(time.perf_counter())
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
            if until is not None and until.is_set():
                break
    finally:
        await s.close()
    end = time.perf_counter()
    cached = None
    if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    return {"t0": t0, "ttft": (times[0] - t0) if times else end - t0, "times": times,
            "text": "".join(text), "prompt_tokens": usage.prompt_tokens if usage else None,
            "cached_tokens": cached, "end": end}


async def conversations(url: str, args, rnd: int, tok) -> dict:
    """Scenarios 1 and 2 for one round: ``args.conversations`` conversations sharing one
    system prompt, a different photo each, two turns each; plus ``args.cold_samples - 1``
    more cold first turns, each with a system prompt of its own (the cold TTFT of the round
    is the median of the cold first turns: the machine is shared and noisy)."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id

    def system(k: int) -> str:  # differs from its first token on: shares no cache block
        return sized_text(tok, args.system_tokens, 1000 * (rnd + 2) + k,
                          f"{rnd}-{k}: you are the support assistant of this store. Rules:")

    def photo(c: int) -> dict:
        return {"type": "image_url",
                "image_url": {"url": photo_url(10_000 * (rnd + 2) + c, args.image_size)}}

    out, colds = [], []
    for c in range(args.conversations):
        q1, q2 = QUESTIONS_1[c % len(QUESTIONS_1)], QUESTIONS_2[c % len(QUESTIONS_2)]
        msgs = [{"role": "system", "content": system(0)},
                {"role": "user", "content": [photo(c), {"type": "text", "text": q1}]}]
        first = await stream(client, model, msgs, args.answer_tokens)
        msgs += [{"role": "assistant", "content": first["text"] or "(no answer)"},
                 {"role": "user", "content": q2}]
        follow = await stream(client, model, msgs, args.probe_tokens)
        out.append({k: {f: r[f] for f in ("ttft", "prompt_tokens", "cached_tokens")}
                    for k, r in (("first_turn", first), ("follow_up", follow))})
        if c == 0:
            colds.append(first["ttft"])
    for k in range(1, args.cold_samples):
        msgs = [{"role": "system", "content": system(k)},
                {"role": "user", "content": [photo(100 + k),
                                             {"type": "text", "text": QUESTIONS_1[0]}]}]
        colds.append((await stream(client, model, msgs, args.probe_tokens))["ttft"])
    await client.close()
    cold = statistics.median(colds)
    new = [c["first_turn"]["ttft"] for c in out[1:]]
    fol = [c["follow_up"]["ttft"] for c in out]
    return {"conversations": out, "cold_first_turns_s": colds, "first_turn_ttft_s": cold,
            "follow_up_ttft_s": statistics.median(fol),
            "new_conversation_ttft_s": statistics.median(new) if new else None,
            "follow_up_ratio": statistics.median(fol) / cold,
            "new_conversation_ratio": statistics.median(new) / cold if new else None}


def longest_gap(times: list[float], since: float, until: float, *, clip: bool = False) -> float:
    """The longest wait between consecutive chunks of one stream within [since, until]
    (the wait that spans ``since`` counts whole, as does a stream silent until ``until``).
    The wait that spans ``until`` counts whole too, or only up to ``until`` with ``clip``."""
    prev = max((t for t in times if t <= since), default=since)
    gap = 0.0
    for t in times:
        if t <= since:
            continue
        if t > until:
            return max(gap, (until if clip else t) - prev)
        gap, prev = max(gap, t - prev), t
    return max(gap, until - prev)


async def long_prompt(url: str, args, rnd: int, tok) -> dict:
    """Scenario 3: ``args.streams`` streams run; a ~``args.long_tokens``-token prompt arrives."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    stop = asyncio.Event()
    seen: list[list[float]] = [[] for _ in range(args.streams)]
    runners = [asyncio.create_task(stream(
        client, model, [{"role": "user", "content": f"Stream {rnd}.{i}: tell me a long story "
                                                    "about parcels."}],
        args.stream_tokens, until=stop, times=seen[i])) for i in range(args.streams)]
    # wait until every stream is decoding: a few chunks each, and at least --warm-s
    t_wait = time.perf_counter()
    while time.perf_counter() - t_wait < 120 and not any(t.done() for t in runners):
        if min(map(len, seen)) >= 3 and time.perf_counter() - t_wait >= args.warm_s:
            break
        await asyncio.sleep(0.02)
    text = sized_text(tok, args.long_tokens, 5000 + rnd,
                      f"Customer file {rnd}: summarise the whole history below.")
    t_send = time.perf_counter()
    long = await stream(client, model, [{"role": "user", "content": text}], args.probe_tokens)
    t_first = long["t0"] + long["ttft"]
    await asyncio.sleep(args.after_s)  # let the streams show their next chunks
    until = time.perf_counter()
    stop.set()
    results = await asyncio.gather(*runners)
    await client.close()
    gaps = [longest_gap(r["times"], t_send, until) for r in results]
    finished_early = sum(1 for r in results if r["times"] and r["times"][-1] < t_first)
    # when each stream's chunks came, relative to the long prompt's arrival (the last one
    # before it, then those until the end of the window): where the stalls fall
    timeline = [[round(t - t_send, 3) for t in r["times"]
                 if t >= max((x for x in r["times"] if x <= t_send), default=t_send)
                 and t <= until] for r in results]
    # the same, split at the long prompt's first token: while it is prefilled (the wait
    # that spans its first token counted only up to it), and once it decodes beside them
    prefill_gaps = [longest_gap(r["times"], t_send, t_first, clip=True) for r in results]
    join_gaps = [longest_gap(r["times"], t_first, until) for r in results]
    return {"long_prompt_tokens": long["prompt_tokens"], "long_ttft_s": long["ttft"],
            "longest_gap_s": max(gaps), "gaps_s": gaps,
            "longest_gap_prefill_s": max(prefill_gaps),
            "gap_prefill_ratio": max(prefill_gaps) / long["ttft"],
            "longest_gap_after_first_token_s": max(join_gaps),
            "long_first_token_at_s": round(t_first - t_send, 3), "stream_chunks_at_s": timeline,
            "streams_finished_before_long_first_token": finished_early,
            "gap_ratio": max(gaps) / long["ttft"]}


def build_model(model_dir: str) -> str:
    if not (Path(model_dir) / "config.json").exists():
        print(f"building the mid-size random model in {model_dir} ...", flush=True)
        subprocess.run([sys.executable, "-m", "models.tiny", model_dir, "--mid-size"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return model_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None,
                   help="model folder (default: build the mid-size random model in --model-dir)")
    p.add_argument("--model-dir", default="/tmp/qwen3vl-mid-random",
                   help="where the mid-size model is built (reused when it is there)")
    p.add_argument("--before", default=None, help="another checkout, measured side by side")
    p.add_argument("--label", default="after", help="the name of this checkout's server")
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="flags for every server")
    p.add_argument("--after-args", default="",
                   help="flags for this checkout's server only, e.g. \"--max-prefill-chunk "
                        "512\" (one flag alone: --after-args=--no-prefix-cache)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--conversations", type=int, default=3,
                   help="per round: the first is the cold one, the others new conversations")
    p.add_argument("--cold-samples", type=int, default=2,
                   help="cold first turns per round (each with its own system prompt)")
    p.add_argument("--system-tokens", type=int, default=2200)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--answer-tokens", type=int, default=32, help="first-turn answer length")
    p.add_argument("--probe-tokens", type=int, default=4,
                   help="output tokens of requests measured only for TTFT")
    p.add_argument("--long-tokens", type=int, default=6000)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=2000,
                   help="max_tokens of the running streams (stopped early)")
    p.add_argument("--warm-s", type=float, default=2.0,
                   help="seconds the streams run before the long prompt is sent")
    p.add_argument("--after-s", type=float, default=1.0,
                   help="seconds the streams are watched after the long prompt finished")
    p.add_argument("--out", default="bench/results/prefix_cache.json")
    args = p.parse_args(argv)
    if args.before and args.label == "before":
        p.error("--label before is taken by the --before checkout's server")
    if min(args.conversations, args.rounds, args.streams, args.cold_samples) < 1:
        p.error("--rounds, --conversations, --cold-samples and --streams must be at least 1")
    return args


def summarise(label: str, rounds: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in rounds if r[key] is not None)  # noqa: E731
    have_new = any(r["new_conversation_ratio"] is not None for r in rounds)
    return {"first_turn_ttft_s": med("first_turn_ttft_s"),
            "follow_up_ttft_s": med("follow_up_ttft_s"),
            "new_conversation_ttft_s": med("new_conversation_ttft_s") if have_new else None,
            "long_ttft_s": med("long_ttft_s"), "longest_gap_s": med("longest_gap_s"),
            "longest_gap_prefill_s": med("longest_gap_prefill_s"),
            "longest_gap_after_first_token_s": med("longest_gap_after_first_token_s"),
            "follow_up_ratio": med("follow_up_ratio"),
            "new_conversation_ratio": med("new_conversation_ratio") if have_new else None,
            "gap_ratio": med("gap_ratio"), "gap_prefill_ratio": med("gap_prefill_ratio"),
            "first_turn_prompt_tokens": rounds[0]["conversations"][0]["first_turn"]["prompt_tokens"],
            "follow_up_prompt_tokens": rounds[0]["conversations"][0]["follow_up"]["prompt_tokens"],
            "follow_up_cached_tokens": rounds[0]["conversations"][0]["follow_up"]["cached_tokens"],
            "long_prompt_tokens": rounds[0]["long_prompt_tokens"]}


TARGETS = {"follow_up_ratio": 0.2, "new_conversation_ratio": 0.5, "gap_ratio": 0.3}


def table(summary: dict[str, dict]) -> str:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| server | first turn TTFT s | follow-up TTFT s | new conversation TTFT s "
             "| long prompt TTFT s | longest stream gap s | of which: until its first token "
             "/ after | follow-up / first (<= 0.2) | new conv. / first (<= 0.5) "
             "| gap / long TTFT (<= 0.3) | prefill gap / long TTFT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {f(s['first_turn_ttft_s'])} | {f(s['follow_up_ttft_s'])} "
                     f"| {f(s['new_conversation_ttft_s'])} | {f(s['long_ttft_s'])} "
                     f"| {f(s['longest_gap_s'])} | {f(s.get('longest_gap_prefill_s'))} / "
                     f"{f(s.get('longest_gap_after_first_token_s'))} "
                     f"| {f(s['follow_up_ratio'])} | {f(s['new_conversation_ratio'])} "
                     f"| {f(s['gap_ratio'])} | {f(s.get('gap_prefill_ratio'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from bench.compare import start_server

    args = parse_args(argv)
    t_start = time.perf_counter()
    model = args.model_path or build_model(args.model_dir)
    tok = load_tokenizer(model)
    roots = {args.label: (ROOT, args.server_args.split() + args.after_args.split())}
    if args.before:
        roots["before"] = (Path(args.before).resolve(), args.server_args.split())
    servers = {}
    per_round: dict[str, list[dict]] = {label: [] for label in roots}
    try:
        for label, (root, flags) in roots.items():
            servers[label] = start_server(model, "batching", flags, root=root)
        for label, (_, url) in servers.items():  # warm-up: nothing the rounds reuse
            asyncio.run(conversations(url, argparse.Namespace(**{
                **vars(args), "conversations": 1, "cold_samples": 1, "system_tokens": 64,
                "image_size": 128, "answer_tokens": 4}), -1, tok))
        for rnd in range(args.rounds):
            for label, (_, url) in servers.items():
                res = asyncio.run(conversations(url, args, rnd, tok))
                res.update(asyncio.run(long_prompt(url, args, rnd, tok)))
                per_round[label].append(res)
                print(f"  round {rnd} {label:>6}: first {res['first_turn_ttft_s']:.2f} s, "
                      f"follow-up {res['follow_up_ttft_s']:.2f} s, new conversation "
                      f"{res['new_conversation_ttft_s'] or 0:.2f} s, long prompt "
                      f"{res['long_ttft_s']:.2f} s, longest gap {res['longest_gap_s']:.2f} s",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    summary = {label: summarise(label, rs) for label, rs in per_round.items()}
    report = {"summary": summary, "targets": TARGETS, "rounds": per_round,
              "config": {k: v for k, v in vars(args).items()},
              "model": model, "elapsed_s": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print()
    print(table(summary))
    for label, s in summary.items():
        print(f"{label}: follow-up / first = {s['follow_up_ratio']:.2f}x (target <= 0.2), "
              f"new conversation / first = "
              + (f"{s['new_conversation_ratio']:.2f}x" if s["new_conversation_ratio"] is not None
                 else "-")
              + f" (target <= 0.5), longest gap / long TTFT = {s['gap_ratio']:.2f}x "
              "(target <= 0.3)")
    print(f"elapsed {report['elapsed_s']} s; wrote {out}")
    return report


if __name__ == "__main__":
    main()
