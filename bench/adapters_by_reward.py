"""bench/adapters.py ``--population FILE``: does what a simulated user rewards show up in
the replies they read next? Their reward model steers the base model, and the nightly
adapter learns the steered replies.

The users of a population file (bench/learning.py's format, with ``text_effects``) rate
replies of the real SmolLM2; the bot's own code fits their reward models, steers and trains:

1. A pool of rated material: for every training prompt (bench/data/everyday_prompts.txt
   less the held-out ones) the model answers several times through the batching engine,
   each with a random style asked for (an exploring policy), prompted as the bot prompts.
   Cached, so a second run only trains.
2. Each user rates their own random sequence of those replies: liked with the chance
   their ``SimUser.like_prob`` gives for the style the text has and its text features, and
   never (at most the floor) when it is not a real answer (bench/judge.py, with the model
   telling an answer from an off-topic reply). ``--background-users`` more users of the
   same file rate too: everyone else a deployed bot has, whose reactions are each user's
   prior (the newest ``reward_model.POPULATION_ROWS`` of them, as the bot reads them).
3. For each size (10, 25, 50, 100 rated replies per user), as the bot would: the user's
   reward model fitted on all their rated replies (what steers their replies), the
   population adapter (SFT on everyone's liked training replies), then the nightly job's
   own worker (:func:`agent_core.training.worker.train_task`, objective ``distill`` by
   default: steered teaching, training, the gate on generated replies).
4. The like rate: each arm answers the held-out prompts (never rated, never trained on)
   in the style the user likes best (what the style policy converges to), and the user's
   like chance of each reply is averaged. Arms: ``base``; ``population`` (its adapter);
   ``user`` (the trained candidate, promoted or not, steering off); ``steered`` (the base
   steered by the user's reward model); ``user_steered`` (both); and two references over
   four base samples per prompt, the best by the reward model and by the user's true chances.

Beside each like rate: the share of real answers and the rate of each text feature, per
arm; the reward model's AUC and the users' own true chances' AUC, each over every user's
held-out reactions pooled (48 reactions to the held-out prompts each); the seconds a
user's night takes; and the paired sd across users of each arm's gain over the base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import numpy as np

from agent_core import reward_model
from agent_core.bandit import ALL_STYLES
from agent_core.config import AgentSettings, LLMSettings, SteeringSettings
from agent_core.llm.base import AdapterRef, GenerationRequest, Steering
from agent_core.prompts import PromptParts, system_message
from agent_core.reward_model import RewardModel
from agent_core.style import Style, measure_style, token_budget
from agent_core.training import worker
from agent_core.training.dataset import Example, Split, split_by_time, write_examples
from agent_core.training.job import fit_reward_model
from agent_core.training.sampling import Sampler
from bench import judge, report, text_features
from bench.learning import NOT_AN_ANSWER, SimUser, draw_users
from storage.crypto import Key

PER_PROMPT = 4  # replies per training prompt in the pool, each in a random style
HELDOUT_SAMPLES = 2  # replies per held-out prompt and arm for the like rate
BASE_SAMPLES = 4  # the base arm's replies per held-out prompt (the best-of-4 references choose among them)
ARMS = ("base", "population", "user", "steered", "user_steered")
REFERENCES = ("best_of_4_reward", "best_of_4_oracle")
GOAL = {"user_steered": 0.10, "user": 0.05, "auc_share": 0.9, "real_answers": 0.02, "seconds": 120.0}


def prompt_for(text: str, style: Style) -> list[dict[str, str]]:
    """The chat messages the bot would send for ``text`` asked in ``style`` (no notes, no turns)."""
    parts = PromptParts(AgentSettings().system_prompt, "", style, [], [], text)
    return [{"role": "system", "content": system_message(parts, [])}, {"role": "user", "content": text}]


def material(
    sampler: Sampler, prompts: list[str], per_prompt: int, *, max_new: int, seed: int, cache: Path, model: str
) -> list[dict[str, Any]]:
    """``per_prompt`` replies to every prompt, each in a random style: from the cache or generated now."""
    temperature = LLMSettings().temperature
    identity = json.dumps([model, prompts, per_prompt, max_new, seed, temperature, "engine-v1"])
    path = cache / f"adapters-material-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return list(json.loads(path.read_text(encoding="utf-8")))
    rng = np.random.default_rng([seed, 23])
    asked = [ALL_STYLES[int(i)] for i in rng.integers(len(ALL_STYLES), size=len(prompts) * per_prompt)]
    batch = [
        GenerationRequest(messages=prompt_for(p, style), max_new_tokens=token_budget(style, max_new),
                          temperature=temperature, seed=seed * 7919 + i, style=style)
        for i, (p, style) in enumerate(zip([p for p in prompts for _ in range(per_prompt)], asked, strict=True))
    ]  # fmt: skip
    started = time.perf_counter()
    texts: list[str] = []
    for i in range(0, len(batch), 32):  # in chunks, to say how far it is
        texts += sampler.generate(batch[i : i + 32])
        print(f"  generated {len(texts)}/{len(batch)} replies ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    rows = [{"prompt": r.messages, "text": t, "asked": r.style.as_dict() if r.style else None}
            for r, t in zip(batch, texts, strict=True)]  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return rows


class Judge:
    """Is a reply a real answer to its message (bench/judge.py)? Remembered, since every
    user and arm asks about the same replies."""

    def __init__(self, scorer: judge.TopicScorer | None) -> None:
        self.scorer = scorer
        self._seen: dict[tuple[str, str], bool] = {}

    def real(self, message: str, reply: str) -> bool:
        key = (message, reply)
        if key not in self._seen:
            self._seen[key] = judge.verdict(message, reply, self.scorer) is None
        return self._seen[key]


def liked_chance(user: SimUser, message: str, text: str, real: Judge) -> float:
    """The user's chance of liking ``text`` as the answer to ``message`` (``SimUser.like_prob``
    with the message, the verdict remembered)."""
    if not real.real(message, text):
        return NOT_AN_ANSWER
    return user.like_prob(measure_style(text), 0, text)


def rate(user: SimUser, rows: list[dict[str, Any]], rng: np.random.Generator, user_id: int,
         real: Judge | None = None) -> list[Example]:  # fmt: skip
    """The user's reactions to ``rows`` in that order: liked with their chance for the text."""
    out = []
    for t, r in enumerate(rows):
        message = r["prompt"][-1]["content"]
        chance = liked_chance(user, message, r["text"], real) if real else user.like_prob(measure_style(r["text"]), 0,
                                                                                             r["text"])  # fmt: skip
        liked = bool(rng.random() < chance)
        out.append(Example(r["prompt"], r["text"], liked, 1.0, float(t), user_id, t, r.get("asked")))
    return out


