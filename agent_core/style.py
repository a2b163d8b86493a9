"""The style vocabulary shared by preferences, the policy, prompts and benchmarks.

A reply's style is one value for each of four dimensions (see DESIGN.md):

    length: brief | detailed     tone: casual | formal
    emoji:  none | some          format: prose | bullets
"""

from __future__ import annotations

import re
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


# A small model does not keep to "brief" when only asked: a brief reply also gets a token
# budget, and is cut after its last complete sentence.
BRIEF_TOKENS = 64
_SENTENCE_END = re.compile(
    "[.!?…][\"')\\]”’»]*(?:\\s*[\U0001f300-\U0001faff\u2600-\u27bf\U0001f000-\U0001f2ff\ufe0f\u200d]+)*(?=\\s|$)"
)


def token_budget(style: Style, configured: int) -> int:
    return min(configured, BRIEF_TOKENS) if style.length == "brief" else configured


def finish(text: str, style: Style | None = None) -> str:
    """The reply as sent: a brief one that was cut mid-sentence (by its small token budget)
    ends at its last full sentence, with the emoji that closed it; a lone list marker at
    the end goes whatever the style."""
    text = text.strip()
    if text.endswith(("\n-", "\n*")):
        text = text[:-2].rstrip()
    brief = style is not None and style.length == "brief"
    if not brief or not text or (_SENTENCE_END.search(text[-3:] + " ") and text[-1] not in "-*"):
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends and ends[-1] > len(text) * 0.3 else text


def is_valid(dimension: str, value: str) -> bool:
    return value in DIMENSIONS.get(dimension, ())


# --- what a reply actually looks like ------------------------------------------------------

BRIEF_MAX_WORDS = 60
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\U0001f000-\U0001f2ff]")
_BULLET = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+\S", re.M)
_CONTRACTION = re.compile(r"\b\w+'(?:s|re|ve|ll|d|m|t)\b|\b(?:gonna|wanna|gotta|yeah|yep|nope|hey|hi|cool|awesome|lol"
                          r"|btw|ok|okay|kinda|sorta|stuff|guys)\b", re.I)  # fmt: skip
_FORMAL = re.compile(r"\b(?:furthermore|moreover|therefore|however|additionally|consequently|regards|sincerely"
                     r"|kindly|please note|it is|one should|we recommend|in conclusion|certainly|indeed|shall"
                     r"|regarding|thus|hence)\b", re.I)  # fmt: skip


def measure_style(text: str) -> Style:
    """The style a reply actually has, observed in its text:

    - length: ``brief`` up to ``BRIEF_MAX_WORDS`` words, else ``detailed``;
    - emoji: ``some`` if any emoji character appears;
    - format: ``bullets`` if at least two lines start like list items (``-``, ``*``, ``1.``);
    - tone: ``casual`` if informal markers (contractions, "hey", "cool", "!") outweigh formal
      ones ("furthermore", "therefore", "please note", ...), else ``formal``.
    """
    words = len(text.split())
    casual = len(_CONTRACTION.findall(text)) + text.count("!") + len(_EMOJI.findall(text))
    formal = 2 * len(_FORMAL.findall(text))
    return Style(
        length="brief" if words <= BRIEF_MAX_WORDS else "detailed",
        tone="casual" if casual > formal else "formal",
        emoji="some" if _EMOJI.search(text) else "none",
        format="bullets" if len(_BULLET.findall(text)) >= 2 else "prose",
    )


def describe_asked_and_shown(table: dict[str, dict[str, tuple[int, int]]]) -> str:
    """One line: how often each value asked for showed in the text ("bullets 9/10")."""
    parts = [f"{value} {k}/{n}" for values in table.values() for value, (n, k) in values.items() if n]
    return "; ".join(parts) if parts else "no replies yet"
