"""The storage plugin's resume states (see ``contract/resume.py`` for the wire): a job's files
under ``resume/<job>/<token>/<name>`` (a fresh token each time), and ``resume/<job>/state.json``
naming the token and the header, written after the files and read first. Replacing a state writes
the new files, then ``state.json``, then removes the old files once no fetch is reading them: a
reader sees the old state or the new one, never a mix. A state from an earlier attempt of the job
(a trainer that was stopped but still uploads) never replaces a later attempt's."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from atoll.agent.contract import parse
from atoll.agent.errors import InvalidRequest
from atoll.agent.plugins import PluginContext
from atoll.agent.streams import Stream
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Reader,
    confirmed,
    idle_deadline,
    receive_file,
    send_bytes,
    write_line,
)
from atoll.plugins.storage.contract.resume import (
    ResumeHeader,
    ResumeRef,
    ResumeStateNotFound,
    StaleResumeState,
)
from atoll.plugins.storage.store import ObjectNotFound, ObjectStore
from atoll.protocol.session import CallInfo


def _state_key(job: str) -> str:
    return f"resume/{job}/state.json"


def _file_key(job: str, token: str, name: str) -> str:
    return f"resume/{job}/{token}/{name}"


class ResumeStates:
    def __init__(
        self, ctx: PluginContext, store: ObjectStore, incoming: Path, max_bytes: int
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.incoming = incoming
        self.max_bytes = max_bytes
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # by job
        self._readers: Counter[tuple[str, str]] = Counter()  # (job, token) being fetched
        self._retired: dict[tuple[str, str], ResumeHeader] = {}  # replaced while fetched

    async def current(self, job: str) -> tuple[str, ResumeHeader] | None:
        """(the files' token, the header) of ``job``'s state, if it has one."""
        try:
            raw = json.loads(await self.store.get(_state_key(job)))
        except ObjectNotFound:
            return None
        return raw["token"], ResumeHeader.model_validate(raw["header"])

    async def put(self, stream: Stream, params: object, call: CallInfo) -> None:
        with idle_deadline(f"resume state upload from {call.src}", IDLE_TIMEOUT):
            reader = Reader(stream, IDLE_TIMEOUT)
            header = parse(ResumeHeader, await reader.line(), "resume state header")
            if header.size > self.max_bytes:
                raise InvalidRequest(
                    f"resume state of {header.job} is {header.size} bytes; this store takes at "
                    f"most {self.max_bytes}"
                )
            token = secrets.token_hex(8)
            stage = Path(tempfile.mkdtemp(dir=self.incoming))
            keys = [_file_key(header.job, token, entry.name) for entry in header.files]
            try:
                for entry in header.files:
                    await receive_file(reader, stage / entry.name, entry.size, entry.sha256)
                for key, entry in zip(keys, header.files, strict=True):
                    await self.store.put_file(key, stage / entry.name)
                old = await self._commit(header, token)
            except BaseException:
                for key in keys:
                    await self.store.delete(key)
                raise
            finally:
                await asyncio.to_thread(shutil.rmtree, stage, True)
            if old is not None:
                await self._retire(*old)
            self.ctx.log.info(
                "storage.resume_state_kept", job=header.job, step=header.step, by=call.caller.name
            )
            await write_line(stream, {"ok": True}, IDLE_TIMEOUT)

    async def _commit(self, header: ResumeHeader, token: str) -> tuple[str, ResumeHeader] | None:
        """``header``'s files (stored under ``token``) become the job's state; the one replaced."""
        async with self._locks[header.job]:
            old = await self.current(header.job)
            if old is not None and old[1].attempt > header.attempt:
                raise StaleResumeState(
                    f"job {header.job} has a resume state from attempt {old[1].attempt}; "
                    f"attempt {header.attempt} may not replace it"
                )
            state = {"token": token, "header": header.model_dump(mode="json")}
            await self.store.put(_state_key(header.job), json.dumps(state).encode())
            return old

    async def get(self, stream: Stream, params: object, call: CallInfo) -> None:
        ref = parse(ResumeRef, params, "resume_get request")
        async with self._locks[ref.job]:  # no state replaced between reading and counting it
            found = await self.current(ref.job)
            if found is None:
                raise ResumeStateNotFound(f"job {ref.job} has no resume state")
            token, header = found
            self._readers[ref.job, token] += 1  # its files stay until this fetch ends
        try:
            with idle_deadline(f"resume state fetch by {call.src}", IDLE_TIMEOUT):
                await write_line(stream, header.model_dump(mode="json"), IDLE_TIMEOUT)
                for entry in header.files:
                    chunks = self.store.read(_file_key(header.job, token, entry.name))
                    await send_bytes(stream, chunks, entry.size, IDLE_TIMEOUT)
                await confirmed(Reader(stream, IDLE_TIMEOUT), f"{call.src} did not confirm")
        finally:
            self._readers[ref.job, token] -= 1
            if not self._readers[ref.job, token]:
                del self._readers[ref.job, token]
                if (retired := self._retired.pop((ref.job, token), None)) is not None:
                    await self._remove_files(token, retired)

    async def drop(self, job: str) -> bool:
        async with self._locks[job]:
            found = await self.current(job)
            if found is None:
                return False
            await self.store.delete(_state_key(job))  # first: from here on nobody reads it
            await self._retire(*found)
        self._locks.pop(job, None)
        return True

    async def _retire(self, token: str, header: ResumeHeader) -> None:
        """Remove a replaced state's files, or leave that to the last fetch still reading them."""
        if self._readers[header.job, token]:
            self._retired[header.job, token] = header
        else:
            await self._remove_files(token, header)

    async def _remove_files(self, token: str, header: ResumeHeader) -> None:
        for entry in header.files:
            await self.store.delete(_file_key(header.job, token, entry.name))
