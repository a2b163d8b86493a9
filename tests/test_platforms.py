"""Platforms declare themselves: the core is built from their declarations and names none of them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import logging
import re
import tokenize
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from agent_core import config as core_config
from agent_core.config import ConfigError, Section, effective_settings
from agent_core.logs import setup_logging
from agent_core.platforms import PlatformSpec, Secret
from bots import CONNECTORS, PLATFORMS, REGISTERED
from tests.conftest import write_config

pytestmark = pytest.mark.no_database  # no database here: not run again on PostgreSQL

ROOT = Path(__file__).resolve().parent.parent


class MatrixSettings(Section):
    """on when MATRIX_ACCESS_TOKEN is set"""

    homeserver: str = "https://matrix.example"
    """the homeserver's address"""
    sync_timeout_s: float = 30.0
    """long-polling timeout of /sync"""


MATRIX = PlatformSpec(
    name="matrix",
    settings=MatrixSettings,
    secrets=(Secret("matrix_access_token", "MATRIX_ACCESS_TOKEN", "matrix.access_token"),),
    loggers=("nio",),
    event_ids="'<room>:<event id>'",
)


def test_a_new_platforms_declarations_give_its_section_secrets_and_quiet_loggers(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[matrix]\nhomeserver = "http://127.0.0.1:8008"\n')
    env = {"ATTUNE_MATRIX__SYNC_TIMEOUT_S": "5", "MATRIX_ACCESS_TOKEN": "syt_very_secret"}
    config = core_config.load_config(path, environ=env, platforms=[MATRIX])
    section = config.settings.matrix  # type: ignore[attr-defined]
    assert section == MatrixSettings(homeserver="http://127.0.0.1:8008", sync_timeout_s=5.0)
    assert config.secrets.get("matrix_access_token") == "syt_very_secret"
    assert "syt_very_secret" in config.secrets.values()  # what the log filter masks
    assert core_config.load_config(path, environ={}, platforms=[MATRIX]).secrets.get("matrix_access_token") is None
    with pytest.raises(KeyError, match="no secret named 'platform'"):
        config.secrets.get("platform")  # a field of Secrets, not a secret
    shown = effective_settings(config)
    assert shown["matrix"]["homeserver"] == "http://127.0.0.1:8008"
    assert shown["secrets"]["MATRIX_ACCESS_TOKEN"] == "******** (set)" and "syt_very_secret" not in str(shown)
    with pytest.raises(ConfigError, match=r"matrix\.access_token: secrets are read only.*MATRIX_ACCESS_TOKEN"):
        core_config.load_config(
            write_config(tmp_path, '[matrix]\naccess_token = "x"\n'), environ={}, platforms=[MATRIX]
        )
    with pytest.raises(ConfigError, match=r"matrix\.colour: unknown key"):
        core_config.load_config(write_config(tmp_path, '[matrix]\ncolour = "red"\n'), environ={}, platforms=[MATRIX])
    with pytest.raises(ConfigError, match=r"matrix: unknown key"):  # not registered: not a section
        core_config.load_config(path, environ={})
    documented = core_config.document_section("matrix", MatrixSettings)  # its part of config.toml
    assert documented.splitlines() == [
        "[matrix]                        # on when MATRIX_ACCESS_TOKEN is set",
        'homeserver = "https://matrix.example"  # the homeserver\'s address',
        "sync_timeout_s = 30.0           # long-polling timeout of /sync",
    ]
    assert tomllib.loads(documented) == {"matrix": MatrixSettings().model_dump()}
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("DEBUG", [], MATRIX.loggers)
        assert not logging.getLogger("nio.client").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], root.level = saved
        logging.getLogger("nio").setLevel(logging.NOTSET)


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attune_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: setup() is not called
    return module


def test_every_registered_platform_is_consistent_and_its_requirements_are_installed() -> None:
    installed = [Requirement(r) for r in importlib.metadata.requires("attune") or []]
    declared = [r for spec in PLATFORMS for r in spec.requirements]
    assert declared, "no platform declares its SDK"
    assert set(_setup_module().platform_requirements()) == set(declared)  # what setup.py reads from the modules
    assert len({spec.name for spec in PLATFORMS}) == len(PLATFORMS)
    for spec, connector in REGISTERED:
        assert connector.platform == spec.name and CONNECTORS[spec.name] is connector
        assert spec.event_ids, f"{spec.name} does not say how its events are named"
        for requirement in spec.requirements:
            assert Requirement(requirement) in installed, f"{requirement}: not among attune's dependencies"
        for secret in spec.secrets:
            assert secret.file_key.split(".")[0] == spec.name, secret


