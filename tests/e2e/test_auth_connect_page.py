"""The connect page in a real browser: Playwright driving Debian's Chromium (headless) against
the running AuthService, the OAuth stand-in and a vault stand-in on real NATS.

Click "Connect Claude Code" → the authorize URL opens in a new tab → the stand-in's callback
page shows `code#state` → paste it → "Connected"; a wrong paste shows a clear error; the status
panel follows; disconnect works. The page never receives an OAuth token and loads nothing from
outside. The screenshot goes to docs/connect.png when that is missing or UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.auth.app import AuthService
from services.auth.callers import mint_caller_token
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    JWT_SECRET,
    VaultResponder,
    new_user,
    settings_for,
)

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "connect.png"


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is missing: run `make chromium` (make test does)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair) -> AsyncIterator[AuthService]:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key)) as service:
        yield service


async def test_connect_in_a_browser(
    browser, auth: AuthService, standin: OAuthStandin, vault_responder: VaultResponder, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    user = new_user()
    context = await browser.new_context(viewport={"width": 960, "height": 900}, device_scale_factor=1)
    page = await context.new_page()
    seen_urls: list[str] = []
    bodies: list[str] = []
    context.on("request", lambda request: seen_urls.append(request.url))

    async def keep_body(response) -> None:
        if response.url.startswith(auth.base_url):
            try:
                bodies.append(await response.text())
            except Exception:  # noqa: BLE001 - bodies of redirects/aborted requests
                pass

    page.on("response", keep_body)

    token = mint_caller_token(JWT_SECRET, user, ttl_s=3600)
    await page.goto(f"{auth.base_url}/connect#token={token}")
    await expect(page.locator("#caller-linked")).to_be_visible()
    assert "token=" not in page.url  # the fragment is wiped from the address bar
    await expect(page.locator("#status-state")).to_have_text("Not connected")
    await expect(page.locator("#caller-who")).to_have_text(f"Connecting Claude for {user}")
    await expect(page.locator("#disconnect")).to_be_disabled()  # nothing to disconnect
    await page.check("#confirm-account")

    # 1. a wrong paste shows a clear error (no login needed for that)
    await expect(page.locator("#paste-submit")).to_be_disabled()  # nothing pasted yet
    await page.fill("#paste-box", "this is not a code")
    await page.click("#paste-submit")
    await expect(page.locator("#message")).to_have_class(re.compile(r"\berror\b"))
    await expect(page.locator("#message")).to_contain_text("not the code Claude showed")

    # 2. connect: the authorize URL opens in a new tab; the stand-in's callback shows code#state
    async with context.expect_page() as new_tab:
        await page.click("#connect-button")
    tab = await new_tab.value
    await tab.wait_for_load_state()
    assert tab.url.startswith(standin.callback_url)
    pasted = (await tab.locator("#paste-code").inner_text()).strip()
    assert "#" in pasted
    await expect(page.locator("#authorize-hint")).to_be_visible()
    link = await page.get_attribute("#authorize-link", "href")  # the fallback link if popups are blocked
    assert link is not None and link.startswith(standin.claude_ai_authorize_url + "?code=true&")

    # 3. an expired/unknown state is explained too
    code, _, state = pasted.partition("#")
    await page.fill("#paste-box", f"{code}#{'x' * len(state)}")
    await page.click("#paste-submit")
    await expect(page.locator("#message")).to_contain_text("expired or was already used")

    # 4. the real paste connects
    await page.fill("#paste-box", pasted)
    await page.click("#paste-submit")
    await expect(page.locator("#message")).to_contain_text("Connected.")
    await expect(page.locator("#status-state")).to_have_text("Connected")
    await vault_responder.wait_for(lambda: user in vault_responder.connections)
    await page.click("#status-refresh")
    await expect(page.locator("#status-account")).to_contain_text(standin.state.account["email_address"])
    await expect(page.locator("#status-scopes")).to_contain_text("user:inference")
    shot = tmp_path / "connect.png"
    await page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS") or not SCREENSHOT.exists():  # docs/ only on request
        SCREENSHOT.write_bytes(shot.read_bytes())

    # 5. disconnect, after a confirmation that names the account
    await page.click("#disconnect")
    await expect(page.locator("#disconnect-confirm")).to_contain_text(user)
    await page.click("#disconnect-cancel")
    await expect(page.locator("#disconnect-confirm")).to_be_hidden()
    assert not any(e.user_id == user for e in vault_responder.revoked)
    await page.click("#disconnect")
    await page.click("#disconnect-yes")
    await expect(page.locator("#message")).to_contain_text("Disconnected")
    await expect(page.locator("#disconnect")).to_be_disabled()
    await vault_responder.wait_for(lambda: any(e.user_id == user for e in vault_responder.revoked))
    await page.click("#status-refresh")
    await expect(page.locator("#status-state")).to_have_text("Not connected")
    await context.close()

    # The page never saw an OAuth token, and nothing came from outside loopback.
    issued = list(standin.state.access_tokens) + list(standin.state.refresh_tokens)
    assert issued and bodies
    assert not [b for b in bodies if any(t in b for t in issued) or "sk-ant-" in b]
    assert all(url.startswith((auth.base_url, standin.base_url)) for url in seen_urls), seen_urls
    assert shot.stat().st_size > 10_000
    assert not [b for b in bodies if token in b]  # nor was the caller token ever sent back


async def test_token_typed_into_the_page_and_refused_tokens(
    browser, auth: AuthService, vault_responder: VaultResponder
) -> None:
    from playwright.async_api import expect

    page = await browser.new_page()
    await page.goto(f"{auth.base_url}/connect")
    await expect(page.locator("#caller-form")).to_be_visible()
    for button in ("#connect-button", "#paste-submit", "#status-refresh", "#disconnect", "#grants-refresh"):
        await expect(page.locator(button)).to_be_disabled()  # nothing can act without a caller token
    await expect(page.locator("#confirm-account")).to_be_disabled()

    await page.fill("#caller-token", "not-a-valid-jwt")
    await page.click("#caller-save")
    await expect(page.locator("#message")).to_contain_text("token was refused")
    await expect(page.locator("#connect-button")).to_be_disabled()
    await expect(page.locator("#confirm-account")).to_be_disabled()

    user = new_user()
    await page.fill("#caller-token", mint_caller_token(JWT_SECRET, user))
    await page.click("#caller-save")
    await expect(page.locator("#status-state")).to_have_text("Not connected")
    await expect(page.locator("#caller-user")).to_have_text(user)
    assert vault_responder.requests and vault_responder.requests[-1].user_id == user
    await page.close()


async def test_vault_down_is_shown_not_hidden(browser, auth: AuthService) -> None:
    from playwright.async_api import expect

    page = await browser.new_page()
    await page.goto(f"{auth.base_url}/connect#token={mint_caller_token(JWT_SECRET, new_user())}")
    await page.click("#status-refresh")
    await expect(page.locator("#message")).to_contain_text("vault is not answering")
    await expect(page.locator("#status-state")).to_contain_text("vault is not answering")
    await page.close()


async def test_the_page_names_the_account_and_starts_nothing_unconfirmed(
    browser, auth: AuthService, standin: OAuthStandin, vault_responder: VaultResponder
) -> None:
    """Account-linking CSRF: a link may carry anyone's caller token. The page says whose ccbridge
    account it connects (the token's `sub`, as text, never HTML) and no login starts — no
    /login request, no authorize tab — until the person ticks the confirmation naming it."""
    from playwright.async_api import expect

    user = new_user() + ' <img src=x id=injected onerror="window.pwned=1"> & "co"'
    token = mint_caller_token(JWT_SECRET, user, ttl_s=3600)
    context = await browser.new_context()
    page = await context.new_page()
    requested: list[str] = []
    tabs: list[object] = []
    context.on("request", lambda request: requested.append(request.url))
    context.on("page", lambda tab: tabs.append(tab))
    await page.goto(f"{auth.base_url}/connect#token={token}")

    await expect(page.locator("#caller-user")).to_have_text(user)  # the token's sub, exactly, as text
    await expect(page.locator("#confirm-user")).to_have_text(user)
    await expect(page.locator("#caller-who")).to_have_text(f"Connecting Claude for {user}")
    assert await page.locator("#injected").count() == 0
    assert await page.evaluate("window.pwned") is None
    assert token not in await page.content()

    await expect(page.locator("#connect-button")).to_be_disabled()
    await page.locator("#connect-button").click(force=True)  # a click on the disabled button
    await page.evaluate("document.getElementById('connect-button').disabled = false")
    await page.locator("#connect-button").click()  # even enabled by hand: the handler checks
    await page.wait_for_timeout(300)
    assert not [url for url in requested if url.endswith("/v1/claude-code/login")], requested
    assert not [url for url in requested if url.startswith(standin.base_url)], requested
    assert tabs == [] and standin.state.stats["authorize"] == 0

    await page.check("#confirm-account")
    await expect(page.locator("#connect-button")).to_be_enabled()
    async with context.expect_page() as new_tab:
        await page.click("#connect-button")
    tab = await new_tab.value
    await tab.wait_for_load_state()
    assert tab.url.startswith(standin.callback_url)

    # another token: another account, so the confirmation is asked again
    other = new_user()
    await page.click("#caller-change")
    await page.fill("#caller-token", mint_caller_token(JWT_SECRET, other))
    await page.click("#caller-save")
    await expect(page.locator("#caller-user")).to_have_text(other)
    await expect(page.locator("#confirm-account")).not_to_be_checked()
    await expect(page.locator("#connect-button")).to_be_disabled()
    await context.close()


async def test_sandboxes_holding_the_login_are_listed_and_can_be_ended(
    browser, auth: AuthService, vault_responder: VaultResponder
) -> None:
    import httpx
    from playwright.async_api import expect

    user, someone = new_user(), new_user()
    async with httpx.AsyncClient(base_url=auth.base_url) as http:
        for owner, sandbox in ((user, "sbx-page-1"), (user, "sbx-page-2"), (someone, "sbx-not-yours")):
            headers = {"Authorization": f"Bearer {mint_caller_token(JWT_SECRET, owner)}"}
            response = await http.post("/v1/claude-code/grants", headers=headers, json={"sandbox_id": sandbox})
            assert response.status_code == 201, response.text
    await vault_responder.wait_for(lambda: len(vault_responder.leases) >= 3)

    page = await browser.new_page()
    await page.goto(f"{auth.base_url}/connect#token={mint_caller_token(JWT_SECRET, user, ttl_s=3600)}")
    leases = page.locator("#grants-list li.lease")
    await expect(leases).to_have_count(2)
    await expect(page.locator("#grants-list")).not_to_contain_text("sbx-not-yours")
    first = page.locator('li.lease[data-sandbox-id="sbx-page-1"]')
    await expect(first).to_contain_text("access token only")

    await first.get_by_role("button", name="End the grant of sbx-page-1").click()
    await expect(first.locator(".lease-confirm")).to_contain_text("End the grant of sbx-page-1?")
    await first.get_by_role("button", name="Keep it").click()  # changed my mind: nothing sent
    await expect(first.locator(".lease-confirm")).to_be_hidden()
    assert not vault_responder.grants_revoked

    await first.get_by_role("button", name="End the grant of sbx-page-1").click()
    await first.get_by_role("button", name="Yes, end it").click()
    await expect(page.locator("#message")).to_contain_text("sbx-page-1 no longer gets your Claude login")
    await expect(leases).to_have_count(1)  # the list was refreshed from the vault
    await expect(page.locator("#grants-list")).to_contain_text("sbx-page-2")
    [ended] = vault_responder.grants_revoked
    assert (ended.user_id, ended.sandbox_id, ended.reason) == (user, "sbx-page-1", "grant_ended")
    assert (someone, "sbx-not-yours") in vault_responder.leases
    await page.close()


@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 720)])
async def test_an_error_after_finish_connecting_is_in_view_and_focused(
    browser, auth: AuthService, standin: OAuthStandin, vault_responder: VaultResponder,
    width: int, height: int,
) -> None:
    """A mistyped code: the error is an alert, scrolled into the viewport and focused, on a phone
    and on a laptop; and the login survives the typo (the right code then connects)."""
    from playwright.async_api import expect

    user = new_user()
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    await page.goto(f"{auth.base_url}/connect#token={mint_caller_token(JWT_SECRET, user, ttl_s=3600)}")
    await page.check("#confirm-account")
    async with context.expect_page() as new_tab:
        await page.click("#connect-button")
    tab = await new_tab.value
    await tab.wait_for_load_state()
    pasted = (await tab.locator("#paste-code").inner_text()).strip()
    await tab.close()
    code, _, state = pasted.partition("#")

    await page.fill("#paste-box", f"{code}typo#{state}")
    await page.locator("#paste-submit").scroll_into_view_if_needed()
    await page.click("#paste-submit")
    message = page.locator("#message")
    await expect(message).to_contain_text("paste it again")
    await expect(message).to_have_attribute("role", "alert")
    await expect(message).to_be_focused()
    await expect(message).to_be_in_viewport()
    box = await message.bounding_box()
    assert box is not None
    assert box["y"] >= 0 and box["y"] + box["height"] <= height, (box, height)
    assert box["x"] >= 0 and box["x"] + box["width"] <= width, (box, width)

    await page.fill("#paste-box", pasted)
    await page.click("#paste-submit")
    await expect(message).to_contain_text("Connected.")
    await context.close()


async def test_api_docs_render_offline_under_their_csp(browser, auth: AuthService) -> None:
    """/docs in a real browser: Swagger UI renders every route from the service's own files, a
    request can be tried out, nothing is fetched from another host and the CSP blocks nothing."""
    from playwright.async_api import expect

    page = await browser.new_page()
    seen: list[str] = []
    complaints: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    page.on("console", lambda message: complaints.append(message.text) if message.type == "error" else None)
    await page.goto(f"{auth.base_url}/docs")
    await expect(page.locator(".opblock").first).to_be_visible()
    assert await page.locator(".opblock").count() >= 10
    healthz = page.locator("#operations-ops-healthz_healthz_get")
    await healthz.locator(".opblock-summary").click()
    await healthz.get_by_role("button", name="Try it out").click()
    await healthz.get_by_role("button", name="Execute").click()
    await expect(healthz.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    assert complaints == []
    assert seen and all(url.startswith(auth.base_url) for url in seen), seen
    await page.close()
