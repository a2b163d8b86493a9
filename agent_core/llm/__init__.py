"""Language model backends behind one contract (:mod:`agent_core.llm.base`)."""

from __future__ import annotations

from pathlib import Path

from agent_core.config import Config
from agent_core.llm.base import AdapterRef, ChatMessage, GenerationRequest, LLMBackend, LLMError

__all__ = ["AdapterRef", "ChatMessage", "GenerationRequest", "LLMBackend", "LLMError", "create_backend"]


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
        )
    from agent_core.llm.local import LocalBackend

    cache = llm.local.cache_dir or str(config.settings.storage.data_path / "models")
    return LocalBackend(
        llm.local.model,
        Path(cache).expanduser().resolve(),
        threads=llm.local.threads,
        context_window=llm.local.context_window,
        repetition_penalty=llm.local.repetition_penalty,
    )