def test_a_new_platform_module_and_its_registration_line_bring_its_sdk_into_the_dependencies(tmp_path: Path) -> None:
    setup = _setup_module()
    bots = tmp_path / "bots"
    bots.mkdir()
    init = (ROOT / "bots" / "__init__.py").read_text(encoding="utf-8")
    end = "\n]\nPLATFORMS"  # the end of the REGISTERED list: the new line goes last
    assert end in init
    line = "\n    (rocketchat.PLATFORM, rocketchat.RocketchatConnector),"
    (bots / "__init__.py").write_text(init.replace(end, line + end))
    for spec in PLATFORMS:
        (bots / f"{spec.name}.py").write_text((ROOT / "bots" / f"{spec.name}.py").read_text(encoding="utf-8"))
    spec_line = 'PLATFORM = PlatformSpec(name="rocketchat", requirements=("rocketchat-sdk>=1",))\n'
    (bots / "rocketchat.py").write_text(spec_line)
    found = setup.platform_requirements(bots)
    assert found == [*setup.platform_requirements(), "rocketchat-sdk>=1"]
    (bots / "rocketchat.py").write_text("PLATFORM = PlatformSpec(name='rocketchat', requirements=REQUIREMENTS)\n")
    with pytest.raises(SystemExit, match=r"rocketchat.py: PLATFORM's requirements must be a literal tuple"):
        setup.platform_requirements(bots)
    (bots / "rocketchat.py").write_text("SPEC = 1\n")
    with pytest.raises(SystemExit, match=r"rocketchat.py: registered in bots/__init__.py but has no PLATFORM"):
        setup.platform_requirements(bots)


def _code_words(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, word, kind) of the code in one file: each part of an identifier of two or
    more parts (``slack_token``, ``SlackSettings``; ``def matrix`` is a plain word), the words
    of a string literal, and, in comments and docstrings, only a word written as a name
    (quoted, bracketed, or before a colon: "web", [web], web:ann). So prose may use a
    platform's name as a plain word (a matrix product, some slack)."""
    text = path.read_text(encoding="utf-8")
    as_name = re.compile(r"""["'`\[]([a-z]+)[]"'`:]""")
    if path.suffix == ".sql":
        for number, line in enumerate(text.splitlines(), 1):
            code, _, comment = line.partition("--")
            yield from ((number, w.lower(), "sql") for w in re.findall(r"[A-Za-z]+", code))
            yield from ((number, w, "comment") for w in as_name.findall(comment))
        return
    previous = tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        number = token.start[0]
        if token.type == tokenize.NAME:
            parts = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", token.string)
            if len(parts) > 1:  # slack_token, SlackSettings; a plain word alone (def matrix) is not a name
                yield from ((number, part.lower(), "identifier") for part in parts)
        elif token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT):
            yield from ((number, w, "docstring") for w in as_name.findall(token.string))  # a docstring
        elif token.type == tokenize.STRING:
            yield from ((number, w.lower(), "string") for w in re.findall(r"[A-Za-z]+", token.string))
        elif token.type == tokenize.COMMENT:
            yield from ((number, w, "comment") for w in as_name.findall(token.string))
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type


def test_no_platform_is_named_in_the_core_or_in_storage() -> None:
    names = {spec.name for spec in PLATFORMS}
    found = []
    for folder in ("agent_core", "storage"):
        for path in sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.sql")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, word, kind in _code_words(path):
                if word in names:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {kind} {word!r}: {lines[number - 1].strip()}")
    assert not found, "platform names in the core or storage:\n" + "\n".join(found)


def test_the_name_check_reads_code_and_lets_prose_use_plain_words(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""A matrix product; the "web" front end."""\n'
        "# some slack here, and [discord] there\n"
        "slack_token = SlackSettings(matrix)\n"
        "if platform == 'telegram:1':\n"
        "    pass\n",
        encoding="utf-8",
    )
    words = {(number, word, kind) for number, word, kind in _code_words(sample)}
    assert (1, "matrix", "docstring") not in words and (1, "web", "docstring") in words
    assert (2, "slack", "comment") not in words and (2, "discord", "comment") in words
    assert {(3, "slack", "identifier"), (3, "token", "identifier"), (3, "settings", "identifier")} <= words
    assert (3, "matrix", "identifier") not in words
    assert (4, "telegram", "string") in words
