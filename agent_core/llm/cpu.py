"""The CPU this process may use, and how many threads to decode with on it.

- :func:`available_cores`: the cores this process may run on: its affinity mask, and
  the cgroup's CPU quota where one is set (a container limited to 1.5 CPUs gets 2
  threads, not the host's 64). The local model's threads default to it.
- :class:`ThreadTuner`: how many of those the batching engine decodes with, chosen by
  timing its own steps. When another process keeps a core busy, a step on every core
  waits for whichever thread the scheduler put aside, and OpenMP's threads spin
  meanwhile. Measured on 2 cores, single stream: 33 tokens/s quiet and 9-11 beside one
  busy process on 2 threads, 25 either way on 1 thread. Telling OpenMP to sleep instead
  of spinning (``OMP_WAIT_POLICY=PASSIVE``) kept 22-27 beside the busy process but cost
  a third quiet (23), so the engine keeps spinning threads and changes their number.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), as /proc/cpuinfo gives it where it can."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        name = names[0].split(":", 1)[1].strip() if names else name
    return name


def available_cores() -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_quota() -> float | None:
    """The CPUs the cgroup's quota allows (cgroup v2 ``cpu.max``, else v1's cfs quota), or None."""
    try:
        quota, period = CGROUP_V2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(p.read_text()) for p in CGROUP_V1)
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def lower_priority(nice: int = 10) -> None:
    """Run the calling thread, and the processes it starts (a compiler), ``nice`` steps
    below the rest of the process: on Linux the nice value is a thread's own and a child
    inherits it. Where that cannot be done, nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        who = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, who, min(19, os.getpriority(os.PRIO_PROCESS, who) + nice))


class ThreadTuner:
    """The decoding thread count, chosen by measuring: after ``period`` steps, another
    count (of ``options``) is tried for ``trial`` steps (after one step to settle: a new
    count starts a new team of threads), and it is kept if those steps at the same
    batch size were faster by ``gain`` than the last ones on the count in use. A trial
    that loses doubles the wait before the next (up to ``longest``), so a steady machine
    pays little for them; steps that turn half again as slow as the best seen on this
    count at that batch size (another process took a core) bring the next trial forward."""

    def __init__(self, most: int, set_threads: Callable[[int], None], *, period: int = 24, trial: int = 3,
                 gain: float = 0.05, longest: int = 768) -> None:  # fmt: skip
        self.options = sorted({most, max(1, most - 1), max(1, most // 2)}, reverse=True)
        self.current = most
        self.set_threads = set_threads
        self.period, self.trial, self.gain, self.longest = period, trial, gain, longest
        self._wait = period  # steps on the count in use before the next trial
        self._recent: deque[tuple[int, float]] = deque(maxlen=trial)  # (rows, seconds) on the count in use
        self._steps = 0
        self._testing: int | None = None
        self._tried: list[tuple[int, float]] = []
        self._next = 0  # which other option the next trial takes
        self._best: dict[int, float] = {}  # rows -> the fastest recent mean on the count in use

    def stepped(self, rows: int, seconds: float) -> None:
        """One decode step of ``rows`` rows took ``seconds``."""
        if self._testing is None:
            self._recent.append((rows, seconds))
            self._steps += 1
            if len(self._recent) == self.trial and all(r == rows for r, _ in self._recent):
                mean = sum(s for _, s in self._recent) / self.trial
                best = self._best.setdefault(rows, mean)
                self._best[rows] = min(best, mean)
                if mean > 1.5 * best:  # the machine changed: try another count soon
                    self._wait = min(self._wait, self._steps + 1)
            others = [n for n in self.options if n != self.current]
            if self._steps >= self._wait and others:
                self._testing = others[self._next % len(others)]
                self._next += 1
                self._tried = []
                self.set_threads(self._testing)
            return
        self._tried.append((rows, seconds))
        if len(self._tried) <= self.trial:
            return
        tried = self._tried[1:]  # the first step on a new count settles its threads
        same = [s for r, s in self._recent if r == tried[0][0]]
        comparable = same and all(r == tried[0][0] for r, _ in tried)
        if comparable and sum(s for _, s in tried) / len(tried) < (1 - self.gain) * sum(same) / len(same):
            log.debug("decoding on %d threads instead of %d: faster now", self._testing, self.current)
            self.current = self._testing
            self._wait = self.period
            self._best.clear()
        else:
            self._wait = min(2 * self._wait, self.longest)
        self._testing = None
        self._steps = 0
        self._recent.clear()
        self.set_threads(self.current)
