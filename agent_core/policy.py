"""The style policy: which style a reply to this user should have.

An explicit ``/prefs`` setting always wins; the policy decides only the dimensions the
user left open. :class:`DefaultsPolicy` fills them from ``[style]`` in config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from agent_core.config import StyleDefaults
from agent_core.style import DIMENSIONS, Style


class StylePolicy(ABC):
    @abstractmethod
    async def choose(self, user_id: int, text: str, fixed: dict[str, str]) -> Style:
        """The style for a reply to ``text``; ``fixed`` holds the user's explicit settings."""


class DefaultsPolicy(StylePolicy):
    """The configured default for every dimension the user has not fixed."""

    def __init__(self, defaults: StyleDefaults) -> None:
        self.defaults = defaults.model_dump()

    async def choose(self, user_id: int, text: str, fixed: dict[str, str]) -> Style:
        return Style.from_dict({dim: fixed.get(dim, self.defaults[dim]) for dim in DIMENSIONS})
