"""Prove it learns: simulated users judge the text of real replies, over simulated days.

Each simulated day, every user sends K everyday messages (bench/data/everyday_prompts.txt,
different for each user and day) through the real ``Agent``: SQLite storage, memory,
the style policy, the local model and the user's adapter. The user judges the reply's
text: ``measure_style`` reads the style it really has, and the population file (the
format of bench/learning.py) gives the chance they like it; they react 👍 or 👎 as
often as the file says. After each day but the last the nightly job runs exactly as the
scheduler runs it (``NightlyScheduler.run_now``).

Arms, on the same users, prompts and random draws:
- ``no_learning``: the base model, the configured [style], no policy, no training;
- ``policy``: the online style policy, no training;
- ``policy_steered``: the policy plus each user's reward model steering their replies
  (``[steering]``), refitted after every reaction; no training;
- ``policy_adapters``: the policy, the steering and the nightly per-user adapters
  (``[training] objective = "distill"`` in the presets: the adapter learns the steered replies).
A reply that is not a real answer (bench/judge.py: degenerate, or off topic) is disliked
whatever its style and text: neither steering nor an adapter wins by stuffing replies.
The oracle always gets each user's preferred style as observed in the text; beside it,
``asked_best`` tells the model that preferred style outright (``/prefs``) and measures
how often the reply really has it: how much of the oracle this model can reach at all.

    python -m bench.personalization --preset small      # at most 30 minutes on 2 cores
    python -m bench.personalization --preset full       # a GPU machine (see bench/README.md)

Each figure is a like rate: the mean chance that the user likes a reply (the expected
value, which has less noise than the sampled reactions), averaged over seeds. Replies
are greedy by default (``--temperature``), so the arms differ only by what they learned
and by the order concurrent messages were stored in (the policy's draws are keyed by it).
The arms' days run together on one model, as one batch (as many users are served at
once): the same figures as one arm after another, in three quarters of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python bench/personalization.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.agent import Agent
from agent_core.bandit import ALL_STYLES
from agent_core.config import AgentSettings
from agent_core.events import Command, Message, Reaction
from agent_core.llm import LLMBackend, create_backend
from agent_core.llm.model_files import cached_directory, find_model
from agent_core.style import Style, measure_style
from attune.wiring import load_config, open_agent
from bench import report
from bench.judge import TopicScorer
from bench.learning import POPULATIONS, SimUser, draw_users
from scheduler.nightly import NightlyScheduler

PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
ARMS = ("no_learning", "policy", "policy_steered", "policy_adapters")
STEERED = ("policy_steered", "policy_adapters")
REFERENCE = "asked_best"
PRESETS: dict[str, dict[str, Any]] = {
    # small: the shared population adapter is not trained (it alone took minutes and 10 GB a night here)
    # 120 new tokens: a detailed reply (over 60 words) fits, so every preferred style is reachable
    # one epoch a night: with three, the nights alone took 16 of 39 minutes here
    # three seeds (a paired standard error), and days long enough that each night's gate has
    # held-out reactions of both kinds; LoRA on the top 4 layers, one epoch: the nights fit
    "small": {"users": 3, "days": 3, "messages": 8, "seeds": 3, "max_new_tokens": 120,
              "population": "text_tastes.json",
              "set": ["training.min_population_liked=100000", "training.epochs=1", "training.objective=distill",
                      "training.layers=4", "training.sample_prompts=8"]},
    "full": {"users": 32, "days": 7, "messages": 20, "seeds": 5, "max_new_tokens": 160,
             "population": "text_tastes.json", "set": ["training.objective=distill", "training.layers=10"]},
}  # fmt: skip


PAIRS = (("policy_adapters", "policy"), ("policy_steered", "policy"), ("policy", "no_learning"))


def population_path(name: str) -> Path:
    """A population file, by path or by its name under bench/populations."""
    path = Path(name)
    return path if path.is_file() else POPULATIONS / name


def settings_for(arm: str, data_dir: Path, args: argparse.Namespace, seed: int) -> dict[str, str]:
    """The arm's settings, as ``ATTUNE_*`` overrides of the defaults."""
    env = {
        "ATTUNE_STORAGE__DATA_DIR": str(data_dir),
        "ATTUNE_LLM__MAX_NEW_TOKENS": str(args.max_new_tokens),
        "ATTUNE_LLM__TEMPERATURE": str(args.temperature),
        "ATTUNE_LLM__LOCAL__MODEL": args.model,
        "ATTUNE_LLM__LOCAL__CACHE_DIR": str(Path(args.cache_dir).resolve()),
        "ATTUNE_POLICY__LEARN": "false" if arm in ("no_learning", REFERENCE) else "true",
        "ATTUNE_POLICY__SEED": str(seed),
        "ATTUNE_TRAINING__ENABLED": "true" if arm == "policy_adapters" else "false",
        "ATTUNE_STEERING__ENABLED": "true" if arm in STEERED else "false",
        "ATTUNE_TRAINING__MIN_NEW_RATED": str(max(2, args.messages - 1)),  # each night, whoever reacted enough
        "ATTUNE_TRAINING__THREADS": str(os.cpu_count() or 1),  # nights here are not shared with live users
        "ATTUNE_LLM__TIMEOUT_S": "1800",  # it measures what is learned: 15 users at once on 2 cores may be slow
        "ATTUNE_LLM__LOCAL__QUEUE_TIMEOUT_S": "1800",
        "ATTUNE_LIMITS__MESSAGES_PER_MINUTE": "100000",
        "ATTUNE_LIMITS__GLOBAL_MESSAGES_PER_MINUTE": "0",
        "ATTUNE_LLM__LOCAL__MAX_BATCH_SIZE": str(min(64, (len(ARMS) + 1) * args.users)),  # every arm's users at once
        "ATTUNE_LLM__LOCAL__MAX_QUEUE": str((len(ARMS) + 1) * args.users),
    }
    for item in [*args.preset_set, *args.set]:
        key, _, value = item.partition("=")
        env["ATTUNE_" + key.upper().replace(".", "__")] = value
    return env


