"""Decoding-time style control (agent_core/llm/style_control.py): the reply has the style
asked for, on the batching engine with a different style per row, on the plain path, with
streaming intact; and the loop guard stops degenerate loops."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from agent_core.bandit import ALL_STYLES
from agent_core.llm import GenerationRequest
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from agent_core.llm.style_control import StyleControl, vocab_for
from agent_core.style import DIMENSIONS, Style, finish, measure_style, token_budget
from bench.judge import degenerate
from bench.style_adherence import list_items, split_words
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

QUESTIONS = ["How can I sleep better?", "What should I cook tonight?", "How do I learn to juggle?",
             "Give me tips for a long flight.", "How do I keep my plants alive?", "What is a good morning routine?",
             "How do I save money on groceries?", "How can I stay focused at work?"]  # fmt: skip
EMOJI = "\U0001f300-\U0001faff\u2600-\u27bf"


def styled_request(style: Style, question: str, seed: int = 0, budget: int = 160) -> GenerationRequest:
    messages = [{"role": "system", "content": f"You are a helpful assistant. {style.instructions()}"},
                {"role": "user", "content": question}]  # fmt: skip
    return GenerationRequest(messages=messages, max_new_tokens=token_budget(style, budget), temperature=0.0,  # type: ignore[arg-type]
                             seed=seed, style=style)  # fmt: skip


@contextlib.asynccontextmanager
async def backend(model: Path | str, batching: bool = True) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(model), MODEL_CACHE, threads=1, repetition_penalty=1.1, no_repeat_ngram=4,
                         batching=BatchLimits(max_batch_size=8) if batching else None)  # fmt: skip
    await local.start()
    try:
        yield local
    finally:
        await local.close()


def misses(results: list[tuple[Style, str]]) -> dict[str, int]:
    """Per "dimension=value": replies asked for it that do not have it."""
    out = {f"{d}={v}": 0 for d, values in DIMENSIONS.items() for v in values}
    for style, text in results:
        shown = measure_style(text)
        for dim, value in style.as_dict().items():
            out[f"{dim}={value}"] += getattr(shown, dim) != value
    return out


async def test_every_style_shows_in_one_mixed_batch_on_the_tiny_model(tiny_model_dir: Path) -> None:
    """All 16 styles at once through the batching engine (8 rows a step, each its own
    style): even a random model's text has every value asked for."""
    import asyncio

    async with backend(tiny_model_dir) as local:
        replies = await asyncio.gather(*(local.generate(styled_request(s, QUESTIONS[i % 8], i))
                                         for i, s in enumerate(ALL_STYLES)))  # fmt: skip
        assert local._engine is not None and local._engine.largest_batch == 8
    results = [(s, finish(r, s)) for s, r in zip(ALL_STYLES, replies, strict=True)]
    assert misses(results) == dict.fromkeys(misses([]), 0), results


async def test_the_plain_path_is_steered_too_and_style_control_can_be_turned_off(tiny_model_dir: Path) -> None:
    lists = Style("brief", "formal", "some", "bullets")
    async with backend(tiny_model_dir, batching=False) as local:
        steered = finish(await local.generate(styled_request(lists, QUESTIONS[0])), lists)
        local.style_control = False
        unsteered = await local.generate(styled_request(lists, QUESTIONS[0]))
    assert measure_style(steered) == lists, steered
    assert not unsteered.startswith("- ")  # instructions alone do not make a random model write a list


async def test_streaming_gives_the_same_styled_text(tiny_model_dir: Path) -> None:
    style = Style("brief", "casual", "some", "bullets")
    async with backend(tiny_model_dir) as local:
        whole = await local.generate(styled_request(style, QUESTIONS[1]))
        pieces = [piece async for piece in local.stream(styled_request(style, QUESTIONS[1]))]
    assert len(pieces) > 3 and "".join(pieces) == whole
    assert whole.startswith("- ") and "\n- " in whole and any("\U0001f300" <= ch <= "\U0001faff" for ch in whole)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def scripted(tokenizer: object, favourite: str, control: StyleControl | None, steps: int) -> str:
    """Decode ``steps`` tokens from a 'model' that most wants to write ``favourite`` again
    and again (the next token of it, cycling), with the rest of the vocabulary as its
    weaker, fixed second choices: a loop, unless something stops it."""
    ids = tokenizer.encode(favourite, add_special_tokens=False)  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    others = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    others[tokenizer.all_special_ids] = float("-inf")  # type: ignore[attr-defined]
    reply: list[int] = []
    for step in range(steps):
        scores = others.clone()[None]
        scores[0, ids[step % len(ids)]] = 10.0  # the loop's next token
        scores[0, ids[(step + 1) % len(ids)]] = 8.0
        if control is not None:
            scores = control(torch.tensor([reply]), scores)
        reply.append(int(scores.argmax()))
    return tokenizer.decode(reply)  # type: ignore[attr-defined,no-any-return]


