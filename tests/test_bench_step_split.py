"""bench/step_split.py: each part of a decode step counts only its own time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.step_split import StepSplit, line

pytestmark = pytest.mark.no_database


def test_a_part_inside_another_counts_for_itself_and_the_timers_cost_comes_off_the_rest() -> None:
    now = [0.0]

    def spend(seconds: float) -> None:
        now[0] += seconds

    split = StepSplit(clock=lambda: now[0])
    matmul = split.timed(lambda: spend(0.004), "matmuls")

    def attention() -> None:
        spend(0.001)
        matmul()  # a projection inside the attention
        spend(0.0005)

    timed_attention = split.timed(attention, "attention")
    processors = split.timed(lambda: spend(0.002), "processors")

    class Engine:
        _rows = (object(), object())
        decoder = SimpleNamespace(attend=None)  # no compiled step: the parts are timed from Python

    def step(engine: Engine) -> None:
        timed_attention()
        matmul()
        processors()
        spend(0.003)  # norms, Python

    timed_step = split.step(step)
    timed_step(Engine())
    timed_step(Engine())
    matmul()  # outside a step (a prompt being read): not counted
    split.call_cost_s = 0.0001
    ms = split.ms_per_step(2)
    assert ms is not None and ms["steps"] == 2
    assert ms["matmuls"] == pytest.approx(8.0) and ms["attention"] == pytest.approx(1.5)
    assert ms["processors"] == pytest.approx(2.0) and ms["adapters"] == 0.0
    assert ms["total"] == pytest.approx(14.5 - 4 * 0.1)  # four timed calls a step, 0.1 ms each, taken off
    assert ms["rest"] == pytest.approx(ms["total"] - 11.5)
    assert split.ms_per_step(1) is None
    assert line(2, ms).startswith("step at 2 rows: 14.10 ms = matmuls 8.00 (57%)")


def test_a_compiled_steps_own_timing_is_read_after_each_step() -> None:
    now = [0.0]
    split = StepSplit(clock=lambda: now[0])
    processors = split.timed(lambda: now.__setitem__(0, now[0] + 0.001), "processors")

    class Compiled:
        """decode_step's counters: matmuls, attention, adapters, rest, reset when read."""

        def __init__(self) -> None:
            self.on = False
            self.read: list[float] = [0.0] * 4

        def step_timing(self, on: bool) -> list[float]:
            out, self.read, self.on = self.read, [0.0] * 4, on
            return out

    compiled = Compiled()

    class Engine:
        _rows = (object(),)
        decoder = SimpleNamespace(attend=compiled)

    def step(engine: Engine) -> None:
        assert compiled.on  # the compiled step times itself only while a step is split
        compiled.read = [0.006, 0.0005, 0.0007, 0.0004]  # what one decode_step reports
        now[0] += 0.0088
        processors()

    split.step(step)(Engine())
    ms = split.ms_per_step(1)
    assert ms is not None
    assert ms["matmuls"] == pytest.approx(6.0) and ms["attention"] == pytest.approx(0.5)
    assert ms["adapters"] == pytest.approx(0.7) and ms["processors"] == pytest.approx(1.0)
    assert ms["total"] == pytest.approx(9.8) and ms["rest"] == pytest.approx(9.8 - 8.2)


def test_the_timers_are_on_the_engine_only_while_splitting() -> None:
    from agent_core.llm import batching, decoder
    from bench.step_split import splitting

    before = (batching.BatchingEngine._step, batching.BatchingEngine._pick, decoder._Dense.run)
    with splitting() as split:
        assert batching.BatchingEngine._step is not before[0] and decoder._Dense.run is not before[2]
        assert split.call_cost_s > 0
    assert (batching.BatchingEngine._step, batching.BatchingEngine._pick, decoder._Dense.run) == before
