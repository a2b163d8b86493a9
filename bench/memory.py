"""Memory that helps: what users tell the bot comes back when it matters, and only then.

Simulated users (bench/memory_script.py, where the matching rule is written down) each
send about 100 messages through a real :class:`~agent_core.agent.Agent` on SQLite,
stating facts in passing, some with "remember that" or /remember, some corrected later;
then they ask ``direct`` questions about a fact, ``meaning`` questions that need a fact
but share no word with it, and questions that need ``none``. Everyday messages get a
canned reply (no model); a sample of the questions (``--replies`` per kind) is answered
by the default local model, as the bot answers them but as the first message of a
conversation (the canned replies left out of its prompt: the small model would copy them).

Arms, in one run, each on its own database:

- ``attune``: memory as it ships (facts kept without asking, recall by meaning and keywords);
- ``keywords``: the same with recall by keywords alone (``[memory] embeddings = false``);
- ``baseline``: memory before this change: only "remember that" and /remember notes, kept as
  written, recalled by keywords and then the newest;
- ``smollm2_states``: attune with the local model's own states (mean-pooled last hidden
  layer of SmolLM2-135M) in place of all-MiniLM-L6-v2 for meaning (recall figures only),
  the alternative the embedding model was measured against.

Figures per arm: ``capture`` (the share of stated facts kept, with corrections applied),
``recall_at_prompt`` (the needed note is among those recalled for the prompt) on direct
and meaning questions, ``leak_rate`` (any note recalled for a question that needs none),
``fact_in_reply`` (the reply on the default model contains the fact), ``note_leak_in_reply``
(a reply contains another of the user's facts), ``spurious_notes`` (notes per user that
hold no stated fact) and the milliseconds per message that memory adds (extraction,
embedding, storing and recall).

    python -m bench.memory [--users 12] [--replies 8] [--seed 0] [--arms attune,keywords,baseline,smollm2_states]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.agent import Agent
from agent_core.config import AgentSettings
from agent_core.events import Message
from agent_core.llm import GenerationRequest, LLMBackend, base_model_dir, create_backend
from agent_core.memory import Handled, Recalled
from agent_core.memory.facts import explicit_note
from agent_core.memory.recall import KIND_QUESTIONS
from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent
from bench import report
from bench.memory_script import User, contains, current_keys, make_user

ARMS = ("attune", "keywords", "baseline", "smollm2_states")
KINDS = ("direct", "meaning", "none")
GOALS = {"capture": 0.90, "recall_at_prompt.direct": 0.90, "recall_at_prompt.meaning": 0.75, "leak_rate": 0.05,
         "note_leak_in_reply": 0.05, "fact_in_reply.direct": 0.70, "ms_per_message": 20.0}  # fmt: skip
CANNED = "Sure, happy to help with that."


class Switch(LLMBackend):
    """The canned reply for everyday messages, the real model for the sampled questions."""

    def __init__(self, real: LLMBackend | None) -> None:
        self.fake = RecordingBackend(lambda r: CANNED, record=False)
        self.real = real
        self.use_real = False
        self.context_window = real.context_window if real else 2048
        self.message_overhead = real.message_overhead if real else 4

    async def start(self) -> None:
        await self.fake.start()

    async def close(self) -> None:
        await self.fake.close()

    def count_tokens(self, text: str) -> int:
        return self.real.count_tokens(text) if self.real else len(text.split())

    @property
    def continues(self) -> bool:
        return bool(self.use_real and self.real and self.real.continues)

    def describe(self) -> str:
        return self.real.describe() if self.real else "canned"

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if not (self.use_real and self.real):
            async for piece in self.fake.stream(request):
                yield piece
            return
        # The question as the first of a conversation: the system prompt (with the notes
        # recalled) and the question. The canned everyday replies stay out, or the small
        # model copies them instead of answering.
        fresh = dataclasses.replace(request, messages=[request.messages[0], request.messages[-1]])
        async for piece in self.real.stream(fresh):
            yield piece


class TodaysMemory:
    """Memory before this change: "remember that ..." kept as written; recall by keywords, then the newest."""

    def __init__(self, agent: Agent) -> None:
        self.store = agent.store
        self.cap = agent.settings.agent.memory_notes

    async def recall(self, user_id: int, text: str, chat_kind: str = "private") -> Recalled:
        notes = await self.store.note_candidates(user_id, text)
        ranked = [n.text for n in notes if n.keyword] + [n.text for n in notes]
        return Recalled(list(dict.fromkeys(ranked))[: self.cap])

    async def take(self, user_id: int, text: str, chat_kind: str = "private", *, now: float | None = None) -> Handled:
        if (asked := explicit_note(text)) is not None:
            await self.store.add_memory(user_id, asked[0])
        return Handled()

    async def close(self) -> None:
        return None


class StatesEmbedder:
    """SmolLM2-135M's last hidden states, mean-pooled and normalized, with the Embedder's interface."""

    def __init__(self, directory: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        # the causal LM as saved (its input embeddings are tied to lm_head), then its decoder stack
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).model.eval()
        self.ready = True

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    async def aembed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts)


async def run_arm(arm: str, users: list[User], sampled: set[tuple[int, int]], real: LLMBackend | None,
                  states: StatesEmbedder | None, threshold: float) -> dict[str, Any]:  # fmt: skip
    """Every user's conversation through one Agent; the figures of this arm."""
    extra = {"keywords": "[memory]\nembeddings = false\n", "baseline": "[memory]\nembeddings = false\n"}.get(arm, "")
    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{arm}-") as tmp:
        path = Path(tmp) / "attune.toml"
        limits = (f"[agent]\nmemory_threshold = {threshold}\n"  # and simulated users type fast
                  "[limits]\nmessages_per_minute = 100000\nglobal_messages_per_minute = 0\n")  # fmt: skip
        path.write_text(f'[storage]\ndata_dir = "{Path(tmp) / "data"}"\n{limits}{extra}', encoding="utf-8")
        switch = Switch(real)
        agent = await open_agent(load_config(path, environ={}), llm=switch)
        await switch.start()
        if arm == "baseline":
            agent.memory = TodaysMemory(agent)  # type: ignore[assignment]
            agent.commands.memory = None  # /remember as before: the note as written
        elif arm == "smollm2_states" and states is not None:
            agent.memory.embedder = states  # type: ignore[assignment]
            agent.memory._kinds = {k: states.embed(list(q)) for k, q in KIND_QUESTIONS.items()}
        else:
            await (agent.memory.start() or asyncio.sleep(0))
        memory = agent.memory
        spent: list[float] = []
        recalled: dict[int, Recalled] = {}
        original_recall, original_take = memory.recall, memory.take

        async def recall(user_id: int, text: str, chat_kind: str = "private") -> Recalled:
            started = time.perf_counter()
            notes = await original_recall(user_id, text, chat_kind)
            spent.append(time.perf_counter() - started)
            recalled[user_id] = notes
            return notes

        async def take(user_id: int, text: str, chat_kind: str = "private", *, now: float | None = None) -> Handled:
            started = time.perf_counter()
            handled = await original_take(user_id, text, chat_kind, now=now)
            spent[-1] += time.perf_counter() - started  # the same message's recall and take
            return handled

        memory.recall, memory.take = recall, take  # type: ignore[method-assign]
        questions: list[dict[str, Any]] = []
        captured: list[dict[str, Any]] = []
        spurious: list[int] = []
        try:
            for u, user in enumerate(users):
                corrected: set[int] = set()
                for t, turn in enumerate(user.turns):
                    real_reply = (u, t) in sampled and real is not None
                    switch.use_real = real_reply
                    reply = await agent.handle_message(Message(
                        platform="bench", chat_id=user.name, sender_id=user.name, sender_name=user.name.title(),
                        text=turn.text, message_id=f"{u}-{t}", event_id=f"{u}-{t}"))  # fmt: skip
                    switch.use_real = False
                    if reply is None or reply.kind == "notice":
                        raise RuntimeError(f"{arm}: message {turn.text!r} was not answered: {reply}")
                    if turn.kind == "correction":
                        corrected.update(turn.facts)
                    if turn.kind not in KINDS:
                        continue
                    user_id = await agent.store.resolve_user("bench", user.name)
                    got = recalled.pop(user_id, Recalled([]))
                    notes = got.notes
                    needed = [current_keys(user.facts[i], i in corrected) for i in turn.facts]
                    others = [current_keys(f, i in corrected) for i, f in enumerate(user.facts) if i not in turn.facts]
                    weights: list[tuple[float, Any]] = []
                    if hasattr(memory, "weigh"):  # every note's relevance, for the threshold-free figures
                        weights = (await memory.weigh(user_id, turn.text))[0]
                    entry: dict[str, Any] = {
                        "user": u, "kind": turn.kind, "question": turn.text,
                        "recalled": bool(needed) and all(any(contains(n, k) for n in notes) for k in needed),
                        "any_note": bool(notes), "notes": notes, "lead": got.lead,
                        "needed_score": min((max((w for w, c in weights if contains(c.text, k)), default=0.0)
                                             for k in needed), default=None) if weights else None,
                        "best_score": max((w for w, _ in weights), default=0.0) if weights else None,
                    }  # fmt: skip
                    if real_reply and reply is not None:
                        entry["reply"] = reply.text
                        entry["fact_in_reply"] = bool(needed) and all(contains(reply.text, k) for k in needed)
                        entry["other_fact_in_reply"] = any(contains(reply.text, k) for k in others)
                    questions.append(entry)
                user_id = await agent.store.resolve_user("bench", user.name)
                kept = [n.text for n in await agent.store.list_memories(user_id)]
                for i, fact in enumerate(user.facts):
                    keys = current_keys(fact, i in corrected)
                    stale = i in corrected and any(contains(n, fact.old_keys) for n in kept)
                    style = next(t.text for t in user.turns if t.kind == "statement" and i in t.facts)
                    captured.append({"user": u, "kind": fact.kind, "kept": any(contains(n, keys) for n in kept)
                                     and not stale, "corrected": i in corrected, "said": style})  # fmt: skip
                facts_keys = [current_keys(f, i in corrected) for i, f in enumerate(user.facts)]
                spurious.append(sum(1 for n in kept if not any(contains(n, k) for k in facts_keys)))
                print(f"  {arm}: {user.name} done ({len(kept)} notes)", file=sys.stderr, flush=True)
        finally:
            await agent.close()
    return summarize(questions, captured, spurious, spent)


