"""Per-user LoRA adapters on the real SmolLM2: how much they learn a user's taste, and how fast.

1. A pool of replies: for each everyday prompt (bench/data/everyday_prompts.txt) the
   real SmolLM2 answers under four style instructions (brief or detailed, prose or
   bullets; the bot's own instructions, token budget and cut), sampled as the bot
   samples (the [llm] defaults: temperature, top-p, repetition penalty). Tone and
   emoji are left at the defaults: SmolLM2 barely varies them (bench/style_adherence.py).
   The pool is cached, so a second run only trains.
2. Synthetic users, each liking a different style: a reply is liked when
   ``measure_style`` finds the user's preferred values in it, else disliked.
3. Each user rates replies to the training prompts (10, 25, 50 or 100 of them); the
   examples carry the plain prompt (system prompt and question, no style instruction),
   so an adapter must learn the taste itself. Replies to the held-out prompts judge it.
4. For each size: the population adapter (SFT on every user's liked replies), then each
   user's adapter on top of it, both with attune's own training code
   (agent_core.training.worker) and the [training] defaults.

Per user and on average, for the base model, the population adapter and the user's:
held-out NLL of liked replies, and preference accuracy (for the same prompt, the liked
reply more probable per token than the disliked one); training seconds per user.

    python -m bench.adapters [--sizes 10,25,50,100] [--objective sft|kto] [--json OUT]
    python -m bench.adapters --population bench/populations/text_tastes.json [--simulated-users 6] [--sizes 50]

With ``--population FILE`` it measures what the user sees instead: users of that file
rate real replies, their reward models steer, the nightly job's own code trains (by
default the ``distill`` objective), and the like rate of replies to held-out prompts is
compared for the base model, the population adapter, the user's adapter, the steered
base and both together (bench/adapters_by_reward.py says how).

Goal: with 50 rated replies, the user's adapter lowers the held-out NLL of liked replies
by at least 25% against the base and reaches 80% preference accuracy, in at most 60 s
of training per user on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any

if __package__ in (None, ""):  # run as a file: python bench/adapters.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core import reward_model
from agent_core.config import LLMSettings, TrainingSettings
from agent_core.llm.model_files import cached_directory, find_model
from agent_core.style import Style, finish, measure_style, token_budget
from agent_core.training import worker
from agent_core.training.dataset import Example
from agent_core.training.evaluate import Scored, nll_liked, score
from bench import adapters_by_reward, report

PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
SYSTEM = "You are attune, a friendly and helpful assistant."
STYLES = [
    Style.from_dict({"length": length, "tone": "casual", "emoji": "none", "format": fmt})
    for length in ("brief", "detailed")
    for fmt in ("prose", "bullets")
]
USERS: dict[str, dict[str, str]] = {  # what each synthetic user likes
    "terse": {"length": "brief"},
    "thorough": {"length": "detailed"},
    "lister": {"format": "bullets"},
    "storyteller": {"length": "detailed", "format": "prose"},
}


def pool(model_dir: Path, prompts: list[str], cache: Path, max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """Replies to every prompt in every style: from the cache, or generated now (batched)."""
    llm = LLMSettings()
    sampling = {"temperature": llm.temperature, "top_p": llm.top_p, "repetition_penalty": llm.local.repetition_penalty}
    identity = json.dumps([str(model_dir), prompts, max_new_tokens, seed, sampling])
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    path = cache / f"adapters-pool-{key}.json"
    if path.is_file():
        return list(json.loads(path.read_text(encoding="utf-8")))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    replies: list[dict[str, Any]] = []
    started = time.perf_counter()
    for s, style in enumerate(STYLES):
        system = f"{SYSTEM}\n{style.instructions()}"
        for i in range(0, len(prompts), 8):
            batch = prompts[i : i + 8]
            chats = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in batch]
            inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt",
                                                   padding=True, return_dict=True)  # fmt: skip
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=True, **sampling,
                                     max_new_tokens=token_budget(style, max_new_tokens),
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
            for prompt, ids in zip(batch, out[:, inputs["input_ids"].shape[1] :], strict=True):
                text = finish(tokenizer.decode(ids, skip_special_tokens=True), style) or "…"
                replies.append({"prompt": prompt, "asked": style.as_dict(), "text": text,
                                "observed": measure_style(text).as_dict()})  # fmt: skip
            done = s * len(prompts) + i + len(batch)
            print(f"  generated {done}/{len(prompts) * len(STYLES)} replies ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(replies), encoding="utf-8")
    return replies


def example(reply: dict[str, Any], likes: dict[str, str], at: float) -> Example:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": reply["prompt"]}]
    liked = all(reply["observed"][d] == v for d, v in likes.items())
    return Example(prompt, reply["text"], liked, 1.0, at, 0, 0)


def paired_accuracy(rows: list[Example], scored: list[Scored], reference: list[Scored] | None = None) -> float | None:
    """Over the prompts with a liked and a disliked reply: how often the liked one is more probable per token.

    With ``reference`` (the base model's scores): how often the model raised the liked
    reply's per-token log-likelihood more than the disliked one's (DPO's and KTO's
    implicit reward, TRL's ``rewards/accuracies``)."""
    by_prompt: dict[str, list[tuple[Example, float]]] = defaultdict(list)
    for i, (row, s) in enumerate(zip(rows, scored, strict=True)):
        value = s.per_token - (reference[i].per_token if reference else 0.0)
        by_prompt[row.prompt[-1]["content"]].append((row, value))
    wins = pairs = 0.0
    for items in by_prompt.values():
        for _, liked in (x for x in items if x[0].label):
            for _, disliked in (x for x in items if not x[0].label):
                wins += 1.0 if liked > disliked + 1e-9 else 0.5 if abs(liked - disliked) <= 1e-9 else 0.0
                pairs += 1
    return wins / pairs if pairs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,25,50,100", help="rated replies per user, comma-separated")
    parser.add_argument("--heldout-prompts", type=int, default=12)
    parser.add_argument(
        "--objective",
        choices=["sft", "kto", *reward_model.OBJECTIVES],
        help="the [training] objective (default: the setting's; distill with --population)",
    )
    parser.add_argument(
        "--population",
        type=Path,
        help="simulate this population file's users (bench/learning.py's format) and measure their like rate",
    )
    parser.add_argument("--simulated-users", type=int, default=6, help="with --population: how many users to draw")
    parser.add_argument("--background-users", type=int, default=30,
                        help="with --population: more users whose reactions make each user's prior")  # fmt: skip
    parser.add_argument("--prompts", default=str(PROMPTS), help="with --population: the prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=LLMSettings().max_new_tokens)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 = this machine's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache-dir", default="data/models")
    parser.add_argument("--users", default=",".join(USERS), help="which synthetic users, comma-separated")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [training] setting, e.g. --set learning_rate=0.002 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.objective is None:
        args.objective = "distill" if args.population else TrainingSettings().objective
    if args.population is None and args.objective not in ("sft", "kto"):
        parser.error(f"--objective {args.objective} ranks sampled replies by a user's reward: it needs --population")
    users = {name: USERS[name] for name in args.users.split(",")}
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    worker._emit = lambda event: None  # the worker's progress events are not needed here
    model_dir = cached_directory(find_model(args.model), Path(args.cache_dir).resolve())
    overrides = {k: json.loads(v) if v[:1] in "[{0123456789-" else v for k, v in (o.split("=", 1) for o in args.set)}
    settings = TrainingSettings.model_validate(
        {**TrainingSettings().model_dump(), "objective": args.objective, **overrides}
    ).model_dump()
    if args.population:
        by_population(args, model_dir, settings)
        return
    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(prompts)
    heldout_prompts, train_prompts = prompts[: args.heldout_prompts], prompts[args.heldout_prompts :]
    need = max(100, *sizes)  # the same pool (and cache) whatever sizes a run asks for
    train_prompts = train_prompts[: -(-need // len(STYLES))]  # enough for the largest size, in every style
    replies = pool(model_dir, heldout_prompts + train_prompts, Path(args.cache_dir).resolve(), args.max_new_tokens,
                   args.seed)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def base_model() -> Any:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    heldout: dict[str, list[Example]] = {}
    train_pool: dict[str, list[Example]] = {}
    for name, likes in users.items():
        heldout[name] = [example(r, likes, 0) for r in replies if r["prompt"] in heldout_prompts]
        mine = [r for r in replies if r["prompt"] in train_prompts]
        random.Random(f"{args.seed}-{name}").shuffle(mine)
        train_pool[name] = [example(r, likes, float(t)) for t, r in enumerate(mine)]

    def scores(model: Any, name: str) -> list[Scored]:
        return score(model, tokenizer, heldout[name], max_length=int(settings["max_length"]))

    def measure(name: str, scored: list[Scored]) -> dict[str, float | None]:
        rows = heldout[name]
        return {
            "nll_liked": nll_liked(rows, scored),
            "preference_accuracy": paired_accuracy(rows, scored),
            "reward_accuracy": paired_accuracy(rows, scored, base_scores[name]),
        }

    base = base_model().eval()
    base_scores = {name: scores(base, name) for name in users}
    base_figures = {name: measure(name, base_scores[name]) for name in users}
    del base
    results: dict[str, Any] = {"by_rated": {}, "per_user": {}}
    table_rows = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for size in sizes:
            train = {name: rows[:size] for name, rows in train_pool.items()}
            # The population adapter: everyone's liked replies, SFT (as the nightly job).
            started = time.perf_counter()
            population = worker.peft_model(base_model(), settings, None)
            liked_everyone = [e for rows in train.values() for e in rows if e.label]
            worker.fit(population, tokenizer, liked_everyone, "sft", settings, args.seed, "population", scratch / "p")
            population_seconds = time.perf_counter() - started
            population.eval()
            pop_path = scratch / f"population-{size}"
            population.save_pretrained(pop_path)
            pop_figures = {name: measure(name, scores(population, name)) for name in users}
            del population
            per_user = {}
            for name in users:
                started = time.perf_counter()
                model = worker.peft_model(base_model(), settings, str(pop_path))
                objective = args.objective if any(not e.label for e in train[name]) else "sft"
                worker.fit(model, tokenizer, train[name], objective, settings, args.seed, name, scratch / name)
                seconds = time.perf_counter() - started
                model.eval()
                mine = measure(name, scores(model, name))
                b, p = base_figures[name], pop_figures[name]
                per_user[name] = {
                    "liked_in_training": sum(e.label for e in train[name]),
                    "base": b, "population": p, "user": mine,
                    "nll_reduction_vs_base": 1 - mine["nll_liked"] / b["nll_liked"],  # type: ignore[operator]
                    "train_seconds": seconds,
                }  # fmt: skip
                table_rows.append([size, name, per_user[name]["liked_in_training"], b["nll_liked"], p["nll_liked"],
                                   mine["nll_liked"], f"{per_user[name]['nll_reduction_vs_base']:.0%}",
                                   _pct(b["preference_accuracy"]), _pct(p["preference_accuracy"]),
                                   _pct(mine["preference_accuracy"]), _pct(mine["reward_accuracy"]),
                                   f"{seconds:.0f}"])  # fmt: skip
                print(report.table(HEADERS, table_rows[-1:]).splitlines()[-1], file=sys.stderr)
                del model
            accuracies = [u["user"]["preference_accuracy"] for u in per_user.values()]
            results["per_user"][str(size)] = per_user
            results["by_rated"][str(size)] = {
                "nll_reduction_vs_base": fmean(u["nll_reduction_vs_base"] for u in per_user.values()),
                "population_nll_reduction_vs_base": fmean(
                    1 - u["population"]["nll_liked"] / u["base"]["nll_liked"] for u in per_user.values()
                ),
                "preference_accuracy": fmean(a for a in accuracies if a is not None),
                "reward_accuracy": fmean(
                    u["user"]["reward_accuracy"] for u in per_user.values() if u["user"]["reward_accuracy"] is not None
                ),
                "base_preference_accuracy": fmean(
                    u["base"]["preference_accuracy"] for u in per_user.values()
                    if u["base"]["preference_accuracy"] is not None
                ),
                "train_seconds_per_user": fmean(u["train_seconds"] for u in per_user.values()),
                "population_train_seconds": population_seconds,
            }  # fmt: skip

    print(f"per-user LoRA on {model_dir.name}: objective {args.objective}, {len(users)} users, "
          f"{len(heldout_prompts)} held-out prompts x {len(STYLES)} styles, {args.threads} threads")  # fmt: skip
    print(report.table(HEADERS, table_rows))
    summary = [[size, f"{f['nll_reduction_vs_base']:.0%}", f"{f['population_nll_reduction_vs_base']:.0%}",
                _pct(f["preference_accuracy"]), _pct(f["base_preference_accuracy"]), _pct(f["reward_accuracy"]),
                f"{f['train_seconds_per_user']:.0f}"]
               for size, f in ((int(k), v) for k, v in results["by_rated"].items())]  # fmt: skip
    print(report.table(["rated", "NLL cut: user", "NLL cut: population", "pref. acc.: user", "pref. acc.: base",
                        "reward acc.: user", "train s / user"], summary))  # fmt: skip

    at50 = results["by_rated"].get("50")
    if at50:
        met = (at50["nll_reduction_vs_base"] >= 0.25 and at50["preference_accuracy"] >= 0.8
               and at50["train_seconds_per_user"] <= 60)  # fmt: skip
        print(f"goal (50 rated: NLL -25%, 80% preference accuracy, <= 60 s per user): {'met' if met else 'NOT met'}")
    results["params"] = {**vars(args), "json": str(args.json) if args.json else None, "users": users,
                         "training": settings}  # fmt: skip
    path = report.save("adapters", results)
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


def by_population(args: argparse.Namespace, model_dir: Path, settings: dict[str, Any]) -> None:
    args.users = args.simulated_users
    results = adapters_by_reward.run(args, settings, model_dir, Path(args.cache_dir).resolve())
    print(f"nightly adapters on {model_dir.name}: objective {args.objective}, {args.users} users of "
          f"{args.population.name}, {args.heldout_prompts} held-out prompts, {args.threads} threads")  # fmt: skip
    print(report.table(adapters_by_reward.HEADERS, results.pop("table")))
    results["goal_met"] = adapters_by_reward.print_summary(results)
    if "50" in results["by_rated"]:
        results["goals"] = adapters_by_reward.goals(results["by_rated"]["50"])
    results["params"] = {**vars(args), "json": str(args.json) if args.json else None,
                         "population": str(args.population), "training": settings}  # fmt: skip
    path = report.save("adapters_population", results)
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


HEADERS = ["rated", "user", "liked", "NLL base", "NLL pop.", "NLL user", "cut", "acc. base", "acc. pop.", "acc. user",
           "reward acc. user", "train s"]  # fmt: skip


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
