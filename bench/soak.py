"""Soak: many people using the web chat's HTTP API for minutes, and nothing lost.

The bot runs in a process of its own (the web chat on 127.0.0.1, SQLite, and a backend
that answers at once, so the load is on attune itself: HTTP, the agent's pipeline,
storage, the style policy). N simulated people each keep one request in flight: a
message, and now and then a reaction on a reply or a command. Afterwards the database
is read directly: every message sent must be stored once with exactly one reply.

    python -m bench.soak [--users 20] [--minutes 2] [--window 10] [--json OUT]

The table gives, per window of ``--window`` seconds, requests/s and p50/p99 latency of
messages; then errors, lost or duplicated messages, and the bot's resident memory at
the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):  # run as a file: python bench/soak.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report

SERVER = """
import asyncio, sys
from agent_core.agent import Agent
from attune.wiring import load_config
from attune.wiring import setup_logging
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.web import WebConnector

async def main() -> None:
    setup_logging("WARNING")
    config = load_config(sys.argv[1], environ={})
    agent = await open_agent(config, llm=RecordingBackend(record=False))
    web = WebConnector(agent, config)
    await web.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Person:
    """One simulated browser: its own cookies and CSRF token, one request at a time."""

    def __init__(self, index: int, url: str, rng: random.Random) -> None:
        self.index, self.url, self.rng = index, url, rng
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""
        self.sent: list[str] = []  # texts of messages answered
        self.last_reply: int | None = None

    async def start(self) -> None:
        async with self.http.get(f"{self.url}/api/session") as response:
            self.csrf = (await response.json())["csrf"]

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"X-CSRF-Token": self.csrf}
        async with self.http.post(f"{self.url}{path}", json=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            return dict(await response.json())

    async def act(self, n: int) -> tuple[str, float]:
        """One action; (kind, seconds it took)."""
        started = time.perf_counter()
        roll = self.rng.random()
        if roll < 0.15 and self.last_reply is not None:
            await self.post("/api/reactions", {"message_id": str(self.last_reply), "emoji": self.rng.choice("👍👎")})
            return "reaction", time.perf_counter() - started
        if roll < 0.2:
            await self.post("/api/commands", {"text": self.rng.choice(["/stats", "/prefs", "/help"])})
            return "command", time.perf_counter() - started
        text = f"soak person {self.index} message {n}: how are you today?"
        reply = (await self.post("/api/messages", {"text": text}))["reply"]
        if reply["kind"] != "answer":
            raise RuntimeError(f"message answered with {reply['kind']}: {reply['text']}")
        self.sent.append(text)
        self.last_reply = reply["id"]
        return "message", time.perf_counter() - started


async def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    port = free_port()
    config = folder / "attune.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{folder / "data"}"\n[web]\nport = {port}\n'
        "[limits]\nmessages_per_minute = 1000000\nglobal_messages_per_minute = 0\n"
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, str(config), stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    assert server.stdout is not None
    await asyncio.wait_for(server.stdout.readline(), timeout=120)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(args.seed)
    people = [Person(i, url, random.Random(rng.random())) for i in range(args.users)]
    for person in people:
        await person.start()
    rss_start = rss_mib(server.pid)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    events: list[tuple[float, str, float]] = []  # (time since start, kind, latency)
    errors: list[str] = []

    async def run(person: Person) -> None:
        n = 0
        while time.monotonic() < deadline:
            try:
                kind, latency = await person.act(n)
                events.append((time.monotonic() - started, kind, latency))
            except Exception as exc:
                errors.append(f"person {person.index}: {exc}")
            n += 1

    await asyncio.gather(*(run(p) for p in people))
    elapsed = time.monotonic() - started
    rss_end = rss_mib(server.pid)
    for person in people:
        await person.http.close()
    server.terminate()
    await server.wait()

    with sqlite3.connect(folder / "data" / "attune.db") as db:
        stored = dict(db.execute("SELECT text, COUNT(*) FROM messages WHERE role = 'user' GROUP BY text").fetchall())
        unanswered = db.execute(
            "SELECT COUNT(*) FROM messages m LEFT JOIN (SELECT reply_to, COUNT(*) AS n FROM messages"
            " WHERE role = 'assistant' GROUP BY reply_to) r ON r.reply_to = m.id"
            " WHERE m.role = 'user' AND IFNULL(r.n, 0) != 1"
        ).fetchone()[0]
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    sent = [text for p in people for text in p.sent]
    windows = []
    for start in range(0, int(elapsed) + 1, args.window):
        inside = [e for e in events if start <= e[0] < start + args.window]
        span = min(args.window, elapsed - start)
        if not inside or span < args.window / 2:  # a last sliver of a window says little
            continue
        latencies = sorted(e[2] for e in inside if e[1] == "message")
        windows.append(
            {
                "from_s": start,
                "requests_per_s": len(inside) / span,
                "messages_per_s": len(latencies) / span,
                "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
                "p99_ms": latencies[max(0, int(0.99 * len(latencies)) - 1)] * 1000 if latencies else None,
            }
        )
    return {
        "elapsed_s": elapsed,
        "requests": len(events),
        "messages_sent": len(sent),
        "errors": len(errors),
        "error_examples": errors[:5],
        "lost": sum(1 for text in sent if text not in stored),
        "duplicated": sum(1 for text in sent if stored.get(text, 0) > 1),
        "without_exactly_one_reply": int(unanswered),
        "integrity": integrity,
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "windows": windows,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=10, help="seconds per row of the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = await soak(args, Path(folder))
    rows = [
        [w["from_s"], w["requests_per_s"], w["messages_per_s"], w["p50_ms"], w["p99_ms"]] for w in result["windows"]
    ]
    print(f"\nsoak: {args.users} people, {args.minutes:g} min, web chat API, instant backend, {os.cpu_count()} cores")
    print(report.table(["from s", "requests/s", "messages/s", "p50 ms", "p99 ms"], rows))
    print(
        f"requests {result['requests']}, messages {result['messages_sent']}, errors {result['errors']}, "
        f"lost {result['lost']}, duplicated {result['duplicated']}, "
        f"without exactly one reply {result['without_exactly_one_reply']}, integrity {result['integrity']}"
    )
    start, end = result["rss_start_mib"], result["rss_end_mib"]
    print(f"bot resident memory: {start:.0f} MiB at the start, {end:.0f} MiB at the end")
    for example in result["error_examples"]:
        print("error:", example)
    path = report.save("soak", {"params": vars(args), **result})
    print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
