"""Platform connectors: one module each, registered here with one line.

The contract every connector follows is :class:`bots.base.Connector`.
"""

from __future__ import annotations

from agent_core.config import Config
from agent_core.platforms import PlatformSpec
from bots import discord, slack, telegram, terminal, web
from bots.base import Connector
from bots.web import WebConnector

# Every platform attune can talk on: what it declares, and its connector. A new platform
# is one module in bots/ and one line here (see bots/README.md).
REGISTERED: list[tuple[PlatformSpec, type[Connector]]] = [
    (web.PLATFORM, web.WebConnector),
    (terminal.PLATFORM, terminal.TerminalConnector),
    (telegram.PLATFORM, telegram.TelegramConnector),
    (slack.PLATFORM, slack.SlackConnector),
    (discord.PLATFORM, discord.DiscordConnector),
]
PLATFORMS: tuple[PlatformSpec, ...] = tuple(spec for spec, _ in REGISTERED)
CONNECTORS: dict[str, type[Connector]] = {spec.name: connector for spec, connector in REGISTERED}

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


__all__ = ["CONNECTORS", "DEFAULT_FRONT_END", "PLATFORMS", "REGISTERED", "Connector", "configured_connectors"]
