"""A fake Slack on 127.0.0.1: the Web API, a Socket Mode WebSocket, and response URLs.

Web API: auth.test, apps.connections.open, chat.postMessage, chat.postEphemeral.
Socket Mode: sends ``hello``, then every envelope the test pushes; records the acks.
Response URLs: ``/respond/<id>`` records what a slash command answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Any

from aiohttp import WSMsgType, web

BOT_USER = "UBOT"
TEAM = "T1"


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.responses: list[dict[str, Any]] = []  # what was posted to response URLs
        self.acks: list[dict[str, Any]] = []
        self._sockets: list[web.WebSocketResponse] = []
        self._connected = asyncio.Event()
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/respond/{id}", self._respond)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self._sockets:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what the test does ------------------------------------------------------------

    @staticmethod
    def event_body(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {
            "token": "legacy", "team_id": TEAM, "api_app_id": "A1", "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10]}", "event_time": int(time.time()), "event": event,
            "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}],
        }  # fmt: skip

    @staticmethod
    def message(channel: str, user: str, text: str, ts: str | None = None, **extra: Any) -> dict[str, Any]:
        kind = "im" if channel.startswith("D") else "channel"
        return {"type": "message", "channel": channel, "user": user, "text": text, "channel_type": kind,
                "ts": ts or f"{time.time():.6f}", **extra}  # fmt: skip

    @staticmethod
    def mention(channel: str, user: str, text: str, ts: str | None = None) -> dict[str, Any]:
        return {"type": "app_mention", "channel": channel, "user": user, "text": f"<@{BOT_USER}> {text}",
                "ts": ts or f"{time.time():.6f}"}  # fmt: skip

    @staticmethod
    def reaction(kind: str, user: str, channel: str, ts: str, name: str) -> dict[str, Any]:
        item = {"type": "message", "channel": channel, "ts": ts}
        return {"type": kind, "user": user, "reaction": name, "item_user": BOT_USER, "item": item,
                "event_ts": f"{time.time():.6f}"}  # fmt: skip

    def command(self, channel: str, user: str, text: str, command: str = "/attune") -> dict[str, Any]:
        return {
            "token": "legacy", "team_id": TEAM, "channel_id": channel, "user_id": user, "command": command,
            "text": text, "response_url": f"http://127.0.0.1:{self.port}/respond/{uuid.uuid4().hex}",
            "trigger_id": uuid.uuid4().hex, "api_app_id": "A1",
        }  # fmt: skip

    async def connected(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def push(self, kind: str, payload: dict[str, Any], retry_attempt: int = 0) -> str:
        """Send an envelope over Socket Mode; its envelope id."""
        envelope_id = uuid.uuid4().hex
        envelope = {"envelope_id": envelope_id, "type": kind, "payload": payload,
                    "accepts_response_payload": kind != "events_api", "retry_attempt": retry_attempt,
                    "retry_reason": "timeout" if retry_attempt else ""}  # fmt: skip
        await self._sockets[-1].send_str(json.dumps(envelope))
        return envelope_id

    async def push_raw(self, text: str) -> None:
        await self._sockets[-1].send_str(text)

    def posted(self, method: str = "chat.postMessage") -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    async def wait_for(self, what: str, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Wait for ``count`` items of ``what``: a Web API method, "responses" or "acks"."""

        def items() -> list[dict[str, Any]]:
            return self.responses if what == "responses" else self.acks if what == "acks" else self.posted(what)

        async with asyncio.timeout(timeout):
            while len(items()) < count:
                await asyncio.sleep(0.02)
        return items()

    # --- the servers -------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        self.calls.append((method, params))
        if method == "auth.test":
            identity = {"team": "Test", "user": "attune", "team_id": TEAM, "user_id": BOT_USER, "bot_id": "BBOT"}
            return web.json_response({"ok": True, "url": "https://test.slack.invalid/", **identity})
        if method == "apps.connections.open":
            return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"})
        if method in ("chat.postMessage", "chat.postEphemeral"):
            ts = f"{1_700_000_000 + next(self._ts)}.000100"
            return web.json_response({"ok": True, "channel": params.get("channel"), "ts": ts,
                                      "message": {"text": params.get("text"), "ts": ts}})  # fmt: skip
        return web.json_response({"ok": True})

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        hello = {
            "type": "hello",
            "num_connections": 1,
            "debug_info": {"host": "fake"},
            "connection_info": {"app_id": "A1"},
        }
        await ws.send_str(json.dumps(hello))
        self._connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.acks.append(json.loads(msg.data))
        return ws

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        return web.json_response({"ok": True})
