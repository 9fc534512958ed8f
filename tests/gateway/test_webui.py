"""The web UI in a real browser: Debian's chromium driven by playwright against a gateway with a
live broker and inference agents (echo backend; a trainer with a tiny model for the jobs page).
The pages call the same public API as any client, with the key the user logged in with."""

from __future__ import annotations

import asyncio
import json
import re
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from playwright.async_api import Browser, FilePayload, Page, expect

from support.browser import Tab
from support.island import Island, colour_rows, pair_rows, training_island
from support.overlay import eventually


async def last_reply(page: Page) -> list[str]:
    return (
        await page.locator("#messages .message.assistant")
        .last.locator(".content")
        .all_inner_texts()
    )


async def test_log_in_chat_stream_compare_and_keep_conversations(
    make_agent, browser: Browser
) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1", delay=0.08)  # one word every 80 ms: a reply visibly streams
    await (await isl.start_gateway()).models_seen("echo")
    isl.accounts.create_user("alice", actor="test")
    isl.accounts.register_adapter("alice/pirate", "echo", owner="alice", actor="test")
    isl.accounts.register_adapter("alice/poet", "echo", owner="alice", actor="test")
    alice = isl.key("alice")
    tab = await Tab.open(browser, isl.url)
    page = tab.page

    # The UI is where / points; its pages forbid inline and foreign scripts.
    await page.goto(f"{isl.url}/")
    assert page.url == f"{isl.url}/ui/"
    async with httpx.AsyncClient() as http:
        headers = (await http.get(f"{isl.url}/ui/app.js")).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]

    await page.fill("#api-key", "sk-atoll-wrong")
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_contain_text("Refused")
    await tab.login(alice)
    await expect(page.locator("#who")).to_have_text("alice")
    await expect(page.locator("nav a[data-tab=metrics]")).to_be_hidden()  # not an admin
    await expect(page.locator("#model option")).to_have_count(3)  # echo + her two adapters

    # A reply streams in word by word: seen part-way, then whole, with its token counts.
    words = "one two three four five six seven eight nine ten"
    await page.fill("#prompt", words)
    await page.press("#prompt", "Enter")
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        texts = await last_reply(page)
        seen.append(texts[0] if texts else "")
        if seen[-1] == words:
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == words
    assert any(0 < len(s) < len(words) for s in seen), "the reply never showed part-way"
    await expect(page.locator("#messages .usage").last).to_contain_text("tokens")

    # Stop mid-reply: the words so far stay, the composer is back, the node stopped (the
    # ledger has the request as 499, the client went away).
    long = " ".join(f"w{i}" for i in range(60))
    await page.fill("#prompt", long)
    await page.press("#prompt", "Enter")
    streaming = page.locator("#messages .message.assistant").last.locator(".content")
    await expect(streaming).to_have_text(re.compile(r"^w0 w1 w2"))
    await page.click("#stop")
    await expect(page.locator("#send")).to_be_visible()
    stopped = (await last_reply(page))[0]
    assert stopped.startswith("w0 w1 w2") and len(stopped) < len(long)
    await eventually(lambda: [r.status for r in isl.accounts.usage_rows()][-1:] == [499])

    # Compare: the adapter's answer and the base model's, side by side.
    await page.select_option("#model", "alice/pirate")
    await page.check("#compare")
    await page.fill("#prompt", "ahoy there")
    await page.click("#send")
    reply = page.locator("#messages .message.assistant").last
    await expect(reply.locator(".content")).to_have_text(
        ["[alice/pirate] ahoy there", "ahoy there"]
    )
    await expect(reply.locator(".label")).to_have_text(["alice/pirate", "echo"])

    # A weighted mixture goes on the base model with both adapters.
    await page.select_option("#model", "echo")
    await expect(page.locator("#compare")).not_to_be_checked()  # nothing to compare with
    for adapter, weight in (("alice/pirate", "0.7"), ("alice/poet", "0.3")):
        await page.click("#add-adapter")
        row = page.locator("#mixture .mix-row").last
        await row.locator("select").select_option(adapter)
        await row.locator("input").fill(weight)
        await row.locator("input").dispatch_event("change")
    await page.select_option("#merge-strategy", "ties")
    await page.fill("#prompt", "mixed")
    await page.click("#send")
    await expect(reply.locator(".content")).to_have_text(re.compile(r"^\[mix:.*\] mixed$"))
    tagged = re.match(r"^\[mix:(.*)\] mixed$", (await last_reply(page))[0])
    assert tagged is not None
    mixture = json.loads(tagged[1])
    assert mixture["merge_strategy"] == "ties"
    assert {(a["id"], a["weight"]) for a in mixture["adapters"]} == {
        ("alice/pirate", 0.7),
        ("alice/poet", 0.3),
    }

    # Model output is shown as text, never run as HTML.
    attack = "<img src=x onerror=\"document.title='pwned'\">"
    await page.fill("#prompt", attack)
    await page.click("#send")
    await expect(reply.locator(".content")).to_have_text(re.compile(r"onerror"))
    assert await page.locator("#messages img").count() == 0
    assert await page.title() != "pwned"

    # Errors are shown and lose nothing: an adapter revoked meanwhile, the prompt kept.
    await page.select_option("#model", "alice/pirate")
    await page.click("#mixture .mix-row button")
    await page.click("#mixture .mix-row button")
    isl.accounts.unregister_adapter("alice/pirate", actor="test")
    await page.fill("#prompt", "still here?")
    await page.click("#send")
    await expect(page.locator("#chat-error")).to_contain_text("alice/pirate")
    await expect(page.locator("#prompt")).to_have_value("still here?")

    # Conversations are kept per user: after a reload alice has hers, bob sees none of them.
    await page.click("#new-chat")
    await page.reload()
    await expect(page.locator("#who")).to_have_text("alice")
    await expect(page.locator("#chat-list li")).to_have_count(2)
    await page.locator("#chat-list li span", has_text="one two three").click()
    await expect(page.locator("#messages .message.assistant")).to_have_count(5)
    bob = await Tab.open(browser, isl.url)
    await bob.login(isl.key("bob"))
    await expect(bob.page.locator("#chat-list li")).to_have_count(1)
    await expect(bob.page.locator("#messages .message")).to_have_count(0)
    await bob.close()

    # A key revoked mid-session: the next call logs the tab out, saying why.
    for record in isl.accounts.list_keys(user="alice"):
        isl.accounts.revoke_key(record.key_id, actor="test")
    await page.fill("#prompt", "anyone there?")
    await page.click("#send")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#login-error")).to_contain_text("revoked")
    await expect(page.locator("#tab-chat")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('atoll.key')") is None
    await tab.close()


async def test_admin_dashboard_shows_the_live_feed(gw_island: Island, browser: Browser) -> None:
    isl = gw_island
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await tab.login(isl.admin_key)
    await expect(page.locator("#who")).to_have_text("admin (admin)")
    await page.click("nav a[data-tab=metrics]")
    rows = page.locator("#agents-table tbody tr")
    for name in ("gpu1", "gpu2", "gw"):
        await expect(page.locator(f"#agents-table tr[data-agent={name}]")).to_be_visible()
    gpu1 = page.locator("#agents-table tr[data-agent=gpu1] td")
    await expect(gpu1.nth(1)).to_have_text("ACTIVE")
    await expect(gpu1.nth(4)).to_have_text(re.compile(r"^\d+(\.\d+)?$"))  # CPU % from psutil
    await expect(gpu1.nth(3)).to_contain_text("inference")

    # It is live: frames keep arriving, the charts grow, and an agent that goes away shows it.
    frames = int(await page.get_attribute("#tab-metrics", "data-frames") or 0)
    points = int(await page.get_attribute("#chart-cpu", "data-points") or 0)
    await page.wait_for_function(
        "n => Number(document.getElementById('tab-metrics').dataset.frames) > n", arg=frames + 2
    )
    assert int(await page.get_attribute("#chart-cpu", "data-points") or 0) > points
    await isl.nodes["gpu2"].stop()
    await expect(page.locator("#agents-table tr[data-agent=gpu2]")).not_to_have_attribute(
        "data-status", "ACTIVE"
    )
    assert await rows.count() >= 3
    await tab.close()

    # Not for users: no tab, and the feed refuses their key.
    user = await Tab.open(browser, isl.url)
    await user.login(isl.key("carol"))
    await expect(user.page.locator("nav a[data-tab=metrics]")).to_be_hidden()
    await user.page.goto(f"{isl.url}/ui/#metrics")
    await expect(user.page.locator("#tab-chat")).to_be_visible()
    await expect(user.page.locator("#tab-metrics")).to_be_hidden()
    await user.close()


ROWS = colour_rows(48)


@pytest.mark.timeout(300)
async def test_datasets_training_charts_and_chat_with_the_result(
    make_agent, browser: Browser, tmp_path: Path
) -> None:
    isl = await training_island(make_agent, tmp_path)
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await tab.login(isl.key("alice"))

    # A bad dataset is refused with the line and the reason; nothing is kept.
    await page.click("nav a[data-tab=datasets]")

    async def upload(name: str, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        file = FilePayload(name=name, mimeType="application/jsonl", buffer=text.encode())
        await page.set_input_files("#dataset-file", file)
        await page.click("#upload-form button")

    await upload("bad.jsonl", [ROWS[0], {"instruction": "no output"}])
    await expect(page.locator("#upload-error")).to_contain_text("line 2")
    await expect(page.locator("#datasets-table tbody tr")).to_have_count(0)
    await upload("colours.jsonl", ROWS)
    await expect(page.locator("#upload-status")).to_contain_text("Uploaded colours.jsonl")
    await expect(page.locator("#datasets-table tbody tr")).to_have_count(1)
    await expect(page.locator("#datasets-table tbody td").nth(1)).to_have_text("colours.jsonl")
    await upload("held-out.jsonl", colour_rows(8))  # the job's validation_file
    await expect(page.locator("#datasets-table tbody tr")).to_have_count(2)
    table = page.locator("#datasets-table tbody tr")
    colours = await table.filter(has_text="colours.jsonl").get_attribute("data-id")
    held_out = await table.filter(has_text="held-out.jsonl").get_attribute("data-id")
    assert colours and held_out

    # Train from the form and watch the loss chart grow while the job runs.
    await page.click("nav a[data-tab=jobs]")
    await expect(page.locator("#job-dataset option")).to_have_count(2)
    await page.select_option("#job-dataset", colours)
    await expect(page.locator("#job-validation-file option")).to_have_count(3)  # or none
    await page.select_option("#job-validation-file", held_out)
    await page.select_option("#job-model", "tiny-llama")
    # 24 epochs of 12 steps: a few seconds of training on the tiny model, several of the page's
    # 1.5 s refreshes (6 epochs could finish between two of them, and the chart jump 0 -> all)
    await page.fill("#job-epochs", "24")
    await page.fill("#job-batch", "4")  # the learning rate stays "auto"
    await page.fill("#job-rank", "4")
    await page.fill("#job-logging", "1")
    await page.fill("#job-suffix", "colours")
    await page.click("#job-form button")
    detail = page.locator("#job-detail")
    await expect(detail).to_be_visible()
    points: list[int] = []
    groups: set[str] = set()  # the tables the job was seen in
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        points.append(int(await page.get_attribute("#chart-loss", "data-points") or 0))
        for group in await page.locator("#job-tables [data-group]:has(tbody tr)").all():
            groups.add(await group.get_attribute("data-group") or "")
        status = await detail.get_attribute("data-status")
        if status in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.25)
    assert status == "succeeded", await page.inner_text("#job-status")
    await expect(page.locator("#job-tables [data-group=completed] tbody tr")).to_have_count(1)
    assert "training" in groups, groups
    final = int(await page.get_attribute("#chart-loss", "data-points") or 0)
    growing = sorted({p for p in points if 0 < p < final})
    assert growing, f"the chart never showed a part of the run: {points}"
    # 48 rows in batches of 4, 24 epochs, logging every step; the held-out set after each epoch
    assert int(await page.get_attribute("#chart-lr", "data-points") or 0) == 12 * 24
    assert final == 12 * 24 + 24
    assert int(await page.get_attribute("#chart-accuracy", "data-points") or 0) == final
    await expect(page.locator("#job-stats dd[data-stat=train_loss]")).to_have_text(
        re.compile(r"\d")
    )
    stats = page.locator("#job-stats")
    await expect(stats.locator("dd[data-stat=n_epochs]")).to_have_text("24")
    await expect(stats.locator("dd[data-stat=batch_size]")).to_have_text("4")
    await expect(stats.locator("dd[data-stat=learning_rate_multiplier]")).to_have_text("1")
    await expect(stats.locator("dd[data-stat=trained_tokens]")).to_have_text(re.compile(r"\d"))
    # The held-out set's figures after each epoch, and at the end.
    await expect(page.locator("#chart-loss .legend")).to_contain_text("validation")
    await expect(stats.locator("dd[data-stat=full_valid_loss]")).to_have_text(re.compile(r"\d"))

    # Chat with the adapter the job made.
    adapter = await page.inner_text("#job-title")
    assert adapter.startswith("alice/colours-")
    # Its last three epochs' checkpoints, newest first, each a model to chat with.
    checkpoints = page.locator("#job-checkpoints tbody tr")
    await expect(checkpoints).to_have_count(3)
    for row, step in zip(await checkpoints.all(), (288, 276, 264), strict=True):
        await expect(row.locator("td").nth(1)).to_have_text(f"{adapter}-ckpt-step-{step}")
    await checkpoints.nth(2).locator("button").click()
    await expect(page.locator("#model")).to_have_value(f"{adapter}-ckpt-step-264")
    await page.click("nav a[data-tab=jobs]")
    # Download it: the tar of its files, as the API sends them.
    async with page.expect_download() as download_info:
        await page.click("#job-download")
    download = await download_info.value
    assert download.suggested_filename == f"{adapter.replace('/', '--')}.tar"
    saved = tmp_path / "downloaded.tar"
    await download.save_as(saved)
    with tarfile.open(saved) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    await page.click("#job-chat")
    await expect(page.locator("#tab-chat")).to_be_visible()
    await expect(page.locator("#model")).to_have_value(adapter)
    await page.fill("#prompt", "Say the colour number 3.")
    await page.click("#send")
    # Its first use fetches the adapter from storage and loads it: slow on a busy machine.
    await expect(page.locator("#messages .usage").last).to_have_text(
        re.compile(r"^\d+ \+ [1-9]\d* tokens$"), timeout=60_000
    )

    # Evaluate the base model and the adapter on the dataset, side by side.
    await page.click("nav a[data-tab=evaluations]")
    await expect(page.locator("#eval-dataset option")).to_have_count(2)
    await page.select_option("#eval-dataset", colours)
    await page.check("#eval-models input[value='tiny-llama']")
    await page.check(f"#eval-models input[value='{adapter}']")
    await page.fill("#eval-max-tokens", "8")
    await page.click("#eval-form button")
    await expect(page.locator("#eval-status")).to_contain_text(
        f"succeeded, {len(ROWS)} of {len(ROWS)} rows", timeout=120_000
    )
    results = page.locator("#eval-results tbody tr")
    await expect(results).to_have_count(2)
    await expect(results.nth(1).locator("td").first).to_have_text(adapter)
    await expect(results.nth(1).locator("td").nth(4)).to_have_text(re.compile(r"^-?\d+\.\d{3}$"))
    await expect(page.locator("#eval-examples .example")).to_have_count(3)
    await expect(page.locator("#eval-table tbody tr")).to_have_count(1)
    await tab.close()


@pytest.mark.timeout(300)
async def test_a_preference_job_from_the_form_shows_its_reward_figures(
    make_agent, browser: Browser, tmp_path: Path
) -> None:
    """Method "Preference (DPO)" in the form: the job trains on preference rows with the beta
    given, and its charts and statistics are the pairs' (preference accuracy, reward margin),
    training and validation."""
    isl = await training_island(make_agent, tmp_path)
    key = isl.key("alice")
    rows = "".join(json.dumps(r) + "\n" for r in pair_rows(range(24))).encode()
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key) as client:
        await client.files.create(file=("pairs.jsonl", rows), purpose="fine-tune")
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await tab.login(key)
    await page.click("nav a[data-tab=jobs]")
    await expect(page.locator("#job-dataset option")).to_have_count(1)
    await page.select_option("#job-model", "tiny-llama")
    await expect(page.locator("#job-beta")).to_be_hidden()  # a supervised job has none
    await page.select_option("#job-method", "dpo")
    await page.fill("#job-beta", "0.2")
    await page.fill("#job-epochs", "3")
    await page.fill("#job-batch", "6")
    await page.fill("#job-validation", "0.25")
    await page.fill("#job-rank", "4")
    await page.fill("#job-logging", "1")
    await page.click("#job-form button")
    detail = page.locator("#job-detail")
    await expect(detail).to_have_attribute("data-status", "succeeded", timeout=240_000)
    await expect(page.locator("#chart-accuracy h3")).to_have_text("Preference accuracy")
    await expect(page.locator("#chart-accuracy .legend")).to_contain_text("validation")
    assert int(await page.get_attribute("#chart-accuracy", "data-points") or 0) >= 9  # 3 x 3 + 3
    stats = page.locator("#job-stats")
    await expect(stats.locator("dd[data-stat=beta]")).to_have_text("0.2")
    for figure in ("full_valid_rewards/accuracies", "full_valid_rewards/margins"):
        await expect(stats.locator(f"dd[data-stat='{figure}']")).to_have_text(re.compile(r"\d"))
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key) as client:
        (job,) = (await client.fine_tuning.jobs.list()).data
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2
    await tab.close()


