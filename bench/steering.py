"""What steering adds to each reply's latency: the local backend, plain against steered.

N users (1 and 8 by default) each send one everyday message at once; every reply is
generated through the batching engine as the bot serves it (the bot's sampling
settings, the style control, ``[steering]``'s candidates per sentence and top-k, the
engine's rows sized as ``create_backend`` sizes them). Each user's reward model is a real
``RewardModel`` fitted on the replies of a few rated users who liked numbers; what it
likes changes which sentence is kept, not how long a step takes.

Per number of users: the reply time p50 and p95 (from the moment all sent), the time to
the first text, and the ratio steered / plain, in the same run.

    python -m bench.steering [--users 1,8] [--tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python bench/steering.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.config import AgentSettings
from agent_core.llm import GenerationRequest, Steering, create_backend
from agent_core.llm.local import LocalBackend
from agent_core.reward_model import RewardModel
from agent_core.style import Style
from attune.wiring import load_config
from bench import report

PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
STYLE = Style("brief", "casual", "none", "prose")


def reward_model(texts: list[str]) -> RewardModel:
    """A reward model fitted as the bot fits one: here, on replies where a number is liked."""
    rewards = [1.0 if re.search(r"\d", t) else -1.0 for t in texts]
    return RewardModel.fit_population(texts, rewards)


async def serve(backend: LocalBackend, batch: list[GenerationRequest]) -> dict[str, Any]:
    started = time.perf_counter()

    async def one(request: GenerationRequest) -> tuple[float, float, str]:
        first, pieces = None, []
        async for piece in backend.stream(request):
            first = first or time.perf_counter() - started
            pieces.append(piece)
        end = time.perf_counter() - started
        return first or end, end, "".join(pieces)

    done = await asyncio.gather(*(one(r) for r in batch))
    firsts, lasts = sorted(t[0] for t in done), sorted(t[1] for t in done)
    return {"reply_p50_s": lasts[len(lasts) // 2], "reply_p95_s": lasts[min(len(lasts) - 1, int(0.95 * len(lasts)))],
            "first_text_p50_s": firsts[len(firsts) // 2], "replies": [t[2] for t in done]}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    environ = {"ATTUNE_LLM__LOCAL__CACHE_DIR": str(Path(args.cache_dir).resolve()),
               "ATTUNE_LLM__LOCAL__MODEL": args.model, "ATTUNE_STEERING__ENABLED": "true",
               "ATTUNE_LLM__LOCAL__MAX_BATCH_SIZE": str(max(args.users))}  # fmt: skip
    config = load_config(None, environ=environ)
    settings = config.settings
    backend = create_backend(config)
    assert isinstance(backend, LocalBackend), "the benchmark measures the local backend"
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    system = AgentSettings().system_prompt
    steer = settings.steering

    def batch(users: int, offset: int, scorer: RewardModel | None) -> list[GenerationRequest]:
        steering = None
        if scorer is not None:
            steering = Steering(scorer, candidates=steer.candidates, top_k=steer.top_k, temperature=steer.temperature)
        asked = [prompts[(offset + i) % len(prompts)] for i in range(users)]
        messages = [[{"role": "system", "content": f"{system}\n{STYLE.instructions()}"},
                     {"role": "user", "content": prompt}] for prompt in asked]  # fmt: skip
        return [GenerationRequest(messages=m, max_new_tokens=args.tokens, temperature=settings.llm.temperature,  # type: ignore[arg-type]
                                  top_p=settings.llm.top_p, seed=offset + i, style=STYLE, steering=steering)
                for i, m in enumerate(messages)]  # fmt: skip

    await backend.start()
    rows: dict[str, Any] = {}
    try:
        warm = await serve(backend, batch(max(args.users), 100, None))  # the engine warm, and texts to fit on
        scorer = reward_model([*warm["replies"], "It takes 20 minutes.", "Try 3 times a day.", "Just relax."])
        for users in args.users:
            plain = await serve(backend, batch(users, 0, None))
            steered = await serve(backend, batch(users, 0, scorer))
            rows[str(users)] = {
                "plain": {k: v for k, v in plain.items() if k != "replies"},
                "steered": {k: v for k, v in steered.items() if k != "replies"},
                "added_s_p50": steered["reply_p50_s"] - plain["reply_p50_s"],
                "ratio_p50": steered["reply_p50_s"] / plain["reply_p50_s"],
            }
            print(f"  {users} users: plain {plain['reply_p50_s']:.1f} s, steered {steered['reply_p50_s']:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        described = backend.describe()
    finally:
        await backend.close()
    return {"by_users": rows, "model": described, "candidates": steer.candidates, "top_k": steer.top_k,
            "tokens": args.tokens}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="1,8", help="numbers of concurrent users, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (at most)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache-dir", default="data/models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.users = [int(n) for n in args.users.split(",")]
    data = asyncio.run(run(args))
    print(f"steering latency on {data['model']}: {data['candidates']} candidates per sentence, top-k "
          f"{data['top_k']}, up to {data['tokens']} new tokens, style {STYLE.as_dict()}")  # fmt: skip
    table = [[users, f"{r['plain']['reply_p50_s']:.2f}", f"{r['steered']['reply_p50_s']:.2f}",
              f"{r['plain']['reply_p95_s']:.2f}", f"{r['steered']['reply_p95_s']:.2f}",
              f"{r['steered']['first_text_p50_s']:.2f}", f"{r['added_s_p50']:+.2f}", f"{r['ratio_p50']:.2f}"]
             for users, r in data["by_users"].items()]  # fmt: skip
    print(report.table(["users", "plain p50 s", "steered p50 s", "plain p95 s", "steered p95 s",
                        "steered first text s", "added p50 s", "steered / plain"], table))  # fmt: skip
    data["params"] = {**vars(args), "json": str(args.json) if args.json else None}
    path = report.save("steering", data)
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