def summarize(questions: list[dict[str, Any]], captured: list[dict[str, Any]], spurious: list[int],
              spent: list[float]) -> dict[str, Any]:  # fmt: skip
    def share(rows: list[dict[str, Any]], key: str) -> float | None:
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    by_kind = {k: [q for q in questions if q["kind"] == k] for k in KINDS}
    negatives = sorted(q["best_score"] for q in by_kind["none"] if q["best_score"] is not None)
    at_5 = negatives[min(len(negatives) - 1, int(0.95 * len(negatives)))] if negatives else 0.0

    def separation(kind: str) -> dict[str, float | None]:
        """Threshold-free: how often the needed note outscores every note of a question that
        needs none (AUC), and the share recalled at the threshold that leaks on 5 % of those."""
        positives = [q["needed_score"] for q in by_kind[kind] if q["needed_score"] is not None]
        if not positives or not negatives:
            return {"auc": None, "recall_at_leak_5": None}
        wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
        return {"auc": wins / (len(positives) * len(negatives)),
                "recall_at_leak_5": sum(p > at_5 for p in positives) / len(positives)}  # fmt: skip

    replied = [q for q in questions if "reply" in q]
    ms = sorted(s * 1000 for s in spent)
    return {
        "capture": share(captured, "kept"),
        "capture_corrected": share([c for c in captured if c["corrected"]], "kept"),
        "recall_at_prompt": {k: share(by_kind[k], "recalled") for k in ("direct", "meaning")},
        "leak_rate": share(by_kind["none"], "any_note"),
        "separation": {k: separation(k) for k in ("direct", "meaning")},
        "fact_in_reply": {
            k: share([q for q in by_kind[k] if "reply" in q], "fact_in_reply") for k in ("direct", "meaning")
        },
        "note_leak_in_reply": share(replied, "other_fact_in_reply"),
        "spurious_notes_per_user": statistics.mean(spurious) if spurious else None,
        "ms_per_message": statistics.mean(ms) if ms else None,
        "ms_per_message_p95": ms[int(0.95 * (len(ms) - 1))] if ms else None,
        "messages": len(ms),
        "questions": {k: len(v) for k, v in by_kind.items()},
        "replies": len(replied),
        "missed_captures": [c for c in captured if not c["kept"]],
        "missed_recalls": [
            {k: q[k] for k in ("user", "kind", "question", "notes")}
            for q in questions
            if q["kind"] != "none" and not q["recalled"]
        ],
        "leaks": [{k: q[k] for k in ("user", "question", "notes")} for q in by_kind["none"] if q["any_note"]],
        "examples": [q for q in questions if "reply" in q][:30],
    }