def best_style(user: SimUser) -> Style:
    return max(ALL_STYLES, key=lambda s: user.like_prob(s, 0))


def like_rate(user: SimUser, texts: list[str], messages: list[str] | None = None, real: Judge | None = None) -> float:
    """The mean chance the user likes these replies (to these messages, judged for real answers)."""
    if messages is None or real is None:
        return fmean(user.like_prob(measure_style(t), 0, t) for t in texts)
    return fmean(liked_chance(user, m, t, real) for m, t in zip(messages, texts, strict=True))


class Night:
    """One night of the nightly job's worker code, run in this process."""

    def __init__(self, model_dir: Path, cache: Path, settings: dict[str, Any], args: argparse.Namespace,
                 work: Path) -> None:  # fmt: skip
        local = LLMSettings().local
        self.spec: dict[str, Any] = {
            "model_dir": str(model_dir), "cache_dir": str(cache), "threads": args.threads, "seed": args.seed,
            "training": settings, "steering": SteeringSettings().model_dump(),
            "serving": {"max_new_tokens": args.max_new_tokens, "repetition_penalty": local.repetition_penalty,
                        "no_repeat_ngram": local.no_repeat_ngram},
        }  # fmt: skip
        self.work = work
        self.key = Key.generate()
        self.results: dict[str, dict[str, Any]] = {}
        worker._emit = self._event

    def _event(self, event: dict[str, Any]) -> None:
        if event["event"] == "start":
            print(f"  {event['task']}: training {event['steps']} steps", file=sys.stderr, flush=True)
        elif event["event"] == "result":
            self.results[event["task"]] = event
            m = event["metrics"]
            sampled = _sample_seconds(m)
            print(f"  {event['task']}: {'promoted' if event['promote'] else 'rejected'}, {event['reason']} "
                  f"({m.get('seconds')} s: sampling {sampled}, training {m.get('train_seconds')})", file=sys.stderr,
                  flush=True)  # fmt: skip
        elif event["event"] == "error":
            raise RuntimeError(f"training {event['task']} failed: {event['error']}")

    def train(self, name: str, user_id: int | None, split: Split, *, init: str | None,
              reward: tuple[np.ndarray, float | None] | None = None) -> dict[str, Any]:  # fmt: skip
        """Train one task as the worker does; its result event (promote, path, metrics) and,
        under ``candidate``, where the trained candidate lies whether or not it was promoted."""
        folder = self.work / name
        sealer = Key.from_text(self.key)
        write_examples(folder / "train.jsonl", split.train, sealer)
        write_examples(folder / "heldout.jsonl", split.heldout, sealer)
        task: dict[str, Any] = {"name": name, "user_id": user_id, "train": str(folder / "train.jsonl"),
                                "heldout": str(folder / "heldout.jsonl"), "out_dir": str(folder / "adapter"),
                                "in_service": init, "candidate_dir": str(folder / "candidate")}  # fmt: skip
        if reward is not None:
            np.save(folder / "reward.npy", reward[0])
            task.update(reward_model=str(folder / "reward.npy"), reward_auc=reward[1])
        worker.train_task(self.spec, task, self.key, init=init, in_service=init)
        result = dict(self.results[name])
        kept = folder / "candidate"
        result["candidate"] = str(kept) if kept.is_dir() else result["path"]
        return result


