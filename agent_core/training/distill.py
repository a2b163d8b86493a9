"""``[training] objective = "distill"``: the user's adapter learns the replies their reward
model steers, so that the text moves even where nothing steers (a server such as vLLM).

The teacher is the serving model as the user is served: the base with their style
control and their reward model steering each sentence (agent_core.llm.lookahead). For the
user's newest prompts it writes steered replies, and every sentence it chose among
candidates is kept (:class:`~agent_core.llm.base.BlockChoice`). The student is a LoRA on
the top ``[training] layers`` layers, trained on the densest signal the teacher gives:

- the steered reply itself, token by token (the next-token loss on what the teacher wrote);
- at each sentence where the candidates differ, the kept one against the one the reward
  model scored lowest, given the same reply so far (DPO's loss on the two sentences:
  the student is pushed toward what was chosen and away from what was not, relative to
  the base model).

Training steps are cheap: only the top layers have LoRA weights, so the activations
below them do not change during training; they are computed once per sequence
(:class:`Lower`) and each step runs the top layers alone, forward and backward.
``amplify`` then scales the learned direction (as ExPO does) where that measured better.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent_core.llm.base import AdapterRef, BlockChoice, ChatMessage, GenerationRequest, Steering
from agent_core.llm.lookahead import best_of_k_kl
from agent_core.reward_model import RewardModel
from agent_core.style import Style, token_budget
from agent_core.training.sampling import Sampler

DPO_BETA = 0.1
PAIRS_PER_REPLY = 3  # the choices per steered reply the adapter learns from (widest score gap first): steps stay cheap


@dataclass
class Lesson:
    """One steered reply to one prompt: the prompt, and each sentence's choice."""

    prompt: list[ChatMessage]
    style: Style | None
    blocks: list[BlockChoice] = field(default_factory=list)

    @property
    def reply(self) -> list[int]:
        """The reply's tokens as the teacher wrote them."""
        if not self.blocks:
            return []
        last = self.blocks[-1]
        return [*last.prefix, *last.candidates[last.chosen]]

    def pairs(self, limit: int = PAIRS_PER_REPLY) -> list[tuple[list[int], list[int], list[int]]]:
        """(reply so far, kept sentence, the lowest-scored other) where they differ: the
        ``limit`` choices with the widest score gap, in the order they were made."""
        out = []
        for block in self.blocks:
            if len(block.candidates) < 2:
                continue
            worst = min((i for i in range(len(block.candidates)) if i != block.chosen), key=lambda i: block.scores[i])
            kept, other = block.candidates[block.chosen], block.candidates[worst]
            gap = block.scores[block.chosen] - block.scores[worst]
            if kept != other and gap > 0:
                out.append((gap, len(out), (block.prefix, kept, other)))
        widest = sorted(out, key=lambda t: -t[0])[:limit]
        return [pair for _, _, pair in sorted(widest, key=lambda t: t[1])]


def teach(
    sampler: Sampler, reward: RewardModel, prompts: Sequence[list[ChatMessage]], styles: Sequence[Style | None], *,
    candidates: int, temperature: float, top_k: int, max_new_tokens: int, seed: int,
    adapter: AdapterRef | None = None,
) -> tuple[list[Lesson], dict[str, Any]]:  # fmt: skip
    """The teacher's steered replies to ``prompts`` (one each), with every choice it made."""
    started = time.monotonic()
    lessons = [Lesson(list(p), s) for p, s in zip(prompts, styles, strict=True)]
    batch = [
        GenerationRequest(
            messages=lesson.prompt, max_new_tokens=token_budget(lesson.style, max_new_tokens) if lesson.style else
            max_new_tokens, temperature=temperature, seed=seed * 100_003 + i, style=lesson.style, adapter=adapter,
            steering=Steering(reward, candidates=candidates, temperature=temperature, top_k=top_k,
                              on_block=lesson.blocks.append),
        )
        for i, lesson in enumerate(lessons)
    ]  # fmt: skip
    sampler.generate(batch)
    blocks = [b for lesson in lessons for b in lesson.blocks]
    tokens = sum(len(lesson.reply) for lesson in lessons)
    kept = [b.scores[b.chosen] for b in blocks if len(b.candidates) > 1]
    mean = [float(np.mean(b.scores)) for b in blocks if len(b.candidates) > 1]
    return lessons, {
        "prompts": len(lessons), "blocks": len(blocks), "pairs": sum(len(lesson.pairs()) for lesson in lessons),
        "seconds": round(time.monotonic() - started, 2),
        "kept_score": round(float(np.mean(kept)), 4) if kept else None,
        "mean_score": round(float(np.mean(mean)), 4) if mean else None,
        "kl_per_token": round(sum(b.kl for b in blocks) / tokens, 4) if tokens else 0.0,
    }  # fmt: skip