def prompts_for(seed: int, users: int, days: int, messages: int) -> list[list[list[str]]]:
    """[day][user] -> K prompts; no prompt repeats within a user, days differ, users differ
    as far as the shipped set allows."""
    pool = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    rng = np.random.default_rng([seed, 99])
    order = [pool[i] for i in rng.permutation(len(pool))]
    per_user = days * messages
    return [[[order[(u * per_user + d * messages + k) % len(order)] for k in range(messages)]
             for u in range(users)] for d in range(days)]  # fmt: skip


def best_style(user: SimUser, turn: int) -> tuple[Style, float]:
    scored = [(user.like_prob(style, turn), style) for style in ALL_STYLES]
    p, style = max(scored, key=lambda t: t[0])
    return style, p


@dataclass
class ArmRun:
    """One arm of one seed: its own agent and database; the model is shared by every arm."""

    arm: str
    agent: Agent
    nightly: NightlyScheduler
    by_day: list[float] = field(default_factory=list)
    matched: list[bool] = field(default_factory=list)
    nights: list[dict[str, int]] = field(default_factory=list)


async def open_arm(arm: str, seed: int, users: list[SimUser], args: argparse.Namespace, work: Path,
                   llm: LLMBackend) -> ArmRun:  # fmt: skip
    config = load_config(None, environ=settings_for(arm, work / f"{arm}-{seed}", args, seed))
    agent = await open_agent(config, llm)
    run = ArmRun(arm, agent, NightlyScheduler(agent.training, config.settings.training,
                                              config.settings.storage.sqlalchemy_url,
                                              prune=agent.store.delete_messages_before))  # fmt: skip
    if arm == REFERENCE:  # the user's preferred style, asked for outright
        for u, user in enumerate(users):
            style, _ = best_style(user, 0)
            for dim, value in style.as_dict().items():
                await agent.handle_command(Command(platform="bench", chat_id=f"u{u}", sender_id=f"u{u}",
                                                   name="prefs", args=f"{dim} {value}"))  # fmt: skip
    return run


