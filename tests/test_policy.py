"""The style policy: learning from reactions at once, sharing across users, drift, logging, steering."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from agent_core.agent import Agent
from agent_core.bandit import ALL_STYLES, N_FEATURES, Realisation, StyleBandit, UserStats, features
from agent_core.config import Config
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.llm import GenerationRequest
from agent_core.policy import LearningPolicy, classify
from agent_core.style import Style, measure_style
from agent_core.testing import RecordingBackend, styled_reply
from attune.wiring import load_config, open_agent
from tests.conftest import write_config


@pytest.mark.parametrize(
    ("text", "context"),
    [
        ("What is the capital of France?", "question"),
        ("how do magnets work", "question"),
        ("Write a poem about tea", "task"),
        ("please summarize this article", "task"),
        ("hi there!", "chat"),
        ("I had a long day", "chat"),
    ],
)
def test_messages_are_classified_into_contexts(text: str, context: str) -> None:
    assert classify(text) == context


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sure.", {"length": "brief", "emoji": "none", "format": "prose"}),
        ("word " * 80, {"length": "detailed"}),
        ("Great idea 🎉 let's go", {"emoji": "some", "tone": "casual"}),
        ("Options:\n- tea\n- coffee\n- water", {"format": "bullets"}),
        ("1. Boil water.\n2. Add tea.", {"format": "bullets"}),
        ("Hey, that's cool!", {"tone": "casual"}),
        ("Furthermore, we recommend the following procedure. Therefore, proceed.", {"tone": "formal"}),
    ],
)
def test_measure_style_reads_the_text(text: str, expected: dict[str, str]) -> None:
    observed = measure_style(text).as_dict()
    assert {k: observed[k] for k in expected} == expected


@pytest.fixture
async def agent(make_config: Callable[..., Config]) -> AsyncIterator[Agent]:
    """An agent whose users may write as fast as the tests do, and whose backend writes
    each reply in the style asked for (a perfectly steered model): the policy learns from
    the text, so the text must have the style."""
    backend = RecordingBackend(reply=styled_reply)
    opened = await open_agent(make_config("[limits]\nmessages_per_minute = 100000\n"), llm=backend)
    yield opened
    await opened.close()


async def _reply(agent: Agent, user: str, text: str = "tell me about tea?") -> Reply:
    reply = await agent.handle_message(Message(platform="t", chat_id=user, sender_id=user, text=text))
    assert reply is not None and reply.reply_id is not None
    await agent.delivered(reply, f"r{reply.reply_id}")
    return reply


async def _react(agent: Agent, user: str, reply: Reply, emoji: str, added: bool = True, by: str | None = None) -> bool:
    event = Reaction(platform="t", chat_id=user, sender_id=by or user, message_id=f"r{reply.reply_id}", emoji=emoji,
                     added=added)  # fmt: skip
    outcome = await agent.handle_reaction(event)
    return outcome.trains


async def _teach_brief(agent: Agent, user: str, turns: int) -> list[str]:
    """A user who likes brief replies and dislikes detailed ones; the lengths chosen."""
    lengths = []
    for _ in range(turns):
        reply = await _reply(agent, user)
        lengths.append(reply.style["length"])
        await _react(agent, user, reply, "👍" if reply.style["length"] == "brief" else "👎")
    return lengths


async def _stats(agent: Agent, user: str) -> bytes:
    assert isinstance(agent.policy, LearningPolicy)
    return (await agent.policy._stats(await agent.store.resolve_user("t", user))).to_bytes()


async def test_each_reaction_teaches_at_once_and_stats_says_so(agent: Agent) -> None:
    lengths = await _teach_brief(agent, "ann", 30)
    assert lengths[-10:].count("brief") >= 9  # learned
    stats = await agent.handle_command(Command(platform="t", chat_id="ann", sender_id="ann", name="stats"))
    assert stats is not None and "Learned from 30 of your reactions" in stats.text
    assert "length: brief (" in stats.text  # with how sure, in words and as a percentage


async def test_taking_a_reaction_back_undoes_it_and_changing_it_counts_once(agent: Agent) -> None:
    await _teach_brief(agent, "ann", 3)
    before = await _stats(agent, "ann")
    reply = await _reply(agent, "ann")
    await _react(agent, "ann", reply, "👍")
    assert await _stats(agent, "ann") != before
    await _react(agent, "ann", reply, "👍", added=False)
    assert await _stats(agent, "ann") == before  # exactly as if it had never been
    await _react(agent, "ann", reply, "👍")
    await _react(agent, "ann", reply, "👍", added=False)
    await _react(agent, "ann", reply, "👎")
    changed = await _stats(agent, "ann")
    await _react(agent, "ann", reply, "👎", added=False)
    await _react(agent, "ann", reply, "👎")
    assert await _stats(agent, "ann") == changed  # 👍 then 👎 ends as one 👎


async def test_only_the_addressee_trains_their_policy(agent: Agent) -> None:
    reply = await _reply(agent, "ann")
    before = await _stats(agent, "ann")
    assert not await _react(agent, "ann", reply, "👎", by="bob")
    assert await _stats(agent, "ann") == before
    assert (await agent.store.db.fetchone("SELECT COUNT(*) FROM reactions"))[0] == 1  # stored all the same


async def test_an_explicit_setting_always_wins(agent: Agent) -> None:
    await _teach_brief(agent, "ann", 15)
    await agent.handle_command(Command(platform="t", chat_id="ann", sender_id="ann", name="prefs",
                                       args="length detailed"))  # fmt: skip
    for _ in range(5):
        assert (await _reply(agent, "ann")).style["length"] == "detailed"


async def test_reset_learning_forgets_what_was_learned(agent: Agent) -> None:
    await _teach_brief(agent, "ann", 10)
    reset = await agent.handle_command(Command(platform="t", chat_id="ann", sender_id="ann", name="prefs",
                                               args="reset learning"))  # fmt: skip
    assert reset is not None and "forgot" in reset.text
    assert await _stats(agent, "ann") == UserStats().to_bytes()
    reply = await _reply(agent, "ann")
    await _react(agent, "ann", reply, "👍")  # only reactions after the reset count now
    user = await agent.store.resolve_user("t", "ann")
    assert (await agent.policy._stats(user)).n == 1  # type: ignore[attr-defined]


async def _fresh(make_config: Callable[..., Config], seed: int) -> Agent:
    text = f"[policy]\nseed = {seed}\n[limits]\nmessages_per_minute = 100000\n"
    return await open_agent(make_config(text), llm=RecordingBackend(reply=styled_reply))


async def test_choices_are_reproducible_for_a_seed_and_survive_a_restart(
    make_config: Callable[..., Config],
) -> None:
    first = await _fresh(make_config, 7)
    run_one = await _teach_brief(first, "ann", 12)
    state = await _stats(first, "ann")
    await first.close()
    reopened = await _fresh(make_config, 7)
    try:
        assert await _stats(reopened, "ann") == state  # a restart forgets nothing
        user = await reopened.store.resolve_user("t", "ann")
        choices = [await reopened.policy.choose(user, "hi?", {}, key=k) for k in range(3)]
        again = [await reopened.policy.choose(user, "hi?", {}, key=k) for k in range(3)]
        assert [c.style for c in choices] == [c.style for c in again]
    finally:
        await reopened.close()
    assert len(run_one) == 12


def test_a_new_user_starts_from_what_the_population_likes() -> None:
    bandit = StyleBandit()
    rng = np.random.default_rng(0)
    likes_detailed = Style("detailed", "formal", "none", "bullets")
    users = {}
    for u in range(30):  # everyone so far likes detailed, formal bullet lists
        stats = UserStats()
        for _ in range(20):
            style = ALL_STYLES[int(rng.integers(len(ALL_STYLES)))]
            score = sum(getattr(style, d) == getattr(likes_detailed, d) for d in ("length", "tone", "format"))
            stats.observe(features(style, "chat"), 1.0 if score >= 2 else -1.0, bandit.config)
        users[u] = stats
    population = bandit.population(users)
    newcomer = bandit.posterior(UserStats(), population, user=None)
    picks = [bandit.choose(newcomer, "chat", {}, np.random.default_rng(i)).style for i in range(20)]
    assert sum(p.length == "detailed" and p.format == "bullets" for p in picks) >= 18
    beliefs = bandit.beliefs(newcomer)
    assert beliefs["length"][0] == "detailed" and beliefs["length"][1] > 0.8


def test_the_average_taste_is_not_fooled_by_personalised_serving() -> None:
    """Half the users like brief replies a little more, half like detailed ones a lot more:
    on average detailed pays. Each is shown what they like 9 times in 10, so pooled, brief
    replies look better (the people shown them like them); the average of users' own
    tastes, and a newcomer's first style, must still say detailed."""
    bandit = StyleBandit()
    like = {True: {"brief": 0.7, "detailed": 0.5}, False: {"brief": 0.2, "detailed": 0.6}}
    users, pooled = {}, {"brief": [], "detailed": []}
    for u in range(40):
        brief_lover, stats = u % 2 == 0, UserStats()
        for i in range(40):
            served = "brief" if (i % 10 != 0) == brief_lover else "detailed"
            reward = 2 * like[brief_lover][served] - 1  # the expected reward: no noise to average out
            stats.observe(features(Style(served, "casual", "none", "prose"), "chat"), reward, bandit.config)
            pooled[served].append(reward)
        users[u] = stats
    assert np.mean(pooled["brief"]) > np.mean(pooled["detailed"])  # the trap is real
    mean = bandit.average_taste(list(users.values()), np.zeros(N_FEATURES))
    assert mean[1] < 0  # the length sign: +1 is brief
    newcomer = bandit.posterior(UserStats(), bandit.population(users), user=None)
    assert bandit.choose(newcomer, "chat", {}, np.random.default_rng(0)).style.length == "detailed"


