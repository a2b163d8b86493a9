"""One forward pass for many users at once, each row with its own LoRA adapter.

A lean decoder for Llama-family models (Llama, Mistral without a sliding window,
Qwen2): it runs the transformers model's own weights, norms and rotary embedding, but
keeps its own key/value cache with one *slot* per request, each at its own length, so
that requests can join and leave a running batch (continuous batching).

LoRA the S-LoRA/Punica way: the base weight is multiplied once for the whole batch,
and beside it every row adds its own small product ``x @ A_row @ B_row`` (two batched
matmuls over per-slot stacks of the adapters' matrices). Rows without an adapter carry
zeros there; a batch with no adapter at all skips the products.

Rows are kept contiguous: the active requests occupy slots ``0..n-1``; when one leaves,
the last one moves into its place (:meth:`BatchDecoder.move`), so the batch is a view of
the cache, never a gather.

A decode step runs in one of two ways. Where the machine chose the compiled loops for
the step's batch size and the compiled attention (:meth:`BatchDecoder.choose_kernels`),
every layer runs in one call, ``decode_step`` in :mod:`agent_core.llm.kernels`, with no
Python between the layers (:meth:`BatchDecoder._decode_compiled`). Otherwise, and for
reading prompts in, :meth:`BatchDecoder._forward` runs the layers one torch operation at
a time. Both compute the same thing; a test holds them to it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agent_core.llm import kernels
from agent_core.llm.base import LLMError
from agent_core.llm.kernels import Gemv, KernelChoice
from agent_core.llm.quantized import Quantized

log = logging.getLogger(__name__)

#: The linear layers of a decoder block an adapter may target.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def supports(model: Any) -> str | None:
    """Why :class:`BatchDecoder` cannot run ``model``; None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} (the batched decoder knows {', '.join(SUPPORTED_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    return None


@dataclass(frozen=True)
class LoraAdapter:
    """One peft LoRA adapter, ready for the row products: for each (layer, projection)
    it targets, ``A`` as [in, r] and ``B`` as [r, out] with the scaling folded in."""

    name: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def load(cls, name: str, path: str | Path) -> LoraAdapter:
        """Read a peft adapter directory (``adapter_config.json`` and the weights)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise LLMError(f"adapter {name}: no adapter_config.json in {folder}")
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise LLMError(f"adapter {name}: cannot read {folder / 'adapter_config.json'}: {exc}") from exc
        problem = _unsupported_lora(config)
        if problem:
            raise LLMError(f"adapter {name}: {problem}")
        files = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
        weights_file = next((f for f in files if f.is_file()), None)
        if weights_file is None:
            raise LLMError(f"adapter {name}: no adapter_model.safetensors in {folder}")
        if weights_file.suffix == ".safetensors":
            state = load_file(weights_file)
        else:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            layer, projection = _layer_and_projection(key)
            b = state[key.replace(".lora_A.", ".lora_B.")]
            weights[(layer, projection)] = (
                a.float().t().contiguous(),
                (b.float() * scaling).t().contiguous(),
            )
        if not weights:
            raise LLMError(f"adapter {name}: no LoRA weights in {weights_file}")
        return cls(name=name, rank=rank, weights=weights)


def _unsupported_lora(config: dict[str, Any]) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft type {config.get('peft_type')} (only LoRA is served)"
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            return f"{key} is not supported"
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        return "bias or modules_to_save is not supported"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "per-module rank or alpha patterns are not supported"
    return None


def _layer_and_projection(key: str) -> tuple[int, str]:
    parts = key.split(".")
    try:
        layer = int(parts[parts.index("layers") + 1])
        projection = next(p for p in parts if p in PROJECTIONS)
    except (ValueError, StopIteration) as exc:
        raise LLMError(f"LoRA weight {key} is not on a decoder block projection") from exc
    return layer, projection


class _Dense:
    """A linear layer (or several sharing an input, fused) prepared for small-batch CPU
    matmuls by each path of :mod:`agent_core.llm.kernels`: the fp32 weight (``gemv``,
    ``linear``), a copy packed once for oneDNN (``onednn``), and in a quantized weights
    mode its int8/int4 blocks, which ``gemv`` then reads instead of the fp32 weight.
    ``choice`` says which path a batch of so many rows takes; once it is final, a copy no
    chosen path reads is dropped."""

    def __init__(self, modules: list[Any], quantized: Mapping[Any, Quantized] | None = None) -> None:
        weight = torch.cat([m.weight.detach() for m in modules]).float().contiguous()
        biases = [m.bias for m in modules]
        self.bias = torch.cat([b.detach() for b in biases]).float() if all(b is not None for b in biases) else None
        self.sizes = [m.weight.shape[0] for m in modules]
        self.in_features = int(weight.shape[1])
        parts = [quantized.get(m) for m in modules] if quantized else []
        self.blocks: Quantized | None = Quantized.cat(parts) if parts and all(parts) else None  # type: ignore[arg-type]
        self.gemv: Gemv | None = None
        self.weight: torch.Tensor | None = weight
        self.packed: torch.Tensor | None = None
        if _onednn():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)
        self.choice = KernelChoice({rows: "linear" for rows in kernels.ROWS}, "forced")

    def run(self, path: str, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ weight.T + bias`` by ``path``."""
        if path == "gemv":
            if self.gemv is None:
                raise LLMError("the compiled gemv is not loaded")
            if self.blocks is not None:
                return self.gemv.blocks(flat.contiguous(), self.blocks, self.bias)
            if self.weight is None:
                raise LLMError("the fp32 weight was dropped")
            return self.gemv(flat.contiguous(), self.weight, self.bias)
        if path == "onednn":
            if self.packed is None:
                raise LLMError("oneDNN's packed weights are not here")
            return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        if self.weight is None:
            raise LLMError("the fp32 weight was dropped")
        return F.linear(flat, self.weight, self.bias)

    def gemv_parts(self) -> list[torch.Tensor | None]:
        """What the compiled step reads for this projection: [q, scale, minimum, weight, bias]."""
        if self.blocks is not None:
            return [self.blocks.q, self.blocks.scale, self.blocks.minimum, None, self.bias]
        return [None, None, None, self.weight, self.bias]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.run(self.choice.path(flat.shape[0]), flat)
        return out.view(*x.shape[:-1], out.shape[-1])

    def keep_only(self, paths: set[str]) -> None:
        """Drop the copies of the weight that none of ``paths`` reads."""
        if "onednn" not in paths:
            self.packed = None
        if "linear" not in paths and not ("gemv" in paths and self.blocks is None):
            self.weight = None
        if "gemv" not in paths:
            self.blocks = None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fused output, cut back into one tensor per original layer."""
        return self(x).split(self.sizes, dim=-1)


PACK_BATCH = 8  # the batch size oneDNN packs the weights for (fastest here for batches of 1 to 16)


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class _RowLora:
    """Per-slot stacks of one projection's adapter matrices: A [slots, in, r], B [slots, r, out]."""

    def __init__(self, slots: int, fan_in: int, fan_out: int, rank: int) -> None:
        self.a = torch.zeros(slots, fan_in, rank)
        self.b = torch.zeros(slots, rank, fan_out)

    def grow(self, rank: int) -> None:
        if rank > self.a.shape[2]:
            self.a = F.pad(self.a, (0, rank - self.a.shape[2]))
            self.b = F.pad(self.b, (0, 0, 0, rank - self.b.shape[1]))

    def set(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        if weights is not None:
            a, b = weights
            self.a[slot, :, : a.shape[1]] = a
            self.b[slot, : b.shape[0]] = b

    def move(self, source: int, target: int) -> None:
        self.a[target] = self.a[source]
        self.b[target] = self.b[source]

    def __call__(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        return torch.bmm(torch.bmm(x, self.a[rows]), self.b[rows])


class BatchDecoder:
    """The model's forward pass over slots of a KV cache, with a LoRA adapter per slot.

    ``prefill(slot, ids)`` reads a new request's prompt into a free slot and returns
    the logits of its last position; ``decode(tokens)`` advances slots ``0..n-1`` by
    one token each and returns their logits. Not thread-safe: one thread drives it.
    """

    def __init__(self, model: Any, slots: int, max_length: int, *, initial_length: int = 256,
                 quantized: Mapping[str, Quantized] | None = None) -> None:  # fmt: skip
        """``quantized``: the model's weights in an int8/int4 mode by parameter name
        (:func:`agent_core.llm.quantized.quantize_model`), read by the compiled loops."""
        problem = supports(model)
        if problem:
            raise LLMError(f"the batched decoder cannot run this model: {problem}")
        config = model.config
        inner = model.model
        by_module = {model.get_submodule(name.removesuffix(".weight")): q for name, q in (quantized or {}).items()}
        layouts = {q.layout for q in by_module.values()}
        self.weights = "int4" if "int4" in layouts else "int8" if layouts else "fp32"  # the mode, for the choice's key
        self.embed = inner.embed_tokens
        self.blocks = [_Block(block, by_module) for block in inner.layers]
        self.norm = _RMSNorm(inner.norm)
        self.rotary = inner.rotary_emb
        self.lm_head = _Dense([model.lm_head], by_module)
        self.kernels = self.lm_head.choice  # F.linear until choose_kernels
        first = self.blocks[0]
        self._sizes = {
            ("q_proj", "k_proj", "v_proj"): first.qkv.sizes,
            ("o_proj",): first.o.sizes,
            ("gate_proj", "up_proj"): first.gate_up.sizes,
            ("down_proj",): first.down.sizes,
        }
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.slots = slots
        self.max_length = max_length
        self.lengths = [0] * slots  # tokens in each slot's cache
        self.adapters: list[LoraAdapter | None] = [None] * slots
        capacity = min(initial_length, max_length)
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape) for _ in self.blocks]
        self.values = [torch.zeros(shape) for _ in self.blocks]
        self.lora: dict[tuple[int, str], _RowLora] = {}
        self.attend: Gemv | None = None  # the compiled decode attention, where it is faster (choose_kernels)
        self._step_weights: list[list[Any]] = []  # the norms and projections as the compiled step reads them

    # --- the matmul paths --------------------------------------------------------------

    def _denses(self) -> list[_Dense]:
        return [d for b in self.blocks for d in (b.qkv, b.o, b.gate_up, b.down)] + [self.lm_head]

    def choose_kernels(self, gemv: Gemv | None, *, setting: str = "auto", cache: Path | None = None,
                       final: bool = True) -> KernelChoice:  # fmt: skip
        """Decide the matmul path per batch size (:func:`kernels.choose`) among those this
        machine has, or the one ``setting`` names; ``final``: False while ``gemv`` is still
        being built (the choice is made again once it is). Run on the thread that decodes."""
        denses = self._denses()
        for dense in denses:
            dense.gemv = gemv
        first = denses[0]
        here = {"gemv": gemv is not None and (first.weight is not None or first.blocks is not None),
                "onednn": first.packed is not None, "linear": first.weight is not None}  # fmt: skip
        paths = [p for p in kernels.PATHS if here[p]]
        if setting in paths:
            choice = KernelChoice({rows: setting for rows in kernels.ROWS}, "forced", final=True)
        else:
            if setting != "auto" and final:
                why = "no compiler or no AVX2" if setting == "gemv" else "not in this torch"
                log.warning("[llm.local] kernel = %r is not available here (%s); the fastest of %s is used", setting,
                            why, paths)  # fmt: skip
            shapes = ";".join(f"{d.in_features}x{sum(d.sizes)}" for d in denses) + f";weights {self.weights}"
            choice = kernels.choose(lambda path, x, i: denses[i].run(path, x), [d.in_features for d in denses],
                                    paths, cache=cache, shapes=shapes, final=final)  # fmt: skip
        for dense in denses:
            dense.choice = choice
            if choice.final:
                dense.keep_only(set(choice.by_rows.values()))
        self.kernels = choice
        self.attend = gemv if gemv is not None and self._compiled_attention_faster(gemv) else None
        self._step_weights = [
            [p for b in self.blocks for p in (b.attention_norm.weight, b.mlp_norm.weight)] + [self.norm.weight],
            [d.gemv_parts() for d in denses],
        ]
        log.info("decoding matmuls: %s", choice.describe())
        compiled = [r for r in kernels.ROWS[:-1] if self.attend is not None and choice.path(r) == "gemv"]
        if compiled:
            log.info("decode steps of up to %d rows: one compiled call each", max(compiled))
        elif choice.final:
            why = "no compiled loops here" if gemv is None else "the compiled loops or attention were slower here"
            log.info("decode steps: layer by layer in torch operations (%s)", why)
        return choice

    # --- slots -------------------------------------------------------------------------

    def _compiled_attention_faster(self, gemv: Gemv) -> bool:
        """Whether the compiled decode attention (``gemv.attend``) agrees with torch's
        (:func:`decode_attention`) and is faster here, at 1 and at 8 rows (rows of
        different lengths, about 250 cached tokens): timed, not assumed, as the matmul
        paths are."""
        generator = torch.Generator().manual_seed(0)
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        ways: dict[str, Callable[..., torch.Tensor]] = {"compiled": gemv.attend, "torch": decode_attention}
        seconds = dict.fromkeys(ways, 0.0)
        for rows in (1, 8):
            qkv = torch.randn(rows, 1, (heads + 2 * kv) * dim, generator=generator)
            cos, sin = (torch.randn(rows, 1, 1, dim, generator=generator) for _ in range(2))
            at = torch.arange(rows) * 29 + 200
            outs = {}
            for name, way in ways.items():
                caches = [torch.randn(rows, kv, 512, dim, generator=torch.Generator().manual_seed(1)) for _ in "kv"]
                outs[name] = way(qkv, cos, sin, *caches, at, heads, kv)
                began = time.perf_counter()
                for _ in range(20):
                    way(qkv, cos, sin, *caches, at, heads, kv)
                seconds[name] += (time.perf_counter() - began) / 40
            if not torch.allclose(outs["compiled"], outs["torch"], atol=1e-4):
                log.warning("the compiled decode attention disagrees with torch's here; it is not used")
                return False
        faster = seconds["compiled"] < seconds["torch"]
        chosen = "compiled" if faster else "torch operations"
        log.info("decode attention: %s (a layer: %.0f us compiled, %.0f us in torch operations)", chosen,
                 seconds["compiled"] * 1e6, seconds["torch"] * 1e6)  # fmt: skip
        return faster

    def assign(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Empty ``slot`` and give it ``adapter`` (None: the base model)."""
        self.lengths[slot] = 0
        self.adapters[slot] = adapter
        if adapter is not None:
            for (layer, projection), (a, b) in adapter.weights.items():
                if (layer, projection) not in self.lora:
                    self.lora[(layer, projection)] = _RowLora(self.slots, a.shape[0], b.shape[1], adapter.rank)
        for (layer, projection), stack in self.lora.items():
            if adapter is not None:
                stack.grow(adapter.rank)
            stack.set(slot, adapter.weights.get((layer, projection)) if adapter else None)

    def move(self, source: int, target: int) -> None:
        """Move a request's cache and adapter from ``source`` to ``target`` (to close a gap)."""
        n = self.lengths[source]
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :n] = keys[source, :, :n]
            values[target, :, :n] = values[source, :, :n]
        for stack in self.lora.values():
            stack.move(source, target)
        self.lengths[target], self.adapters[target] = n, self.adapters[source]
        self.lengths[source], self.adapters[source] = 0, None

    def copy(self, source: int, target: int, start: int = 0) -> None:
        """Make ``target`` a copy of ``source`` (cache and adapter); positions before
        ``start`` are taken to be equal already (the candidates of a steered reply share
        what was kept of it)."""
        n = self.lengths[source]
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, start:n] = keys[source, :, start:n]
            values[target, :, start:n] = values[source, :, start:n]
        if self.adapters[target] is not self.adapters[source]:
            for stack in self.lora.values():
                stack.move(source, target)
        self.lengths[target], self.adapters[target] = n, self.adapters[source]

    def rewind(self, slot: int, length: int) -> None:
        """Forget ``slot``'s cache after its first ``length`` positions (they are overwritten next)."""
        self.lengths[slot] = min(self.lengths[slot], length)

    def _reserve(self, length: int) -> None:
        """Make room for ``length`` tokens in every slot (doubling, up to max_length)."""
        capacity = self.keys[0].shape[2]
        if length <= capacity:
            return
        if length > self.max_length:
            raise LLMError(f"{length} tokens do not fit the context window of {self.max_length}")
        new = min(max(length, 2 * capacity), self.max_length)
        pad = (0, 0, 0, new - capacity)
        self.keys = [F.pad(k, pad) for k in self.keys]
        self.values = [F.pad(v, pad) for v in self.values]

    # --- forward -----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Read prompt tokens into ``slot``, which holds the prompt's first ``start`` tokens
        already (0: an empty slot; a long prompt is read in chunks); the logits [vocab]
        after the last of them."""
        end = start + len(ids)
        self._reserve(end)
        positions = torch.arange(start, end).unsqueeze(0)
        logits = self._forward(torch.tensor([ids]), positions, slice(slot, slot + 1), None, start=start)
        self.lengths[slot] = end
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Advance slots ``0..len(tokens)-1`` by one token each; logits [rows, vocab]."""
        rows = len(tokens)
        lengths = self.lengths[:rows]
        self._reserve(max(lengths) + 1)
        positions = torch.tensor(lengths).unsqueeze(1)
        if self.attend is not None and self.kernels.path(rows) == "gemv":
            logits = self._decode_compiled(torch.tensor(tokens), positions)
        else:
            logits = self._forward(torch.tensor(tokens).unsqueeze(1), positions, slice(0, rows), positions)[:, -1]
        for row in range(rows):
            self.lengths[row] += 1
        return logits

    def angles(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin at ``positions`` ([batch, span, head_dim] each), sin with
        its first half negated: rotate_half(x) * sin == roll(x, half) * that sin."""
        cos, sin = self.rotary(x, positions)
        half = sin.shape[-1] // 2
        return cos.contiguous(), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _decode_compiled(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` as one compiled call (``decode_step`` in agent_core/llm/kernels.py),
        where every matmul at this batch size takes the compiled loops and the attention
        is compiled too: the same layers as :meth:`_forward`, with no Python between them."""
        assert self.attend is not None
        rows = tokens.shape[0]
        x = self.embed(tokens)
        cos, sin = self.angles(x[:, None], positions)
        adapted = [row for row in range(rows) if self.adapters[row] is not None]
        adapters: list[torch.Tensor | None] = []
        if adapted:
            for layer in range(len(self.blocks)):
                for name in (name for names in self._sizes for name in names):  # the order decode_step reads
                    stack = self.lora.get((layer, name))
                    adapters += [stack.a, stack.b] if stack is not None else [None, None]
        norms, denses = self._step_weights
        return self.attend.decode_step(x, norms, self.norm.eps, denses, adapters, adapted, self.keys, self.values,
                                       cos, sin, positions[:, 0].contiguous(), self.heads,
                                       self.kv_heads)  # fmt: skip

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: slice, decode_at: torch.Tensor | None, start: int = 0
    ) -> torch.Tensor:
        """The logits after each row's last position (a prompt's others are not needed)."""
        x = self.embed(ids)
        step = _Pass(self, x, positions, rows, decode_at, start)
        for i, block in enumerate(self.blocks):
            x = x + self._attention(i, block, block.attention_norm(x), step)
            x = x + self._mlp(i, block, block.mlp_norm(x), step)
        return self.lm_head(self.norm(x[:, -1:]))

    def _lora(self, layer: int, names: tuple[str, ...], out: torch.Tensor, x: torch.Tensor, step: _Pass) -> None:
        """Add each row's own adapter products for these (fused) projections to ``out``."""
        if not step.lora:
            return
        start = 0
        for name, size in zip(names, self._sizes[names], strict=True):
            if (stack := self.lora.get((layer, name))) is not None:
                out[..., start : start + size] += stack(x, step.rows)
            start += size

    def _attention(self, layer: int, block: _Block, x: torch.Tensor, step: _Pass) -> torch.Tensor:
        heads, kv_heads = self.heads, self.kv_heads
        qkv = block.qkv(x)
        self._lora(layer, ("q_proj", "k_proj", "v_proj"), qkv, x, step)
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if step.at is not None and self.attend is not None:  # the compiled call does what the lines below do
            out = self.attend.attend(qkv.contiguous(), step.cos, step.sin, cache_k, cache_v, step.at, heads, kv_heads)
        else:
            out = self._attend_in_torch(qkv, cache_k, cache_v, step)
        projected = block.o(out)
        self._lora(layer, ("o_proj",), projected, out, step)
        return projected

    def _attend_in_torch(self, qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                         step: _Pass) -> torch.Tensor:  # fmt: skip
        """Rotary, cache writes and attention in torch operations; [batch, span, heads dim]."""
        batch, span, _ = qkv.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk = qkv[..., : (heads + kv_heads) * dim].view(batch, span, heads + kv_heads, dim)
        qk = qk * step.cos + torch.roll(qk, dim // 2, -1) * step.sin  # rotary, queries and keys at once
        q = qk[:, :, :heads].transpose(1, 2)
        k = qk[:, :, heads:].transpose(1, 2)
        v = qkv[..., (heads + kv_heads) * dim :].view(batch, span, kv_heads, dim).transpose(1, 2)
        if step.at is None:  # a prompt, or a chunk of one after step.start tokens
            cache_k[step.rows, :, step.start : step.width] = k
            cache_v[step.rows, :, step.start : step.width] = v
        elif step.single is not None:  # one row: plain slicing, cheaper than a scatter
            cache_k[0, :, step.single] = k[0, :, 0]
            cache_v[0, :, step.single] = v[0, :, 0]
        else:
            cache_k[step.index, :, step.at] = k[:, :, 0]
            cache_v[step.index, :, step.at] = v[:, :, 0]
        out = F.scaled_dot_product_attention(
            q,
            cache_k[step.rows, :, : step.width],
            cache_v[step.rows, :, : step.width],
            attn_mask=step.mask,
            is_causal=step.at is None and span > 1 and step.start == 0,
            enable_gqa=kv_heads != heads,
        )
        return out.transpose(1, 2).reshape(batch, span, heads * dim)

    def _mlp(self, layer: int, block: _Block, x: torch.Tensor, step: _Pass) -> torch.Tensor:
        gate_up = block.gate_up(x)
        self._lora(layer, ("gate_proj", "up_proj"), gate_up, x, step)
        gate, up = gate_up.split(block.gate_up.sizes, dim=-1)
        hidden = F.silu(gate) * up
        out = block.down(hidden)
        self._lora(layer, ("down_proj",), out, hidden, step)
        return out


class _Pass:
    """What every layer of one forward pass shares: the rows, the rotary angles, and for
    a decode step each row's position and the attention mask over its own length (for a
    later chunk of a prompt, the causal mask over the chunk and what precedes it)."""

    def __init__(
        self, decoder: BatchDecoder, x: torch.Tensor, positions: torch.Tensor, rows: slice, at: torch.Tensor | None,
        start: int = 0,
    ) -> None:  # fmt: skip
        self.rows = rows
        self.start = start
        self.lora = any(a is not None for a in decoder.adapters[rows])
        cos, sin = decoder.angles(x, positions)
        self.cos, self.sin = cos.unsqueeze(2), sin.unsqueeze(2)
        self.at: torch.Tensor | None = None
        self.single: int | None = None  # a decode step of one row: its position
        self.mask: torch.Tensor | None = None  # None: every row sees its whole cache (or a causal prompt)
        self.width = start + x.shape[1]
        if start and x.shape[1] > 1:  # query i (at start + i) sees the keys up to start + i
            visible = torch.arange(self.width).unsqueeze(0) <= torch.arange(start, self.width).unsqueeze(1)
            self.mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        if at is not None:
            self.at = at[:, 0]
            self.index = torch.arange(x.shape[0])
            self.width = int(self.at.max()) + 1  # the longest row's cache, including this token
            if x.shape[0] == 1:
                self.single = self.width - 1
            else:
                visible = torch.arange(self.width).unsqueeze(0) <= at  # [rows, width]: each row's own length
                self.mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]


class _Block:
    """One decoder block's weights: RMS norms, projections fused and packed."""

    def __init__(self, block: Any, quantized: Mapping[Any, Quantized]) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.attention_norm = _RMSNorm(block.input_layernorm)
        self.mlp_norm = _RMSNorm(block.post_attention_layernorm)
        self.qkv = _Dense([attn.q_proj, attn.k_proj, attn.v_proj], quantized)
        self.o = _Dense([attn.o_proj], quantized)
        self.gate_up = _Dense([mlp.gate_proj, mlp.up_proj], quantized)
        self.down = _Dense([mlp.down_proj], quantized)


class _RMSNorm:
    """The model's RMS norm as one fused op."""

    def __init__(self, norm: Any) -> None:
        self.weight = norm.weight.detach()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def decode_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    at: torch.Tensor, heads: int, kv_heads: int,
) -> torch.Tensor:  # fmt: skip
    """What the compiled ``Gemv.attend`` does, in torch operations: row i's new query and
    key rotated (``cos``, ``sin`` as :class:`_Pass` has them), its key and value written
    at position ``at[i]`` of cache slot i, then its attention over positions 0..at[i].
    ``qkv`` [rows, 1, (heads + 2 kv_heads) dim]; returns [rows, 1, heads dim]."""
    rows, dim = qkv.shape[0], keys.shape[-1]
    qk = qkv[..., : (heads + kv_heads) * dim].view(rows, 1, heads + kv_heads, dim)
    qk = qk * cos + torch.roll(qk, dim // 2, -1) * sin
    index = torch.arange(rows)
    keys[index, :, at] = qk[:, 0, heads:]
    values[index, :, at] = qkv[:, 0, (heads + kv_heads) * dim :].reshape(rows, kv_heads, dim)
    width = int(at.max()) + 1
    hidden = torch.arange(width)[None, :] > at[:, None]
    mask = torch.zeros(rows, width).masked_fill_(hidden, float("-inf"))[:, None, None, :]
    queries = qk[:, :, :heads].transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys[:rows, :, :width], values[:rows, :, :width], attn_mask=mask,
                                         enable_gqa=kv_heads != heads)  # fmt: skip
    return out.transpose(1, 2).reshape(rows, 1, heads * dim)
