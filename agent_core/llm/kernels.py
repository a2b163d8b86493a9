"""The matrix products of decoding, and which of them this machine runs fastest.

At batch 1 every new token reads every weight once, so decoding speed is memory
bandwidth, and which code reads the weights fastest depends on the CPU: on one AMD
EPYC a plain compiled loop (``gemv`` below: one weight row per dot product, rows split
across the threads, -O3 and vector instructions) read them nearly twice as fast as
oneDNN's packed fp32 path at 1 and 2 rows, and fell behind from 3; on an Intel Xeon
with AVX-512 the same engine was slower than plain ``F.linear``. So nothing here is
tuned for one CPU: the paths this machine has are timed on the model's own layers for
1, 2 and 8 rows (:func:`choose`), each checked against ``F.linear`` first, and the
fastest is kept per batch size. The choice is cached beside the model (``choice.json``
in the kernels folder) under the CPU, torch, the thread count and the layer shapes, so
it is measured once per machine.

The paths (:data:`PATHS`):

- ``gemv``: the compiled loop, built once with torch's extension builder (gcc and
  ninja, 25-45 s) into the model cache. A first start does not wait for it: decoding
  starts on the other paths, and the loop joins the choice once built. Where it cannot
  be built (no compiler, no AVX2), it is left out and that is said once.
- ``onednn``: oneDNN's fp32 matmul on weights packed once for it (where torch has it).
- ``linear``: plain ``F.linear``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent_core.llm.cpu import cpu_name

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>

// y[m, n] = dot(x[m], w[n]) (+ bias[n]) for x [M, K] and w [N, K], fp32 and contiguous.
// Each weight row is read from memory once and used for every row of x while in cache.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.scalar_type() == torch::kFloat && w.is_contiguous());
    const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // OpenMP directly: at::parallel_for compiled into an extension ran 4x slower here.
    // The thread count is the calling thread's (torch.set_num_threads on that thread).
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* row = wp + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xr = xp + m * K;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t k = 0; k < K; k++) acc += row[k] * xr[k];
            yp[m * N + n] = acc;
        }
    }
    if (bias.has_value()) y.add_(bias.value());
    return y;
}
"""

Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_loaded: dict[Path, Gemv | None] = {}
PATHS = ("gemv", "onednn", "linear")
ROWS = (1, 2, 8)  # the batch sizes timed; a batch uses the choice of the smallest of these it fits


def gemv(kernels_dir: Path) -> Gemv | None:
    """The compiled ``gemv(x, w, bias)``: loaded if it was built before (no compiler
    then), else built now under ``kernels_dir``; None (and one warning) if it cannot be
    built here."""
    if kernels_dir not in _loaded:
        _loaded[kernels_dir] = _load(kernels_dir) if built(kernels_dir) else _build(kernels_dir)
    return _loaded[kernels_dir]


def built(kernels_dir: Path) -> bool:
    """Whether ``gemv`` was built for this torch and this source under ``kernels_dir``."""
    return (_folder(kernels_dir) / f"{MODULE}.so").is_file()


MODULE = "attune_gemv"


def _flags() -> list[str] | None:
    """The compiler flags for this CPU; None where the loop would not be fast (no AVX2)."""
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        flags += ["-mavx2", "-mfma"]
    return flags


def _folder(kernels_dir: Path) -> Path:
    """One build folder per torch version and source: a build found there is one this
    process can load as it is (a cache copied from elsewhere or an older torch is not
    rebuilt in place on the start-up path)."""
    digest = hashlib.sha256(f"{SOURCE}{_flags()}{platform.machine()}".encode()).hexdigest()[:12]
    return kernels_dir / f"gemv-torch{torch.__version__}-{digest}"


def _load(kernels_dir: Path) -> Gemv | None:
    import importlib.util

    path = _folder(kernels_dir) / f"{MODULE}.so"
    try:
        spec = importlib.util.spec_from_file_location(MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.gemv  # type: ignore[no-any-return]
    except Exception as exc:  # a damaged file: build it again
        log.warning("could not load the decoding kernel %s (%s); building it again", path, exc)
        path.unlink(missing_ok=True)
        return _build(kernels_dir)


def _build(kernels_dir: Path) -> Gemv | None:
    import fcntl

    flags = _flags()
    if flags is None:
        log.warning("no AVX2 on this CPU: the compiled gemv is left out")
        return None
    folder = _folder(kernels_dir)
    try:
        from torch.utils.cpp_extension import load_inline

        _ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "attune.lock", "w") as held:
            # One build at a time, and a lock that dies with its process: torch's own
            # "lock" file stays behind when a build is killed and makes the next wait forever.
            fcntl.flock(held, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            if not (folder / f"{MODULE}.so").is_file():
                log.info("building the decoding kernel into %s (once, 25-45 s; replies do not wait for it)", folder)
            module = load_inline(name=MODULE, cpp_sources=SOURCE, functions=["gemv"], extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], build_directory=str(folder))  # fmt: skip
    except Exception as exc:  # no compiler, no ninja, a read-only cache...
        log.warning("could not build the decoding kernel (%s); it is left out", exc)
        return None
    return module.gemv  # type: ignore[no-any-return]


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the ninja wheel puts it beside this Python,
    which is not on PATH when the virtual environment is used without activating it."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


