"""Single sign-on in a real browser: Debian's chromium logs in to the web UI through a real
OpenID Connect provider (oidc-provider-mock), as a user whose groups map to projects and roles;
logging out revokes the session's key; refusals are shown as pages that say why."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
from playwright.async_api import Browser, Page, expect

from support.browser import Tab
from support.island import Island
from support.oidc import Provider, oidc_config
from support.overlay import AgentFactory


async def through_provider(page: Page, gateway: str, sub: str, state: str | None = None) -> None:
    """From the log-in page to the provider, authorized there as ``sub`` (with the request's
    state replaced by ``state``, as a forger would)."""
    await page.goto(f"{gateway}/ui/")
    await expect(page.locator("#sso-login")).to_have_text("Log in with Test IdP")
    await page.click("#sso-login")
    await expect(page.locator("h1")).to_have_text("Authorize Client")  # the provider's page
    if state is not None:
        url = urlsplit(page.url)
        query = parse_qs(url.query) | {"state": [state]}
        await page.goto(url._replace(query=urlencode(query, doseq=True)).geturl())
    await page.fill("input[name=sub]", sub)
    await page.click("button[type=submit]:not([name])")


async def test_log_in_through_the_provider_with_groups_then_out(
    make_agent: AgentFactory, oidc_provider: Provider, browser: Browser, tmp_path: Path
) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway(oidc=oidc_config(oidc_provider.url, tmp_path))).models_seen(
        "echo"
    )
    oidc_provider.set_user("u-7", preferred_username="alice", groups=["lab-users", "ml-leads"])
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await through_provider(page, isl.url, "u-7")
    await expect(page.locator("#who")).to_have_text("alice")
    assert page.url == f"{isl.url}/ui/#chat"  # the key came through no URL
    await expect(page.locator("nav a[data-tab=metrics]")).to_be_hidden()
    await expect(page.locator("#model option")).to_have_count(1)  # echo
    await page.click("nav a[data-tab=account]")
    await expect(page.locator("#key-project option")).to_have_text(["none (personal)", "lab", "ml"])
    key = await page.evaluate("sessionStorage.getItem('atoll.key')")
    assert isinstance(key, str) and key.startswith("atk_")
    # The key was handed over once: the page cannot claim it again.
    again = await page.evaluate("fetch('/ui/claim', {method: 'POST'}).then(r => r.status)")
    assert again == 401

    # Her groups changed at the provider: her next login (another browser) sees them.
    oidc_provider.set_user(
        "u-7", preferred_username="alice", groups=["lab-viewers", "atoll-admins"]
    )
    other = await Tab.open(browser, isl.url)
    await through_provider(other.page, isl.url, "u-7")
    await expect(other.page.locator("#who")).to_have_text("alice (admin)")
    await expect(other.page.locator("nav a[data-tab=metrics]")).to_be_visible()
    await other.page.click("nav a[data-tab=account]")
    await expect(other.page.locator("#key-project option")).to_have_text(["none (personal)", "lab"])
    await other.close()
    assert isl.accounts.memberships("alice") == {"lab": "viewer"}

    # Logging out revokes the first session's key: a copy of it is refused.
    async with httpx.AsyncClient(base_url=isl.url) as http:
        auth = {"Authorization": f"Bearer {key}"}
        assert (await http.get("/v1/models", headers=auth)).status_code == 200
        await page.click("#logout")
        # On through the provider's end-session page (the next login there asks again), back.
        await expect(page.locator("h1")).to_have_text("End Session")
        assert f"post_logout_redirect_uri={quote(isl.url, safe='')}%2Fui%2F" in page.url
        await page.click("button[type=submit]")
        await expect(page.locator("#login")).to_be_visible()
        assert page.url == f"{isl.url}/ui/"
        refused = await http.get("/v1/models", headers=auth)
        assert refused.status_code == 401 and "revoked" in refused.text
    assert await page.evaluate("sessionStorage.getItem('atoll.key')") is None
    await tab.close()


async def test_refusals_are_pages_that_say_why(
    make_agent: AgentFactory, oidc_provider: Provider, browser: Browser, tmp_path: Path
) -> None:
    isl = await Island(make_agent).start_gateway(
        oidc=oidc_config(oidc_provider.url, tmp_path, require_group=True)
    )
    oidc_provider.set_user("u-1", preferred_username="bob", groups=["lab-users"])
    oidc_provider.set_user("u-2", preferred_username="carol", groups=["elsewhere"])
    users = isl.accounts.list_users()
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    # Denied at the provider.
    await page.goto(f"{isl.url}/ui/")
    await page.click("#sso-login")
    await page.click("button[value=deny]")
    await expect(page.locator("#sso-error")).to_contain_text("refused the log-in (access_denied)")
    # A forged state.
    await through_provider(page, isl.url, "u-1", state="forged")
    await expect(page.locator("#sso-error")).to_contain_text("state is not this browser")
    # In no group the gateway admits.
    await through_provider(page, isl.url, "u-2")
    await expect(page.locator("#sso-error")).to_contain_text("none of the identity provider")
    # Back to the log-in page, which still offers both ways in.
    await page.click("text=Back to the log-in page")
    await expect(page.locator("#api-key")).to_be_visible()
    await expect(page.locator("#sso-login")).to_be_visible()
    assert isl.accounts.list_users() == users
    await tab.close()
