"""Serving many users at once: aggregate tokens/s and latency of the local backend.

For each number of concurrent users (1, 4, 8, 16), every user sends one message at the
same moment, each with their own LoRA adapter (r=8 on q_proj and v_proj, the
``[training]`` defaults; random weights: speed does not depend on them), and the reply
is generated greedily. Rows, in the same run:

- ``naive``: plain transformers ``generate``, one request at a time (``batching = false``),
  each user's adapter switched in through peft;
- ``attune_mixed``: the local backend's continuous batching, each row with its user's adapter;
- ``base_batch``: the same batches with every row on the base model, the upper bound for mixed adapters;
- ``llama_cpp``: llama.cpp through llama-cpp-python on the same GGUF, serving the users one
  after another (the base model: it has no per-user adapters here); null when not installed;
- ``ceiling``: the memory-bandwidth ceiling at batch 1, (read rate) / (bytes of weights one
  decode step reads in the default weights mode: int4 blocks where the 1-row path reads
  them, else fp32); ``ceiling_fp32_tokens_per_s`` the same for fp32 weights.

The main rows run in the default weights mode (``[llm.local] weights``). Then, per weights
mode (``--weights fp32,int8,int4``), the batching engine again: single-stream decode,
8 users with 8 adapters and the base batch (``weights_modes`` in the JSON), each beside its
fidelity against fp32 on a fixed text (:func:`fidelity`: mean KL per token and top-1
agreement, teacher-forced), also for the blocks quantized from the fp32 weights rather
than read from the GGUF (what a model without a GGUF gets).

Then ``contended``: one user with their adapter on the batching engine, quiet and then
while one other process keeps a core busy (a Python loop), measured back to back in the
same run; the ratio is what a shared machine leaves of the single stream (goal 0.5).
The matmul path the engine chose on this machine (agent_core/llm/kernels.py) is printed
and written as ``kernels``. Last, ``step_ms``: a decode step's milliseconds by part
(matmuls, attention, adapters, processors, rest) at 1 row and at the most users, on styled
replies (bench/step_split.py).

Aggregate tokens/s is all new tokens over the wall time from the first request to the last
reply; TTFT and reply times are from the moment all users sent their message.

    python -m bench.serving [--users 1,4,8,16] [--weights fp32,int8,int4] [--tokens 64] [--threads 0] [--json OUT]

llama-cpp-python is a benchmark-only dependency that compiles llama.cpp from source:
``.venv/bin/pip install -c constraints.txt '.[bench-llama]'`` (about 15 to 30 minutes here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

if __package__ in (None, ""):  # run as a file: python bench/serving.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.config import Settings
from agent_core.llm import AdapterRef, ChatMessage, GenerationRequest
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from agent_core.llm.model_files import find_model
from agent_core.llm.quantized import MODES, quantize_model
from agent_core.style import Style
from bench import report, step_split
from bench.generation import memory_bandwidth

QUESTIONS = [
    "Write a long, detailed essay about the history of Paris.",
    "Explain in detail how a bicycle gear system works.",
    "Describe the water cycle step by step, with examples.",
    "Tell me a long story about a lighthouse keeper and a storm.",
    "What should I know before adopting a dog? Be thorough.",
    "Explain how vaccines train the immune system, in depth.",
    "Give me a detailed plan for learning to play the guitar.",
    "Describe the life cycle of a star from birth to death.",
    "How does a compiler turn source code into a program? Explain at length.",
    "Write a detailed guide to growing tomatoes on a balcony.",
    "Explain the causes of the French Revolution in detail.",
    "Describe how the internet routes a message from one computer to another.",
    "What are the main ideas of stoic philosophy? Explain each.",
    "Explain how bees make honey and why they need it, in detail.",
    "Describe a week-long walking tour of Scotland, day by day.",
    "Explain how a refrigerator keeps food cold, step by step.",
]
ROWS = ("naive", "attune_mixed", "base_batch", "llama_cpp")
FIXED_TEXT = (
    "The history of Paris begins with a Celtic tribe, the Parisii, who settled on an island in the Seine. "
    "The Romans built a town there called Lutetia, with baths, an arena and a forum. In the Middle Ages the "
    "city grew into the largest in Europe; its university drew students from every country, and Notre-Dame "
    "rose over two centuries. Kings made it their seat, revolutions tore it apart, and in the nineteenth "
    "century Haussmann cut wide boulevards through the old streets. Today it is a city of museums, cafes "
    "and parks, where about two million people live. To make a good cup of tea, warm the pot first, use one "
    "spoon of leaves for each cup, pour water just off the boil and wait three to five minutes."
)
T = TypeVar("T")


def make_adapters(model_dir: Path, count: int, out: Path) -> list[AdapterRef]:
    """``count`` LoRA adapters shaped like the nightly job's, with random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    training = Settings().training
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=training.rank, lora_alpha=training.alpha, target_modules=list(training.targets))
    peft_model = get_peft_model(model, config)
    refs = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        peft_model.save_pretrained(out / f"user-{i}")
        refs.append(AdapterRef(f"user-{i}-v1", str(out / f"user-{i}")))
    return refs


