"""Nightly adapters trained against the user's reward model (``[training] objective`` raft
or dpo), end to end on a tiny random Llama with the real tokenizer: reward model, sampling
through the batching engine, TRL, the gate on generated replies, serving.

No storage of its own beyond what tests/test_training.py covers on both databases: the
PostgreSQL pass leaves it out (marked ``no_database``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent_core.config import Config, TrainingSettings
from agent_core.events import Command, Message
from agent_core.llm.decoder import LoraAdapter
from agent_core.training.evaluate import reward_gate
from agent_core.training.worker import peft_model
from attune.wiring import open_agent
from storage.training import TrainingRecords
from tests.conftest import MODEL_CACHE
from tests.test_training import adapter_of, history_agent, rate_history, training_text, user_id

pytestmark = [pytest.mark.timeout(300), pytest.mark.no_database]  # no database: not run again on PostgreSQL


def test_the_reward_gate_needs_a_reward_model_better_than_chance_fluency_and_a_gain() -> None:
    ok = {"margin": 0.02, "max_kl": 0.5}
    assert reward_gate(0.70, 0.60, 0.1, 0.8, **ok).promote
    assert "does not beat chance" in reward_gate(0.70, 0.60, 0.1, 0.5, **ok).reason
    assert "not measurable" in reward_gate(0.70, 0.60, 0.1, None, **ok).reason
    assert "above max_kl" in reward_gate(0.70, 0.60, 0.9, 0.8, **ok).reason
    low = reward_gate(0.61, 0.60, 0.1, 0.8, **ok)
    assert not low.promote and "+0.010, needs +0.02" in low.reason
    assert "-0.100, needs" in reward_gate(0.50, 0.60, 0.1, 0.8, **ok).reason


@pytest.mark.parametrize(("layers", "expected"), [(1, {1}), (0, {0, 1})])
def test_lora_on_the_top_layers_only_is_trained_and_served_there(
    tiny_model_dir: Path, tmp_path: Path, layers: int, expected: set[int]
) -> None:
    """``[training] layers``: LoRA weights on the top layers only (the backward pass stops
    below them); the batching engine serves such an adapter."""
    from transformers import AutoModelForCausalLM

    model = peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       TrainingSettings(layers=layers).model_dump(), None)  # fmt: skip
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    model.save_pretrained(tmp_path)
    served = LoraAdapter.load("top", tmp_path)
    assert {layer for layer, _ in served.weights} == expected
    assert {projection for _, projection in served.weights} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("objective", ["raft", "dpo"])
async def test_a_reward_trained_adapter_is_judged_on_its_generated_replies_and_serves_its_user(
    make_config: Callable[..., Config], tiny_model_dir: Path, objective: str
) -> None:
    """The user likes lists and dislikes long prose. Their reward model learns that from
    the reactions; the serving model's sampled replies, ranked by it, train the adapter;
    the candidate and the base each answer the held-out prompts, the reward model scores
    both, and the better candidate serves the user's next message. (With the style control
    on, each held-out reply has the format the bot asked for, list or prose, whatever the
    adapter: it is off here, so that the adapter's own lists can show.)"""
    extra = f'objective = "{objective}"\nsamples = 3\nsample_prompts = 4\nmax_kl = 1000\nmin_spread = 0.0\n'
    config = make_config(training_text(tiny_model_dir, extra, local="style_control = false\n"))
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 18)
        ann = await user_id(agent, "ann")
        plan = await agent.training.run()
    finally:
        await agent.close()
    (task,) = plan.tasks
    m = task.metrics
    assert m["objective"] == objective and m["reward_auc"] == 1.0  # lists told from prose on held-out reactions
    assert m["sampling"]["prompts"] == 4 and m["sampling"]["candidates"] == 12
    assert m["sampling"]["best_reward"] >= m["sampling"]["mean_reward"]
    assert m["heldout"]["prompts"] >= 1 and m["candidate"]["kl_to_base"] > 0
    gain = m["candidate"]["reward"] - m["in_service"]["reward"]
    assert (task.status == "promoted") == (gain >= 0.02), (task.status, task.reason)  # the gate's rule
    if objective == "dpo":  # on a random tiny model DPO's pairs move little: the gate decides either way
        return
    assert task.status == "promoted", task.reason  # SFT on the best of the samples and the liked lists
    served = await open_agent(config)
    await served.llm.start()
    try:
        first = await served.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="hello"))
        assert first is not None and await adapter_of(served, first.reply_id) == f"user-{ann}-v1"
        stats = await served.handle_command(Command(platform="web", chat_id="ann", sender_id="ann", name="stats"))
        assert stats is not None and "your reward model's score of its replies" in stats.text
    finally:
        await served.close()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("learning_rate = 1e-9\n", "needs +0.02"),  # no change: its replies score no higher
        ("max_kl = 0.0001\n", "above max_kl"),  # moved too far from the base model
    ],
)
async def test_reward_trained_candidates_that_score_lower_or_lose_fluency_are_rejected(
    make_config: Callable[..., Config], tiny_model_dir: Path, extra: str, expected: str
) -> None:
    base = training_text(tiny_model_dir, 'objective = "raft"\nsamples = 2\nsample_prompts = 3\nmin_spread = 0.0\n')
    config = make_config(base.replace("learning_rate = 0.05\n", "") + extra)
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        (task,) = (await agent.training.run()).tasks
        assert task.status == "rejected" and expected in task.reason, task.reason
        assert await TrainingRecords(agent.store.db).active(task.user_id) is None
    finally:
        await agent.close()


async def test_sampling_and_reward_training_on_the_real_smollm2(make_config: Callable[..., Config]) -> None:
    """The raft night on the real SmolLM2: it samples real replies through the batching
    engine, the reward model ranks them, a few steps train, and the gate decides on what
    both models generate."""
    config = make_config(
        f'[llm]\ntemperature = 0.0\nmax_new_tokens = 24\n[llm.local]\ncache_dir = "{MODEL_CACHE}"\n'
        "[training]\nmin_new_rated = 6\nmin_population_liked = 1000\nepochs = 1\nbatch_size = 4\nthreads = 2\n"
        'objective = "raft"\nsamples = 2\nsample_prompts = 3\nmin_spread = 0.0\n'
    )
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        steps: list[int] = []
        plan = await agent.training.run(progress=lambda t: steps.append(t.step))
    finally:
        await agent.close()
    (task,) = plan.tasks
    m = task.metrics
    assert task.status in ("promoted", "rejected") and m["objective"] == "raft", task.reason
    assert m["sampling"]["candidates"] == 6 and max(steps) >= 1 and m["reward_auc"] == 1.0
    assert -0.05 < m["candidate"]["kl_to_base"] < 5  # a real model, moved a little by a few steps
    assert "reward of generated replies" in task.reason or "KL to the base" in task.reason
    gain = m["candidate"]["reward"] - m["in_service"]["reward"]
    assert (task.status == "promoted") == (gain >= 0.02 and m["candidate"]["kl_to_base"] <= 0.5)
