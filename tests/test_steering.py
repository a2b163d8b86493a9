"""Steering with lookahead and the adapter that learns the steered replies, on a tiny random
Llama with the real SmolLM2 tokenizer, made to write digits, full stops and question
marks now and then (so that a planted taste has something to choose from).

The planted tastes are scorers, not the benchmark's features: "liked when it holds a
digit", "liked when the whole reply ends with a question". Each comparison is against
the same sampling steered by a scorer that likes nothing in particular (it keeps the first
candidate: one plain sample), over the whole vocabulary (``top_k``), where the tiny
model's chances are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from agent_core.config import TrainingSettings
from agent_core.llm import GenerationRequest, Steering
from agent_core.llm.base import BlockChoice
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from agent_core.llm.lookahead import best_of_k_kl, choose
from agent_core.style import Style, finish
from agent_core.training import distill
from agent_core.training.sampling import Sampler
from agent_core.training.worker import peft_model
from tests.conftest import MODEL_CACHE, plain_generate

pytestmark = [pytest.mark.no_database, pytest.mark.timeout(600)]

BRIEF = Style.from_dict({"length": "brief", "tone": "casual", "emoji": "none", "format": "prose"})
VOCABULARY = 49_152  # the SmolLM2 tokenizer's: candidates sample over all of it
PROMPTS = [[{"role": "user", "content": f"Tell me something about topic number {i}, please."}] for i in range(8)]


class DigitsLiked:
    """Planted: a reply with a digit is liked."""

    def score_partial(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        return [0.8 if any(c.isdigit() for c in t) else 0.3 for t in texts]


class NothingInParticular:
    """Every candidate scores alike: the first is kept, so the reply is one plain sample."""

    def score_partial(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        return [0.5] * len(texts)


class ClosingQuestionLiked:
    """Planted: a whole reply that ends with a question mark is liked (a start of one is neutral)."""

    def score_partial(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        return [0.8 if f and t.rstrip().endswith("?") else 0.5 for t, f in zip(texts, finished, strict=True)]


@pytest.fixture(scope="module")
def chatty_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, made to write (sampled at temperature 0.8 over the whole vocabulary)
    each digit about 0.05 % of the time, "?" 3 % and "." 6 %: every token's embedding shares
    one direction, and those tokens' output rows read it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    size = model.config.hidden_size
    direction = torch.randn(size)
    direction /= direction.norm()
    chances = {**dict.fromkeys("0123456789", 0.0005), "?": 0.03, ".": 0.06}
    with torch.no_grad():
        model.model.embed_tokens.weight += direction
        for token, chance in chances.items():
            logit = 0.8 * math.log(chance * len(tokenizer))  # against the rest of the vocabulary, each near 0
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = direction * logit / math.sqrt(size)
    target = tmp_path_factory.mktemp("chatty")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@contextlib.asynccontextmanager
async def engine(
    model_dir: Path, *, style_control: bool = True, no_repeat_ngram: int = 4
) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend(str(model_dir), MODEL_CACHE, threads=1, repetition_penalty=1.1,
                           no_repeat_ngram=no_repeat_ngram,
                           style_control=style_control,
                           batching=BatchLimits(max_batch_size=16, max_rows=48, batch_wait_s=0.2))  # fmt: skip
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def asked(i: int, tokens: int, steering: Steering | None = None, style: Style | None = None) -> GenerationRequest:
    return GenerationRequest(
        messages=PROMPTS[i % len(PROMPTS)],
        max_new_tokens=tokens,
        temperature=0.8,
        seed=1000 + i,
        style=style,
        steering=steering,
    )  # type: ignore[arg-type]


def digit_share(texts: Sequence[str]) -> float:
    return float(np.mean([any(c.isdigit() for c in t) for t in texts]))


def test_choosing_a_candidate_keeps_the_best_or_draws_by_strength_and_measures_its_kl() -> None:
    import torch

    assert choose([0.2, 0.9, 0.5], math.inf, None) == (1, pytest.approx(best_of_k_kl(3)))
    assert choose([0.2, 0.9, 0.5], 0.0, None) == (0, 0.0)  # no steering: the first sample, as it came
    assert choose([0.7], math.inf, None) == (0, 0.0)
    draws = [choose([0.3, 0.7], 2.0, torch.Generator().manual_seed(s))[0] for s in range(400)]
    # weights softmax(2 * logit): 0.7 is kept with chance 1 / (1 + ((0.3/0.7) / (0.7/0.3)) ** 2) = 0.967
    assert 0.93 < float(np.mean(draws)) <= 1.0
    _, kl = choose([0.3, 0.7], 2.0, torch.Generator().manual_seed(0))
    assert 0 < kl < math.log(2)


async def test_steering_by_a_planted_reward_raises_digits_per_row_in_a_mixed_batch(chatty_model_dir: Path) -> None:
    """In one batch: rows steered toward digits and rows steered toward nothing in
    particular. Only the first group's replies hold more digits."""
    choices: list[BlockChoice] = []
    liked = Steering(DigitsLiked(), candidates=6, max_block=12, top_k=VOCABULARY, on_block=choices.append)
    plain = Steering(NothingInParticular(), candidates=6, max_block=12, top_k=VOCABULARY)
    async with engine(chatty_model_dir, style_control=False) as backend:
        batch = [asked(i, 36, liked) for i in range(16)] + [asked(i, 36, plain) for i in range(16)]
        replies = await asyncio.gather(*(backend.generate(r) for r in batch))
        assert backend._engine is not None and backend._engine.largest_batch > 16  # candidates shared the batch
    steered, sampled = replies[:16], replies[16:]
    assert digit_share(steered) >= digit_share(sampled) + 0.3, (steered, sampled)
    assert choices and all(len(c.candidates) == len(c.scores) == len(c.texts) for c in choices)
    assert all(c.scores[c.chosen] == max(c.scores) for c in choices)  # strength inf: the best is kept
    kept_digit = [any(ch.isdigit() for ch in c.texts[c.chosen]) for c in choices if max(c.scores) > min(c.scores)]
    assert kept_digit and all(kept_digit)


