"""The text features a simulated user can react to beyond the style (a population's ``text_effects``).

Each feature reads the reply text the user sees and says yes or no. These are the
benchmark's hidden tastes: agent_core never sees these names or rules, it has to learn
them from the reactions (issue 19). How each is read:

- ``asks_followup``: the reply's last sentence ends with a question mark;
- ``has_number``: it contains a digit;
- ``gives_example``: it says "for example", "for instance", "e.g." or "such as";
- ``opens_with_filler``: its first sentence opens with "Sure", "Great", "Of course",
  "Certainly" or the word "I";
- ``mentions_name``: the user's display name appears (case-insensitive, as a word);
- ``short_sentences``: its sentences average under 12 words;
- ``uses_you``: it addresses the reader as "you" (you, your, yours, yourself);
- ``ends_with_summary``: its last line starts with "In short", "Overall" or "To sum up".
"""

from __future__ import annotations

import re
from collections.abc import Callable

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_WORD = re.compile(r"[A-Za-z0-9']+")
_FILLER = re.compile(r"^\W*(sure|great|of course|certainly|i)\b", re.IGNORECASE)
_EXAMPLE = re.compile(r"\b(for example|for instance|such as)\b|\be\.g\.", re.IGNORECASE)
_YOU = re.compile(r"\b(you|your|yours|yourself|yourselves)\b", re.IGNORECASE)
_SUMMARY = re.compile(r"^\W*(in short|overall|to sum up)\b", re.IGNORECASE)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if _WORD.search(s)]


def asks_followup(text: str, name: str = "") -> bool:
    return text.rstrip().rstrip("\"')]*_ ").endswith("?")


def has_number(text: str, name: str = "") -> bool:
    return any(c.isdigit() for c in text)


def gives_example(text: str, name: str = "") -> bool:
    return _EXAMPLE.search(text) is not None


def opens_with_filler(text: str, name: str = "") -> bool:
    first = sentences(text)
    return bool(first) and _FILLER.match(first[0].lstrip("-*• ")) is not None


def mentions_name(text: str, name: str = "") -> bool:
    return bool(name.strip()) and re.search(rf"\b{re.escape(name.strip())}\b", text, re.IGNORECASE) is not None


def short_sentences(text: str, name: str = "") -> bool:
    lengths = [len(_WORD.findall(s)) for s in sentences(text)]
    return bool(lengths) and sum(lengths) / len(lengths) < 12


def uses_you(text: str, name: str = "") -> bool:
    return _YOU.search(text) is not None


def ends_with_summary(text: str, name: str = "") -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and _SUMMARY.match(lines[-1].lstrip("-*• ")) is not None


FEATURES: dict[str, Callable[[str, str], bool]] = {
    f.__name__: f
    for f in (asks_followup, has_number, gives_example, opens_with_filler, mentions_name, short_sentences,
              uses_you, ends_with_summary)
}  # fmt: skip


def check(name: str) -> Callable[[str, str], bool]:
    """The reader of feature ``name``; a clear error names the known ones."""
    try:
        return FEATURES[name]
    except KeyError:
        raise ValueError(f"unknown text feature {name!r}; known: {', '.join(FEATURES)}") from None
