"""How long `attune run` takes to a web chat that answers: from a fresh data directory, then from its cache.

    python -m bench.startup [--runs 1] [--json OUT]

Each start is the real command (`attune run`, the local model, SQLite, the web chat on a
free port) with a data directory of its own. The clock starts when the process is spawned:

- ``session``: until ``GET /api/session`` answers (what the issue's goal is on);
- ``reply``: until the first message (``POST /api/messages``) has its reply, which on a
  first start may wait for the model to load.

The first start of a fresh directory converts the model and builds what it builds; the
second start of the same directory loads it all from the cache. The first is left
running until its background build of the compiled gemv is done (as a bot that has run
a minute would have), so the second finds it. Results:
bench/results/startup.json (``first_start_s``, ``cached_start_s`` and the reply times).

Goal: first start in at most 30 s, a start from the cache in at most 5 s, for the page
("page met") and for the first reply ("reply met", issue 34's goal). After the table,
``cached_phases_s``: where the cached start's seconds went, read from its log (until the
web chat listens; the model's loading by the parts its "local model ready" line names:
imports and tokenizer, weights, quantized blocks and vocabulary, decoder and kernel
choice; the first reply once the model was ready). The phases overlap where the model
loads while the web chat starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench import report

ATTUNE = str(Path(sys.executable).with_name("attune"))
GOAL_FIRST_S, GOAL_CACHED_S = 30.0, 5.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}


async def one_start(data_dir: Path, timeout: float, *, settle: bool = False) -> dict[str, float]:
    """Start `attune run` on ``data_dir``; seconds until the session answers and until a
    reply. ``settle``: then keep it running until the compiled gemv is built and chosen."""
    config = data_dir / "attune.toml"
    config.write_text(f'[storage]\ndata_dir = "{data_dir / "data"}"\n[web]\nport = 0\n[training]\nenabled = false\n',
                      encoding="utf-8")  # fmt: skip
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "run", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=_env(), cwd=data_dir,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[str] = []
    at: list[float] = []  # when each line of the log arrived, in seconds since the spawn
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(timeout):
            url = None
            while url is None:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError("attune run ended before serving:\n" + "".join(log[-20:]))
                log.append(line)
                at.append(time.perf_counter() - started)
                if found := re.search(r"web chat on (http://127\.0\.0\.1:\d+)", line):
                    url = found.group(1)
            drain = asyncio.create_task(_drain(proc.stderr, log, at, started))
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                session = await _until_ok(http, f"{url}/api/session")
                session_s = time.perf_counter() - started
                answer = await http.post(f"{url}/api/messages", json={"text": "hello, what can you do?"},
                                         headers={"X-CSRF-Token": session["csrf"]})  # fmt: skip
                reply = (await answer.json())["reply"]
                if reply.get("kind") != "answer":
                    raise RuntimeError(f"the first message got no answer: {reply}")
                reply_s = time.perf_counter() - started
            if settle:  # left running until its background work is done, as a bot that runs a while would be
                while not any("decoding matmuls:" in line and "still building" not in line for line in log):
                    await asyncio.sleep(0.2)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout=60)
    if drain is not None:
        drain.cancel()
    return {"session_s": session_s, "reply_s": reply_s, "phases": phases(log, at, reply_s)}


async def _drain(stream: asyncio.StreamReader, log: list[str], at: list[float], started: float) -> None:
    async for line in stream:
        log.append(line.decode(errors="replace"))
        at.append(time.perf_counter() - started)


def phases(log: list[str], at: list[float], reply_s: float) -> dict[str, float]:
    """Where a start's seconds went, read from its log: until the web chat listens
    (imports, config, database); until the model starts loading; the model's loading,
    by the parts the backend's "local model ready" line names (imports and tokenizer,
    weights, quantized blocks and vocabulary, decoder and kernel choice); then the first
    reply once the model was ready (its prompt read in and its tokens decoded)."""

    def first(marker: str) -> float | None:
        return next((t for line, t in zip(log, at, strict=True) if marker in line), None)

    out: dict[str, float] = {}
    web, loading, ready = first("web chat on"), first("a reply waits for the model"), first("local model ready")
    if web is not None:
        out["imports, config and database (until the web chat listens)"] = web
    ready_line = next((line for line in log if "local model ready" in line), "")
    if found := re.search(r"loaded in ([\d.]+) s \((.*)\)", ready_line):
        if ready is not None:
            out["before the model's loading"] = max(0.0, ready - float(found.group(1)) - (web or 0.0))
        for part in found.group(2).split(", "):  # "weights 1.2 s"
            name, value = part.removesuffix(" s").rsplit(" ", 1)
            out[f"model: {name}"] = float(value)
    if ready is not None:
        out["first reply after the model was ready"] = max(0.0, reply_s - max(ready, loading or 0.0))
    return out


async def _until_ok(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    while True:
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return dict(await response.json())
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)


async def measure(runs: int, timeout: float) -> dict[str, Any]:
    first, cached = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="attune-startup-") as scratch:
            first.append(await one_start(Path(scratch), timeout, settle=True))
            cached.append(await one_start(Path(scratch), timeout))
    return {
        "cached_phases_s": cached[len(cached) // 2]["phases"],
        "first_start_s": median(r["session_s"] for r in first),
        "cached_start_s": median(r["session_s"] for r in cached),
        "first_reply_s": median(r["reply_s"] for r in first),
        "cached_reply_s": median(r["reply_s"] for r in cached),
        "runs": {"first": first, "cached": cached},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="fresh directories to start (the median is reported)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one start may take")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args.runs, args.timeout))
    cpu = report.machine()["cpu"]
    print(f"attune run to a web chat that answers, on {cpu} ({os.cpu_count()} cores), median of {args.runs}")
    print(report.table(
        ["start", "GET /api/session answers (s)", "first reply (s)", "goal (s)", "page met", "reply met"],
        [["fresh data directory", results["first_start_s"], results["first_reply_s"], GOAL_FIRST_S,
          "yes" if results["first_start_s"] <= GOAL_FIRST_S else "no",
          "yes" if results["first_reply_s"] <= GOAL_FIRST_S else "no"],
         ["from the cache", results["cached_start_s"], results["cached_reply_s"], GOAL_CACHED_S,
          "yes" if results["cached_start_s"] <= GOAL_CACHED_S else "no",
          "yes" if results["cached_reply_s"] <= GOAL_CACHED_S else "no"]],
    ))  # fmt: skip
    print("where the cached start's seconds went (from its log):")
    print(report.table(["phase", "s"], [[name, seconds] for name, seconds in results["cached_phases_s"].items()]))
    path = report.save("startup", results)
    if args.json:
        Path(args.json).write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
