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

A request is one reply (a :class:`Job`); the decoder advances *rows* (a :class:`Row`).
An ordinary reply is one row. A steered reply (``GenerationRequest.steering``) is written a
block at a time by several candidate rows, and its user's reward model keeps one block
each time (:mod:`agent_core.llm.lookahead`); ``max_rows`` bounds the rows of all replies
together, and a steered reply gets fewer candidates when many people are being answered.
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

from agent_core.llm import row_processors
from agent_core.llm.base import AdapterRef, BlockChoice, GenerationRequest, LLMBusy, LLMError, Steering
from agent_core.llm.cpu import ThreadTuner
from agent_core.llm.decoder import BatchDecoder, LoraAdapter
from agent_core.llm.lookahead import BlockEnds, block_ends_for, choose
from agent_core.llm.row_processors import RowProcessors
from agent_core.llm.style_control import StyleVocab, style_control_for
from agent_core.llm.warpers import TOP_K, draw

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
    max_rows: int = 0  # decoder rows for all replies together (steered ones take several); 0: max_batch_size

    @property
    def rows(self) -> int:
        return max(self.max_rows, self.max_batch_size)


class Row:
    """One row of the decoder: a reply being written, or one candidate for the next block
    of a steered reply. Its slot in the decoder is its index in the engine's rows."""

    def __init__(self, job: Job, ids: list[int], processors: RowProcessors, generator: torch.Generator | None,
                 temperature: float, top_k: int = TOP_K) -> None:  # fmt: skip
        self.job = job
        self.ids = ids  # prompt, then the reply's tokens
        self.processors = processors
        self.generator = generator
        self.temperature = temperature
        self.top_k = top_k
        self.parked = False  # its candidate block is complete: it waits for the others
        self.ended = False  # the reply ends with its block (a stop token, or the budget)
        self.stop = 0.0  # parked and not ended: the chance the reply ends right after its block
        self.peeked = False  # ``stop`` was read from the next step's scores

    @property
    def reply_tokens(self) -> list[int]:
        return self.ids[self.job.prompt_length :]

    @property
    def block(self) -> list[int]:
        return self.ids[self.job.kept :]

    def fork(self, generator: torch.Generator | None) -> Row:
        return Row(self.job, list(self.ids), self.processors.fork(), generator, self.temperature, self.top_k)


