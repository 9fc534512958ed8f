"""The files plugin followed a symbolic link in the last path component (it returned the agent's
private key seed through a link placed in an allowed directory). Every link in a path is now
resolved and must land inside an allowed directory, and files are opened with O_NOFOLLOW."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden
from atoll.agent.files import get_file, put_file
from atoll.agent.transfer import STAGING, open_nofollow, staging_paths, version_of
from support.overlay import AgentFactory


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


async def test_the_staging_area_is_never_written_through_a_link(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """A put stages its bytes in ``.atoll-staging/`` beside the destination. Links planted there
    (for the partial file, its metadata, or the staging directory itself) would have had the
    put truncate or write files outside the allowed directories: refused instead."""
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    box = await make_agent("box", plugins={"files": {"dirs": [str(shared)]}})
    box.agent.keys.save(box.host.data_dir)
    seed = box.host.data_dir / "agent.key"
    before = seed.read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    notes = outside / "notes.txt"
    notes.write_text("keep me")
    dest = (shared / "upload.bin").resolve()
    part, meta = staging_paths(dest)
    part.parent.mkdir()
    part.symlink_to(seed)  # the partial file: would be truncated, then written
    meta.symlink_to(notes)  # its metadata: would be overwritten
    (shared / "sub" / STAGING).symlink_to(outside)  # the whole staging directory
    ops = await make_agent("ops", roles=("operator",))
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 1000)
    for remote in (dest, shared / "sub" / "upload.bin"):
        with pytest.raises(Forbidden, match="symbolic link"):
            await put_file(ops.agent, "box", payload, str(remote))
    assert seed.read_bytes() == before
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt"]
    assert not dest.exists() and not (shared / "sub" / "upload.bin").exists()
    # A hard link as the partial file, with metadata asking to resume it: started afresh.
    for link in (part, meta, shared / "sub" / STAGING):
        link.unlink()
    victim = outside / "victim.bin"
    victim.write_bytes(b"v" * 500)
    os.link(victim, part)
    want = {"path": str(dest), "size": 1000, "version": version_of(payload)}
    meta.write_text(json.dumps(want))
    await put_file(ops.agent, "box", payload, str(dest))
    assert victim.read_bytes() == b"v" * 500 and dest.read_bytes() == payload.read_bytes()
    dest.unlink()
    # With the links gone, the same puts go through (and leave no partial file visible).
    for remote in (dest, shared / "sub" / "upload.bin"):
        await put_file(ops.agent, "box", payload, str(remote))
        assert Path(remote).read_bytes() == payload.read_bytes()
    assert not list(part.parent.iterdir())
