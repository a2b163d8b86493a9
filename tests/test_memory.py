"""Memory that helps: facts kept without asking, corrections, recall by relevance (keywords
and meaning), acknowledgements, plain-language commands, groups, deletion and encryption.

Through a real Agent on the configured storage (SQLite, and PostgreSQL in its pass), with
the recording backend; recall by meaning with the real all-MiniLM-L6-v2 (loaded once).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Command, Message, Reply
from agent_core.llm import GenerationRequest
from agent_core.memory.embedder import Embedder, EmbedderUnavailable, model_dir, verify
from agent_core.memory.facts import explicit_note, extract_facts, holds_secret, second_person, third_person
from agent_core.memory.keeper import SECRET, TOLD
from agent_core.memory.model_facts import parse
from agent_core.memory.questions import asks_to_forget_that, asks_to_list, direct_question
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from storage.crypto import Key
from tests.conftest import STORAGE, query

# --- the rules, no database ------------------------------------------------------------------


@pytest.mark.no_database
@pytest.mark.parametrize(
    ("said", "kept"),
    [
        ("I live in Lisbon and I work as a nurse on night shifts",
         [("home", "They live in Lisbon."), ("work", "They work as a nurse on night shifts.")]),
        ("I am vegetarian and I hate mushrooms", [("diet", "They are vegetarian."),
                                                  ("taste:mushrooms", "They hate mushrooms.")]),
        ("Big news: I moved to Porto last month.", [("home", "They live in Porto now.")]),
        ("Careful, I'm allergic to peanuts, so no satay", [("allergy:peanuts", "They are allergic to peanuts.")]),
        ("my wife's birthday is on March 3rd", [("birthday:wife", "Their wife's birthday is on March 3rd.")]),
        ("Haha, my dog Biscuit just ate my sock", [("pet:dog", "Their dog is called Biscuit.")]),
        ("You can call me Dr. Patel.", [("name", "Their name is Dr. Patel.")]),
        ("Mornings are hard since I work nights at the hospital.", [("work", "They work nights at the hospital.")]),
        ("I no longer live in Lisbon", [("home", "They no longer live in Lisbon.")]),
    ],
)  # fmt: skip
def test_statements_about_oneself_become_third_person_notes(said: str, kept: list[tuple[str, str]]) -> None:
    assert [(f.slot, f.text) for f in extract_facts(said)] == kept


@pytest.mark.no_database
@pytest.mark.parametrize(
    "said",
    ["I'm so tired today.", "I like your answer.", "I love it!", "I think I'm getting a cold.", "My boss is an idiot.",
     "My sister lives in Paris.", "Do I live in Lisbon?", "If I lived in Paris I'd walk more.", "I want a cat.",
     "I'm going to bed.", "I need help with my essay.", "My password is hunter2.", "my card is 4111 1111 1111 1111",
     "My PIN is 4821.", "I'm at the airport."],
)  # fmt: skip
def test_chatter_questions_wishes_others_and_secrets_are_not_kept(said: str) -> None:
    assert extract_facts(said) == []


@pytest.mark.no_database
def test_person_swaps_secrets_and_what_a_message_asks() -> None:
    assert third_person("I'm sure my cat likes me") == "They are sure their cat likes them."
    assert second_person("They are vegetarian and their cat is called Tom.") == (
        "you are vegetarian and your cat is called Tom."
    )
    assert holds_secret("my password is swordfish") and holds_secret("mail me at ann@example.com")
    assert not holds_secret("I have two kids")
    assert [f.retracts for f in extract_facts("I'm not vegetarian anymore")] == [True]
    said = "Please remember: I'm vegan. What can I eat tonight?"
    assert explicit_note(said) == ("I'm vegan", "What can I eat tonight?")
    assert asks_to_list("What do you know about me?") and asks_to_list("what do you remember about me")
    assert asks_to_forget_that("forget that") and asks_to_forget_that("Please delete that.")
    assert not asks_to_forget_that("forget that movie we talked about, what else is good?")
    assert direct_question("What is my cat called?").slots == ("pet:cat",)  # type: ignore[union-attr]
    assert direct_question("When is my wife's birthday?").slots == ("birthday:wife",)  # type: ignore[union-attr]
    assert direct_question("What should I cook?") is None


@pytest.mark.no_database
def test_a_models_facts_are_read_from_its_json_and_checked() -> None:
    answer = ('Sure! {"facts": [{"kind": "home", "about": "", "fact": "They live in Oslo."}, {"kind": "pet", '
              '"about": "cat", "fact": "Their cat is called Tom."}, {"kind": "password", "about": "", "fact": "x"}, '
              '{"kind": "allergy", "about": "nuts", "fact": "Their PIN is 1234."}, {"kind": "home", "about": "", '
              '"fact": "They live in Lisbon.", "no_longer": true}]}')  # fmt: skip
    facts = parse(answer)
    assert [(f.slot, f.text, f.retracts) for f in facts] == [
        ("home", "They live in Oslo.", False), ("pet:cat", "Their cat is called Tom.", False),
        ("home", "They live in Lisbon.", True)]  # fmt: skip
    assert parse("no JSON here") == [] and parse('{"facts": "nope"}') == []


@pytest.mark.no_database
def test_the_embedding_model_is_refused_unless_its_files_are_the_published_ones(tmp_path: Path) -> None:
    verify(model_dir())  # the installed wheel's files are sentence-transformers' own
    copy = tmp_path / "model"
    shutil.copytree(model_dir(), copy)
    with (copy / "vocab.txt").open("a", encoding="utf-8") as vocab:
        vocab.write("tampered\n")
    with pytest.raises(EmbedderUnavailable, match=r"vocab\.txt is not the published"):
        verify(copy)


# --- through the Agent ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def minilm() -> Iterator[Embedder]:
    """all-MiniLM-L6-v2, loaded once for the tests that recall by meaning."""
    embedder = Embedder()
    embedder.load()
    assert embedder.ready, embedder.failed
    yield embedder


async def by_meaning(agent: Agent, embedder: Embedder) -> Agent:
    agent.memory.embedder = embedder
    await agent.memory.start()  # type: ignore[misc]
    assert agent.memory.by_meaning
    return agent


def msg(text: str, user: str = "ann", chat: str = "dm-ann", kind: str = "private") -> Message:
    return Message(platform="test", chat_id=chat, sender_id=user, sender_name=user.title(), text=text,
                   chat_kind=kind)  # type: ignore[arg-type]  # fmt: skip


async def say(agent: Agent, text: str, **kw: str) -> Reply:
    reply = await agent.handle_message(msg(text, **kw))
    assert reply is not None
    return reply


def requests(agent: Agent) -> list[GenerationRequest]:
    assert isinstance(agent.llm, RecordingBackend)
    return agent.llm.requests


def notes_in_prompt(agent: Agent) -> str:
    system = requests(agent)[-1].messages[0]["content"]
    return system.split("What you know about this user:")[1] if "What you know about this user:" in system else ""


async def notes(agent: Agent, user: str = "ann") -> list[tuple[str, str]]:
    user_id = await agent.store.resolve_user("test", user)
    return [(n.source, n.text) for n in await agent.store.list_memories(user_id)]


async def test_facts_are_kept_without_asking_and_the_user_is_told_once(agent: Agent) -> None:
    first = await say(agent, "I live in Lisbon and I work as a nurse on night shifts")
    assert first.text.startswith("echo: I live in Lisbon")  # the model still answers the message
    assert "I'll remember that you live in Lisbon" in first.text and "what do you know about me?" in first.text
    assert await notes(agent) == [("auto", "They work as a nurse on night shifts."), ("auto", "They live in Lisbon.")]
    second = await say(agent, "My cat is called Zorblax.")
    assert "remember" not in second.text  # told once
    assert (await agent.store.preferences(1)).get(TOLD) == "1"
    asked = await say(agent, "What do you know about me?")
    assert requests(agent)[-1].messages[-1]["content"] == "My cat is called Zorblax."  # no model for this one
    assert "#3: Your cat is called Zorblax.  (kept automatically)" in asked.text
    assert "You live in Lisbon.  (kept automatically)" in asked.text
    listed = await agent.handle_command(Command(platform="test", chat_id="dm-ann", sender_id="ann", name="forget"))
    assert listed is not None and "(kept automatically)" in listed.text


async def test_a_correction_replaces_the_note_and_says_so_when_the_user_wrote_it(agent: Agent) -> None:
    noted = await say(agent, "remember that I live in Lisbon")
    assert noted.text == "Noted: you live in Lisbon." and requests(agent) == []  # acknowledged, no model reply
    updated = await say(agent, "Big news: I moved to Porto last month.")
    assert updated.text.startswith("Updated: you live in Porto now.")
    assert await notes(agent) == [("auto", "They live in Porto now.")]
    rows = await agent.store.db.fetchall("SELECT text FROM memories")
    assert len(rows) == 1  # deleted, not hidden
    await say(agent, "I no longer live in Porto")
    assert await notes(agent) == []
    where = await say(agent, "Where do I live?")
    assert where.text.startswith("echo:")  # no note answers it now: the model does


async def test_remember_that_is_acknowledged_and_a_question_with_it_answered(agent: Agent) -> None:
    both = await say(agent, "Remember that I'm allergic to peanuts. Can you suggest a snack?")
    assert both.text == "Noted: you are allergic to peanuts.\n\necho: Can you suggest a snack?"
    prompt = requests(agent)[-1].messages
    assert prompt[-1]["content"] == "Can you suggest a snack?"  # the model answers the question...
    assert "They are allergic to peanuts." in prompt[0]["content"]  # ...knowing the note
    secret = await say(agent, "remember that my PIN is 4821")
    assert secret.text == SECRET and (await notes(agent)) == [("user", "They are allergic to peanuts.")]
    answer = await say(agent, "What am I allergic to?")
    assert answer.text == "You are allergic to peanuts." and len(requests(agent)) == 1  # from the note itself
    forgotten = await say(agent, "forget that")
    assert forgotten.text == "Forgotten: you are allergic to peanuts."
    assert await notes(agent) == []
    nothing = await say(agent, "forget that")
    assert "haven't kept anything" in nothing.text


async def test_a_note_reaches_the_prompt_only_when_relevant(agent: Agent, minilm: Embedder) -> None:
    await by_meaning(agent, minilm)
    await say(agent, "/remember I am vegetarian and I hate mushrooms")
    await say(agent, "My cat is called Zorblax.")
    await say(agent, "How do I fix a flat bike tire?")
    assert notes_in_prompt(agent) == ""  # nothing is relevant: nothing reaches the prompt
    await say(agent, "What should I cook for dinner tonight?")
    assert "They are vegetarian." in notes_in_prompt(agent)  # by meaning: "cook" shares no word with it
    assert "Zorblax" not in notes_in_prompt(agent)
    await say(agent, "Any ideas for a toy for my cat?")
    assert "Zorblax" in notes_in_prompt(agent) and "vegetarian" not in notes_in_prompt(agent)
    vectors = await agent.store.db.fetchall("SELECT embedding FROM memories")
    assert len(vectors) == 3 and all(v[0] for v in vectors)  # each note stored with its vector


async def test_a_reply_to_a_request_starts_from_the_note_that_surely_matters(
    make_config: Callable[..., Config], minilm: Embedder
) -> None:
    agent = await open_agent(make_config(), llm=RecordingBackend(continues=True))
    await agent.llm.start()
    try:
        await by_meaning(agent, minilm)
        await say(agent, "I'm vegetarian.")
        reply = await say(agent, "What should I cook for dinner tonight?")
        assert requests(agent)[-1].reply_start == "Since you are vegetarian,"  # the model writes on from it
        assert reply.text.startswith("Since you are vegetarian, echo: What should I cook")
        await say(agent, "How do I fix a flat bike tire?")
        assert requests(agent)[-1].reply_start == ""  # nothing relevant: the model starts the reply
        await say(agent, "Am I vegetarian?")  # a direct question: answered from the note, no model
        assert requests(agent)[-1].messages[-1]["content"] == "How do I fix a flat bike tire?"
    finally:
        await agent.close()


async def test_keyword_recall_serves_until_the_embedding_model_is_in(agent: Agent) -> None:
    assert not agent.memory.by_meaning  # not started
    await say(agent, "remember that my cat is called Zorblax")
    await say(agent, "Tell me a story about my cat")
    assert "Their cat is called Zorblax." in notes_in_prompt(agent)
    await say(agent, "What should I cook tonight?")
    assert notes_in_prompt(agent) == ""  # the newest note no longer goes into every prompt


async def test_the_embedding_model_loads_after_the_chat_model(make_config: Callable[..., Config]) -> None:
    """Not beside it: two transformers models loading at once in two threads left the chat
    model's weights wrong (its replies were noise)."""
    gate = asyncio.Event()

    class SlowToLoad(RecordingBackend):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    agent = await open_agent(make_config(), llm=SlowToLoad())
    try:
        loading = agent.load_model()
        await asyncio.sleep(0.1)
        assert agent.memory.embedder is not None and agent.memory.embedder.loading is None
        gate.set()
        await loading
        await asyncio.sleep(0)  # the done callback
        assert agent.memory.embedder.loading is not None  # now it loads, in the background
    finally:
        await agent.close()
    assert agent.memory.by_meaning  # close waited for it