# A style as the bot asks for one (the step split is measured with it: style control on).
STYLED = Style.from_dict({"length": "brief", "tone": "casual", "emoji": "none", "format": "bullets"})


def requests(users: int, tokens: int, adapters: list[AdapterRef] | None,
             style: Style | None = None) -> list[GenerationRequest]:  # fmt: skip
    system: ChatMessage = {"role": "system", "content": Settings().agent.system_prompt}
    return [
        GenerationRequest(
            messages=[system, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_new_tokens=tokens,
            temperature=0.0,
            adapter=adapters[i] if adapters else None,
            style=style,
        )
        for i in range(users)
    ]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def summary(tokens: int, wall: float, firsts: list[float], lasts: list[float], decode: float | None) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(firsts, 0.5),
        "ttft_p95_s": percentile(firsts, 0.95),
        "reply_p50_s": percentile(lasts, 0.5),
        "reply_p95_s": percentile(lasts, 0.95),
        "decode_tokens_per_s": decode,  # one user: new tokens after the first over the time they took
    }


async def serve(backend: LocalBackend, batch: list[GenerationRequest]) -> dict[str, Any]:
    """All requests at once through the backend; their aggregate rate and latencies."""
    before = backend.generated_tokens
    started = time.perf_counter()

    async def one(request: GenerationRequest) -> tuple[float, float]:
        first = None
        async for _ in backend.stream(request):
            first = first or time.perf_counter() - started
        return first or time.perf_counter() - started, time.perf_counter() - started

    times = await asyncio.gather(*(one(r) for r in batch))
    wall = time.perf_counter() - started
    tokens = backend.generated_tokens - before
    firsts, lasts = [t[0] for t in times], [t[1] for t in times]
    decode = (tokens - 1) / (lasts[0] - firsts[0]) if len(batch) == 1 and tokens > 1 else None
    return summary(tokens, wall, firsts, lasts, decode)


class LlamaCpp:
    """llama.cpp on the same GGUF, serving requests one after another as they arrived."""

    def __init__(self, gguf: Path, threads: int, render: Callable[[list[ChatMessage]], str]) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False, seed=0)
        self.render = render

    def serve(self, batch: list[GenerationRequest], repetition_penalty: float) -> dict[str, Any]:
        started = time.perf_counter()
        firsts, lasts, tokens, decode = [], [], 0, None
        for request in batch:
            first, pieces = None, []
            for chunk in self.llm.create_completion(
                self.render(request.messages),
                max_tokens=request.max_new_tokens,
                temperature=0.0,
                repeat_penalty=repetition_penalty,
                stream=True,
            ):
                first = first or time.perf_counter() - started
                pieces.append(chunk["choices"][0]["text"])
            lasts.append(time.perf_counter() - started)
            firsts.append(first or lasts[-1])
            count = len(self.llm.tokenize("".join(pieces).encode(), add_bos=False, special=True))
            tokens += count
            if len(batch) == 1 and count > 1:
                decode = (count - 1) / (lasts[0] - firsts[0])
        return summary(tokens, time.perf_counter() - started, firsts, lasts, decode)


def in_a_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a thread that ends afterwards, taking its OpenMP team with it."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(work(*args)))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError(f"{getattr(work, '__name__', work)} failed (see above)")
    return out[0]


