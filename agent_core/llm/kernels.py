"""A compiled matrix-vector product for decoding one or two requests at a time.

At batch 1 every new token reads every weight once, so decoding speed is memory
bandwidth. oneDNN's fp32 path reads the weights here at about 20 GB/s at batch 1; this
plain loop (one weight row per dot product, rows split across the threads, compiled
with -O3 and vector instructions) reads them at nearly twice that (bench/serving.py).
It stays ahead for 2 rows and falls behind from 3 (measured, all projections of
SmolLM2: 14.0 against 20.2 ms at 1 row, 14.2 against 21.8 at 2, 18.0 against 18.0 at
3), so larger batches keep oneDNN.

Built once with torch's own extension builder (gcc and ninja, about 25 s) into the model
cache; where it cannot be built, decoding falls back to oneDNN and says so once.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

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

MAX_ROWS = 2  # up to this many rows go through gemv
Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_loaded: dict[Path, Gemv | None] = {}


def gemv(build_dir: Path) -> Gemv | None:
    """The compiled ``gemv(x, w, bias)``, built into ``build_dir`` the first time; None
    (and one warning) if it cannot be built here."""
    if build_dir not in _loaded:
        _loaded[build_dir] = _build(build_dir)
    return _loaded[build_dir]


def _build(build_dir: Path) -> Gemv | None:
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            log.warning("no AVX2 on this CPU: batch-1 decoding uses oneDNN")
            return None
        flags += ["-mavx2", "-mfma"]
    try:
        from torch.utils.cpp_extension import load_inline

        _ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            log.info("building the decoding kernel into %s (once, about 30 s)", build_dir)
        module = load_inline(
            name="attune_gemv",
            cpp_sources=SOURCE,
            functions=["gemv"],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache...
        log.warning("could not build the batch-1 decoding kernel (%s); oneDNN is used instead", exc)
        return None
    return module.gemv  # type: ignore[no-any-return]


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the ninja wheel puts it beside this Python,
    which is not on PATH when the virtual environment is used without activating it."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
