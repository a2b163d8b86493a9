"""How fast the style policy learns from reactions, against adaptkit, random and the best fixed style.

Simulated users react to the style chosen for them (the population file says how; its
schema is in bench/README.md). For each window of turns, the expected like rate of each
method as a share of the oracle's (which always picks the user's best style):

    python -m bench.learning --population bench/populations/default.json --users 100 --turns 200 --seed 0
    python -m bench.learning --all          # every shipped population

Methods, on the same users, turns, contexts and random draws:
- attune: ``agent_core.bandit.StyleBandit``, the policy the bot runs, with a population prior;
- adaptkit 0.1.0: per-user Thompson sampling, one action per full style (16), Beta(1,1),
  binary reward; given one context, its best case here (the populations' tastes do not
  depend on context, and adaptkit learns each context separately);
- random: a uniform style each turn;
- best_fixed: the one style with the highest like rate over all users and turns;
- known_archetypes (a reference, not a contender): told the population file, it infers
  each user's archetype from their reactions by Bayes' rule and picks that archetype's
  best style; the most a policy can get without knowing each user's own deviations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python bench/learning.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.bandit import (
    ALL_STYLES,
    CONTEXTS,
    DIMS,
    Population,
    RealisationCounts,
    StyleBandit,
    UserStats,
    features,
)
from agent_core.style import DIMENSIONS, Style
from bench import judge, report, text_features

POPULATIONS = Path(__file__).resolve().parent / "populations"
# How often SmolLM2-135M shows a value asked for with instructions alone (bench/style_adherence.py,
# its "instructions only" column): the imperfect realisation --all runs beside the perfect one.
IMPERFECT = str(Path(__file__).resolve().parent / "data" / "realisation_smollm2.json")
METHODS = ("attune", "adaptkit", "random", "best_fixed", "known_archetypes")
NOT_AN_ANSWER = 0.02  # the chance a simulated user likes a reply that does not answer them (the floor)


@dataclass
class SimUser:
    base: float
    effects: dict[tuple[str, str], float]
    drift_turn: int | None
    drift_effects: dict[tuple[str, str], float]
    react_prob: float
    text_effects: dict[str, float] = field(default_factory=dict)  # bench/text_features.py's feature -> effect
    name: str = ""  # their display name (the feature mentions_name looks for it)

    def like_prob(self, style: Style, turn: int, text: str | None = None, message: str | None = None,
                  scorer: judge.TopicScorer | None = None) -> float:  # fmt: skip
        """The chance they like a reply of this style; with its ``text``, the text effects count too
        (a benchmark without reply text, like this one, has only the style). With the ``message``
        it answers as well, a reply that is not a real answer (bench/judge.py: degenerate, or off
        topic by its words and, given a ``scorer``, by the model) is disliked whatever its style
        and features: neither steering nor an adapter can win by stuffing a reply with them."""
        if text is not None and message is not None and judge.verdict(message, text, scorer) is not None:
            return NOT_AN_ANSWER
        effects = self.effects
        if self.drift_turn is not None and turn >= self.drift_turn:
            effects = {**effects, **self.drift_effects}
        total = self.base + sum(effects.get((dim, value), 0.0) for dim, value in style.as_dict().items())
        if text is not None:
            total += sum(e for feature, e in self.text_effects.items() if text_features.check(feature)(text, self.name))
        return min(0.98, max(0.02, total))


def _effects(spec: dict[str, dict[str, float]], noise: float, rng: np.random.Generator) -> dict[tuple[str, str], float]:
    return {
        (dim, value): float(e + rng.normal(0, noise)) for dim, values in spec.items() for value, e in values.items()
    }


def _text_effects(spec: list[dict[str, Any]], noise: float, rng: np.random.Generator) -> dict[str, float]:
    out = {}
    for item in spec:
        text_features.check(item["feature"])  # a clear error for a name no reader knows
        out[str(item["feature"])] = float(item["effect"] + rng.normal(0, noise))
    return out


NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Luca")


def draw_users(population: dict[str, Any], count: int, rng: np.random.Generator) -> list[SimUser]:
    """``count`` users drawn from the file's archetypes; each effect gets its noise. The
    noise of the text effects is drawn after all the rest, so files without them draw
    the same users as before."""
    archetypes = population["archetypes"]
    weights = np.array([a["weight"] for a in archetypes], dtype=float)
    users = []
    chosen = rng.choice(len(archetypes), size=count, p=weights / weights.sum())
    for index in chosen:
        a = archetypes[index]
        drift = a.get("drift")
        users.append(SimUser(
            base=float(a["base"]), effects=_effects(a.get("effects", {}), a.get("noise", 0.0), rng),
            drift_turn=int(drift["turn"]) if drift else None,
            drift_effects=_effects(drift["effects"], a.get("noise", 0.0), rng) if drift else {},
            react_prob=float(a["react_prob"]), name=NAMES[len(users) % len(NAMES)],
        ))  # fmt: skip
    for user, index in zip(users, chosen, strict=True):
        a = archetypes[index]
        user.text_effects = _text_effects(a.get("text_effects", []), a.get("noise", 0.0), rng)
    return users


def realisation_rates(spec: Any) -> np.ndarray:
    """[dimension, value] -> the chance that asking for the value gives a reply with it,
    from a number (every value) or ``{dimension: {value: chance}}`` (others: 1)."""
    rates = np.ones((len(DIMS), 2))
    if isinstance(spec, int | float):
        return rates * float(spec)
    for j, dim in enumerate(DIMS):
        for v, value in enumerate(DIMENSIONS[dim]):
            rates[j, v] = float((spec or {}).get(dim, {}).get(value, 1.0))
    if (rates < 0).any() or (rates > 1).any():
        raise ValueError(f"realisation chances must be between 0 and 1: {spec}")
    return rates


def transitions(rates: np.ndarray) -> np.ndarray:
    """(16, 16): the chance that requesting style i gives a reply of style j."""
    T = np.ones((len(ALL_STYLES), len(ALL_STYLES)))
    for i, asked in enumerate(ALL_STYLES):
        for k, shown in enumerate(ALL_STYLES):
            for j, dim in enumerate(DIMS):
                p = rates[j, DIMENSIONS[dim].index(getattr(asked, dim))]
                T[i, k] *= p if getattr(asked, dim) == getattr(shown, dim) else 1 - p
    return T


def realise(style: Style, rates: np.ndarray, draws: np.ndarray) -> Style:
    """The reply's style when ``style`` is asked for: each value shows when its draw is below its chance."""
    shown = {}
    for j, dim in enumerate(DIMS):
        value = getattr(style, dim)
        v = DIMENSIONS[dim].index(value)
        shown[dim] = value if draws[j] < rates[j, v] else DIMENSIONS[dim][1 - v]
    return Style.from_dict(shown)


