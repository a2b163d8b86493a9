"""Start-up failures reach the user as one clear line; secrets never reach the logs."""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from agent_core.logs import RedactSecrets
from storage.database import migrations
from tests.conftest import ATTUNE, write_config


def _attune(
    tmp_path: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")} | (env or {})
    return subprocess.run(
        [ATTUNE, *args], input=stdin, capture_output=True, text=True, timeout=120, env=clean, cwd=tmp_path
    )


@pytest.mark.sqlite_only
def test_a_database_from_a_newer_attune_stops_start_up(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[llm]\nbackend = "openai"\n')
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "attune.db") as db:
        db.execute(f"PRAGMA user_version = {len(migrations()) + 1}")
    result = _attune(tmp_path, "--config", str(config), "chat", stdin="hello\n")
    assert result.returncode == 1
    assert "newer attune: upgrade attune" in result.stderr and "Traceback" not in result.stderr
    with sqlite3.connect(tmp_path / "data" / "attune.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(migrations()) + 1  # left as it was


def test_a_missing_model_says_what_to_do(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[llm.local]\nmodel = "{tmp_path / "nowhere"}"\n')
    result = _attune(tmp_path, "--config", str(config), "run")
    assert result.returncode == 1
    assert "not a transformers model directory" in result.stderr and "Traceback" not in result.stderr


def test_log_lines_never_show_a_secret() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets(["sk-top-secret"]))
    logger = logging.getLogger("attune.test.redact")
    logger.addHandler(handler)
    try:
        logger.warning("calling with key %s", "sk-top-secret")
        try:
            raise RuntimeError("bad key sk-top-secret")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "sk-top-secret" not in text
    assert "calling with key ***" in text and "bad key ***" in text


def test_the_api_key_stays_out_of_a_failing_runs_output(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        '[llm]\nbackend = "openai"\ntimeout_s = 5.0\n[llm.openai]\nbase_url = "http://127.0.0.1:9/v1"\n'
        'max_retries = 0\n[logging]\nlevel = "DEBUG"\n',
    )
    result = _attune(
        tmp_path, "--config", str(config), "chat", stdin="hello\n", env={"OPENAI_API_KEY": "sk-do-not-print"}
    )
    assert result.returncode == 0
    assert "Sorry, I couldn't come up with an answer" in result.stdout  # the server is unreachable
    assert "sk-do-not-print" not in result.stdout + result.stderr
