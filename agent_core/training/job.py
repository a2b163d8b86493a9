"""The nightly job, as the scheduler and ``attune train`` run it.

1. take the training lock in the database (a second process gets :class:`TrainingBusy`);
2. pick the users with at least ``[training] min_new_rated`` new rated replies;
3. build each one's examples (redacted, split by time) and the population's;
4. train the population's adapter, then every user's, each in a worker
   (:mod:`agent_core.training.worker`) that the executor runs: a local process with
   few threads, or a Ray task (:mod:`agent_core.training.executors`);
5. record every run and every candidate as its results arrive; a promoted adapter
   serves that user's next message, since the agent looks it up per message;
6. release the lock and delete the training files.

A kill of the worker (or of this process) leaves the adapters in service as they were:
the worker only renames a finished adapter into place, and only a result recorded
here makes it active. Runs left 'running' by a dead process are marked failed next time.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import shutil
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from agent_core import reward_model
from agent_core.config import Settings
from agent_core.llm import model_cache_dir
from agent_core.stores import UNAVAILABLE, TrainingStore
from agent_core.training.dataset import Example, Split, examples, split_by_time, summary, write_examples
from agent_core.training.executors import Executor, WorkerFailed, create_executor
from agent_core.training.redact import Redactor
from storage.crypto import Key
from storage.database import Unavailable
from storage.training import AdapterRow, Candidate, RatedReply

log = logging.getLogger(__name__)

POPULATION = "population"
MIN_TRAIN_LIKED = 2  # fewer liked training replies than this: the user keeps the population adapter


class _Patient:
    """The training's records, waiting out a database outage: a call refused before
    anything of it could be written is tried again every second, for up to ``wait_s``
    (half the lock's time-to-live, so the lock is still this run's when it is back)."""

    def __init__(self, records: TrainingStore, wait_s: float) -> None:
        self._records = records
        self._wait_s = wait_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._records, name)
        if not inspect.iscoroutinefunction(method):
            return method

        @functools.wraps(method)
        async def patient(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self._wait_s
            while True:
                try:
                    return await method(*args, **kwargs)
                except Unavailable as exc:
                    if exc.maybe_committed or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)

        return patient


class TrainingBusy(Exception):
    """Another process holds the training lock."""


@dataclass
class Task:
    """One adapter to train tonight."""

    name: str  # "population" or "user-12"
    user_id: int | None
    user_name: str
    split: Split
    version: int = 0
    run_id: int = 0
    status: str = "planned"  # planned, running, promoted, rejected, failed, cancelled
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    steps: int = 0
    reward_auc: float | None = None  # raft/dpo: the user's reward model on their held-out reactions


@dataclass
class Plan:
    tasks: list[Task]
    skipped: list[tuple[str, str]]  # (who, why)


Progress = Callable[[Task], None]


Measured = Callable[[int, float], Awaitable[None]]  # (user, steering strength): what the night measured


class TrainingJob:
    def __init__(self, records: TrainingStore, settings: Settings, model_dir: Callable[[], Path],
                 measured: Measured | None = None) -> None:  # fmt: skip
        """``measured``: told each user's steering strength as a distill night measures it."""
        self.records = cast(TrainingStore, _Patient(records, wait_s=settings.training.lock_ttl_s / 2))
        self.measured = measured
        self.settings = settings
        self.training = settings.training
        self._model_dir = model_dir  # the base model as a transformers directory (may convert once)
        self.redact = Redactor(self.training.redact_patterns)
        self._executor: Executor | None = None
        self._cancelled = False

    @property
    def adapters_dir(self) -> Path:
        return self.settings.storage.adapters_path

    def delete_files(self, user_id: int) -> None:
        """Remove a user's adapter files (after their records are gone: /forget all)."""
        folder = self.adapters_dir / str(user_id)
        if folder.is_dir():
            shutil.rmtree(folder)

    # --- planning ----------------------------------------------------------------------

    async def plan(self, users: list[int] | None = None) -> Plan:
        """What a run would train. ``users`` given: only them (population excluded), each
        trained if they have enough data at all; None: the nightly choice."""
        tasks: list[Task] = []
        skipped: list[tuple[str, str]] = []
        candidates = await self.records.candidates(users)
        by_user: dict[int, list[RatedReply]] = defaultdict(list)
        if users is None:  # the nightly choice: one read for everyone
            for reply in await self.records.rated_replies():
                by_user[reply.user_id].append(reply)
        else:  # by hand: only the users asked for
            for c in candidates:
                by_user[c.user_id] = await self.records.rated_replies(c.user_id)
        splits = {
            c.user_id: split_by_time(examples(by_user[c.user_id], self.redact), self.training.holdout_fraction)
            for c in candidates
        }
        if users is None:
            population = await self._population_task(candidates, splits)
            if isinstance(population, Task):
                tasks.append(population)
            else:
                skipped.append((POPULATION, population))
        known = {c.user_id: c for c in candidates}
        for user_id in users if users is not None else list(known):
            c = known.get(user_id)
            who = f"user-{user_id}" + (f" ({c.name})" if c and c.name else "")
            if c is None:
                skipped.append((who, "no rated replies"))
            elif users is None and c.new_rated < self.training.min_new_rated:
                skipped.append((who, f"{c.new_rated} new rated replies, needs {self.training.min_new_rated}"))
            elif len(splits[user_id].liked_train) < MIN_TRAIN_LIKED or not splits[user_id].heldout:
                skipped.append((who, f"too few liked replies to train on ({summary(splits[user_id])})"))
            else:
                tasks.append(Task(f"user-{user_id}", user_id, c.name, splits[user_id]))
        return Plan(tasks, skipped)

    async def _population_task(self, candidates: list[Candidate], splits: dict[int, Split]) -> Task | str:
        train = [e for s in splits.values() for e in s.train]
        heldout = [e for s in splits.values() for e in s.heldout]
        liked = sum(e.label for e in train)
        if liked < self.training.min_population_liked:
            return f"{liked} liked replies from all users, needs {self.training.min_population_liked}"
        since = await self.records.last_trained(None)
        new = sum(1 for e in train + heldout if e.at > since)
        if since and new < self.training.min_new_rated:
            return f"{new} new rated replies since the last population run, needs {self.training.min_new_rated}"
        return Task(POPULATION, None, POPULATION, Split(train, heldout))

    # --- running -------------------------------------------------------------------------

    async def run(self, users: list[int] | None = None, *, progress: Progress | None = None) -> Plan:
        """Train what :meth:`plan` picks; returns the plan with each task's outcome."""
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if not await self.records.acquire_lock(holder, self.training.lock_ttl_s):
            raise TrainingBusy(f"another process is training now ({await self.records.lock_holder()})")
        work = self.settings.storage.data_path / "training" / f"run-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        heartbeat = asyncio.create_task(self._heartbeat(holder))
        try:
            stale = await self.records.fail_unfinished_runs()
            if stale:
                log.warning("%d training run(s) of a process that died were marked failed", stale)
            for leftover in self.adapters_dir.glob("*/.tmp-*"):  # half-written by a killed worker
                shutil.rmtree(leftover, ignore_errors=True)
            for leftover in work.parent.glob("run-*"):  # the data of a run whose process was killed
                shutil.rmtree(leftover, ignore_errors=True)
            plan = await self.plan(users)
            if plan.tasks:
                await self._train(plan.tasks, work, progress or (lambda task: None))
            return plan
        finally:
            heartbeat.cancel()
            shutil.rmtree(work, ignore_errors=True)  # redacted copies of personal data: never left behind
            await self.records.release_lock(holder)

    def cancel(self) -> None:
        """Stop the running training; adapters in service stay as they are."""
        self._cancelled = True
        if self._executor is not None:
            self._executor.cancel()

    async def _heartbeat(self, holder: str) -> None:
        """Renew the lock every ``lock_ttl_s / 4``. Through a database outage it keeps
        trying every second, and renews as soon as the database is back; if the lock was
        lost meanwhile (not renewed within its time-to-live, or taken), the training stops."""
        ttl = self.training.lock_ttl_s
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(ttl / 4)
            while True:
                try:
                    held = await self.records.renew_lock(holder, ttl)
                    break
                except UNAVAILABLE as exc:
                    if time.monotonic() - renewed > ttl:
                        held = False
                        break
                    log.debug("the training lock could not be renewed yet (%s)", exc)
                    await asyncio.sleep(1.0)
            if not held:
                log.error("the training lock was lost (not renewed within lock_ttl_s = %.0f s); this training "
                          "stops, so that no other process trains the same users at the same time", ttl)  # fmt: skip
                self.cancel()
                return
            renewed = time.monotonic()

    async def _train(self, tasks: list[Task], work: Path, progress: Progress) -> None:
        """The population's adapter first (users' start from it), then every user's, spread
        over the executor's workers."""
        data_key = Key.generate()  # for this run's files only; never stored
        sealer = Key.from_text(data_key)
        everyone: list[RatedReply] = []  # the reward models' prior: read once for every user
        if self.training.objective in reward_model.OBJECTIVES:
            everyone = await self.records.rated_replies(None, limit=reward_model.POPULATION_ROWS)
        for task in tasks:
            folder = work / task.name
            write_examples(folder / "train.jsonl", task.split.train, sealer)
            write_examples(folder / "heldout.jsonl", task.split.heldout, sealer)
            if task.user_id is not None and self.training.objective in reward_model.OBJECTIVES:
                task.reward_auc = await self._reward_model(task, everyone, folder / "reward.npy")
            task.version = await self.records.next_version(task.user_id)
            task.run_id = await self.records.start_run(task.user_id, len(task.split.train) + len(task.split.heldout))
        model_dir = await asyncio.to_thread(self._model_dir)
        try:
            self._executor = await asyncio.to_thread(create_executor, self.training, work)
        except Exception as exc:  # Ray unreachable, or not installed
            for task in tasks:
                await self._no_result(task, f"cannot start the {self.training.executor} executor: {exc}", progress)
            return
        try:
            for group in ([t for t in tasks if t.user_id is None], [t for t in tasks if t.user_id is not None]):
                population = await self.records.active(None)  # after the population's run: the new one
                runs = [self._submit(t, await self._spec(t, work, model_dir, population), data_key, progress)
                        for t in group]  # fmt: skip
                await asyncio.gather(*runs)
        finally:
            await self._executor.close()
            self._executor = None

    async def _reward_model(self, task: Task, everyone: list[RatedReply], path: Path) -> float | None:
        """Fit the user's reward model, save its weights for the worker, and return its AUC
        on the user's held-out reactions (None: not both kinds there)."""
        prior = [(self.redact(r.text), r.reward) for r in everyone if r.user_id != task.user_id and r.reward != 0]

        def fit() -> float | None:
            model, held_out_auc = fit_reward_model(prior, task.split)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, model.weights)
            return held_out_auc

        return await asyncio.to_thread(fit)

    async def _spec(self, task: Task, work: Path, model_dir: Path, population: AdapterRow | None) -> dict[str, Any]:
        """The worker spec that trains ``task`` alone."""
        own = await self.records.active(task.user_id) if task.user_id is not None else population
        owner = POPULATION if task.user_id is None else str(task.user_id)
        local = self.settings.llm.local
        return {
            "model_dir": str(model_dir),
            "cache_dir": str(model_cache_dir(self.settings)),
            # the sampling of raft/dpo generates as the bot does
            "serving": {"max_new_tokens": self.settings.llm.max_new_tokens,
                        "repetition_penalty": local.repetition_penalty, "no_repeat_ngram": local.no_repeat_ngram,
                        "style_control": local.style_control},
            "threads": self.training.threads,
            "seed": self.settings.policy.seed,
            "training": self.training.model_dump(),
            "steering": self.settings.steering.model_dump(),  # distill: the teacher steers as replies are steered
            "population_in_service": population.path if population else None,
            "tasks": [{
                "name": task.name, "user_id": task.user_id,
                "train": str(work / task.name / "train.jsonl"), "heldout": str(work / task.name / "heldout.jsonl"),
                "out_dir": str(self.adapters_dir / owner / str(task.version)),
                "in_service": own.path if own else None,
                **({"reward_model": str(work / task.name / "reward.npy"), "reward_auc": task.reward_auc}
                   if task.user_id is not None and self.training.objective in reward_model.OBJECTIVES else {}),
            }],
        }  # fmt: skip

    async def _submit(self, task: Task, spec: dict[str, Any], data_key: str, progress: Progress) -> None:
        async def on_event(event: dict[str, Any]) -> None:
            if event.get("task") == task.name:
                await self._on_event(task, event)
                progress(task)

        reason = "the training process ended without a result"
        try:
            assert self._executor is not None
            await self._executor.submit(spec, data_key, on_event)
        except WorkerFailed as exc:
            reason = str(exc)
        if task.status in ("planned", "running"):
            await self._no_result(task, reason, progress)

    async def _no_result(self, task: Task, reason: str, progress: Progress) -> None:
        """Record a task that ended without a result: failed (with why), or cancelled."""
        task.status = "cancelled" if self._cancelled else "failed"
        task.reason = "cancelled" if self._cancelled else reason
        await self.records.log_run(task.run_id, task.reason)
        await self.records.finish_run(task.run_id, task.status)
        log.warning("training %s %s: %s", task.name, task.status, task.reason)
        progress(task)

    async def _on_event(self, task: Task, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            task.status, task.steps = "running", int(event["steps"])
            await self.records.log_run(task.run_id, f"training {task.steps} steps")
        elif kind == "step":
            task.step, task.steps = int(event["step"]), int(event["steps"])
            await self.records.log_run(task.run_id, f"step {task.step}/{task.steps} loss {event['loss']:.4f}")
        elif kind == "result":
            task.metrics, task.reason = event["metrics"], event["reason"]
            task.status = "promoted" if event["promote"] else "rejected"
            parent = await self._parent(task)
            path = event["path"] or str(self.adapters_dir / "rejected")
            await self.records.add_adapter(
                task.user_id, task.version, path, promote=bool(event["promote"]), parent=parent, metrics=task.metrics
            )
            await self.records.log_run(task.run_id, f"{task.status}: {task.reason}")
            await self.records.finish_run(
                task.run_id, "succeeded", metrics=task.metrics, decision=task.status, adapter_version=task.version
            )
            log.info("training %s: %s (%s)", task.name, task.status, task.reason)
            await self._steering_strength(task)
        elif kind == "error":
            task.status, task.reason = "failed", str(event["error"])
            await self.records.log_run(task.run_id, f"failed: {task.reason}")
            await self.records.finish_run(task.run_id, "failed")
            log.warning("training %s failed: %s", task.name, task.reason)

    async def _steering_strength(self, task: Task) -> None:
        """A distill night measured how hard this user's replies may be steered; a reward
        model no better than chance on their held-out reactions steers them not at all."""
        measured = task.metrics.get("steering_strength")
        if self.measured is None or task.user_id is None or measured is None:
            return
        strength = float(measured)
        if task.reward_auc is not None and task.reward_auc <= 0.5:
            strength = 0.0
        await self.measured(task.user_id, strength)

    async def _parent(self, task: Task) -> str:
        if task.user_id is None:
            return "base"
        population = await self.records.active(None)
        return population.name if population else "base"


def fit_reward_model(prior: list[tuple[str, float]], split: Split) -> tuple[reward_model.RewardModel, float | None]:
    """A user's reward model as the nightly job fits it: the population's (others' rated
    replies, ``(text, reward)``, and the user's training replies) as the prior, then the
    user's own training replies; with its AUC on their held-out reactions (None: not both
    kinds there)."""

    def signed(e: Example) -> float:
        return e.weight if e.label else -e.weight

    train, heldout = split.train, split.heldout
    population = reward_model.RewardModel.fit_population(
        [text for text, _ in prior] + [e.completion for e in train], [r for _, r in prior] + [signed(e) for e in train]
    )
    model = population.fit_user([e.completion for e in train], [signed(e) for e in train])
    return model, reward_model.auc(list(model.score([e.completion for e in heldout])), [e.label for e in heldout])