class Chooser:
    """One method: picks a style to request for (user, turn, context), then sees what the
    reply looked like (``shown``) and hears the reaction to it, if any."""

    def choose(self, user: int, turn: int, context: str) -> Style:
        raise NotImplementedError

    def shown(self, style: Style, shown: Style) -> None:
        """Every reply: asked for ``style``, it came out as ``shown``."""
        return None

    def react(self, user: int, turn: int, context: str, style: Style, shown: Style, liked: bool) -> None:
        return None

    def end_of_turn(self) -> None:
        return None


class Attune(Chooser):
    def __init__(self, users: int, seed: int) -> None:
        self.bandit = StyleBandit()
        self.stats = {u: UserStats() for u in range(users)}
        self.population = Population.empty()
        self.seed = seed

        self.counts = RealisationCounts()  # what the bot counts, as LearningPolicy does
        self.realisation = self.counts.estimate()

    def choose(self, user: int, turn: int, context: str) -> Style:
        posterior = self.bandit.posterior(self.stats[user], self.population, user)
        rng = np.random.default_rng([self.seed, user, turn])
        return self.bandit.choose(posterior, context, {}, rng, self.realisation).style

    def shown(self, style: Style, shown: Style) -> None:
        self.counts.add(style, shown)

    def react(self, user: int, turn: int, context: str, style: Style, shown: Style, liked: bool) -> None:
        # it learns from the text the user read
        self.stats[user].observe(features(shown, context), 1.0 if liked else -1.0, self.bandit.config)

    def end_of_turn(self) -> None:  # the bot refits the population prior now and then
        self.population = self.bandit.population(self.stats)
        self.realisation = self.counts.estimate()