def load_llama_cpp(gguf: Path, threads: int, render: Callable[[list[ChatMessage]], str]) -> LlamaCpp | None:
    try:
        return LlamaCpp(gguf, threads, render)
    except ImportError:
        print(
            "llama_cpp: llama-cpp-python is NOT installed, so its row is null. To compare, install it "
            "(compiles from source, about 15 to 30 minutes): .venv/bin/pip install -c constraints.txt '.[bench-llama]'"
        )
        return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="1,4,8,16", help="numbers of concurrent users, comma-separated")
    parser.add_argument("--weights", default=",".join(MODES), help="weights modes to compare, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (at most)")
    parser.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads; 0 = all cores")
    parser.add_argument("--cache-dir", default="data/models", help="where the GGUF model is cached de-quantized")
    parser.add_argument("--repetition-penalty", type=float, default=Settings().llm.local.repetition_penalty)
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    args = parser.parse_args()
    user_counts = [int(n) for n in args.users.split(",")]
    threads = args.threads or torch.get_num_threads()
    cache = Path(args.cache_dir).resolve()

    default_weights = Settings().llm.local.weights
    modes = [m for m in args.weights.split(",") if m]

    def backend(batching: BatchLimits | None, weights: str = default_weights) -> LocalBackend:
        return LocalBackend(
            "smollm2",
            cache,
            threads=threads,
            repetition_penalty=args.repetition_penalty,
            max_loaded_adapters=max(user_counts),
            batching=batching,
            weights=weights,
        )

    # Each contender runs alone, and its threads end before the next one starts: a thread
    # that has used OpenMP keeps its worker team, and a second live team slows the first
    # by about a fifth on 2 cores (measured), which would skew whichever row ran later.
    results: dict[int, dict[str, dict[str, Any] | None]] = {n: {name: None for name in ROWS} for n in user_counts}
    bandwidth = in_a_thread(memory_bandwidth)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = find_model("smollm2")
        naive = backend(None)
        await naive.start()
        assert naive.model_dir is not None
        weight_bytes = sum(p.numel() * p.element_size() for p in naive._model.parameters())
        tokenizer = naive._tokenizer
        adapters = in_a_thread(make_adapters, naive.model_dir, max(user_counts), Path(folder))
        await serve(naive, requests(max(user_counts), 2, adapters))  # adapters read from disk once, like a running bot
        for users in user_counts:
            results[users]["naive"] = await serve(naive, requests(users, args.tokens, adapters))
        await naive.close()
        print("naive done", flush=True)

        batched = backend(BatchLimits(max_batch_size=max(user_counts), max_queue=max(user_counts)))
        await batched.start()
        await asyncio.to_thread(batched.kernels_final.wait, 600)  # a first start builds the compiled gemv
        await serve(batched, requests(max(user_counts), 2, adapters))
        for users in user_counts:
            results[users]["attune_mixed"] = await serve(batched, requests(users, args.tokens, adapters))
            results[users]["base_batch"] = await serve(batched, requests(users, args.tokens, None))
        engine_largest = batched._engine.largest_batch if batched._engine else 0
        read_bytes = bytes_read(batched) or weight_bytes
        choice = batched.kernel_choice
        kernels = choice.as_dict() if choice else None
        # After the timed rows (the split's own timing slows steps a little), before the
        # contended one (beside a busy process the engine may move to fewer threads for a while).
        with step_split.splitting() as split:
            for users in sorted({1, max(user_counts)}):
                await serve(batched, requests(users, args.tokens, adapters, STYLED))
        step_ms = {str(rows): split.ms_per_step(rows) for rows in sorted({1, max(user_counts)})}
        quiet = await serve(batched, requests(1, args.tokens, adapters))
        with competing_process():
            busy = await serve(batched, requests(1, args.tokens, adapters))
        contended = {"quiet_tokens_per_s": quiet["tokens_per_s"], "contended_tokens_per_s": busy["tokens_per_s"],
                     "ratio": busy["tokens_per_s"] / quiet["tokens_per_s"]}  # fmt: skip
        await batched.close()
        print("attune done", flush=True)
        by_mode = {}
        for mode in modes:
            by_mode[mode] = await weights_mode(backend(BatchLimits(max_batch_size=8, max_queue=8), mode), adapters,
                                               args.tokens)  # fmt: skip
            print(f"weights {mode} done", flush=True)
        fidelities = in_a_thread(fidelity_table, naive.model_dir, Path(model_dir.directory) / str(model_dir.gguf_file),
                                 modes)  # fmt: skip

    llama = in_a_thread(
        load_llama_cpp,
        Path(model_dir.directory) / str(model_dir.gguf_file),
        threads,
        lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
    )
    if llama is not None:
        for users in user_counts:
            results[users]["llama_cpp"] = in_a_thread(
                llama.serve, requests(users, args.tokens, None), args.repetition_penalty
            )
        print("llama.cpp done", flush=True)
    ceiling = bandwidth["read_gb_s"] * 1e9 / read_bytes
    print_report(results, ceiling, bandwidth, read_bytes, threads, args.tokens, engine_largest, default_weights)
    print(f"matmul path chosen on this CPU: {choice.describe() if choice else 'none (no batched decoder)'}")
    print(
        f"contended: single stream {contended['quiet_tokens_per_s']:.1f} tokens/s quiet, "
        f"{contended['contended_tokens_per_s']:.1f} beside a busy process: {contended['ratio']:.2f} (goal 0.5)"
    )
    for rows, ms in step_ms.items():
        print(step_split.line(int(rows), ms))
    print_modes(by_mode, fidelities, bandwidth["read_gb_s"])
    document = {
        "params": {**vars(args), "threads": threads, "default_weights": default_weights},
        "weight_bytes": weight_bytes,
        **bandwidth,
        "read_bytes_per_token": read_bytes,
        "ceiling_tokens_per_s": ceiling,
        "ceiling_fp32_tokens_per_s": bandwidth["read_gb_s"] * 1e9 / weight_bytes,
        "by_users": {
            str(users): {
                **{name: (r["tokens_per_s"] if r else None) for name, r in row.items()},
                "ceiling": ceiling,
            }
            for users, row in results.items()
        },
        "details": {str(users): row for users, row in results.items()},
        "goals": goals(results, ceiling),
        "kernels": kernels,
        "contended": contended,
        "step_ms": step_ms["1"],
        "step_ms_by_rows": step_ms,
        "weights_modes": {
            m: {**r, "fidelity": fidelities.get(m), "fidelity_quantized_here": fidelities.get(f"{m} here")}
            for m, r in by_mode.items()
        },
    }
    path = report.save("serving", document)
    print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(path.read_text())
        print(f"wrote {args.json}")