def test_a_degenerate_loop_is_stopped(tokenizer: object) -> None:
    loop = scripted(tokenizer, " Reflect.", None, 24)
    assert degenerate(loop) is not None  # without the guard: "Reflect. Reflect. Reflect. ..."
    vocab = vocab_for(tokenizer)
    guarded = scripted(tokenizer, " Reflect.", StyleControl(vocab, None, prompt_length=0, budget=24), 24)
    assert guarded.count("Reflect") <= loop.count("Reflect") / 2, guarded  # twice per 16 tokens at most
    assert degenerate(guarded) is None, guarded


def test_emoji_none_blocks_every_emoji_the_model_wants(tokenizer: object) -> None:
    vocab = vocab_for(tokenizer)
    style = Style("brief", "casual", "none", "prose")
    wanted = scripted(tokenizer, " 🎉 Party 😊 time", None, 12)
    assert any(ch in wanted for ch in "🎉😊")
    blocked = scripted(tokenizer, " 🎉 Party 😊 time", StyleControl(vocab, style, prompt_length=0, budget=64), 12)
    assert measure_style(blocked).emoji == "none", blocked


def test_a_hyphen_inside_a_word_is_not_taken_for_a_list_marker(tokenizer: object) -> None:
    """With bullets, "well-being" stays one word: only a marker that opens an item (at
    the start or after a line break) must be followed by a spaced word."""
    vocab = vocab_for(tokenizer)
    style = Style("detailed", "casual", "none", "bullets")
    written = scripted(tokenizer, "- Sleep is good for your well-being and health", StyleControl(
        vocab, style, prompt_length=0, budget=64), 12)  # fmt: skip
    assert written.startswith("- Sleep") and "well-being" in written and "- being" not in written, written


def test_a_list_has_at_least_three_items_even_when_the_model_would_stop(tokenizer: object) -> None:
    vocab = vocab_for(tokenizer)
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    control = StyleControl(vocab, Style("brief", "formal", "none", "bullets"), prompt_length=0, budget=64,
                           eos={eos})  # fmt: skip
    words = tokenizer.encode(" Rest well. Drink water. Walk daily.", add_special_tokens=False)  # type: ignore[attr-defined]
    reply: list[int] = []
    for _ in range(40):
        scores = torch.full((1, len(tokenizer)), -5.0)  # type: ignore[arg-type]
        scores[0, eos] = 5.0  # the model would end the reply at every step
        scores[0, words[len([t for t in reply if t in words]) % len(words)]] = 4.0
        reply.append(int(control(torch.tensor([reply]), scores).argmax()))
        if reply[-1] == eos:
            break
    text = tokenizer.decode(reply, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert reply[-1] == eos and text.count("\n- ") + text.startswith("- ") == 3, text


async def test_every_value_shows_on_the_real_model() -> None:
    """SmolLM2-135M, greedy, all 16 styles over eight questions through the batching engine
    (mixed styles in each batch): each value is asked for eight times and must show in
    at least seven; every reply is a real answer (not degenerate)."""
    import asyncio

    from agent_core.llm.model_files import find_model

    find_model("smollm2")  # the wheel must be installed: in CI nothing is skipped
    async with backend("smollm2") as local:
        replies = await asyncio.gather(*(local.generate(styled_request(s, QUESTIONS[i % 8], i, budget=120))
                                         for i, s in enumerate(ALL_STYLES)))  # fmt: skip
    results = [(s, finish(r, s)) for s, r in zip(ALL_STYLES, replies, strict=True)]
    missed = misses(results)
    assert all(n <= 1 for n in missed.values()), (missed, results)
    assert [degenerate(text) for _, text in results] == [None] * 16, results
    assert not [t for _, t in results if split_words(t)], results  # no control put a space inside a word
    lists = [t for s, t in results if s.format == "bullets"]
    assert all(list_items(t) >= 3 for t in lists), lists


def test_a_brief_reply_ends_at_its_last_full_sentence_closing_quotes_included() -> None:
    lists = Style("brief", "formal", "none", "bullets")
    quoted = "- “A Simple Lunch.”\n- “A Quick Dinner.”\n- “The Lazy Breakfast: A Simple Lunch.”\n"
    assert finish(quoted, lists) == quoted.strip()  # the third item stays: it ended, inside its quotes
    assert finish("- One item.\n- Two items.\n- Three and then it was cut", lists) == "- One item.\n- Two items."
