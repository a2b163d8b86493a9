"""Configuration: defaults, file, environment, and one clear message for each kind of mistake."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent_core.config import ConfigError, document_section, effective_settings
from attune.wiring import Settings, load_config
from bots import PLATFORMS
from tests.conftest import ATTUNE, ROOT, write_config

PLATFORM_SECTIONS = {spec.name for spec in PLATFORMS if spec.settings is not None}


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "rewards":
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_config_toml_lists_every_setting_with_its_default_and_a_comment() -> None:
    text = (ROOT / "config.toml").read_text(encoding="utf-8")
    sections = tomllib.loads(text)
    in_file = _leaves(sections)
    # Every core setting; each platform's section as its module documents it (the next test),
    # so that a platform added in its module alone is no gap here (`attune config sections`).
    expected = {k: v for k, v in Settings().model_dump().items() if k not in PLATFORM_SECTIONS or k in sections}
    defaults = _leaves(expected)
    assert in_file == defaults
    for key in defaults:
        start = "[rewards]" if key == "rewards" else f"{key.rsplit('.', 1)[-1]} ="
        line = next(line for line in text.splitlines() if line.startswith(start))
        assert "#" in line, f"{key} has no comment in config.toml"


def test_each_platform_documents_its_section_in_its_module_and_config_toml_shows_it_from_there() -> None:
    text = (ROOT / "config.toml").read_text(encoding="utf-8")
    assert {"web", "telegram", "slack", "discord"} <= PLATFORM_SECTIONS
    for spec in PLATFORMS:
        if spec.settings is None:
            continue
        assert spec.settings.__doc__, f"{spec.name}'s settings class has no docstring (its section's note)"
        undocumented = [key for key, field in spec.settings.model_fields.items() if not field.description]
        assert undocumented == [], f"{spec.name}: keys without a docstring"
        block = document_section(spec.name, spec.settings)
        assert f"[{spec.name}]" not in text or block in text, f"config.toml's [{spec.name}] is not its module's"
    printed = _attune("config", "sections", env={"ATTUNE_CONFIG": "/nonexistent.toml"}, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr  # documentation: no settings file needed
    assert tomllib.loads(printed.stdout) == {k: v for k, v in Settings().model_dump().items() if k in PLATFORM_SECTIONS}
    for line in printed.stdout.splitlines():
        assert not line or line.startswith("#") or "  # " in line, f"no comment: {line}"


def test_the_shipped_file_loads_cleanly() -> None:
    config = load_config(ROOT / "config.toml", environ={})
    assert config.settings == Settings()
    assert config.source == ROOT / "config.toml"


def test_environment_overrides_nested_settings(tmp_path: Path) -> None:
    env = {
        "ATTUNE_LLM__BACKEND": "openai",
        "ATTUNE_LLM__OPENAI__BASE_URL": "http://127.0.0.1:9000/v1",
        "ATTUNE_LIMITS__MESSAGES_PER_MINUTE": "7",
        "ATTUNE_LLM__TEMPERATURE": "0",
        "ATTUNE_CONFIG_UNRELATED": "x",  # no "__": not a settings override
    }
    config = load_config(write_config(tmp_path), environ=env)
    assert config.settings.llm.backend == "openai"
    assert config.settings.llm.openai.base_url == "http://127.0.0.1:9000/v1"
    assert config.settings.limits.messages_per_minute == 7
    assert config.settings.llm.temperature == 0.0
    assert config.settings.storage.data_path == (tmp_path / "data").resolve()


def test_reward_entries_add_to_the_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, '[rewards]\n"🦄" = 0.9\n'), environ={"ATTUNE_REWARDS__FIRE": "0.1"})
    rewards = config.settings.rewards
    assert rewards["🦄"] == 0.9 and rewards["fire"] == 0.1 and rewards["👍"] == 1.0


def test_attune_config_variable_and_flag_select_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[agent]\nname = "from-file"\n')
    assert load_config(environ={"ATTUNE_CONFIG": str(path)}).settings.agent.name == "from-file"
    assert load_config(path, environ={"ATTUNE_CONFIG": "/nonexistent.toml"}).settings.agent.name == "from-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[llm]\nbackend = "llama"\n', r"llm\.backend: input should be 'local' or 'openai' \(got 'llama'\)"),
        ('[limits]\nmessages_per_minute = "many"\n', r"limits\.messages_per_minute: input should be a valid int"),
        ("[limits]\nmessages_per_minute = 0\n", r"limits\.messages_per_minute: input should be greater than or equal"),
        ("[llm]\ntemprature = 0.5\n", r"llm\.temprature: unknown key"),
        ("[webchat]\nport = 1\n", r"webchat: unknown key"),
        ('[rewards]\n"👍" = 3\n', r"rewards\.👍: input should be less than or equal to 1"),
        ('[style]\ntone = "sarcastic"\n', r"style\.tone: input should be 'casual' or 'formal'"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert re.search(expected, message), message
    assert str(path) in message


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match=r"limits\.messages_per_minute: .*ATTUNE_LIMITS__MESSAGES_PER_MINUTE"):
        load_config(path, environ={"ATTUNE_LIMITS__MESSAGES_PER_MINUTE": "lots"})
    with pytest.raises(ConfigError, match=r"llm\.colour: unknown key \(from environment variable ATTUNE_LLM__COLOUR\)"):
        load_config(path, environ={"ATTUNE_LLM__COLOUR": "red"})
    with pytest.raises(ConfigError, match=r"llm\.backend: .*environment variable ATTUNE_LLM__BACKEND"):
        load_config(path, environ={"ATTUNE_LLM__BACKEND": "gpt"})


def test_the_database_url_names_its_problem_and_never_shows_a_password(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match=r"storage\.url: .*a PostgreSQL URL.*ATTUNE_STORAGE__URL"):
        load_config(path, environ={"ATTUNE_STORAGE__URL": "mysql://db.example/attune"})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"ATTUNE_STORAGE__URL": "postgresql://bot:hunter2@db.example/attune"})
    assert "set PGPASSWORD" in str(caught.value) and "hunter2" not in str(caught.value)
    url = "postgresql://bot@db.example:5433/attune"
    config = load_config(path, environ={"ATTUNE_STORAGE__URL": url, "PGPASSWORD": "hunter2"})
    assert config.settings.storage.url == url and config.secrets.get("database_password") == "hunter2"
    assert config.settings.storage.sqlalchemy_url == "postgresql+psycopg://bot@db.example:5433/attune"


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[llm\nbackend = local\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_secrets_come_only_from_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[llm.openai]\napi_key = "sk-in-file"\n')
    secret_in_file = r"llm\.openai\.api_key: secrets are read only from the environment.*OPENAI_API_KEY"
    with pytest.raises(ConfigError, match=secret_in_file):
        load_config(path, environ={})
    config = load_config(write_config(tmp_path), environ={"OPENAI_API_KEY": "sk-live-123"})
    assert config.secrets.openai_api_key is not None
    assert config.secrets.openai_api_key.get_secret_value() == "sk-live-123"
    assert "sk-live-123" not in repr(config) and "sk-live-123" not in str(effective_settings(config))


def _attune(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_") and k != "OPENAI_API_KEY"}
    return subprocess.run([ATTUNE, *args], env=clean | env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_config_show_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[agent]\nname = "shown"\n')
    result = _attune(
        "--config",
        str(path),
        "config",
        "show",
        env={"OPENAI_API_KEY": "sk-very-secret", "ATTUNE_LLM__OPENAI__MODEL": "my-model"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["agent"]["name"] == "shown"
    assert shown["llm"]["openai"]["model"] == "my-model"
    assert shown["secrets"]["OPENAI_API_KEY"] == "******** (set)"
    assert "sk-very-secret" not in result.stdout + result.stderr


def test_a_config_error_stops_start_up_with_one_message(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[storage.extra]\nx = 1\n")
    result = _attune("--config", str(path), "run", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "storage.extra: unknown key" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing written
