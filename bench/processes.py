"""Issue 31's figures ("every core at work"): this checkout's server against another
checkout's, with the CPU time of every process of each server and of the client.

    python -m bench.processes --model-path /tmp/tiny --before /tmp/main-before
        [--after-flags "--api-server-count 2"] [--before-flags ""] [--requests 1024]
        [--rounds 3] [--only greedy,logprobs,stream,short,photos,sdk] [--photos 32]
        [--out bench/results/processes.json]

The cells, each run against the two servers in turn, round by round (bench.hostpath's
alternation, so both see the same machine load):

* ``greedy``, ``logprobs`` (top_logprobs 5): ``--requests`` (1024) requests at
  concurrency 64, 64 tokens each (``ignore_eos``), through bench.hostpath's aiohttp
  client; output tok/s.  ``stream``: the same two, streamed (usage from the last chunk).
  ``sdk``: the same two through the ``openai`` SDK (bench.hostpath's default client).
* ``short``: max_tokens 8 at concurrency 64, ``--requests`` (512) of them; requests/s.
* ``photos``: ``--photos`` (32) requests at once, each a fresh 1024x1024 JPEG (noise over a
  gradient, quality 90) as a base64 data URL, 8 tokens; the burst's wall time in seconds.
  New photos every round (no image cache answers), the same ones to both servers.

Both servers get the tests' small image budget (``SMALL_IMAGES``: the photos are still
decoded from 1024 px JPEGs, then resized to at most 64 K pixels); ``--after-flags`` and
``--before-flags`` come last and may override it.  Without ``--before`` only this
checkout's server runs.

CPU: a thread polls ``/proc`` every ``POLL_S`` during each run and reads utime + stime of
the driven server's process and all its descendants (children born during the run count;
one that lives and dies between two polls is missed), and the client's own CPU time (less
the poller's).  Each is reported as CPU-seconds and as % of one core over the run's wall
time; processes are named by pid, parent pid and 60 characters of their command line
(``-m MODULE`` or ``-c CODE`` and the end of the rest: multiprocessing's children are
``-c from multiprocessing...``; a process title's last 60; ``[comm]`` first where a
process renamed itself).  Only the server being driven is watched.
Figures are the best of ``--rounds`` (the fastest round for photos), with the CPU of that
round; ratios are best over best and the median of the ratios within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path

from bench.compare import ROOT, start_server
from bench.hostpath import MODES, _drive, _messages, run_mode
from bench.prefix_cache import photo_url

SMALL_IMAGES = ["--min-pixels", "4096", "--max-pixels", "65536"]  # as tests/conftest.py
PHOTO_SIDE = 1024
POLL_S = 0.1
TICK = os.sysconf("SC_CLK_TCK")
# cell: (its --only group, unit); "photos" is a time, lower is better
CELLS = {"greedy": ("greedy", "tok/s"), "logprobs": ("logprobs", "tok/s"),
         "stream greedy": ("stream", "tok/s"), "stream logprobs": ("stream", "tok/s"),
         "sdk greedy": ("sdk", "tok/s"), "sdk logprobs": ("sdk", "tok/s"),
         "short": ("short", "req/s"), "photos": ("photos", "s")}
# ratio: (cell, target); "x/greedy" per server, "after/before" for a cell
TARGETS = {"greedy after/before": ">= 1.3", "sdk greedy after/before": ">= 1.2",
           "short after/before": ">= 1.3", "photos after/before": "<= 0.8",
           "logprobs/greedy": ">= 0.9", "stream logprobs/stream greedy": ">= 0.9",
           "sdk logprobs/sdk greedy": ">= 0.9"}


# --- 1. the CPU of a process tree, from /proc --------------------------------------------

def _stat(pid: int) -> tuple[int, float, str] | None:
    """(ppid, CPU-seconds: utime + stime of all its threads, its 15-character name), or
    None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
    comm = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
    return int(f[1]), (int(f[11]) + int(f[12])) / TICK, comm


