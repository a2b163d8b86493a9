"""Chunked prefill: how a reply under way fares while another user's long prompt is read in.

    python -m bench.prefill [--prompt-tokens 2000] [--chunks 0,64,256] [--json OUT]

On the real model (default weights mode, the measured kernels), one user's reply is
generating when a second user sends a long prompt. For each ``prefill_chunk`` (0: the
whole prompt at once, as before chunking) the table gives the longest gap between two
tokens of the first reply while the prompt is read in, the tokens it got meanwhile, and
the long prompt's time to its first token. Results: bench/results/prefill.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from agent_core.config import Settings
from agent_core.llm import GenerationRequest
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from bench import report

WHOLE = 8192  # a chunk as long as the context: the prompt is read in one go


async def one_run(backend: LocalBackend, long_text: str) -> dict[str, float]:
    under_way = GenerationRequest(messages=[{"role": "user", "content": "Tell me about the sea, at length."}],
                                  max_new_tokens=400, temperature=0.0)  # fmt: skip
    long = GenerationRequest(messages=[{"role": "user", "content": long_text}], max_new_tokens=4, temperature=0.0)
    stamps: list[float] = []
    first_long: list[float] = []

    async def stream_first() -> None:
        async for _ in backend.stream(under_way):
            stamps.append(time.perf_counter())
            if first_long:
                return

    async def stream_long() -> None:
        while len(stamps) < 5:
            await asyncio.sleep(0.005)
        sent = time.perf_counter()
        async for _ in backend.stream(long):
            first_long.append(time.perf_counter() - sent)
            return

    await asyncio.gather(stream_first(), stream_long())
    during = stamps[4:]  # from about when the long prompt was sent to its first token
    gaps = [b - a for a, b in itertools.pairwise(during)]
    return {"longest_gap_s": max(gaps) if gaps else first_long[0], "tokens_meanwhile": len(during) - 1,
            "long_ttft_s": first_long[0]}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000, help="about how long the long prompt is")
    parser.add_argument("--chunks", default="0,64,256", help="prefill_chunk values to compare (0: no chunking)")
    parser.add_argument("--cache-dir", default="data/models", help="where the GGUF model is cached de-quantized")
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    local = Settings().llm.local
    results: dict[str, Any] = {"prompt_tokens": 0, "weights": local.weights, "runs": {}}
    for chunk in chunks:
        backend = LocalBackend("smollm2", Path(args.cache_dir).resolve(), repetition_penalty=local.repetition_penalty,
                               batching=BatchLimits(max_batch_size=2, prefill_chunk=chunk or WHOLE),
                               weights=local.weights)  # fmt: skip
        await backend.start()
        await asyncio.to_thread(backend.kernels_final.wait, 600)
        words = "On my trip I saw hills, rivers, towns and old bridges, and wrote it all down. "
        text = words * max(1, args.prompt_tokens // max(1, backend.count_tokens(words)))
        results["prompt_tokens"] = backend.count_tokens(text)
        await one_run(backend, text[: len(text) // 8])  # warm: the cache grown, the paths loaded
        results["runs"][str(chunk)] = await one_run(backend, text)
        await backend.close()
    cpu = report.machine()["cpu"]
    print(f"a reply under way while a {results['prompt_tokens']}-token prompt is read in, weights "
          f"{results['weights']}, on {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")  # fmt: skip
    whole = results["runs"].get("0")
    print(report.table(
        ["prefill_chunk", "longest gap in the reply under way (s)", "its tokens meanwhile", "long prompt TTFT (s)",
         "TTFT vs whole"],
        [[chunk if chunk != "0" else "0 (whole prompt)", r["longest_gap_s"], r["tokens_meanwhile"], r["long_ttft_s"],
          f"{r['long_ttft_s'] / whole['long_ttft_s']:.2f}x" if whole else ""] for chunk, r in results["runs"].items()],
    ))  # fmt: skip
    path = report.save("prefill", results)
    if args.json:
        Path(args.json).write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
