"""A fake Discord on 127.0.0.1: the REST API discord.py calls, and a gateway WebSocket.

Gateway: HELLO, then READY and GUILD_CREATE after IDENTIFY, heartbeat ACKs, then every
event the test dispatches. REST: the bot user, the application, command sync,
messages, typing, DM channels and interaction callbacks; every call is recorded.
Responses carry ``Content-Type: application/json`` exactly, as discord.py expects.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

BOT_ID = "900"
APP_ID = "901"
GUILD_ID = "800"
GUILD_CHANNEL = "810"
DM_CHANNEL = "820"
BOT_USER = {"id": BOT_ID, "username": "attune", "discriminator": "0", "global_name": "attune", "avatar": None,
            "bot": True, "flags": 0}  # fmt: skip


def user(user_id: str, name: str = "ann") -> dict[str, Any]:
    return {"id": user_id, "username": name, "discriminator": "0", "global_name": name.title(), "avatar": None}


def member(user_id: str, name: str = "ann") -> dict[str, Any]:
    return {"user": user(user_id, name), "roles": [], "joined_at": _now(), "deaf": False, "mute": False,
            "flags": 0, "nick": None, "avatar": None}  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py checks the content type exactly: no charset parameter.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class FakeDiscord:
    def __init__(self, token: str = "discord-test-token") -> None:
        self.token = token
        self.calls: list[tuple[str, str, Any]] = []  # (method, path, body)
        self._ids = itertools.count(10_000)
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self.identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
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

    def new_id(self) -> str:
        return str(next(self._ids))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self._sockets[-1].send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def send_raw(self, text: str) -> None:
        await self._sockets[-1].send_str(text)

    def message(self, channel: str, author: str, content: str, *, mentions: list[dict[str, Any]] | None = None,
                guild: bool = False) -> dict[str, Any]:  # fmt: skip
        data: dict[str, Any] = {
            "id": self.new_id(), "channel_id": channel, "author": user(author), "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": mentions or [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": False,
            "type": 0, "flags": 0,
        }  # fmt: skip
        if guild:
            data["guild_id"] = GUILD_ID
            data["member"] = {k: v for k, v in member(author).items() if k != "user"}
        return data

    def reaction(self, channel: str, message_id: str, user_id: str, emoji: str, guild: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"user_id": user_id, "channel_id": channel, "message_id": message_id,
                                "emoji": {"id": None, "name": emoji}, "type": 0, "burst": False}  # fmt: skip
        if guild:
            data["guild_id"] = GUILD_ID
            data["member"] = member(user_id)
        return data

    def interaction(self, name: str, user_id: str, options: list[dict[str, Any]] | None = None,
                    guild: bool = False) -> dict[str, Any]:  # fmt: skip
        channel = GUILD_CHANNEL if guild else DM_CHANNEL
        data: dict[str, Any] = {
            "id": self.new_id(), "application_id": APP_ID, "type": 2, "token": f"tok{self.new_id()}",
            "version": 1, "channel_id": channel,
            "channel": {"id": channel, "type": 0 if guild else 1, **({"guild_id": GUILD_ID} if guild else {})},
            "data": {"id": self.new_id(), "name": name, "type": 1, "options": options or []},
            "app_permissions": "0", "locale": "en-US", "entitlements": [], "authorizing_integration_owners": {},
            "context": 0 if guild else 1, "attachment_size_limit": 8_388_608,
        }  # fmt: skip
        if guild:
            data["guild_id"] = GUILD_ID
            data["member"] = member(user_id) | {"permissions": "0"}
        else:
            data["user"] = user(user_id)
        return data

    def requests(self, method: str, path_end: str) -> list[Any]:
        return [body for m, path, body in self.calls if m == method and path.endswith(path_end)]

    def sent_messages(self) -> list[tuple[str, Any]]:
        """(channel id, body) of every message the bot posted."""
        return [(path.split("/")[1], body) for m, path, body in self.calls
                if m == "POST" and path.startswith("channels/") and path.endswith("/messages")]  # fmt: skip

    def callbacks(self) -> list[Any]:
        return [body for m, path, body in self.calls if m == "POST" and path.endswith("/callback")]

    async def wait(self, read: Any, count: int, timeout: float = 15) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(read()) < count:
                await asyncio.sleep(0.02)
        return list(read())

    # --- the servers -------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45_000}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload["op"] == 1:  # heartbeat
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:  # identify
                await self._ready(ws)
        return ws

    async def _ready(self, ws: web.WebSocketResponse) -> None:
        ready = {
            "v": 10, "user": BOT_USER, "guilds": [{"id": GUILD_ID, "unavailable": True}], "session_id": "sess",
            "resume_gateway_url": self.gateway_url, "application": {"id": APP_ID, "flags": 0},
            "private_channels": [], "relationships": [],
        }  # fmt: skip
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready}))
        guild = {
            "id": GUILD_ID, "name": "Test server", "icon": None, "owner_id": "1", "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": [{"id": GUILD_ID, "name": "@everyone", "permissions": "1071698660929", "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "emojis": [], "stickers": [], "features": [], "mfa_level": 0, "system_channel_flags": 0,
            "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0, "member_count": 2, "large": False,
            "joined_at": _now(), "members": [member(BOT_ID, "attune")], "presences": [], "voice_states": [],
            "threads": [], "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
            "channels": [{"id": GUILD_CHANNEL, "type": 0, "name": "general", "position": 0, "guild_id": GUILD_ID,
                          "permission_overwrites": [], "nsfw": False, "topic": None, "parent_id": None}],
        }  # fmt: skip
        await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild}))
        self.identified.set()

    async def _rest(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        # Interaction callbacks and follow-ups authenticate by the interaction's token in the path.
        by_path = path.startswith(("interactions/", "webhooks/"))
        if not by_path and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        body: Any = None
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
            elif request.content_type.startswith("multipart/"):
                body = {}
                async for part in await request.multipart():
                    raw = await part.read()  # type: ignore[union-attr]
                    body[part.name or ""] = raw if part.filename else json.loads(raw)  # type: ignore[union-attr]
        self.calls.append((request.method, path, body))
        if path == "users/@me":
            return _json(BOT_USER)
        if path == "oauth2/applications/@me":
            return _json({"id": APP_ID, "name": "attune", "icon": None, "description": "", "bot_public": True,
                          "bot_require_code_grant": False, "owner": user("1", "owner"), "verify_key": "k",
                          "flags": 0, "team": None, "summary": ""})  # fmt: skip
        if request.method == "PUT" and path.endswith("/commands"):
            return _json([{**c, "id": self.new_id(), "application_id": APP_ID, "version": "1"} for c in body])
        if request.method == "POST" and path.endswith("/typing"):
            return web.Response(status=204)
        if request.method == "POST" and path.endswith("/messages"):
            channel = path.split("/")[1]
            content = body.get("payload_json", body).get("content") if isinstance(body, dict) else None
            return _json(self.message(channel, BOT_ID, content or "") | {"author": BOT_USER})
        if request.method == "PATCH" and path.startswith("channels/") and "/messages/" in path:
            _, channel, _, message_id = path.split("/")
            return _json(
                self.message(channel, BOT_ID, body.get("content", "")) | {"id": message_id, "author": BOT_USER}
            )
        if request.method == "POST" and path.endswith("/callback"):
            interaction_id = path.split("/")[1]
            return _json({"interaction": {"id": interaction_id, "type": 2}})
        if request.method == "POST" and path.startswith("webhooks/"):  # interaction follow-ups
            return _json(self.message(DM_CHANNEL, BOT_ID, "") | {"author": BOT_USER})
        return web.Response(status=204)
