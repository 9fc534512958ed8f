"""The agent's link to the overlay: one broker at a time out of a list, with failover,
jittered exponential backoff, keepalive and batched sends."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Awaitable, Callable

from websockets.exceptions import InvalidHandshake, InvalidURI

from atoll.agent.errors import ConnectionLost
from atoll.agent.identity import AgentKeys
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE, Frame, decode_message
from atoll.protocol.handshake import ClientHandshake, Welcome
from atoll.transport import CLOSE_POLICY, WebSocket, connect

# A broker refusing us for these reasons will refuse again: stop instead of hammering it.
PERMANENT = frozenset({"revoked", "expired", "token-used", "auth", "version"})


class BrokerLink:
    def __init__(
        self,
        urls: list[str],
        keys: AgentKeys,
        on_frames: Callable[[list[Frame]], None],
        on_up: Callable[[], Awaitable[None]],
        on_down: Callable[[ConnectionLost], None],
        log: EventLogger,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        ping_interval: float = 5.0,  # a silent broker is left after 2x this
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        open_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not urls:
            raise ValueError("an agent needs at least one broker URL")
        self.urls = list(urls)
        self.keys = keys
        self.on_frames = on_frames
        self.on_up = on_up
        self.on_down = on_down
        self.log = log
        self.max_message = max_message
        self.ping_interval = ping_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.ssl_context = ssl_context
        self.connected = asyncio.Event()
        self.url: str | None = None
        self.welcome: Welcome | None = None
        self.fatal: AuthError | None = None  # set when a broker refuses us for good
        self.refused = asyncio.Event()  # ... and this fires then
        self.last_error: str = ""
        self._ws: WebSocket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="atoll-broker-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def send(self, data: bytes, urgent: bool = False) -> None:
        ws = self._ws
        if ws is None or not ws.open:
            raise ConnectionLost(f"not connected to a broker ({self.last_error or 'connecting'})")
        ws.send(data, urgent)

    def full(self) -> bool:
        """The send queue is above its high-water mark: publishers should ``await room()``."""
        ws = self._ws
        return ws is not None and ws.queued > ws.high_water

    async def room(self) -> None:
        if self._ws is not None:
            await self._ws.room()

    async def wait_connected(self, timeout: float) -> None:
        """Wait for a session; fail at once if a broker refused this agent for good."""
        if self.connected.is_set():
            return
        waiter = asyncio.create_task(self.connected.wait())
        pending = {waiter} | ({self._task} if self._task is not None else set())
        await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self.connected.is_set():
            return
        if self.fatal is not None:
            raise ConnectionLost(f"broker refused this agent: {self.fatal.reason}")
        raise ConnectionLost(
            f"no broker reachable within {timeout}s ({self.last_error or 'no answer'})"
        )

    async def _handshake(self, ws: WebSocket) -> Welcome:
        hs = ClientHandshake(self.keys.key, self.keys.credential, self.keys.operator_pub)

        async def one() -> Frame:
            frames = decode_message(await ws.recv(self.open_timeout), self.max_message)
            if len(frames) != 1:
                raise ProtocolError("handshake frames must come alone")
            return frames[0]

        ws.send(hs.receive_hello(await one()))
        return hs.receive_welcome(await one())

    async def _run(self) -> None:
        failures = 0
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            index += 1
            ws: WebSocket | None = None
            try:
                ws = await connect(
                    url,
                    max_message=self.max_message,
                    ping_interval=self.ping_interval,
                    open_timeout=self.open_timeout,
                    ssl_context=self.ssl_context,
                )
                self.welcome = await self._handshake(ws)
                await self._session(ws, url)
                failures = 0  # and on to the next broker: this one just failed us
            except AuthError as exc:
                self.last_error = f"{url}: {exc.reason}"
                self.log.error("agent.auth_refused", url=url, code=exc.code, reason=exc.reason)
                if exc.code in PERMANENT:
                    self.fatal = exc
                    self.refused.set()
                    self.on_down(ConnectionLost(exc.reason))
                    return
            except (
                OSError,
                ConnectionError,
                InvalidHandshake,
                ProtocolError,
                TimeoutError,
                InvalidURI,
            ) as exc:
                reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
                self.last_error = f"{url}: {reason}"
                self.log.info("agent.connect_failed", url=url, reason=reason)
            finally:
                if ws is not None:
                    ws.abort()
            failures += 1
            cap = min(self.backoff_max, self.backoff_base * 2 ** min(failures, 16))
            await asyncio.sleep(random.uniform(cap / 2, cap))

    def _on_message(self, ws: WebSocket, data: bytes | str) -> None:
        try:
            self.on_frames(decode_message(data, self.max_message, keep_raw=False))
        except ProtocolError as exc:
            self.log.warning("agent.bad_frame", reason=exc.reason)
            ws.close(CLOSE_POLICY, f"bad frame: {exc.reason}")
        except Exception as exc:  # a bug here must cost a reconnect, never the link itself
            self.log.error("agent.dispatch_failed", error=exc, exc_info=True)
            ws.close(1011, "agent failed handling a frame")

    async def _session(self, ws: WebSocket, url: str) -> None:
        assert self.welcome is not None
        ws.max_message = min(self.max_message, self.welcome.max_message)
        self._ws, self.url = ws, url
        ws.on_shut = self.connected.clear  # at once: a caller must not see a dead link as up
        if ws.open:
            self.connected.set()
        ws.deliver_to(lambda data: self._on_message(ws, data))
        self.log.info("agent.connected", url=url, broker=self.welcome.broker.name)
        try:
            await self.on_up()
            await ws.wait_closed()
        finally:
            reason = ws.close_reason or "connection closed"
            self.connected.clear()
            self._ws = None
            self.last_error = f"{url}: {reason}"
            self.log.info("agent.disconnected", url=url, reason=reason)
            self.on_down(ConnectionLost(f"connection to broker {url} lost: {reason}"))
