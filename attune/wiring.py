"""The wiring: which database engine, which platforms, the nightly scheduler, one agent.

Everything that needs two layers at once lives here, so that the layers themselves
import only downwards (``bots`` -> ``agent_core`` -> ``storage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent_core import config as core_config
from agent_core import logs
from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.llm import LLMBackend, create_backend
from bots import PLATFORMS
from storage import Database, PostgresDatabase, SqliteDatabase, Store
from storage.crypto import PLAIN, Cipher, Key

#: The settings with every registered platform's section ([web], [telegram], ...).
Settings = core_config.settings_model(PLATFORMS)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration (file, environment, secrets) with every registered platform."""
    return core_config.load_config(path, environ, PLATFORMS)


def platform_sections() -> str:
    """Every registered platform's ``[<name>]`` section, as config.toml lists them, from their modules."""
    return "\n".join(core_config.document_section(p.name, p.settings) for p in PLATFORMS if p.settings is not None)


def setup_logging(level: str, config: Config | None = None) -> None:
    """Logging on stderr with ``config``'s secrets masked and the platforms' SDKs kept quiet."""
    secrets = config.secrets.values() if config is not None else ()
    logs.setup_logging(level, secrets, [name for spec in PLATFORMS for name in spec.loggers])


async def open_database(config: Config, *, cipher: Cipher | None = None, rotating: bool = False) -> Database:
    """The configured database (``[storage] url``: PostgreSQL, else SQLite at ``data_dir``),
    migrated, with the encryption key from the environment (if set), or ``cipher``
    (``attune keys rotate``: both keys, and the database to itself)."""
    s = config.settings.storage
    if cipher is None:
        key = config.secrets.get("encryption_key")
        cipher = Cipher(Key.from_text(key)) if key else PLAIN
    if s.url:
        return await PostgresDatabase.open(s.url, cipher=cipher, rotating=rotating)
    return await SqliteDatabase.open(s.database_path, busy_timeout_ms=s.busy_timeout_ms, synchronous=s.synchronous,
                                     cipher=cipher, rotating=rotating)  # fmt: skip


async def open_agent(config: Config, llm: LLMBackend | None = None) -> Agent:
    """An agent on the configured database (opened and migrated) and the configured
    backend (``llm`` in its place if given); the backend is not started yet."""
    return Agent(config.settings, Store(await open_database(config)), llm or create_backend(config))
