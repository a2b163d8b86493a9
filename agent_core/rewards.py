"""Emoji to reward: the number in [-1, 1] a reaction means, from ``[rewards]`` in config."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Skin tones (U+1F3FB..U+1F3FF) and the text/emoji variation selectors.
_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0e\ufe0f]")


def normalize(emoji: str) -> str:
    """One spelling per reaction: ``👍🏽`` -> ``👍``, ``❤️`` -> ``❤``, ``:+1:`` -> ``+1``. A
    platform that names reactions its own way reads them first (``PlatformSpec.reaction_name``)."""
    name = emoji.strip()
    if name.startswith(":") and name.endswith(":") and len(name) > 2:
        name = name[1:-1]
    return _MODIFIERS.sub("", name)


class RewardMap:
    """Looks up the reward of an emoji; an unknown one counts 0 and is logged once."""

    def __init__(self, rewards: Mapping[str, float]) -> None:
        self._rewards = {normalize(k): max(-1.0, min(1.0, float(v))) for k, v in rewards.items()}
        self._unknown_logged: set[str] = set()

    def __call__(self, emoji: str) -> float:
        key = normalize(emoji)
        if key in self._rewards:
            return self._rewards[key]
        if key not in self._unknown_logged:
            self._unknown_logged.add(key)
            log.info("reaction %r has no reward in [rewards]; counting it as 0", key)
        return 0.0
