"""What other gateways committed to a shared PostgreSQL database, heard on the gateway's event
loop: a connection of its own ``LISTEN``s on ``CHANGES``, which every write transaction that
may change what a gateway caches notifies as it commits (postgres.py). Each notification moves
``version`` on: the database's data_version, by which authenticate's cache goes stale (keys.py).

``await heard_all()`` is the barrier that makes the cache exact: one round trip on this
connection, begun after the call (the server sends a session everything it was notified before
it answers a query), so every commit made before the request arrived has been read when it
returns. Callers arriving while one is under way share the next (fresh_reads.py): under load,
one round trip for many requests, on the loop, with no thread hop. While the connection is down
it answers False, ``version`` is None, and nothing is cached; the connection is made again, and
what came read, every ``KEEP_S`` (an idle gateway's notifications, left unread, would pile up
in the server's queue, which, full, refuses every NOTIFY and so every commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from atoll.plugins.gateway.fresh_reads import FreshReads

log = logging.getLogger(__name__)

CHANGES = "atoll_store_changed"  # the channel
KEEP_S = 1.0  # how often the connection is checked (and made again when down)
ROUND_TRIP_TIMEOUT_S = 5.0  # a barrier that takes longer counts as the connection down


class ChangeListener:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._heard = 0  # notifications read, and connections made (each may have missed some)
        self._barriers: FreshReads[None, bool] = FreshReads(self._round_trip)
        self._keeping: asyncio.Task[None] | None = None

    @property
    def version(self) -> int | None:
        """The data_version; None while the connection is down."""
        return self._heard if self._conn is not None else None

    async def start(self) -> None:
        await self._connect()
        self._keeping = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
        await self._drop()

    async def heard_all(self) -> bool:
        """Whether every commit made before this call is in ``version`` now (False: down)."""
        return await self._barriers(None)

    def _notified(self, _notify: psycopg.Notify) -> None:
        self._heard += 1

    async def _connect(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
            conn.add_notify_handler(self._notified)
            await conn.execute(f"LISTEN {CHANGES}")
        except psycopg.OperationalError as exc:
            log.warning("gateway.database_listen_failed: %s", str(exc).strip().splitlines()[0])
            return
        self._heard += 1  # what was cached before may have changed unheard
        self._conn = conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _round_trip(self, _: None) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            async with asyncio.timeout(ROUND_TRIP_TIMEOUT_S):
                await conn.execute("SELECT 1")  # the notifications before it come first
        except (psycopg.OperationalError, TimeoutError) as exc:
            log.warning("gateway.database_listen_lost: %s", str(exc).strip().splitlines()[0])
            await self._drop()
            return False
        return True

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(KEEP_S)
            if self._conn is None:
                await self._connect()
            else:
                await self.heard_all()