async def test_automatic_memory_can_be_turned_off(make_config: Callable[..., Config]) -> None:
    agent = await open_agent(make_config("[memory]\nautomatic = false\n"), llm=RecordingBackend())
    await agent.llm.start()
    try:
        await say(agent, "I live in Lisbon")
        assert await notes(agent) == []
        assert (await say(agent, "remember that I live in Lisbon")).text == "Noted: you live in Lisbon."
    finally:
        await agent.close()


async def test_in_a_group_a_members_notes_are_theirs_and_stay_out_of_group_replies(agent: Agent) -> None:
    group = {"chat": "team", "kind": "group"}
    await say(agent, "I'm allergic to shellfish", **group)
    await say(agent, "I love shellfish", user="bob", **group)
    assert await notes(agent, "ann") == [("auto", "They are allergic to shellfish.")]
    assert await notes(agent, "bob") == [("auto", "They love shellfish.")]
    await say(agent, "Is shellfish a good idea for the team dinner?", user="bob", **group)
    assert "allergic" not in json.dumps(requests(agent)[-1].messages)  # not Ann's note in Bob's prompt
    await say(agent, "Should we order shellfish?", **group)
    assert notes_in_prompt(agent) == ""  # nor hers in her own group reply, by default
    told = await say(agent, "What do you know about me?", **group)
    assert told.private  # her notes go to her privately
    await say(agent, "Is shellfish ok for me?")
    assert "allergic to shellfish" in notes_in_prompt(agent)  # in her private chat they help


