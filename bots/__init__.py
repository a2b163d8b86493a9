"""Platform adapters: one module each, registered here with one line.

The contract every adapter follows is :class:`bots.base.Adapter`.
"""

from __future__ import annotations

from agent_core.config import Config
from bots.base import Adapter
from bots.terminal import TerminalAdapter

# Every platform attune can talk on. A new platform: one module, one line here.
ADAPTERS: dict[str, type[Adapter]] = {
    "terminal": TerminalAdapter,
}

# What `attune run` starts when no platform is configured.
DEFAULT_FRONT_END: type[Adapter] = TerminalAdapter


def configured_adapters(config: Config) -> list[type[Adapter]]:
    """The adapters to start: every configured platform, else the default front end."""
    chosen = [cls for cls in ADAPTERS.values() if cls.configured(config)]
    return chosen or [DEFAULT_FRONT_END]


__all__ = ["ADAPTERS", "DEFAULT_FRONT_END", "Adapter", "configured_adapters"]
