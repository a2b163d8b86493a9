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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python bench/learning.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.bandit import ALL_STYLES, CONTEXTS, Population, StyleBandit, UserStats, features
from agent_core.style import Style
from bench import report

POPULATIONS = Path(__file__).resolve().parent / "populations"
METHODS = ("attune", "adaptkit", "random", "best_fixed", "known_archetypes")


@dataclass
class SimUser:
    base: float
    effects: dict[tuple[str, str], float]
    drift_turn: int | None
    drift_effects: dict[tuple[str, str], float]
    react_prob: float

    def like_prob(self, style: Style, turn: int) -> float:
        effects = self.effects
        if self.drift_turn is not None and turn >= self.drift_turn:
            effects = {**effects, **self.drift_effects}
        total = self.base + sum(effects.get((dim, value), 0.0) for dim, value in style.as_dict().items())
        return min(0.98, max(0.02, total))


def _effects(spec: dict[str, dict[str, float]], noise: float, rng: np.random.Generator) -> dict[tuple[str, str], float]:
    return {
        (dim, value): float(e + rng.normal(0, noise)) for dim, values in spec.items() for value, e in values.items()
    }


def draw_users(population: dict[str, Any], count: int, rng: np.random.Generator) -> list[SimUser]:
    archetypes = population["archetypes"]
    weights = np.array([a["weight"] for a in archetypes], dtype=float)
    users = []
    for index in rng.choice(len(archetypes), size=count, p=weights / weights.sum()):
        a = archetypes[index]
        drift = a.get("drift")
        users.append(SimUser(
            base=float(a["base"]), effects=_effects(a.get("effects", {}), a.get("noise", 0.0), rng),
            drift_turn=int(drift["turn"]) if drift else None,
            drift_effects=_effects(drift["effects"], a.get("noise", 0.0), rng) if drift else {},
            react_prob=float(a["react_prob"]),
        ))  # fmt: skip
    return users


class Chooser:
    """One method: picks a style for (user, turn, context) and hears the reaction, if any."""

    def choose(self, user: int, turn: int, context: str) -> Style:
        raise NotImplementedError

    def react(self, user: int, turn: int, context: str, style: Style, liked: bool) -> None:
        return None

    def end_of_turn(self) -> None:
        return None


class Attune(Chooser):
    def __init__(self, users: int, seed: int) -> None:
        self.bandit = StyleBandit()
        self.stats = {u: UserStats() for u in range(users)}
        self.population = Population.empty()
        self.seed = seed

    def choose(self, user: int, turn: int, context: str) -> Style:
        posterior = self.bandit.posterior(self.stats[user], self.population, user)
        rng = np.random.default_rng([self.seed, user, turn])
        return self.bandit.choose(posterior, context, {}, rng).style

    def react(self, user: int, turn: int, context: str, style: Style, liked: bool) -> None:
        self.stats[user].observe(features(style, context), 1.0 if liked else -1.0, self.bandit.config)

    def end_of_turn(self) -> None:  # the bot refits the population prior now and then
        self.population = self.bandit.population(self.stats)


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

    def react(self, user: int, turn: int, context: str, style: Style, liked: bool) -> None:
        decision = self.decisions.pop((user, turn))
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

    def __init__(self, population: dict[str, Any], users: int) -> None:
        self.types = [SimUser(float(a["base"]), _effects(a.get("effects", {}), 0.0, np.random.default_rng(0)),
                              int(a["drift"]["turn"]) if a.get("drift") else None,
                              _effects(a["drift"]["effects"], 0.0, np.random.default_rng(0)) if a.get("drift") else {},
                              float(a["react_prob"])) for a in population["archetypes"]]  # fmt: skip
        weights = np.array([a["weight"] for a in population["archetypes"]], dtype=float)
        self.log_post = np.tile(np.log(weights / weights.sum()), (users, 1))

    def choose(self, user: int, turn: int, context: str) -> Style:
        post = np.exp(self.log_post[user] - self.log_post[user].max())
        return max(ALL_STYLES, key=lambda s: float(post @ [t.like_prob(s, turn) for t in self.types]))

    def react(self, user: int, turn: int, context: str, style: Style, liked: bool) -> None:
        p = np.array([t.like_prob(style, turn) for t in self.types])
        self.log_post[user] += np.log(p if liked else 1 - p)


def _key(style: Style) -> str:
    return "/".join(style.as_dict().values())


