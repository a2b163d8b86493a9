"""A backend for tests and benchmarks: answers at once, records what it was asked.

Like errbot's test backend, it lets adapter and command authors drive a real
:class:`~agent_core.agent.Agent` (real storage, memory, prompts) with no model at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from agent_core.llm.base import GenerationRequest, LLMBackend, LLMError


class RecordingBackend(LLMBackend):
    """Replies ``reply(request)`` (by default an echo of the last user message)."""

    def __init__(
        self,
        reply: Callable[[GenerationRequest], str] | None = None,
        *,
        context_window: int = 2048,
        delay_s: float = 0.0,
        piece_delay_s: float = 0.0,
        fail: bool = False,
        record: bool = True,
    ) -> None:
        self.reply = reply or (lambda r: f"echo: {r.messages[-1]['content']}")
        self.context_window = context_window
        self.delay_s = delay_s
        self.piece_delay_s = piece_delay_s  # pause between words, like a model writing
        self.fail = fail
        self.record = record  # off for long benchmarks: every prompt kept adds up
        self.requests: list[GenerationRequest] = []

    async def start(self) -> None:
        self.requests.clear()

    async def close(self) -> None:
        self.requests.clear()

    def describe(self) -> str:
        return "recording test backend"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self.record:
            self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise LLMError("the recording backend was told to fail")
        for i, word in enumerate(self.reply(request).split(" ")):
            if i and self.piece_delay_s:
                await asyncio.sleep(self.piece_delay_s)
            yield word if i == 0 else " " + word
