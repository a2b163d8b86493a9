"""Training data from reactions: rated replies become labelled, weighted, redacted examples.

A reply the user liked (net reward above 0) is desirable, one they disliked is
undesirable, and the size of the reward is the example's weight; a reply whose
reactions cancel out teaches nothing. Each user's newest replies are held out (a split
by time), so the gate judges an adapter on feedback it never saw.

On disk (for the training process) the examples are sealed, line by line, under a key
made for the one run and handed to the worker in its environment (``DATA_KEY_ENV``):
what a killed run leaves behind reads as noise.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent_core.training.redact import Redactor
from storage.crypto import Key
from storage.training import RatedReply

DATA_KEY_ENV = "ATTUNE_TRAINING_DATA_KEY"
_FIELD = "training.example"


@dataclass(frozen=True)
class Example:
    prompt: list[dict[str, str]]  # the chat messages exactly as sent to the model, redacted
    completion: str  # the reply, redacted
    label: bool  # True: liked (desirable)
    weight: float  # |reward|
    at: float  # when it was first rated
    user_id: int
    message_id: int
    style: dict[str, str] | None = None  # the style the bot asked for (None: not known)


@dataclass(frozen=True)
class Split:
    train: list[Example]
    heldout: list[Example]

    @property
    def liked_train(self) -> list[Example]:
        return [e for e in self.train if e.label]


def examples(replies: list[RatedReply], redact: Redactor) -> list[Example]:
    """The rated replies as examples, oldest first; neutral ones (reward 0) are dropped."""
    found = []
    for r in replies:
        if r.reward == 0:
            continue
        prompt = [{"role": m["role"], "content": redact(m["content"])} for m in r.prompt]
        found.append(
            Example(prompt, redact(r.text), r.reward > 0, abs(r.reward), r.created_at, r.user_id, r.message_id, r.style)
        )
    return sorted(found, key=lambda e: (e.at, e.message_id))


def split_by_time(rows: list[Example], holdout_fraction: float) -> Split:
    """The newest ``holdout_fraction`` (at least one when there are two or more) is held out."""
    rows = sorted(rows, key=lambda e: (e.at, e.message_id))
    held = 0 if len(rows) < 2 else max(1, math.ceil(len(rows) * holdout_fraction))
    return Split(rows[: len(rows) - held], rows[len(rows) - held :])


def write_examples(path: Path, rows: list[Example], key: Key) -> None:
    """One sealed example per line (base64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="ascii") as f:
        for row in rows:
            sealed = key.seal(json.dumps(asdict(row), ensure_ascii=False), _FIELD)
            f.write(base64.b64encode(sealed).decode("ascii") + "\n")


def read_examples(path: Path, key: Key) -> list[Example]:
    with path.open(encoding="ascii") as f:
        return [Example(**json.loads(key.open(base64.b64decode(line), _FIELD))) for line in f if line.strip()]


def with_weights(rows: list[Example], max_copies: int = 3) -> list[Example]:
    """Each example repeated in proportion to its weight (the lightest once, at most
    ``max_copies`` times): TRL's trainers take no per-example weight, so a reply with a
    stronger reaction is simply seen more often."""
    if not rows:
        return []
    lightest = min(r.weight for r in rows)
    out: list[Example] = []
    for r in rows:
        out += [r] * min(max_copies, max(1, round(r.weight / lightest)))
    return out


def summary(split: Split) -> dict[str, Any]:
    def count(rows: list[Example]) -> dict[str, int]:
        return {"liked": sum(r.label for r in rows), "disliked": sum(not r.label for r in rows)}

    return {"train": count(split.train), "heldout": count(split.heldout)}
