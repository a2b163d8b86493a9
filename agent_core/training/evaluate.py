"""Judging an adapter on held-out feedback, and the gate that decides its promotion.

Two measures, each for the base model, the adapter in service and the candidate:

- **NLL of liked replies**: the mean negative log-likelihood per token of the replies
  the user liked, given the prompt exactly as it was sent. Lower is better.
- **Preference accuracy**: over every (liked, disliked) pair of held-out replies, how
  often the model prefers the liked one. For the same prompt that is the higher
  per-token log-likelihood; across prompts (reactions come unpaired) it is the higher
  per-token log-likelihood *relative to the base model* (KTO's implicit reward), so the
  base model itself scores 0.5. Ties count half. None without both kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent_core.training.dataset import Example


@dataclass(frozen=True)
class Scored:
    """Log-likelihood of one held-out reply under one model."""

    logp: float  # summed over the reply's tokens
    tokens: int

    @property
    def per_token(self) -> float:
        return self.logp / max(self.tokens, 1)


def completion_ids(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt plus reply as the chat template lays them out, and where the reply starts.

    The prompt's start is cut when the whole does not fit, as in training."""
    prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(
        [*example.prompt, {"role": "assistant", "content": example.completion}], tokenize=True
    )
    prompt, full = _ids(prompt), _ids(full)
    start = len(prompt)
    if len(full) > max_length:
        cut = min(len(full) - max_length, max(start - 1, 0))
        full, start = full[cut:][:max_length], start - cut
    return full, start


def _ids(value: Any) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    return list(value)


def score(model: Any, tokenizer: Any, rows: list[Example], *, max_length: int, batch_size: int = 8) -> list[Scored]:
    """Each row's reply log-likelihood under ``model`` (one batched forward pass per ``batch_size`` rows)."""
    import torch

    out: list[Scored] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(rows), batch_size):
        encoded = [completion_ids(tokenizer, r, max_length) for r in rows[i : i + batch_size]]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for j, (ids, _) in enumerate(encoded):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
        for j, (ids, start) in enumerate(encoded):
            reply = logprobs[j, start - 1 : len(ids) - 1]
            out.append(Scored(float(reply.sum()), int(reply.numel())))
    return out


def nll_liked(rows: list[Example], scored: list[Scored]) -> float | None:
    liked = [s for r, s in zip(rows, scored, strict=True) if r.label]
    tokens = sum(s.tokens for s in liked)
    return -sum(s.logp for s in liked) / tokens if tokens else None


def preference_accuracy(rows: list[Example], scored: list[Scored], base: list[Scored]) -> float | None:
    pairs = wins = 0.0
    items = list(zip(rows, scored, base, strict=True))
    for liked, s_l, b_l in (x for x in items if x[0].label):
        for disliked, s_d, b_d in (x for x in items if not x[0].label):
            if json.dumps(liked.prompt) == json.dumps(disliked.prompt):
                left, right = s_l.per_token, s_d.per_token
            else:
                left, right = s_l.per_token - b_l.per_token, s_d.per_token - b_d.per_token
            wins += 1.0 if left > right + 1e-9 else 0.5 if abs(left - right) <= 1e-9 else 0.0
            pairs += 1
    return wins / pairs if pairs else None


def measures(rows: list[Example], scored: list[Scored], base: list[Scored]) -> dict[str, float | None]:
    return {"nll_liked": nll_liked(rows, scored), "preference_accuracy": preference_accuracy(rows, scored, base)}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def gate(candidate: dict[str, float | None], in_service: dict[str, float | None], margin: float) -> Decision:
    """Promote only a candidate better than what serves now, by ``margin``.

    With liked held-out replies: its NLL must be lower by at least ``margin`` (a share),
    and its preference accuracy (where measurable) no worse. With only disliked ones:
    its preference accuracy must be higher by ``margin``."""
    c_nll, s_nll = candidate["nll_liked"], in_service["nll_liked"]
    c_acc, s_acc = candidate["preference_accuracy"], in_service["preference_accuracy"]
    if c_nll is not None and s_nll is not None:
        gain = (s_nll - c_nll) / s_nll if s_nll > 0 else 0.0
        if gain < margin:
            return Decision(
                False, f"held-out NLL {c_nll:.3f} vs {s_nll:.3f} in service: {gain:.1%} lower, needs {margin:.0%}"
            )
        if c_acc is not None and s_acc is not None and c_acc < s_acc:
            return Decision(False, f"preference accuracy fell: {c_acc:.2f} vs {s_acc:.2f} in service")
        return Decision(True, f"held-out NLL {c_nll:.3f} vs {s_nll:.3f} in service: {gain:.1%} lower")
    if c_acc is not None and s_acc is not None:
        if c_acc >= s_acc + margin:
            return Decision(True, f"preference accuracy {c_acc:.2f} vs {s_acc:.2f} in service")
        return Decision(False, f"preference accuracy {c_acc:.2f} vs {s_acc:.2f} in service, needs +{margin:.2f}")
    return Decision(False, "no held-out feedback to judge it on")


def reward_gate(
    candidate_reward: float, in_service_reward: float, kl: float, reward_auc: float | None, *, margin: float,
    max_kl: float,
) -> Decision:  # fmt: skip
    """The gate of reward-trained adapters, on replies each model generated to the user's
    held-out prompts: promote only if the user's reward model scores the candidate's
    replies higher by ``margin`` (a like chance), its KL to the base model stays within
    ``max_kl`` nats per token (fluency), and the reward model itself beats chance on the
    user's held-out reactions (else its scores mean nothing)."""
    if reward_auc is None or reward_auc <= 0.5:
        shown = "not measurable" if reward_auc is None else f"{reward_auc:.2f}"
        return Decision(False, f"the reward model does not beat chance on held-out reactions (AUC {shown})")
    if kl > max_kl:
        return Decision(False, f"KL to the base {kl:.3f} nats per token, above max_kl {max_kl}")
    gain = candidate_reward - in_service_reward
    summary = f"reward of generated replies {candidate_reward:.3f} vs {in_service_reward:.3f} in service"
    if gain < margin:
        return Decision(False, f"{summary}: +{gain:.3f}, needs +{margin:.2f}".replace("+-", "-"))
    return Decision(True, f"{summary} (+{gain:.3f}; KL {kl:.3f}, reward AUC {reward_auc:.2f})")