async def test_a_row_without_steering_writes_beside_steered_rows_what_plain_generate_writes(
    tiny_model_dir: Path,
) -> None:
    """Greedy rows with no steering, between steered rows that fork, choose and copy their
    caches: token for token what transformers writes."""
    liked = Steering(DigitsLiked(), candidates=4, max_block=6)
    greedy = [GenerationRequest(messages=PROMPTS[i], max_new_tokens=20, temperature=0.0) for i in range(2)]  # type: ignore[arg-type]
    async with engine(tiny_model_dir, style_control=False, no_repeat_ngram=0) as backend:
        batch = [asked(i, 30, liked) for i in range(5)]
        together = await asyncio.gather(*(backend.generate(r) for r in [*batch[:3], *greedy, *batch[3:]]))
    for i, text in enumerate(together[3:5]):
        assert text == plain_generate(tiny_model_dir, PROMPTS[i], 20, repetition_penalty=1.1)


async def test_steering_toward_a_closing_question_ends_more_brief_replies_with_one(chatty_model_dir: Path) -> None:
    """A question only pays as the reply's last sentence: the candidates of the last
    sentence are scored as whole replies (the style control ends a brief reply there)."""
    liked = Steering(ClosingQuestionLiked(), candidates=6, max_block=16, top_k=VOCABULARY)
    plain = Steering(NothingInParticular(), candidates=6, max_block=16, top_k=VOCABULARY)
    async with engine(chatty_model_dir) as backend:
        steered = await asyncio.gather(*(backend.generate(asked(i, 40, liked, BRIEF)) for i in range(12)))
        sampled = await asyncio.gather(*(backend.generate(asked(i, 40, plain, BRIEF)) for i in range(12)))
    ends = [finish(t, BRIEF).rstrip().endswith("?") for t in steered]
    base = [finish(t, BRIEF).rstrip().endswith("?") for t in sampled]
    assert sum(ends) >= sum(base) + 4, (steered, sampled)


async def test_a_steered_reply_still_streams_and_a_cancelled_one_frees_its_rows(chatty_model_dir: Path) -> None:
    liked = Steering(DigitsLiked(), candidates=4, max_block=8)
    async with engine(chatty_model_dir, style_control=False) as backend:
        pieces = [piece async for piece in backend.stream(asked(1, 30, liked))]
        assert len(pieces) >= 2  # a block at a time
        stream = backend.stream(asked(2, 400, liked))
        await anext(stream)
        await stream.aclose()  # the consumer went away
        again = await backend.generate(asked(3, 10))
        assert again and backend._engine is not None
        for _ in range(50):
            if not backend._engine._rows:
                break
            await asyncio.sleep(0.05)
        assert backend._engine._rows == []