def _name(pid: int, comm: str) -> str:
    """60 characters of its command line: ``-m MODULE`` or ``-c CODE`` (multiprocessing's
    helpers, and the workers forked from its forkserver, whose tail is only ``sys_path``),
    then the end of the rest; the last 60 characters of any other (a process title).
    Prefixed with ``[comm]`` where the process renamed itself (``prctl``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    argv = [" ".join(a.split()) for a in argv if a] or [""]  # -c code: one line
    flag = next((i for i, a in enumerate(argv[:-1]) if a in ("-m", "-c")), None)
    if flag is None:
        name = " ".join(argv)[-60:]
    else:
        head, rest = f"{argv[flag]} {argv[flag + 1]}", " ".join(argv[flag + 2:])
        name = f"{head} {rest}".strip()
        if len(name) > 60:
            name = head[:60] if len(head) > 50 else f"{head} ...{rest[-(56 - len(head)):]}"
    if not Path(argv[0]).name.startswith(comm):
        name = f"[{comm}] {name}"[:60]
    return name


class ProcessTree:
    """A process and its descendants: ``poll()`` -> {pid: (ppid, CPU-seconds, name)} of
    those alive now.  A process is ours when its parent is (checked once, at first sight;
    others are remembered as foreign so that a poll reads only new and our pids)."""

    def __init__(self, root: int):
        self.ours, self.foreign = {root}, set()

    def poll(self) -> dict[int, tuple[int, float, str]]:
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in self.foreign and (s := _stat(int(name))):
                stats[int(name)] = s
        grew = True
        while grew:  # a grandchild may be listed before its parent
            new = {pid for pid, (ppid, _, _) in stats.items()
                   if pid not in self.ours and ppid in self.ours}
            self.ours |= new
            grew = bool(new)
        self.foreign |= stats.keys() - self.ours
        return {pid: (ppid, cpu, _name(pid, comm)) for pid, (ppid, cpu, comm) in stats.items()
                if pid in self.ours}


def measured(tree: ProcessTree, run):
    """``run()``'s value and the CPU of ``tree`` and of this process (less the poller
    thread's) over its wall time."""
    first = tree.poll()
    last = dict(first)
    stop, poller_cpu = threading.Event(), []

    def poll():
        t = time.thread_time()
        while not stop.wait(POLL_S):
            last.update(tree.poll())
        poller_cpu.append(time.thread_time() - t)
    poller = threading.Thread(target=poll, daemon=True)
    c0, t0 = time.process_time(), time.perf_counter()
    poller.start()
    try:
        value = run()
    finally:
        stop.set()
        poller.join()
    wall = time.perf_counter() - t0
    client = time.process_time() - c0 - poller_cpu[0]
    last.update(tree.poll())
    procs = []
    for pid, (ppid, cpu, name) in sorted(last.items()):
        used = cpu - first.get(pid, (0, 0.0))[1]  # born during the run: all of it
        procs.append({"pid": pid, "ppid": ppid, "name": name, "cpu_s": round(used, 3),
                      "cpu_pct": round(used / wall * 100, 1)})
    server = sum(p["cpu_s"] for p in procs)
    return value, {"wall_s": round(wall, 3), "server_cpu_s": round(server, 3),
                   "server_cpu_pct": round(server / wall * 100, 1),
                   "client_cpu_s": round(client, 3),
                   "client_cpu_pct": round(client / wall * 100, 1), "processes": procs}


# --- 2. the requests ------------------------------------------------------------------------

async def _aiohttp_run(base_url: str, args, body, stream: bool = False) -> tuple[int, float]:
    """(completion tokens, seconds) of ``args.requests`` requests at ``args.concurrency``
    through aiohttp, ``body(i, model)`` the JSON of request ``i`` (bench.hostpath's lean
    client, for bodies of our own); a stream is read line by line and only its last chunk
    (the usage) is parsed."""
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency),
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.get(base_url + "/models") as r:
            model = (await r.json())["data"][0]["id"]

        async def send(i: int) -> int:
            async with http.post(base_url + "/chat/completions", json=body(i, model)) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:500]!r}")
                if not stream:
                    return json.loads(await r.read())["usage"]["completion_tokens"]
                last = b""
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        last = line
                usage = json.loads(last[6:]).get("usage")
                if not usage:
                    raise RuntimeError(f"the stream ended without usage: {last[:500]!r}")
                return usage["completion_tokens"]
        return await _drive(args, send)


