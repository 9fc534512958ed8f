"""The send side of a websocket connection, shared by brokers and agents."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path

from websockets.exceptions import ConnectionClosed


class OutQueue:
    """A bounded send queue drained by one writer task into batched websocket messages.

    Frames queued while a send is in flight go out together in the next message (as NATS
    flushes its write buffer); that is what makes small-message throughput high. ``put`` never
    waits: past ``limit`` queued bytes ``on_overflow`` fires (a broker cuts a slow consumer off).
    Producers that can wait (an agent publishing) await ``room()`` to stay under ``high_water``.
    """

    def __init__(
        self,
        ws,
        max_message: int,
        limit: int,
        on_overflow: Callable[[], None],
        high_water: int = 4 * 1024 * 1024,
    ) -> None:
        self.ws = ws
        self.max_message = max_message
        self.limit = limit
        self.high_water = high_water
        self.on_overflow = on_overflow
        self.queued = 0
        self.closed = False
        self._frames: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()

    def put(self, data: bytes) -> None:
        if self.closed:
            return
        self._frames.append(data)
        self.queued += len(data)
        self._idle.clear()
        self._wake.set()
        if self.queued > self.high_water:
            self._room.clear()
        if self.queued > self.limit:
            self.close()
            self.on_overflow()

    def close(self) -> None:
        self.closed = True
        self._frames.clear()
        self.queued = 0
        self._wake.set()
        self._room.set()
        self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def room(self) -> None:
        if not self._room.is_set():
            await self._room.wait()

    async def run(self) -> None:
        frames = self._frames
        try:
            while not self.closed:
                if not frames:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = [frames.popleft()]
                size = len(batch[0])
                while frames and size + len(frames[0]) <= self.max_message:
                    data = frames.popleft()
                    batch.append(data)
                    size += len(data)
                self.queued -= size
                if self.queued <= self.high_water:
                    self._room.set()
                await self.ws.send(b"".join(batch) if len(batch) > 1 else batch[0])
        except ConnectionClosed:
            pass
        finally:
            self.close()


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for a broker's wss:// listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls(ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS for wss:// broker URLs: system trust store, or a private CA bundle."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
