"""attune's composition root: the ``attune`` command and the wiring of its parts.

The core (``agent_core``) knows neither the platforms (``bots``) nor the scheduler, and
picks no database engine; this package is the one place that puts them together (see
docs/ARCHITECTURE.md and the import-linter contracts in pyproject.toml).
"""
