"""Platform connectors: one module each, registered here with one line.

The contract every connector follows is :class:`bots.base.Connector`.
"""

from __future__ import annotations

from agent_core.config import Config
from bots.base import Connector
from bots.discord import DiscordConnector
from bots.slack import SlackConnector
from bots.telegram import TelegramConnector
from bots.terminal import TerminalConnector
from bots.web import WebConnector

# Every platform attune can talk on. A new platform: one module, one line here.
CONNECTORS: dict[str, type[Connector]] = {
    "web": WebConnector,
    "terminal": TerminalConnector,
    "telegram": TelegramConnector,
    "slack": SlackConnector,
    "discord": DiscordConnector,
}

# What `attune run` starts when no platform is configured.
DEFAULT_FRONT_END: type[Connector] = WebConnector


def configured_connectors(config: Config) -> list[type[Connector]]:
    """The connectors `attune run` starts: every platform whose token is set, and the
    default front end beside them (unless ``[run] default_front_end`` is false), or
    alone when no platform is configured."""
    chosen = [cls for cls in CONNECTORS.values() if cls is not DEFAULT_FRONT_END and cls.configured(config)]
    if config.settings.run.default_front_end or not chosen:
        chosen.append(DEFAULT_FRONT_END)
    return chosen


__all__ = ["CONNECTORS", "DEFAULT_FRONT_END", "Connector", "configured_connectors"]
