"""The web chat: attune's default front end, on aiohttp, at http://127.0.0.1:8080.

Each browser is one user (a random id in an HttpOnly cookie; the person can set a
name). The page (``bots/static/``, no framework, nothing from a network) streams replies
token by token, puts reaction buttons under every reply and suggests slash commands.
Everything the page does is a plain JSON API, documented in the README:

    GET  /api/session     who am I, the CSRF token, the commands, the quick reactions
    POST /api/name        {"name": "Ann"}
    GET  /api/history     my recent messages, with my reactions
    POST /api/messages    {"text": "hi", "stream": false}  (stream: NDJSON token events)
    POST /api/reactions   {"message_id": "12", "emoji": "👍", "added": true}
    POST /api/commands    {"text": "/prefs length brief"}

Every POST needs the ``X-CSRF-Token`` header from ``/api/session`` and a same-origin
request; bodies are limited to ``[web] max_body_bytes``. The operator's dashboard
(``bots/web_dashboard.py``) is served by the same server.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import Field

from agent_core.agent import Agent
from agent_core.commands import parse_command
from agent_core.config import Config, Section
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.platforms import PlatformSpec, Secret
from agent_core.stores import UNAVAILABLE
from bots.base import Connector
from bots.web_dashboard import Dashboard

log = logging.getLogger(__name__)


class WebSettings(Section):
    """the web chat (the default front end) and the dashboard (with ATTUNE_ADMIN_TOKEN)"""

    host: str = "127.0.0.1"
    """address to listen on; only this machine by default"""
    port: int = Field(default=8080, ge=0, le=65535)
    """http://127.0.0.1:8080 (0 = any free port, printed at start)"""
    max_body_bytes: int = Field(default=65536, ge=1024)
    """larger requests are refused (413)"""
    secure_cookies: bool = False
    """mark cookies Secure: set true when served over HTTPS (behind a proxy)"""


PLATFORM = PlatformSpec(
    name="web",
    settings=WebSettings,
    secrets=(Secret("admin_token", "ATTUNE_ADMIN_TOKEN", "web.admin_token"),),  # the dashboard's
    loggers=("aiohttp",),
    event_ids="none: each POST is one event (a browser that retries sends a new one)",
    requirements=("aiohttp>=3.9",),
)

STATIC = Path(__file__).parent / "static"
UID_COOKIE, CSRF_COOKIE = "attune_uid", "attune_csrf"
NEW_UID = web.RequestKey("new_uid", str)  # a fresh id or token this request hands out in a cookie
NEW_CSRF = web.RequestKey("new_csrf", str)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
QUICK_REACTIONS = ["👍", "👎", "❤️", "😂", "😕"]
MORE_REACTIONS = ["🎉", "🙏", "🔥", "👀", "🤔", "😍", "👏", "💯", "🙄", "😢"]
MAX_NAME = 40
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