def test_the_adapter_learns_the_steered_replies_and_the_sentences_the_teacher_kept(chatty_model_dir: Path) -> None:
    """distill on the tiny model: the teacher (steered toward digits) answers prompts; a
    LoRA on the top layer learns its replies and its choices, after which it prefers each
    kept sentence to the rejected one more than the base model does (DPO's implicit
    reward), and the digits the teacher chose gain probability. (That the adapter's own
    replies then hold more of what the user likes is measured on the real SmolLM2:
    tests/test_real_model.py and bench.adapters.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sampler = Sampler(str(chatty_model_dir), MODEL_CACHE, threads=1, repetition_penalty=1.1, no_repeat_ngram=4,
                      style_control=False, rows_per_reply=4)  # fmt: skip
    try:
        prompts = [[{"role": "user", "content": f"Question {i}: what do you think about item {i}?"}] for i in range(24)]
        lessons, taught = distill.teach(sampler, DigitsLiked(), prompts, [None] * len(prompts), candidates=4,  # type: ignore[arg-type]
                                        temperature=0.8, top_k=VOCABULARY, max_new_tokens=24, seed=0)  # fmt: skip
    finally:
        sampler.close()
    assert taught["pairs"] >= 8 and taught["kept_score"] > taught["mean_score"]
    assert 0 < taught["kl_per_token"] < best_of_k_kl(4)
    pairs = [pair for lesson in lessons for pair in lesson.pairs()]
    assert all(any(tokenizer_digit(t) for t in kept) for _, kept, _ in pairs)  # the kept sentence had the digit
    settings = TrainingSettings(layers=1, learning_rate=0.05, epochs=10, batch_size=8, max_length=128).model_dump()
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    model = peft_model(AutoModelForCausalLM.from_pretrained(chatty_model_dir, dtype=torch.float32), settings, None)
    before = preference_margins(model, tokenizer, lessons)
    trained = distill.distill(model, tokenizer, lessons, settings, seed=0)
    after = preference_margins(model, tokenizer, lessons)
    assert trained["pairs"] == taught["pairs"] and trained["steps"] == 10 * math.ceil((24 + len(pairs)) / 8)
    assert before == pytest.approx([0.0] * len(pairs), abs=1e-4)  # a fresh adapter is the base model
    assert np.mean([m > 0 for m in after]) >= 0.8 and np.mean(after) > 0.5, after


def tokenizer_digit(token: int) -> bool:
    return 30 <= token <= 41 and token not in (30, 31)  # "0".."9" are ids 32..41 in the SmolLM2 vocabulary


def preference_margins(model: object, tokenizer: object, lessons: Sequence[distill.Lesson]) -> list[float]:
    """For each (kept, rejected) sentence: how much more the adapter raised the kept one's
    log-likelihood than the rejected one's, over the base model (nats)."""
    import torch

    margins = []
    for lesson in lessons:
        prompt = distill._prompt_ids(tokenizer, lesson.prompt)
        for prefix, kept, other in lesson.pairs():
            values = []
            for sentence in (kept, other):
                ids = prompt + prefix + sentence
                start = len(prompt) + len(prefix)
                with torch.no_grad():
                    own = distill.upper_logprobs(model, distill.Lower(model, 0)(ids), ids, 0)[start - 1 :].sum()
                    with model.disable_adapter():  # type: ignore[attr-defined]
                        base = distill.upper_logprobs(model, distill.Lower(model, 0)(ids), ids, 0)[start - 1 :].sum()
                values.append(float(own - base))
            margins.append(values[0] - values[1])
    return margins


def test_the_strength_measured_from_the_teachers_choices_keeps_the_kl_within_max_kl() -> None:
    block = BlockChoice(prefix=[], candidates=[[1], [2], [3], [4]], texts=["a", "b", "c", "d"],
                        scores=[0.1, 0.2, 0.3, 0.9], ended=[False] * 4, chosen=3, kl=best_of_k_kl(4))  # fmt: skip
    lesson = distill.Lesson([], None, [block] * 3)
    tokens = len(lesson.reply)
    assert tokens == 1
    assert distill.measure_strength([lesson], max_kl=10.0) == math.inf  # the best of 4 is within it
    chosen = distill.measure_strength([lesson], max_kl=1.5)  # 3 blocks over 1 token: only a softer draw fits
    assert 0 < chosen < math.inf
    assert distill.measure_strength([lesson], max_kl=1e-6) == 0.0
