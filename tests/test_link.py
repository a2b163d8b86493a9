"""/link: one person's accounts on two platforms become one user, by a one-time code."""

from __future__ import annotations

import json
import re
import time

from agent_core.agent import Agent
from agent_core.events import Command, Message, Reply


async def command(agent: Agent, platform: str, user: str, name: str, args: str = "") -> Reply:
    reply = await agent.handle_command(Command(platform=platform, chat_id=f"{platform}-{user}", sender_id=user,
                                               name=name, args=args))  # fmt: skip
    assert reply is not None
    return reply


async def new_code(agent: Agent, platform: str, user: str) -> str:
    reply = await command(agent, platform, user, "link")
    assert reply.private
    match = re.search(r"/link ([A-Z0-9]{4}-[A-Z0-9]{4})", reply.text)
    assert match is not None, reply.text
    return match.group(1)


async def test_linking_shares_memory_preferences_and_history(agent: Agent) -> None:
    await agent.handle_message(Message(platform="telegram", chat_id="t1", sender_id="ann-tg", text="hi from telegram"))
    await command(agent, "telegram", "ann-tg", "remember", "my cat is called Tom")
    await command(agent, "telegram", "ann-tg", "prefs", "tone formal")
    await command(agent, "discord", "ann-dc", "prefs", "tone casual")  # the target's own setting wins
    await command(agent, "discord", "ann-dc", "prefs", "length detailed")
    code = await new_code(agent, "telegram", "ann-tg")
    linked = await command(agent, "discord", "ann-dc", "link", code.lower().replace("-", " "))
    assert "Linked" in linked.text
    tg = await agent.store.resolve_user("telegram", "ann-tg")
    assert await agent.store.resolve_user("discord", "ann-dc") == tg
    assert await agent.store.preferences(tg) == {"tone": "formal", "length": "detailed"}
    answer = await agent.handle_message(Message(platform="discord", chat_id="d1", sender_id="ann-dc",
                                                text="what is my cat?"))  # fmt: skip
    assert answer is not None and answer.text == "Your cat is called Tom."  # the note came along
    exported = json.loads((await command(agent, "discord", "ann-dc", "export")).attachment.content)  # type: ignore[union-attr]
    assert {i["platform"] for i in exported["identities"]} == {"telegram", "discord"}
    assert [m["text"] for m in exported["messages"] if m["role"] == "user"] == ["hi from telegram", "what is my cat?"]
    users = await agent.store.db.fetchone("SELECT COUNT(*) FROM users")
    assert users[0] == 1  # the discord account's own user is gone


async def test_a_code_works_once_only_on_another_platform_and_not_after_expiry(agent: Agent) -> None:
    code = await new_code(agent, "telegram", "ann")
    same_platform = await command(agent, "telegram", "ann2", "link", code)
    assert "enter it on your other platform" in same_platform.text
    assert "unknown, used or expired" in (await command(agent, "discord", "ann", "link", code)).text  # used up
    code = await new_code(agent, "telegram", "ann")
    assert "Linked" in (await command(agent, "slack", "ann", "link", code)).text
    assert "unknown, used or expired" in (await command(agent, "discord", "bob", "link", code)).text
    user = await agent.store.resolve_user("telegram", "ann")
    await agent.store.add_link_code(user, "telegram", "0" * 64, time.time() - 1)
    stale = await agent.store.take_link_code("0" * 64, time.time())
    assert stale is None


async def test_only_the_account_entering_the_code_moves(agent: Agent) -> None:
    mallory_code = await new_code(agent, "telegram", "mallory")
    await command(agent, "discord", "ann", "remember", "ann's secret")
    ann = await agent.store.resolve_user("discord", "ann")
    # Mallory cannot enter her own code on Ann's behalf: only Ann's discord account could move,
    # and Ann never typed it. Entering it from Mallory's own discord account moves that one only.
    assert "Linked" in (await command(agent, "discord", "mallory-dc", "link", mallory_code)).text
    assert await agent.store.resolve_user("discord", "ann") == ann
    assert [n.text for n in await agent.store.list_memories(ann)] == ["Ann's secret."]


async def test_guessing_codes_is_limited(agent: Agent) -> None:
    for _ in range(5):
        assert "unknown, used or expired" in (await command(agent, "discord", "eve", "link", "AAAA-AAAA")).text
    code = await new_code(agent, "telegram", "ann")
    assert "Too many wrong codes" in (await command(agent, "discord", "eve", "link", code)).text
    assert "Linked" in (await command(agent, "discord", "ann", "link", code)).text  # still valid for Ann