def bytes_read(backend: LocalBackend) -> int | None:
    """Bytes of weights one decode step of one row reads: each layer's blocks where the
    1-row path reads them, else its fp32 weight (None: no batched decoder)."""
    engine, choice = backend._engine, backend.kernel_choice
    if engine is None or choice is None:
        return None
    quantized = choice.path(1) == "gemv"
    return sum(d.blocks.nbytes if quantized and d.blocks is not None else d.in_features * sum(d.sizes) * 4
               for d in engine.decoder._denses())  # fmt: skip


async def weights_mode(backend: LocalBackend, adapters: list[AdapterRef], tokens: int) -> dict[str, Any]:
    """One weights mode on the batching engine: single-stream decode, 8 users with 8
    adapters, the base batch; the kernel path chosen and the bytes of weights read."""
    await backend.start()
    try:
        await asyncio.to_thread(backend.kernels_final.wait, 600)
        await serve(backend, requests(8, 2, adapters))
        single = await serve(backend, requests(1, tokens, adapters))
        mixed = await serve(backend, requests(8, tokens, adapters))
        base = await serve(backend, requests(8, tokens, None))
        engine = backend._engine
        assert engine is not None
        choice = backend.kernel_choice
        return {
            "single_decode_tokens_per_s": single["decode_tokens_per_s"],
            "mixed_8_tokens_per_s": mixed["tokens_per_s"],
            "base_batch_8_tokens_per_s": base["tokens_per_s"],
            "mixed_8_vs_base_batch": mixed["tokens_per_s"] / base["tokens_per_s"],
            "matmul_bytes_per_token": bytes_read(backend),
            "kernels": choice.as_dict() if choice else None,
        }
    finally:
        await backend.close()


def fidelity(reference: Any, model: Any, ids: torch.Tensor) -> dict[str, float]:
    """Teacher-forced on ``ids``: mean KL(fp32 || mode) per token and how often both
    models' most likely next token is the same."""
    with torch.inference_mode():
        p = torch.log_softmax(reference(ids).logits[0].float(), -1)
        q = torch.log_softmax(model(ids).logits[0].float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"kl_per_token": float(kl.mean()), "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).float().mean()),
            "tokens": int(ids.shape[1])}  # fmt: skip