@pytest.mark.sqlite_only
async def test_forget_all_leaves_no_byte_of_a_note_or_its_vector(
    agent: Agent, minilm: Embedder, tmp_path: Path
) -> None:
    await by_meaning(agent, minilm)
    await say(agent, "I live in Quokkaville")
    stored = await agent.store.db.fetchone("SELECT embedding FROM memories")
    assert stored is not None and len(stored[0]) > 500  # the vector, as text
    vector = stored[0][:60].encode()
    hold = [p.name for p in (tmp_path / "data").rglob("*") if p.is_file() and vector in p.read_bytes()]
    assert hold  # the check can fail: the vector is in the files now
    await agent.handle_command(Command(platform="test", chat_id="dm-ann", sender_id="ann", name="forget", args="all"))
    await agent.handle_command(Command(platform="test", chat_id="dm-ann", sender_id="ann", name="forget",
                                       args="all confirm"))  # fmt: skip
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert vector not in raw and b"quokkaville" not in raw.lower(), path.name


async def test_encrypted_notes_hold_no_plaintext_of_the_note_or_its_vector(
    make_config: Callable[..., Config], minilm: Embedder, tmp_path: Path
) -> None:
    agent = await open_agent(make_config(environ={"ATTUNE_ENCRYPTION_KEY": Key.generate()}), llm=RecordingBackend())
    await agent.llm.start()
    try:
        await by_meaning(agent, minilm)
        await say(agent, "I live in Quokkaville")
        await say(agent, "remember that my cat is called Marzipan")
        vector = minilm.embed(["They live in Quokkaville."])[0]
        kept = await agent.store.note_candidates(1, "What's the weather like around here?")
        assert {n.slot for n in kept} == {"home", "pet:cat"} and all(n.embedding for n in kept)
    finally:
        await agent.close()
    if STORAGE == "sqlite":
        files = b"".join(p.read_bytes().lower() for p in (tmp_path / "data").rglob("*") if p.is_file())
        assert b"quokkaville" not in files and b"marzipan" not in files and b"pet:cat" not in files
        assert vector.astype("float16").tobytes()[:32] not in files
    else:
        rows = query(tmp_path, "SELECT text, slot, slot_key, embedding FROM memories")
        flat = " ".join(str(v) for row in rows for v in row).lower()
        assert "quokkaville" not in flat and "marzipan" not in flat and "pet:cat" not in flat


@pytest.fixture
async def model_facts_agent(make_config: Callable[..., Config]) -> AsyncIterator[Agent]:
    def reply(request: GenerationRequest) -> str:
        if "You keep notes about the user" in request.messages[0]["content"]:
            return '{"facts": [{"kind": "home", "about": "", "fact": "They live in Reykjavik."}]}'
        return "echo: " + request.messages[-1]["content"]

    agent = await open_agent(make_config('[memory]\nextract = "model"\n'), llm=RecordingBackend(reply))
    await agent.llm.start()
    yield agent
    await agent.close()


async def test_a_capable_model_can_extract_the_facts_instead(model_facts_agent: Agent) -> None:
    await say(model_facts_agent, "Greetings from the land of fire and ice, where I have my home.")
    assert await notes(model_facts_agent) == [("auto", "They live in Reykjavik.")]