class Job:
    """One request in the engine: its rows, and how to reach its consumer."""

    def __init__(self, request: GenerationRequest, emit: Emit) -> None:
        self.request = request
        self.emit = emit
        self.enqueued = time.monotonic()
        self.prompt: list[int] = []
        self.prompt_length = 0
        self.read = 0  # prompt tokens in its slot so far
        self.slot = 0  # while its prompt is read in: the decoder slot it is read into
        self.sent = ""  # reply text handed to the consumer so far
        self.rows: list[Row] = []  # while generating: one, or a steered reply's candidates
        self.kept = 0  # a steered reply: the tokens (prompt included) kept so far; its candidates start here
        self.drawn = 0  # candidate rows made so far (each draws with its own generator)
        self._cancelled = threading.Event()

    @property
    def steering(self) -> Steering | None:
        return self.request.steering

    def generator(self) -> torch.Generator | None:
        """The generator of the next row: seeded from the request's seed, one per row."""
        seed = self.request.seed
        self.drawn += 1
        return None if seed is None else torch.Generator().manual_seed(seed + 1_000_003 * (self.drawn - 1))

    def cancel(self) -> None:
        """The consumer went away: stop generating and free the slot at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


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
        self._jobs: list[Job] = []  # replies being generated
        self._rows: list[Row] = []  # row i generates in decoder slot i
        self._ends: BlockEnds | None = None  # where a steered reply's blocks end (built at the first one)
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
            free = self.limits.max_batch_size - len(self._jobs) - (self._reading is not None)
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
        return len(self._jobs), len(self._pending)

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
        for job in [*self._jobs, *([self._reading] if self._reading else []), *self._pending]:
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
                self._leave([job for job in self._jobs if job.cancelled])
                if self._rows:
                    self._step()
            except Exception as exc:  # the engine keeps serving; the requests in hand get an error
                self._fail_rows(exc)

    def _fail_rows(self, exc: Exception) -> None:
        log.exception("a batched step failed; its %d requests get an error", len(self._jobs))
        failed, self._jobs = self._jobs, []
        slots = len(self._rows) + (self._reading is not None)
        self._rows = []
        if self._reading is not None:
            failed.append(self._reading)
            self._reading = None
        for slot in range(slots):
            self.decoder.assign(slot, None)
        for job in failed:
            job.rows = []
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
                    full = len(self._jobs) >= self.limits.max_batch_size or len(self._rows) >= self.decoder.slots
                    if not self._pending or full:
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
        job.prompt = list(prompt["input_ids"])
        if request.reply_start:  # the reply's first words, decided already: the model writes on
            job.prompt += self.tokenizer(request.reply_start, add_special_tokens=False)["input_ids"]
        job.prompt_length = job.kept = len(job.prompt)
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
        chunk = job.prompt[job.read : min(job.read + budget, job.prompt_length)]
        logits = self.decoder.prefill(slot, chunk, start=job.read)
        job.read += len(chunk)
        if job.read < job.prompt_length:
            return len(chunk)
        steering = job.steering
        temperature, top_k = job.request.temperature, TOP_K
        if steering is not None:
            temperature, top_k = max(temperature, steering.temperature), steering.top_k  # candidates that differ
            if self._ends is None:
                self._ends = block_ends_for(self.tokenizer)
        first = Row(job, list(job.prompt), self._processors(job.request, job.prompt_length), job.generator(),
                    temperature, top_k)  # fmt: skip
        with self._wakeup:
            self._jobs.append(job)
            self._rows.append(first)
            job.rows = [first]
            self._reading = None
        if steering is not None:
            self._add_candidates(job, first)
        rows = list(job.rows)
        tokens = self._pick(rows, logits[None].repeat(len(rows), 1))
        self._after(rows, tokens)
        return len(chunk)

    def _step(self) -> None:
        """One new token for every row (a parked one computes one it then forgets)."""
        self.largest_batch = max(self.largest_batch, len(self._rows))
        started = time.perf_counter()
        logits = self.decoder.decode([row.ids[-1] for row in self._rows])
        if self.tuner is not None:
            self.tuner.stepped(len(self._rows), time.perf_counter() - started)
        moving = [i for i, row in enumerate(self._rows) if not row.parked]
        for i, row in enumerate(self._rows):
            if row.parked:
                self.decoder.rewind(i, len(row.ids) - 1)
                if not (row.ended or row.peeked):
                    self._peek(row, logits[i])
        rows = [self._rows[i] for i in moving]
        self._after(rows, self._pick(rows, logits[moving]))

    def _after(self, rows: list[Row], tokens: list[int]) -> None:
        """Advance each row by its token; replies that are done leave, and steered replies
        whose candidates are all ready choose one."""
        finished: list[Job] = []
        for row, token in zip(rows, tokens, strict=True):
            if row.job.steering is None:
                if self._advance(row, token):
                    finished.append(row.job)
            else:
                self._advance_candidate(row, token)
        for job in self._jobs:
            ready = job.steering is not None and all(r.parked and (r.ended or r.peeked) for r in job.rows)
            if ready and self._choose_block(job):
                finished.append(job)
        self._leave(finished)

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row (row i of ``logits`` is ``rows[i]``'s): each row's own
        processors (repetition penalty, style control), then one batched draw. ``logits``
        is the caller's own copy (the decoder's rows picked out): changed in place."""
        if not rows:
            return []
        row_processors.apply([row.processors for row in rows], [row.ids for row in rows], logits)
        return draw(logits, [r.temperature for r in rows], [r.job.request.top_p for r in rows],
                    [r.generator for r in rows], [r.top_k for r in rows])  # fmt: skip

    def _advance(self, row: Row, token: int) -> bool:
        """Append an ordinary reply's next token, send any new text; True when it is finished."""
        job = row.job
        if token in self.stop_ids:
            self._finish(job, row)
            return True
        row.ids.append(token)
        self.generated_tokens += 1
        self._send(job, row.reply_tokens)
        if len(row.reply_tokens) >= job.request.max_new_tokens or len(row.ids) >= self.decoder.max_length:
            self._finish(job, row)
            return True
        return False

    def _send(self, job: Job, reply: list[int]) -> None:
        """Hand the consumer the text of ``reply`` it has not had yet."""
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        complete = text.startswith(job.sent) and not text.endswith("\ufffd")  # hold back half a character
        if complete and (piece := text[len(job.sent) :]):
            job.sent = text
            job.emit(piece)

    # --- steered replies: a block at a time ------------------------------------------------

    def _advance_candidate(self, row: Row, token: int) -> None:
        """Append a candidate's next token; it parks when its block is complete."""
        job, steering = row.job, row.job.steering
        assert steering is not None and self._ends is not None
        if token in self.stop_ids:
            row.parked = row.ended = True
            return
        row.ids.append(token)
        if len(row.reply_tokens) >= job.request.max_new_tokens or len(row.ids) >= self.decoder.max_length:
            row.parked = row.ended = True
        elif self._ends.ends(row.block) or len(row.block) >= steering.max_block:
            row.parked = True

    def _peek(self, row: Row, logits: torch.Tensor) -> None:
        """A parked candidate: the chance its reply ends right after its block, read from the
        scores of its next token (through a copy of its processors, which may force the end)."""
        scores = logits[None].clone()
        row_processors.apply([row.processors.fork()], [row.ids], scores)
        scores = scores[0]
        probs = torch.softmax(scores.float() / max(row.temperature, 1e-2), dim=-1)
        row.stop = float(probs[list(self.stop_ids)].sum())
        row.peeked = True

    def _choose_block(self, job: Job) -> bool:
        """Every candidate finished its block: keep one, send it, and start the next block
        from it on every row. True when the reply is done.

        A candidate is scored as the whole reply where it ends there, else as its start;
        where it may end after the block, by how likely it is to (the expected score)."""
        steering = job.steering
        assert steering is not None
        rows = job.rows
        texts = [self.tokenizer.decode(r.reply_tokens, skip_special_tokens=True) for r in rows]
        ended = [r.ended for r in rows]
        scores = [0.0]
        if len(rows) > 1:
            both = [float(x) for x in steering.scorer.score_partial(texts + texts, [True] * len(rows) + ended)]
            whole, partial = both[: len(rows)], both[len(rows) :]
            scores = [w if r.ended else r.stop * w + (1 - r.stop) * p
                      for r, w, p in zip(rows, whole, partial, strict=True)]  # fmt: skip
        chosen, kl = choose(scores, steering.strength, rows[0].generator)
        winner = rows[chosen]
        if steering.on_block is not None:
            start = job.kept - job.prompt_length
            steering.on_block(BlockChoice(prefix=list(rows[0].ids[job.prompt_length : job.kept]),
                                          candidates=[r.reply_tokens[start:] for r in rows], texts=texts,
                                          scores=scores, ended=ended, chosen=chosen, kl=kl))  # fmt: skip
        self.generated_tokens += len(winner.block)
        self._send(job, winner.reply_tokens)
        if winner.ended:
            self._finish(job, winner)
            return True
        slot = self._rows.index(winner)
        for row in rows:
            if row is not winner:
                target = self._rows.index(row)
                self.decoder.copy(slot, target, start=job.kept)
                row.ids = list(winner.ids)
                row.processors = winner.processors.fork()
            row.parked = row.peeked = False
        job.kept = len(winner.ids)
        self._add_candidates(job, winner)
        return False

    def _add_candidates(self, job: Job, source: Row) -> None:
        """Give a steered reply as many candidate rows as it may have now: up to its
        ``candidates``, within its share of ``max_rows`` while others are answered too."""
        steering = job.steering
        assert steering is not None
        share = max(1, self.limits.rows // max(1, len(self._jobs)))
        free = self.decoder.slots - len(self._rows) - (self._reading is not None)
        want = min(steering.candidates, share)
        while len(job.rows) > max(1, want):  # fewer people than now: give rows back
            extra = job.rows.pop()
            self._remove_row(extra)
        while len(job.rows) < want and free > 0:
            self._insert_row(source.fork(job.generator()), source)
            free -= 1

    def _insert_row(self, row: Row, source: Row) -> None:
        """A new row at the end, a copy of ``source``'s cache (a prompt being read in moves up)."""
        target = len(self._rows)
        if self._reading is not None and self._reading.slot == target:
            self.decoder.move(target, target + 1)
            self._reading.slot = target + 1
        self.decoder.assign(target, self.decoder.adapters[self._rows.index(source)])
        self.decoder.copy(self._rows.index(source), target)
        self._rows.append(row)
        row.job.rows.append(row)

    def _remove_row(self, row: Row) -> None:
        index, last = self._rows.index(row), len(self._rows) - 1
        if index != last:
            self.decoder.move(last, index)
            self._rows[index] = self._rows[last]
        self._rows.pop()

    # ----------------------------------------------------------------------------------------

    def _processors(self, request: GenerationRequest, prompt_length: int) -> RowProcessors:
        """The repetition penalty and the style control, as ``logits_processors(...,
        warpers=False)`` has them for ``generate`` (the warpers come in :meth:`_pick`)."""
        control = style_control_for(request, prompt_length, self.vocab, self.no_repeat_ngram, self.stop_ids)
        return RowProcessors(self.repetition_penalty, control, vocab=sum(self.decoder.lm_head.sizes),
                             capacity=self.decoder.max_length)  # fmt: skip

    def _finish(self, job: Job, row: Row) -> None:
        text = self.tokenizer.decode(row.reply_tokens, skip_special_tokens=True)
        if text.startswith(job.sent) and (rest := text[len(job.sent) :]):
            job.emit(rest)
        job.emit(DONE)

    def _leave(self, jobs: list[Job]) -> None:
        """Free the rows of finished or cancelled jobs, keeping the rows contiguous."""
        for job in jobs:
            if job not in self._jobs:
                continue
            for row in job.rows:
                self._remove_row(row)
            job.rows = []
            self._jobs.remove(job)

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
