"""Does the reply have the style asked for? The local model with and without style control.

For each everyday prompt (bench/data/everyday_prompts.txt), the local model answers
three times, as the bot asks it to (the system prompt with the style's instructions, the
style's token budget, the bot's own sampling settings from config.toml: temperature,
top-p, repetition penalty, loop guard): with two opposite styles (so every value of
every dimension is asked for equally often) and once with no style. It does so twice:

- ``controls``: the bot as it runs, with decoding-time style control
  (``[llm.local] style_control = true``, agent_core/llm/style_control.py);
- ``instructions``: the same requests with the instructions alone (``style_control = false``).

``measure_style`` reads each reply. Per dimension and value: how often a reply asked for
it has it (with controls, and with instructions only), and how often an unasked reply has
it (the base rate). Beside that, the share of real answers (bench/judge.py: not
degenerate, on topic), hyphenated words split by a space ("well- being": a control put
something inside a word), lists asked for with fewer than three items, and tokens/s of
each pass, one request at a time.

    python -m bench.style_adherence [--prompts 16] [--max-new-tokens 160] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python bench/style_adherence.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.bandit import ALL_STYLES
from agent_core.llm import GenerationRequest, create_backend
from agent_core.llm.local import LocalBackend
from agent_core.style import DIMENSIONS, Style, finish, measure_style, token_budget
from attune.wiring import load_config
from bench import report
from bench.judge import TopicScorer, verdict

PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
PASSES = ("controls", "instructions")
GOALS = {"shows_when_asked": 0.90, "real_answers": 0.97, "tokens_per_s_ratio": 0.90}
SPLIT_WORD = re.compile(r"[A-Za-z]- [a-z]")  # "well- being": something inserted inside a hyphenated word
LIST_ITEM = re.compile(r"^\s*[-*•] ", re.MULTILINE)
MIN_ITEMS = 3  # a list asked for has at least this many items


def split_words(text: str) -> list[str]:
    """The hyphenated words a control split with a space ("well- being")."""
    return [text[max(0, m.start() - 8) : m.end() + 6] for m in SPLIT_WORD.finditer(text)]


def list_items(text: str) -> int:
    return len(LIST_ITEM.findall(text))


def opposite(style: Style) -> Style:
    return Style.from_dict({d: DIMENSIONS[d][1 - DIMENSIONS[d].index(v)] for d, v in style.as_dict().items()})


def requests(prompts: list[str], system: str, budget: int, temperature: float, top_p: float
             ) -> list[tuple[str, Style | None, GenerationRequest]]:  # fmt: skip
    out = []
    for i, prompt in enumerate(prompts):
        first = ALL_STYLES[i % len(ALL_STYLES)]
        for style in (first, opposite(first), None):
            content = system if style is None else f"{system}\n{style.instructions()}"
            request = GenerationRequest(
                messages=[{"role": "system", "content": content}, {"role": "user", "content": prompt}],
                max_new_tokens=budget if style is None else token_budget(style, budget),
                temperature=temperature, top_p=top_p, seed=i, style=style,
            )  # fmt: skip
            out.append((prompt, style, request))
    return out


async def one_pass(backend: LocalBackend, todo: list[tuple[str, Style | None, GenerationRequest]], name: str
                   ) -> tuple[list[str], float]:  # fmt: skip
    """Every request in turn; the replies as sent and tokens/s of generation."""
    replies, seconds, tokens = [], 0.0, 0
    for k, (_, style, request) in enumerate(todo):
        before, started = backend.generated_tokens, time.perf_counter()
        text = await backend.generate(request)
        seconds += time.perf_counter() - started
        tokens += backend.generated_tokens - before
        replies.append(finish(text, style))
        if (k + 1) % 12 == 0:
            print(f"  {name}: {k + 1}/{len(todo)} replies ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return replies, tokens / seconds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    environ = {
        "ATTUNE_LLM__LOCAL__CACHE_DIR": str(Path(args.cache_dir).resolve()),
        "ATTUNE_LLM__LOCAL__MODEL": args.model,
    }
    config = load_config(None, environ=environ)  # the bot's own settings (config.toml's defaults)
    settings = config.settings
    backend = create_backend(config)
    assert isinstance(backend, LocalBackend), "the benchmark measures the local backend"
    await backend.start()
    pool = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    prompts = pool[: args.prompts]
    budget = args.max_new_tokens or settings.llm.max_new_tokens
    todo = requests(prompts, settings.agent.system_prompt, budget, settings.llm.temperature, settings.llm.top_p)
    results: dict[str, Any] = {}
    try:
        for name in PASSES:
            backend.style_control = name == "controls"
            replies, speed = await one_pass(backend, todo, name)
            results[name] = {"replies": replies, "tokens_per_s": speed}
        model_dir, described = str(backend.model_dir), backend.describe()
    finally:
        await backend.close()
    scorer = TopicScorer(model_dir, pool, settings.agent.system_prompt)
    return summarise(todo, results, scorer) | {"model": described, "prompts": len(prompts),
                                               "max_new_tokens": budget}  # fmt: skip


def summarise(todo: list[tuple[str, Style | None, GenerationRequest]], results: dict[str, Any],
              scorer: TopicScorer | None) -> dict[str, Any]:  # fmt: skip
    values: dict[str, dict[str, Any]] = {}
    answers: dict[str, Any] = {}
    for name in PASSES:
        asked: dict[tuple[str, str], list[bool]] = defaultdict(list)
        natural: dict[tuple[str, str], list[bool]] = defaultdict(list)
        failures, split, short_lists = [], [], []
        for (prompt, style, _), reply in zip(todo, results[name]["replies"], strict=True):
            observed = measure_style(reply).as_dict()
            for dim, options in DIMENSIONS.items():
                if style is None:
                    for value in options:
                        natural[(dim, value)].append(observed[dim] == value)
                else:
                    asked[(dim, getattr(style, dim))].append(observed[dim] == getattr(style, dim))
            split += split_words(reply)
            if style is not None and style.format == "bullets" and list_items(reply) < MIN_ITEMS:
                short_lists.append(reply)
            if why := verdict(prompt, reply, scorer):
                failures.append({"prompt": prompt, "style": style.as_dict() if style else None, "why": why,
                                 "reply": reply})  # fmt: skip
        for (dim, value), hits in asked.items():
            entry = values.setdefault(f"{dim}={value}", {"asked_n": len(hits)})
            entry["asked" if name == "controls" else "asked_instructions_only"] = sum(hits) / len(hits)
            if name == "controls":
                base = natural[(dim, value)]
                entry |= {"baseline": sum(base) / len(base), "baseline_n": len(base)}
        total = len(results[name]["replies"])
        answers[name] = {"real_answers": 1 - len(failures) / total, "replies": total,
                         "degenerate": sum(f["why"].startswith("degenerate") for f in failures),
                         "off_topic": sum(f["why"] == "off topic" for f in failures), "failures": failures,
                         "split_words": len(split), "split_word_examples": split[:10],
                         "short_lists": len(short_lists), "short_list_examples": short_lists[:5],
                         "tokens_per_s": results[name]["tokens_per_s"]}  # fmt: skip
    ratio = answers["controls"]["tokens_per_s"] / answers["instructions"]["tokens_per_s"]
    shown = min(v["asked"] for v in values.values())
    goals = {"every value shows when asked (>= 90 %)": shown >= GOALS["shows_when_asked"],
             "real answers (>= 97 %)": answers["controls"]["real_answers"] >= GOALS["real_answers"],
             "no split words": answers["controls"]["split_words"] == 0,
             f"every list has at least {MIN_ITEMS} items": answers["controls"]["short_lists"] == 0,
             "controls cost at most 10 % of tokens/s": ratio >= GOALS["tokens_per_s_ratio"]}  # fmt: skip
    return {"values": values, "answers": answers, "tokens_per_s_ratio": ratio, "lowest_shown": shown,
            "overall_match": sum(v["asked"] for v in values.values()) / len(values), "goals": goals}  # fmt: skip


def print_tables(data: dict[str, Any]) -> None:
    print(f"style adherence of {data['model']}, {data['prompts']} prompts, up to {data['max_new_tokens']} new tokens")
    rows = [[key.split("=")[0], key.split("=")[1], f"{v['asked']:.0%} of {v['asked_n']}",
             f"{v['asked_instructions_only']:.0%}", f"{v['baseline']:.0%} of {v['baseline_n']}"]
            for key, v in data["values"].items()]  # fmt: skip
    print(report.table(["dimension", "value", "shows when asked", "instructions only", "shows unasked"], rows))
    rows = [[name, f"{a['real_answers']:.1%} of {a['replies']}", a["degenerate"], a["off_topic"], a["split_words"],
             a["short_lists"], f"{a['tokens_per_s']:.1f}"] for name, a in data["answers"].items()]  # fmt: skip
    print(report.table(["pass", "real answers", "degenerate", "off topic", "split words",
                        f"lists < {MIN_ITEMS} items", "tokens/s"], rows))  # fmt: skip
    print(f"tokens/s with controls / instructions only: {data['tokens_per_s_ratio']:.2f}")
    for goal, met in data["goals"].items():
        print(f"goal: {goal}: {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: [llm] max_new_tokens (160)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache-dir", default="data/models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    data = asyncio.run(run(args))
    print_tables(data)
    data["params"] = vars(args) | {"json": str(args.json) if args.json else None}
    path = report.save("style_adherence", data)
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