def simulate(
    population: dict[str, Any], users: int, turns: int, seed: int, gap: float, warmup: int = 0
) -> dict[str, dict[str, float]]:
    """Share of the oracle's expected likes per window, for every method, on one seed.

    Users join one by one, a new one every ``gap`` rounds (0: all at the first round), and
    each then takes ``turns`` turns, one per round; the windows count a user's own turns.
    The first ``warmup`` users are the bot's existing users: they are served like the
    others but not counted, so the figures are those of people joining a running bot."""
    rng = np.random.default_rng(seed)
    users += warmup
    people = draw_users(population, users, rng)
    starts = [int(u * gap) for u in range(users)]
    contexts = rng.choice(len(CONTEXTS), size=(turns, users))
    reacts = rng.random((turns, users))
    likes = rng.random((turns, users))
    mean_prob = {s: np.mean([[u.like_prob(s, t) for t in range(1, turns + 1)] for u in people]) for s in ALL_STYLES}
    best_fixed = max(ALL_STYLES, key=lambda s: mean_prob[s])
    oracle = np.array([[max(u.like_prob(s, t) for s in ALL_STYLES) for u in people] for t in range(1, turns + 1)])
    methods: dict[str, Callable[[], Chooser]] = {
        "attune": lambda: Attune(users, seed), "adaptkit": lambda: AdaptKit(users, seed),
        "random": lambda: Uniform(seed), "best_fixed": lambda: Fixed(best_fixed),
        "known_archetypes": lambda: KnownArchetypes(population, users),
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
                p = person.like_prob(style, t + 1)
                expected[t, u] = p
                if reacts[t, u] < person.react_prob:
                    chooser.react(u, t + 1, context, style, liked=bool(likes[t, u] < p))
            chooser.end_of_turn()
        shares[name] = {
            w: float(expected[:n, warmup:].sum() / oracle[:n, warmup:].sum()) for w, n in windows(turns).items()
        }
    return shares


def windows(turns: int) -> dict[str, int]:
    return {"1-10": min(10, turns), "1-50": min(50, turns), "1-T": turns}


def run(
    population_path: Path, users: int, turns: int, seed: int, seeds: int, gap: float, warmup: int
) -> dict[str, Any]:
    population = json.loads(population_path.read_text())
    per_seed = [simulate(population, users, turns, seed + i, gap, warmup) for i in range(seeds)]
    result: dict[str, Any] = {"windows": {}}
    for window in windows(turns):
        result["windows"][window] = {
            m: {"mean": statistics.fmean(s[m][window] for s in per_seed),
                "sd": statistics.stdev([s[m][window] for s in per_seed]) if seeds > 1 else 0.0}
            for m in METHODS
        }  # fmt: skip
    return result


def print_table(name: str, result: dict[str, Any], users: int, turns: int, seeds: int) -> None:
    print(f"\n{name}: {users} users, {turns} turns, {seeds} seeds; expected likes as a share of the oracle's")
    rows = []
    for method in METHODS:
        row: list[Any] = [method]
        for figures in result["windows"].values():
            row.append(f"{figures[method]['mean']:.3f} ± {figures[method]['sd']:.3f}")
        rows.append(row)
    headers = ["method", *(f"turns {w.replace('T', str(turns))}" for w in result["windows"])]
    print(report.table(headers, rows))
    beats = all(f["attune"]["mean"] > f["adaptkit"]["mean"] for f in result["windows"].values())
    print(f"attune ahead of adaptkit in every window: {'yes' if beats else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=Path, default=POPULATIONS / "default.json")
    parser.add_argument("--all", action="store_true", help="every population in bench/populations/")
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
    documents = {}
    for path in paths:
        started = time.perf_counter()
        result = run(path, args.users, args.turns, args.seed, args.seeds, args.gap, args.warmup)
        print_table(path.stem, result, args.users, args.turns, args.seeds)
        print(f"({time.perf_counter() - started:.0f} s)")
        params = {"population": path.name, "users": args.users, "turns": args.turns, "seed": args.seed,
                  "seeds": args.seeds, "gap": args.gap, "warmup": args.warmup}  # fmt: skip
        documents[path.stem] = {"params": params, **result}
        saved = report.save(f"learning_{path.stem}", documents[path.stem])
        print(f"wrote {saved}")
    if args.json:
        document = next(iter(documents.values())) if len(documents) == 1 else documents
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
