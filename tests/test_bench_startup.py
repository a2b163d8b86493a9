"""bench/startup.py: where a start's seconds went, read from the log of `attune run`."""

from __future__ import annotations

import pytest

from bench.startup import phases

pytestmark = pytest.mark.no_database


def test_the_phases_of_a_start_come_from_the_log_lines_and_the_model_s_own_split() -> None:
    log = [
        "18:08:29 INFO bots.web: web chat on http://127.0.0.1:8093\n",
        "18:08:29 INFO agent_core.agent: a reply waits for the model to finish loading\n",
        "18:08:30 INFO agent_core.llm.model_files: loading the model from its cache /models/SmolLM2\n",
        "18:08:33 INFO agent_core.llm.local: local model ready: local /models/SmolLM2 (context 8192 tokens); loaded in"
        " 3.5 s (imports and tokenizer 0.9 s, weights 1.2 s, int4 blocks and vocabulary 1.0 s, decoder and kernel"
        " choice 0.4 s)\n",
    ]
    split = phases(log, [2.2, 2.4, 3.1, 6.4], reply_s=7.6)
    assert split["imports, config and database (until the web chat listens)"] == pytest.approx(2.2)
    assert split["before the model's loading"] == pytest.approx(0.7)  # 6.4 - 3.5 - 2.2
    assert split["model: weights"] == 1.2 and split["model: int4 blocks and vocabulary"] == 1.0
    assert split["model: decoder and kernel choice"] == 0.4
    assert split["first reply after the model was ready"] == pytest.approx(1.2)
    assert phases(["nothing useful\n"], [0.5], reply_s=1.0) == {}
