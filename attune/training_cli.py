"""``attune train`` and ``attune adapters``: the nightly job by hand, and the adapters it made.

    attune train [--user U | --all] [--dry-run]   train now: a progress bar per user, a summary table
    attune adapters list                         every adapter with its status and held-out metrics
    attune adapters rollback --user U            take U's adapter out of service, bring back the one before

``U`` is a user id (``12``), a platform identity (``web:ann``, ``telegram:4711``), or
``population`` for the shared adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent_core.config import Config
from agent_core.llm import base_model_dir
from agent_core.operations import Operations, UnknownUser
from agent_core.steering import ReplySteering
from agent_core.training.job import Task, TrainingBusy, TrainingJob
from attune.wiring import open_database
from storage import Store

console = Console()


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="run the nightly training now")
    who = train.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="U", help="train only this user (id, or platform:id), whatever their count")
    who.add_argument("--all", action="store_true", help="everyone who qualifies, as the nightly job does (default)")
    train.add_argument("--dry-run", action="store_true", help="show what would be trained, train nothing")
    adapters = sub.add_parser("adapters", parents=[common], help="list adapters, or roll one back")
    action = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    action.add_parser("list", parents=[common], help="every adapter with its status and metrics")
    rollback = action.add_parser("rollback", parents=[common], help="bring back a user's previous adapter")
    rollback.add_argument("--user", metavar="U", required=True, help="user id, platform:id, or 'population'")


async def run(config: Config, args: argparse.Namespace) -> int:
    db = await open_database(config)
    try:
        store = Store(db)
        steering = ReplySteering(store, config.settings.steering)  # a distill night measures each user's strength
        job = TrainingJob(store.training, config.settings, lambda: base_model_dir(config.settings),
                          measured=steering.measured)  # fmt: skip
        ops = Operations(job, store)
        if args.command == "train":
            return await _train(ops, args)
        if args.adapters_command == "list":
            return await _list(ops)
        return await _rollback(ops, args.user)
    finally:
        await db.close()


async def _train(ops: Operations, args: argparse.Namespace) -> int:
    users = None
    if args.user:
        try:
            who = await ops.find_user(args.user)
        except UnknownUser as exc:
            console.print(f"attune train: {exc}")
            return 2
        if who is None:
            console.print("attune train: the population adapter trains with --all")
            return 2
        users = [who]
    if args.dry_run:
        plan = await ops.plan(users)
        table = Table(
            "will train", "train liked / disliked", "held out liked / disliked", title="attune train --dry-run"
        )
        for task in plan.tasks:
            tr, ho = task.split.train, task.split.heldout
            table.add_row(_name(task), f"{sum(e.label for e in tr)} / {sum(not e.label for e in tr)}",
                          f"{sum(e.label for e in ho)} / {sum(not e.label for e in ho)}")  # fmt: skip
        console.print(table)
        for who_, why in plan.skipped:
            console.print(f"skipped {who_}: {why}")
        return 0
    with contextlib.suppress(RuntimeError, NotImplementedError):  # Ctrl-C stops the training cleanly
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, ops.training.cancel)
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))  # fmt: skip
    with Progress(*columns, console=console) as bars:
        ids: dict[str, Any] = {}

        def progress(task: Task) -> None:
            if task.name not in ids:
                ids[task.name] = bars.add_task(_name(task), total=None, status="")
            bars.update(ids[task.name], completed=task.step, total=task.steps or None, status=task.status)

        try:
            plan = await ops.train(users, progress=progress)
        except TrainingBusy as exc:
            console.print(f"attune train: {exc}; try again when it has finished")
            return 1
    console.print(_summary(plan.tasks))
    for who_, why in plan.skipped:
        console.print(f"skipped {who_}: {why}")
    return 1 if any(t.status == "failed" for t in plan.tasks) else 0


def _name(task: Task) -> str:
    return task.name if task.user_id is None or not task.user_name else f"{task.name} ({task.user_name})"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _summary(tasks: list[Task]) -> Table:
    table = Table("adapter", "decision", "NLL liked: base / served / new", "pref. acc.: served / new", "seconds",
                  "why", title="training summary")  # fmt: skip
    for t in tasks:
        m = t.metrics
        nll = "/".join(_fmt(m.get(k, {}).get("nll_liked")) for k in ("base", "in_service", "candidate"))
        acc = "/".join(_fmt(m.get(k, {}).get("preference_accuracy"), ".2f") for k in ("in_service", "candidate"))
        table.add_row(_name(t), t.status, nll if m else "", acc if m else "", _fmt(m.get("seconds"), ".0f"), t.reason)
    return table


async def _list(ops: Operations) -> int:
    table = Table("adapter", "status", "trained on top of", "created", "held-out NLL liked (new vs served)", "path")
    for a in await ops.adapters():
        m = a.metrics
        nll = f"{_fmt(m.get('candidate', {}).get('nll_liked'))} vs {_fmt(m.get('in_service', {}).get('nll_liked'))}"
        created = dt.datetime.fromtimestamp(a.created_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(a.name, a.status, a.parent, created, nll, a.path)
    console.print(table if table.row_count else "no adapters yet: `attune train` makes them")
    return 0


async def _rollback(ops: Operations, user: str) -> int:
    try:
        who = await ops.find_user(user)
    except UnknownUser as exc:
        console.print(f"attune adapters rollback: {exc}")
        return 2
    done = await ops.rollback(who)
    if done.taken is None:
        console.print(f"{user} has no adapter in service; nothing to roll back")
        return 1
    console.print(f"took {done.taken.name} out of service; now serving {done.now}")
    return 0
