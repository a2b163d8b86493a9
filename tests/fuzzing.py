"""Hostile input for the fuzz tests (hypothesis): odd text, and platform payloads with
fields missing, of the wrong type, huge, or full of odd characters."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_core.agent import Agent

T = TypeVar("T")
# No per-person limit: fuzzed events come from one or two people, all at once.
NO_LIMITS = "[limits]\nmessages_per_minute = 1000000\nglobal_messages_per_minute = 0\n"

# lone surrogates, zero-width and right-to-left marks, NUL, BOM, emoji and a skin tone, SQL wildcards
ODD = ["\ud800", "\udfff", "\ud83d", "\u200b", "\u200f", "\u202e", "\u2066", "\x00", "\ufeff", "👍", "\U0001f3fd"]
ODD += ["\n", "%", "_"]
TEXT = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(ODD) | st.characters(), max_size=50),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=5).map(lambda s: s * 2000),  # long
)
# What a field can be instead of what it should be.
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    TEXT,
    st.just("x" * 100_000),
)
_DROP = object()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in nested dicts and lists."""
    found = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


def _apply(template: dict[str, Any], changes: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    payload = copy.deepcopy(template)
    for path, new in changes:
        parent: Any = payload
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if isinstance(parent, dict) and new is _DROP:
                parent.pop(path[-1], None)
            elif isinstance(parent, dict) or (isinstance(parent, list) and path[-1] < len(parent)):
                if new is _DROP:
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = new
    return payload


def mutated(template: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``template`` with one to three fields dropped or replaced by a wrong value."""
    change = st.tuples(st.sampled_from(_paths(template)), st.just(_DROP) | WRONG)
    return st.lists(change, min_size=1, max_size=3).map(lambda changes: _apply(template, changes))


def examples_of(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """``count`` examples of ``strategy``, the same ones every run (derandomized), for a
    test that feeds them to a running adapter one after another."""
    found: list[T] = []

    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(example: T) -> None:
        found.append(example)

    collect()
    return found


async def unanswered(agent: Agent) -> int:
    """Stored messages with no reply: a half-written turn (the backend here never fails)."""
    row = await agent.store.db.fetchone(
        "SELECT COUNT(*) FROM messages m WHERE m.role = 'user'"
        " AND NOT EXISTS (SELECT 1 FROM messages r WHERE r.reply_to = m.id AND r.role = 'assistant')"
    )
    return int(row[0]) if row else -1


async def settled_whole(agent: Agent, timeout: float = 30) -> None:
    """Wait until every stored message has its reply, and check the database."""
    async with asyncio.timeout(timeout):
        while await unanswered(agent):
            await asyncio.sleep(0.05)
    assert await agent.store.db.check() == "ok"
