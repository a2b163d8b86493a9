"""bench/scale.py end to end on the tiny model: SQLite against PostgreSQL (one and two
processes), two training runs, the projection and its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL


def test_the_scale_benchmark_measures_both_databases_and_a_night_of_training(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    command = [
        sys.executable, "-m", "bench.scale", "--messages", "60", "--chat-users", "6", "--concurrency", "4",
        "--users", "2", "--rated", "10", "--workers", "2", "--model", str(tiny_model_dir),
        "--cache-dir", str(MODEL_CACHE),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")} | {"ATTUNE_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PostgreSQL 15 (durable defaults), 2 processes" in done.stdout and "projected nightly" in done.stdout
    results = json.loads((tmp_path / "scale.json").read_text())
    for run in ("sqlite", "postgresql", "postgresql_two_processes"):
        assert results[run]["messages"] == 60 and results[run]["messages_per_s"] > 0, run
    assert results["postgresql_vs_sqlite"] == results["postgresql"]["messages_per_s"] / results["sqlite"][
        "messages_per_s"]  # fmt: skip
    assert [r["workers"] for r in results["training"]] == [1, 2]
    assert all(r["users"] == 2 and len(r["task_seconds"]) == 2 for r in results["training"])
    assert results["ideal_speedup"] == 2.0  # two users, two workers
    assert results["measured_speedup"] == results["training"][0]["wall_s"] / results["training"][1]["wall_s"]
    per_user = results["training_seconds_per_user"]
    assert per_user == results["training"][0]["wall_s"] / 2
    hours = results["projected_nightly_hours"]
    assert set(hours) == {"1", "4", "16"} and hours["1"] == 10_000 * per_user / 3600
    assert hours["16"] == 625 * per_user / 3600  # ceil(10,000 / 16) users each
