"""What storage keeps for training checkpoints, between real agents on a real broker: a job's
resume state (trainers alone write and read it; a new one replaces the old whole), and the
checkpoint adapters a trainer may delete (those alone), each deletion announced."""

from __future__ import annotations

import shutil
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
