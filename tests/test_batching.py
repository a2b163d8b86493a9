"""Continuous batching in the local backend: many users at once, each with their own
adapter, on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent_core.agent import BUSY
from agent_core.config import Config
from agent_core.events import Message
from agent_core.llm import AdapterRef, GenerationRequest, LLMBusy, LLMError, create_backend
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from attune.wiring import open_agent
from tests.conftest import MODEL_CACHE, plain_generate, random_lora, tiny_config_text

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

PROMPTS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers in Europe, please."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea, with a twist."}],
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [
        random_lora(tiny_model_dir, tmp_path_factory.mktemp("a"), seed=1),
        random_lora(tiny_model_dir, tmp_path_factory.mktemp("b"), seed=2, targets=("q_proj", "v_proj", "down_proj")),
    ]


@contextlib.asynccontextmanager
async def serving(model_dir: Path, kernel: str = "auto", cache: Path = MODEL_CACHE, weights: str = "fp32",
                  **limits: float) -> AsyncIterator[LocalBackend]:  # fmt: skip
    """The local backend with these batching limits, started; closed afterwards."""
    backend = LocalBackend(
        str(model_dir),
        cache,
        threads=1,
        repetition_penalty=1.1,
        batching=BatchLimits(**limits),  # type: ignore[arg-type]
        kernel=kernel,
        weights=weights,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def request(prompt: int, tokens: int, adapter: Path | None = None, temperature: float = 0.0) -> GenerationRequest:
    ref = AdapterRef(f"user-{adapter.name}", str(adapter)) if adapter else None
    return GenerationRequest(messages=PROMPTS[prompt], max_new_tokens=tokens, temperature=temperature, adapter=ref)  # type: ignore[arg-type]


async def test_greedy_rows_with_different_adapters_and_lengths_equal_plain_generate(
    tiny_model_dir: Path, adapters: list[Path]
) -> None:
    a, b = adapters
    # (prompt, new tokens, adapter): different prompt lengths, reply lengths and adapters
    cases = [(0, 24, None), (1, 12, a), (2, 30, b), (3, 18, a), (1, 24, None)]
    async with serving(tiny_model_dir, max_batch_size=4, batch_wait_s=0.2) as backend:
        first = [asyncio.create_task(backend.generate(request(p, n, ad))) for p, n, ad in cases[:4]]
        await asyncio.sleep(0.05)
        late = asyncio.create_task(backend.generate(request(*cases[4])))  # joins a running batch
        got = await asyncio.gather(*first, late)
        assert backend._engine is not None and backend._engine.largest_batch == 4
    for (p, n, ad), text in zip(cases, got, strict=True):
        expected = plain_generate(tiny_model_dir, PROMPTS[p], n, adapter=ad, repetition_penalty=1.1)
        assert text == expected, (p, n, ad)
    assert len(set(got[:2])) == 2


async def test_the_same_request_gives_the_same_reply_alone_and_in_a_batch(
    tiny_model_dir: Path, adapters: list[Path]
) -> None:
    async with serving(tiny_model_dir, max_batch_size=8, batch_wait_s=0.1) as backend:
        alone = await backend.generate(request(3, 20, adapters[1]))
        crowd = [request(i % 4, 10 + i, adapters[i % 2] if i % 3 else None) for i in range(7)]
        together = await asyncio.gather(backend.generate(request(3, 20, adapters[1])), *map(backend.generate, crowd))
        assert together[0] == alone


async def test_a_row_leaving_after_the_cache_grew_moves_the_next_one_in(tiny_model_dir: Path) -> None:
    """The cache starts at 256 tokens and grows inside inference mode; when the first row
    leaves, the last moves into its slot. (That move once ran outside inference mode and
    killed the engine thread: every later request waited for its timeout.)"""
    long = GenerationRequest(messages=[{"role": "user", "content": "tell me more " * 100}], max_new_tokens=2,
                             temperature=0.0)  # fmt: skip
    async with serving(tiny_model_dir, max_batch_size=4, batch_wait_s=0.2) as backend:
        got = await asyncio.wait_for(asyncio.gather(backend.generate(long), backend.generate(request(0, 16))), 60)
        assert backend._engine is not None and backend._engine.decoder.keys[0].shape[2] > 256
        again = await backend.generate(request(0, 16))
    assert got[1] == again == plain_generate(tiny_model_dir, PROMPTS[0], 16, repetition_penalty=1.1)


async def test_a_failing_step_answers_its_requests_with_an_error_and_the_engine_goes_on(tiny_model_dir: Path) -> None:
    async with serving(tiny_model_dir, max_batch_size=4, batch_wait_s=0.05) as backend:
        first = await backend.generate(request(0, 8))
        engine = backend._engine
        assert engine is not None
        decode, calls = engine.decoder.decode, []

        def fails_once(tokens: list[int]) -> Any:
            calls.append(tokens)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return decode(tokens)

        engine.decoder.decode = fails_once  # type: ignore[method-assign]
        with pytest.raises(LLMError, match="boom"):
            await backend.generate(request(1, 8))
        assert await backend.generate(request(0, 8)) == first


async def test_a_full_queue_answers_busy_at_once(tiny_model_dir: Path) -> None:
    async with serving(tiny_model_dir, max_batch_size=1, max_queue=1) as backend:
        running = backend.stream(request(0, 400, temperature=1.0))
        assert await anext(running)  # holds the only slot
        queued = asyncio.create_task(backend.generate(request(1, 4)))
        await asyncio.sleep(0.05)
        with pytest.raises(LLMBusy, match="max_queue = 1"):
            await backend.generate(request(2, 4))
        await running.aclose()
        assert await queued  # the waiting one is answered once the slot is free


async def test_a_request_waiting_too_long_for_a_slot_gets_busy(tiny_model_dir: Path) -> None:
    async with serving(tiny_model_dir, max_batch_size=1, queue_timeout_s=0.3) as backend:
        # seeded: an unseeded sample could end early (EOS) and free the slot before the message comes
        running = backend.stream(dataclasses.replace(request(0, 1000, temperature=1.0), seed=7))
        assert await anext(running)
        with pytest.raises(LLMBusy, match="queue_timeout_s"):
            await backend.generate(request(1, 4))
        await running.aclose()


async def test_a_cancelled_request_frees_its_slot(tiny_model_dir: Path) -> None:
    async with serving(tiny_model_dir, max_batch_size=1) as backend:
        engine = backend._engine
        assert engine is not None
        before = engine.generated_tokens
        running = backend.stream(request(3, 1000, temperature=1.0))
        assert await anext(running)
        waiting = backend.stream(request(0, 1000, temperature=1.0))
        waiting_task = asyncio.create_task(anext(waiting))
        await asyncio.sleep(0.05)
        waiting_task.cancel()  # a queued request given up: never takes the slot
        await running.aclose()  # what a timeout or a closed connection does
        reply = await asyncio.wait_for(backend.generate(request(1, 8)), timeout=30)
        assert reply
        assert engine.generated_tokens - before < 300  # neither cancelled request ran to its end
        await asyncio.sleep(0.05)
        assert engine.load == (0, 0)


async def test_the_agent_answers_busy_and_keeps_the_message(
    tiny_model_dir: Path, make_config: Callable[..., Config]
) -> None:
    config = make_config(tiny_config_text(tiny_model_dir) + "max_batch_size = 1\nmax_queue = 0\n")
    backend = create_backend(config)
    agent = await open_agent(config, llm=backend)
    try:
        await backend.start()
        # seeded: an unseeded sample could end early (EOS) and free the slot before the message comes
        running = backend.stream(dataclasses.replace(request(0, 1000, temperature=1.0), seed=7))
        assert await anext(running)
        reply = await agent.handle_message(Message(platform="test", chat_id="c", sender_id="u", text="anyone there?"))
        assert reply is not None and reply.kind == "error" and reply.text == BUSY
        rows = await agent.store.db.fetchall("SELECT role, text FROM messages")
        assert [tuple(r) for r in rows] == [("user", "anyone there?")]
        await running.aclose()
    finally:
        await agent.close()


def test_the_compiled_gemv_equals_a_plain_matmul() -> None:
    import torch

    from agent_core.llm.kernels import gemv

    kernel = gemv(MODEL_CACHE / "kernels")
    assert kernel is not None  # gcc and ninja are part of the setup: it must build here
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 96), torch.randn(300)
    for rows in (1, 2):
        x = torch.randn(rows, 96)
        assert torch.allclose(kernel(x, weight, None), x @ weight.t(), atol=1e-4)
        assert torch.allclose(kernel(x, weight, bias), x @ weight.t() + bias, atol=1e-4)


def test_the_compiled_decode_attention_equals_torchs_on_rows_of_different_lengths() -> None:
    import torch

    from agent_core.llm.decoder import decode_attention
    from agent_core.llm.kernels import gemv

    kernel = gemv(MODEL_CACHE / "kernels")
    assert kernel is not None
    generator = torch.Generator().manual_seed(0)
    heads, kv, dim = 6, 2, 16
    for at in ([0], [5, 40, 17]):
        rows, positions = len(at), torch.tensor(at)
        qkv = torch.randn(rows, 1, (heads + 2 * kv) * dim, generator=generator)
        cos, sin = (torch.randn(rows, 1, 1, dim, generator=generator) for _ in range(2))
        caches = [torch.randn(4, kv, 64, dim, generator=generator) for _ in range(2)]
        theirs, before = [c.clone() for c in caches], caches[0].clone()
        got = kernel.attend(qkv, cos, sin, *caches, positions, heads, kv)
        expected = decode_attention(qkv, cos, sin, *theirs, positions, heads, kv)
        assert torch.allclose(got, expected, atol=1e-5)
        for mine, reference in zip(caches, theirs, strict=True):  # the new keys and values, and nothing else
            assert torch.allclose(mine, reference, atol=1e-6)
        written = (caches[0] != before).any(dim=-1).nonzero()[:, [0, 2]].unique(dim=0).tolist()
        assert written == [[row, position] for row, position in enumerate(at)]  # each row's key at its position


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_the_compiled_step_equals_the_layer_by_layer_one_with_mixed_adapters(
    tiny_model_dir: Path, adapters: list[Path], tmp_path: Path, weights: str
) -> None:
    """``decode_step`` (every layer in one compiled call) gives the logits the layers give
    one by one in torch, for rows of different lengths, two with their own adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent_core.llm.decoder import BatchDecoder, LoraAdapter
    from agent_core.llm.kernels import gemv
    from agent_core.llm.quantized import quantize_model

    kernel = gemv(MODEL_CACHE / "kernels")
    assert kernel is not None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantized = quantize_model(model, weights, tmp_path)
    decoder = BatchDecoder(model, 4, 256, quantized=quantized)
    decoder.choose_kernels(kernel, setting="gemv")
    decoder.attend = kernel  # whichever attention this machine chose: the compiled step needs it
    prompts = [[1, 5, 9, 200, 31], [7] * 17, [3, 4], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    own = [LoraAdapter.load("a", adapters[0]), None, LoraAdapter.load("b", adapters[1]), None]
    for slot, (ids, adapter) in enumerate(zip(prompts, own, strict=True)):
        decoder.assign(slot, adapter)
        decoder.prefill(slot, ids)
    tokens = torch.tensor([40, 41, 42, 43])
    for _ in range(5):
        positions = torch.tensor(decoder.lengths).unsqueeze(1)
        with torch.inference_mode():
            compiled = decoder._decode_compiled(tokens, positions)
            layered = decoder._forward(tokens.unsqueeze(1), positions, slice(0, 4), positions)[:, -1]
        assert torch.allclose(compiled, layered, rtol=1e-4, atol=1e-4 * float(layered.abs().max()))
        decoder.lengths = [n + 1 for n in decoder.lengths]
        tokens = layered.argmax(dim=-1)
    assert decoder.kernels.path(4) == "gemv"  # so decode() itself takes the compiled step


async def test_a_build_killed_before_leaves_no_lock_that_holds_up_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent_core.llm import kernels

    assert kernels.gemv(MODEL_CACHE / "kernels") is not None
    folder = kernels._folder(MODEL_CACHE / "kernels")
    (folder / "lock").touch()  # what torch's builder leaves when its process is killed mid-build
    monkeypatch.setattr(kernels, "_loaded", {})
    again = await asyncio.wait_for(asyncio.to_thread(kernels._build, MODEL_CACHE / "kernels"), timeout=240)
    assert again is not None and not (folder / "lock").exists()


@pytest.mark.parametrize("kernel", ["gemv", "onednn", "linear", "auto"])
async def test_every_matmul_path_gives_plain_generates_greedy_replies_with_mixed_adapters(
    tiny_model_dir: Path, adapters: list[Path], kernel: str
) -> None:
    async with serving(tiny_model_dir, kernel, max_batch_size=4, batch_wait_s=0.2) as backend:
        await asyncio.to_thread(backend.kernels_final.wait, 300)  # the compiled gemv may still be building
        choice = backend.kernel_choice
        assert choice is not None and choice.final
        if kernel == "auto":
            assert choice.how in ("measured", "cached") and set(choice.by_rows) == {1, 2, 8, 64}
        else:
            assert choice.how == "forced" and set(choice.by_rows.values()) == {kernel}
        cases = [(0, 16, adapters[0]), (3, 16, None), (1, 12, adapters[1]), (2, 14, adapters[0])]
        one = await backend.generate(request(*cases[0]))  # 1 row, then 4 rows, then fewer as they finish
        together = await asyncio.gather(*(backend.generate(request(*c)) for c in cases))
    expected = [plain_generate(tiny_model_dir, PROMPTS[p], n, adapter=ad, repetition_penalty=1.1) for p, n, ad in cases]
    assert [one, *together] == [expected[0], *expected]


async def test_the_choice_is_measured_once_and_falls_back_when_a_path_is_missing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agent_core.llm import decoder, kernels

    assert kernels.gemv(MODEL_CACHE / "kernels") is not None
    (tmp_path / "kernels").mkdir()
    for built in (MODEL_CACHE / "kernels").glob("gemv-*"):  # the compiled gemv as built before, not its choice
        (tmp_path / "kernels" / built.name).symlink_to(built)
    async with serving(tiny_model_dir, "auto", tmp_path, max_batch_size=2) as backend:
        await asyncio.to_thread(backend.kernels_final.wait, 300)
        first = backend.kernel_choice
    assert first is not None and first.how == "measured" and set(first.timings_ms) == set(kernels.PATHS)
    async with serving(tiny_model_dir, "auto", tmp_path, max_batch_size=2) as backend:
        again = backend.kernel_choice
    assert again is not None and again.how == "cached" and again.by_rows == first.by_rows
    # No compiler here and no oneDNN in this torch: asked for gemv, it says so and uses what there is.
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "built", lambda kernels_dir: False)
    monkeypatch.setattr(kernels, "_build", lambda kernels_dir: None)
    monkeypatch.setattr(decoder, "_onednn", lambda: False)
    with caplog.at_level(logging.WARNING):
        async with serving(tiny_model_dir, "gemv", tmp_path, max_batch_size=2) as backend:
            await asyncio.to_thread(backend.kernels_final.wait, 60)
            fallback = backend.kernel_choice
            text = await backend.generate(request(0, 12))
    assert fallback is not None and fallback.final and set(fallback.by_rows.values()) == {"linear"}
    assert "kernel = 'gemv' is not available here" in caplog.text
    assert text == plain_generate(tiny_model_dir, PROMPTS[0], 12, repetition_penalty=1.1)


