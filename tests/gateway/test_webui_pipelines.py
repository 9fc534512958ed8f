"""The admins' Pipelines page: ``GET /admin/pipelines`` asks the active controller over the
overlay (none online: an empty answer, not an error; 403 for a user's key), and the web UI's
Pipelines tab, in a real browser, shows each service's desired and actual replicas, its state
and the events."""

from __future__ import annotations

import httpx
from playwright.async_api import Browser, expect

from atoll.plugins.controller.contract import apply_pipeline
from support.browser import Tab
from support.island import Island
from support.overlay import AgentFactory, eventually

PIPELINE = {
    "name": "llm",
    "services": {
        "inf": {
            "plugin": "inference",
            "replicas": 2,  # one labelled agent: degraded, and shown so
            "where": {"labels": {"gpu": "true"}},
            "config": {"backend": "echo", "echo": {"model": "m1"}},
        }
    },
}


async def test_admins_see_the_pipelines(
    gw_island: Island, make_agent: AgentFactory, browser: Browser
) -> None:
    isl = gw_island
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        admin = {"Authorization": f"Bearer {isl.admin_key}"}
        reply = await http.get("/admin/pipelines", headers=admin)
        assert reply.json() == {"controller": None, "pipelines": []}  # none: not an error
        ctl = {"controller": {"interval": 0.2}}
        controller = await make_agent("ctl", roles=("controller",), plugins=ctl, heartbeat=0.2)
        node = await make_agent("n3", roles=("inference",), labels={"gpu": "true"}, heartbeat=0.2)
        op = (await make_agent("op", roles=("operator",))).agent
        discovery = isl.plugin.gateway.watch.discovery
        plugin = controller.host.plugins["controller"]
        await eventually(lambda: bool(plugin.status()["active"] and discovery.select("controller")))
        await apply_pipeline(op, "ctl", PIPELINE)
        await eventually(lambda: "inference" in node.host.plugins, 10)
        reply = await http.get("/admin/pipelines", headers=admin)
        assert reply.status_code == 200, reply.text
        assert reply.json()["controller"] == "ctl"
        (pipeline,) = reply.json()["pipelines"]
        assert pipeline["services"][0]["agents"] == ["n3"]
        user = {"Authorization": f"Bearer {isl.key('carol')}"}
        assert (await http.get("/admin/pipelines", headers=user)).status_code == 403

    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await tab.login(isl.admin_key)
    await page.click("nav a[data-tab=pipelines]")
    await expect(page.locator("#pipelines-controller")).to_have_text("active controller: ctl")
    row = page.locator("#pipelines-table tr[data-service='llm/inf'] td")
    await expect(row.nth(4)).to_have_text("2")  # desired
    await expect(row.nth(5)).to_have_text("1")  # actual
    await expect(row.nth(6)).to_have_text("degraded")
    await expect(row.nth(7)).to_have_text("n3")
    events = page.locator("#pipeline-events tbody")
    await expect(events).to_contain_text("inference placed")
    await tab.close()

    user_tab = await Tab.open(browser, isl.url)
    await user_tab.login(isl.key("carol"))
    await expect(user_tab.page.locator("nav a[data-tab=pipelines]")).to_be_hidden()
    await user_tab.close()
