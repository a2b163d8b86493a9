"""Where the nightly job's training runs: a local process pool, or Ray tasks.

The contract, :class:`Executor`: ``await submit(spec, data_key, on_event)`` trains one
worker spec (see :mod:`agent_core.training.worker`: the tasks in it run in order) and
hands each event the worker emits (``start``, ``step``, ``result``, ``error``) to
``on_event``, in the bot's event loop, where the job records it in the database. A
task's own failure arrives as an ``error`` event; a worker that died raises
:class:`WorkerFailed`. At most ``workers`` specs train at once; more wait their turn.

- :class:`LocalPool` (``[training] executor = "local"``, the default): each spec is a
  ``python -m agent_core.training.worker`` process on this machine, its events read
  from its stdout as they come.
- :class:`RayPool` (``executor = "ray"``): each spec is a Ray task on the cluster at
  ``[training] ray_address`` ("" starts a Ray instance on this machine for the run);
  its events come back with its result. The nodes need attune installed, the base
  model at the same path, and ``data_dir`` on storage they share with the bot.

Neither gets attune's secrets: the run's data files are sealed under a key made for
the run alone, passed to the worker in ``ATTUNE_TRAINING_DATA_KEY`` or as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent_core.config import SECRET_ENV, TrainingSettings
from agent_core.training.dataset import DATA_KEY_ENV

log = logging.getLogger(__name__)

OnEvent = Callable[[dict[str, Any]], Awaitable[None]]


class WorkerFailed(Exception):
    """A worker ended without finishing its tasks (killed, out of memory, lost node)."""


_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ENCRYPTION_KEY)$")


def _holds_a_secret(variable: str) -> bool:
    """The core's secrets, and what a platform's secret is called (``*_TOKEN``, ``*_SECRET``, ...)."""
    return variable in SECRET_ENV.values() or _SECRET_NAME.search(variable) is not None


class Executor(ABC):
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)

    @abstractmethod
    async def submit(self, spec: dict[str, Any], data_key: str, on_event: OnEvent) -> None: ...

    @abstractmethod
    def cancel(self) -> None:
        """Stop every worker now."""

    @abstractmethod
    async def close(self) -> None:
        """Stop what still runs and release what the executor holds (a Ray connection)."""


class LocalPool(Executor):
    def __init__(self, workers: int, threads: int, work: Path) -> None:
        super().__init__(workers)
        self.threads = threads
        self.work = work  # where specs and worker logs are written
        self._processes: set[asyncio.subprocess.Process] = set()
        self._count = 0

    async def submit(self, spec: dict[str, Any], data_key: str, on_event: OnEvent) -> None:
        async with self._slots:
            self._count += 1
            spec_file = self.work / f"spec-{self._count}.json"
            spec_file.write_text(json.dumps(spec), encoding="utf-8")
            threads = str(self.threads)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
            for name in [n for n in env if _holds_a_secret(n)]:  # the worker needs none of attune's secrets
                env.pop(name)
            env[DATA_KEY_ENV] = data_key
            with (self.work / f"worker-{self._count}.log").open("wb") as stderr_log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agent_core.training.worker", str(spec_file),
                    stdout=asyncio.subprocess.PIPE, stderr=stderr_log, env=env,
                )  # fmt: skip
                self._processes.add(process)
                try:
                    assert process.stdout is not None
                    async for raw in process.stdout:
                        with contextlib.suppress(ValueError):
                            await on_event(json.loads(raw))
                    returncode = await process.wait()
                except BaseException:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    raise
                finally:
                    self._processes.discard(process)
            if returncode != 0:
                raise WorkerFailed(f"the training process exited with {returncode}")

    def cancel(self) -> None:
        for process in self._processes:
            if process.returncode is None:
                process.terminate()

    async def close(self) -> None:
        self.cancel()


def train_in_ray_task(spec: dict[str, Any], data_key: str) -> list[dict[str, Any]]:
    """The body of one Ray task: run the worker in the Ray worker process; its events,
    each result marked with the Ray task and node it came from."""
    import ray

    from agent_core.training import worker

    events: list[dict[str, Any]] = []
    worker.run(spec, data_key, events.append)
    context = ray.get_runtime_context()
    for event in events:
        if event["event"] == "result":
            event["metrics"]["ray"] = {"task": context.get_task_id(), "node": context.get_node_id()}
    return events


class RayPool(Executor):
    def __init__(self, workers: int, threads: int, address: str) -> None:
        super().__init__(workers)
        import ray

        self._ray = ray
        self.address = address
        if not ray.is_initialized():
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
            log.info("training on Ray at %s", address or "a local instance")
        self._task = ray.remote(num_cpus=threads, max_retries=0)(train_in_ray_task)
        self._running: set[Any] = set()

    async def submit(self, spec: dict[str, Any], data_key: str, on_event: OnEvent) -> None:
        async with self._slots:
            ref = self._task.remote(spec, data_key)
            self._running.add(ref)
            try:
                events = await ref
            except self._ray.exceptions.RayError as exc:
                raise WorkerFailed(f"the Ray task failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
            finally:
                self._running.discard(ref)
        for event in events:
            await on_event(event)

    def cancel(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)

    async def close(self) -> None:
        self.cancel()
        await asyncio.to_thread(self._ray.shutdown)


def create_executor(settings: TrainingSettings, work: Path) -> Executor:
    if settings.executor == "ray":
        return RayPool(settings.workers, settings.threads, settings.ray_address)
    return LocalPool(settings.workers, settings.threads, work)
