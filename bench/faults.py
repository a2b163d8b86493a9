"""Faults of the world under load: the database server restarts or goes away for a few
seconds, the disk fills, the model server goes away, while people keep writing through
the web chat's HTTP API. The bot is a real ``attune run`` in a process of its own.

    python -m bench.faults [--users 6] [--outage-s 5] [--json OUT]

- ``db_restart``: ``pg_ctl restart -m fast`` on the bot's PostgreSQL server;
- ``db_outage``: that server stopped for ``--outage-s`` seconds, then started;
- ``llm_gone``: the OpenAI-compatible model server (a fake on 127.0.0.1) gone for
  ``--outage-s`` seconds, then back on the same port;
- ``disk_full``: the bot on SQLite in a 24 MB tmpfs that a file fills, deleted after
  ``--outage-s`` seconds (needs root, for the mount; the bench enters a mount namespace
  of its own).

Per fault: messages sent and answered during it; ``lost`` (answered, but not stored with
that answer); ``recover_s`` (from the component's return to the first answer to a
message sent after it); ``quiet_refusals`` (messages not answered among those sent in the
10 s window starting 10 s after the return); ``http_5xx``; ``saved`` (messages stored but
not answered at once: the "I'll answer as soon as I can" apology) and ``saved_answered``
(of those, answered later, read from the database at the end); and the bot's log lines
about the database going and coming back, and tracebacks.

Goal: 0 lost, recovery within 10 s of each return, 0 quiet refusals, 0 5xx, and every
saved message answered once the model is back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

if __package__ in (None, ""):  # run as a file: python bench/faults.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from storage.local_postgres import LocalPostgres, free_port
from tests.fakes.openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
ATTUNE = str(Path(sys.executable).parent / "attune")
ANSWER = "Here is what I think."
QUIET_AFTER_S = 10.0  # the quiet window starts this long after the component's return
QUIET_FOR_S = 10.0
IN_NAMESPACE = "ATTUNE_BENCH_FAULTS_NS"


@dataclass
class Sent:
    at: float
    text: str
    status: int
    kind: str = ""
    reply: str = ""
    deferred: bool = False


@dataclass
class Load:
    """``users`` people, each with one message in flight, one every ``pause_s``."""

    url: str
    users: int
    pause_s: float = 0.2
    sent: list[Sent] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _count: int = 0

    async def start(self, tag: str) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._person(f"{tag}-{i}")) for i in range(self.users)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _person(self, name: str) -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            csrf = ""
            while not csrf and not self._stop.is_set():
                with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                    csrf = (await (await http.get(f"{self.url}/api/session")).json())["csrf"]
            while not self._stop.is_set():
                self._count += 1
                text = f"{name} asks question {self._count}: what should I read next?"
                at = time.monotonic()
                try:
                    async with http.post(f"{self.url}/api/messages", json={"text": text},
                                         headers={"X-CSRF-Token": csrf}) as answer:  # fmt: skip
                        body = await answer.json() if answer.content_type == "application/json" else {}
                        reply = body.get("reply") or {}
                        self.sent.append(Sent(at, text, answer.status, str(reply.get("kind", "")),
                                              str(reply.get("text", "")), bool(reply.get("deferred"))))  # fmt: skip
                except aiohttp.ClientError as exc:
                    self.sent.append(Sent(at, text, 0, "connection", str(exc)))
                await asyncio.sleep(self.pause_s)


class Bot:
    """``attune run`` on a config of its own: the web chat on ``port``; its log in a file."""

    def __init__(self, folder: Path, storage: str, llm_url: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.log = folder / "attune.log"
        self.config = folder / "attune.toml"
        self.config.write_text(
            f'[storage]\ndata_dir = "{folder / "data"}"\n{storage}'
            f'[llm]\nbackend = "openai"\ntimeout_s = 10\n[llm.openai]\nbase_url = "{llm_url}"\nmax_retries = 0\n'
            f"[web]\nport = {self.port}\n[training]\nenabled = false\n"
            "[limits]\nmessages_per_minute = 1000000\nglobal_messages_per_minute = 0\n",
            encoding="utf-8",
        )
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                ATTUNE, "--config", str(self.config), "run", stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=log, env=env, cwd=self.folder,
            )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(f"{self.url}/healthz")).status in (200, 503):
                        return
                await asyncio.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"attune run did not start (exit {self.proc.returncode}):\n{tail}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), timeout=60)

    def log_counts(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return {
            "went_away": text.count(" went away ("),
            "back": text.count(" is back after "),
            "tracebacks": text.count("Traceback (most recent call last)"),
        }


def _replies(rows: list[tuple[Any, ...]]) -> dict[str, list[str]]:
    """user text -> the texts of its stored replies."""
    replies: dict[str, list[str]] = {}
    for text, reply in rows:
        replies.setdefault(str(text), [])
        if reply is not None:
            replies[str(text)].append(str(reply))
    return replies


_REPLIES_SQL = (
    "SELECT m.text, r.text FROM messages m LEFT JOIN messages r ON r.reply_to = m.id AND r.role = 'assistant'"
    " WHERE m.role = 'user'"
)


def stored_postgres(url: str) -> dict[str, list[str]]:
    with psycopg.connect(url) as conn:
        return _replies([tuple(r) for r in conn.execute(_REPLIES_SQL)])  # type: ignore[arg-type]


def stored_sqlite(path: Path) -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return _replies(conn.execute(_REPLIES_SQL).fetchall())


def measure(name: str, sent: list[Sent], began: float, returned: float, stored: dict[str, list[str]],
            logs: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """One row of the table, from the messages sent between ``began`` - 2 s and the end."""
    window = [s for s in sent if s.at >= began - 2.0]
    answered = [s for s in window if s.kind == "answer"]
    after = sorted(s.at for s in answered if s.at >= returned)
    quiet = [s for s in window if returned + QUIET_AFTER_S <= s.at < returned + QUIET_AFTER_S + QUIET_FOR_S]
    saved = [s for s in window if s.deferred]
    return {
        "fault": name,
        "sent": len(window),
        "answered": len(answered),
        "lost": sum(1 for s in answered if s.reply not in stored.get(s.text, [])),
        "stored_twice": sum(1 for s in window if len(stored.get(s.text, [])) > 1),
        "recover_s": round(after[0] - returned, 2) if after else None,
        "quiet_sent": len(quiet),
        "quiet_refusals": sum(1 for s in quiet if s.kind != "answer"),
        "http_5xx": sum(1 for s in window if s.status >= 500),
        "refused": sum(1 for s in window if s.kind != "answer"),
        "saved": len(saved),
        "saved_answered": sum(1 for s in saved if stored.get(s.text)),
        **logs,
    }


async def _fault(bot: Bot, users: int, tag: str, break_it: Any, mend_it: Any, outage_s: float,
                 stored: Any) -> dict[str, Any]:  # fmt: skip
    """Load for 3 s, the fault (``break_it``), ``outage_s`` seconds, its mending, then the
    quiet window; then the saved messages get time to be answered. One row of the table."""
    load = Load(bot.url, users)
    logs_before = bot.log_counts()
    await load.start(tag)
    await asyncio.sleep(3.0)
    began = time.monotonic()
    await break_it()
    await asyncio.sleep(outage_s)
    await mend_it()
    returned = time.monotonic()
    await asyncio.sleep(QUIET_AFTER_S + QUIET_FOR_S)
    await load.stop()
    await _settle_saved(load, stored)
    return measure(tag, load.sent, began, returned, await asyncio.to_thread(stored), _diff(bot.log_counts(),
                                                                                           logs_before))  # fmt: skip


async def postgres_and_llm_faults(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    with LocalPostgres(durable=True) as server:
        url = server.create_database("attune_faults")
        llm_port = free_port()
        model = {"server": FakeOpenAI(reply=ANSWER, port=llm_port)}
        await model["server"].__aenter__()
        folder.mkdir(parents=True, exist_ok=True)
        bot = Bot(folder, f'url = "{url}"\n', model["server"].base_url)
        await bot.start()

        async def halt() -> None:
            await asyncio.to_thread(server.halt)

        async def resume() -> None:
            await asyncio.to_thread(server.resume)

        async def llm_away() -> None:
            await model["server"].__aexit__(None, None, None)

        async def llm_back() -> None:
            model["server"] = FakeOpenAI(reply=ANSWER, port=llm_port)
            await model["server"].__aenter__()

        def stored() -> dict[str, list[str]]:
            return stored_postgres(url)

        try:
            return [
                await _fault(bot, args.users, "db_restart", halt, resume, 0.0, stored),  # pg_ctl restart -m fast
                await _fault(bot, args.users, "db_outage", halt, resume, args.outage_s, stored),
                await _fault(bot, args.users, "llm_gone", llm_away, llm_back, args.outage_s, stored),
            ]
        finally:
            await bot.stop()
            await model["server"].__aexit__(None, None, None)


async def _settle_saved(load: Load, read: Any, timeout_s: float = 60.0) -> None:
    """Wait until every saved message has its late answer in the database (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = await asyncio.to_thread(read)
        if all(stored.get(s.text) for s in load.sent if s.deferred):
            return
        await asyncio.sleep(0.5)


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


async def disk_full_fault(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(data)], check=True)
    filler = data / "filler"

    async def fill() -> None:
        await asyncio.to_thread(fill_disk, filler)

    async def free() -> None:
        filler.unlink()

    def stored() -> dict[str, list[str]]:
        return stored_sqlite(data / "attune.db")

    try:
        async with FakeOpenAI(reply=ANSWER) as model:
            bot = Bot(folder, "", model.base_url)
            await bot.start()
            try:
                row = await _fault(bot, args.users, "disk_full", fill, free, args.outage_s, stored)
            finally:
                await bot.stop()
        with contextlib.closing(sqlite3.connect(data / "attune.db")) as conn:
            row["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return row
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def fill_disk(path: Path) -> None:
    """Write ``path`` until its disk is full (down to the last byte)."""
    with path.open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="attune-faults-") as tmp:
        os.chmod(tmp, 0o755)
        rows += await postgres_and_llm_faults(args, Path(tmp) / "pg")
        if os.geteuid() == 0 and os.environ.get(IN_NAMESPACE):
            rows.append(await disk_full_fault(args, Path(tmp) / "disk"))
        else:
            print("disk_full: skipped (needs root, for a tmpfs mount)", file=sys.stderr)
    return {"users": args.users, "outage_s": args.outage_s, "faults": rows}


GOALS = "goal: lost 0, recover_s <= 10, quiet_refusals 0, http_5xx 0, saved_answered == saved"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--outage-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() == 0 and not os.environ.get(IN_NAMESPACE):  # a mount namespace of our own, for the tmpfs
        os.environ[IN_NAMESPACE] = "1"
        os.execvp("unshare", ["unshare", "-m", sys.executable, "-m", "bench.faults", *sys.argv[1:]])
    results = asyncio.run(run(args))
    headers = ["fault", "sent", "answered", "lost", "stored_twice", "recover_s", "quiet_refusals", "http_5xx",
               "refused", "saved", "saved_answered", "went_away", "back", "tracebacks"]  # fmt: skip
    print(report.table(headers, [[row.get(h) for h in headers] for row in results["faults"]]))
    print(GOALS)
    ok = all(
        r["lost"] == 0 and r["recover_s"] is not None and r["recover_s"] <= 10 and r["quiet_refusals"] == 0
        and r["http_5xx"] == 0 and r["saved_answered"] == r["saved"]
        for r in results["faults"]
    )  # fmt: skip
    results["goals_met"] = ok
    print("goals met" if ok else "GOALS NOT MET")
    path = report.save("faults", results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
