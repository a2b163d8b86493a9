"""The local model's threads follow the cores this process may use: affinity and cgroup quota."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_core.llm import cpu


def test_threads_follow_the_affinity_mask_and_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "CGROUP_V1", (tmp_path / "none", tmp_path / "none"))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "CGROUP_V2", quota)
    assert cpu.available_cores() == 4  # no cgroup file: the affinity mask
    quota.write_text("max 100000\n")
    assert cpu.available_cores() == 4  # no quota
    quota.write_text("150000 100000\n")
    assert cpu.cgroup_quota() == 1.5 and cpu.available_cores() == 2  # 1.5 CPUs: 2 threads
    quota.write_text("800000 100000\n")
    assert cpu.available_cores() == 4  # a quota above the mask: the mask
    quota.write_text("garbage")
    assert cpu.available_cores() == 4


def _drive(tuner: cpu.ThreadTuner, threads: list[int], step_ms: Callable[[int], float], steps: int) -> list[int]:
    """Feed ``steps`` decode steps of one row whose time depends on the thread count in
    effect (``threads[-1]``, as ``set_threads`` leaves it); the counts each step ran on."""
    used = []
    for _ in range(steps):
        used.append(threads[-1])
        tuner.stepped(1, step_ms(threads[-1]) / 1000)
    return used


def test_decoding_moves_to_fewer_threads_while_another_process_takes_a_core_and_back_after() -> None:
    threads = [2]
    tuner = cpu.ThreadTuner(2, threads.append)
    assert tuner.options == [2, 1]
    quiet = {2: 30.0, 1: 40.0}  # ms a step: two threads are faster on an idle machine
    busy = {2: 120.0, 1: 42.0}  # one core taken: two threads wait for each other
    used = _drive(tuner, threads, quiet.__getitem__, 2000)
    assert tuner.current == 2 and used.count(1) / len(used) < 0.02  # trials cost little when nothing changes
    used = _drive(tuner, threads, busy.__getitem__, 200)
    assert tuner.current == 1 and used[40:].count(2) / len(used[40:]) < 0.1  # within a few dozen steps
    used = _drive(tuner, threads, quiet.__getitem__, 1000)
    assert tuner.current == 2 and used[-200:].count(2) / 200 > 0.9  # and back once the core is free


def test_a_trial_across_a_change_of_batch_size_decides_nothing() -> None:
    threads = [4]
    tuner = cpu.ThreadTuner(4, threads.append, period=4, trial=2)
    assert tuner.options == [4, 3, 2]
    for _ in range(4):
        tuner.stepped(1, 0.010)
    assert threads == [4, 3]  # the trial of 3 threads begins
    for rows in (1, 2, 2):  # one step to settle, then two of 2 rows: far faster, but not like the 1-row steps
        tuner.stepped(rows, 0.001)
    assert threads == [4, 3, 4] and tuner.current == 4


def test_a_thread_that_lowers_its_priority_leaves_the_others_and_hands_it_to_its_children() -> None:
    import os
    import subprocess
    import threading

    seen: dict[str, int] = {}

    def background() -> None:
        cpu.lower_priority(5)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = subprocess.run(["sh", "-c", "cut -d' ' -f19 /proc/self/stat"], capture_output=True, text=True)
        seen["child"] = int(child.stdout)  # the nice value of a process it starts (a compiler)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen["thread"] == min(19, before + 5) and seen["child"] == seen["thread"]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread is untouched