class WebConnector(Connector):
    platform = "web"

    def __init__(self, agent: Agent, config: Config) -> None:
        super().__init__(agent, config)
        self.settings = config.settings.web
        self._runner: web.AppRunner | None = None
        self.port = self.settings.port

    @classmethod
    def configured(cls, config: Config) -> bool:
        return False  # never started for a token: it is the default front end

    # --- the server ---------------------------------------------------------------------

    @property
    def secure_cookies(self) -> bool:
        return self.settings.secure_cookies

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[self.database_refusals, self.same_origin_posts])  # fmt: skip
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/", self.chat_page)
        app.router.add_static("/static/", STATIC, append_version=True)
        app.router.add_get("/api/session", self.session)
        app.router.add_post("/api/name", self.set_name)
        app.router.add_get("/api/history", self.history)
        app.router.add_post("/api/messages", self.message)
        app.router.add_post("/api/reactions", self.reaction)
        app.router.add_post("/api/commands", self.command)
        app.router.add_get("/healthz", self.healthz)
        Dashboard(self.agent, self.config, self).add_routes(app)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("web chat on http://%s:%d", self.settings.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def send(self, reply: Reply) -> str | None:
        """Replies go back in the HTTP response; the page knows a reply by its stored id."""
        return str(reply.reply_id) if reply.reply_id is not None else None

    # --- sessions and cross-site protection ------------------------------------------------

    def _uid(self, request: web.Request) -> str:
        uid = request.cookies.get(UID_COOKIE, "")
        return uid if _TOKEN.match(uid) else request.setdefault(NEW_UID, secrets.token_urlsafe(24))

    def with_cookies(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        secure = self.settings.secure_cookies
        if NEW_UID in request:
            response.set_cookie(UID_COOKIE, request[NEW_UID], httponly=True, samesite="Strict", secure=secure,
                                max_age=10 * 365 * 86400, path="/")  # fmt: skip
        if not _TOKEN.match(request.cookies.get(CSRF_COOKIE, "")):
            response.set_cookie(CSRF_COOKIE, request.setdefault(NEW_CSRF, secrets.token_urlsafe(24)),
                                httponly=True, samesite="Strict", secure=secure, path="/")  # fmt: skip
        return response

    def csrf_token(self, request: web.Request) -> str:
        token = request.cookies.get(CSRF_COOKIE, "")
        return token if _TOKEN.match(token) else request.setdefault(NEW_CSRF, secrets.token_urlsafe(24))

    @web.middleware
    async def same_origin_posts(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A state-changing request must come from this site: same Origin (when the
        browser says), and the CSRF token of the session (header or form field)."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise web.HTTPForbidden(text="cross-site request refused")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise web.HTTPForbidden(text="cross-site request refused")
        expected = request.cookies.get(CSRF_COOKIE, "")
        given = request.headers.get("X-CSRF-Token", "")
        if not given and request.content_type == "application/x-www-form-urlencoded":
            given = str((await request.post()).get("csrf", ""))
        if not expected or not secrets.compare_digest(given, expected):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: GET /api/session first")
        return await handler(request)

    @web.middleware
    async def database_refusals(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """What the database cannot take now (its server away, a full disk) is a 503 with
        a JSON reason and one log line, never a 500 with a traceback. (A message never
        gets here: the agent answers it with the clear "couldn't save" reply.)"""
        try:
            return await handler(request)
        except UNAVAILABLE as exc:
            log.warning("web: %s %s refused: the database cannot be used now (%s)", request.method, request.path, exc)
            body = {"error": "the database cannot be used just now; try again in a moment"}
            return web.json_response(body, status=503, headers={"Retry-After": "5"})

    def _event(self, request: web.Request) -> dict[str, Any]:
        uid = self._uid(request)
        name = request.cookies.get("attune_name", "")[:MAX_NAME] or f"web user {uid[:6]}"
        return {"platform": self.platform, "chat_id": f"web:{uid}", "sender_id": uid, "sender_name": name}

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the body must be JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    # --- pages and API ----------------------------------------------------------------------

    async def chat_page(self, request: web.Request) -> web.StreamResponse:
        self._uid(request)
        return self.with_cookies(request, web.FileResponse(STATIC / "chat.html"))

    async def session(self, request: web.Request) -> web.StreamResponse:
        event = self._event(request)
        commands = [{"name": s.name, "usage": s.usage, "summary": s.summary}
                    for s in self.agent.commands.specs.values()]  # fmt: skip
        named = "attune_name" in request.cookies
        body = {"user": event["sender_id"][:6], "name": event["sender_name"] if named else "",
                "csrf": self.csrf_token(request),
                "commands": commands, "reactions": QUICK_REACTIONS, "more_reactions": MORE_REACTIONS}  # fmt: skip
        return self.with_cookies(request, web.json_response(body))

    async def set_name(self, request: web.Request) -> web.StreamResponse:
        name = " ".join(str((await self._json(request)).get("name", "")).split())[:MAX_NAME]
        if not name:
            raise BadRequest("give a name")
        await self.agent.set_display_name(self.platform, self._uid(request), name)
        response = web.json_response({"name": name})
        response.set_cookie("attune_name", name, httponly=True, samesite="Strict",
                            secure=self.settings.secure_cookies, max_age=10 * 365 * 86400, path="/")  # fmt: skip
        return self.with_cookies(request, response)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """200 when the database and the model can be used, else 503; a short JSON body
        says which part is not (for load balancers and operators)."""
        health = await self.agent.health()
        return web.json_response(health, status=200 if health["ok"] else 503, headers={"Cache-Control": "no-store"})

    async def history(self, request: web.Request) -> web.StreamResponse:
        event = self._event(request)
        messages = await self.agent.history(self.platform, event["sender_id"], event["chat_id"], event["sender_name"])
        return self.with_cookies(request, web.json_response({"messages": messages}))

    async def message(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        text = body.get("text")
        if not isinstance(text, str):
            raise BadRequest('give "text"')
        message = Message(**self._event(request), text=text)
        if not body.get("stream"):
            reply = await self.agent.handle_message(message)
            await self.deliver(reply)
            return self.with_cookies(request, web.json_response({"reply": _reply_json(reply)}))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        self.with_cookies(request, response)
        await response.prepare(request)
        connected = True

        async def on_text(piece: str) -> None:
            nonlocal connected
            if connected:
                try:
                    await response.write(_line({"type": "token", "text": piece}))
                except ConnectionError:
                    connected = False  # the page went away; the reply is still stored

        reply = await self.agent.handle_message(message, on_text=on_text)
        await self.deliver(reply)
        if connected:
            await response.write(_line({"type": "reply", "reply": _reply_json(reply)}))
            await response.write_eof()
        return response

    async def reaction(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        message_id, emoji, added = body.get("message_id"), body.get("emoji"), body.get("added", True)
        if not isinstance(message_id, str | int) or not isinstance(emoji, str) or not emoji or len(emoji) > 64:
            raise BadRequest('give "message_id" and "emoji"')
        outcome = await self.agent.handle_reaction(
            Reaction(**self._event(request), message_id=str(message_id), emoji=emoji, added=bool(added))
        )
        return web.json_response({"stored": outcome.stored, "reward": outcome.reward})

    async def command(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        parsed = parse_command(str(body.get("text", "")))
        if parsed is None:
            raise BadRequest('give "text" starting with a slash, e.g. "/help"')
        reply = await self.agent.handle_command(Command(**self._event(request), name=parsed[0], args=parsed[1]))
        return self.with_cookies(request, web.json_response({"reply": _reply_json(reply)}))


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    attachment = None
    if reply.attachment is not None:
        attachment = {"filename": reply.attachment.filename, "mime": reply.attachment.mime,
                      "content": reply.attachment.content.decode(errors="replace")}  # fmt: skip
    message_id = str(reply.reply_id) if reply.reply_id is not None else None
    return {"id": message_id, "text": reply.text, "kind": reply.kind, "style": reply.style, "attachment": attachment,
            "deferred": reply.deferred}  # fmt: skip


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, pages, API, errors and streams alike."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
