"""bench/adapters.py ``--population FILE``: do the nightly adapters raise what a simulated user likes?

The users of a population file (bench/learning.py's format, usually with ``text_effects``)
rate replies of the real SmolLM2, and the nightly job's own code trains on them:

1. A pool of rated material: for every training prompt (bench/data/everyday_prompts.txt
   less the held-out ones) the model answers several times through the batching engine,
   each with a random style asked for (an exploring policy), prompted as the bot prompts
   (its system message with that style's instructions; no display name, since the pool
   is shared by every user). Cached, so a second run only trains.
2. Each user rates their own random sequence of those replies: liked with the chance
   their ``SimUser.like_prob`` gives for the style the text has and its text features.
3. For each size (10, 25, 50, 100 rated replies per user), as a night would:
   the population adapter (SFT on everyone's liked training replies), then per user
   the reward model (:func:`agent_core.training.job.fit_reward_model`, the others'
   replies as its prior) and the user's adapter on top of the population's
   (:func:`agent_core.training.worker.train_task`: sampling through the batching engine,
   ranking, training, the reward gate). The user keeps what serves them after the night:
   their adapter if the gate promoted it, else the population's.
4. The like rate: every model answers the held-out prompts (never rated, never trained
   on) in the style the user likes best (what the style policy converges to), and the
   user's expected like probability of each reply is averaged: base, population, user.

Secondary: on held-out rated replies (the held-out prompts, answered in random styles,
each user's own draws), the NLL of the liked ones and the preference accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from agent_core import reward_model
from agent_core.bandit import ALL_STYLES
from agent_core.config import AgentSettings, LLMSettings
from agent_core.llm.base import AdapterRef, GenerationRequest
from agent_core.prompts import PromptParts, system_message
from agent_core.style import Style, measure_style, token_budget
from agent_core.training import worker
from agent_core.training.dataset import Example, Split, split_by_time, write_examples
from agent_core.training.evaluate import Scored, measures, score
from agent_core.training.job import fit_reward_model
from agent_core.training.sampling import Sampler
from bench import report
from bench.learning import SimUser, draw_users
from storage.crypto import Key

PER_PROMPT = 4  # replies per training prompt in the pool, each in a random style
HELDOUT_SAMPLES = 2  # replies per held-out prompt and model for the like rate


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


def rate(user: SimUser, rows: list[dict[str, Any]], rng: np.random.Generator, user_id: int) -> list[Example]:
    """The user's reactions to ``rows`` in that order: liked with their chance for the text."""
    out = []
    for t, r in enumerate(rows):
        liked = bool(rng.random() < user.like_prob(measure_style(r["text"]), 0, r["text"]))
        out.append(Example(r["prompt"], r["text"], liked, 1.0, float(t), user_id, t, r.get("asked")))
    return out


def best_style(user: SimUser) -> Style:
    return max(ALL_STYLES, key=lambda s: user.like_prob(s, 0))


def like_rate(user: SimUser, texts: list[str]) -> float:
    return fmean(user.like_prob(measure_style(t), 0, t) for t in texts)


