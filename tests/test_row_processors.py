"""The batching engine's processors for all rows at once (agent_core/llm/row_processors.py)
change the scores exactly as ``logits_processors`` does row by row for plain ``generate``:
transformers' repetition penalty, then the style control and loop guard."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from agent_core.bandit import ALL_STYLES
from agent_core.llm import GenerationRequest
from agent_core.llm.row_processors import RowProcessors, apply
from agent_core.llm.style_control import StyleControl, logits_processors, vocab_for
from agent_core.style import Style
from tests.conftest import _smollm2_tokenizer

pytestmark = pytest.mark.no_database

PENALTY = 1.1


def test_all_rows_at_once_equal_each_rows_own_processors_step_by_step() -> None:
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer())
    vocab, width = vocab_for(tokenizer), len(tokenizer)
    eos = {tokenizer.eos_token_id}
    generator = torch.Generator().manual_seed(0)
    styles: list[Style | None] = [None, *ALL_STYLES[:: max(1, len(ALL_STYLES) // 7)]]
    sequences, ours, theirs = [], [], []
    for i, style in enumerate(styles):
        prompt = torch.randint(0, width, (20 + 13 * i,), generator=generator).tolist()
        request = GenerationRequest(messages=[], max_new_tokens=48, style=style)
        sequences.append(prompt)
        theirs.append(logits_processors(request, prompt_length=len(prompt), vocab=vocab, repetition_penalty=PENALTY,
                                        no_repeat_ngram=4, eos=eos, warpers=False))  # fmt: skip
        control = StyleControl(vocab, style, prompt_length=len(prompt), budget=48, no_repeat_ngram=4, eos=eos)
        ours.append(RowProcessors(PENALTY, control, vocab=width, capacity=512))
    changed = 0
    for _ in range(48):
        logits = torch.randn(len(styles), width, generator=generator) * 4
        # the rows' own favourites: each step some scores land on tokens they have seen
        for row, ids in enumerate(sequences):
            logits[row, ids[-8:]] += 6
        expected = torch.cat([p(torch.tensor([ids]), logits[r : r + 1].clone())
                              for r, (p, ids) in enumerate(zip(theirs, sequences, strict=True))])  # fmt: skip
        got = logits.clone()
        apply(ours, sequences, got)
        assert torch.equal(got, expected)
        changed += int((got != logits).any(dim=-1).sum())
        for ids, token in zip(sequences, expected.argmax(dim=-1).tolist(), strict=True):
            ids.append(token)
    assert changed == 48 * len(styles)  # the penalty acts on every row at every step


def test_a_fork_follows_its_own_row_and_leaves_the_original_as_it_was() -> None:
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer())
    vocab, width = vocab_for(tokenizer), len(tokenizer)
    prompt = tokenizer.encode("Tell me about sleep.")
    style = Style.from_dict({"length": "brief", "tone": "casual", "emoji": "some", "format": "bullets"})
    control = StyleControl(vocab, style, prompt_length=len(prompt), budget=40, eos={tokenizer.eos_token_id})
    original = RowProcessors(PENALTY, control, vocab=width, capacity=256)
    ids = prompt + tokenizer.encode("- Sleep well", add_special_tokens=False)
    apply([original], [ids], torch.zeros(1, width))
    twin = original.fork()
    other = ids + tokenizer.encode(" tonight.", add_special_tokens=False)
    apply([twin], [other], torch.zeros(1, width))
    assert twin.count > original.count and twin.control is not None and twin.control.reply != control.reply
    a, b = torch.zeros(1, width), torch.zeros(1, width)
    apply([original], [ids], a)
    fresh = RowProcessors(PENALTY, StyleControl(vocab, style, prompt_length=len(prompt), budget=40,
                                                eos={tokenizer.eos_token_id}), vocab=width, capacity=256)  # fmt: skip
    apply([fresh], [ids], b)
    assert torch.equal(a, b)  # the fork's tokens did not reach the original