def test_groups_form_from_users_with_a_few_reactions_once_there_are_enough_of_them() -> None:
    bandit = StyleBandit()
    rng = np.random.default_rng(1)

    def user(reactions: int) -> UserStats:
        stats = UserStats()
        for _ in range(reactions):
            style = ALL_STYLES[int(rng.integers(len(ALL_STYLES)))]
            stats.observe(features(style, "chat"), 1.0 if style.length == "brief" else -1.0, bandit.config)
        return stats

    few = {u: user(bandit.config.prototype_min_obs) for u in range(bandit.config.prototype_min_users - 1)}
    assert len(bandit.population(few).prototypes) == 0  # too few people to tell groups apart
    enough = {**few, 99: user(bandit.config.prototype_min_obs), 100: user(bandit.config.prototype_min_obs - 1)}
    population = bandit.population(enough)
    assert len(population.prototypes) >= 1 and sum(population.sizes) == bandit.config.prototype_min_users


def test_a_changed_taste_is_followed() -> None:
    bandit = StyleBandit()
    stats = UserStats()
    for i in range(120):
        style = ALL_STYLES[i % len(ALL_STYLES)]
        likes_brief = i < 60
        good = (style.length == "brief") == likes_brief
        stats.observe(features(style, "chat"), 1.0 if good else -1.0, bandit.config)
        if i == 59:
            assert bandit.beliefs(bandit.posterior(stats, bandit.population({})))["length"][0] == "brief"
    assert bandit.beliefs(bandit.posterior(stats, bandit.population({})))["length"][0] == "detailed"


