"""The storage plugin's resume states (see ``contract/resume.py`` for the wire): a job's files
under ``resume/<job>/<token>/<name>`` (a fresh token each time), and ``resume/<job>/state.json``
naming the token and the header, written after the files and read first. Replacing a state writes
the new files, then ``state.json``, then removes the old files: a reader sees the old state or the
new one, never a mix."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
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
            old = await self.current(header.job)
            token = secrets.token_hex(8)
            stage = Path(tempfile.mkdtemp(dir=self.incoming))
            try:
                for entry in header.files:
                    await receive_file(reader, stage / entry.name, entry.size, entry.sha256)
                for entry in header.files:
                    key = _file_key(header.job, token, entry.name)
                    await self.store.put_file(key, stage / entry.name)
                state = {"token": token, "header": header.model_dump(mode="json")}
                await self.store.put(_state_key(header.job), json.dumps(state).encode())
            finally:
                await asyncio.to_thread(shutil.rmtree, stage, True)
            if old is not None:
                await self._remove_files(*old)
            self.ctx.log.info(
                "storage.resume_state_kept", job=header.job, step=header.step, by=call.caller.name
            )
            await write_line(stream, {"ok": True}, IDLE_TIMEOUT)

    async def get(self, stream: Stream, params: object, call: CallInfo) -> None:
        ref = parse(ResumeRef, params, "resume_get request")
        found = await self.current(ref.job)
        if found is None:
            raise ResumeStateNotFound(f"job {ref.job} has no resume state")
        token, header = found
        with idle_deadline(f"resume state fetch by {call.src}", IDLE_TIMEOUT):
            await write_line(stream, header.model_dump(mode="json"), IDLE_TIMEOUT)
            for entry in header.files:
                chunks = self.store.read(_file_key(header.job, token, entry.name))
                await send_bytes(stream, chunks, entry.size, IDLE_TIMEOUT)
            await confirmed(Reader(stream, IDLE_TIMEOUT), f"{call.src} did not confirm")

    async def drop(self, job: str) -> bool:
        found = await self.current(job)
        if found is None:
            return False
        await self.store.delete(_state_key(job))  # first: from here on nobody reads it
        await self._remove_files(*found)
        return True

    async def _remove_files(self, token: str, header: ResumeHeader) -> None:
        for entry in header.files:
            await self.store.delete(_file_key(header.job, token, entry.name))
