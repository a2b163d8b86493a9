"""Platform adapters: one module each, registered here with one line.

The contract every adapter follows is :class:`bots.base.Adapter`.
"""

from __future__ import annotations

from agent_core.config import Config
from bots.base import Adapter
from bots.discord import DiscordAdapter
from bots.slack import SlackAdapter
from bots.telegram import TelegramAdapter
from bots.terminal import TerminalAdapter
from bots.web import WebAdapter

# Every platform attune can talk on. A new platform: one module, one line here.
ADAPTERS: dict[str, type[Adapter]] = {
    "web": WebAdapter,
    "terminal": TerminalAdapter,
    "telegram": TelegramAdapter,
    "slack": SlackAdapter,
    "discord": DiscordAdapter,
}

# What `attune run` starts when no platform is configured.
DEFAULT_FRONT_END: type[Adapter] = WebAdapter


def configured_adapters(config: Config) -> list[type[Adapter]]:
    """The adapters `attune run` starts: every platform whose token is set, and the
    default front end beside them (unless ``[run] default_front_end`` is false), or
    alone when no platform is configured."""
    chosen = [cls for cls in ADAPTERS.values() if cls is not DEFAULT_FRONT_END and cls.configured(config)]
    if config.settings.run.default_front_end or not chosen:
        chosen.append(DEFAULT_FRONT_END)
    return chosen


__all__ = ["ADAPTERS", "DEFAULT_FRONT_END", "Adapter", "configured_adapters"]
