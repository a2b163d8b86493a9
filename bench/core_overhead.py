"""The core's own cost per message: storage, memory recall, prompt assembly.

1,000 simulated users (by default) talk to a real Agent on a real SQLite database
through a backend that answers instantly, so what is measured is attune, not a model.
Beside it, in the same run, the plain insert rate of the same database set-up (one
INSERT and commit per message, through aiosqlite) as the ceiling, and the same
sequential run with encryption at rest on (ATTUNE_ENCRYPTION_KEY), as a ratio to it.

    python bench/core_overhead.py [--users 1000] [--messages 5] [--concurrency 32]

Goal (issue 2): p99 under 5 ms and at least 1,000 messages/s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/core_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.events import Message
from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent
from bench import report
from storage import SqliteDatabase
from storage.crypto import Key

# fmt: off
WORDS = [
    "what", "how", "why", "when", "could", "you", "tell", "me", "about", "the", "weather", "recipe", "cat",
    "dog", "train", "music", "book", "film", "plan", "trip", "python", "code", "bug", "garden", "coffee",
    "tea", "run", "sleep", "work", "email", "meeting", "idea",
]
# fmt: on


def sentence(rng: random.Random, n: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def insert_ceiling(path: Path, count: int) -> float:
    """Messages/s for one INSERT + commit each, same pragmas as attune's database."""
    db = await SqliteDatabase.open(path)
    await db.execute("INSERT INTO users (name, created_at) VALUES ('u', 0)")
    await db.execute("INSERT INTO chats (platform, platform_chat_id, kind, created_at) VALUES ('b', 'c', 'private', 0)")
    started = time.perf_counter()
    for i in range(count):
        await db.execute(
            "INSERT INTO messages (chat_id, user_id, role, text, created_at) VALUES (1, 1, 'user', ?, ?)",
            (f"message {i}", time.time()),
        )
    rate = count / (time.perf_counter() - started)
    await db.close()
    return rate


async def run_agent(
    path: Path,
    users: int,
    messages: int,
    concurrency: int,
    seed: int,
    *,
    encrypted: bool = False,
    environ: dict[str, str] | None = None,
    first_user: int = 0,
) -> dict[str, float]:
    """``users`` users (numbered from ``first_user``) send ``messages`` messages each
    through a real Agent; its rate and latencies. ``environ``: more settings (a database URL)."""
    environ = {"ATTUNE_STORAGE__DATA_DIR": str(path), "ATTUNE_LIMITS__MESSAGES_PER_MINUTE": "100000",
               "ATTUNE_LIMITS__GLOBAL_MESSAGES_PER_MINUTE": "0", **(environ or {})}  # fmt: skip
    if encrypted:
        environ["ATTUNE_ENCRYPTION_KEY"] = Key.generate()
    config = load_config(environ=environ)
    agent = await open_agent(config, llm=RecordingBackend(context_window=2048, record=False))
    rng = random.Random(seed)
    # Each user arrives with a few notes, so recall has something to search.
    numbers = range(first_user, first_user + users)
    for u in numbers:
        user_id = await agent.store.resolve_user("bench", f"user{u}", f"User {u}")
        for _ in range(3):
            await agent.store.add_memory(user_id, sentence(rng, 6))
    events = [  # each with a platform event id, as real platforms send
        Message(
            platform="bench", chat_id=f"chat{u}", sender_id=f"user{u}", sender_name=f"User {u}",
            text=sentence(rng), event_id=f"event-{u}-{i}",
        )
        for i in range(messages)
        for u in numbers
    ]  # fmt: skip
    latencies: list[float] = []
    queue: asyncio.Queue[Message] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def worker() -> None:
        while not queue.empty():
            event = queue.get_nowait()
            t0 = time.perf_counter()
            reply = await agent.handle_message(event)
            latencies.append(time.perf_counter() - t0)
            assert reply is not None and reply.kind == "answer"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await agent.close()
    ordered = sorted(latencies)
    return {
        "messages": len(latencies),
        "messages_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5, help="messages per user")
    parser.add_argument("--concurrency", type=int, default=32, help="messages in flight in the concurrent run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        total = args.users * args.messages
        ceiling = await insert_ceiling(Path(tmp) / "ceiling" / "ceiling.db", total)
        sequential = await run_agent(Path(tmp) / "seq", args.users, args.messages, 1, args.seed)
        sealed = await run_agent(Path(tmp) / "sealed", args.users, args.messages, 1, args.seed, encrypted=True)
        concurrent = await run_agent(Path(tmp) / "conc", args.users, args.messages, args.concurrency, args.seed)

    rows = [
        ["plain SQLite insert + commit (ceiling)", ceiling, "", "", 1.0],
        ["Agent.handle_message, 1 in flight", sequential["messages_per_s"], sequential["p50_ms"],
         sequential["p99_ms"], sequential["messages_per_s"] / ceiling],
        [f"Agent.handle_message, {args.concurrency} in flight", concurrent["messages_per_s"], concurrent["p50_ms"],
         concurrent["p99_ms"], concurrent["messages_per_s"] / ceiling],
        ["Agent.handle_message, 1 in flight, encrypted", sealed["messages_per_s"], sealed["p50_ms"],
         sealed["p99_ms"], sealed["messages_per_s"] / ceiling],
    ]  # fmt: skip
    print(f"core overhead: {args.users} users x {args.messages} messages, instant backend")
    print(report.table(["path", "messages/s", "p50 ms", "p99 ms", "vs ceiling"], rows))
    goal = sequential["p99_ms"] < 5 and sequential["messages_per_s"] >= 1000
    print(f"goal (p99 < 5 ms and >= 1,000 messages/s, 1 in flight): {'met' if goal else 'NOT met'}")
    cost = sealed["messages_per_s"] / sequential["messages_per_s"]
    print(f"encryption at rest: {cost:.2f}x the plain rate, 1 in flight")
    path = report.save(
        "core_overhead",
        {
            "params": vars(args),
            "sqlite_insert_per_s": ceiling,
            "sequential": sequential,
            "concurrent": concurrent,
            "sequential_encrypted": sealed,
            "encrypted_vs_plain": cost,
            "ratio_to_ceiling": sequential["messages_per_s"] / ceiling,
            "goal_met": goal,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