class Night:
    """One night of the nightly job's worker code, run in this process."""

    def __init__(self, model_dir: Path, cache: Path, settings: dict[str, Any], args: argparse.Namespace,
                 work: Path) -> None:  # fmt: skip
        local = LLMSettings().local
        self.spec: dict[str, Any] = {
            "model_dir": str(model_dir), "cache_dir": str(cache), "threads": args.threads, "seed": args.seed,
            "training": settings,
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
            sampled = m.get("sampling", {}).get("seconds")
            print(f"  {event['task']}: {'promoted' if event['promote'] else 'rejected'}, {event['reason']} "
                  f"({m.get('seconds')} s: sampling {sampled}, training {m.get('train_seconds')})", file=sys.stderr,
                  flush=True)  # fmt: skip
        elif event["event"] == "error":
            raise RuntimeError(f"training {event['task']} failed: {event['error']}")

    def train(self, name: str, user_id: int | None, split: Split, *, init: str | None,
              reward: tuple[np.ndarray, float | None] | None = None) -> dict[str, Any]:  # fmt: skip
        """Train one task as the worker does; its result event (promote, path, metrics)."""
        folder = self.work / name
        sealer = Key.from_text(self.key)
        write_examples(folder / "train.jsonl", split.train, sealer)
        write_examples(folder / "heldout.jsonl", split.heldout, sealer)
        task: dict[str, Any] = {"name": name, "user_id": user_id, "train": str(folder / "train.jsonl"),
                                "heldout": str(folder / "heldout.jsonl"), "out_dir": str(folder / "adapter"),
                                "in_service": init}  # fmt: skip
        if reward is not None:
            np.save(folder / "reward.npy", reward[0])
            task.update(reward_model=str(folder / "reward.npy"), reward_auc=reward[1])
        worker.train_task(self.spec, task, self.key, init=init, in_service=init)
        return self.results[name]


def run(args: argparse.Namespace, settings: dict[str, Any], model_dir: Path, cache: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    population = json.loads(Path(args.population).read_text(encoding="utf-8"))
    users = draw_users(population, args.users, np.random.default_rng([args.seed, 1]))
    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = [p for p in Path(args.prompts).read_text(encoding="utf-8").splitlines() if p.strip()]
    order = np.random.default_rng([args.seed, 5]).permutation(len(prompts))
    heldout_prompts = [prompts[i] for i in order[: args.heldout_prompts]]
    train_prompts = [prompts[i] for i in order[args.heldout_prompts :]]
    local = LLMSettings().local
    sampler = Sampler(str(model_dir), cache, threads=args.threads, repetition_penalty=local.repetition_penalty,
                      no_repeat_ngram=local.no_repeat_ngram, batch_size=16)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        pool = material(sampler, train_prompts, PER_PROMPT, max_new=args.max_new_tokens, seed=args.seed,
                        cache=cache, model=str(model_dir))  # fmt: skip
        rated_heldout_pool = material(sampler, heldout_prompts, PER_PROMPT, max_new=args.max_new_tokens,
                                      seed=args.seed + 1, cache=cache, model=str(model_dir))  # fmt: skip
        sequences: list[list[Example]] = []
        heldout_rated: list[list[Example]] = []
        for u, user in enumerate(users):
            rng = np.random.default_rng([args.seed, 31, u])
            mine = [pool[int(i)] for i in rng.permutation(len(pool))[: max(sizes)]]
            sequences.append(rate(user, mine, rng, u + 1))
            heldout_rated.append(rate(user, rated_heldout_pool, rng, u + 1))
        liked_share = fmean(e.label for rows in sequences for e in rows)
        print(f"{len(users)} users of {Path(args.population).name}; {liked_share:.0%} of their rated replies liked",
              file=sys.stderr)  # fmt: skip

        def answers(adapter: AdapterRef | None, style: Style, tag: int) -> list[str]:
            batch = [GenerationRequest(messages=prompt_for(p, style), max_new_tokens=token_budget(style,
                                       args.max_new_tokens), temperature=LLMSettings().temperature,
                                       seed=args.seed * 104_729 + tag * 1000 + i * 10 + k, adapter=adapter,
                                       style=style)
                     for i, p in enumerate(heldout_prompts) for k in range(HELDOUT_SAMPLES)]  # fmt: skip
            return sampler.generate(batch)

        def scores(model: Any, u: int) -> list[Scored]:
            return score(model, tokenizer, heldout_rated[u], max_length=int(settings["max_length"]))

        def secondary(model: Any, u: int) -> dict[str, float | None]:
            return measures(heldout_rated[u], scores(model, u), base_scores[u])

        def loaded(path: str | None) -> Any:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            return (PeftModel.from_pretrained(base, path) if path else base).eval()

        base_model = loaded(None)
        base_rates = [like_rate(user, answers(None, best_style(user), 0)) for user in users]
        base_scores = [scores(base_model, u) for u in range(len(users))]
        base_secondary = [secondary(base_model, u) for u in range(len(users))]
        del base_model
        results: dict[str, Any] = {"by_rated": {}, "per_user": {}}
        rows_out = []
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="attune-adapters-") as scratch:
                night = Night(model_dir, cache, settings, args, Path(scratch))
                splits = [split_by_time(rows[:size], float(settings["holdout_fraction"])) for rows in sequences]
                everyone = Split([e for s in splits for e in s.train], [e for s in splits for e in s.heldout])
                started = time.perf_counter()
                pop = night.train("population", None, everyone, init=None)
                pop_seconds = time.perf_counter() - started
                pop_path = pop["path"]  # None: not promoted, the base serves everyone
                pop_ref = AdapterRef(f"population-{size}", pop_path) if pop_path else None
                pop_model = loaded(pop_path)  # scored once for every user
                pop_secondary = [secondary(pop_model, u) for u in range(len(users))]
                del pop_model
                per_user = []
                for u, user in enumerate(users):
                    prior = [(e.completion, 1.0 if e.label else -1.0) for v, s in enumerate(splits) if v != u
                             for e in s.train]  # fmt: skip
                    reward, auc = fit_reward_model(prior, splits[u])
                    held = splits[u].heldout  # what no reward model can beat: the user's own chances
                    oracle = reward_model.auc([user.like_prob(measure_style(e.completion), 0, e.completion)
                                               for e in held], [e.label for e in held])  # fmt: skip
                    started = time.perf_counter()
                    result = night.train(f"user-{u + 1}", u + 1, splits[u], init=pop_path,
                                         reward=(reward.weights, auc))  # fmt: skip
                    seconds = time.perf_counter() - started
                    served = result["path"] or pop_path
                    ref = AdapterRef(f"user-{u + 1}-{size}", served) if served else None
                    style = best_style(user)
                    figures = {
                        "rated": size, "liked_in_training": sum(e.label for e in splits[u].train),
                        "like_rate_base": base_rates[u],
                        "like_rate_population": like_rate(user, answers(pop_ref, style, 1)) if pop_ref
                        else base_rates[u],
                        "like_rate_user": like_rate(user, answers(ref, style, 1)) if ref else base_rates[u],
                        "reward_auc": auc, "oracle_auc": oracle, "promoted": bool(result["promote"]),
                        "reason": result["reason"],
                        "train_seconds": seconds, "metrics": result["metrics"],
                        "base": base_secondary[u],
                    }  # fmt: skip
                    figures["population"] = pop_secondary[u]
                    if served == pop_path:  # not promoted: the population's model serves them
                        figures["user"] = pop_secondary[u]
                    else:
                        user_model = loaded(served)
                        figures["user"] = secondary(user_model, u)
                        del user_model
                    per_user.append(figures)
                    rows_out.append(_row(u, user, figures))
                    print(report.table(HEADERS, rows_out[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            results["per_user"][str(size)] = per_user
            results["by_rated"][str(size)] = summarise(per_user, pop_seconds, pop)
    finally:
        sampler.close()
    return {**results, "table": rows_out, "users": [described(u) for u in users]}


def described(user: SimUser) -> dict[str, Any]:
    """A simulated user as JSON: their name, base like chance, style and text effects."""
    return {"name": user.name, "base": user.base, "react_prob": user.react_prob,
            "effects": {f"{dim}={value}": e for (dim, value), e in user.effects.items()},
            "text_effects": user.text_effects}  # fmt: skip


def summarise(per_user: list[dict[str, Any]], pop_seconds: float, pop: dict[str, Any]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return fmean(u[key] for u in per_user)

    def mean_of(part: str, key: str) -> float | None:
        values = [u[part][key] for u in per_user if u[part][key] is not None]
        return fmean(values) if values else None

    aucs = [u["reward_auc"] for u in per_user if u["reward_auc"] is not None]
    oracles = [u["oracle_auc"] for u in per_user if u["oracle_auc"] is not None]
    return {
        "like_rate_base": mean("like_rate_base"),
        "like_rate_population": mean("like_rate_population"),
        "like_rate_user": mean("like_rate_user"),
        "reward_auc": fmean(aucs) if aucs else None,
        "oracle_auc": fmean(oracles) if oracles else None,
        "train_seconds_per_user": mean("train_seconds"),
        "promoted": sum(u["promoted"] for u in per_user),
        "users": len(per_user),
        "population_promoted": bool(pop["promote"]),
        "population_train_seconds": pop_seconds,
        **{f"{key}_{part}": mean_of(part, key) for part in ("base", "population", "user")
           for key in ("nll_liked", "preference_accuracy")},
    }  # fmt: skip


HEADERS = ["rated", "user", "liked", "like base", "like pop.", "like user", "AUC", "oracle AUC", "promoted", "NLL base",
           "NLL user", "acc. base", "acc. user", "train s"]  # fmt: skip


def _row(u: int, user: SimUser, f: dict[str, Any]) -> list[Any]:
    return [f["rated"], f"{u + 1} {user.name}", f["liked_in_training"], f"{f['like_rate_base']:.3f}",
            f"{f['like_rate_population']:.3f}", f"{f['like_rate_user']:.3f}", _num(f["reward_auc"]),
            _num(f["oracle_auc"]), "yes" if f["promoted"] else "no", _num(f["base"]["nll_liked"]),
            _num(f["user"]["nll_liked"]),
            _pct(f["base"]["preference_accuracy"]), _pct(f["user"]["preference_accuracy"]),
            f"{f['train_seconds']:.0f}"]  # fmt: skip


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def print_summary(results: dict[str, Any]) -> bool:
    """The summary table and the goal at 50 rated; True when the goal is met."""
    rows = [[size, f"{f['like_rate_base']:.3f}", f"{f['like_rate_population']:.3f}", f"{f['like_rate_user']:.3f}",
             f"{f['like_rate_user'] - f['like_rate_base']:+.3f}",
             f"{f['like_rate_user'] - f['like_rate_population']:+.3f}", _num(f["reward_auc"]),
             _num(f["oracle_auc"]), f"{f['promoted']}/{f['users']}", f"{f['train_seconds_per_user']:.0f}"]
            for size, f in results["by_rated"].items()]  # fmt: skip
    print(report.table(["rated", "like: base", "like: population", "like: user", "user - base", "user - population",
                        "reward AUC", "oracle AUC", "promoted", "train s / user"], rows))  # fmt: skip
    at50 = results["by_rated"].get("50")
    if not at50:
        return False
    met = (at50["like_rate_user"] - at50["like_rate_base"] >= 0.10
           and at50["like_rate_user"] - at50["like_rate_population"] >= 0.10
           and (at50["reward_auc"] or 0) >= 0.75 and at50["train_seconds_per_user"] <= 120)  # fmt: skip
    print("goal (50 rated: like rate +0.10 over base and population, AUC >= 0.75, <= 120 s per user): "
          + ("met" if met else "NOT met"))  # fmt: skip
    return met
