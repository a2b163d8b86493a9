"""Each user's reward model: how likely they are to like a reply, read from its text alone.

A logistic regression over what the reply says and how it looks:

- hashed word n-grams (one and two words) of the reply, with its start, its end and each
  line start marked and every number read as one shape, as term frequencies (so the
  share of full stops says how long its sentences are);
- the style observed in the text (``agent_core.style.measure_style``).

No rule about what anyone likes is written here: every weight comes from reactions. The
population (everyone's rated replies) is fitted first and is each user's prior: the user's
own weights are pulled towards it, less the more they rated. Fitting is a few Newton steps
in the space of the examples (the Woodbury identity), milliseconds for hundreds of replies.

``held_out_auc`` says how well it predicts: fitted on a user's older reactions, scored on
their newest, as /stats reports and the nightly gate requires.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent_core.stores import TrainingStore
from agent_core.style import DIMENSIONS, measure_style

OBJECTIVES = ("raft", "dpo")  # [training] objectives trained on sampled replies ranked by this model
HASH_BITS = 12
_NGRAM_DIM = 1 << HASH_BITS
_STYLE_VALUES = [(dim, value) for dim, values in DIMENSIONS.items() for value in values]
DIM = _NGRAM_DIM + len(_STYLE_VALUES) + 1  # + the bias
_TOKEN = re.compile(r"\n|\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)?|[^\w\s]")
POPULATION_STRENGTH = 1.0  # L2 towards zero, per weight, for the population
USER_STRENGTH = 4.0  # L2 towards the population, per weight, for a user
MIN_HELD_OUT = 8  # fewer newest reactions than this (or only one kind): no AUC yet


def tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation, numbers as ``<num>``, line starts as ``<nl>``,
    between ``<s>`` and ``</s>``."""
    out = ["<s>"]
    for token in _TOKEN.findall(text.strip().lower()):
        out.append("<nl>" if token == "\n" else "<num>" if token[0].isdigit() else token)
    out.append("</s>")
    return out


def _bucket(gram: str) -> int:
    return zlib.crc32(gram.encode("utf-8")) & (_NGRAM_DIM - 1)


def features(text: str) -> np.ndarray:
    """One reply as a vector of length ``DIM``."""
    x = np.zeros(DIM, dtype=np.float32)
    toks = tokens(text)
    grams = toks + [f"{a} {b}" for a, b in itertools.pairwise(toks)]
    for gram in grams:
        x[_bucket(gram)] += 1.0
    x[:_NGRAM_DIM] *= 4.0 / len(toks)  # term frequency, on the scale of a few for a word used often
    style = measure_style(text).as_dict()
    for k, (dim, value) in enumerate(_STYLE_VALUES):
        x[_NGRAM_DIM + k] = 1.0 if style[dim] == value else 0.0
    x[-1] = 1.0
    return x