def run(args: argparse.Namespace, settings: dict[str, Any], model_dir: Path, cache: Path) -> dict[str, Any]:
    population = json.loads(Path(args.population).read_text(encoding="utf-8"))
    everyone = draw_users(population, args.users + args.background_users, np.random.default_rng([args.seed, 1]))
    users = everyone[: args.users]
    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = [p for p in Path(args.prompts).read_text(encoding="utf-8").splitlines() if p.strip()]
    order = np.random.default_rng([args.seed, 5]).permutation(len(prompts))
    heldout_prompts = [prompts[i] for i in order[: args.heldout_prompts]]
    train_prompts = [prompts[i] for i in order[args.heldout_prompts :]]
    local, steer = LLMSettings().local, SteeringSettings()
    sampler = Sampler(str(model_dir), cache, threads=args.threads, repetition_penalty=local.repetition_penalty,
                      no_repeat_ngram=local.no_repeat_ngram, rows_per_reply=steer.candidates)  # fmt: skip
    real = Judge(judge.TopicScorer(str(model_dir), prompts, AgentSettings().system_prompt))
    try:
        pool = material(sampler, train_prompts, PER_PROMPT, max_new=args.max_new_tokens, seed=args.seed,
                        cache=cache, model=str(model_dir))  # fmt: skip
        rated_heldout_pool = material(sampler, heldout_prompts, PER_PROMPT, max_new=args.max_new_tokens,
                                      seed=args.seed + 1, cache=cache, model=str(model_dir))  # fmt: skip
        sequences: list[list[Example]] = []
        heldout_rated: list[list[Example]] = []
        for u, user in enumerate(everyone):
            rng = np.random.default_rng([args.seed, 31, u])
            mine = [pool[int(i)] for i in rng.permutation(len(pool))[: max(sizes)]]
            sequences.append(rate(user, mine, rng, u + 1, real))
            if u < len(users):
                heldout_rated.append(rate(user, rated_heldout_pool, rng, u + 1, real))
        liked_share = fmean(e.label for rows in sequences for e in rows)
        print(f"{len(users)} users of {Path(args.population).name} (and {args.background_users} more behind their "
              f"prior); {liked_share:.0%} of their rated replies liked", file=sys.stderr)  # fmt: skip

        messages = [p for p in heldout_prompts for _ in range(HELDOUT_SAMPLES)]

        def answers(user: int, adapter: AdapterRef | None, tag: int, steering: Steering | None = None,
                    samples: int = HELDOUT_SAMPLES) -> list[str]:  # fmt: skip
            style = best_style(users[user])
            batch = [GenerationRequest(messages=prompt_for(p, style), max_new_tokens=token_budget(style,
                                       args.max_new_tokens), temperature=LLMSettings().temperature,
                                       seed=args.seed * 104_729 + user * 7 + tag * 1000 + i * 10 + k,
                                       adapter=adapter, style=style, steering=steering)
                     for i, p in enumerate(heldout_prompts) for k in range(samples)]  # fmt: skip
            return sampler.generate(batch)

        started = time.perf_counter()
        base_replies = [answers(u, None, 0, samples=BASE_SAMPLES) for u in range(len(users))]
        base_messages = [p for p in heldout_prompts for _ in range(BASE_SAMPLES)]
        base_chances = [[liked_chance(user, m, t, real) for m, t in zip(base_messages, base_replies[u], strict=True)]
                        for u, user in enumerate(users)]  # fmt: skip
        print(f"  base replies: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        results: dict[str, Any] = {"by_rated": {}, "per_user": {}}
        rows_out = []
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="attune-adapters-") as scratch:
                night = Night(model_dir, cache, settings, args, Path(scratch))
                splits = [split_by_time(rows[:size], float(settings["holdout_fraction"])) for rows in sequences]
                measured = splits[: len(users)]
                started = time.perf_counter()
                pop = night.train(
                    "population",
                    None,
                    Split([e for s in measured for e in s.train], [e for s in measured for e in s.heldout]),
                    init=None,
                )
                pop_seconds = time.perf_counter() - started
                pop_ref = AdapterRef(f"population-{size}", pop["path"]) if pop["path"] else None
                per_user = []
                pooled: dict[str, list[Any]] = {"scores": [], "chances": [], "labels": []}
                for u, user in enumerate(users):
                    prior = _prior(sequences, splits, u)
                    online = _fit(prior, sequences[u][:size])  # what steers their replies: all they rated
                    nightly, nightly_auc = fit_reward_model(prior, splits[u])
                    held = heldout_rated[u]
                    pooled["scores"] += list(online.score([e.completion for e in held]))
                    pooled["chances"] += [liked_chance(user, e.prompt[-1]["content"], e.completion, real)
                                          for e in held]  # fmt: skip
                    pooled["labels"] += [e.label for e in held]
                    started = time.perf_counter()
                    result = night.train(f"user-{u + 1}", u + 1, splits[u], init=pop["path"],
                                         reward=(nightly.weights, nightly_auc))  # fmt: skip
                    seconds = time.perf_counter() - started
                    own = AdapterRef(f"user-{u + 1}-{size}", result["candidate"]) if result["candidate"] else pop_ref
                    steering = Steering(online, candidates=steer.candidates, temperature=steer.temperature,
                                        top_k=steer.top_k)  # fmt: skip
                    replies = {
                        "population": answers(u, pop_ref, 1),
                        "user": answers(u, own, 2),
                        "steered": answers(u, None, 3, steering),
                        "user_steered": answers(u, own, 4, steering),
                    }
                    figures = _figures(user, real, messages, base_messages, base_replies[u], base_chances[u],
                                       replies, online)  # fmt: skip
                    figures.update(rated=size, liked_in_training=sum(e.label for e in splits[u].train),
                                   nightly_auc=nightly_auc, promoted=bool(result["promote"]), reason=result["reason"],
                                   train_seconds=seconds, metrics=result["metrics"])  # fmt: skip
                    per_user.append(figures)
                    rows_out.append(_row(u, user, figures))
                    print(report.table(HEADERS, rows_out[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                    shutil.rmtree(Path(scratch) / f"user-{u + 1}", ignore_errors=True)  # its candidate is measured
            results["per_user"][str(size)] = per_user
            results["by_rated"][str(size)] = summarise(per_user, pop_seconds, pop, pooled)
    finally:
        sampler.close()
    return {**results, "table": rows_out, "users": [described(u) for u in users],
            "background_users": args.background_users}  # fmt: skip


def _prior(sequences: list[list[Example]], splits: list[Split], user: int) -> list[tuple[str, float]]:
    """Everyone else's reactions as the bot reads them for a user's prior: the newest
    ``POPULATION_ROWS`` (each other user's rated replies up to this size, oldest first)."""
    rows = [(e.at, e.completion, 1.0 if e.label else -1.0) for v, s in enumerate(splits) if v != user
            for e in [*s.train, *s.heldout]]  # fmt: skip
    rows.sort(key=lambda r: r[0])
    return [(text, reward) for _, text, reward in rows[-reward_model.POPULATION_ROWS :]]


def _fit(prior: list[tuple[str, float]], rated: list[Example]) -> RewardModel:
    """The user's reward model as the bot keeps it online: everyone's as the prior, then all they rated."""
    texts, rewards = [e.completion for e in rated], [1.0 if e.label else -1.0 for e in rated]
    population = RewardModel.fit_population([t for t, _ in prior] + texts, [r for _, r in prior] + rewards)
    return population.fit_user(texts, rewards)


def _figures(
    user: SimUser, real: Judge, messages: list[str], base_messages: list[str], base: list[str],
    base_chances: list[float], replies: dict[str, list[str]], online: RewardModel,
) -> dict[str, Any]:  # fmt: skip
    """One user's like rates, real-answer rates and feature rates per arm, and the references."""
    texts = {"base": base, **replies}
    asked = {"base": base_messages, **dict.fromkeys(replies, messages)}
    chances = {"base": base_chances, **{arm: [liked_chance(user, m, t, real) for m, t in zip(messages, r,
                                                                                            strict=True)]
                                         for arm, r in replies.items()}}  # fmt: skip
    scores = online.score(base)
    by_reward, by_oracle = [], []
    for k in range(0, len(base), BASE_SAMPLES):
        group = slice(k, k + BASE_SAMPLES)
        by_reward.append(base_chances[k + int(np.argmax(scores[group]))])
        by_oracle.append(max(base_chances[group]))
    out: dict[str, Any] = {f"like_rate_{arm}": fmean(chances[arm]) for arm in ARMS}
    out["like_rate_best_of_4_reward"] = fmean(by_reward)
    out["like_rate_best_of_4_oracle"] = fmean(by_oracle)
    out["real_answer_rate"] = {arm: fmean(real.real(m, t) for m, t in zip(asked[arm], texts[arm], strict=True))
                               for arm in ARMS}  # fmt: skip
    out["feature_rates"] = {arm: {name: fmean(bool(read(t, user.name)) for t in texts[arm])
                                  for name, read in text_features.FEATURES.items()} for arm in ARMS}  # fmt: skip
    out["examples"] = {arm: texts[arm][:2] for arm in ARMS}
    return out


def described(user: SimUser) -> dict[str, Any]:
    """A simulated user as JSON: their name, base like chance, style and text effects."""
    return {"name": user.name, "base": user.base, "react_prob": user.react_prob,
            "effects": {f"{dim}={value}": e for (dim, value), e in user.effects.items()},
            "text_effects": user.text_effects}  # fmt: skip


LIKE_KEYS = [f"like_rate_{arm}" for arm in ARMS] + [f"like_rate_{ref}" for ref in REFERENCES]


def summarise(per_user: list[dict[str, Any]], pop_seconds: float, pop: dict[str, Any],
              pooled: dict[str, list[Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The users' figures at one size: means, the pooled AUCs, and each gain's paired sd."""

    def mean(key: str) -> float:
        return fmean(u[key] for u in per_user)

    def gain_sd(key: str) -> float:
        gains = [u[key] - u["like_rate_base"] for u in per_user]
        return stdev(gains) if len(gains) > 1 else 0.0

    out: dict[str, Any] = {key: mean(key) for key in LIKE_KEYS if all(key in u for u in per_user)}
    out["gain_sd"] = {key.removeprefix("like_rate_"): gain_sd(key) for key in LIKE_KEYS if key in out and
                      key != "like_rate_base"}  # fmt: skip
    if per_user and "real_answer_rate" in per_user[0]:
        arms = per_user[0]["real_answer_rate"]
        out["real_answer_rate"] = {arm: fmean(u["real_answer_rate"][arm] for u in per_user) for arm in arms}
        features = per_user[0]["feature_rates"][next(iter(arms))]
        out["feature_rates"] = {arm: {f: fmean(u["feature_rates"][arm][f] for u in per_user) for f in features}
                                for arm in arms}  # fmt: skip
    if pooled is not None:
        out["reward_auc"] = reward_model.auc(pooled["scores"], pooled["labels"])
        out["oracle_auc"] = reward_model.auc(pooled["chances"], pooled["labels"])
        out["heldout_reactions"] = len(pooled["labels"])
    sampled = [_sample_seconds(u.get("metrics") or {}) for u in per_user]
    out.update(
        train_seconds_per_user=mean("train_seconds"),
        # of those, the seconds the nightly job spent decoding: candidates to rank, or steered replies to learn
        sample_seconds_per_user=fmean(s for s in sampled if s is not None)
        if any(s is not None for s in sampled)
        else None,
        promoted=sum(u["promoted"] for u in per_user),
        users=len(per_user),
        population_promoted=bool(pop["promote"]),
        population_train_seconds=pop_seconds,
    )
    return out


def _sample_seconds(metrics: dict[str, Any]) -> float | None:
    """The seconds a user's nightly task spent sampling (``sampling``: candidates ranked by
    the reward model; ``teaching``: the steered replies the distill objective learns)."""
    seconds = (metrics.get("sampling") or metrics.get("teaching") or {}).get("seconds")
    return float(seconds) if seconds is not None else None


HEADERS = ["rated", "user", "liked", "base", "pop.", "user", "steered", "user+steered", "bo4 reward", "bo4 oracle",
           "real: user+steered", "promoted", "train s"]  # fmt: skip


def _row(u: int, user: SimUser, f: dict[str, Any]) -> list[Any]:
    return [f["rated"], f"{u + 1} {user.name}", f["liked_in_training"], *(f"{f[k]:.3f}" for k in LIKE_KEYS),
            f"{f['real_answer_rate']['user_steered']:.0%}", "yes" if f["promoted"] else "no",
            f"{f['train_seconds']:.0f}"]  # fmt: skip


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def goals(at50: dict[str, Any]) -> dict[str, bool]:
    """The goals at 50 rated replies (issue: "What a user rewards shows up in their next replies")."""
    real = at50.get("real_answer_rate", {})
    return {
        "user_steered - base >= 0.10": at50["like_rate_user_steered"] - at50["like_rate_base"] >= GOAL["user_steered"],
        "user - base >= 0.05": at50["like_rate_user"] - at50["like_rate_base"] >= GOAL["user"],
        "reward_auc >= 0.9 x oracle_auc": (at50.get("reward_auc") or 0) >= GOAL["auc_share"] *
        (at50.get("oracle_auc") or 1),
        "real answers of every arm within 2 points of the base": all(
            real[arm] >= real["base"] - GOAL["real_answers"] for arm in real),
        "<= 120 s of training per user": at50["train_seconds_per_user"] <= GOAL["seconds"],
    }  # fmt: skip


def print_summary(results: dict[str, Any], out: Callable[[str], None] = print) -> bool:
    """The summary tables and the goals at 50 rated; True when every goal is met."""
    rows = [[size, *(_num(f.get(k)) for k in LIKE_KEYS), _num(f.get("reward_auc")), _num(f.get("oracle_auc")),
             f"{f['promoted']}/{f['users']}", f"{f['train_seconds_per_user']:.0f}",
             _num(f.get("sample_seconds_per_user"))]
            for size, f in results["by_rated"].items()]  # fmt: skip
    headers = ["rated", "base", "population", "user", "steered", "user+steered", "best of 4: reward",
               "best of 4: oracle", "reward AUC", "oracle AUC", "promoted", "train s / user",
               "of which sampling s"]  # fmt: skip
    out(report.table(headers, rows))

    def gain(f: dict[str, Any], key: str) -> str:
        sd = f["gain_sd"][key.removeprefix("like_rate_")]
        return f"{f[key] - f['like_rate_base']:+.3f} ± {sd:.3f}"

    gains = [[size, *(gain(f, k) for k in LIKE_KEYS[1:])] for size, f in results["by_rated"].items()]
    out("gain over the base (paired sd across users):")
    out(report.table(["rated", *(k.removeprefix("like_rate_") for k in LIKE_KEYS[1:])], gains))
    for size, f in results["by_rated"].items():
        if "real_answer_rate" in f:
            real = ", ".join(f"{arm} {v:.0%}" for arm, v in f["real_answer_rate"].items())
            out(f"{size} rated, real answers: {real}")
            features = {name for rates in f["feature_rates"].values() for name in rates}
            table = [[name, *(f"{f['feature_rates'][arm][name]:.0%}" for arm in f["feature_rates"])]
                     for name in sorted(features)]  # fmt: skip
            out(report.table(["feature", *f["feature_rates"]], table))
    at50 = results["by_rated"].get("50")
    if not at50:
        return False
    met = goals(at50)
    for name, ok in met.items():
        out(f"goal (50 rated): {name}: {'met' if ok else 'NOT met'}")
    return all(met.values())
