"""The batching engine's batched draw gives the distribution of transformers' warpers."""

from __future__ import annotations

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from agent_core.llm.warpers import draw, warped


def _transformers_probs(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    row = scores[None].clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(50), TopPLogitsWarper(top_p)):
        row = warper(torch.zeros((1, 1), dtype=torch.long), row)
    return torch.softmax(row, dim=-1)[0]


def test_the_batched_warpers_give_transformers_probabilities_row_by_row() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn((6, 500), generator=gen) * 3
    scores[1, :490] = float("-inf")  # fewer candidates than top-k
    scores[2, 7] = 40.0  # one token takes nearly all the mass
    temperatures = torch.tensor([0.7, 1.0, 0.9, 1.1, 0.3, 1.5])
    top_ps = torch.tensor([0.9, 0.9, 0.5, 1.0, 0.95, 0.2])
    ids, probs = warped(scores, temperatures, top_ps)
    for r in range(len(scores)):
        mine = torch.zeros(500).index_add_(0, ids[r], probs[r])
        expected = _transformers_probs(scores[r], float(temperatures[r]), float(top_ps[r]))
        assert torch.allclose(mine, expected, atol=1e-5), r


def test_a_draw_is_reproducible_per_row_follows_the_probabilities_and_greedy_takes_the_best() -> None:
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9], [0.1, 0.2, 0.7, 0.0]]))

    def draws(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed), None]
        return [draw(scores, [1.0, 0.0], [1.0, 1.0], gens) for _ in range(2000)]

    first, again = draws(5), draws(5)
    assert first == again  # the seeded row repeats, and the greedy row never varies
    assert {row[1] for row in first} == {2}
    counts = torch.bincount(torch.tensor([row[0] for row in first]), minlength=4).float() / 2000
    assert torch.allclose(counts[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.04)
    assert counts[3] == 0
