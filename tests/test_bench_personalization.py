"""bench/personalization.py end to end on the tiny model: every arm, the nights, the JSON and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL


def test_the_personalization_benchmark_runs_every_arm_and_writes_its_figures(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out, png = tmp_path / "personalization.json", tmp_path / "personalization.png"
    # People who like nearly every reply and react to all: enough liked replies to train on by night 1.
    population = tmp_path / "population.json"
    population.write_text(
        json.dumps(
            {
                "archetypes": [
                    {
                        "name": "easy",
                        "weight": 1,
                        "base": 0.9,
                        "noise": 0.0,
                        "react_prob": 1.0,
                        "effects": {"length": {"brief": 0.05, "detailed": -0.05}},
                    }
                ]
            }
        )
    )
    command = [
        sys.executable, "-m", "bench.personalization", "--users", "2", "--days", "2", "--messages", "4",
        "--seeds", "2", "--model", str(tiny_model_dir), "--cache-dir", str(MODEL_CACHE), "--max-new-tokens", "8",
        "--json", str(out), "--plot", str(png), "--population", str(population),
        "--set", "training.learning_rate=0.05", "--set", "training.epochs=6", "--no-judge-answers",
    ]  # fmt: skip
    env = {**os.environ, "ATTUNE_BENCH_RESULTS": str(tmp_path / "results")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["seeds"] == 2 and [row["day"] for row in data["days"]] == [1, 2]
    for row in data["days"]:
        for arm in ("no_learning", "policy", "policy_steered", "policy_adapters", "asked_best"):
            assert 0.02 <= row[arm] <= 0.98 and row[f"{arm}_sd"] >= 0, (arm, row)
            assert row[arm] <= data["oracle"] + 1e-9  # nothing beats each user's best style
    assert 0 <= data["achievable"] <= 1
    # one night (between the two days) per seed, in the adapters arm only, and it trained
    assert len(data["nights"]) == 2 and all(len(nights) == 1 for nights in data["nights"])
    assert all(sum(v for k, v in n[0].items() if k not in ("day", "seconds")) >= 1 for n in data["nights"])
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "goal (day 2" in done.stdout and "achievable" in done.stdout
    assert (tmp_path / "results" / "personalization.json").is_file()  # not the shipped results
