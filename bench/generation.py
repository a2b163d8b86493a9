"""Tokens per second of the local backend at batch 1, beside the memory-bandwidth ceiling.

At batch 1 every new token reads every weight once, so a CPU cannot beat
(memory read bandwidth) / (bytes of weights). Both are measured in the same run: the
read rate by summing a large fp32 tensor (and the copy rate for reference), the
weights from the loaded model.

    python bench/generation.py [--model smollm2] [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: python bench/generation.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_core.llm import GenerationRequest
from agent_core.llm.local import LocalBackend
from bench import report

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a long, detailed essay about the history of Paris, from Roman times to today."},
]


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s read (a sum reads each byte once) and copied (read + write) for fp32 tensors."""
    a = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    a.sum()
    b.copy_(a)  # touch the pages once before timing
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        reads.append(a.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        b.copy_(a)
        copies.append(2 * a.nbytes / (time.perf_counter() - t0) / 1e9)
    return {"read_gb_s": max(reads), "copy_gb_s": max(copies)}


async def measure(backend: LocalBackend, tokens: int, runs: int) -> dict[str, float]:
    request = GenerationRequest(messages=PROMPT, max_new_tokens=tokens, temperature=0.0)  # type: ignore[arg-type]
    await backend.generate(GenerationRequest(messages=PROMPT, max_new_tokens=8, temperature=0.0))  # type: ignore[arg-type]
    rates, decode_rates, first = [], [], []
    for _ in range(runs):
        before = backend.generated_tokens
        started = time.perf_counter()
        stamps = [time.perf_counter() async for _ in backend.stream(request)]
        elapsed = time.perf_counter() - started
        generated = backend.generated_tokens - before
        rates.append(generated / elapsed)
        first.append(stamps[0] - started)
        if generated > 1:
            decode_rates.append((generated - 1) / (stamps[-1] - stamps[0]))
    return {
        "tokens_per_run": generated,
        "tokens_per_s": statistics.median(rates),
        "decode_tokens_per_s": statistics.median(decode_rates),
        "first_token_s": statistics.median(first),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help='"smollm2", a .gguf file or a model directory')
    parser.add_argument("--cache-dir", default="data/models", help="where a GGUF model is cached de-quantized")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()

    backend = LocalBackend(args.model, Path(args.cache_dir).resolve(), threads=args.threads, repetition_penalty=1.0)
    await backend.start()
    model = backend._model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    speed = await measure(backend, args.tokens, args.runs)
    await backend.close()
    bandwidth = memory_bandwidth()
    ceiling = bandwidth["read_gb_s"] * 1e9 / weight_bytes

    print(f"local generation, batch 1, greedy, {speed['tokens_per_run']} new tokens, {torch.get_num_threads()} threads")
    print(f"model: {backend.model_dir} ({weight_bytes / 1e6:,.0f} MB of fp32 weights)")
    print(f"memory: read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s (read + write)")
    print(
        report.table(
            ["", "tokens/s", "vs ceiling"],
            [
                ["bandwidth ceiling (read rate / weight bytes)", ceiling, 1.0],
                ["attune local backend, decode", speed["decode_tokens_per_s"], speed["decode_tokens_per_s"] / ceiling],
                ["attune local backend, end to end", speed["tokens_per_s"], speed["tokens_per_s"] / ceiling],
            ],
        )
    )
    print(f"first token after {speed['first_token_s'] * 1000:.0f} ms (prompt of {len(PROMPT)} messages)")
    path = report.save(
        "generation",
        {
            "params": vars(args),
            "threads": torch.get_num_threads(),
            "weight_bytes": weight_bytes,
            **bandwidth,
            "ceiling_tokens_per_s": ceiling,
            **speed,
            "ratio_to_ceiling": speed["decode_tokens_per_s"] / ceiling,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
