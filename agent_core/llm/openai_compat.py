"""Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp server, Ollama) via the ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import openai

from agent_core.llm.base import AdapterRef, GenerationRequest, LLMBackend, LLMError

# Which model name to ask for, given the user's adapter (None: the base model). The
# default asks vLLM for the adapter by its registered name.
ModelNameHook = Callable[[AdapterRef | None], str]


class OpenAIBackend(LLMBackend):
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        context_window: int = 8192,
        timeout_s: float = 120.0,
        max_retries: int = 1,
        model_name: ModelNameHook | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.context_window = context_window
        self.model_name: ModelNameHook = model_name or (lambda a: a.name if a else self.model)
        # Servers without authentication (vLLM, Ollama) accept any key; the client needs one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=max_retries
        )

    async def start(self) -> None:
        """Nothing to load: the server holds the model."""

    async def close(self) -> None:
        await self._client.close()

    def describe(self) -> str:
        return f"openai-compatible {self.model} at {self.base_url}"

    def count_tokens(self, text: str) -> int:
        # No tokenizer for an arbitrary server's model: about four characters a token.
        return len(text) // 4 + 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            chunks = await self._client.chat.completions.create(
                model=self.model_name(request.adapter),
                messages=list(request.messages),  # type: ignore[arg-type]
                max_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stream=True,
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.OpenAIError as exc:
            raise LLMError(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc
