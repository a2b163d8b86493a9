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

from agent_core.agent import Agent
from agent_core.config import Config, TrainingSettings
from agent_core.events import Command, Message
from agent_core.llm.decoder import LoraAdapter
from agent_core.training.evaluate import reward_gate
from agent_core.training.job import Task
from agent_core.training.worker import peft_model
from attune.wiring import open_agent
from storage.training import TrainingRecords
from tests.conftest import MODEL_CACHE
from tests.test_training import adapter_of, history_agent, rate_history, training_text, user_id

pytestmark = [pytest.mark.timeout(300), pytest.mark.no_database]  # no database: not run again on PostgreSQL


async def night_after_history(agent: Agent) -> tuple[int, Task]:
    """Ann's 18 rated exchanges (lists liked, prose disliked), then the nightly job: her id and her task."""
    await rate_history(agent, "ann", 18)
    ann = await user_id(agent, "ann")
    (task,) = (await agent.training.run()).tasks
    return ann, task


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
        ann, task = await night_after_history(agent)
    finally:
        await agent.close()
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


async def test_a_distilled_adapter_learns_the_steered_replies_and_the_strength_is_recorded(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    """objective distill through the real job: the teacher (the tiny model steered by the
    user's reward model) answers their newest prompts, a LoRA on the top layer learns its
    replies and choices, the gate judges the candidate's own replies, and the strength the
    steering may have is stored for the user's next replies."""
    extra = 'objective = "distill"\nsample_prompts = 4\nlayers = 1\nmax_kl = 1000\n'
    config = make_config(training_text(tiny_model_dir, extra, local="style_control = false\n"))
    agent = await history_agent(config)
    try:
        ann, task = await night_after_history(agent)
        m = task.metrics
        assert m["objective"] == "distill" and m["reward_auc"] == 1.0, m
        assert m["teaching"]["prompts"] == 4 and m["teaching"]["blocks"] >= 4
        assert m["distill"]["replies"] == 4 and m["distill"]["steps"] >= 1
        assert m["distill"]["loss_last_epoch"] < m["distill"]["loss_first_epoch"]  # it learned the teacher's text
        gain = m["candidate"]["reward"] - m["in_service"]["reward"]
        assert (task.status == "promoted") == (gain >= 0.02), (task.status, task.reason)  # the gate's rule
        stored = await agent.store.reward_model(ann)
        assert stored is not None and stored.strength == float(m["steering_strength"])  # "inf" within max_kl 1000
    finally:
        await agent.close()


@pytest.mark.parametrize("objective", ["raft", "distill"])
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("learning_rate = 1e-9\n", "needs +0.02"),  # no change: its replies score no higher
        ("max_kl = 0.0001\n", "above max_kl"),  # moved too far from the base model
    ],
)
async def test_reward_trained_candidates_that_score_lower_or_lose_fluency_are_rejected(
    make_config: Callable[..., Config], tiny_model_dir: Path, extra: str, expected: str, objective: str
) -> None:
    text = f'objective = "{objective}"\nsamples = 2\nsample_prompts = 3\nmin_spread = 0.0\nlayers = 1\n'
    base = training_text(tiny_model_dir, text)
    config = make_config(base.replace("learning_rate = 0.05\n", "") + extra)
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        (task,) = (await agent.training.run()).tasks
        assert task.status == "rejected" and expected in task.reason, task.reason
        assert await TrainingRecords(agent.store.db).active(task.user_id) is None
    finally:
        await agent.close()


async def test_steering_and_distilling_on_the_real_smollm2(make_config: Callable[..., Config]) -> None:
    """The distill night on the real SmolLM2: the user's reward model steers real replies a
    sentence at a time through the batching engine, a LoRA on the top layers trains a few
    steps on them, and the gate decides on what both models generate."""
    config = make_config(
        f'[llm]\ntemperature = 0.0\nmax_new_tokens = 24\n[llm.local]\ncache_dir = "{MODEL_CACHE}"\n'
        "[training]\nmin_new_rated = 6\nmin_population_liked = 1000\nepochs = 1\nbatch_size = 4\nthreads = 2\n"
        'objective = "distill"\nsample_prompts = 3\nlayers = 2\n'
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
    assert task.status in ("promoted", "rejected") and m["objective"] == "distill", task.reason
    assert m["reward_auc"] == 1.0 and m["teaching"]["prompts"] == 3 and max(steps) >= 1
    assert m["teaching"]["blocks"] > 3  # real replies of several sentences, each chosen among candidates
    assert m["teaching"]["kept_score"] >= m["teaching"]["mean_score"]  # the steering kept the better sentences
    assert m["heldout"]["prompts"] >= 1 and m["candidate"]["kl_to_base"] > 0