async def run_day(
    run: ArmRun, day: int, seed: int, users: list[SimUser], react_probs: list[float], prompts: list[list[list[str]]],
    args: argparse.Namespace, scorer: TopicScorer | None,
) -> None:  # fmt: skip
    """Every user's messages of one day, the users concurrently; then the night, if the arm trains."""
    agent = run.agent

    async def one_user(u: int) -> list[float]:
        liked_p = []
        for k, text in enumerate(prompts[day][u]):
            turn = day * args.messages + k
            msg = Message(platform="bench", chat_id=f"u{u}", sender_id=f"u{u}", sender_name=users[u].name,
                          text=text, message_id=f"d{day}-m{k}")  # fmt: skip
            reply = await agent.handle_message(msg)
            assert reply is not None and reply.kind == "answer", reply
            await agent.delivered(reply, f"d{day}-r{k}")
            observed = measure_style(reply.text)
            asked = text if scorer is not None else None  # judged: a reply that does not answer is disliked
            p = users[u].like_prob(observed, turn, reply.text, asked, scorer)  # its style, its text effects
            liked_p.append(p)
            if run.arm == REFERENCE:
                run.matched.append(observed == best_style(users[u], turn)[0])
            draw = np.random.default_rng([seed, u, turn]).random(2)  # the same draws in every arm
            if draw[0] < react_probs[u]:
                emoji = "👍" if draw[1] < p else "👎"
                await agent.handle_reaction(Reaction(platform="bench", chat_id=f"u{u}", sender_id=f"u{u}",
                                                     message_id=f"d{day}-r{k}", emoji=emoji))  # fmt: skip
        return liked_p

    per_user = await asyncio.gather(*(one_user(u) for u in range(len(users))))  # batched by the engine
    run.by_day.append(float(np.mean([p for ps in per_user for p in ps])))
    print(f"  seed {seed} {run.arm}: day {day + 1} like rate {run.by_day[-1]:.3f}", file=sys.stderr, flush=True)


async def run_night(run: ArmRun, day: int, seed: int) -> None:
    started = time.perf_counter()
    await run.nightly.run_now()
    rows = await run.agent.store.db.fetchall("SELECT status, COUNT(*) FROM adapters GROUP BY status")
    run.nights.append({"day": day + 1, "seconds": round(time.perf_counter() - started, 1),
                       **{str(r[0]): int(r[1]) for r in rows}})  # fmt: skip
    print(f"  seed {seed} night {day + 1}: {run.nights[-1]}", file=sys.stderr, flush=True)


