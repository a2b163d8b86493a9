"""The web chat and the dashboard in real Chromium (Debian's, driven by Playwright).

Screenshots of the chat and the dashboard are saved under test-artifacts/screenshots/
(the path is printed at the end of the test run).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from agent_core.agent import APOLOGY
from agent_core.config import Config
from agent_core.llm.local import LocalBackend
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.web import WebConnector
from tests.conftest import MODEL_CACHE, SCREENSHOTS

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

CHROMIUM = Path("/usr/bin/chromium")
ADMIN = "admin-token-for-tests"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def _serve(make_config: Callable[..., Config], llm: object, extra: str = "") -> tuple[WebConnector, str]:
    config = make_config("[web]\nport = 0\n" + extra, environ={"ATTUNE_ADMIN_TOKEN": ADMIN})
    agent = await open_agent(config, llm=llm)  # type: ignore[arg-type]
    await agent.llm.start()
    web = WebConnector(agent, config)
    await web.start()
    return web, f"http://127.0.0.1:{web.port}"


@pytest.fixture
async def site(make_config: Callable[..., Config]) -> AsyncIterator[tuple[WebConnector, str]]:
    web, url = await _serve(make_config, RecordingBackend())
    yield web, url
    await web.stop()
    await web.agent.close()


async def _open_chat(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(url)
    await expect(page.locator("body[data-ready=true]")).to_be_attached()
    return page


async def _say(page: Page, text: str) -> None:
    await page.fill("#input", text)
    await page.press("#input", "Enter")


async def test_chat_with_the_real_model_and_react(browser: Browser, make_config: Callable[..., Config]) -> None:
    llm = LocalBackend("smollm2", MODEL_CACHE, repetition_penalty=1.1)
    web, url = await _serve(make_config, llm, "[llm]\ntemperature = 0.0\nmax_new_tokens = 32\n")
    try:
        page = await _open_chat(browser, url)
        await _say(page, "What is the capital of France?")
        reply = page.locator("li.message.bot").last
        await expect(reply.locator(".reactions")).to_be_visible(timeout=120_000)  # the whole reply has arrived
        text = (await reply.locator(".text").text_content() or "").strip()
        assert len(text) > 3
        row = await web.agent.store.db.fetchone("SELECT id, text FROM messages WHERE role = 'assistant'")
        assert row is not None and row[1] == text  # what the page shows is what was stored
        await reply.locator("button.emoji[data-emoji='👍']").click()
        await expect(reply.locator("button.emoji[data-emoji='👍']")).to_have_attribute("aria-pressed", "true")
        stored = await web.agent.store.db.fetchone("SELECT message_id, reward, removed_at FROM reactions")
        assert stored is not None and tuple(stored) == (row[0], 1.0, None)  # against that reply
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)
    finally:
        await web.stop()
        await web.agent.close()


async def test_replies_stream_and_reactions_change_and_go(browser: Browser, site: tuple[WebConnector, str]) -> None:
    web, url = site
    page = await _open_chat(browser, url)
    await _say(page, "hello there")
    reply = page.locator("li.message.bot").last
    await expect(reply.locator(".text")).to_have_text("echo: hello there")
    await reply.locator("button.emoji[data-emoji='👍']").click()
    await expect(reply.locator("button[data-emoji='👍']")).to_have_attribute("aria-pressed", "true")
    await reply.locator("button.emoji[data-emoji='😕']").click()  # changed
    await expect(reply.locator("button[data-emoji='😕']")).to_have_attribute("aria-pressed", "true")
    await expect(reply.locator("button[data-emoji='👍']")).to_have_attribute("aria-pressed", "false")
    user = await web.agent.store.resolve_user("web", (await page.context.cookies())[0]["value"])
    assert (await web.agent.store.stats(user))["rewards"] == [-0.5]
    await reply.locator("summary").click()  # the picker, for the others
    await reply.locator(".picker button[data-emoji='🎉']").click()
    await expect(reply.locator(".picker button[data-emoji='🎉']")).to_have_attribute("aria-pressed", "true")
    assert (await web.agent.store.stats(user))["rewards"] == [0.8]
    await reply.locator(".picker summary").click()
    await reply.locator(".picker button[data-emoji='🎉']").click()  # taken back
    await expect(reply.locator(".picker button[data-emoji='🎉']")).to_have_attribute("aria-pressed", "false")
    assert (await web.agent.store.stats(user))["rewards"] == []
    await page.reload()  # the history comes back with the reply's reaction state
    await expect(page.locator("li.message.bot .text")).to_have_text(["echo: hello there"])


async def test_a_deferred_answer_appears_in_the_page_without_a_reload(
    browser: Browser, make_config: Callable[..., Config]
) -> None:
    """The model fails: the page shows the apology; once it answers again, the late answer
    appears under it by itself (the page polls its history), with its reaction bar."""
    failing = RecordingBackend(fail=True)
    web, url = await _serve(make_config, failing)
    late = asyncio.create_task(web.answer_deferred())  # as the supervisor runs it
    try:
        page = await _open_chat(browser, url)
        await _say(page, "tell me about owls")
        await expect(page.locator("li.message.bot .text")).to_have_text([APOLOGY])
        failing.fail = False  # the model is back
        await expect(page.locator("li.message.bot.late .text")).to_have_text(["echo: tell me about owls"],
                                                                           timeout=30_000)  # fmt: skip
        await expect(page.locator("li.message.bot.late .reactions")).to_be_visible()
        assert page.url == url + "/"  # the same page: not reloaded
    finally:
        late.cancel()
        await web.stop()
        await web.agent.close()


async def test_slash_commands_with_suggestions_set_preferences(
    browser: Browser, site: tuple[WebConnector, str]
) -> None:
    web, url = site
    page = await _open_chat(browser, url)
    await page.fill("#input", "/pr")
    await expect(page.locator("#suggestions .suggestion")).to_have_count(1)
    await page.locator("#suggestions .suggestion").click()
    await expect(page.locator("#input")).to_have_value("/prefs ")
    await page.type("#input", "length brief")
    await page.press("#input", "Enter")
    await expect(page.locator("li.message.bot").last).to_contain_text("Set length to brief.")
    uid = next(c["value"] for c in await page.context.cookies() if c["name"] == "attune_uid")
    user = await web.agent.store.resolve_user("web", uid)
    assert await web.agent.store.preferences(user) == {"length": "brief"}
    await _say(page, "/export")
    download = page.locator("li.message.bot a.attachment")
    await expect(download).to_have_attribute("download", "attune-export.json")


async def test_two_browsers_are_two_users_with_separate_memory(
    browser: Browser, site: tuple[WebConnector, str]
) -> None:
    web, url = site
    first = await _open_chat(browser, url)
    await _say(first, "/remember my secret is blue")
    await expect(first.locator("li.message.bot").last).to_contain_text("Noted: your secret is blue.")
    second = await _open_chat(browser, url)
    await expect(second.locator("li.message")).to_have_count(0)  # no history of the first
    await _say(second, "/forget")
    await expect(second.locator("li.message.bot").last).to_contain_text("You have no notes")
    await _say(second, "what is my secret?")
    await expect(second.locator("li.message.bot").last).to_contain_text("echo: what is my secret?")
    assert isinstance(web.agent.llm, RecordingBackend)
    assert "blue" not in json.dumps(web.agent.llm.requests[-1].messages)


PAYLOADS = ['<script>window.__pwned = "script"</script>', "<img src=x onerror=\"window.__pwned = 'img'\">"]


async def test_user_text_is_never_run_as_html(browser: Browser, site: tuple[WebConnector, str]) -> None:
    _web, url = site
    page = await _open_chat(browser, url)
    await page.fill("#name", PAYLOADS[1])
    await page.click("#name-form button")
    await expect(page.locator("#status")).to_contain_text("Hello")
    for payload in PAYLOADS:
        await _say(page, payload)
        await expect(page.locator("li.message.bot .text").last).to_have_text(f"echo: {payload}")
    await _say(page, f"/remember {PAYLOADS[0]}")
    await _say(page, "/forget")
    await expect(page.locator("li.message.bot").last).to_contain_text(PAYLOADS[0])  # shown as text
    assert await page.locator("li.message img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    dashboard = await (await browser.new_context()).new_page()
    await _sign_in(dashboard, url)
    names = await dashboard.locator("table.users").text_content() or ""
    assert PAYLOADS[1][:40] in names  # the name (cut to 40 characters), as text
    assert await dashboard.locator("table.users img").count() == 0
    assert await dashboard.evaluate("window.__pwned") is None


async def _sign_in(page: Page, url: str, token: str = ADMIN) -> None:
    await page.goto(f"{url}/dashboard")
    await page.fill("input[name=token]", token)
    await page.click("form.login button")


async def test_the_dashboard_refuses_without_the_token_and_shows_the_reward_plot(
    browser: Browser, site: tuple[WebConnector, str]
) -> None:
    _web, url = site
    chat = await _open_chat(browser, url)
    for text, emoji in (("first", "👍"), ("second", "👎"), ("third", "❤️")):
        await _say(chat, text)
        reply = chat.locator("li.message.bot").last
        await reply.locator(f"button.emoji[data-emoji='{emoji}']").click()
        await expect(reply.locator(f"button[data-emoji='{emoji}']")).to_have_attribute("aria-pressed", "true")
    page = await (await browser.new_context()).new_page()
    refused = await page.goto(f"{url}/dashboard")
    assert refused is not None and refused.status == 401
    await expect(page.locator("svg#reward-plot")).to_have_count(0)
    await _sign_in(page, url, token="wrong")
    await expect(page.locator("main")).to_contain_text("Wrong token")
    await _sign_in(page, url)
    await expect(page.locator("p#health.ok")).to_contain_text("database: ok")  # as /healthz says, at the top
    await expect(page.locator("p#health.ok")).to_contain_text("model: ok")
    await expect(page.locator("svg#reward-plot polyline.series")).to_have_count(2)  # everyone, and this user
    await expect(page.locator("svg#activity-plot rect")).to_have_count(2)
    await expect(page.locator("table.users")).to_contain_text("+0.33")  # (1 - 1 + 1) / 3
    await page.locator("table.users button", has_text="Train now").click()
    await expect(page.locator(".notice")).to_contain_text("too little rated feedback")  # 3 reactions only
    await page.locator("table.users button", has_text="Roll back").click()
    await expect(page.locator(".notice")).to_contain_text("no adapter of their own")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)
