"""The training process: ``python -m agent_core.training.worker SPEC.json``, or
:func:`run` called in a Ray task (agent_core/training/executors.py).

It trains the tasks of one night in order (the population adapter first, then each
user's on top of it), judges each candidate against the adapter in service on held-out
feedback, and prints one JSON object per line on stdout for the job in the bot's
process to record: ``start``, ``step``, ``result`` or ``error`` per task. It never
touches the database. A candidate is written to a temporary folder and renamed into
place only when complete, so a kill at any moment leaves every served adapter as it was.

The spec (written by :mod:`agent_core.training.job`)::

    {"model_dir": ..., "threads": 1, "seed": 0, "training": {<[training] settings>},
     "population_in_service": path | null,
     "tasks": [{"name": "population" | "user-12", "user_id": null | 12,
                "train": path, "heldout": path, "out_dir": path,
                "in_service": path | null}]}

A user task starts from the population adapter in service once the population task
has run (the new one if it was promoted), and, without an adapter of its own, is
judged against that population adapter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent_core import reward_model
from agent_core.llm.base import AdapterRef, ChatMessage
from agent_core.reward_model import RewardModel
from agent_core.style import Style
from agent_core.training import distill
from agent_core.training.dataset import DATA_KEY_ENV, Example, read_examples, with_weights
from agent_core.training.evaluate import Decision, gate, measures, reward_gate, score
from agent_core.training.sampling import Ranked, Sampler, rank, requests
from storage.crypto import Key

Emit = Callable[[dict[str, Any]], None]
_emit: Emit = print  # where events go: set by run()


def emit(event: str, task: str, **fields: Any) -> None:
    _emit({"event": event, "task": task, **fields})


def main(argv: list[str]) -> int:
    events = sys.stdout
    sys.stdout = sys.stderr  # libraries print progress and logs: keep stdout for events only
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    return run(spec, os.environ[DATA_KEY_ENV], lambda e: print(json.dumps(e), file=events, flush=True))


def run(spec: dict[str, Any], data_key: str, events: Emit) -> int:
    """Train the spec's tasks in order, sending each event to ``events``."""
    global _emit
    _emit = events
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    population = spec.get("population_in_service")
    for task in spec["tasks"]:
        try:
            if task["user_id"] is None:
                decision, path = train_task(spec, task, data_key, init=population, in_service=task["in_service"])
                if decision.promote:
                    population = path
            else:
                train_task(spec, task, data_key, init=population, in_service=task["in_service"] or population)
        except Exception as exc:  # one user's failure does not stop the others
            emit("error", task["name"], error=f"{type(exc).__name__}: {exc}")
    return 0