class AdaptKit(Chooser):
    def __init__(self, users: int, seed: int) -> None:
        from adaptkit import Profile

        self.keys = [_key(s) for s in ALL_STYLES]
        self.by_key = dict(zip(self.keys, ALL_STYLES, strict=True))
        self.profiles = [Profile(user_id=f"u{u}", actions=self.keys, seed=seed * 100_003 + u) for u in range(users)]
        self.decisions: dict[tuple[int, int], Any] = {}

    def choose(self, user: int, turn: int, context: str) -> Style:
        decision = self.profiles[user].choose("default")
        self.decisions[(user, turn)] = decision
        return self.by_key[decision.action]

    def react(self, user: int, turn: int, context: str, style: Style, shown: Style, liked: bool) -> None:
        decision = self.decisions.pop((user, turn))  # it knows only what it asked for
        record = self.profiles[user].like if liked else self.profiles[user].dislike
        record(decision, idempotency_key=f"{user}-{turn}")


class Uniform(Chooser):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 7])

    def choose(self, user: int, turn: int, context: str) -> Style:
        return ALL_STYLES[int(self.rng.integers(len(ALL_STYLES)))]


class Fixed(Chooser):
    def __init__(self, style: Style) -> None:
        self.style = style

    def choose(self, user: int, turn: int, context: str) -> Style:
        return self.style


class KnownArchetypes(Chooser):
    """Knows every archetype's like probabilities (not a user's own noise); infers which
    archetype a user is from their reactions and picks its best style."""

    def __init__(self, population: dict[str, Any], users: int, T: np.ndarray) -> None:
        self.T = T  # it is told how often each request is realised, too
        self.types = [SimUser(float(a["base"]), _effects(a.get("effects", {}), 0.0, np.random.default_rng(0)),
                              int(a["drift"]["turn"]) if a.get("drift") else None,
                              _effects(a["drift"]["effects"], 0.0, np.random.default_rng(0)) if a.get("drift") else {},
                              float(a["react_prob"])) for a in population["archetypes"]]  # fmt: skip
        weights = np.array([a["weight"] for a in population["archetypes"]], dtype=float)
        self.log_post = np.tile(np.log(weights / weights.sum()), (users, 1))

    def choose(self, user: int, turn: int, context: str) -> Style:
        post = np.exp(self.log_post[user] - self.log_post[user].max())
        shown = np.array([[t.like_prob(s, turn) for s in ALL_STYLES] for t in self.types])  # (types, 16)
        return ALL_STYLES[int(np.argmax(self.T @ (post @ shown)))]

    def react(self, user: int, turn: int, context: str, style: Style, shown: Style, liked: bool) -> None:
        p = np.array([t.like_prob(shown, turn) for t in self.types])
        self.log_post[user] += np.log(p if liked else 1 - p)


def _key(style: Style) -> str:
    return "/".join(style.as_dict().values())


