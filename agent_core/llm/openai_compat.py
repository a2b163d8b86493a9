"""Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp server, Ollama) via the ``openai`` client.

A user's adapter is asked for by its name in ``model`` (vLLM serves many LoRA adapters
on one base model). With ``load_adapters`` the backend first registers the adapter
with the server through vLLM's runtime LoRA loading (``POST /v1/load_lora_adapter``,
the server started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), once per adapter,
and unloads the owner's previous version. A server that restarted has forgotten them:
an unknown-model answer registers the adapter again and retries once. If the server
will not load an adapter, the user is answered by the base model and the log says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai

from agent_core.llm.base import AdapterRef, GenerationRequest, LLMBackend, LLMError

log = logging.getLogger(__name__)

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
        load_adapters: bool = False,
        adapter_dirs: tuple[Path, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.context_window = context_window
        self.model_name: ModelNameHook = model_name or (lambda a: a.name if a else self.model)
        self.load_adapters = load_adapters
        self.adapter_dirs = adapter_dirs  # (the adapters directory here, the same directory on the server)
        self.loaded: set[str] = set()  # adapters this process registered with the server
        self._loading = asyncio.Lock()
        # Servers without authentication (vLLM, Ollama) accept any key; the client needs one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=max_retries
        )
        self._http = httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key or 'unused'}"}, timeout=timeout_s)

    async def start(self) -> None:
        """Nothing to load: the server holds the model."""

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    def describe(self) -> str:
        return f"openai-compatible {self.model} at {self.base_url}"

    async def unreachable(self) -> str | None:
        """The server answers HTTP (any answer below 500 to ``GET /models``: it is up)."""
        try:
            answer = await self._http.get(f"{self.base_url}/models", timeout=3.0)
        except httpx.HTTPError as exc:
            return f"{self.base_url}: {type(exc).__name__}: {exc}".rstrip(": ")
        return None if answer.status_code < 500 else f"{self.base_url}: HTTP {answer.status_code}"

    def count_tokens(self, text: str) -> int:
        # No tokenizer for an arbitrary server's model: about four characters a token.
        return len(text) // 4 + 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            model = await self._served_model(request.adapter)
            try:
                chunks = await self._create(request, model)
            except openai.NotFoundError:
                if request.adapter is None or request.adapter.name not in self.loaded:
                    raise
                self.loaded.discard(request.adapter.name)  # the server restarted and forgot it
                chunks = await self._create(request, await self._served_model(request.adapter))
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.OpenAIError as exc:
            raise LLMError(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def _create(self, request: GenerationRequest, model: str) -> openai.AsyncStream:  # type: ignore[type-arg]
        return await self._client.chat.completions.create(
            model=model,
            messages=list(request.messages),  # type: ignore[arg-type]
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stream=True,
        )

    async def _served_model(self, adapter: AdapterRef | None) -> str:
        """The model name to ask for, the adapter registered first where that is on."""
        if adapter is not None and self.load_adapters:
            try:
                await self._register(adapter)
            except (httpx.HTTPError, LLMError) as exc:
                log.warning("answering with the base model: %s", exc)
                return self.model
        return self.model_name(adapter)

    async def _register(self, adapter: AdapterRef) -> None:
        async with self._loading:
            if adapter.name in self.loaded:
                return
            body = {"lora_name": adapter.name, "lora_path": self._server_path(adapter.path)}
            answer = await self._http.post(f"{self.base_url}/load_lora_adapter", json=body)
            if answer.status_code != 200 and "already" not in answer.text:
                raise LLMError(
                    f"{self.base_url} did not load adapter {adapter.name}: {answer.status_code} {answer.text[:300]}"
                )
            log.info("registered adapter %s with %s", adapter.name, self.base_url)
            self.loaded.add(adapter.name)
            owner = adapter.name.rsplit("-v", 1)[0]
            for old in sorted(n for n in self.loaded if n != adapter.name and n.rsplit("-v", 1)[0] == owner):
                await self._http.post(f"{self.base_url}/unload_lora_adapter", json={"lora_name": old})
                self.loaded.discard(old)

    def _server_path(self, path: str) -> str:
        if self.adapter_dirs is None:
            return path
        here, there = self.adapter_dirs
        try:
            return str(Path(there) / Path(path).relative_to(here))
        except ValueError:
            return path
