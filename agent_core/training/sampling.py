"""Nightly data by sampling: the serving model answers a user's recent prompts several
times, and the user's reward model ranks the answers (RAFT / ReST style).

For each prompt, exactly as it was sent, the model in service for that user (base plus
their adapter, or the population's) samples ``n`` candidates through the batching
engine, each with its own temperature and style request (the first keeps the style the
bot asked for with the prompt, which its reply was decoded to have; the others vary it),
finished as the bot finishes a reply. The reward
model scores them; the best is a reply to learn from, and best against worst is a
preference pair. This runs in the training process (agent_core/training/worker.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent_core.bandit import ALL_STYLES
from agent_core.llm.base import AdapterRef, ChatMessage, GenerationRequest
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from agent_core.style import Style, finish, token_budget

TEMPERATURES = (0.7, 1.0, 0.9, 1.1)  # the i-th candidate of a prompt samples at TEMPERATURES[i % 4]


@dataclass(frozen=True)
class Ranked:
    """One prompt's candidates and their reward-model scores."""

    prompt: list[ChatMessage]
    candidates: list[str]
    scores: list[float]

    @property
    def best(self) -> str:
        return self.candidates[int(np.argmax(self.scores))]

    @property
    def worst(self) -> str:
        return self.candidates[int(np.argmin(self.scores))]

    @property
    def spread(self) -> float:
        return max(self.scores) - min(self.scores)


def requests(
    prompts: Sequence[list[ChatMessage]], styles: Sequence[Style | None], n: int, *, max_new_tokens: int,
    adapter: AdapterRef | None, seed: int, vary_style: bool = True,
) -> list[GenerationRequest]:  # fmt: skip
    """``n`` requests per prompt: varied temperature and style, reproducible for a seed. The
    first of each prompt asks for the style given for it (None: only what the prompt says);
    with ``vary_style`` False, all of them do (the replies the user would see)."""
    rng = np.random.default_rng([seed, 17])
    out = []
    for p, (prompt, asked) in enumerate(zip(prompts, styles, strict=True)):
        for i in range(n):
            style = ALL_STYLES[int(rng.integers(len(ALL_STYLES)))] if i > 0 and vary_style else asked
            out.append(GenerationRequest(
                messages=prompt, max_new_tokens=token_budget(style, max_new_tokens) if style else max_new_tokens,
                temperature=TEMPERATURES[i % len(TEMPERATURES)], adapter=adapter, seed=seed * 100_003 + p * 31 + i,
                style=style,
            ))  # fmt: skip
    return out


class Sampler:
    """The serving model of the training process: the batching engine on the base model,
    with any adapter per request (the one in service, or a candidate to judge). Batches of
    16 (on 2 cores about 10 % quicker than 8 for a night's 32 samples)."""

    def __init__(self, model_dir: str, cache_dir: Path, *, threads: int, repetition_penalty: float,
                 no_repeat_ngram: int, style_control: bool = True, batch_size: int = 16,
                 rows_per_reply: int = 1) -> None:  # fmt: skip
        limits = BatchLimits(max_batch_size=batch_size, max_queue=100_000, queue_timeout_s=3600.0,
                             max_rows=batch_size * rows_per_reply)  # fmt: skip
        self.backend = LocalBackend(
            model_dir, cache_dir, threads=threads, repetition_penalty=repetition_penalty,
            no_repeat_ngram=no_repeat_ngram, style_control=style_control, batching=limits,
        )  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.backend.start())

    def generate(self, batch: Sequence[GenerationRequest]) -> list[str]:
        """Every request's reply, as the bot would send it; the engine batches them."""

        async def one(request: GenerationRequest) -> str:
            return finish(await self.backend.generate(request), request.style) or "…"

        async def every() -> list[str]:
            return list(await asyncio.gather(*(one(r) for r in batch)))

        return self._loop.run_until_complete(every())

    def close(self) -> None:
        self._loop.run_until_complete(self.backend.close())
        self._loop.close()


def rank(
    prompts: Sequence[list[ChatMessage]], texts: Sequence[str], n: int, score: Callable[[Sequence[str]], np.ndarray]
) -> list[Ranked]:
    """Group ``n`` replies per prompt (in the order of :func:`requests`) and score them."""
    scores = [float(s) for s in score(texts)] if texts else []
    return [
        Ranked(list(prompt), list(texts[p * n : (p + 1) * n]), scores[p * n : (p + 1) * n])
        for p, prompt in enumerate(prompts)
    ]