async def run_seed(seed: int, users: list[SimUser], args: argparse.Namespace, work: Path, scorer: TopicScorer | None
                   ) -> dict[str, ArmRun]:  # fmt: skip
    """Every arm over every day. The arms' days run together on one model (one batch holds
    every arm's users: only policy_adapters has adapters, so their names cannot clash),
    and the night of the arm that trains runs between days, as the scheduler would run it."""
    react_probs = [u.react_prob for u in users]
    prompts = prompts_for(seed, len(users), args.days, args.messages)
    # the model every arm shares, with rows for the steered arms' candidate sentences
    shared = load_config(None, environ=settings_for(STEERED[0], work / f"model-{seed}", args, seed))
    llm = create_backend(shared)
    runs: dict[str, ArmRun] = {}
    try:  # closed whatever happens: database threads would keep the process alive
        await llm.start()
        for arm in (*ARMS, REFERENCE):
            runs[arm] = await open_arm(arm, seed, users, args, work, llm)
        for day in range(args.days):
            await asyncio.gather(*(run_day(r, day, seed, users, react_probs, prompts, args, scorer)
                                   for r in runs.values()))  # fmt: skip
            for r in runs.values():
                if r.agent.settings.training.enabled and day < args.days - 1:
                    await run_night(r, day, seed)
    finally:
        for r in runs.values():
            await r.agent.store.db.close()
        await llm.close()
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    population = json.loads(population_path(args.population).read_text(encoding="utf-8"))
    model_dir = cached_directory(find_model(args.model), Path(args.cache_dir).resolve())
    pool = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    scorer = TopicScorer(str(model_dir), pool, AgentSettings().system_prompt) if args.judge_answers else None
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in (*ARMS, REFERENCE)}
    oracle: list[float] = []
    with tempfile.TemporaryDirectory(prefix="attune-personalization-") as tmp:
        for seed in range(args.seed, args.seed + args.seeds):
            rng = np.random.default_rng([seed, 1])
            users = draw_users(population, args.users, rng)
            oracle.append(float(np.mean([best_style(u, 0)[1] for u in users])))
            for arm, r in (await run_seed(seed, users, args, Path(tmp), scorer)).items():
                results[arm].append({"by_day": r.by_day, "matched": r.matched, "nights": r.nights})
    days = []
    for day in range(args.days):
        row: dict[str, Any] = {"day": day + 1}
        for arm in (*ARMS, REFERENCE):
            row[arm], row[f"{arm}_sd"] = mean_sd([r["by_day"][day] for r in results[arm]])
        days.append(row)
    achievable = [float(np.mean(r["matched"])) for r in results[REFERENCE]]
    gaps = {}  # the same users, prompts and draws in each arm: the gap is paired by seed
    for better, worse in PAIRS:
        per_seed = [b["by_day"][-1] - w["by_day"][-1] for b, w in zip(results[better], results[worse], strict=True)]
        gaps[f"{better}-{worse}"], gaps[f"{better}-{worse}_sd"] = mean_sd(per_seed)
    return {
        "days": days,
        "gaps_last_day": gaps,
        "seeds": args.seeds,
        "oracle": mean_sd(oracle)[0],
        "oracle_sd": mean_sd(oracle)[1],
        "achievable": mean_sd(achievable)[0],
        "achievable_sd": mean_sd(achievable)[1],
        "nights": [r["nights"] for r in results["policy_adapters"]],
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [row["day"] for row in data["days"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in (*ARMS, REFERENCE):
        ax.errorbar(days, [row[arm] for row in data["days"]], yerr=[row[f"{arm}_sd"] for row in data["days"]],
                    label=arm, marker="o", capsize=3, linestyle="--" if arm == REFERENCE else "-")  # fmt: skip
    ax.axhline(data["oracle"], color="grey", linestyle=":", label="oracle")
    ax.set_xlabel("day")
    ax.set_ylabel("like rate")
    ax.set_xticks(days)
    ax.set_title(f"attune personalization, {data['seeds']} seeds (mean ± sd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for name in ("users", "days", "messages", "seeds", "max_new_tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="overrides the preset")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--population", help="a population file (bench/learning.py's format); default: the preset's")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (greedy, the default): the arms differ only by what they learned")  # fmt: skip
    parser.add_argument("--cache-dir", default="data/models", help="where the local model is cached")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other setting for every arm, e.g. training.epochs=4")  # fmt: skip
    parser.add_argument("--no-judge-answers", dest="judge_answers", action="store_false",
                        help="count every reply as an answer (a random test model writes none)")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("--plot", metavar="PNG", default=str(report.RESULTS / "personalization.png"))
    args = parser.parse_args()
    for name, value in PRESETS[args.preset].items():
        if name == "set":
            args.preset_set = value
        elif name == "population":
            args.population = args.population or value
        elif getattr(args, name) is None:
            setattr(args, name, value)

    started = time.perf_counter()
    data = asyncio.run(run(args))
    minutes = (time.perf_counter() - started) / 60
    rows = [[row["day"], *(f"{row[a]:.3f} ± {row[f'{a}_sd']:.3f}" for a in (*ARMS, REFERENCE)),
             *(f"{row[a] / data['oracle']:.0%}" for a in ARMS)] for row in data["days"]]  # fmt: skip
    print(f"personalization: {args.users} users x {args.days} days x {args.messages} messages, {args.seeds} seeds, "
          f"{args.preset} preset, {minutes:.1f} min")  # fmt: skip
    print(report.table(["day", *ARMS, REFERENCE, *(f"{a} / oracle" for a in ARMS)], rows))
    print(f"oracle (each user's preferred style, observed): {data['oracle']:.3f} ± {data['oracle_sd']:.3f}")
    print(f"achievable: the reply has the preferred style, asked for outright, "
          f"{data['achievable']:.0%} ± {data['achievable_sd']:.0%} of the time")  # fmt: skip
    gaps = data["gaps_last_day"]
    for better, worse in PAIRS:
        pair = f"{better}-{worse}"
        print(f"day {args.days}, {pair}: {gaps[pair]:+.3f} (paired sd across seeds {gaps[pair + '_sd']:.3f}, "
              f"standard error {gaps[pair + '_sd'] / np.sqrt(args.seeds):.3f})")  # fmt: skip
    se = gaps["policy_adapters-policy_sd"] / np.sqrt(args.seeds)
    goal = bool(gaps["policy_adapters-policy"] > 2 * se and gaps["policy-no_learning"] > 0)
    print(f"goal (day {args.days}: policy_adapters above policy by more than twice the standard error of the paired "
          f"difference, and policy above no_learning): {'met' if goal else 'NOT met'}")  # fmt: skip
    last = data["days"][-1]
    goals = {
        "policy above no_learning by more than twice the paired sd": gaps["policy-no_learning"] > 0
        and gaps["policy-no_learning"] > 2 * gaps["policy-no_learning_sd"],
        "policy at 75 % of the oracle or more": last["policy"] >= 0.75 * data["oracle"],
        "achievable at 85 % or more": data["achievable"] >= 0.85,
    }
    for name, met in goals.items():
        print(f"goal (day {args.days}): {name}: {'met' if met else 'NOT met'}")
    data |= {"params": vars(args), "minutes": round(minutes, 1), "goal_met": goal, "goals": goals}
    path = report.save("personalization", data)
    print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(path.read_text())
        print(f"wrote {args.json}")
    try:
        plot(data, Path(args.plot))
        print(f"plot: {args.plot}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
