"""`atoll fine-tune` with a user's API key against a live gateway: a supervised job followed to
its end, its events, checkpoints and listing; a dpo job; what is refused, and to whom."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner, Result

from atoll.plugins.gateway.finetune_commands import fine_tune
from support.island import colour_rows, pair_rows, training_island, write_rows
from support.overlay import AgentFactory

RUNNER = CliRunner()


async def test_a_user_trains_follows_and_lists_jobs_from_the_cli(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    isl = await training_island(make_agent, tmp_path)

    async def atoll(user: str, *args: str) -> Result:
        env = {"ATOLL_GATEWAY_URL": isl.url, "ATOLL_API_KEY": isl.key(user), "COLUMNS": "200"}
        return await asyncio.to_thread(RUNNER.invoke, fine_tune, list(args), env=env)

    rows = write_rows(tmp_path / "rows.jsonl", colour_rows(12))
    held = write_rows(tmp_path / "held.jsonl", colour_rows(4))
    ran = await atoll(
        "alice", "create", str(rows), "-m", "tiny-llama", "--validation", str(held),
        "--epochs", "2", "--batch-size", "4", "--suffix", "cli", "--wait",
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    job = json.loads(ran.stdout)
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("alice/cli-")
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 4
    assert "Step 6/6" in ran.stderr  # the events, as they came

    events = json.loads((await atoll("alice", "events", job["id"])).stdout)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == sorted(steps) and steps[-1] == 6  # oldest first
    kept = json.loads((await atoll("alice", "checkpoints", job["id"])).stdout)
    assert [c["step_number"] for c in kept] == [6, 3]  # an epoch each, newest first
    listed = json.loads((await atoll("alice", "list")).stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    shown = json.loads((await atoll("alice", "show", job["id"])).stdout)
    assert shown["result_files"] == job["result_files"] and shown["trained_tokens"] > 0

    # Preference pairs: started without waiting (its id on stdout), then followed.
    pairs = write_rows(tmp_path / "pairs.jsonl", pair_rows(range(8)))
    started = await atoll(
        "alice", "create", str(pairs), "-m", "tiny-llama", "--method", "dpo", "--beta", "0.2",
        "--epochs", "1", "--batch-size", "4",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    dpo_id = started.stdout.strip()
    followed = await atoll("alice", "events", dpo_id, "--wait")
    assert followed.exit_code == 0 and "completed: adapter" in followed.stderr, followed.output
    dpo = json.loads((await atoll("alice", "show", dpo_id)).stdout)
    assert dpo["method"]["type"] == "dpo" and dpo["method"]["dpo"]["hyperparameters"]["beta"] == 0.2

    # Refused, with the gateway's or the command's words; another user sees none of it.
    wrong = await atoll("alice", "create", str(rows), "-m", "tiny-llama", "--method", "dpo")
    assert wrong.exit_code == 1 and "needs preference pairs" in wrong.output
    beta = await atoll("alice", "create", str(rows), "-m", "tiny-llama", "--beta", "0.1")
    assert beta.exit_code == 1 and "--method dpo" in beta.output
    ended = await atoll("alice", "cancel", job["id"])
    assert ended.exit_code == 1 and "already completed" in ended.output
    for args in (("show", job["id"]), ("events", job["id"]), ("cancel", dpo_id)):
        hidden = await atoll("bob", *args)
        assert hidden.exit_code == 1 and "404" in hidden.output, args
    assert json.loads((await atoll("bob", "list")).stdout) == []