def _stream_body(mode: str):
    def body(i: int, model: str) -> dict:  # bench.hostpath's aiohttp body, streamed
        kw = MODES[mode](i)
        return {"model": model, "max_tokens": 64, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, **kw.pop("extra_body", {}), **kw,
                "messages": _messages(i)}
    return body


def _photo_body(urls: list[str]):
    def body(i: int, model: str) -> dict:
        return {"model": model, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": urls[i]}},
                    {"type": "text", "text": f"Is parcel {i} damaged?"}]}]}
    return body


async def run_cell(cell: str, url: str, args, photos: list[str]) -> float:
    """The cell's figure: tok/s, requests/s or (photos) the burst's seconds."""
    def load(**kw):
        return argparse.Namespace(**{"concurrency": 64, "max_tokens": 64,
                                     "requests": args.requests or 1024, **kw})
    if cell == "short":
        n = args.requests or 512
        _, s = await run_mode(url, "greedy", load(client="aiohttp", max_tokens=8, requests=n))
        return n / s
    if cell == "photos":
        n = len(photos)
        _, s = await _aiohttp_run(url, load(requests=n, concurrency=n), _photo_body(photos))
        return s
    client, _, mode = cell.rpartition(" ")
    if client == "stream":
        tokens, s = await _aiohttp_run(url, load(), _stream_body(mode), stream=True)
    else:
        tokens, s = await run_mode(url, mode, load(client="sdk" if client else "aiohttp"))
    return tokens / s


# --- 3. the table ---------------------------------------------------------------------------

def ratios(res: dict, cells: list[str]) -> dict[str, dict]:
    """Best over best, and the median of the ratios within each round."""
    def pair(a: dict, b: dict) -> dict:
        best = a["best"] / b["best"]
        per_round = [x["value"] / y["value"] for x, y in zip(a["rounds"], b["rounds"])]
        return {"best": round(best, 3), "median_of_rounds": round(statistics.median(per_round), 3)}
    out = {}
    for cell in cells:
        if cell.endswith("logprobs") and cell.replace("logprobs", "greedy") in cells:
            for label, r in res.items():
                name = f"{cell}/{cell.replace('logprobs', 'greedy')}"
                out[f"{label} {name}"] = {**pair(r[cell], r[cell.replace("logprobs", "greedy")]),
                                          "target": TARGETS.get(name)}
        if "before" in res:
            name = f"{cell} after/before"
            out[name] = {**pair(res["after"][cell], res["before"][cell]),
                         "target": TARGETS.get(name)}
    return out


def _cpu(r: dict) -> tuple[str, str]:
    """(server, client) CPU of a run: CPU-seconds (% of one core)."""
    return (f"{r['server_cpu_s']:.2f} s ({r['server_cpu_pct']:.0f}%)",
            f"{r['client_cpu_s']:.2f} s ({r['client_cpu_pct']:.0f}%)")


def print_report(res: dict, cells: list[str], rat: dict):
    labels = list(res)
    print("\n| cell | " + " | ".join(f"{lb} | server CPU | client CPU" for lb in labels)
          + " |\n|---|" + "---:|---:|---:|" * len(labels))
    for cell in cells:
        row = [f"{res[lb][cell]['best']:.2f} {CELLS[cell][1]} | "
               + " | ".join(_cpu(_best(res[lb][cell]))) for lb in labels]
        print(f"| {cell} | " + " | ".join(row) + " |")
    print()
    for name, r in rat.items():
        target = f"; target {r['target']}x" if r["target"] else ""
        print(f"{name}: {r['best']:.2f}x (median of rounds {r['median_of_rounds']:.2f}x{target})")
    for lb in labels:  # one row per process, one column per cell (its best round)
        print(f"\n{lb}: CPU-s (% of one core) per process, in the best round of each cell")
        rows: dict[tuple, dict] = {}
        for cell in cells:
            at = _best(res[lb][cell])
            for p in at["processes"]:
                rows.setdefault((p["pid"], p["ppid"], p["name"]), {})[cell] = \
                    f"{p['cpu_s']:.2f} ({p['cpu_pct']:.0f}%)"
            rows.setdefault(("", "", "client (this process)"), {})[cell] = _cpu(at)[1]
        print(f"{'pid':>7} {'ppid':>7} {'command line':60} " + " ".join(f"{c:>15}" for c in cells))
        for (pid, ppid, name), v in rows.items():
            print(f"{pid:>7} {ppid:>7} {name:60} "
                  + " ".join(f"{v.get(c, '-'):>15}" for c in cells))


