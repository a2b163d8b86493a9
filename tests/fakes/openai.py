"""A fake OpenAI-compatible server on 127.0.0.1 that records the requests it gets.

``async with FakeOpenAI() as server``: point a client at ``server.base_url``.

``FakeOpenAI(vllm=True)`` behaves as vLLM started with runtime LoRA updating
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``/v1/load_lora_adapter`` takes
``{"lora_name", "lora_path"}`` and checks that the path is a peft adapter directory,
``/v1/unload_lora_adapter`` takes ``{"lora_name"}``, and a chat completion for a
model that is neither the base model nor a loaded adapter is answered 404, as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web


class FakeOpenAI:
    def __init__(
        self,
        reply: str = "Hello from the fake server.",
        *,
        status: int = 200,
        hang: bool = False,
        vllm: bool = False,
        base_model: str = "base-model",
        port: int = 0,
    ) -> None:
        self.reply = reply
        self.vllm = vllm
        self.base_model = base_model
        self.adapters: dict[str, str] = {}  # loaded LoRA adapters: name -> path
        self.lora_requests: list[tuple[str, dict[str, Any]]] = []  # ("load" or "unload", body)
        self.status = status
        self.hang = hang
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.received = asyncio.Event()
        self._release = asyncio.Event()  # set on exit: a hanging request then ends
        self._runner: web.AppRunner | None = None
        self.port = port  # 0: any free port (the same port again: the server "comes back")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def forget_adapters(self) -> None:
        """What a restart of the server does to runtime-loaded adapters."""
        self.adapters.clear()

    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.lora_requests.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return web.Response(status=400, text="lora_name and lora_path are required")
        if name in self.adapters:
            return web.Response(status=400, text=f"The lora adapter '{name}' has already been loaded.")
        if not (Path(path) / "adapter_config.json").is_file():
            return web.Response(status=400, text=f"Loading lora {name} failed: No adapter found for {path}")
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.lora_requests.append(("unload", body))
        if self.adapters.pop(body.get("lora_name"), None) is None:
            return web.Response(status=400, text=f"The lora adapter '{body.get('lora_name')}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.received.set()
        if self.vllm and body.get("model") not in {self.base_model, *self.adapters}:
            error = {"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                     "type": "NotFoundError", "param": None, "code": 404}  # fmt: skip
            return web.json_response(error, status=404)
        if self.hang:
            await self._release.wait()
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "fake failure", "type": "invalid_request_error"}}, status=self.status
            )
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.reply}}
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in self.reply.split(" "):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
