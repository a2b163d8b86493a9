"""A fake Telegram Bot API on 127.0.0.1 for python-telegram-bot to talk to.

It answers getMe, deleteWebhook, setMyCommands, getUpdates (long polling over a queue
the test fills), sendMessage, sendDocument and sendChatAction, and records every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

from aiohttp import web

BOT = {"id": 999, "is_bot": True, "first_name": "attune", "username": "attune_bot"}


def user(user_id: int, name: str = "Ann") -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": name}


def chat(chat_id: int) -> dict[str, Any]:
    return {"id": chat_id, "type": "private"} if chat_id > 0 else {"id": chat_id, "type": "supergroup", "title": "G"}


class FakeTelegram:
    def __init__(self, token: str = "123:TEST") -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(10_000)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.forbidden_chats: set[int] = set()  # users who never opened a private chat

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what the test does ------------------------------------------------------------

    async def push(self, update: dict[str, Any]) -> int:
        """Queue an update (its update_id is assigned here unless given) for the bot's next poll."""
        update.setdefault("update_id", next(self._update_ids))
        async with self._changed:
            self.updates.append(update)
            self._changed.notify_all()
        return int(update["update_id"])

    def message(self, chat_id: int, user_id: int, text: str, **extra: Any) -> dict[str, Any]:
        """A ``message`` update's payload."""
        return {
            "message_id": next(self._message_ids), "date": int(time.time()), "chat": chat(chat_id),
            "from": user(user_id), "text": text, **extra,
        }  # fmt: skip

    async def push_text(self, chat_id: int, user_id: int, text: str, **extra: Any) -> dict[str, Any]:
        message = self.message(chat_id, user_id, text, **extra)
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        await self.push({"message": message})
        return message

    async def push_reaction(self, chat_id: int, user_id: int, message_id: int, old: list[str], new: list[str]) -> None:
        await self.push({"message_reaction": {
            "chat": chat(chat_id), "message_id": message_id, "user": user(user_id), "date": int(time.time()),
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
            "new_reaction": [{"type": "emoji", "emoji": e} for e in new],
        }})  # fmt: skip

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    async def wait_sent(self, count: int, method: str = "sendMessage", timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until ``count`` calls of ``method`` have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.sent(method)) < count:
                await asyncio.sleep(0.02)
        return self.sent(method)

    # --- the Bot API ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        if request.can_read_body:
            if request.content_type == "application/json":
                params = await request.json()
            else:
                for key, value in (await request.post()).items():
                    params[key] = value.file.read() if hasattr(value, "file") else value
        self.calls.append((method, params))
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return _ok(True)
        return await handler(params)

    async def _api_getMe(self, params: dict[str, Any]) -> web.Response:
        return _ok(BOT)

    async def _api_getUpdates(self, params: dict[str, Any]) -> web.Response:
        offset = int(params.get("offset", 0) or 0)
        timeout = float(params.get("timeout", 0) or 0)
        async with self._changed:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
            if not self.updates and timeout:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=timeout)
            return _ok(list(self.updates))

    def _message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        return {"message_id": next(self._message_ids), "date": int(time.time()),
                "chat": chat(int(params["chat_id"])), "from": BOT, **content}  # fmt: skip

    async def _api_sendMessage(self, params: dict[str, Any]) -> web.Response:
        if int(params["chat_id"]) in self.forbidden_chats:
            return web.json_response(
                {"ok": False, "error_code": 403, "description": "Forbidden: bot can't initiate conversation"},
                status=403,
            )
        return _ok(self._message(params, text=params["text"]))

    async def _api_editMessageText(self, params: dict[str, Any]) -> web.Response:
        return _ok(self._message(params, text=params["text"]) | {"message_id": int(params["message_id"])})

    async def _api_sendDocument(self, params: dict[str, Any]) -> web.Response:
        return _ok(self._message(params, document={"file_id": "f1", "file_unique_id": "u1"}))


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def parsed(value: Any) -> Any:
    """A form field as python-telegram-bot sent it (JSON for anything but plain strings)."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value
