"""bench/steering.py on the tiny model: plain and steered replies at two numbers of users,
timed in the same run, and the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL


def test_the_steering_benchmark_times_plain_and_steered_replies(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "steering.json"
    command = [sys.executable, "-m", "bench.steering", "--users", "1,3", "--tokens", "12", "--model",
               str(tiny_model_dir), "--cache-dir", str(MODEL_CACHE), "--json", str(out)]  # fmt: skip
    env = {**os.environ, "ATTUNE_BENCH_RESULTS": str(tmp_path / "results")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["by_users"]) == {"1", "3"} and data["candidates"] == 4
    for row in data["by_users"].values():
        assert row["steered"]["reply_p50_s"] > 0 and row["plain"]["reply_p50_s"] > 0
        assert row["ratio_p50"] == pytest.approx(row["steered"]["reply_p50_s"] / row["plain"]["reply_p50_s"])
    assert "steered / plain" in done.stdout and (tmp_path / "results" / "steering.json").is_file()