@dataclass(frozen=True)
class KernelChoice:
    """The matmul path for each batch size, and how it was decided."""

    by_rows: dict[int, str]  # {1: "gemv", 2: "gemv", 8: "onednn"}: ROWS -> a path
    how: str  # "measured", "cached" (measured on this machine before) or "forced" ([llm.local] kernel)
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # path -> rows -> one pass of every layer
    final: bool = True  # False while the compiled gemv is still being built: the choice is made again then

    def path(self, rows: int) -> str:
        return next((self.by_rows[r] for r in ROWS if rows <= r), self.by_rows[ROWS[-1]])

    def describe(self) -> str:
        chosen = ", ".join(f"{r} row{'s' * (r > 1)}: {p}" for r, p in self.by_rows.items())
        return f"{chosen} ({self.how}{'' if self.final else ', gemv still building'})"

    def as_dict(self) -> dict[str, Any]:
        return {"by_rows": {str(r): p for r, p in self.by_rows.items()}, "how": self.how, "final": self.final,
                "timings_ms": {p: {str(r): t for r, t in t_.items()} for p, t_ in self.timings_ms.items()}}  # fmt: skip


Run = Callable[[str, torch.Tensor, int], torch.Tensor]  # (path, x, layer) -> that layer's output by that path


def choose(
    run: Run, in_features: Sequence[int], paths: Sequence[str], *, cache: Path | None, shapes: str, final: bool,
    trials: int = 3,
) -> KernelChoice:  # fmt: skip
    """Time one pass over every layer (``run(path, x, layer)`` for each) by each of
    ``paths`` at each of :data:`ROWS` rows, after checking that path's outputs against
    ``F.linear``'s ("linear"); keep the fastest per row count. ``cache``: the kernels
    folder, where the answer is kept for the next start on this machine."""
    key = _cache_key(paths, shapes)
    cached = _read_cache(cache, key)
    if cached is not None:
        return KernelChoice({int(r): p for r, p in cached["by_rows"].items()}, "cached",
                            {p: {int(r): t for r, t in v.items()} for p, v in cached["timings_ms"].items()},
                            final)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, dict[int, float]] = {}
    for path in paths:
        if path != "linear" and not _agrees(run, path, in_features, generator):
            log.warning("the %s matmul path disagrees with F.linear here; it is not used", path)
            continue
        timings[path] = {}
        for rows in ROWS:
            xs = [torch.randn(rows, k, generator=generator) for k in in_features]
            for layer, x in enumerate(xs):  # warm: first calls allocate and fill caches
                run(path, x, layer)
            best = float("inf")
            for _ in range(trials):
                started = time.perf_counter()
                for layer, x in enumerate(xs):
                    run(path, x, layer)
                best = min(best, time.perf_counter() - started)
            timings[path][rows] = round(best * 1000, 3)
    by_rows = {rows: min(timings, key=lambda p: timings[p][rows]) for rows in ROWS}
    choice = KernelChoice(by_rows, "measured", timings, final)
    if final:
        _write_cache(cache, key, choice)
    return choice


def _agrees(run: Run, path: str, in_features: Sequence[int], generator: torch.Generator) -> bool:
    for layer in (0, len(in_features) - 1):
        for rows in (1, 3):
            x = torch.randn(rows, in_features[layer], generator=generator)
            try:
                got, want = run(path, x, layer), run("linear", x, layer)
            except Exception as exc:
                log.warning("the %s matmul path failed here (%s)", path, exc)
                return False
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
                return False
    return True


def _cache_key(paths: Sequence[str], shapes: str) -> str:
    layers = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    parts = [cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
             f"threads {torch.get_num_threads()}", ",".join(paths), layers]  # fmt: skip
    return " | ".join(parts)


def _read_cache(cache: Path | None, key: str) -> dict[str, Any] | None:
    if cache is None:
        return None
    try:
        entry = json.loads((cache / "choice.json").read_text(encoding="utf-8")).get(key)
        if entry and set(entry["by_rows"]) == {str(r) for r in ROWS}:
            return dict(entry)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def _write_cache(cache: Path | None, key: str, choice: KernelChoice) -> None:
    if cache is None:
        return
    path = cache / "choice.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        entry = choice.as_dict()
        known[key] = {"by_rows": entry["by_rows"], "timings_ms": entry["timings_ms"]}
        tmp = path.with_name(f".choice.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: measured again next time
        log.warning("could not keep the kernel choice in %s (%s)", path, exc)
