"""bench/memory.py, small: two users through attune and the baseline, the tiny model
answering one question of each kind, and the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.memory_script import contains, make_user, shares_a_word
from tests.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.no_database  # the bench opens its own SQLite databases: not run again on PostgreSQL


def test_the_script_states_each_fact_once_and_asks_about_it_fairly() -> None:
    user = make_user(0, 0)
    stated = [i for t in user.turns if t.kind == "statement" for i in t.facts]
    assert sorted(stated) == list(range(len(user.facts)))  # each fact stated once
    for turn in user.turns:
        if turn.kind == "meaning":
            said = next(t.text for t in user.turns if t.kind == "statement" and turn.facts[0] in t.facts)
            assert not shares_a_word(turn.text, said), (turn.text, said)
    assert contains("Their birthday is on 3rd March.", [["March", "Mar"], ["3", "3rd"]])
    assert not contains("They live in Marchmont.", [["March"]])  # whole words only


def test_the_memory_benchmark_compares_attune_with_the_baseline(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "bench.memory", "--users", "2", "--messages", "40", "--replies", "1",
               "--arms", "attune,baseline", "--model", str(tiny_model_dir), "--cache-dir", str(MODEL_CACHE),
               "--json", str(out)]  # fmt: skip
    env = {**os.environ, "ATTUNE_BENCH_RESULTS": str(tmp_path / "results")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    attune, baseline = data["arms"]["attune"], data["arms"]["baseline"]
    assert attune["capture"] > baseline["capture"]  # facts stated in passing are kept
    assert attune["leak_rate"] <= baseline["leak_rate"]
    assert attune["replies"] == baseline["replies"] == 3  # one question of each kind, by the model
    assert set(attune["recall_at_prompt"]) == {"direct", "meaning"} and attune["ms_per_message"] > 0
    assert set(data["goals"]) >= {"capture", "recall_at_prompt.meaning", "leak_rate", "ms_per_message"}
    assert "recall meaning" in done.stdout and (tmp_path / "results" / "memory.json").is_file()
