"""Language model backends behind one contract (:mod:`agent_core.llm.base`)."""

from __future__ import annotations

from pathlib import Path

from agent_core.config import Config, Settings
from agent_core.llm.base import (
    AdapterRef,
    ChatMessage,
    GenerationRequest,
    LLMBackend,
    LLMBusy,
    LLMError,
    Steering,
)

__all__ = [
    "AdapterRef",
    "ChatMessage",
    "GenerationRequest",
    "LLMBackend",
    "LLMBusy",
    "LLMError",
    "Steering",
    "base_model_dir",
    "create_backend",
]


def model_cache_dir(settings: Settings) -> Path:
    local = settings.llm.local
    return Path(local.cache_dir or settings.storage.data_path / "models").expanduser().resolve()


def base_model_dir(settings: Settings) -> Path:
    """The local base model as a transformers directory (converting a GGUF once): what
    adapters are trained on, whichever backend serves replies."""
    from agent_core.llm.model_files import cached_directory, find_model

    return cached_directory(find_model(settings.llm.local.model), model_cache_dir(settings))


def create_backend(config: Config) -> LLMBackend:
    """The backend ``[llm] backend`` names, configured from its own section."""
    llm = config.settings.llm
    if llm.backend == "openai":
        from agent_core.llm.openai_compat import OpenAIBackend

        key = config.secrets.openai_api_key
        return OpenAIBackend(
            base_url=llm.openai.base_url,
            model=llm.openai.model,
            api_key=key.get_secret_value() if key else None,
            context_window=llm.openai.context_window,
            timeout_s=llm.timeout_s,
            max_retries=llm.openai.max_retries,
            load_adapters=llm.openai.load_adapters,
            adapter_dirs=(config.settings.storage.adapters_path, llm.openai.adapter_dir)
            if llm.openai.adapter_dir
            else None,
        )
    from agent_core.llm.batching import BatchLimits
    from agent_core.llm.local import LocalBackend

    local = llm.local
    steering = config.settings.steering
    limits = BatchLimits(
        max_batch_size=local.max_batch_size,
        # a steered reply decodes its candidate sentences side by side: room for each reply's
        max_rows=local.max_batch_size * (steering.candidates if steering.enabled else 1),
        max_queue=local.max_queue,
        batch_wait_s=local.batch_wait_ms / 1000,
        queue_timeout_s=local.queue_timeout_s,
        prefill_chunk=local.prefill_chunk,
    )
    return LocalBackend(
        llm.local.model,
        model_cache_dir(config.settings),
        threads=llm.local.threads,
        context_window=llm.local.context_window,
        repetition_penalty=llm.local.repetition_penalty,
        no_repeat_ngram=llm.local.no_repeat_ngram,
        style_control=llm.local.style_control,
        max_loaded_adapters=llm.local.max_loaded_adapters,
        batching=limits if local.batching else None,
        kernel=llm.local.kernel,
        weights=llm.local.weights,
    )