def _best(r: dict) -> dict:
    return r["rounds"][r["best_round"]]


# --- 4. the run -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--before", default=None, help="another checkout, measured side by side")
    p.add_argument("--after-flags", default="",
                   help="extra server flags for this checkout (one flag: --after-flags=--x)")
    p.add_argument("--before-flags", default="", help="extra server flags for --before")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per run (default 1024; 512 for short)")
    p.add_argument("--photos", type=int, default=32, help="photo requests per burst")
    p.add_argument("--rounds", type=int, default=3, help="best of this many runs per cell")
    p.add_argument("--only", default="greedy,logprobs,stream,short,photos,sdk",
                   help="comma list of: greedy,logprobs,stream,short,photos,sdk")
    p.add_argument("--out", default="bench/results/processes.json")
    args = p.parse_args(argv)
    groups = set(args.only.split(","))
    unknown = groups - {g for g, _ in CELLS.values()}
    if unknown:
        p.error(f"unknown --only items: {sorted(unknown)}")
    cells = [c for c, (g, _) in CELLS.items() if g in groups]

    sides = {"after": (ROOT, args.after_flags)}
    if args.before:
        sides["before"] = (Path(args.before).resolve(), args.before_flags)
    servers = {}
    try:
        for label, (root, flags) in sides.items():
            proc, url = start_server(args.model_path, "batching", SMALL_IMAGES + flags.split(),
                                     root=root)
            servers[label] = (proc, url, ProcessTree(proc.pid))
        for k, (_, url, _) in enumerate(servers.values()):  # warm-up: text, then a photo
            asyncio.run(run_cell("short", url, argparse.Namespace(requests=8), []))
            if "photos" in cells:
                asyncio.run(run_cell("photos", url, args, [photo_url(10**6 + k, PHOTO_SIDE)]))
        res = {label: {c: {"rounds": []} for c in cells} for label in servers}
        for rnd in range(args.rounds):
            photos = ([photo_url(rnd * 10_000 + i, PHOTO_SIDE) for i in range(args.photos)]
                      if "photos" in cells else [])
            for cell in cells:
                for label, (_, url, tree) in servers.items():
                    value, cpu = measured(
                        tree, lambda: asyncio.run(run_cell(cell, url, args, photos)))
                    res[label][cell]["rounds"].append({"value": round(value, 3), **cpu})
                    server, client = _cpu(cpu)
                    print(f"  round {rnd} {label:>6} {cell:>15}: {value:9.2f} {CELLS[cell][1]:5}"
                          f"  server CPU {server:>15}, client CPU {client:>14}", flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    for per in res.values():
        for cell, r in per.items():
            values = [x["value"] for x in r["rounds"]]
            best = min(values) if CELLS[cell][1] == "s" else max(values)
            r.update(unit=CELLS[cell][1], best=best, best_round=values.index(best))
    rat = ratios(res, cells)
    print_report(res, cells, rat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model_path, "photos": args.photos,
        "requests": {"decode": args.requests or 1024, "short": args.requests or 512},
        "rounds": args.rounds,
        "servers": {lb: {"root": str(root), "flags": SMALL_IMAGES + flags.split()}
                    for lb, (root, flags) in sides.items()},
        "cells": res, "ratios": rat}, indent=1))
    return res


if __name__ == "__main__":
    main()