def matrix(texts: Sequence[str]) -> np.ndarray:
    return np.stack([features(t) for t in texts]) if texts else np.zeros((0, DIM), dtype=np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def fit_logistic(X: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float, steps: int = 12) -> np.ndarray:
    """Weights minimising the log loss of ``y`` (in [0, 1]) plus ``strength / 2 * |w - prior|^2``.

    Newton's method with the Hessian inverted through the n x n kernel (n examples, n << DIM).
    """
    w = prior.astype(np.float64).copy()
    if len(X) == 0:
        return w
    X64 = X.astype(np.float64)
    K = X64 @ X64.T
    for _ in range(steps):
        p = _sigmoid(X64 @ w)
        grad = X64.T @ (p - y) + strength * (w - prior)
        s = np.sqrt(np.maximum(p * (1 - p), 1e-9))
        # (strength I + X^T S^2 X)^-1 g = (g - X^T S (strength I + S K S)^-1 S X g) / strength
        inner = strength * np.eye(len(X)) + (s[:, None] * K * s[None, :])
        step = (grad - X64.T @ (s * np.linalg.solve(inner, s * (X64 @ grad)))) / strength
        w -= step
        if float(np.abs(step).max()) < 1e-6:
            break
    return w


def auc(scores: Sequence[float], liked: Sequence[bool]) -> float | None:
    """The chance a liked reply scores above a disliked one (ties count half); None without both."""
    pos = [s for s, y in zip(scores, liked, strict=True) if y]
    neg = [s for s, y in zip(scores, liked, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _label(reward: float) -> float:
    return (max(-1.0, min(1.0, reward)) + 1.0) / 2.0  # -1 -> 0 (disliked), 1 -> 1 (liked)


@dataclass(frozen=True)
class RewardModel:
    """Scores replies for one user (or, ``user_id`` None, for anyone)."""

    weights: np.ndarray
    rated: int  # the reactions it was fitted on (the user's own; for the population, everyone's)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """The chance the user likes each reply, from its text."""
        return _sigmoid(matrix(texts).astype(np.float64) @ self.weights)

    @staticmethod
    def fit_population(texts: Sequence[str], rewards: Sequence[float]) -> RewardModel:
        y = np.array([_label(r) for r in rewards], dtype=np.float64)
        w = fit_logistic(matrix(texts), y, np.zeros(DIM), POPULATION_STRENGTH)
        return RewardModel(w, len(texts))

    def fit_user(self, texts: Sequence[str], rewards: Sequence[float]) -> RewardModel:
        """A user's model, with this (population) model as the prior."""
        y = np.array([_label(r) for r in rewards], dtype=np.float64)
        return RewardModel(fit_logistic(matrix(texts), y, self.weights, USER_STRENGTH), len(texts))


@dataclass(frozen=True)
class Accuracy:
    auc: float | None  # None: not enough held-out reactions of both kinds yet
    held_out: int
    needed: int  # more rated replies needed before there is an AUC (0 once there is one)


def held_out_auc(
    user_texts: Sequence[str], user_rewards: Sequence[float], others_texts: Sequence[str],
    others_rewards: Sequence[float], fraction: float = 0.2,
) -> Accuracy:  # fmt: skip
    """Fit on everyone's reactions but the user's newest ``fraction`` (oldest first in the
    inputs), then score those: the AUC of liked over disliked."""
    n = len(user_texts)
    held = max(MIN_HELD_OUT, round(n * fraction)) if n else 0
    if n < 2 * MIN_HELD_OUT:
        return Accuracy(None, 0, 2 * MIN_HELD_OUT - n)
    cut = n - held
    population = RewardModel.fit_population([*others_texts, *user_texts[:cut]],
                                            [*others_rewards, *user_rewards[:cut]])  # fmt: skip
    model = population.fit_user(user_texts[:cut], user_rewards[:cut])
    rewards = user_rewards[cut:]
    scored = [(float(s), r > 0) for s, r in zip(model.score(user_texts[cut:]), rewards, strict=True) if r != 0]
    value = auc([s for s, _ in scored], [y for _, y in scored])
    return Accuracy(value, len(scored), 0 if value is not None else 1)


POPULATION_ROWS = 1000  # the newest rated replies of other users that make the prior


_FITTED: OrderedDict[tuple[int, int], Accuracy] = OrderedDict()  # user_accuracy's answers, by what they read
_FITTED_MAX = 256


async def user_accuracy(records: TrainingStore, user_id: int) -> Accuracy:
    """``held_out_auc`` for one user from the database (fitted off the event loop). The
    answer is kept by what it was fitted on (the texts and rewards), so /stats asked again
    before any new reaction fits nothing."""
    mine = await records.rated_replies(user_id)
    everyone = await records.rated_replies(None, limit=POPULATION_ROWS + len(mine))
    others = [r for r in everyone if r.user_id != user_id][-POPULATION_ROWS:]
    key = (hash(tuple((r.text, r.reward) for r in mine)), hash(tuple((r.text, r.reward) for r in others)))
    if key in _FITTED:
        _FITTED.move_to_end(key)
        return _FITTED[key]
    accuracy = await asyncio.to_thread(
        held_out_auc, [r.text for r in mine], [r.reward for r in mine], [r.text for r in others],
        [r.reward for r in others],
    )  # fmt: skip
    _FITTED[key] = accuracy
    while len(_FITTED) > _FITTED_MAX:
        _FITTED.popitem(last=False)
    return accuracy


def describe(accuracy: Accuracy) -> str:
    """The /stats line."""
    if accuracy.auc is None:
        return (f"Reward model: rate {accuracy.needed} more of my replies (some liked, some not) and I can say "
                "how well it predicts your reactions.")  # fmt: skip
    return (f"Reward model: it tells your liked replies from the others with AUC {accuracy.auc:.2f} "
            f"on your {accuracy.held_out} newest rated ones (0.50 is chance).")  # fmt: skip
