"""Where a decode step's time goes: matmuls, attention, adapters, logits processors, the rest.

While :func:`splitting` is active, each step of the batching engine
(``BatchingEngine._step``: the decoder's forward pass for every row, then the next token
of each) is timed, and so are its parts, each counting only its own time (a matmul
inside the attention counts as a matmul, not as attention):

- ``matmuls``: the base weights' products (``_Dense.run``: the projections and the LM head);
- ``attention``: the rest of ``BatchDecoder._attention`` (rotary, cache writes, scaled
  dot-product attention, reshapes);
- ``adapters``: the rows' own LoRA products (``BatchDecoder._lora``);
- ``processors``: the logits processors and the draw (``BatchingEngine._pick``: repetition
  penalty, style control, loop guard, warpers);
- ``rest``: everything else in the step (norms, the MLP's activation, embedding, Python
  between the parts), less the timing's own cost, which is measured first and taken off.

Where the decoder runs a step as one compiled call (``decode_step`` in
agent_core/llm/kernels.py), there is no Python between its parts to wrap: that call
times its own parts (matmuls, attention, adapters, and its rest, which stays in
``rest``) and they are read after each step.

Steps are grouped by their number of rows. The wrappers are only installed here, in the
benchmark: the engine itself carries no timing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from agent_core.llm import batching, decoder, kernels

PARTS = ("matmuls", "attention", "adapters", "processors")
TARGETS: list[tuple[Any, str, str]] = [
    (decoder._Dense, "run", "matmuls"),
    (decoder.BatchDecoder, "_attention", "attention"),
    (decoder.BatchDecoder, "_lora", "adapters"),
    (batching.BatchingEngine, "_pick", "processors"),
]


class StepSplit:
    """Per number of rows: steps, their total seconds, each part's own seconds and the
    number of timed calls (to take the timing's cost off)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.steps: defaultdict[int, int] = defaultdict(int)
        self.total: defaultdict[int, float] = defaultdict(float)
        self.parts: defaultdict[int, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: defaultdict[int, int] = defaultdict(int)
        self.call_cost_s = 0.0
        self._local = threading.local()

    def _stack(self) -> list[float]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
            self._local.rows = 0
        return self._local.stack  # type: ignore[no-any-return]

    def timed(self, function: Callable[..., Any], part: str) -> Callable[..., Any]:
        """``function``, its own time added to ``part`` when it runs inside a step."""

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            if not stack:  # outside a decode step (a prompt being read): not counted
                return function(*args, **kwargs)
            stack.append(0.0)
            started = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = self.clock() - started
                inner = stack.pop()
                rows = self._local.rows
                self.parts[rows][part] += elapsed - inner
                self.calls[rows] += 1
                stack[-1] += elapsed

        return wrapper

    def step(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(engine: Any, *args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            rows = len(engine._rows)
            self._local.rows = rows
            stack.append(0.0)
            compiled = engine.decoder.attend  # the compiled step, where the decoder uses it: it times itself
            if compiled is not None:
                compiled.step_timing(True)
            started = self.clock()
            try:
                return function(engine, *args, **kwargs)
            finally:
                self.total[rows] += self.clock() - started
                self.steps[rows] += 1
                stack.pop()
                if compiled is not None:
                    matmuls, attention, adapters, _ = compiled.step_timing(True)  # its own rest stays in rest
                    for part, seconds in (("matmuls", matmuls), ("attention", attention), ("adapters", adapters)):
                        self.parts[rows][part] += seconds

        return wrapper

    def measure_call_cost(self, calls: int = 20000) -> None:
        """The seconds one timed call adds, on this machine (taken off ``rest``)."""

        def nothing() -> None:
            return None

        timed = self.timed(nothing, "calibration")
        stack = self._stack()
        stack.append(0.0)
        self._local.rows = -1
        started = self.clock()
        for _ in range(calls):
            timed()
        with_timing = self.clock() - started
        started = self.clock()
        for _ in range(calls):
            nothing()
        plain = self.clock() - started
        stack.pop()
        self.call_cost_s = max(0.0, (with_timing - plain) / calls)
        self.parts.pop(-1, None)
        self.calls.pop(-1, None)

    def ms_per_step(self, rows: int) -> dict[str, float] | None:
        """Milliseconds per step at ``rows`` rows, by part, with ``rest`` and ``total``."""
        steps = self.steps.get(rows, 0)
        if not steps:
            return None
        total = self.total[rows] - self.calls[rows] * self.call_cost_s
        parts = {part: 1000 * self.parts[rows][part] / steps for part in PARTS}
        rest = max(0.0, 1000 * total / steps - sum(parts.values()))
        return {**parts, "rest": rest, "total": 1000 * total / steps, "steps": steps}


@contextlib.contextmanager
def splitting() -> Iterator[StepSplit]:
    """Time the batching engine's steps by part while the block runs."""
    split = StepSplit()
    split.measure_call_cost()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in TARGETS]
    saved.append((batching.BatchingEngine, "_step", batching.BatchingEngine._step))
    try:
        for owner, name, part in TARGETS:
            setattr(owner, name, split.timed(getattr(owner, name), part))
        batching.BatchingEngine._step = split.step(batching.BatchingEngine._step)  # type: ignore[method-assign]
        yield split
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        for compiled in kernels._loaded.values():
            if compiled is not None:
                compiled.step_timing(False)


def line(rows: int, ms: dict[str, float] | None) -> str:
    """``step at 1 row: 9.1 ms = matmuls 3.2, attention 1.9, adapters 0.8, processors 1.1, rest 2.1``"""
    if ms is None:
        return f"step at {rows} rows: not measured"
    parts = ", ".join(f"{part} {ms[part]:.2f} ({ms[part] / ms['total']:.0%})" for part in (*PARTS, "rest"))
    return f"step at {rows} row{'s' if rows != 1 else ''}: {ms['total']:.2f} ms = {parts}"
