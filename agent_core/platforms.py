"""What a platform declares about itself, so that the core needs no platform's name.

Each module in ``bots/`` ends with one :class:`PlatformSpec`; ``bots.PLATFORMS`` lists
them and the composition root (``attune.wiring``) hands them to :func:`load_config`.
From them the core builds the ``[<platform>]`` sections of the configuration and their
``ATTUNE_<PLATFORM>__<KEY>`` overrides, ``attune config show``, the secrets read from the
environment (masked, kept out of the file, redacted from logs), the SDK loggers kept
quiet, and the reading of the platform's reaction names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class Secret:
    """One secret of a platform: read only from ``env``; a file holding ``file_key`` is refused."""

    name: str  # how the connector asks for it: ``config.secrets.get(name)``
    env: str  # the environment variable it comes from
    file_key: str  # where someone might wrongly put it in config.toml ("<platform>.token")


def same_name(reaction: str) -> str:
    """The reaction as the platform sends it (an emoji, or a name that ``[rewards]`` lists)."""
    return reaction


@dataclass(frozen=True)
class PlatformSpec:
    """A platform's declarations (see the module docstring for what is built from them)."""

    #: The platform's name in events, in the database and as its config section.
    name: str
    #: The ``[<name>]`` section: its keys, defaults and validation (a pydantic model that
    #: forbids unknown keys, as ``agent_core.config.Section`` does); None: no section.
    settings: type[BaseModel] | None = None
    #: The secrets it reads from the environment.
    secrets: tuple[Secret, ...] = ()
    #: Its SDK's loggers: kept at INFO or above, as their debug output holds what people wrote.
    loggers: tuple[str, ...] = ()
    #: A reaction as the platform names it, to the spelling ``[rewards]`` uses
    #: (skin tones and variation selectors are dropped for every platform afterwards).
    reaction_name: Callable[[str], str] = same_name
    #: How its events are named (``Event.event_id``): unique on the platform, so that an
    #: event delivered twice is handled once; written down here as the contract's record.
    event_ids: str = ""
    #: The pip requirements of its SDK, installed with attune (setup.py reads them from the
    #: module's source, so write them as a literal tuple of strings); (): none beyond attune's own.
    requirements: tuple[str, ...] = ()
