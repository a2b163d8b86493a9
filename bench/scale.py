"""Beyond one machine: SQLite against PostgreSQL, and what a night of training costs.

1. Message throughput of the whole agent pipeline (an instant backend, so the database
   and the core are what is measured), in the same run: SQLite; PostgreSQL with one bot
   process; PostgreSQL with two bot processes sharing the database (each its own users).
   The PostgreSQL server is a throwaway one on 127.0.0.1 (storage/local_postgres.py)
   with its durable defaults (fsync, synchronous_commit on); SQLite runs as attune
   configures it (WAL, synchronous=NORMAL).
2. Training time per user, measured: ``--users`` users with ``--rated`` rated replies
   each, trained by the real nightly job with the real model, once with one worker and
   once with ``--workers`` workers (the local process pool; ``--executor ray`` for Ray
   tasks), each worker ``--threads`` threads.
3. The projected nightly wall time for 10,000 users on 1, 4 and 16 workers: the
   measured seconds per user (one worker) times 10,000 over the workers, assuming each
   worker has cores of its own; beside it the scaling measured here, where the workers
   share this machine's cores.

    python bench/scale.py [--messages 2000] [--users 4] [--rated 20] [--workers 2] [--model smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python bench/scale.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.agent import Agent
from agent_core.events import Message, Reaction
from agent_core.llm import GenerationRequest
from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent
from bench import report
from bench.core_overhead import run_agent
from storage.local_postgres import LocalPostgres

NIGHT_USERS = 10_000
PROJECTED_WORKERS = (1, 4, 16)
REPLY = (
    "Here is what I would suggest: start small, keep notes of what works, and come back to it tomorrow "
    "with fresh eyes. If you tell me more about it I can be more specific."
)


# --- 1. message throughput ------------------------------------------------------------------


async def throughput(path: Path, args: argparse.Namespace, url: str = "", first_user: int = 0) -> dict[str, float]:
    extra = {"ATTUNE_STORAGE__URL": url} if url else {}
    return await run_agent(path, args.chat_users, args.messages // args.chat_users, args.concurrency, args.seed,
                           environ=extra, first_user=first_user)  # fmt: skip


def two_processes(url: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Two bot processes on one PostgreSQL database, each with its own half of the users."""
    half = max(1, args.messages // 2)
    commands = [
        [sys.executable, __file__, "--serve", url, "--first-user", str(i * args.chat_users),
         "--messages", str(half), "--chat-users", str(args.chat_users), "--concurrency", str(args.concurrency),
         "--work", str(folder / f"p{i}")]
        for i in range(2)
    ]  # fmt: skip
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    elapsed = time.perf_counter() - started
    messages = sum(r["messages"] for r in results)
    # Each process reports its own rate; together: all messages over the slower one's time.
    slowest = max(r["messages"] / r["messages_per_s"] for r in results)
    return {"messages": messages, "messages_per_s": messages / slowest, "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results), "wall_s": elapsed}  # fmt: skip


# --- 2. training time per user --------------------------------------------------------------


def training_environ(data_dir: Path, args: argparse.Namespace, workers: int) -> dict[str, str]:
    return {
        "ATTUNE_STORAGE__DATA_DIR": str(data_dir),
        "ATTUNE_LLM__LOCAL__MODEL": args.model,
        "ATTUNE_LLM__LOCAL__CACHE_DIR": str(Path(args.cache_dir).resolve()),
        "ATTUNE_LIMITS__MESSAGES_PER_MINUTE": "100000",
        "ATTUNE_LIMITS__GLOBAL_MESSAGES_PER_MINUTE": "0",
        "ATTUNE_TRAINING__MIN_NEW_RATED": str(args.rated - 1),
        "ATTUNE_TRAINING__MIN_POPULATION_LIKED": "1000000",  # users' adapters only: they are what scales
        "ATTUNE_TRAINING__THREADS": str(args.threads),
        "ATTUNE_TRAINING__WORKERS": str(workers),
        "ATTUNE_TRAINING__EXECUTOR": args.executor,
        "ATTUNE_TRAINING__RAY_ADDRESS": args.ray_address,
    }


async def rate(agent: Agent, users: int, rated: int) -> None:
    """Each user sends ``rated`` messages and reacts to every reply (three in four liked)."""
    for u in range(users):
        who = f"user{u}"
        for i in range(rated):
            text = f"question {i} from {who}: how should I plan my week?"
            reply = await agent.handle_message(Message(platform="bench", chat_id=who, sender_id=who, text=text))
            assert reply is not None and reply.reply_id is not None
            await agent.delivered(reply, f"{who}-r{i}")
            emoji = "👎" if i % 4 == 3 else "👍"
            await agent.handle_reaction(Reaction(platform="bench", chat_id=who, sender_id=who,
                                                 message_id=f"{who}-r{i}", emoji=emoji))  # fmt: skip


async def train_night(folder: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    config = load_config(environ=training_environ(folder, args, workers))
    backend = RecordingBackend(lambda request: _reply(request), record=False)
    agent = await open_agent(config, llm=backend)
    await backend.start()
    try:
        await rate(agent, args.users, args.rated)
        started = time.perf_counter()
        plan = await agent.training.run()
        wall = time.perf_counter() - started
    finally:
        await agent.close()
    failed = [(t.name, t.reason) for t in plan.tasks if t.status == "failed"]
    if failed or len(plan.tasks) != args.users:
        raise SystemExit(f"training did not run as planned: {failed or plan.skipped}")
    seconds = [float(t.metrics["seconds"]) for t in plan.tasks]
    return {"workers": workers, "users": len(plan.tasks), "wall_s": wall, "wall_per_user_s": wall / len(plan.tasks),
            "task_seconds": seconds, "outcomes": [t.status for t in plan.tasks]}  # fmt: skip


def _reply(request: GenerationRequest) -> str:
    return REPLY


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- the run --------------------------------------------------------------------------------


def projection(per_user_s: float) -> dict[str, float]:
    """Hours for a night of NIGHT_USERS users on each number of workers (each with its own cores)."""
    return {str(w): math.ceil(NIGHT_USERS / w) * per_user_s / 3600 for w in PROJECTED_WORKERS}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per throughput run")
    parser.add_argument("--chat-users", type=int, default=200, help="distinct users in the throughput runs")
    parser.add_argument("--concurrency", type=int, default=16, help="messages in flight per bot process")
    parser.add_argument("--users", type=int, default=4, help="users trained per training run")
    parser.add_argument("--rated", type=int, default=20, help="rated replies per trained user")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second training run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per training worker")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", default="", help='with --executor ray: the cluster ("" = a local Ray)')
    parser.add_argument("--model", default="smollm2", help="the base model trained on")
    parser.add_argument("--cache-dir", default="data/models", help="where the local model is cached")
    parser.add_argument("--skip-training", action="store_true", help="the throughput part only")
    parser.add_argument("--seed", type=int, default=0)
    # One of two bot processes of the PostgreSQL run (internal).
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    parser.add_argument("--first-user", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        print(json.dumps(await throughput(Path(args.work), args, args.serve, args.first_user)))
        return

    with tempfile.TemporaryDirectory() as tmp, LocalPostgres(durable=True) as server:
        work = Path(tmp)
        print(f"throughput: {args.messages} messages from {args.chat_users} users, instant backend ...", flush=True)
        sqlite = await throughput(work / "sqlite", args)
        postgres = await throughput(work / "pg1", args, server.create_database("one_process"))
        postgres_two = two_processes(server.create_database("two_processes"), work, args)
    rows = [
        ["SQLite (WAL, synchronous=NORMAL), 1 process", sqlite["messages_per_s"], sqlite["p50_ms"],
         sqlite["p99_ms"], 1.0],
        ["PostgreSQL 15 (durable defaults), 1 process", postgres["messages_per_s"], postgres["p50_ms"],
         postgres["p99_ms"], postgres["messages_per_s"] / sqlite["messages_per_s"]],
        ["PostgreSQL 15 (durable defaults), 2 processes", postgres_two["messages_per_s"], postgres_two["p50_ms"],
         postgres_two["p99_ms"], postgres_two["messages_per_s"] / sqlite["messages_per_s"]],
    ]  # fmt: skip
    print(report.table(["storage", "messages/s", "p50 ms", "p99 ms", "vs SQLite"], rows))
    results: dict[str, Any] = {
        "params": {k: v for k, v in vars(args).items() if k not in ("serve", "first_user", "work")},
        "sqlite": sqlite,
        "postgresql": postgres,
        "postgresql_two_processes": postgres_two,
        "postgresql_vs_sqlite": postgres["messages_per_s"] / sqlite["messages_per_s"],
        "postgresql_two_processes_vs_sqlite": postgres_two["messages_per_s"] / sqlite["messages_per_s"],
    }
    if not args.skip_training:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for workers in sorted({1, args.workers}):
                print(f"training: {args.users} users x {args.rated} rated replies, {workers} worker(s) "
                      f"({args.executor}, {args.threads} thread(s) each) ...", flush=True)  # fmt: skip
                runs.append(await train_night(Path(tmp) / f"w{workers}", args, workers))
        per_user = runs[0]["wall_per_user_s"]
        speedup = runs[0]["wall_s"] / runs[-1]["wall_s"]
        ideal = args.users / math.ceil(args.users / args.workers)  # whole tasks per worker
        slowdown = _mean(runs[-1]["task_seconds"]) / _mean(runs[0]["task_seconds"]) - 1
        print(report.table(
            ["workers", "users", "wall s", "wall per user s", "per task s (mean)", "speed-up"],
            [[r["workers"], r["users"], r["wall_s"], r["wall_per_user_s"],
              _mean(r["task_seconds"]), runs[0]["wall_s"] / r["wall_s"]] for r in runs],
        ))  # fmt: skip
        hours = projection(per_user)
        print(f"projected nightly wall time for {NIGHT_USERS:,} users at {per_user:.1f} s per user "
              f"(each worker {args.threads} thread(s) of its own):")  # fmt: skip
        print(report.table(["workers", "hours"], [[w, h] for w, h in hours.items()]))
        print(f"measured here ({os.cpu_count()} cores shared): {args.workers} workers ran {speedup:.2f}x as fast as 1"
              f" (at best {ideal:.2f}x for {args.users} users); each task took {slowdown:+.1%} longer")  # fmt: skip
        results |= {"training": runs, "training_seconds_per_user": per_user, "measured_speedup": speedup,
                    "ideal_speedup": ideal, "task_slowdown": slowdown, "projected_nightly_hours": hours,
                    "night_users": NIGHT_USERS}  # fmt: skip
    print(f"wrote {report.save('scale', results)}")


if __name__ == "__main__":
    asyncio.run(main())
