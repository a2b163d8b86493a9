"""Steering through the real Agent and storage: a user's reactions fit their reward model
at once, every process serving them reads it from the database, they can turn it off, see
it in words, export it, reset it and delete it (the recording backend, so replies are known
texts; the decoding itself is tests/test_steering.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Command, Message, Reaction
from agent_core.llm import GenerationRequest
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from storage.crypto import Key
from storage.training import TrainingRecords

LIKED = "Here is one, for example the red kind. Want another one?"
DISLIKED = "Sure. That is all I know about it and all there is."
STEERING = "[steering]\nenabled = true\nrefit_every = 1000\n"

pytestmark = pytest.mark.timeout(120)


class SteeredBackend(RecordingBackend):
    """A backend that follows steering (as the local one does), recording what it was handed."""

    @property
    def steers(self) -> bool:
        return True


def reply_for(request: GenerationRequest) -> str:
    return LIKED if "one" in request.messages[-1]["content"] else DISLIKED


async def open_steered(config: Config) -> tuple[Agent, SteeredBackend]:
    backend = SteeredBackend(reply_for)
    agent = await open_agent(config, llm=backend)
    await backend.start()
    return agent, backend


async def ask(agent: Agent, who: str, text: str, n: int) -> str:
    msg = Message(platform="web", chat_id=who, sender_id=who, sender_name=who, text=text, message_id=f"{who}-m{n}")
    reply = await agent.handle_message(msg)
    assert reply is not None
    await agent.delivered(reply, f"{who}-r{n}")
    return f"{who}-r{n}"


async def rate(agent: Agent, who: str, count: int, start: int = 0) -> None:
    """``count`` exchanges: the replies with an example and a closing question get 👍, the
    ones opening with "Sure" 👎."""
    for i in range(start, start + count):
        liked = i % 2 == 0
        sent = await ask(agent, who, f"tell me one thing {i}" if liked else f"what about this {i}", i)
        emoji = "👍" if liked else "👎"
        reaction = Reaction(platform="web", chat_id=who, sender_id=who, message_id=sent, emoji=emoji)
        assert (await agent.handle_reaction(reaction)).trains


async def command(agent: Agent, who: str, name: str, args: str = "") -> str:
    result = await agent.handle_command(Command(platform="web", chat_id=who, sender_id=who, name=name, args=args))
    assert result is not None
    return result.text


async def test_reactions_steer_the_next_reply_in_another_process_and_stats_names_them(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(STEERING)
    first, _ = await open_steered(config)
    second, backend = await open_steered(config)  # another process serving the same users
    try:
        await ask(second, "ann", "hello", 100)
        assert backend.requests[-1].steering is None  # nothing learned yet: the reply is not steered
        await rate(first, "ann", 12)
        await ask(second, "ann", "hello again", 101)
        steering = backend.requests[-1].steering
        assert steering is not None and steering.candidates == 4
        liked, disliked = steering.scorer.score_partial([LIKED, DISLIKED], [True, True])
        assert liked > disliked + 0.2, (liked, disliked)  # the weights fitted in the first process

        stats = await command(second, "ann", "stats")
        assert "From your 12 rated replies, you tend to like replies" in stats, stats
        quoted = re.findall(r"'([^']+)'", stats.split("you dislike")[0].split("you tend to like")[1])
        assert quoted and all(q.lower() in LIKED.lower() for q in quoted), quoted
        disliked_quoted = re.findall(r"'([^']+)'", stats.split("you dislike")[1].split("\n")[0])
        assert disliked_quoted and all(q.lower() in DISLIKED.lower() for q in disliked_quoted), disliked_quoted

        ann = await second.store.resolve_user("web", "ann", "ann")
        await TrainingRecords(second.store.db).add_adapter(ann, 1, "/nowhere", promote=True, parent="base", metrics={})
        for i in range(3):  # replies since the adapter: each one with the liked phrases
            await ask(second, "ann", f"tell me one more thing {i}", 200 + i)
        stats = await command(second, "ann", "stats")
        change = next(line for line in stats.splitlines() if line.startswith("Your replies since your adapter of"))
        assert quoted[0].lower() in change.lower() and "→ 100%" in change, change
        learned = (await second.operations.overview())["learned"][str(ann)]  # the dashboard shows the same
        assert learned["terms"] in stats and learned["changes"] == change

        assert "off" in await command(second, "ann", "prefs", "steering off")
        await ask(second, "ann", "one more", 102)
        assert backend.requests[-1].steering is None  # turned off for ann alone
        await ask(second, "bob", "hi", 103)
        await command(second, "ann", "prefs", "steering on")
        await ask(second, "ann", "and one more", 104)
        assert backend.requests[-1].steering is not None
    finally:
        await first.close()
        await second.close()


async def test_export_reset_learning_and_forget_all_cover_the_reward_model(make_config: Callable[..., Config]) -> None:
    config = make_config(STEERING, environ={"ATTUNE_ENCRYPTION_KEY": Key.generate()})
    agent, backend = await open_steered(config)
    try:
        await rate(agent, "ann", 10)
        ann = await agent.store.resolve_user("web", "ann", "ann")
        sealed = await agent.store.db.fetchone("SELECT terms FROM reward_models WHERE user_id = ?", (ann,))
        assert sealed is not None and "example" not in str(sealed[0])  # the n-grams are the user's text: encrypted

        export = await agent.handle_command(Command(platform="web", chat_id="ann", sender_id="ann", name="export"))
        assert export is not None and export.attachment is not None
        exported = json.loads(export.attachment.content)
        model = exported["reward_model"]
        assert model["rated"] == 10 and model["weights"] and any(t["weight"] < 0 for t in model["terms"])

        records = TrainingRecords(agent.store.db)
        await records.add_adapter(ann, 1, "/nowhere/user-1-v1", promote=True, parent="base", metrics={})
        reset = await command(agent, "ann", "prefs", "reset learning")
        assert "your own adapter no longer answers you" in reset
        assert await records.active(ann) is None
        assert "nothing learned from your reactions yet" in await command(agent, "ann", "stats")
        await ask(agent, "ann", "tell me one thing", 50)
        assert backend.requests[-1].steering is None  # its reactions before the reset teach it no more

        await rate(agent, "ann", 2, start=60)  # new reactions teach it again
        assert (await agent.store.reward_model(ann)).rated == 2  # type: ignore[union-attr]
        await command(agent, "ann", "forget", "all")
        await command(agent, "ann", "forget", "all confirm")
        gone = await agent.store.db.fetchone("SELECT COUNT(*) FROM reward_models WHERE user_id = ?", (ann,))
        assert gone is not None and gone[0] == 0
    finally:
        await agent.close()