def train_task(
    spec: dict[str, Any], task: dict[str, Any], data_key_text: str, *, init: str | None, in_service: str | None
) -> tuple[Decision, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    settings = spec["training"]
    set_seed(int(spec["seed"]))  # before the LoRA weights are drawn: the same data gives the same adapter
    started = time.monotonic()
    data_key = Key.from_text(data_key_text, DATA_KEY_ENV)
    train = read_examples(Path(task["train"]), data_key)
    heldout = read_examples(Path(task["heldout"]), data_key)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model = peft_model(base, settings, init)
    out_dir = Path(task["out_dir"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    objective = "sft" if task["user_id"] is None else settings["objective"]
    by_reward = objective in reward_model.OBJECTIVES
    if objective == "distill":  # a fresh adapter on the top layers: the student of the steered teacher
        model = peft_model(base, settings, None)
    sampler = _sampler(spec, rows=int(spec.get("steering", {}).get("candidates", 4))) if by_reward else None
    max_new = int(spec.get("serving", {}).get("max_new_tokens", 160))  # as the bot generates replies
    try:
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-") as scratch:
            staged = Path(scratch) / "adapter"
            extra: dict[str, Any] = {}
            if sampler is not None:
                reward = RewardModel(np.load(task["reward_model"]), len(train))
                serving = AdapterRef("in-service", in_service) if in_service else None
                if objective == "distill":
                    extra = _distill(model, tokenizer, sampler, reward, train, spec, task["name"], max_new)
                else:
                    ranked, extra = _sample(sampler, reward, train, serving, settings, int(spec["seed"]), max_new)
                    fit_by_reward(model, tokenizer, ranked, train, objective, settings, int(spec["seed"]),
                                  task["name"], Path(scratch))  # fmt: skip
            else:
                fit(model, tokenizer, train, objective, settings, int(spec["seed"]), task["name"], Path(scratch))
            train_seconds = time.monotonic() - started
            model.eval()
            if sampler is not None:
                model.save_pretrained(staged)
                _reconfigure_for_serving(staged)
                metrics = _judge_by_reward(model, tokenizer, sampler, reward, staged, serving, heldout, settings,
                                           int(spec["seed"]), max_new)  # fmt: skip
                metrics["reward_auc"] = task.get("reward_auc")
                decision = reward_gate(metrics["candidate"]["reward"], metrics["in_service"]["reward"],
                                       metrics["candidate"]["kl_to_base"], task.get("reward_auc"),
                                       margin=float(settings["margin"]), max_kl=float(settings["max_kl"]))  # fmt: skip
            else:
                metrics = _judge(model, tokenizer, heldout, in_service, settings)
                decision = gate(metrics["candidate"], metrics["in_service"], float(settings["margin"]))
            metrics.update(extra)
            metrics.update(train_seconds=round(train_seconds, 2), objective=objective, train_examples=len(train),
                           worker=f"{socket.gethostname()}:{os.getpid()}")  # fmt: skip
            if task.get("candidate_dir") and staged.exists():  # a benchmark measures rejected candidates too
                shutil.copytree(staged, task["candidate_dir"], dirs_exist_ok=True)
            if decision.promote:
                if not staged.exists():
                    model.save_pretrained(staged)
                    _reconfigure_for_serving(staged)
                os.replace(staged, out_dir)  # atomic: the folder appears complete or not at all
    finally:
        if sampler is not None:
            sampler.close()
    metrics["seconds"] = round(time.monotonic() - started, 2)
    emit("result", task["name"], promote=decision.promote, reason=decision.reason, metrics=metrics,
         path=str(out_dir) if decision.promote else None)  # fmt: skip
    return decision, str(out_dir)


def _sampler(spec: dict[str, Any], rows: int = 1) -> Sampler:
    """The batching engine of the training process; ``rows`` per reply (a steered one's candidates)."""
    serving = spec.get("serving", {})
    return Sampler(spec["model_dir"], Path(spec.get("cache_dir") or Path(spec["model_dir"]).parent),
                   threads=int(spec["threads"]), repetition_penalty=float(serving.get("repetition_penalty", 1.1)),
                   no_repeat_ngram=int(serving.get("no_repeat_ngram", 4)),
                   style_control=bool(serving.get("style_control", True)), rows_per_reply=rows)  # fmt: skip


def _distill(
    model: Any, tokenizer: Any, sampler: Sampler, reward: RewardModel, train: list[Example], spec: dict[str, Any],
    name: str, max_new: int,
) -> dict[str, Any]:  # fmt: skip
    """distill: the teacher (the base, steered by the user's reward model, in the style the
    bot asked for) answers the user's newest prompts; the adapter learns its replies and
    its choices; the strength that keeps the steering within ``max_kl`` is measured."""
    settings, steer = spec["training"], spec.get("steering", {})
    prompts, asked = _prompts(train, int(settings["sample_prompts"]))
    lessons, teaching = distill.teach(
        sampler, reward, prompts, asked, candidates=int(steer.get("candidates", 4)),
        temperature=float(steer.get("temperature", 0.8)), top_k=int(steer.get("top_k", 50)), max_new_tokens=max_new,
        seed=int(spec["seed"]),
    )  # fmt: skip
    steps = max(1, (len(lessons) + sum(len(lesson.pairs()) for lesson in lessons)) // int(settings["batch_size"]))
    emit("start", name, steps=steps * int(settings["epochs"]))

    def progress(step: int, total: int, loss: float) -> None:
        emit("step", name, step=step, steps=total, loss=loss)

    trained = distill.distill(model, tokenizer, lessons, settings, int(spec["seed"]), progress)
    if float(settings.get("amplify", 1.0)) != 1.0:
        distill.amplify(model, float(settings["amplify"]))
    strength = distill.measure_strength(lessons, float(settings["max_kl"]))
    return {"teaching": teaching, "distill": trained, "steering_strength": "inf" if math.isinf(strength) else strength}


def _prompts(rows: list[Example], limit: int) -> tuple[list[list[ChatMessage]], list[Style | None]]:
    """The newest ``limit`` distinct prompts of ``rows``, oldest first, and the style the
    bot asked for with each (its reply was decoded to have it; None where not known)."""
    seen: dict[str, tuple[list[ChatMessage], Style | None]] = {}
    for e in reversed(rows):
        seen.setdefault(json.dumps(e.prompt, sort_keys=True), (e.prompt, _asked(e)))  # type: ignore[arg-type]
        if len(seen) == limit:
            break
    chosen = list(reversed(list(seen.values())))
    return [p for p, _ in chosen], [s for _, s in chosen]


def _asked(example: Example) -> Style | None:
    try:
        return Style.from_dict(example.style) if example.style else None
    except (KeyError, TypeError, ValueError):  # a style from an older vocabulary
        return None


def _sample(
    sampler: Sampler, reward: RewardModel, train: list[Example], serving: AdapterRef | None, settings: dict[str, Any],
    seed: int, max_new: int,
) -> tuple[list[Ranked], dict[str, Any]]:  # fmt: skip
    """The serving model's candidates for the user's newest prompts, ranked by their reward model."""
    started = time.monotonic()
    prompts, asked = _prompts(train, int(settings["sample_prompts"]))
    n = int(settings["samples"])
    batch = requests(prompts, asked, n, max_new_tokens=max_new, adapter=serving, seed=seed)
    ranked = rank(prompts, sampler.generate(batch), n, reward.score)
    best = [max(r.scores) for r in ranked]
    return ranked, {"sampling": {
        "prompts": len(prompts), "candidates": len(batch), "seconds": round(time.monotonic() - started, 2),
        "mean_reward": round(float(np.mean([s for r in ranked for s in r.scores])), 4) if ranked else None,
        "best_reward": round(float(np.mean(best)), 4) if best else None,
    }}  # fmt: skip


def _judge_by_reward(
    model: Any, tokenizer: Any, sampler: Sampler, reward: RewardModel, staged: Path, serving: AdapterRef | None,
    heldout: list[Example], settings: dict[str, Any], seed: int, max_new: int,
) -> dict[str, Any]:  # fmt: skip
    """The candidate and the adapter in service each answer the user's held-out prompts
    in the style the bot asked for with each (the same seeds); the reward model scores both, and the candidate's replies
    give its KL to the base model."""
    prompts, asked = _prompts(heldout, int(settings["sample_prompts"]))
    candidate = AdapterRef(f"candidate-{staged.parent.name}", str(staged))
    both = [requests(prompts, asked, 2, max_new_tokens=max_new, adapter=adapter, seed=seed + 1, vary_style=False)
            for adapter in (candidate, serving)]  # fmt: skip
    replies = sampler.generate(both[0] + both[1])  # in the same batches: each row has its own adapter
    mine, theirs = replies[: len(both[0])], replies[len(both[0]) :]
    rows = [Example(p, t, True, 1.0, 0.0, 0, 0) for p, t in zip([p for p in prompts for _ in range(2)], mine,
                                                                 strict=True)]  # fmt: skip
    max_length = int(settings["max_length"])
    own = score(model, tokenizer, rows, max_length=max_length)
    with model.disable_adapter():
        base = score(model, tokenizer, rows, max_length=max_length)
    tokens = sum(s.tokens for s in own)
    kl = sum(o.logp - b.logp for o, b in zip(own, base, strict=True)) / tokens if tokens else 0.0
    return {
        "heldout": {"prompts": len(prompts), "liked": sum(e.label for e in heldout),
                    "disliked": sum(not e.label for e in heldout)},
        "candidate": {"reward": float(np.mean(reward.score(mine))) if mine else 0.0, "kl_to_base": round(kl, 4)},
        "in_service": {"reward": float(np.mean(reward.score(theirs))) if theirs else 0.0},
    }  # fmt: skip


def fit_by_reward(
    model: Any, tokenizer: Any, ranked: list[Ranked], train: list[Example], objective: str, settings: dict[str, Any],
    seed: int, name: str, scratch: Path,
) -> None:  # fmt: skip
    """raft: SFT on the best candidate of each prompt and the replies the user liked;
    dpo: DPO on best against worst. Prompts whose candidates the reward model cannot
    tell apart (``min_spread``) teach nothing."""
    useful = [r for r in ranked if r.spread >= float(settings["min_spread"])]
    if objective == "raft":
        best = [Example(r.prompt, r.best, True, 1.0, 0.0, 0, 0) for r in useful]  # type: ignore[arg-type]
        fit(model, tokenizer, best + [e for e in train if e.label], "sft", settings, seed, name, scratch)
        return
    if not useful:
        raise ValueError("no sampled prompt with candidates the reward model tells apart")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def reply(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    dataset = Dataset.from_list([{"prompt": r.prompt, "chosen": reply(r.best), "rejected": reply(r.worst)}
                                 for r in useful])  # fmt: skip
    # keep_end: a long prompt loses its start (as the gate scores it), not the replies
    config = DPOConfig(**_common(settings, seed, scratch), beta=0.1, truncation_mode="keep_end")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[_progress(name)])  # fmt: skip
    _quiet(trainer).train()


def peft_model(base: Any, settings: dict[str, Any], init: str | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if init:  # continue from the population adapter: the user's adapter sits on top of it
        return PeftModel.from_pretrained(base, init, is_trainable=True)
    n = int(base.config.num_hidden_layers)
    top = int(settings.get("layers") or 0)
    config = LoraConfig(
        r=int(settings["rank"]),
        lora_alpha=int(settings["alpha"]),
        lora_dropout=float(settings["dropout"]),
        target_modules=list(settings["targets"]),
        # only the top layers: the backward pass stops below them (a step costs about half)
        layers_to_transform=list(range(n - top, n)) if 0 < top < n else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def _progress(name: str) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            emit("start", name, steps=state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                emit("step", name, step=state.global_step, steps=state.max_steps, loss=logs["loss"])

    return Progress()


def _quiet(trainer: Any) -> Any:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes out as events, not prints
    return trainer


def _common(settings: dict[str, Any], seed: int, scratch: Path) -> dict[str, Any]:
    """The trainer arguments every objective shares."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    return {
        "output_dir": str(scratch / "trainer"),
        "per_device_train_batch_size": int(settings["batch_size"]),
        "num_train_epochs": float(settings["epochs"]),
        "learning_rate": float(settings["learning_rate"]),
        "max_length": int(settings["max_length"]),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "seed": seed,
        "dataloader_num_workers": 0,
    }


def fit(
    model: Any, tokenizer: Any, train: list[Example], objective: str, settings: dict[str, Any], seed: int,
    name: str, scratch: Path,
) -> None:  # fmt: skip
    """Train the LoRA weights with TRL: SFT on liked replies, or KTO on liked and disliked."""
    from datasets import Dataset

    common = _common(settings, seed, scratch)
    completion = [{"role": "assistant", "content": ""}]

    def row(e: Example, **extra: Any) -> dict[str, Any]:
        return {"prompt": e.prompt, "completion": [{**completion[0], "content": e.completion}], **extra}

    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        rows = with_weights(train)
        liked = sum(r.weight for r in train if r.label)
        disliked = sum(r.weight for r in train if not r.label)
        if not liked or not disliked:
            objective = "sft"  # KTO needs both kinds; fall back to SFT on what there is
        else:
            dataset = Dataset.from_list([row(e, label=e.label) for e in rows])
            config = KTOConfig(**common, undesirable_weight=min(4.0, max(0.25, liked / disliked)))
            trainer: Any = KTOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                      callbacks=[_progress(name)])  # fmt: skip
            _quiet(trainer).train()
            return
    from trl import SFTConfig, SFTTrainer

    liked_rows = with_weights([e for e in train if e.label])
    if not liked_rows:
        raise ValueError("no liked replies to train on")
    dataset = Dataset.from_list([row(e) for e in liked_rows])
    config = SFTConfig(**common, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[_progress(name)])  # fmt: skip
    _quiet(trainer).train()


def _judge(
    model: Any, tokenizer: Any, heldout: list[Example], in_service: str | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """Held-out measures of the base model, the adapter in service and the candidate."""
    max_length = int(settings["max_length"])
    candidate = score(model, tokenizer, heldout, max_length=max_length)
    with model.disable_adapter():
        base = score(model, tokenizer, heldout, max_length=max_length)
    serving = base
    if in_service:
        model.load_adapter(in_service, adapter_name="in_service")
        model.set_adapter("in_service")
        serving = score(model, tokenizer, heldout, max_length=max_length)
        model.set_adapter("default")
        model.delete_adapter("in_service")
    return {
        "heldout": {"liked": sum(e.label for e in heldout), "disliked": sum(not e.label for e in heldout)},
        "base": measures(heldout, base, base),
        "in_service": measures(heldout, serving, base),
        "candidate": measures(heldout, candidate, base),
    }


def _reconfigure_for_serving(path: Path) -> None:
    """Mark the saved adapter for inference (peft writes inference_mode from the trainable copy)."""
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["inference_mode"] = True
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
