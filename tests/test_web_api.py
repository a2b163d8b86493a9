"""The web chat as an HTTP API, and its protections: CSRF, same origin, body size, the admin token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from agent_core.config import Config
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.web import SECURITY_HEADERS, WebConnector
from tests.fuzzing import NO_LIMITS, examples_of, mutated, settled_whole

ADMIN = "admin-token-for-api-tests"


async def _start(make_config: Callable[..., Config], environ: dict[str, str]) -> WebConnector:
    config = make_config("[web]\nport = 0\nmax_body_bytes = 4096\n", environ=environ)
    agent = await open_agent(config, llm=RecordingBackend())
    web = WebConnector(agent, config)
    await web.start()
    return web


@pytest.fixture
async def web(make_config: Callable[..., Config]) -> AsyncIterator[WebConnector]:
    connector = await _start(make_config, {"ATTUNE_ADMIN_TOKEN": ADMIN})
    yield connector
    await connector.stop()
    await connector.agent.close()


class Client:
    """A browser-like API client: keeps cookies, sends the CSRF token."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url, self.csrf = http, url, ""

    async def start(self) -> dict[str, object]:
        session = await (await self.http.get(f"{self.url}/api/session")).json()
        self.csrf = str(session["csrf"])
        return session  # type: ignore[no-any-return]

    async def post(self, path: str, body: object, **headers: str) -> aiohttp.ClientResponse:
        return await self.http.post(f"{self.url}{path}", json=body, headers={"X-CSRF-Token": self.csrf, **headers})


@pytest.fixture
async def client(web: WebConnector) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        api = Client(http, f"http://127.0.0.1:{web.port}")
        await api.start()
        yield api


async def test_send_react_command_and_history_as_plain_json(web: WebConnector, client: Client) -> None:
    reply = (await (await client.post("/api/messages", {"text": "hi"})).json())["reply"]
    assert reply["text"] == "echo: hi" and reply["kind"] == "answer"
    reaction = await (await client.post("/api/reactions", {"message_id": reply["id"], "emoji": "❤️"})).json()
    assert reaction == {"stored": True, "reward": 1.0}
    command = (await (await client.post("/api/commands", {"text": "/stats"})).json())["reply"]
    assert "Reactions: 1; reward +1.00" in command["text"]
    assert (await (await client.post("/api/name", {"name": "  Ann   Lee "})).json()) == {"name": "Ann Lee"}
    history = (await (await client.http.get(f"{client.url}/api/history")).json())["messages"]
    assert [(m["role"], m["text"], m["reactions"]) for m in history] == [
        ("user", "hi", []),
        ("assistant", "echo: hi", ["❤"]),
    ]
    users = await web.agent.store.db.fetchall("SELECT name FROM users")
    assert [u[0] for u in users] == ["Ann Lee"]


async def test_streaming_sends_tokens_then_the_reply(client: Client) -> None:
    response = await client.post("/api/messages", {"text": "one two three", "stream": True})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    events = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [e["text"] for e in events if e["type"] == "token"] == ["echo:", " one", " two", " three"]
    assert events[-1]["type"] == "reply" and events[-1]["reply"]["text"] == "echo: one two three"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"X-CSRF-Token": ""}, "no token"),
        ({"X-CSRF-Token": "x" * 32}, "a wrong token"),
        ({"Origin": "http://evil.example"}, "another origin"),
        ({"Sec-Fetch-Site": "cross-site"}, "a cross-site fetch"),
    ],
)
async def test_cross_site_and_tokenless_posts_are_refused(
    web: WebConnector, client: Client, headers: dict[str, str], why: str
) -> None:
    response = await client.post("/api/messages", {"text": "forged"}, **headers)
    assert response.status == 403, why
    assert (await web.agent.store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 0


async def test_bad_bodies_get_clear_errors(client: Client) -> None:
    too_big = await client.post("/api/messages", {"text": "x" * 5000})
    assert too_big.status == 413
    json_headers = {"X-CSRF-Token": client.csrf, "Content-Type": "application/json"}
    not_json = await client.http.post(f"{client.url}/api/messages", data=b"{nope", headers=json_headers)
    assert not_json.status == 400 and "JSON" in (await not_json.json())["error"]
    assert (await client.post("/api/messages", {"txt": "typo"})).status == 400
    assert (await client.post("/api/commands", {"text": "no slash"})).status == 400
    assert (await client.post("/api/reactions", {"message_id": "1"})).status == 400


async def test_every_response_carries_the_security_headers(client: Client) -> None:
    for path in ("/", "/api/session", "/dashboard", "/nowhere"):
        response = await client.http.get(f"{client.url}{path}")
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (path, name)
    page = await client.http.get(f"{client.url}/")
    cookies = page.headers.getall("Set-Cookie", [])
    assert all("HttpOnly" in c and "SameSite=Strict" in c for c in cookies)


async def test_the_dashboard_api_needs_the_admin_token(client: Client) -> None:
    url = f"{client.url}/dashboard/api/overview"
    assert (await client.http.get(url)).status == 401
    assert (await client.http.get(url, headers={"Authorization": "Bearer wrong"})).status == 401
    good = await client.http.get(url, headers={"Authorization": f"Bearer {ADMIN}"})
    assert good.status == 200 and set(await good.json()) >= {"users", "daily", "reward_by_day", "adapters"}


async def test_without_a_token_the_dashboard_is_off_and_says_how_to_enable_it(
    make_config: Callable[..., Config],
) -> None:
    web = await _start(make_config, {})
    try:
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"http://127.0.0.1:{web.port}/dashboard")
            assert response.status == 503 and "ATTUNE_ADMIN_TOKEN" in await response.text()
    finally:
        await web.stop()
        await web.agent.close()


async def test_fuzzed_requests_get_a_clear_answer_and_never_a_server_error(
    make_config: Callable[..., Config],
) -> None:
    """Bodies with fields missing, of the wrong type, huge or full of odd characters,
    and bytes that are not UTF-8 (hypothesis): each gets a 2xx or a 4xx with a reason,
    never a 500, and the chat goes on; no turn is left half-written."""
    config = make_config("[web]\nport = 0\nmax_body_bytes = 262144\n" + NO_LIMITS)
    web = WebConnector(await open_agent(config, llm=RecordingBackend()), config)
    await web.start()
    statuses: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            api = Client(http, f"http://127.0.0.1:{web.port}")
            await api.start()
            first = (await (await api.post("/api/messages", {"text": "hi"})).json())["reply"]
            endpoints = {"/api/messages": {"text": "hello", "stream": False},
                         "/api/reactions": {"message_id": first["id"], "emoji": "👍", "added": True},
                         "/api/commands": {"text": "/prefs tone formal"}, "/api/name": {"name": "Ann"}}  # fmt: skip
            for path, template in endpoints.items():
                for body in examples_of(mutated(template), 40):
                    response = await api.post(path, body)
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                for raw in (b"\xff\xfe{", b'{"text": "\xed\xa0\x80"}', b'{"text": "\\ud800"}', b"[1, 2]", b""):
                    response = await http.post(f"{api.url}{path}", data=raw, headers={"X-CSRF-Token": api.csrf,
                                               "Content-Type": "application/json"})  # fmt: skip
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            again = (await (await api.post("/api/messages", {"text": "still there?"})).json())["reply"]
            assert again["text"] == "echo: still there?"
        assert all(status < 500 for status in statuses), statuses
        assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 10  # both kinds really happened
        await settled_whole(web.agent)
    finally:
        await web.stop()
        await web.agent.close()
