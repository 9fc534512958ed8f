"""The files plugin followed a symbolic link in the last path component (it returned the agent's
private key seed through a link placed in an allowed directory). Every link in a path is now
resolved and must land inside an allowed directory, and files are opened with O_NOFOLLOW."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden
from atoll.agent.files import get_file, open_nofollow, put_file
from conftest import AgentFactory


async def test_links_out_of_the_allowed_directories_are_refused(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    box = await make_agent("box", plugins={"files": {"dirs": [str(shared)]}})
    box.agent.keys.save(box.host.data_dir)  # as `agent join` leaves it: agent.key, 0600
    seed = box.host.data_dir / "agent.key"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    (shared / "seed").symlink_to(seed)  # a link as the last component
    (shared / "sub").symlink_to(outside)  # a link in the middle
    ops = await make_agent("ops", roles=("operator",))
    got = tmp_path / "got"
    for remote in (
        shared / "seed",
        shared / "sub" / "secret.txt",
        shared / ".." / "outside" / "secret.txt",
        "seed",  # relative to the first allowed directory
    ):
        with pytest.raises(Forbidden, match="outside this agent's file allow-list"):
            await get_file(ops.agent, "box", str(remote), got)
        assert not got.exists()
    # Writing through a link is refused the same way, and nothing lands outside.
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 100)
    with pytest.raises(Forbidden, match="outside this agent's file allow-list"):
        await put_file(ops.agent, "box", payload, str(shared / "sub" / "planted"))
    assert not (outside / "planted").exists()
    assert seed.read_bytes().startswith(b"ATOLL-ED25519-SEED")  # untouched
    # A link that stays inside the allowed directory is fine.
    (shared / "real.txt").write_text("shared text")
    (shared / "alias.txt").symlink_to(shared / "real.txt")
    await get_file(ops.agent, "box", str(shared / "alias.txt"), got)
    assert got.read_text() == "shared text"


def test_a_link_swapped_in_after_the_check_is_not_opened(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_text("seed")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(Forbidden, match="is a symbolic link"):
        open_nofollow(link)
    with pytest.raises(Forbidden, match="is a symbolic link"):
        open_nofollow(link, "r+b")
    with open_nofollow(target) as fh:
        assert fh.read() == b"seed"
    assert os.path.islink(link)