def measure_strength(lessons: Sequence[Lesson], max_kl: float, grid: Sequence[float] = (0.5, 1, 2, 4, 8)) -> float:
    """The strongest steering whose KL per token stays within ``max_kl``, read from the
    teacher's recorded choices (keeping a candidate drawn with weights ``softmax(strength
    * logit(score))`` instead of the best): ``inf`` when even the best stays within it."""
    blocks = [b for lesson in lessons for b in lesson.blocks if len(b.candidates) > 1]
    tokens = sum(len(lesson.reply) for lesson in lessons)
    if not blocks or not tokens:
        return math.inf
    if sum(best_of_k_kl(len(b.candidates)) for b in blocks) / tokens <= max_kl:
        return math.inf
    chosen = 0.0
    for strength in grid:
        kl = 0.0
        for b in blocks:
            p = np.clip(np.asarray(b.scores), 1e-6, 1 - 1e-6)
            z = strength * np.log(p / (1 - p))
            w = np.exp(z - z.max())
            w /= w.sum()
            kl += float(np.sum(w * np.log(np.maximum(len(w) * w, 1e-12))))
        if kl / tokens <= max_kl:
            chosen = strength
    return chosen


# --- the student ------------------------------------------------------------------------------


class Lower:
    """The frozen layers below the adapter's: each sequence's activations at the first
    adapted layer, computed once and reused by every step."""

    def __init__(self, model: Any, first: int) -> None:
        self.inner = _inner(model)
        self.first = first

    def __call__(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad():
            x = self.inner.embed_tokens(torch.tensor([ids]))
            position = _positions(self.inner, x, len(ids))
            for layer in self.inner.layers[: self.first]:
                x = layer(x, position_embeddings=position)
        return x


def upper_logprobs(model: Any, hidden: Any, ids: list[int], first: int) -> Any:
    """Per-token log-probabilities of ``ids[1:]`` from the activations at layer ``first``
    (the top layers, with their LoRA weights, then the norm and the output layer)."""
    import torch

    inner = _inner(model)
    x = hidden
    position = _positions(inner, x, len(ids))
    for layer in inner.layers[first:]:
        x = layer(x, position_embeddings=position)
    logits = _head(model)(inner.norm(x))[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@dataclass
class _Sequence:
    ids: list[int]
    start: int  # where the tokens it learns from begin
    hidden: Any = None  # the activations at the first adapted layer
    reference: Any = None  # the base model's log-probability of the tokens it learns from


def distill(
    model: Any, tokenizer: Any, lessons: Sequence[Lesson], settings: dict[str, Any], seed: int,
    progress: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``model``'s LoRA weights (a peft model, top layers only) on the lessons:
    next-token loss on each steered reply, DPO on each (kept, rejected) sentence pair."""
    import torch

    started = time.monotonic()
    layers = len(_inner(model).layers)
    top = int(settings.get("layers") or 0)
    first = layers - top if 0 < top < layers else 0
    max_length = int(settings["max_length"])
    eos = tokenizer.eos_token_id
    replies: list[_Sequence] = []
    pairs: list[tuple[_Sequence, _Sequence]] = []  # the kept sentence and the rejected one, each after the same text
    for lesson in lessons:
        prompt = _prompt_ids(tokenizer, lesson.prompt)
        if lesson.reply:
            replies.append(_fit(prompt, [*lesson.reply, eos], max_length))
        for prefix, kept, other in lesson.pairs():
            pairs.append((_fit(prompt, prefix + kept, max_length, len(prefix)),
                          _fit(prompt, prefix + other, max_length, len(prefix))))  # fmt: skip
    lower = Lower(model, first)
    with model.disable_adapter(), torch.no_grad():  # the base model: what the adapter starts from
        for seq in [*replies, *(s for pair in pairs for s in pair)]:
            seq.hidden = lower(seq.ids)
            seq.reference = upper_logprobs(model, seq.hidden, seq.ids, first)[seq.start - 1 :].sum()
    cached = time.monotonic() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(settings["learning_rate"]), weight_decay=0.0)
    items: list[Any] = [("reply", r) for r in replies] + [("pair", p) for p in pairs]
    epochs, batch = int(settings["epochs"]), int(settings["batch_size"])
    steps = epochs * max(1, math.ceil(len(items) / batch))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    step, losses, epoch_losses = 0, [], []
    for _ in range(epochs):
        rng.shuffle(items)
        epoch_losses.append(float(np.mean(losses)) if losses else 0.0)
        losses = []
        for i in range(0, len(items), batch):
            optimizer.zero_grad()
            total = torch.zeros(())
            for kind, item in items[i : i + batch]:
                if kind == "reply":
                    loss = -upper_logprobs(model, item.hidden, item.ids, first)[item.start - 1 :].mean()
                else:
                    kept, other = item
                    mine = upper_logprobs(model, kept.hidden, kept.ids, first)[kept.start - 1 :].sum()
                    theirs = upper_logprobs(model, other.hidden, other.ids, first)[other.start - 1 :].sum()
                    margin = (mine - kept.reference) - (theirs - other.reference)
                    loss = -torch.nn.functional.logsigmoid(DPO_BETA * margin)
                total = total + loss / len(items[i : i + batch])
            total.backward()
            optimizer.step()
            step += 1
            losses.append(float(total.detach()))
            progress(step, steps, losses[-1])
    model.eval()
    epoch_losses = [*epoch_losses[1:], float(np.mean(losses)) if losses else 0.0]  # the mean of each epoch's steps
    return {"replies": len(replies), "pairs": len(pairs), "steps": step, "cache_seconds": round(cached, 2),
            "loss_first_epoch": round(epoch_losses[0], 4), "loss_last_epoch": round(epoch_losses[-1], 4),
            "seconds": round(time.monotonic() - started, 2)}  # fmt: skip


def amplify(model: Any, factor: float) -> None:
    """Scale what the adapter learned by ``factor`` (its B matrices): ExPO's extrapolation."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(factor)


def _fit(prompt: list[int], reply: list[int], max_length: int, skip: int = 0) -> _Sequence:
    """Prompt and reply within ``max_length`` tokens (the prompt's start goes first); it
    learns from the reply's tokens after the first ``skip``."""
    ids = prompt + reply
    cut = min(max(0, len(ids) - max_length), max(len(prompt) - 1, 0))
    ids = ids[cut:][:max_length]
    return _Sequence(ids, min(len(prompt) - cut + skip, len(ids) - 1))


def _prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    return list(prompt)


def _inner(model: Any) -> Any:
    """The transformers decoder stack (``model.model``) inside a peft model or a plain one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _head(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


def _positions(inner: Any, x: Any, length: int) -> Any:
    import torch

    return inner.rotary_emb(x, torch.arange(length)[None, :])
