"""Shared fixtures: configs in temporary directories, agents, and a tiny local model.

The tiny model is a randomly initialised 2-layer Llama with the real SmolLM2 tokenizer,
saved once under .test-cache/ (the tokenizer conversion from the GGUF takes seconds).
The real SmolLM2 is converted once into .test-cache/models and shared by the tests
that use it.

``ATTUNE_TEST_STORAGE=postgresql`` runs the tests on PostgreSQL: the session starts a
throwaway server on 127.0.0.1 (storage/local_postgres.py) and every config written by
:func:`write_config` gets a fresh database of its own. Tests about SQLite itself (its
files, pragmas, locks) are marked ``sqlite_only`` and left out of that run; tests of
several processes on one server are marked ``postgres_only`` and run only there; tests
that never touch the database are marked ``no_database`` and run in the SQLite pass only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent
from storage import Database, PostgresDatabase, SqliteDatabase
from storage.local_postgres import LocalPostgres

STORAGE = os.environ.get("ATTUNE_TEST_STORAGE", "sqlite")
_postgres: LocalPostgres | None = None
_database_numbers = itertools.count(1)
_urls: dict[Path, str] = {}  # each directory's database, in a PostgreSQL run

ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = ROOT / ".test-cache"
MODEL_CACHE = TEST_CACHE / "models"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
ATTUNE = str(Path(sys.executable).parent / "attune")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the tests about the other engine, and on PostgreSQL those that never touch
    the database (deselected, not skipped: they ran in the SQLite pass)."""
    others = ("sqlite_only", "no_database") if STORAGE == "postgresql" else ("postgres_only",)
    left_out = [item for item in items if any(item.get_closest_marker(m) for m in others)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


@pytest.fixture(scope="session", autouse=True)
def postgres_server() -> Iterator[LocalPostgres | None]:
    """The PostgreSQL server of a PostgreSQL run (None on SQLite)."""
    global _postgres
    if STORAGE != "postgresql":
        yield None
        return
    with LocalPostgres() as server:
        _postgres = server
        yield server
        _postgres = None


def fresh_database_url() -> str:
    """A new empty database on the run's PostgreSQL server."""
    assert _postgres is not None, "only in a PostgreSQL run (ATTUNE_TEST_STORAGE=postgresql)"
    return _postgres.create_database(f"test_{os.getpid()}_{next(_database_numbers)}")


async def open_database(path: Path, **options: Any) -> Database:
    """A fresh database of the run's engine: the SQLite file ``path``, or a new PostgreSQL database."""
    if STORAGE == "postgresql":
        return await PostgresDatabase.open(fresh_database_url(), **options)
    return await SqliteDatabase.open(path, **options)


def other_connection(db: Database) -> AbstractContextManager[Any]:
    """A second, plain (blocking) connection to ``db``'s database."""
    if isinstance(db, PostgresDatabase):
        return psycopg.connect(db.where)
    return sqlite3.connect(db.path)  # type: ignore[attr-defined]


def query(directory: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` on the database of the config written in ``directory``, read
    through a plain blocking connection of the run's engine (no parameters)."""
    if STORAGE == "postgresql":
        with psycopg.connect(_urls[directory]) as conn:
            return [tuple(r) for r in conn.execute(sql)]  # type: ignore[call-overload]
    with contextlib.closing(sqlite3.connect(directory / "data" / "attune.db")) as conn:
        return conn.execute(sql).fetchall()


def integrity(directory: Path) -> str:
    """The engine's own check of that database: "ok" or what is damaged."""
    if STORAGE == "postgresql":
        tables = query(directory, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        for (table,) in tables:
            query(directory, f"SELECT COUNT(*) FROM {table}")  # a damaged page fails the read
        return "ok"
    return "; ".join(str(r[0]) for r in query(directory, "PRAGMA integrity_check"))


def write_config(directory: Path, text: str = "") -> Path:
    """A config file whose data_dir is ``directory/data`` (and, in a PostgreSQL run, whose
    database is a fresh one on the run's server), plus ``text``."""
    path = directory / "attune.toml"
    if STORAGE == "postgresql" and directory not in _urls:
        _urls[directory] = fresh_database_url()
    url = f'url = "{_urls[directory]}"\n' if STORAGE == "postgresql" else ""
    path.write_text(f'[storage]\ndata_dir = "{directory / "data"}"\n{url}' + text, encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(text: str = "", environ: dict[str, str] | None = None) -> Config:
        return load_config(write_config(tmp_path, text), environ=environ or {})

    return make


@pytest.fixture
async def agent(make_config: Callable[..., Config]) -> AsyncIterator[Agent]:
    """An Agent on a fresh database with the recording backend."""
    backend = RecordingBackend()
    opened = await open_agent(make_config(), llm=backend)
    await backend.start()
    yield opened
    await opened.close()


async def recorded_reply_id(agent: Agent, timeout_s: float = 10.0) -> str:
    """The platform's id of the (first) stored reply, once the connector recorded it: that
    happens after the platform answered the send, so a moment after a fake server saw it
    (react before and the reaction has no target)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await agent.store.db.fetchone(
            "SELECT platform_message_id FROM messages WHERE role = 'assistant' ORDER BY id LIMIT 1"
        )
        if row is not None and row[0] is not None:
            return str(row[0])
        assert asyncio.get_running_loop().time() < deadline, "the reply's platform id was never recorded"
        await asyncio.sleep(0.02)


def random_lora(
    model_dir: Path, out: Path, *, seed: int, std: float = 2.0, targets: tuple[str, ...] = ("q_proj", "v_proj")
) -> Path:
    """A peft LoRA adapter for the model in ``model_dir`` with random non-zero weights
    (so it changes the outputs), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets), init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


def plain_generate(
    model_dir: Path,
    messages: list[dict[str, str]],
    tokens: int,
    *,
    adapter: Path | None = None,
    repetition_penalty: float = 1.0,
    start: str = "",
) -> str:
    """Greedy reply from plain transformers ``generate`` (with peft for an adapter), written
    on from ``start``: what the local backend's own paths are checked against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if start:
        begun = tokenizer(start, add_special_tokens=False, return_tensors="pt")
        inputs = {k: torch.cat([inputs[k], begun[k]], dim=1) for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=tokens,
            repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _smollm2_tokenizer() -> Path:
    target = TEST_CACHE / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from agent_core.llm.model_files import find_model

        source = find_model("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A transformers model directory: tiny random Llama, real SmolLM2 tokenizer."""
    target = TEST_CACHE / "tiny-llama-v2"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def tiny_config_text(model_dir: Path, extra: str = "", max_new_tokens: int = 12) -> str:
    return (
        f'[llm]\nmax_new_tokens = {max_new_tokens}\ntemperature = 0.0\n[llm.local]\nmodel = "{model_dir}"\n'
        f'cache_dir = "{MODEL_CACHE}"\nthreads = 1\n' + extra
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    shots = sorted(SCREENSHOTS.glob("*.png")) if SCREENSHOTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"screenshots of the web chat and dashboard: {SCREENSHOTS}")