def simulate(
    population: dict[str, Any], users: int, turns: int, seed: int, gap: float, warmup: int = 0,
    realisation: Any = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Share of the oracle's expected likes per window, for every method, on one seed.

    Users join one by one, a new one every ``gap`` rounds (0: all at the first round), and
    each then takes ``turns`` turns, one per round; the windows count a user's own turns.
    The first ``warmup`` users are the bot's existing users: they are served like the
    others but not counted, so the figures are those of people joining a running bot.

    ``realisation`` (else the population file's, else 1): how often a requested value
    shows in the reply. The user reacts to the reply as shown; each method's figure is
    the expected like rate of its requests, and the oracle makes the best request."""
    rng = np.random.default_rng(seed)
    rates = realisation_rates(population.get("realisation", 1.0) if realisation is None else realisation)
    T = transitions(rates)
    users += warmup
    people = draw_users(population, users, rng)
    starts = [int(u * gap) for u in range(users)]
    contexts = rng.choice(len(CONTEXTS), size=(turns, users))
    reacts = rng.random((turns, users))
    likes = rng.random((turns, users))
    shows = rng.random((turns, users, len(DIMS)))
    # like[u, phase, style shown]; a request's expected like rate: T @ that
    phases = [(1, p.drift_turn or 1) for p in people]
    like = np.array([[[p.like_prob(s, t) for s in ALL_STYLES] for t in ph]
                     for p, ph in zip(people, phases, strict=True)])  # fmt: skip
    asked_like = like @ T.T  # [u, phase, style asked]
    phase = np.array([[int(p.drift_turn is not None and t >= p.drift_turn) for p in people]
                      for t in range(1, turns + 1)])  # [t, u]  # fmt: skip
    per_turn = asked_like[np.arange(users)[None, :], phase]  # [t, u, 16]
    best_fixed = ALL_STYLES[int(np.argmax(per_turn.mean(axis=(0, 1))))]
    oracle = per_turn.max(axis=2)
    index = {s: i for i, s in enumerate(ALL_STYLES)}
    methods: dict[str, Callable[[], Chooser]] = {
        "attune": lambda: Attune(users, seed), "adaptkit": lambda: AdaptKit(users, seed),
        "random": lambda: Uniform(seed), "best_fixed": lambda: Fixed(best_fixed),
        "known_archetypes": lambda: KnownArchetypes(population, users, T),
    }  # fmt: skip
    shares: dict[str, dict[str, float]] = {}
    for name, make in methods.items():
        if name not in METHODS:
            continue
        chooser = make()
        expected = np.zeros((turns, users))
        shares_across_users = name == "attune"  # the others learn each user alone: no need to warm up
        for r in range(starts[-1] + turns):
            for u, person in enumerate(people):
                t = r - starts[u]  # this user's turn, from 0
                if not 0 <= t < turns or (u < warmup and not shares_across_users):
                    continue
                context = CONTEXTS[contexts[t, u]]
                style = chooser.choose(u, t + 1, context)
                expected[t, u] = per_turn[t, u, index[style]]
                shown = realise(style, rates, shows[t, u])
                chooser.shown(style, shown)
                if reacts[t, u] < person.react_prob:
                    p = person.like_prob(shown, t + 1)
                    chooser.react(u, t + 1, context, style, shown, liked=bool(likes[t, u] < p))
            chooser.end_of_turn()
        shares[name] = {
            w: float(expected[:n, warmup:].sum() / oracle[:n, warmup:].sum()) for w, n in windows(turns).items()
        }
    return shares


def windows(turns: int) -> dict[str, int]:
    return {"1-10": min(10, turns), "1-50": min(50, turns), "1-T": turns}


def parse_realisation(text: str | None) -> Any:
    """``--realisation``: "perfect" (1), a number, a JSON object, or a JSON file; None: the population's."""
    if text is None:
        return None
    if text == "perfect":
        return 1.0
    try:
        return float(text)
    except ValueError:
        pass
    path = Path(text)
    return json.loads(path.read_text() if path.is_file() else text)


def realisation_name(spec: Any) -> str:
    if spec is None:
        return "as in the file"
    if isinstance(spec, int | float):
        return "perfect" if spec == 1 else f"{spec:g} for every value"
    return ", ".join(f"{d} {v} {p:.0%}" for d, values in spec.items() if d in DIMENSIONS for v, p in values.items())


def run(
    population_path: Path, users: int, turns: int, seed: int, seeds: int, gap: float, warmup: int,
    realisation: Any = None,
) -> dict[str, Any]:  # fmt: skip
    population = json.loads(population_path.read_text())
    per_seed = [simulate(population, users, turns, seed + i, gap, warmup, realisation) for i in range(seeds)]
    result: dict[str, Any] = {"windows": {}}
    for window in windows(turns):
        result["windows"][window] = {
            m: {"mean": statistics.fmean(s[m][window] for s in per_seed),
                "sd": statistics.stdev([s[m][window] for s in per_seed]) if seeds > 1 else 0.0}
            for m in METHODS
        }  # fmt: skip
    return result


def ahead(result: dict[str, Any], rival: str) -> bool:
    return all(f["attune"]["mean"] > f[rival]["mean"] for f in result["windows"].values())


def print_table(name: str, result: dict[str, Any], users: int, turns: int, seeds: int, realisation: str) -> None:
    print(f"\n{name}: {users} users, {turns} turns, {seeds} seeds, realisation {realisation}; "
          "expected likes as a share of the oracle's")  # fmt: skip
    rows = []
    for method in METHODS:
        row: list[Any] = [method]
        for figures in result["windows"].values():
            row.append(f"{figures[method]['mean']:.3f} ± {figures[method]['sd']:.3f}")
        rows.append(row)
    headers = ["method", *(f"turns {w.replace('T', str(turns))}" for w in result["windows"])]
    print(report.table(headers, rows))
    for rival in ("adaptkit", "best_fixed"):
        print(f"attune ahead of {rival} in every window: {'yes' if ahead(result, rival) else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=Path, default=POPULATIONS / "default.json")
    parser.add_argument("--all", action="store_true",
                        help="every population in bench/populations/, under each of --realisations")  # fmt: skip
    parser.add_argument("--realisation", help="how often a requested value shows: 'perfect', a chance for every "
                        "value, {dimension: {value: chance}} as JSON or a JSON file; default: the population "
                        "file's 'realisation', else perfect")  # fmt: skip
    parser.add_argument("--realisations", default=f"perfect,{IMPERFECT}",
                        help="with --all: the realisations to run each population under, comma-separated")  # fmt: skip
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds (the spread is across them)")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="rounds between two users joining (0: everyone starts together)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=300,
                        help="users the bot served before the measured ones join (0: a brand-new bot)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    paths = sorted(POPULATIONS.glob("*.json")) if args.all else [args.population]
    specs = args.realisations.split(",") if args.all else [args.realisation]
    documents = {}
    for path in paths:
        for text in specs:
            spec = parse_realisation(text)
            label = path.stem if not args.all or text == "perfect" else f"{path.stem}_imperfect"
            started = time.perf_counter()
            result = run(path, args.users, args.turns, args.seed, args.seeds, args.gap, args.warmup, spec)
            print_table(label, result, args.users, args.turns, args.seeds, realisation_name(spec))
            print(f"({time.perf_counter() - started:.0f} s)")
            params = {"population": path.name, "users": args.users, "turns": args.turns, "seed": args.seed,
                      "seeds": args.seeds, "gap": args.gap, "warmup": args.warmup, "realisation": spec}  # fmt: skip
            documents[label] = {"params": params, **result, "ahead_of_adaptkit": ahead(result, "adaptkit"),
                                "ahead_of_best_fixed": ahead(result, "best_fixed")}  # fmt: skip
            saved = report.save(f"learning_{label}", documents[label])
            print(f"wrote {saved}")
    if args.json:
        document = next(iter(documents.values())) if len(documents) == 1 else documents
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
