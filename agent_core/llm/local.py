"""The local backend: a transformers model on this machine's CPU, with per-user LoRA.

Llama-family models are served by continuous batching (:mod:`agent_core.llm.batching`):
concurrent users' requests share each forward pass, each row with its own adapter.
Other models, or ``batching = false``, take the plain path: transformers ``generate``
with peft adapters, one request at a time in arrival order. Either way all model work
runs on one thread of its own, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent_core.llm.base import GenerationRequest, LLMBackend, LLMError
from agent_core.llm.batching import DONE, BatchingEngine, BatchLimits
from agent_core.llm.cpu import available_cores, lower_priority
from agent_core.llm.kernels import KernelChoice
from agent_core.llm.model_files import ModelSource, cached_directory, find_model
from agent_core.llm.quantized import Quantized, quantize_model
from agent_core.llm.style_control import StyleVocab, logits_processors, vocab_for

DEFAULT_LIMITS = BatchLimits()

log = logging.getLogger(__name__)


class LocalBackend(LLMBackend):
    def __init__(
        self,
        model: str,
        cache_dir: Path,
        *,
        threads: int = 0,
        context_window: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
        style_control: bool = True,
        max_loaded_adapters: int = 16,
        batching: BatchLimits | None = DEFAULT_LIMITS,  # None: plain generate, one at a time
        kernel: str = "auto",  # the decoder's matmul path: "auto" (measured) or one of kernels.PATHS
        weights: str = "fp32",  # "fp32", "int8" or "int4" (agent_core/llm/quantized.py; the config says which)
    ) -> None:
        self.model_setting = model
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram = no_repeat_ngram  # the loop guard: no repeated n-gram of this size (0: off)
        self.style_control = style_control  # steer decoding so a requested style shows (style_control.py)
        self._vocab: StyleVocab | None = None
        self.cache_dir = cache_dir
        self.max_loaded_adapters = max_loaded_adapters
        self.threads = threads or available_cores()  # 0: the cores this process may use (affinity, cgroup quota)
        self._context_window_setting = context_window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attune-llm")
        self._model: Any = None  # a transformers model, or a peft PeftModel once an adapter is used
        self._tokenizer: Any = None
        self._counter: Any = None  # a separate tokenizers.Tokenizer for counting on the loop thread
        self._adapters: OrderedDict[str, str] = OrderedDict()  # loaded adapter name -> path, an LRU
        self.model_dir: Path | None = None
        self.batching = batching
        self.kernel = kernel
        self.weights = weights
        self._quantized: dict[str, Quantized] = {}  # the weights' int8/int4 blocks by parameter name
        self.kernels_final = threading.Event()  # set once the batched decoder's matmul paths are chosen for good
        self._engine: BatchingEngine | None = None
        self._plain_tokens = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        began = time.perf_counter()
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if self.threads:
            torch.set_num_threads(self.threads)
        source = find_model(self.model_setting)
        self.model_dir = cached_directory(source, self.cache_dir)
        hf_logging.disable_progress_bar()  # shown while converting; loading the cache is quick
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._counter = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        seconds: dict[str, float] = {}

        def lap(part: str) -> None:  # the seconds since the last part ended
            seconds[part] = time.perf_counter() - began - sum(seconds.values())

        lap("imports and tokenizer")
        vocab: Future[StyleVocab] | None = None
        if self.style_control or self.no_repeat_ngram > 1:  # read beside the weights loading (about 1.5 s)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="attune-vocab") as side:
                vocab = side.submit(vocab_for, self._tokenizer)
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        model.eval()
        lap("weights")
        self._quantized = self._quantize(model, source)
        self._model = model
        if vocab is not None:
            self._vocab = vocab.result()
        blocks = "vocabulary" if self.weights == "fp32" else f"{self.weights} blocks and vocabulary"
        lap(blocks)
        own = int(getattr(model.config, "max_position_embeddings", 2048))
        self.context_window = min(self._context_window_setting or own, own)
        if self.batching is not None:
            self._engine = self._batching_engine(model)
        lap("decoder and kernel choice")
        log.info("local model ready: %s; loaded in %.1f s (%s)", self.describe(), time.perf_counter() - began,
                 ", ".join(f"{part} {s:.1f} s" for part, s in seconds.items()))  # fmt: skip

    def _quantize(self, model: Any, source: ModelSource) -> dict[str, Quantized]:
        """The model's weights in the configured mode: the blocks of the GGUF it came
        from where they have that layout, else quantized here; cached beside the model
        (a GGUF's conversion) or under the cache directory (a model directory of its own)."""
        if self.weights == "fp32":
            return {}
        assert self.model_dir is not None
        gguf = source.directory / source.gguf_file if source.gguf_file else None
        if gguf is not None:
            cache = self.model_dir
        else:
            digest = hashlib.sha256(str(self.model_dir.resolve()).encode()).hexdigest()[:10]
            cache = self.cache_dir / "quantized" / f"{self.model_dir.name}-{digest}"
        return quantize_model(model, self.weights, cache, gguf=gguf)

    def _batching_engine(self, model: Any) -> BatchingEngine | None:
        import torch

        from agent_core.llm import kernels
        from agent_core.llm.decoder import BatchDecoder, supports

        assert self.batching is not None
        if problem := supports(model):
            log.info("no batching for this model (%s): one request at a time", problem)
            return None
        slots, length, threads = self.batching.rows, self.context_window, self.threads
        folder, setting = self.cache_dir / "kernels", self.kernel
        # The compiled gemv takes 25-45 s to build the first time: then decoding starts
        # without it and it joins the choice once built (off the start-up path).
        later = setting in ("auto", "gemv") and not kernels.built(folder)

        def build() -> BatchDecoder:  # on the engine thread; OpenMP's thread count is per thread
            if threads:
                torch.set_num_threads(threads)
            decoder = BatchDecoder(model, slots, length, quantized=self._quantized)
            compiled = kernels.gemv(folder) if setting in ("auto", "gemv") and not later else None
            decoder.choose_kernels(compiled, setting=setting, cache=folder, final=not later)
            if not later:
                self.kernels_final.set()
            return decoder

        engine = BatchingEngine(
            build,
            self._tokenizer,
            self.batching,
            stop_ids=_stop_ids(model),
            repetition_penalty=self.repetition_penalty,
            max_loaded_adapters=self.max_loaded_adapters,
            vocab=self._vocab,
            no_repeat_ngram=self.no_repeat_ngram,
            threads=threads,
        )
        engine.start()
        if later:
            threading.Thread(target=self._gemv_later, args=(engine, folder), name="attune-gemv-build",
                             daemon=True).start()  # fmt: skip
        return engine

    def _gemv_later(self, engine: BatchingEngine, folder: Path) -> None:
        """Build the compiled gemv (a compiler run), then let the engine choose again with it.
        The compiler runs at a low priority: a reply decoding meanwhile keeps the cores."""
        from agent_core.llm import kernels

        lower_priority()
        compiled = kernels.gemv(folder)

        def choose() -> None:
            try:
                engine.decoder.choose_kernels(compiled, setting=self.kernel, cache=folder, final=True)
            finally:
                self.kernels_final.set()

        engine.call_soon(choose)

    @property
    def steers(self) -> bool:
        """Steered replies are written by the batching engine (not by plain ``generate``)."""
        return self._engine is not None

    @property
    def continues(self) -> bool:
        return True

    @property
    def kernel_choice(self) -> KernelChoice | None:
        """The batched decoder's matmul path per batch size (None: no batched decoder)."""
        return self._engine.decoder.kernels if self._engine is not None else None

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._engine.stop)
            self._engine = None  # its decoder holds a second, packed copy of the weights
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._model = None

    def describe(self) -> str:
        mode = f"batches of up to {self.batching.max_batch_size}" if self._engine and self.batching else "one at a time"
        return (f"local {self.model_dir or self.model_setting} (context {self.context_window} tokens, CPU, weights "
                f"{self.weights}, {mode})")  # fmt: skip

    @property
    def loaded_adapters(self) -> list[str]:
        """Names of the adapters held in memory, least recently used first."""
        return list(self._engine.loaded_adapters if self._engine else self._adapters)

    @property
    def generated_tokens(self) -> int:
        """New tokens produced since start, all requests together."""
        return self._plain_tokens + (self._engine.generated_tokens if self._engine else 0)

    # --- prompts ---------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        if self._counter is None:
            raise LLMError("the local model is not loaded yet")
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    # --- generation ------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._model is None:
            raise LLMError("the local model is not loaded yet")
        if not self.style_control and request.style is not None:
            request = dataclasses.replace(request, style=None)  # the prompt's instructions alone
        stream = self._batched(request) if self._engine else self._one_at_a_time(request)
        try:
            async for piece in stream:
                yield piece
        finally:
            await stream.aclose()  # at once, not when collected: it frees the request's slot

    async def _batched(self, request: GenerationRequest) -> AsyncIterator[str]:
        assert self._engine is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = self._engine.submit(request, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while (item := await queue.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield str(item)
        finally:
            job.cancel()  # frees the slot if the consumer went away early

    async def _one_at_a_time(self, request: GenerationRequest) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def push(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._executor, self._generate, request, push, cancel)
        try:
            while (item := await queue.get()) is not DONE:
                yield str(item)
            await future  # re-raises a failure in the worker
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            cancel.set()  # stops the worker early if the consumer went away

    def _generate(self, request: GenerationRequest, push: Any, cancel: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    push(text)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        try:
            if cancel.is_set():
                return
            model = self._select_adapter(request)
            inputs = self._tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            if request.reply_start:  # the reply's first words, decided already: the model writes on
                start = self._tokenizer(request.reply_start, add_special_tokens=False, return_tensors="pt")
                inputs = {k: torch.cat([inputs[k], start[k]], dim=1) for k in ("input_ids", "attention_mask")}
            # The same processors as the batching engine, in its order (the warpers among them).
            processors = logits_processors(
                request, prompt_length=int(inputs["input_ids"].shape[1]), vocab=self._vocab,
                repetition_penalty=self.repetition_penalty, no_repeat_ngram=self.no_repeat_ngram,
                eos=_stop_ids(self._model),  # not ``model``: a base-only view has no generation config
            )  # fmt: skip
            sampling: dict[str, Any] = {"do_sample": False}
            if request.temperature > 0:  # temperature, top-k and top-p are among the processors
                sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                if request.seed is not None:
                    torch.manual_seed(request.seed)
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    **sampling,
                    max_new_tokens=request.max_new_tokens,
                    logits_processor=processors,
                    pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                    streamer=Streamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                )
            self._plain_tokens += int(output.shape[1] - inputs["input_ids"].shape[1])
        except Exception as exc:
            log.exception("local generation failed")
            raise LLMError(f"local generation failed: {exc}") from exc
        finally:
            push(DONE)

    def _select_adapter(self, request: GenerationRequest) -> Any:
        """The model to generate with: the base, or the base with the request's adapter active."""
        from peft import PeftModel

        adapter = request.adapter
        if adapter is None:
            if isinstance(self._model, PeftModel):
                return _BaseOnly(self._model)
            return self._model
        name = adapter.name.replace(".", "_")
        if name not in self._adapters:
            if not Path(adapter.path, "adapter_config.json").is_file():
                raise LLMError(f"adapter {adapter.name}: no adapter_config.json in {adapter.path}")
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(adapter.path, adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, adapter.path, adapter_name=name)
            self._model.eval()
            self._adapters[name] = adapter.path
            if len(self._adapters) > self.max_loaded_adapters:
                oldest, _ = self._adapters.popitem(last=False)
                self._model.delete_adapter(oldest)
        self._adapters.move_to_end(name)
        self._model.set_adapter(name)
        return self._model


def _stop_ids(model: Any) -> set[int]:
    """The tokens that end a reply, as the model's generation config names them."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


class _BaseOnly:
    """A PeftModel seen with its adapters switched off, for users without one."""

    def __init__(self, peft_model: Any) -> None:
        self._peft = peft_model

    def generate(self, **kwargs: Any) -> Any:
        with self._peft.disable_adapter():
            return self._peft.generate(**kwargs)
