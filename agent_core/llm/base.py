"""The backend contract: what the agent needs from a language model, written down once.

A backend turns a chat prompt into reply text. The agent only ever calls the methods of
:class:`LLMBackend`; a new backend subclasses it and implements every abstract method.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

from agent_core.style import Style


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class LLMError(Exception):
    """The backend could not produce a reply (server down, bad answer, model failure)."""


class LLMBusy(LLMError):
    """Too many requests are waiting already: the user should try again in a moment."""


@dataclass(frozen=True)
class AdapterRef:
    """A per-user LoRA adapter to generate with: where it lies and a stable name."""

    name: str  # unique per adapter version, e.g. "user-12-v3"; the model name on vLLM
    path: str  # a peft adapter directory (adapter_config.json + weights)


class ReplyScorer(Protocol):
    """What steers a reply: the chance its user likes it, read from its text so far."""

    def score_partial(self, texts: Sequence[str], finished: Sequence[bool]) -> Sequence[float]:
        """For each text, the chance the user likes the reply it begins (``finished``: it is the whole reply)."""
        ...


@dataclass(frozen=True)
class BlockChoice:
    """One block (a sentence) of a steered reply: its candidates, their scores, the one kept.

    Token ids are the reply's own (after the prompt): ``prefix`` is what was kept before
    the block, ``candidates[i]`` the i-th candidate's tokens for it."""

    prefix: list[int]
    candidates: list[list[int]]
    texts: list[str]  # each candidate's reply text so far (prefix and block), as scored
    scores: list[float]
    ended: list[bool]  # the reply ends with this candidate
    chosen: int
    kl: float  # nats: how far keeping ``chosen`` moved the reply from the model's own sampling


@dataclass(frozen=True)
class Steering:
    """Steer a reply toward what its user likes, with lookahead (a backend that can: the
    local one, agent_core.llm.lookahead). The reply is written a block (a sentence) at a
    time: each block is sampled ``candidates`` times side by side, and ``scorer`` keeps one,
    the best (``strength`` inf) or drawn in proportion to ``exp(strength * logit(score))``
    (0: no steering). Candidates sample at ``temperature`` at least, so that they differ."""

    scorer: ReplyScorer
    candidates: int = 4
    strength: float = math.inf
    temperature: float = 0.8
    top_k: int = 50  # a candidate samples among this many most likely next tokens
    max_block: int = 48  # tokens: a block without a sentence end is cut here
    on_block: Callable[[BlockChoice], None] | None = None  # told of every choice (for training and measuring)


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[ChatMessage]
    max_new_tokens: int = 160
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    adapter: AdapterRef | None = None
    seed: int | None = None
    #: The style the reply is to have. The prompt asks for it already; a backend that can
    #: steer decoding (the local one: agent_core.llm.style_control) also makes the text have it.
    style: Style | None = None
    #: The user's reward model steers the reply (a backend that cannot steer ignores it).
    steering: Steering | None = None
    #: The reply begins with this text, already decided (memory's "Since you are vegetarian,"):
    #: a backend that :attr:`~LLMBackend.continues` writes on from it; it is not part of the
    #: streamed pieces. Others are never given one.
    reply_start: str = ""


class LLMBackend(ABC):
    """A language model the agent can ask for replies.

    Lifecycle: ``await start()`` once (load weights, open clients), then any number of
    concurrent ``stream``/``generate`` calls, then ``await close()``. Methods must not
    block the event loop: heavy work runs in a worker thread or another process. The agent
    may await ``start()`` in the background while the platforms connect
    (:meth:`agent_core.agent.Agent.load_model`); it asks for no reply before it returned.
    """

    #: Tokens the model can attend to: prompt plus reply must fit.
    context_window: int = 2048

    @abstractmethod
    async def start(self) -> None:
        """Get ready to generate (may take long the first time; report progress)."""

    @abstractmethod
    async def close(self) -> None:
        """Release threads, clients and memory."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in a prompt (exact where the backend has a tokenizer)."""

    #: Extra tokens a chat template adds around each message.
    message_overhead: int = 5

    @property
    def steers(self) -> bool:
        """Whether this backend follows ``GenerationRequest.steering`` (others ignore it)."""
        return False

    @property
    def continues(self) -> bool:
        """Whether this backend writes on from ``GenerationRequest.reply_start`` (a chat API cannot)."""
        return False

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the reply in pieces as they are generated. Raises :class:`LLMError`."""

    async def generate(self, request: GenerationRequest) -> str:
        """The whole reply at once. Raises :class:`LLMError`."""
        return "".join([piece async for piece in self.stream(request)])

    async def unreachable(self) -> str | None:
        """Why the model cannot be asked now (for ``/healthz``), or None if it can; cheap,
        no generation. A local model is reachable once loaded (the agent checks that)."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and ``/stats``: which model, where."""
