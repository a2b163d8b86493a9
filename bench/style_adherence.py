"""How often the local model's reply has the style the prompt asked for.

For each everyday prompt (bench/data/everyday_prompts.txt), the local model answers
three times: twice with a style, as the bot asks for it (instructions in the prompt, and
for a brief reply its token budget and the cut at the last full sentence: two opposite
styles, so every value of every dimension is asked for equally often) and once with
nothing. ``measure_style`` reads each reply; per dimension and value, the table gives
how often a reply that was asked for that value has it, beside how often a reply has
it when nothing was asked (the baseline).

    python -m bench.style_adherence [--prompts 16] [--max-new-tokens 160]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/style_adherence.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.bandit import ALL_STYLES
from agent_core.llm import GenerationRequest
from agent_core.llm.local import LocalBackend
from agent_core.style import DIMENSIONS, Style, finish, measure_style, token_budget
from bench import report

PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
SYSTEM = "You are attune, a friendly and helpful assistant."


def opposite(style: Style) -> Style:
    return Style.from_dict({d: DIMENSIONS[d][1 - DIMENSIONS[d].index(v)] for d, v in style.as_dict().items()})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache-dir", default="data/models")
    args = parser.parse_args()

    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()][: args.prompts]
    backend = LocalBackend(args.model, Path(args.cache_dir).resolve(), repetition_penalty=1.1)
    await backend.start()
    asked: dict[tuple[str, str], list[bool]] = defaultdict(list)
    natural: dict[tuple[str, str], list[bool]] = defaultdict(list)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        first = ALL_STYLES[i % len(ALL_STYLES)]
        for style in (first, opposite(first), None):
            system = SYSTEM if style is None else f"{SYSTEM}\n{style.instructions()}"
            request = GenerationRequest(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                max_new_tokens=args.max_new_tokens if style is None else token_budget(style, args.max_new_tokens),
                temperature=0.3, seed=i,
            )  # fmt: skip
            reply = await backend.generate(request)
            observed = measure_style(reply if style is None else finish(reply, style)).as_dict()
            for dim, values in DIMENSIONS.items():
                if style is None:
                    for value in values:
                        natural[(dim, value)].append(observed[dim] == value)
                else:
                    asked[(dim, getattr(style, dim))].append(observed[dim] == getattr(style, dim))
        print(f"  {i + 1}/{len(prompts)} prompts ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    await backend.close()

    rows, figures = [], {}
    for dim, values in DIMENSIONS.items():
        for value in values:
            hits, base = asked[(dim, value)], natural[(dim, value)]
            rate, base_rate = sum(hits) / len(hits), sum(base) / len(base)
            rows.append([dim, value, f"{rate:.0%} of {len(hits)}", f"{base_rate:.0%} of {len(base)}",
                         f"{rate - base_rate:+.0%}"])  # fmt: skip
            figures[f"{dim}={value}"] = {"asked": rate, "asked_n": len(hits), "baseline": base_rate,
                                         "baseline_n": len(base)}  # fmt: skip
    print(f"style adherence of {backend.describe()}, {len(prompts)} prompts, {args.max_new_tokens} new tokens")
    print(report.table(["dimension", "value", "has it when asked", "has it unasked", "lift"], rows))
    overall = sum(sum(v) for v in asked.values()) / sum(len(v) for v in asked.values())
    print(f"overall: {overall:.0%} of asked-for values are in the reply")
    path = report.save("style_adherence", {"params": vars(args), "values": figures, "overall_match": overall})
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