def test_the_logged_probabilities_are_consistent() -> None:
    bandit = StyleBandit()
    posterior = bandit.posterior(UserStats(), bandit.population({}))
    decision = bandit.choose(posterior, "task", {"tone": "formal"}, np.random.default_rng(3))
    assert decision.style.tone == "formal" and 0 < decision.propensity <= 1
    for dim, probs in decision.marginals.items():
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3), dim
    assert decision.marginals["tone"] == {"casual": 0.0, "formal": 1.0}


def test_replaying_rated_replies_at_once_equals_observing_them_one_by_one() -> None:
    """learn() replays up to 500 rated replies per reaction in one pass of matrix products."""
    rng = np.random.default_rng(0)
    config = StyleBandit().config
    picks = zip(rng.integers(0, 16, 300), rng.choice(["chat", "task", "question"], 300), strict=True)
    X = np.array([features(ALL_STYLES[i], str(c)) for i, c in picks])
    y = rng.uniform(-1, 1, 300)
    one_by_one = UserStats()
    for x, reward in zip(X, y, strict=True):
        one_by_one.observe(x, float(reward), config)
    at_once = UserStats.replay(X, y, config)
    for name in ("D", "d", "Dp", "dp", "X", "y"):
        np.testing.assert_allclose(getattr(at_once, name), getattr(one_by_one, name), rtol=1e-12, atol=1e-12)
    assert at_once.n == one_by_one.n == 300
    assert UserStats.replay(np.zeros((0, X.shape[1])), np.zeros(0), config).n == 0


async def test_the_same_events_get_the_same_styles_however_they_were_stored(tmp_path: Path) -> None:
    """The policy's draws are keyed by the platform's message ids, not by row ids, which
    depend on how concurrent messages happened to be stored."""
    chosen = []
    for run, crowd in enumerate((0, 3)):
        (tmp_path / str(run)).mkdir()
        config = load_config(write_config(tmp_path / str(run), "[limits]\nmessages_per_minute = 100000\n"), environ={})
        agent = await open_agent(config, llm=RecordingBackend())
        try:
            for i in range(crowd):  # messages in another chat first: every row id shifts
                await agent.handle_message(Message(platform="t", chat_id="b", sender_id="ann", text="hi",
                                                   message_id=f"b{i}"))  # fmt: skip
            styles = []
            for i in range(12):
                reply = await agent.handle_message(Message(platform="t", chat_id="a", sender_id="ann",
                                                           text=f"question {i}?", message_id=f"a{i}"))  # fmt: skip
                assert reply is not None
                styles.append(reply.style)
                await agent.delivered(reply, f"r{i}")  # the same reactions in both runs: the policy explores
                await agent.handle_reaction(Reaction(platform="t", chat_id="a", sender_id="ann", message_id=f"r{i}",
                                                     emoji="👍" if i % 3 else "👎"))  # fmt: skip
        finally:
            await agent.close()
        chosen.append(styles)
    assert chosen[0] == chosen[1]
    assert len({json.dumps(s, sort_keys=True) for s in chosen[0]}) > 1  # the policy really drew


