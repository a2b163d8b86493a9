"""Weight-only, group-wise quantized weights for the batched decoder (``[llm.local] weights``).

Decoding one token reads every weight once, so fewer bytes per weight is more tokens a
second. The layouts are llama.cpp's, in groups of :data:`GROUP` along the input dimension,
one fp32 scale per group (the GGUF keeps it as fp16; widening it is exact):

- ``int8`` (GGUF Q8_0): ``w = scale * q`` with ``q`` an int8;
- ``int4`` (GGUF Q4_1): ``w = scale * q + minimum`` with ``q`` in 0..15, two to a byte: in a
  group's 16 bytes, byte ``j`` holds element ``j`` in its low nibble and ``j + 16`` in its high.
  The output layer (``lm_head``, in SmolLM2 the embedding too) stays int8 in this mode, as
  llama.cpp's Q4_1 files keep it.

Where the model was converted from a GGUF whose tensor has that layout already, its blocks
are read straight from the file, checked against the converted fp32 weight (so a layout
or row order this module misreads is never served). The shipped SmolLM2 is Q4_1 with a
Q8_0 embedding, so there ``int4`` serves exactly the weights of the fp32 model. Otherwise
the fp32 weight is quantized here (round to nearest: absmax for int8, min/max for int4).

:func:`quantize_model` also puts the dequantized values into the transformers model
itself, so every path computes with the same weights: plain ``generate``, oneDNN and
``F.linear`` on the fp32 copy, and the compiled loops of :mod:`agent_core.llm.kernels`,
which read the blocks. LoRA products stay in fp32. The blocks are cached in the model
cache (``weights-int8.safetensors``, ``weights-int4.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GROUP = 32
MODES = ("fp32", "int8", "int4")
OUTPUT = "lm_head.weight"  # kept int8 in int4 mode
_GGUF_LAYOUT = {"int8": "Q8_0", "int4": "Q4_1"}


@dataclass(frozen=True)
class Quantized:
    """One weight matrix [out, in] in a quantized layout (see the module docstring)."""

    layout: str  # "int8" or "int4"
    q: torch.Tensor  # int8 [out, in], or uint8 [out, in / 2] for int4
    scale: torch.Tensor  # fp32 [out, in / GROUP]
    minimum: torch.Tensor | None = None  # fp32 [out, in / GROUP], int4 only

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scale.shape[0]), int(self.scale.shape[1]) * GROUP

    @property
    def nbytes(self) -> int:
        extra = self.minimum.numel() * 4 if self.minimum is not None else 0
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 4 + extra

    def values(self) -> torch.Tensor:
        """The quantized integers as [out, groups, GROUP], in element order."""
        n, k = self.shape
        if self.layout == "int8":
            return self.q.view(n, k // GROUP, GROUP)
        packed = self.q.view(n, k // GROUP, GROUP // 2)
        return torch.cat((packed & 15, packed >> 4), dim=-1)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for."""
        n, k = self.shape
        w = self.values().float() * self.scale.unsqueeze(-1)
        if self.minimum is not None:
            w = w + self.minimum.unsqueeze(-1)
        return w.view(n, k)

    @classmethod
    def from_float(cls, weight: torch.Tensor, layout: str) -> Quantized:
        """Round-to-nearest quantization of an fp32 [out, in] weight (in divisible by GROUP)."""
        n, k = weight.shape
        groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
        if layout == "int8":
            scale = groups.abs().amax(-1) / 127
            safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
            q = torch.round(groups / safe).clamp_(-127, 127).to(torch.int8)
            return cls("int8", q.reshape(n, k).contiguous(), scale.contiguous())
        if layout != "int4":
            raise ValueError(f"unknown layout {layout!r}")
        low, high = groups.amin(-1), groups.amax(-1)
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        q = torch.round((groups - low.unsqueeze(-1)) / safe).clamp_(0, 15).to(torch.uint8)
        return cls("int4", _pack(q).reshape(n, k // 2), scale.contiguous(), low.contiguous())

    @classmethod
    def from_gguf_blocks(cls, raw: Any, kind: str) -> Quantized:
        """Blocks as GGUF stores them (``raw``: uint8 [out, groups * block bytes]) of a
        Q8_0 or Q4_1 tensor."""
        blocks = torch.from_numpy(raw.copy()) if not isinstance(raw, torch.Tensor) else raw
        n = blocks.shape[0]
        if kind == "Q8_0":  # fp16 scale, 32 int8
            b = blocks.view(n, -1, 2 + GROUP)
            scale = b[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
            q = b[..., 2:].contiguous().view(torch.int8)
            return cls("int8", q.reshape(n, -1).contiguous(), scale.contiguous())
        if kind == "Q4_1":  # fp16 scale, fp16 minimum, 16 bytes of nibbles
            b = blocks.view(n, -1, 4 + GROUP // 2)
            scale = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
            minimum = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
            q = b[..., 4:].contiguous()
            return cls("int4", q.reshape(n, -1).contiguous(), scale.contiguous(), minimum.contiguous())
        raise ValueError(f"GGUF blocks of type {kind} are not read here")

    def rows(self, order: torch.Tensor) -> Quantized:
        """These blocks with their output rows taken in ``order``."""
        minimum = self.minimum[order].contiguous() if self.minimum is not None else None
        return Quantized(self.layout, self.q[order].contiguous(), self.scale[order].contiguous(), minimum)

    @staticmethod
    def cat(parts: Sequence[Quantized]) -> Quantized:
        """Several weights sharing an input, stacked along the output (fused projections)."""
        if len({p.layout for p in parts}) != 1:
            raise ValueError("cannot stack weights of different layouts")
        if len(parts) == 1:
            return parts[0]
        minimum = torch.cat([p.minimum for p in parts]) if parts[0].minimum is not None else None  # type: ignore[misc]
        return Quantized(parts[0].layout, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                         minimum)  # fmt: skip


def _pack(q: torch.Tensor) -> torch.Tensor:
    """[..., GROUP] values 0..15 -> [..., GROUP / 2] bytes: element j low, element j + 16 high."""
    half = GROUP // 2
    return (q[..., :half] | (q[..., half:] << 4)).contiguous()


def layout_for(name: str, mode: str) -> str:
    """The layout a weight gets in ``mode``: the output layer stays int8 in int4 mode."""
    return "int8" if mode == "int8" or name == OUTPUT else "int4"


def quantizable(model: Any) -> dict[str, torch.Tensor]:
    """The weights quantized: every linear layer of the decoder blocks, and the output layer."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        in_decoder = ".layers." in f".{name}" or f"{name}.weight" == OUTPUT
        if isinstance(module, torch.nn.Linear) and module.in_features % GROUP == 0 and in_decoder:
            out[f"{name}.weight"] = module.weight
    return out


def quantize_model(model: Any, mode: str, cache: Path, *, gguf: Path | None = None) -> dict[str, Quantized]:
    """``model``'s linear weights in ``mode`` ("int8" or "int4"), keyed by parameter name,
    from the cache in ``cache`` if there, else from ``gguf``'s own blocks where they have
    the layout and quantized here for the rest (then cached); the model's weights are set
    to the dequantized values. "fp32": nothing to do, an empty dict."""
    if mode == "fp32":
        return {}
    if mode not in MODES:
        raise ValueError(f"[llm.local] weights = {mode!r}: use one of {', '.join(MODES)}")
    weights = quantizable(model)
    file = cache / f"weights-{mode}.safetensors"
    stamp = _stamp(weights, mode, gguf)
    cached = _read(file, stamp)
    if cached is not None and set(cached[0]) == set(weights):
        blocks, exact = cached
        with torch.no_grad():
            for name, w in weights.items():
                if name not in exact:  # (de-quantizing all of SmolLM2 takes about 2 s)
                    w.copy_(blocks[name].dequantize())
        return blocks
    started = time.monotonic()
    from_file = _from_gguf(gguf, weights, mode, model.config) if gguf is not None else {}
    blocks = {name: from_file.get(name) or Quantized.from_float(w, layout_for(name, mode))
              for name, w in weights.items()}  # fmt: skip
    exact = set()
    with torch.no_grad():
        for name, w in weights.items():
            dequantized = blocks[name].dequantize()
            if torch.equal(dequantized, w):
                exact.add(name)  # the fp32 weight is these blocks already: nothing to copy at the next start
            else:
                w.copy_(dequantized)
    log.info("weights in %s: %d of %d read from the GGUF's blocks, the rest quantized here; %d equal to the fp32 "
             "weights (%.1f s)", mode, len(from_file), len(blocks), len(exact), time.monotonic() - started)  # fmt: skip
    _write(file, stamp, blocks, exact)
    return blocks


def _from_gguf(gguf: Path, weights: dict[str, torch.Tensor], mode: str, config: Any) -> dict[str, Quantized]:
    """The GGUF's blocks for those of ``weights`` stored there in their layout, each in the
    row order that reproduces the converted fp32 weight exactly (llama's q/k rows are
    permuted in GGUF files); a tensor that matches in no order is left out."""
    import gguf as gguf_lib

    from agent_core.llm.model_files import gguf_tensors

    arch_name, tensors = gguf_tensors(gguf)
    arch = next((a for a, n in gguf_lib.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return {}
    names = gguf_lib.get_tensor_name_map(arch, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    out: dict[str, Quantized] = {}
    for name, weight in weights.items():
        stem = names.get_name(name.removesuffix(".weight"))
        candidates = [f"{stem}.weight"] + (["token_embd.weight"] if name == OUTPUT else [])
        tensor = next((tensors[c] for c in candidates if c in tensors), None)
        want = _GGUF_LAYOUT[layout_for(name, mode)]
        if tensor is None or tensor.tensor_type.name != want:
            continue
        blocks = Quantized.from_gguf_blocks(tensor.data, want)
        if blocks.shape != tuple(weight.shape):
            continue
        for order in _row_orders(int(weight.shape[0]), heads, kv_heads):
            candidate = blocks.rows(order) if order is not None else blocks
            if torch.allclose(candidate.dequantize(), weight.float(), rtol=0, atol=1e-6):
                out[name] = candidate
                break
    return out


def _row_orders(rows: int, heads: int, kv_heads: int) -> list[torch.Tensor | None]:
    """The row orders a GGUF may hold a weight in: as is, or llama's rotary permutation of
    the query (``heads``) or key (``kv_heads``) rows, undone."""
    orders: list[torch.Tensor | None] = [None]
    for n in dict.fromkeys((heads, kv_heads)):
        if rows % (2 * n) == 0:
            permuted = torch.arange(rows).reshape(n, 2, rows // n // 2).transpose(1, 2).reshape(rows)
            orders.append(torch.argsort(permuted))
    return orders


def _stamp(weights: dict[str, torch.Tensor], mode: str, gguf: Path | None) -> str:
    """What the cached blocks were made from: the weights' own values (a digest of a
    sample of each) and the GGUF, so a changed model is never served stale blocks."""
    digest = hashlib.sha256(mode.encode())
    for name, w in sorted(weights.items()):
        flat = w.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(w.shape)).encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().numpy().tobytes())
    if gguf is not None:
        digest.update(f"{gguf.resolve()}:{gguf.stat().st_size}".encode())
    return digest.hexdigest()


def _read(file: Path, stamp: str) -> tuple[dict[str, Quantized], set[str]] | None:
    """The cached blocks, and the names of those equal to the fp32 weights they were made from."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("stamp") != stamp:
                return None
            layouts = json.loads(meta["layouts"])
            blocks = {
                name: Quantized(layout, f.get_tensor(f"{name}.q"), f.get_tensor(f"{name}.scale"),
                                f.get_tensor(f"{name}.minimum") if layout == "int4" else None)
                for name, layout in layouts.items()
            }  # fmt: skip
            return blocks, set(json.loads(meta.get("exact", "[]")))
    except Exception as exc:  # a damaged cache: made again
        log.warning("could not read the quantized weights %s (%s); making them again", file, exc)
        return None


def _write(file: Path, stamp: str, blocks: dict[str, Quantized], exact: set[str]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, b in blocks.items():
        tensors[f"{name}.q"], tensors[f"{name}.scale"] = b.q, b.scale
        if b.minimum is not None:
            tensors[f"{name}.minimum"] = b.minimum
    meta = {"stamp": stamp, "layouts": json.dumps({name: b.layout for name, b in blocks.items()}),
            "exact": json.dumps(sorted(exact))}  # fmt: skip
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, file)
    except OSError as exc:  # a read-only cache: quantized again next time
        log.warning("could not keep the quantized weights in %s (%s)", file, exc)
