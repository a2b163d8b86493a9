"""A backend for tests and benchmarks: answers at once, records what it was asked.

Like errbot's test backend, it lets adapter and command authors drive a real
:class:`~agent_core.agent.Agent` (real storage, memory, prompts) with no model at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from agent_core.llm.base import GenerationRequest, LLMBackend, LLMError
from agent_core.style import Style


def styled_reply(request: GenerationRequest, text: str | None = None) -> str:
    """A reply to ``request`` that has the style it asks for (as ``measure_style`` reads
    it): the echo of the last message (or ``text``), shaped as a perfectly steered model
    would shape it. For tests of what the policy learns from the text."""
    style = request.style or Style("brief", "formal", "none", "prose")
    said = text or f"echo: {request.messages[-1]['content']}"
    sentences = [said.rstrip(".!?") + ".", "That is the point."]
    if style.length == "detailed":
        sentences += [f"Here is more on it, in part {i}, with words that make this reply a longer one." for i in
                      range(1, 6)]  # fmt: skip
    if style.tone == "casual":
        sentences[0] = sentences[0][:-1] + "! It's simple."
    else:
        sentences[1] = "Furthermore, that is the point."
    if style.emoji == "some":
        sentences[0] += " 🙂"
    if style.format == "bullets":
        return "\n".join(f"- {s}" for s in sentences)
    return " ".join(sentences)


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
        continues: bool = False,
    ) -> None:
        self.reply = reply or (lambda r: f"echo: {r.messages[-1]['content']}")
        self.context_window = context_window
        self.delay_s = delay_s
        self.piece_delay_s = piece_delay_s  # pause between words, like a model writing
        self.fail = fail
        self.record = record  # off for long benchmarks: every prompt kept adds up
        self._continues = continues  # write on from GenerationRequest.reply_start, as the local backend does
        self.requests: list[GenerationRequest] = []

    async def start(self) -> None:
        self.requests.clear()

    async def close(self) -> None:
        self.requests.clear()

    def describe(self) -> str:
        return "recording test backend"

    @property
    def continues(self) -> bool:
        return self._continues

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
            yield word if i == 0 and not request.reply_start else " " + word  # writing on from reply_start
