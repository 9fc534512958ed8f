"""What storage keeps for training checkpoints, between real agents on a real broker: a job's
resume state (trainers alone write and read it; a new one replaces the old whole), and the
checkpoint adapters a trainer may delete (those alone), each deletion announced."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.plugins.storage.contract.adapters import (
    ADAPTERS_DELETED,
    delete_adapter,
    describe_adapter,
    upload_adapter,
)
from atoll.plugins.storage.contract.resume import (
    ResumeStateNotFound,
    StaleResumeState,
    drop_resume_state,
    fetch_resume_state,
    upload_resume_state,
)
from atoll.protocol.session import Publication
from support.island import start_storage
from support.overlay import AgentFactory, eventually

JOB = "ftjob-0123456789ab"


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_models import random_lora

    return random_lora(tmp_path_factory.mktemp("peft") / "adapter", "atoll-test/tiny-llama")


def state_dir(path: Path, step: int) -> Path:
    path.mkdir()
    (path / "optimizer.pt").write_bytes(bytes(range(256)) * (step + 1))
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (path / "README.md").write_text("not part of a resume state: left out")
    return path


async def test_a_job_s_resume_state_is_kept_replaced_and_dropped(
    tmp_path: Path, make_agent: AgentFactory
) -> None:
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    with pytest.raises(ResumeStateNotFound, match=f"job {JOB} has no resume state"):
        await fetch_resume_state(trainer, "store", JOB, tmp_path / "none")
    assert not (tmp_path / "none").exists()

    for step in (5, 10):
        path = state_dir(tmp_path / f"s{step}", step)
        await upload_resume_state(trainer, "store", JOB, step, f"alice/ft-1-ckpt-step-{step}", path)
    header = await fetch_resume_state(trainer, "store", JOB, tmp_path / "got")
    assert (header.step, header.adapter_id) == (10, "alice/ft-1-ckpt-step-10")
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == [
        "optimizer.pt",
        "trainer_state.json",
    ]
    for name in ("optimizer.pt", "trainer_state.json"):
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "s10" / name).read_bytes()
    keys = await plugin.store.list(f"resume/{JOB}/")
    assert len(keys) == 3  # the new state's two files and its header: the old files are gone

    assert await drop_resume_state(trainer, "store", JOB) is True
    assert await plugin.store.list(f"resume/{JOB}/") == []
    assert await drop_resume_state(trainer, "store", JOB) is False
    with pytest.raises(ResumeStateNotFound):
        await fetch_resume_state(trainer, "store", JOB, tmp_path / "again")

    # Any other file, or a job id that is not one, is refused before anything is sent.
    odd = state_dir(tmp_path / "odd", 1)
    with pytest.raises(InvalidRequest, match="job"):
        await upload_resume_state(trainer, "store", "../etc", 1, "alice/x", odd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidRequest, match="files"):
        await upload_resume_state(trainer, "store", JOB, 1, "alice/x", empty)


async def test_a_fetch_under_way_keeps_its_state_and_a_stale_attempt_is_refused(
    tmp_path: Path, make_agent: AgentFactory
) -> None:
    """A trainer fetching a job's state while another stores the next one gets the state it
    started on, whole (its files are removed once that fetch ends); a state from an earlier
    attempt than the one kept (a stopped trainer finishing its upload late) is refused."""
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    old = state_dir(tmp_path / "s5", 5)
    (old / "rng_state.pth").write_bytes(b"r" * 1000)
    await upload_resume_state(trainer, "store", JOB, 5, "alice/ft-1-ckpt-step-5", old, attempt=2)
    # The fetch is held after its first file, until the next state is kept.
    read, kept, reading = plugin.store.read, asyncio.Event(), asyncio.Event()

    async def held_read(key: str) -> AsyncGenerator[bytes, None]:
        if key.endswith("/rng_state.pth"):
            reading.set()
            await kept.wait()
        async for chunk in read(key):
            yield chunk

    plugin.store.read = held_read  # type: ignore[method-assign]
    fetch = asyncio.create_task(fetch_resume_state(trainer, "store", JOB, tmp_path / "got"))
    await asyncio.wait_for(reading.wait(), 10)
    new = state_dir(tmp_path / "s10", 10)
    await upload_resume_state(trainer, "store", JOB, 10, "alice/ft-1-ckpt-step-10", new, attempt=2)
    kept.set()
    header = await fetch
    assert (header.step, header.attempt) == (5, 2)
    for name in ("optimizer.pt", "trainer_state.json", "rng_state.pth"):
        assert (tmp_path / "got" / name).read_bytes() == (old / name).read_bytes()
    for _ in range(100):  # the old files go once that fetch has ended; bounded
        if len(await plugin.store.list(f"resume/{JOB}/")) == 3:
            break
        await asyncio.sleep(0.05)
    assert len(await plugin.store.list(f"resume/{JOB}/")) == 3

    late = state_dir(tmp_path / "s7", 7)
    with pytest.raises(StaleResumeState, match="from attempt 2; attempt 1 may not replace it"):
        await upload_resume_state(trainer, "store", JOB, 7, "alice/ft-1-ckpt-step-7", late)
    assert (await fetch_resume_state(trainer, "store", JOB, tmp_path / "now")).step == 10
    assert len(await plugin.store.list(f"resume/{JOB}/")) == 3  # nothing of the refused one


async def test_only_trainers_reach_resume_states(tmp_path: Path, make_agent: AgentFactory) -> None:
    await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    await upload_resume_state(trainer, "store", JOB, 5, "alice/x", state_dir(tmp_path / "s", 5))
    for name, role in (("gw", "gateway"), ("gpu", "inference"), ("admin", "admin")):
        other = (await make_agent(name, roles=(role,))).agent
        refusal = rf"'{name}' \(roles {role}\) may not use"
        with pytest.raises(Forbidden, match=refusal):
            await fetch_resume_state(other, "store", JOB, tmp_path / name)
        with pytest.raises(Forbidden, match=refusal):
            await upload_resume_state(other, "store", JOB, 6, "alice/x", tmp_path / "s")
        with pytest.raises(Forbidden, match=refusal):
            await drop_resume_state(other, "store", JOB)
    assert (await fetch_resume_state(trainer, "store", JOB, tmp_path / "t")).step == 5


async def test_a_trainer_deletes_checkpoints_only_and_deletions_are_announced(
    tmp_path: Path, make_agent: AgentFactory, peft_adapter: Path
) -> None:
    await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    deleted: list[Publication] = []
    await gateway.subscribe(ADAPTERS_DELETED, deleted.append)
    src = shutil.copytree(peft_adapter, tmp_path / "a")
    mark = {"checkpoint": {"job": JOB, "step": 5}}
    for adapter_id, meta in (("alice/ft-1-ckpt-step-5", mark), ("alice/ft-1", {})):
        await upload_adapter(trainer, "store", src, adapter_id, meta, owner="alice", source_job=JOB)
    await upload_adapter(trainer, "store", src, "alice/other", mark, owner="alice")

    for not_a_checkpoint in ("alice/ft-1", "alice/other"):  # a final adapter; no job made it
        with pytest.raises(Forbidden, match="a trainer deletes only training checkpoints"):
            await delete_adapter(trainer, "store", not_a_checkpoint)
        assert (await describe_adapter(trainer, "store", not_a_checkpoint)).id == not_a_checkpoint
    await delete_adapter(trainer, "store", "alice/ft-1-ckpt-step-5")
    await eventually(lambda: [p.data for p in deleted] == [{"id": "alice/ft-1-ckpt-step-5"}])
    assert deleted[0].src == "store/storage"
    await delete_adapter(gateway, "store", "alice/ft-1")  # clients delete any adapter
    await eventually(lambda: len(deleted) == 2)