def _casual_half_the_time(request: GenerationRequest) -> str:
    """A model that writes casual text for every other request asking for it (formal
    text otherwise), and every other value as asked."""
    assert request.style is not None
    _casual_half_the_time.asked += request.style.tone == "casual"  # type: ignore[attr-defined]
    tone = "formal" if request.style.tone == "formal" or _casual_half_the_time.asked % 2 else "casual"  # type: ignore[attr-defined]
    shown = Style(request.style.length, tone, request.style.emoji, request.style.format)  # type: ignore[arg-type]
    return styled_reply(GenerationRequest(messages=request.messages, style=shown))


async def test_the_policy_learns_from_the_style_shown_and_asks_for_what_pays(
    make_config: Callable[..., Config],
) -> None:
    """The user likes casual text and dislikes formal text. Asking for casual gives casual
    text only half the time: the policy learns from what the user read (the replies that
    came out formal count against formal, not against asking for casual), still asks for
    casual, and says what it asked for against what was shown."""
    _casual_half_the_time.asked = 0  # type: ignore[attr-defined]
    agent = await open_agent(make_config("[limits]\nmessages_per_minute = 100000\n"),
                             llm=RecordingBackend(reply=_casual_half_the_time))  # fmt: skip
    try:
        asked = []
        for _ in range(40):
            reply = await _reply(agent, "ann")
            shown = measure_style(reply.text)
            asked.append(reply.style["tone"])
            await _react(agent, "ann", reply, "👍" if shown.tone == "casual" else "👎")
        assert asked[-10:].count("casual") >= 9, asked
        user = await agent.store.resolve_user("t", "ann")
        beliefs = await agent.policy.beliefs(user)
        assert beliefs["prefers"]["tone"]["value"] == "casual"
        stored = await agent.store.db.fetchall(
            "SELECT style, observed_style FROM messages WHERE role = 'assistant' ORDER BY id"
        )
        assert len(stored) == 40
        mismatched = [r for r, o in stored if json.loads(r)["tone"] != json.loads(o)["tone"]]
        assert 10 <= len(mismatched) <= 30  # both stored: half the casual requests came out formal
        stats = await agent.handle_command(Command(platform="t", chat_id="ann", sender_id="ann", name="stats"))
        assert stats is not None and "asked for and shown" in stats.text
        asked_casual, shown_casual = asked_and_shown_in(stats.text, "casual")
        assert asked_casual > shown_casual > 0  # asked n times, shown fewer
        assert "tone: casual (" in stats.text
    finally:
        await agent.close()


def asked_and_shown_in(text: str, value: str) -> tuple[int, int]:
    """From /stats' "casual 9/17": (17, 9)."""
    import re

    match = re.search(rf"\b{value} (\d+)/(\d+)", text)
    assert match is not None, text
    return int(match.group(2)), int(match.group(1))


def test_choosing_by_realisation_prefers_the_request_that_is_realised() -> None:
    """Two requests the user would like equally if shown; one is realised 20 % of the
    time: the policy asks for the other. With realisation perfect, both stay open."""
    bandit = StyleBandit()
    stats = UserStats()
    for i in range(60):  # the user likes emoji (shown) and bullets (shown), nothing else matters
        style = ALL_STYLES[i % len(ALL_STYLES)]
        good = (style.emoji == "some") + (style.format == "bullets")
        stats.observe(features(style, "chat"), 1.0 if good == 2 else -1.0 if good == 0 else 0.0, bandit.config)
    posterior = bandit.posterior(stats, bandit.population({}))
    rates = np.ones((4, 2))
    rates[2, 1] = 0.0  # asking for emoji never gives any
    never = Realisation(rates)
    picks = [bandit.choose(posterior, "chat", {}, np.random.default_rng(i), never).style for i in range(30)]
    assert sum(p.format == "bullets" for p in picks) >= 27
    perfect = [bandit.choose(posterior, "chat", {}, np.random.default_rng(i)).style for i in range(30)]
    assert sum(p.emoji == "some" for p in perfect) >= 27  # when asked emoji show: ask for them
    table = bandit.choice_probabilities(posterior, "chat", {"format": "bullets"}, never)
    assert table.probs.sum() == pytest.approx(1.0)
    inverted = np.ones((4, 2))
    inverted[2] = 0.0  # asking for emoji gives none, asking for none gives some
    picks = [bandit.choose(posterior, "chat", {}, np.random.default_rng(i), Realisation(inverted)).style
             for i in range(30)]  # fmt: skip
    assert sum(p.emoji == "none" for p in picks) >= 27  # the request whose reply has emoji
