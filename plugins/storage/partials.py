"""Partial uploads on the storage agent, one machinery for the adapter and dataset upload
streams: the bytes of each file received are kept (staged, never visible) in a folder keyed by
who uploads what, so an upload cut by a broken link or a storage restart sends only the rest when
it is tried again, and a partial upload is only ever its own uploader's. The receiver's first
line tells the uploader how much of each file it holds (``put_resumable`` is the other side).
Partial uploads nobody came back for are removed after ``KEEP_S``."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from atoll.agent.streams import Stream
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Reader,
    commit_staged,
    receive_staged,
    resume_offset,
    sha256_file,
    write_line,
)
from atoll.plugins.storage.contract.wire import FileEntry

KEEP_S = 24 * 3600.0  # a partial upload nobody resumed within this is removed


class PartialUploads:
    """The partial uploads under ``root``, a folder each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def receive(
        self, stream: Stream, reader: Reader, who: Sequence[str], files: Sequence[FileEntry]
    ) -> tuple[Path, int]:
        """Answer the header with what the folder of ``who`` (the caller first, then what makes
        the upload this one) holds of each file, then receive the rest of each, checked against
        its sha256: the folder holding the files whole, and how many bytes earlier attempts had
        sent. A cut leaves what arrived for the next attempt; once the caller has kept or
        refused the files it removes the folder (``drop``)."""
        folder = self.root / hashlib.sha256("\0".join(who).encode()).hexdigest()[:32]
        await asyncio.to_thread(forget_stale, self.root, time.time() - KEEP_S)
        folder.mkdir(mode=0o700, exist_ok=True)
        offsets = [await asyncio.to_thread(held, folder / f.name, f.size, f.sha256) for f in files]
        await write_line(stream, {"offsets": offsets}, IDLE_TIMEOUT)
        for entry, offset in zip(files, offsets, strict=True):
            dest = folder / entry.name
            if offset == entry.size and dest.is_file():
                continue  # received whole in an earlier attempt
            digest = await receive_staged(reader, dest, entry.size, offset)
            await asyncio.to_thread(commit_staged, dest, digest, entry.sha256)
        return folder, sum(offsets)

    async def drop(self, folder: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, folder, True)


def held(dest: Path, size: int, sha256: str) -> int:
    """How much of an upload's file is already here: all of it when a previous attempt
    committed it whole, else what its staged part holds (``resume_offset``)."""
    whole = dest.is_file() and not dest.is_symlink() and dest.stat().st_size == size
    if whole and sha256_file(dest).hexdigest() == sha256:
        return size
    return resume_offset(dest, size, sha256)


def forget_stale(root: Path, before: float) -> None:
    """Remove partial uploads nobody added to since ``before``."""
    for folder in root.iterdir():
        try:
            touched = max((p.lstat().st_mtime for p in folder.rglob("*")), default=0.0)
            if max(touched, folder.lstat().st_mtime) < before:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # gone meanwhile (another upload's sweep, or its own end)
            continue