async def test_my_keys_and_usage(gw_island: Island, browser: Browser) -> None:
    """A user lists their keys, creates one (shown once), revokes it, and sees their budget and
    their usage per model; another user's page shows nothing of theirs."""
    isl = gw_island
    acc = isl.accounts
    key = isl.key("alice")
    acc.create_project("lab", actor="t")
    acc.add_member("lab", "alice", "member", actor="t")
    acc.set_budget("user", "alice", "tokens", "monthly", 5000, actor="t")
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        body = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}
        chat = await http.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert chat.status_code == 200
    tab = await Tab.open(browser, isl.url)
    page = tab.page
    await tab.login(key)
    await page.click("nav a[data-tab=account]")
    rows = page.locator("#keys-table tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("(this one)")
    await expect(page.locator("#usage-table tbody tr")).to_have_count(1)
    await expect(page.locator("#usage-table tbody tr td").nth(2)).to_have_text("1")
    await expect(page.locator("#usage-total")).to_contain_text("1 requests, 3 prompt")
    budget = page.locator("#budgets-table tbody tr")
    await expect(budget).to_have_count(1)
    await expect(budget.locator("td").nth(5)).to_have_text("4994 tokens")  # 5000 - 3 - 3
    await expect(page.locator("#key-project option")).to_have_count(2)  # personal, lab
    await page.fill("#key-name", "notebook")
    await page.select_option("#key-project", "lab")
    await page.click("#key-form button")
    await expect(page.locator("#new-key")).to_be_visible()
    made = await page.locator("#new-key-text").inner_text()
    assert made.startswith("atk_")
    await expect(rows).to_have_count(2)
    notebook = rows.filter(has_text="notebook")
    await expect(notebook).to_contain_text("lab")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await notebook.locator("button").click()
    await expect(notebook).to_contain_text("revoked")
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        refused = await http.get("/v1/models", headers={"Authorization": f"Bearer {made}"})
        assert refused.status_code == 401
    await tab.close()
    # Bob's page: his keys only, no budget, no usage.
    other = await Tab.open(browser, isl.url)
    await other.login(isl.key("bob"))
    await other.page.click("nav a[data-tab=account]")
    await expect(other.page.locator("#keys-table tbody tr")).to_have_count(1)
    await expect(other.page.locator("#keys-table tbody")).not_to_contain_text("notebook")
    await expect(other.page.locator("#no-budgets")).to_be_visible()
    await expect(other.page.locator("#usage-table tbody tr")).to_have_count(0)
    await other.close()
