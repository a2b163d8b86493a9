"""The style vocabulary shared by preferences, the policy, prompts and benchmarks.

A reply's style is one value for each of four dimensions (see DESIGN.md):

    length: brief | detailed     tone: casual | formal
    emoji:  none | some          format: prose | bullets
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Length = Literal["brief", "detailed"]
Tone = Literal["casual", "formal"]
Emoji = Literal["none", "some"]
Format = Literal["prose", "bullets"]

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "length": get_args(Length),
    "tone": get_args(Tone),
    "emoji": get_args(Emoji),
    "format": get_args(Format),
}

# What each value asks of the model, as one sentence of the system prompt.
INSTRUCTIONS: dict[tuple[str, str], str] = {
    ("length", "brief"): "Answer in one to three short sentences.",
    ("length", "detailed"): "Answer thoroughly, with explanation and examples.",
    ("tone", "casual"): "Use a relaxed, friendly, conversational tone.",
    ("tone", "formal"): "Use a polite, formal, professional tone.",
    ("emoji", "none"): "Do not use emoji.",
    ("emoji", "some"): "Add a few fitting emoji.",
    ("format", "prose"): "Write in flowing prose, without lists.",
    ("format", "bullets"): "Format the answer as a bulleted list.",
}


@dataclass(frozen=True)
class Style:
    """One value per dimension; what a reply was asked to look like."""

    length: Length
    tone: Tone
    emoji: Emoji
    format: Format

    def as_dict(self) -> dict[str, str]:
        return {dim: getattr(self, dim) for dim in DIMENSIONS}

    def instructions(self) -> str:
        return " ".join(INSTRUCTIONS[(dim, value)] for dim, value in self.as_dict().items())

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Style:
        return cls(**{dim: data[dim] for dim in DIMENSIONS})  # type: ignore[arg-type]


def is_valid(dimension: str, value: str) -> bool:
    return value in DIMENSIONS.get(dimension, ())
