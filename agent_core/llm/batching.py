"""Continuous batching for the local backend: many users' requests, one model, one thread.

Requests wait in a bounded queue; the engine thread admits them into free slots of a
:class:`~agent_core.llm.decoder.BatchDecoder` (reading the prompt, sampling the first
token), then advances every admitted request by one token per step, each with its own
adapter. A request that arrives while others are generating joins at the next step; one
that finishes, fails or is cancelled leaves at once and frees its slot.

Limits (``[llm.local]``): ``max_batch_size`` rows at a time, ``max_queue`` requests
waiting behind them (past that a request is refused with :class:`LLMBusy` at once),
``queue_timeout_s`` the longest a request waits for a slot (then it too gets
:class:`LLMBusy`), ``batch_wait_ms`` how long an idle engine waits for more requests to
arrive before starting, so that a burst is read in together, ``prefill_chunk`` the most
prompt tokens read in between two steps: a long prompt is read in chunks while the
admitted requests go on generating (one prompt at a time; it joins once read).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agent_core.llm.base import AdapterRef, GenerationRequest, LLMBusy, LLMError
from agent_core.llm.cpu import ThreadTuner
from agent_core.llm.decoder import BatchDecoder, LoraAdapter
from agent_core.llm.style_control import StyleVocab, logits_processors
from agent_core.llm.warpers import draw

log = logging.getLogger(__name__)

DONE = object()  # the last item a request's ``emit`` receives, after its text
Emit = Callable[[object], None]  # thread-safe: a text piece, DONE, or an LLMError


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 8
    max_queue: int = 32
    batch_wait_s: float = 0.01
    queue_timeout_s: float = 60.0
    prefill_chunk: int = 256  # prompt tokens read in between two decode steps


class Job:
    """One request in the engine: its tokens so far and how to reach its consumer."""

    def __init__(self, request: GenerationRequest, emit: Emit) -> None:
        self.request = request
        self.emit = emit
        self.enqueued = time.monotonic()
        self.ids: list[int] = []  # prompt, then the reply's tokens
        self.prompt_length = 0
        self.read = 0  # prompt tokens in its slot so far
        self.slot = 0  # while its prompt is read in: the decoder slot it is read into
        self.sent = ""  # reply text handed to the consumer so far
        self.processors: Any = None  # transformers' LogitsProcessorList for this request
        self.generator: torch.Generator | None = None
        if request.seed is not None:
            self.generator = torch.Generator().manual_seed(request.seed)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The consumer went away: stop generating and free the slot at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def reply_tokens(self) -> list[int]:
        return self.ids[self.prompt_length :]


class BatchingEngine:
    """Runs :class:`Job` s through one :class:`BatchDecoder` on a thread of its own."""

    def __init__(
        self,
        build_decoder: Callable[[], BatchDecoder],
        tokenizer: Any,
        limits: BatchLimits,
        *,
        stop_ids: set[int],
        repetition_penalty: float = 1.0,
        max_loaded_adapters: int = 16,
        vocab: StyleVocab | None = None,
        no_repeat_ngram: int = 0,
        threads: int = 1,
    ) -> None:
        self._build_decoder = build_decoder
        self.threads = threads  # the most the engine decodes with; ThreadTuner picks how many of them
        self.vocab = vocab  # None: no style control and no loop guard
        self.no_repeat_ngram = no_repeat_ngram
        self.decoder: BatchDecoder  # built on the engine thread, see _run
        self.tokenizer = tokenizer
        self.limits = limits
        self.stop_ids = stop_ids
        self.repetition_penalty = repetition_penalty
        self.max_loaded_adapters = max_loaded_adapters
        self.generated_tokens = 0  # new tokens produced since start, all requests together
        self.largest_batch = 0  # the most rows one decode step has advanced together
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._rows: list[Job] = []  # row i generates in decoder slot i
        self._reading: Job | None = None  # taken from the queue, its prompt being read in (slot len(_rows))
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="attune-batching", daemon=True)
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._calls: list[Callable[[], None]] = []  # to run on the engine thread between steps
        self.tuner: ThreadTuner | None = None  # built on the engine thread (thread counts are per thread)

    # --- the consumer's side (any thread) -------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; returns once its decoder is built (raises if it failed)."""
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise LLMError(f"the batched decoder could not start: {self._build_error}") from self._build_error

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def submit(self, request: GenerationRequest, emit: Emit) -> Job:
        """Queue a request; raises :class:`LLMBusy` when the queue is full."""
        job = Job(request, emit)
        with self._wakeup:
            if self._stopping:
                raise LLMError("the local model is shutting down")
            free = self.limits.max_batch_size - len(self._rows) - (self._reading is not None)
            waiting = sum(not j.cancelled for j in self._pending) - free  # those with no slot to go to
            if waiting >= self.limits.max_queue:
                raise LLMBusy(f"{waiting} requests are already waiting (max_queue = {self.limits.max_queue})")
            self._pending.append(job)
            self._wakeup.notify()
        return job

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread between two steps: what changes the decoder
        (the kernel choice once the compiled gemv is built) runs where it decodes."""
        with self._wakeup:
            self._calls.append(fn)
            self._wakeup.notify()

    @property
    def loaded_adapters(self) -> list[str]:
        """Names of the adapters held in memory, least recently used first."""
        return list(self._adapters)

    @property
    def load(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        return len(self._rows), len(self._pending)

    # --- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        # The decoder is built on this thread: weights packed by another thread make
        # oneDNN's matmuls here markedly slower (measured: 41 against 33 ms a step).
        try:
            self.decoder = self._build_decoder()
            if self.threads > 1:
                self.tuner = ThreadTuner(self.threads, torch.set_num_threads)
        except BaseException as exc:
            self._build_error = exc
            return
        finally:
            self._ready.set()
        with torch.inference_mode():  # every tensor the cache holds is an inference tensor
            self._serve()
        for job in [*self._rows, *([self._reading] if self._reading else []), *self._pending]:
            job.emit(LLMError("the local model shut down"))

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not (self._pending or self._rows or self._reading or self._stopping or self._calls):
                    self._wakeup.wait()
                if self._stopping:
                    return
                idle = not (self._rows or self._reading)
                calls, self._calls = self._calls, []
            for call in calls:
                try:
                    call()
                except Exception:
                    log.exception("a change to the decoder failed; it goes on as it was")
            if not (self._pending or self._rows or self._reading):
                continue
            try:
                if idle:
                    self._gather()
                self._admit()
                self._leave([job for job in self._rows if job.cancelled])
                if self._rows:
                    self._step()
            except Exception as exc:  # the engine keeps serving; the requests in hand get an error
                self._fail_rows(exc)

    def _fail_rows(self, exc: Exception) -> None:
        log.exception("a batched step failed; its %d requests get an error", len(self._rows))
        failed, self._rows = self._rows, []
        if self._reading is not None:
            failed.append(self._reading)
            self._reading = None
        for slot in range(len(failed)):
            self.decoder.assign(slot, None)
        for job in failed:
            job.emit(LLMError(f"local generation failed: {exc}"))

    def _gather(self) -> None:
        """Idle and a request arrived: wait a moment for others, to read them in together."""
        deadline = self._pending[0].enqueued + self.limits.batch_wait_s
        with self._wakeup:
            while len(self._pending) < self.limits.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._wakeup.wait(left)

    def _admit(self) -> None:
        """Read waiting requests' prompts into free slots, at most ``prefill_chunk`` tokens
        before the next step; refuse the requests that waited too long."""
        budget = self.limits.prefill_chunk
        while budget > 0:
            job = self._reading
            if job is None:
                with self._wakeup:
                    if not self._pending or len(self._rows) >= self.limits.max_batch_size:
                        break
                    job = self._reading = self._pending.popleft()  # still counted by submit() while read in
            try:
                if job.read == 0:
                    self._start_reading(job)
                budget -= self._read(job, budget)
            except Exception as exc:
                self._reading = None
                self._fail(job, exc)
        now = time.monotonic()
        with self._wakeup:
            expired = [j for j in self._pending if now - j.enqueued > self.limits.queue_timeout_s]
            for job in expired:
                self._pending.remove(job)
        for job in expired:
            waited = now - job.enqueued
            job.emit(LLMBusy(f"no free slot after {waited:.0f} s (queue_timeout_s = {self.limits.queue_timeout_s:g})"))

    def _start_reading(self, job: Job) -> None:
        request = job.request
        prompt = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_dict=True)
        job.ids = list(prompt["input_ids"])
        job.prompt_length = len(job.ids)
        job.processors = self._processors(request, job.prompt_length)
        if job.prompt_length >= self.decoder.max_length:
            raise LLMError(f"the prompt has {job.prompt_length} tokens; the context holds {self.decoder.max_length}")
        job.slot = len(self._rows)
        self.decoder.assign(job.slot, self._adapter(request.adapter))

    def _read(self, job: Job, budget: int) -> int:
        """Read the next chunk of ``job``'s prompt (at most ``budget`` tokens) into the slot
        after the rows; once all is read, the job joins them with its first token. Returns
        the tokens read."""
        slot = len(self._rows)
        if job.slot != slot:  # rows left while it was read in: keep the rows contiguous
            self.decoder.move(job.slot, slot)
            job.slot = slot
        if job.cancelled:
            self.decoder.assign(slot, None)
            self._reading = None
            return 0
        chunk = job.ids[job.read : min(job.read + budget, job.prompt_length)]
        logits = self.decoder.prefill(slot, chunk, start=job.read)
        job.read += len(chunk)
        if job.read < job.prompt_length:
            return len(chunk)
        with self._wakeup:
            self._rows.append(job)
            self._reading = None
        if self._advance(job, self._pick([job], logits[None])[0]):
            self._leave([job])
        return len(chunk)

    def _step(self) -> None:
        """One new token for every row."""
        self.largest_batch = max(self.largest_batch, len(self._rows))
        started = time.perf_counter()
        logits = self.decoder.decode([job.ids[-1] for job in self._rows])
        if self.tuner is not None:
            self.tuner.stepped(len(self._rows), time.perf_counter() - started)
        tokens = self._pick(self._rows, logits)
        finished = [job for job, token in zip(self._rows, tokens, strict=True) if self._advance(job, token)]
        self._leave(finished)

    def _pick(self, jobs: list[Job], logits: torch.Tensor) -> list[int]:
        """The next token of each job (row i of ``logits`` is ``jobs[i]``'s): each row's own
        processors (repetition penalty, style control), then one batched draw."""
        scores = torch.cat([job.processors(torch.tensor([job.ids]), logits[row : row + 1])
                            for row, job in enumerate(jobs)])  # fmt: skip
        return draw(scores, [j.request.temperature for j in jobs], [j.request.top_p for j in jobs],
                    [j.generator for j in jobs])  # fmt: skip

    def _advance(self, job: Job, token: int) -> bool:
        """Append the job's next token, send any new text; True when the job is finished."""
        if token in self.stop_ids:
            self._finish(job)
            return True
        job.ids.append(token)
        self.generated_tokens += 1
        text = self.tokenizer.decode(job.reply_tokens, skip_special_tokens=True)
        complete = text.startswith(job.sent) and not text.endswith("\ufffd")  # hold back half a character
        if complete and (piece := text[len(job.sent) :]):
            job.sent = text
            job.emit(piece)
        if len(job.reply_tokens) >= job.request.max_new_tokens or len(job.ids) >= self.decoder.max_length:
            self._finish(job)
            return True
        return False

    def _processors(self, request: GenerationRequest, prompt_length: int) -> Any:
        """The repetition penalty and the style control (the warpers come in :meth:`_pick`)."""
        return logits_processors(request, prompt_length=prompt_length, vocab=self.vocab,
                                 repetition_penalty=self.repetition_penalty, no_repeat_ngram=self.no_repeat_ngram,
                                 eos=self.stop_ids, warpers=False)  # fmt: skip

    def _finish(self, job: Job) -> None:
        text = self.tokenizer.decode(job.reply_tokens, skip_special_tokens=True)
        if text.startswith(job.sent) and (rest := text[len(job.sent) :]):
            job.emit(rest)
        job.emit(DONE)

    def _leave(self, jobs: list[Job]) -> None:
        """Free the slots of finished or cancelled jobs, keeping the rows contiguous."""
        for job in jobs:
            if job not in self._rows:
                continue
            row, last = self._rows.index(job), len(self._rows) - 1
            if row != last:
                self.decoder.move(last, row)
                self._rows[row] = self._rows[last]
            self._rows.pop()

    def _fail(self, job: Job, exc: Exception) -> None:
        if not isinstance(exc, LLMError):
            log.exception("local generation failed")
            exc = LLMError(f"local generation failed: {exc}")
        job.emit(exc)

    def _adapter(self, ref: AdapterRef | None) -> LoraAdapter | None:
        """The request's adapter, from memory or read from disk (an LRU of loaded ones)."""
        if ref is None:
            return None
        adapter = self._adapters.get(ref.name)
        if adapter is None:
            adapter = LoraAdapter.load(ref.name, ref.path)
            self._adapters[ref.name] = adapter
            if len(self._adapters) > self.max_loaded_adapters:
                self._adapters.popitem(last=False)
        self._adapters.move_to_end(ref.name)
        return adapter