def fidelity_table(model_dir: Path, gguf: Path, modes: list[str]) -> dict[str, dict[str, float]]:
    """Each mode against fp32 on :data:`FIXED_TEXT`, with the GGUF's blocks (the served
    ones) and with blocks quantized here from the fp32 weights ("int4 here")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(FIXED_TEXT, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in (m for m in modes if m != "fp32"):
            for label, source in ((mode, gguf), (f"{mode} here", None)):
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                quantize_model(model, mode, Path(folder) / label.replace(" ", "-"), gguf=source)
                out[label] = fidelity(reference, model, ids)
    return out


def print_modes(by_mode: dict[str, dict[str, Any]], fidelities: dict[str, dict[str, float]], read_gb_s: float) -> None:
    rows = []
    for mode, r in by_mode.items():
        f, here = fidelities.get(mode), fidelities.get(f"{mode} here")
        ceiling = read_gb_s * 1e9 / r["matmul_bytes_per_token"] if r["matmul_bytes_per_token"] else None
        rows.append([mode, r["single_decode_tokens_per_s"], ceiling or "", r["mixed_8_tokens_per_s"],
                     r["base_batch_8_tokens_per_s"], f"{r['mixed_8_vs_base_batch']:.0%}",
                     f"{f['kl_per_token']:.2e}" if f else "0", f"{f['top1_agreement']:.1%}" if f else "100%",
                     f"{here['kl_per_token']:.2e} / {here['top1_agreement']:.1%}" if here else "",
                     r["kernels"]["by_rows"] if r["kernels"] else ""])  # fmt: skip
    headers = ["weights", "1 user decode tok/s", "its ceiling", "8 mixed tok/s", "8 base tok/s", "mixed vs base",
               "KL/token (GGUF blocks)", "top-1 agree", "quantized here: KL / top-1", "kernels"]  # fmt: skip
    print("\nweights modes (fidelity against fp32 on a fixed text, teacher-forced)")
    print(report.table(headers, rows))


@contextlib.contextmanager
def competing_process() -> Any:
    """Another process keeping one core busy while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running before the measurement starts
        yield
    finally:
        proc.kill()
        proc.wait()


def goals(results: dict[int, dict[str, dict[str, Any] | None]], ceiling: float) -> dict[str, float | None]:
    """The issue's targets as ratios (None where a row is missing)."""

    def rate(users: int, name: str, key: str = "tokens_per_s") -> float | None:
        r = results.get(users, {}).get(name)
        return r[key] if r and r.get(key) is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    single = rate(1, "attune_mixed", "decode_tokens_per_s")
    return {
        "single_stream_decode_vs_ceiling": ratio(single, ceiling),  # goal >= 0.6
        "single_stream_decode_vs_llama_cpp": ratio(single, rate(1, "llama_cpp", "decode_tokens_per_s")),  # >= 0.5
        "mixed_8_vs_naive": ratio(rate(8, "attune_mixed"), rate(8, "naive")),  # goal >= 4
        "mixed_8_vs_base_batch": ratio(rate(8, "attune_mixed"), rate(8, "base_batch")),  # goal >= 0.85
        "mixed_8_vs_llama_cpp": ratio(rate(8, "attune_mixed"), rate(8, "llama_cpp")),  # goal > 1
    }


def print_report(
    results: dict[int, dict[str, dict[str, Any] | None]],
    ceiling: float,
    bandwidth: dict[str, float],
    weight_bytes: int,
    threads: int,
    tokens: int,
    largest: int,
    weights: str,
) -> None:
    print(f"\nserving SmolLM2-135M, greedy, up to {tokens} new tokens a reply, {threads} threads")
    read = bandwidth["read_gb_s"]
    print(f"weights {weights}: {weight_bytes / 1e6:,.0f} MB read per token; memory read {read:.1f} GB/s")
    print(f"bandwidth ceiling at batch 1: {ceiling:.1f} tokens/s; largest batch stepped: {largest}")
    rows = []
    for users, row in results.items():
        naive = row["naive"]
        base = row["base_batch"]
        for name in ROWS:
            r = row[name]
            if r is None:
                rows.append([users, name, "not installed", "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    users,
                    name,
                    r["tokens_per_s"],
                    f"{r['tokens_per_s'] / naive['tokens_per_s']:.2f}x" if naive else "",
                    f"{r['tokens_per_s'] / base['tokens_per_s']:.0%}" if base else "",
                    r["ttft_p50_s"],
                    r["ttft_p95_s"],
                    r["reply_p50_s"],
                    r["reply_p95_s"],
                ]
            )
    headers = ["users", "row", "tokens/s", "vs naive", "vs base batch", "TTFT p50 s", "TTFT p95 s"]
    print(report.table([*headers, "reply p50 s", "reply p95 s"], rows))
    g = goals(results, ceiling)
    single = results.get(1, {}).get("attune_mixed")
    if single and single.get("decode_tokens_per_s"):
        print(
            f"single stream (1 user, own adapter): decode {single['decode_tokens_per_s']:.1f} tokens/s = "
            f"{_pct(g['single_stream_decode_vs_ceiling'])} of the ceiling (goal 60%), "
            f"{_pct(g['single_stream_decode_vs_llama_cpp'])} of llama.cpp's (goal 50%)"
        )
    print(
        f"8 users, 8 adapters: {_x(g['mixed_8_vs_naive'])} naive (goal 4x), {_pct(g['mixed_8_vs_base_batch'])} of "
        f"the base batch (goal 85%), {_x(g['mixed_8_vs_llama_cpp'])} llama.cpp in turn (goal above 1x)"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    asyncio.run(main())
