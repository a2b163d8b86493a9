"""The next token of many rows at once: temperature, top-k and top-p over a batch, and one
draw per row from its own generator.

The same distribution as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper(50)``
and ``TopPLogitsWarper`` applied row by row (the order ``generate`` uses), but computed
for the whole batch in a few tensor operations and over the top 50 scores only, not
sorted over the whole vocabulary per row. Each row draws with its request's seeded
generator (reproducible), or the global one when it has none. A row with temperature 0
takes the highest score (greedy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOP_K = 50  # transformers' default top-k, as ``generate`` applies it


def warped(
    scores: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of ``scores`` (rows x vocabulary): the candidate token ids (rows x k, best
    first) and their probabilities after temperature, top-k (``TOP_K``, or each row's
    ``top_ks``) and top-p (zero where cut)."""
    k = min(int(top_ks.max()) if top_ks is not None else TOP_K, scores.shape[-1])
    values, ids = torch.topk(scores.float() / temperatures[:, None], k, dim=-1)
    if top_ks is not None:
        values = values.masked_fill(torch.arange(k)[None, :] >= top_ks[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    above = torch.cumsum(probs, dim=-1) - probs  # the mass ranked strictly above each token
    keep = above < top_ps[:, None]
    keep[:, 0] = True  # top-p keeps at least one token
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return ids, probs / probs.sum(dim=-1, keepdim=True)


def draw(
    scores: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None], top_ks: Sequence[int] | None = None,
) -> list[int]:  # fmt: skip
    """One token per row of ``scores`` (already through the per-row processors); top-k is
    ``TOP_K`` unless ``top_ks`` gives each row's."""
    greedy = scores.argmax(dim=-1)
    sampled = [row for row, t in enumerate(temperatures) if t > 0]
    out = greedy.tolist()
    if not sampled:
        return out
    rows = torch.tensor(sampled)
    ks = None
    if top_ks is not None and any(top_ks[r] != TOP_K for r in sampled):
        ks = torch.tensor([top_ks[r] for r in sampled])
    ids, probs = warped(scores[rows], torch.tensor([temperatures[r] for r in sampled], dtype=torch.float32),
                        torch.tensor([top_ps[r] for r in sampled], dtype=torch.float32), ks)  # fmt: skip
    uniform = torch.cat([torch.rand(1, generator=generators[r]) for r in sampled])
    cumulative = torch.cumsum(probs, dim=-1)
    target = uniform[:, None] * cumulative[:, -1:]  # below the total: never past the last kept token
    pick = torch.searchsorted(cumulative, target).clamp_(max=ids.shape[-1] - 1)
    for row, token in zip(sampled, ids.gather(1, pick)[:, 0].tolist(), strict=True):
        out[row] = token
    return out
