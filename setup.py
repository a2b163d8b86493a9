"""The package's dependencies: attune's own plus each registered platform's SDK.

Everything else about the package is in pyproject.toml. This file exists for one thing
setuptools cannot read from a table: the requirements each platform declares in its own
module (``PLATFORM = PlatformSpec(..., requirements=("sdk>=1",))`` in ``bots/<name>.py``),
for the platforms listed in ``REGISTERED`` in ``bots/__init__.py``. Adding a platform is
then one module and one registration line; its SDK is installed with attune.

The modules are read, not imported: at build time their SDKs are not installed yet. So
``requirements`` must be written as a literal tuple of strings (tests/test_platforms.py
checks that what is read here is what the registry declares).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent


def registered_modules(bots: Path = ROOT / "bots") -> list[str]:
    """The modules named in ``REGISTERED``: each entry is ``(<module>.PLATFORM, <module>.<Connector>)``."""
    tree = ast.parse((bots / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if not isinstance(node, ast.AnnAssign | ast.Assign):
            continue
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        if isinstance(target, ast.Name) and target.id == "REGISTERED" and isinstance(node.value, ast.List):
            return [
                entry.elts[0].value.id
                for entry in node.value.elts
                if isinstance(entry, ast.Tuple)
                and isinstance(entry.elts[0], ast.Attribute)
                and isinstance(entry.elts[0].value, ast.Name)
            ]
    raise SystemExit(f"{bots / '__init__.py'}: no REGISTERED list of (<module>.PLATFORM, <Connector>) entries")


def declared_requirements(module: Path) -> list[str]:
    """The ``requirements`` keyword of the module's ``PLATFORM = PlatformSpec(...)`` (none: [])."""
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PLATFORM" for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            for keyword in node.value.keywords:
                if keyword.arg == "requirements":
                    try:
                        return list(ast.literal_eval(keyword.value))
                    except ValueError:
                        raise SystemExit(
                            f"{module}: PLATFORM's requirements must be a literal tuple of strings"
                        ) from None
            return []
    raise SystemExit(f"{module}: registered in bots/__init__.py but has no PLATFORM = PlatformSpec(...)")


def platform_requirements(bots: Path = ROOT / "bots") -> list[str]:
    """Every registered platform's requirements, in registration order, each once."""
    found: list[str] = []
    for name in registered_modules(bots):
        found += [r for r in declared_requirements(bots / f"{name}.py") if r not in found]
    return found


def dependencies() -> list[str]:
    core = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["attune"]["core-dependencies"]
    return [*core, *platform_requirements()]


if __name__ == "__main__":  # as setuptools runs it
    from setuptools import setup

    setup(install_requires=dependencies())
