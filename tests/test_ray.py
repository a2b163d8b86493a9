"""The nightly training on Ray: a local Ray instance started by the test, the tiny model.

The job hands each user's training to a Ray task (``[training] executor = "ray"``);
results and failures come back to the database as with the local process pool.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_core.config import Config
from storage.local_postgres import free_port
from storage.training import TrainingRecords
from tests.conftest import MODEL_CACHE
from tests.test_training import history_agent, rate_history, training_text, user_id

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (`ray start --head`); its address."""
    port = free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        check=True, capture_output=True, timeout=180, env=env,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def _ray_config(make_config: Callable[..., Config], model_dir: Path, address: str) -> Config:
    return make_config(training_text(model_dir, f'executor = "ray"\nray_address = "{address}"\nworkers = 2\n'))


async def test_each_user_trains_in_a_ray_task_and_the_results_reach_the_database(
    make_config: Callable[..., Config], tiny_model_dir: Path, ray_cluster: str
) -> None:
    agent = await history_agent(_ray_config(make_config, tiny_model_dir, ray_cluster))
    try:
        for who in ("ann", "bob"):
            await rate_history(agent, who, 12)
        plan = await agent.training.run()
        assert sorted(t.name for t in plan.tasks) == [f"user-{await user_id(agent, w)}" for w in ("ann", "bob")]
        assert all(t.status in ("promoted", "rejected") for t in plan.tasks), [(t.name, t.reason) for t in plan.tasks]
        assert any(t.status == "promoted" for t in plan.tasks)
        ran_on = [t.metrics["ray"] for t in plan.tasks]  # each in a Ray task of its own, on the cluster's node
        assert len({r["task"] for r in ran_on}) == 2 and all(r["node"] for r in ran_on), ran_on
        assert len({t.metrics["worker"] for t in plan.tasks} | {f"{socket.gethostname()}:{os.getpid()}"}) == 3
        records = TrainingRecords(agent.store.db)
        for task in plan.tasks:
            (run,) = await records.runs(task.user_id, limit=5)
            assert run["status"] == "succeeded" and run["decision"] == task.status
            assert run["metrics"]["candidate"] and "step " in run["log"]  # the steps came back too
            if task.status == "promoted":
                active = await records.active(task.user_id)
                assert active is not None and (Path(active.path) / "adapter_config.json").is_file()
    finally:
        await agent.close()


async def test_a_failing_ray_task_is_recorded_as_a_failed_run(
    make_config: Callable[..., Config], tiny_model_dir: Path, ray_cluster: str
) -> None:
    text = training_text(tiny_model_dir, f'executor = "ray"\nray_address = "{ray_cluster}"\n')
    # A valid setting the model cannot follow: peft fails inside the Ray task.
    text = re.sub(r"(?m)^targets = .*$", 'targets = ["no_such_proj"]', text)
    agent = await history_agent(make_config(text))
    try:
        await rate_history(agent, "ann", 12)
        (task,) = (await agent.training.run()).tasks
        assert task.status == "failed" and "no_such_proj" in task.reason
        (run,) = await TrainingRecords(agent.store.db).runs(task.user_id, limit=5)
        assert run["status"] == "failed" and "no_such_proj" in run["log"]
        assert await TrainingRecords(agent.store.db).active(task.user_id) is None
    finally:
        await agent.close()


async def test_the_real_smollm2_trains_in_a_ray_task(make_config: Callable[..., Config], ray_cluster: str) -> None:
    """Two optimizer steps of the real SmolLM2 in a Ray task; the liked list becomes more likely."""
    config = make_config(
        f'[llm]\ntemperature = 0.0\nmax_new_tokens = 8\n[llm.local]\ncache_dir = "{MODEL_CACHE}"\n'
        "[training]\nmin_new_rated = 6\nmin_population_liked = 1000\nepochs = 1\nbatch_size = 4\nthreads = 2\n"
        f'executor = "ray"\nray_address = "{ray_cluster}"\n'
    )
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        (task,) = (await agent.training.run()).tasks
    finally:
        await agent.close()
    assert task.status == "promoted", task.reason
    assert task.metrics["ray"]["task"] and task.steps == 2
    base, new = task.metrics["base"]["nll_liked"], task.metrics["candidate"]["nll_liked"]
    assert 0 < new < base < 10