def dequantized_copy(model_dir: Path, mode: str, out: Path) -> Path:
    """``model_dir`` with its weights replaced by their ``mode`` blocks, dequantized: what
    plain generate runs on to check a quantized mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_core.llm.quantized import quantize_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quantize_model(model, mode, out / "blocks")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_the_compiled_loops_on_int8_and_int4_blocks_equal_a_matmul_on_their_dequantized_weights() -> None:
    import torch

    from agent_core.llm.kernels import gemv
    from agent_core.llm.quantized import Quantized

    kernel = gemv(MODEL_CACHE / "kernels")
    assert kernel is not None
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 96), torch.randn(300)
    for layout in ("int8", "int4"):
        blocks = Quantized.from_float(weight, layout)
        dequantized = blocks.dequantize()
        error = (dequantized - weight).abs().max() / weight.abs().max()
        assert 0 < error < (0.01 if layout == "int8" else 0.1), layout  # rounded, and not by much
        for rows in (1, 3, 8, 20):  # 20: more than one pass of 8 over each weight row
            x = torch.randn(rows, 96)
            assert torch.allclose(kernel.blocks(x, blocks, bias), x @ dequantized.t() + bias, atol=1e-4), (layout, rows)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["gemv", "onednn", "linear"])
async def test_every_weights_mode_and_path_gives_plain_generates_replies_on_the_dequantized_weights(
    tiny_model_dir: Path, adapters: list[Path], tmp_path: Path, weights: str, kernel: str
) -> None:
    async with serving(tiny_model_dir, kernel, weights=weights, max_batch_size=4, batch_wait_s=0.2) as backend:
        await asyncio.to_thread(backend.kernels_final.wait, 300)
        choice = backend.kernel_choice
        assert choice is not None and choice.how == "forced" and set(choice.by_rows.values()) == {kernel}
        assert backend._engine is not None and backend._engine.decoder.weights == weights
        cases = [(0, 16, adapters[0]), (3, 16, None), (1, 12, adapters[1]), (2, 14, adapters[0])]
        together = await asyncio.gather(*(backend.generate(request(*c)) for c in cases))
    reference = dequantized_copy(tiny_model_dir, weights, tmp_path / "dequantized")
    expected = [plain_generate(reference, PROMPTS[p], n, adapter=ad, repetition_penalty=1.1) for p, n, ad in cases]
    assert together == expected
    fp32 = plain_generate(tiny_model_dir, PROMPTS[0], 16, adapter=adapters[0], repetition_penalty=1.1)
    if weights == "int4":  # random weights lose enough to int4 that the reply changes: the blocks are what is served
        assert together[0] != fp32


LONG = [{"role": "user", "content": "Here is what happened on my trip, day by day. " * 30 + "What should I see next?"}]


async def test_a_long_prompt_is_read_in_chunks_while_the_other_replies_go_on(
    tiny_model_dir: Path, adapters: list[Path]
) -> None:
    """``prefill_chunk`` tokens at a time: the reply already under way gets tokens while
    the long prompt is read in, and every reply still equals plain ``generate``'s, also
    when a row leaves mid-read (the prompt's slot then moves down)."""
    a, b = adapters
    long = GenerationRequest(messages=LONG, max_new_tokens=12, temperature=0.0,  # type: ignore[arg-type]
                             adapter=AdapterRef("user-a", str(a)))  # fmt: skip
    async with serving(tiny_model_dir, max_batch_size=4, batch_wait_s=0.0, prefill_chunk=16) as backend:
        assert backend._tokenizer is not None
        prompt = backend._tokenizer.apply_chat_template(LONG, add_generation_prompt=True, return_dict=True)
        prompt_tokens = len(prompt["input_ids"])
        assert prompt_tokens > 16 * 10  # read in more than ten chunks
        flowing: list[str] = []
        seen_while_read: list[int] = []

        async def under_way() -> str:
            async for piece in backend.stream(request(0, 90, b)):
                flowing.append(piece)
            return "".join(flowing)

        async def the_long_one() -> str:
            while len(flowing) < 3:  # the other reply is under way
                await asyncio.sleep(0.005)
            before, pieces = len(flowing), []
            async for piece in backend.stream(long):
                if not pieces:
                    seen_while_read.append(len(flowing) - before)
                pieces.append(piece)
            return "".join(pieces)

        short = asyncio.create_task(backend.generate(request(2, 4)))  # leaves while the long prompt is read in
        got = await asyncio.wait_for(asyncio.gather(under_way(), the_long_one(), short), 120)
    assert seen_while_read[0] >= 5, seen_while_read  # tokens of the other reply came between the chunks
    assert got[0] == plain_generate(tiny_model_dir, PROMPTS[0], 90, adapter=b, repetition_penalty=1.1)
    assert got[1] == plain_generate(tiny_model_dir, LONG, 12, adapter=a, repetition_penalty=1.1)  # type: ignore[arg-type]
    assert got[2] == plain_generate(tiny_model_dir, PROMPTS[2], 4, repetition_penalty=1.1)


def test_the_choice_made_while_the_gemv_builds_is_quick_and_not_kept(tmp_path: Path) -> None:
    """A first start's choice before the compiled gemv is built (final False) times 1 and
    8 rows once each, gives every batch size a path, and is not cached; the final one
    times every size."""
    import torch

    from agent_core.llm import kernels

    weights = [torch.randn(32, 64), torch.randn(16, 32)]
    timed: list[tuple[str, int]] = []

    def run(path: str, x: torch.Tensor, layer: int) -> torch.Tensor:
        timed.append((path, x.shape[0]))
        return x @ weights[layer].t()

    interim = kernels.choose(run, [64, 32], ["onednn", "linear"], cache=tmp_path, shapes="s", final=False)
    assert {rows for _, rows in timed} <= {1, 3, 8} and set(interim.by_rows) == set(kernels.ROWS)  # 3: the check
    assert not interim.final and not (tmp_path / "choice.json").exists()
    timed.clear()
    final = kernels.choose(run, [64, 32], ["onednn", "linear"], cache=tmp_path, shapes="s", final=True)
    assert {rows for _, rows in timed} >= set(kernels.ROWS) and final.final and (tmp_path / "choice.json").exists()
