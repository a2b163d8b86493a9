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

OBJECTIVES = ("raft", "dpo", "distill")  # [training] objectives trained on sampled replies ranked by this model
HASH_BITS = 12
_NGRAM_DIM = 1 << HASH_BITS
_STYLE_VALUES = [(dim, value) for dim, values in DIMENSIONS.items() for value in values]
DIM = _NGRAM_DIM + len(_STYLE_VALUES) + 1  # + the bias
_TOKEN = re.compile(r"\n|\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)?|[^\w\s]")
POPULATION_STRENGTH = 1.0  # L2 towards zero, per weight, for the population
USER_STRENGTH = 4.0  # L2 towards the population, per weight, for a user
MIN_HELD_OUT = 8  # fewer newest reactions than this (or only one kind): no AUC yet


def tokens(text: str, finished: bool = True) -> list[str]:
    """Lower-cased words and punctuation, numbers as ``<num>``, line starts as ``<nl>``,
    after ``<s>`` and (a whole reply, not the start of one) before ``</s>``."""
    out = ["<s>"]
    for token in _TOKEN.findall(text.strip().lower()):
        out.append("<nl>" if token == "\n" else "<num>" if token[0].isdigit() else token)
    if finished:
        out.append("</s>")
    return out


def _bucket(gram: str) -> int:
    return zlib.crc32(gram.encode("utf-8")) & (_NGRAM_DIM - 1)


def grams(toks: Sequence[str]) -> list[str]:
    """The word n-grams the model reads: each token and each pair of neighbours."""
    return [*toks, *(f"{a} {b}" for a, b in itertools.pairwise(toks))]


def features(text: str, finished: bool = True) -> np.ndarray:
    """One reply (``finished`` False: the start of one) as a vector of length ``DIM``."""
    x = np.zeros(DIM, dtype=np.float32)
    toks = tokens(text, finished)
    for gram in grams(toks):
        x[_bucket(gram)] += 1.0
    x[:_NGRAM_DIM] *= 4.0 / len(toks)  # term frequency, on the scale of a few for a word used often
    style = measure_style(text).as_dict()
    for k, (dim, value) in enumerate(_STYLE_VALUES):
        x[_NGRAM_DIM + k] = 1.0 if style[dim] == value else 0.0
    x[-1] = 1.0
    return x


def matrix(texts: Sequence[str], finished: Sequence[bool] | None = None) -> np.ndarray:
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    flags = [True] * len(texts) if finished is None else list(finished)
    return np.stack([features(t, f) for t, f in zip(texts, flags, strict=True)])


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

    def score_partial(self, texts: Sequence[str], finished: Sequence[bool]) -> np.ndarray:
        """The same for replies still being written (``finished`` False): read as they
        stand, without the end of the reply, so that what only a reply's end can show
        (its last word, a closing question) counts once the reply ends. What steers
        decoding (agent_core.llm.lookahead)."""
        return _sigmoid(matrix(texts, finished).astype(np.float64) @ self.weights)

    def to_bytes(self) -> bytes:
        return self.weights.astype(np.float32).tobytes()

    @staticmethod
    def from_bytes(data: bytes, rated: int) -> RewardModel:
        weights = np.frombuffer(data, dtype=np.float32).astype(np.float64)
        if weights.shape != (DIM,):
            raise ValueError(f"a reward model of {weights.size} weights; this version has {DIM}")
        return RewardModel(weights, rated)

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
class Term:
    """An n-gram of a user's own rated replies that their model weighs strongly."""

    gram: str  # as the model reads it: "? </s>", "for example", "<s> sure"
    weight: float  # its weight in the user's model (positive: liked)
    replies: int  # of their rated replies, how many hold it
    liked: float  # the share of those they liked

    @property
    def text(self) -> str:
        """In words, after "replies": "with '?' at the end", "opening with 'Sure'"."""
        return describe_gram(self.gram)

    def as_dict(self) -> dict[str, object]:
        return {"gram": self.gram, "weight": round(self.weight, 4), "replies": self.replies,
                "liked": round(self.liked, 3)}  # fmt: skip

    @staticmethod
    def from_dict(data: dict[str, object]) -> Term:
        return Term(str(data["gram"]), float(data["weight"]), int(data["replies"]), float(data["liked"]))  # type: ignore[arg-type]


def holds(text: str, gram: str) -> bool:
    """Whether the reply ``text`` holds the n-gram ``gram`` (as :func:`grams` reads it)."""
    return gram in grams(tokens(text))


MIN_TERM_REPLIES = 3  # an n-gram named in /stats is in at least this many of the user's rated replies
_MARKS = {"<num>": "a number", "<nl>": "a new line"}


def describe_gram(gram: str) -> str:
    """An n-gram as words that follow "replies": markers become where it stands
    ("with '?' at the end", "opening with 'Sure'", "with a number")."""
    words = gram.split(" ")
    if words[0] == "<s>" and len(words) > 1:
        return f"opening with {_quoted([words[1].capitalize(), *words[2:]])}"
    if words[-1] == "</s>" and len(words) > 1:
        return f"with {_quoted(words[:-1])} at the end"
    if words[0] == "<nl>" and len(words) > 1:
        return f"with lines starting with {_quoted(words[1:])}"
    return f"with {_quoted(words)}"


def _quoted(words: Sequence[str]) -> str:
    if len(words) == 1 and words[0] in _MARKS:
        return _MARKS[words[0]]
    text = " ".join(_MARKS.get(w, w) for w in words)
    return "'" + re.sub(r" (?=[.,!?;:])", "", text) + "'"  # "is ." reads "is."


def strongest_terms(model: RewardModel, texts: Sequence[str], rewards: Sequence[float], k: int = 3) -> list[Term]:
    """What the model learned, in the user's own words: the n-grams of their rated replies
    (at least ``MIN_TERM_REPLIES`` of them) with the largest weights, up to ``k`` liked and
    ``k`` disliked, each only where their own reactions agree with its sign (the replies
    holding it were liked more, or less, often than the others)."""
    holding: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        for gram in set(grams(tokens(text))):
            if gram not in ("<s>", "</s>"):
                holding.setdefault(gram, []).append(i)
    liked = np.array([r > 0 for r in rewards], dtype=float)
    found: list[Term] = []
    for gram, rows in holding.items():
        if len(rows) < MIN_TERM_REPLIES or len(rows) == len(texts):
            continue
        weight = float(model.weights[_bucket(gram)])
        share = float(liked[rows].mean())
        others = float(np.delete(liked, rows).mean())
        if weight * (share - others) > 0:
            found.append(Term(gram, weight, len(rows), share))
    found.sort(key=lambda t: -abs(t.weight))
    pos = [t for t in found if t.weight > 0][:k]
    neg = [t for t in found if t.weight < 0][:k]
    return pos + neg


def describe_terms(terms: Sequence[Term]) -> str:
    """The /stats sentence: "you tend to like replies with ... ; you dislike replies opening with ..."."""
    pos = [t.text for t in terms if t.weight > 0]
    neg = [t.text for t in terms if t.weight < 0]
    parts = []
    if pos:
        parts.append("you tend to like replies " + _listed(pos))
    if neg:
        parts.append("you dislike replies " + _listed(neg))
    return "; ".join(parts)


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