def sample_questions(users: list[User], per_kind: int) -> set[tuple[int, int]]:
    """The questions the real model answers: the first ``per_kind`` of each kind, across users in turn."""
    chosen: set[tuple[int, int]] = set()
    counts: dict[str, int] = defaultdict(int)
    for t in range(max(len(u.turns) for u in users)):
        for u, user in enumerate(users):
            if t < len(user.turns) and (kind := user.turns[t].kind) in KINDS and counts[kind] < per_kind:
                counts[kind] += 1
                chosen.add((u, t))
    return chosen


async def run(args: argparse.Namespace) -> dict[str, Any]:
    users = [make_user(i, args.seed, messages=args.messages) for i in range(args.users)]
    sampled = sample_questions(users, args.replies) if args.replies else set()
    real: LLMBackend | None = None
    states: StatesEmbedder | None = None
    config = load_config(None, environ={"ATTUNE_LLM__LOCAL__CACHE_DIR": str(Path(args.cache_dir).resolve()),
                                        "ATTUNE_LLM__LOCAL__MODEL": args.model})  # fmt: skip
    if args.replies or "smollm2_states" in args.arms:
        real = create_backend(config)
        await real.start()
    if "smollm2_states" in args.arms:
        states = StatesEmbedder(base_model_dir(config.settings))
    results: dict[str, Any] = {}
    try:
        for arm in args.arms:
            started = time.perf_counter()
            use = real if args.replies and arm != "smollm2_states" else None
            results[arm] = await run_arm(arm, users, sampled if use else set(), use, states, args.threshold)
            results[arm]["seconds"] = time.perf_counter() - started
    finally:
        if real is not None:
            await real.close()
    attune = results.get("attune", {})
    goals = {}
    if attune:
        values = {"capture": attune["capture"], "recall_at_prompt.direct": attune["recall_at_prompt"]["direct"],
                  "recall_at_prompt.meaning": attune["recall_at_prompt"]["meaning"],
                  "leak_rate": attune["leak_rate"], "note_leak_in_reply": attune["note_leak_in_reply"],
                  "fact_in_reply.direct": attune["fact_in_reply"]["direct"],
                  "ms_per_message": attune["ms_per_message"]}  # fmt: skip
        lower_is_better = {"leak_rate", "note_leak_in_reply", "ms_per_message"}
        goals = {
            k: {"goal": g, "value": values[k],
                "met": values[k] is not None and (values[k] <= g if k in lower_is_better else values[k] >= g)}
            for k, g in GOALS.items()
        }  # fmt: skip
    return {"arms": results, "goals": goals, "users": args.users, "seed": args.seed,
            "model": real.describe() if real else None}  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=12, help="simulated users")
    parser.add_argument("--messages", type=int, default=100, help="messages per user before the questions")
    parser.add_argument("--replies", type=int, default=8, help="questions of each kind the real model answers, per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=AgentSettings().memory_threshold,
                        help="[agent] memory_threshold for the arms")  # fmt: skip
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--model", default="smollm2", help="the local model that answers the sampled questions")
    parser.add_argument("--cache-dir", default="data/models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms: {', '.join(sorted(unknown))}")
    data = asyncio.run(run(args))
    print(f"memory: {args.users} users, seed {args.seed}, replies on {data['model'] or '(none)'}")
    rows = [[arm, _pct(r["capture"]), _pct(r["recall_at_prompt"]["direct"]), _pct(r["recall_at_prompt"]["meaning"]),
             _pct(r["leak_rate"]), _pct(r["fact_in_reply"]["direct"]), _pct(r["fact_in_reply"]["meaning"]),
             _pct(r["note_leak_in_reply"]), f"{r['spurious_notes_per_user']:.2f}", f"{r['ms_per_message']:.1f}",
             f"{r['ms_per_message_p95']:.1f}"] for arm, r in data["arms"].items()]  # fmt: skip
    print(report.table(["arm", "capture", "recall direct", "recall meaning", "leak (none)", "fact in reply direct",
                        "fact in reply meaning", "note leak in reply", "spurious notes/user", "ms/msg",
                        "ms/msg p95"], rows))  # fmt: skip
    sep = [[arm, _pct(r["separation"]["direct"]["auc"]), _pct(r["separation"]["meaning"]["auc"]),
            _pct(r["separation"]["meaning"]["recall_at_leak_5"])]
           for arm, r in data["arms"].items() if r["separation"]["meaning"]["auc"] is not None]  # fmt: skip
    if sep:
        print("relevance without a threshold: AUC of the needed note against the best note of a question needing none")
        print(report.table(["arm", "AUC direct", "AUC meaning", "meaning recalled at 5 % leak"], sep))
    for key, goal in data["goals"].items():
        print(f"  goal {key}: {goal['value']} vs {goal['goal']}: {'met' if goal['met'] else 'NOT met'}")
    data["params"] = {**vars(args), "json": str(args.json) if args.json else None}
    path = report.save("memory", data)
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
