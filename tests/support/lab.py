"""A network lab (Linux, root): islands in network namespaces, Atoll processes inside them, faults
injected with nftables and a fault-injecting TCP relay.

The shape of a lab::

    root namespace (the test process)        hub namespace ``atl<pid>-hub``
      portals: 127.0.0.1:P  ──────────────►  bridge br0 10.77.0.1/24, relays (WAN links)
                                               │ veth     │ veth      │ veth
                                  ``atl<pid>-a`` 10.77.0.11  ``-b`` .12  ``-c`` .13  (islands)

- Every island is a namespace with one veth (``eth0``) into the hub's bridge, an address
  ``10.77.0.<10+i>`` and loopback. The addresses exist only inside the lab's namespaces, so two
  labs (tests and a benchmark at once) never see each other's.
- Atoll runs inside an island as real processes: ``ip netns exec NS python -m atoll.cli broker
  --config ...`` and ``... agent run --config ...`` with config files the lab writes.
- Links between islands go through a ``Relay`` in the hub (an asyncio TCP relay in the test
  process, its sockets made inside the namespaces with setns(2) from a worker thread): per
  direction delay and bandwidth, stalls and cut connections, changeable at run time. The kernel
  may lack netem (this one does), so delay and rate are the relay's.
- Packet loss, partitions and one-way partitions are nftables rules on an island's ``eth0``
  (loopback inside the island is never touched): ``Island.loss``, ``Island.partition``,
  ``Island.heal``.
- The test process reaches a service inside an island through a ``portal``: a relay listening on
  127.0.0.1 in the root namespace whose outgoing sockets are made in the island.

Teardown kills every process still inside a namespace (``ip netns pids``) and deletes the
namespaces, also when the test failed; ``cleanup_stale`` removes what a killed run left behind
(namespaces named ``atl<pid>-...`` whose pid is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "atl"  # namespaces: atl<pid>-<name>
NETNS_DIR = Path("/var/run/netns")
SUBNET = "10.77.0"  # inside the lab's own namespaces only
HUB_IP = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
NFT_TABLE = "atoll_lab"
PYTHON = sys.executable

_libc = ctypes.CDLL(None, use_errno=True)


# --- host capabilities ---------------------------------------------------------------------------


def unavailable() -> str | None:
    """Why the lab cannot run here (None: it can): Linux, root, ip and nft."""
    if not sys.platform.startswith("linux"):
        return "the network lab needs Linux"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (apt-get install iproute2 nftables)"
    return None


def sh(*args: str, input: str | None = None, check: bool = True) -> str:
    """Run a command (bounded: 20 s); its stdout. CalledProcessError with stderr when it fails."""
    done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
    return done.stdout


def namespaces() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob("*")) if NETNS_DIR.exists() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(ns: str) -> None:
    """Kill every process inside ``ns``, then delete it (its veths go with it)."""
    pids = sh("ip", "netns", "pids", ns, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGCONT)  # a stopped process dies only once continued
            os.kill(int(pid), signal.SIGKILL)
    for _ in range(100):  # bounded: 5 s for the killed processes to leave the namespace
        if not sh("ip", "netns", "pids", ns, check=False).split():
            break
        time.sleep(0.05)
    sh("ip", "netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete namespaces of labs whose process is gone (a killed test run); their names."""
    gone = []
    for ns in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-.+", ns)
        if m and not _pid_alive(int(m.group(1))):
            delete_namespace(ns)
            gone.append(ns)
    return gone


# --- sockets inside a namespace ----------------------------------------------------------------


def _enter(ns: str) -> None:
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetNs:
    """A network namespace (None: the root one) that makes sockets: a worker thread entered it
    with setns(2), and a socket keeps the namespace it was made in."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._pool = (
            ThreadPoolExecutor(
                1, thread_name_prefix=f"ns-{name}", initializer=_enter, initargs=(name,)
            )
            if name
            else None
        )

    async def _make(self, fn: Callable[[], socket.socket]) -> socket.socket:
        if self._pool is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def listen(self, host: str, port: int = 0) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(512)
            sock.setblocking(False)
            return sock

        return await self._make(make)

    async def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        sock = await self._make(make)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# --- the fault-injecting relay ------------------------------------------------------------------


@dataclass
class Direction:
    """One direction of a relayed link, changeable while it runs: ``delay`` seconds added to
    each chunk, ``rate`` bytes/s (0: unlimited), ``stalled`` holds every byte until cleared."""

    delay: float = 0.0
    rate: float = 0.0
    stalled: bool = False
    bytes: int = 0  # relayed so far

    def set(self, **values: Any) -> None:
        for k, v in values.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)


MAX_BUFFERED = 4 * 1024 * 1024  # bytes a direction holds (delay, rate) before it stops reading


class Relay:
    """A TCP relay from ``listen_ns`` (host, port) to ``target`` in ``target_ns``, with faults:
    ``up`` (client → target) and ``down`` (target → client) ``Direction``s, ``cut()`` (abort every
    live connection: loss seen as a dropped connection), ``refuse`` (new connections are closed at
    once: a blackholed route). A WAN profile: ``Relay.wan(rtt=0.04, rate=...)``."""

    def __init__(
        self,
        listen_ns: NetNs,
        listen_host: str,
        target_ns: NetNs,
        target: tuple[str, int],
        listen_port: int = 0,
    ) -> None:
        self.listen_ns, self.target_ns = listen_ns, target_ns
        self.listen_addr = (listen_host, listen_port)
        self.target = target
        self.up, self.down = Direction(), Direction()
        self.refuse = False
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def profile(self, rtt: float = 0.0, rate: float = 0.0) -> Relay:
        """Half the round trip ``rtt`` each way, and ``rate`` bytes/s each way (0: unlimited)."""
        self.up.set(delay=rtt / 2, rate=rate)
        self.down.set(delay=rtt / 2, rate=rate)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self.listen_addr[0]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> Relay:
        sock = await self.listen_ns.listen(*self.listen_addr)
        self._server = await asyncio.start_server(self._accept, sock=sock)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task

    def cut(self) -> int:
        """Abort every live connection (both ends see a reset); how many there were."""
        n = 0
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
            n += 1
        self._writers.clear()
        self.cuts += n
        return n

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            if self.refuse:
                writer.transport.abort()
                return
            self.accepted += 1
            try:
                sock = await self.target_ns.connect(*self.target)
                t_reader, t_writer = await asyncio.open_connection(sock=sock)
            except (OSError, TimeoutError):
                writer.transport.abort()
                return
            self._writers |= {writer, t_writer}
            try:
                await asyncio.gather(
                    _pump(reader, t_writer, self.up), _pump(t_reader, writer, self.down)
                )
            finally:
                for w in (writer, t_writer):
                    self._writers.discard(w)
                    w.transport.abort()
        finally:
            self._conns.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: Direction) -> None:
    """Bytes from ``reader`` to ``writer`` through ``d``'s delay, rate and stalls."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    held = 0

    async def receive() -> None:
        nonlocal held
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time(), data))
                held += len(data)
                if held > MAX_BUFFERED:
                    room.clear()
                    await room.wait()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)

    rx = asyncio.create_task(receive())
    free_at = 0.0
    try:
        while (item := await queue.get()) is not None:
            arrived, data = item
            while d.stalled:  # noqa: ASYNC110 (a plain flag a test flips; polled)
                await asyncio.sleep(0.01)
            at = max(arrived + d.delay, free_at)
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            d.bytes += len(data)
            held -= len(data)
            if held <= MAX_BUFFERED:
                room.set()
            if d.rate:
                free_at = max(loop.time(), free_at) + len(data) / d.rate
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
    except (OSError, ConnectionError):
        pass
    finally:
        rx.cancel()
        with contextlib.suppress(BaseException):
            await rx
        writer.transport.abort()


# --- processes ----------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def toml_file(sections: dict[str, dict[str, Any]]) -> str:
    """``{"agent": {...}, "plugins.gateway": {...}}`` as TOML (nested dicts: inline tables)."""
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items()) + "\n"
        for name, body in sections.items()
    )


class Proc:
    """An Atoll process inside an island: its log, and signals (kill, stop, cont)."""

    def __init__(self, name: str, island: Island, args: list[str], log: Path) -> None:
        self.name, self.island, self.args, self.log = name, island, args, log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, ready: str, timeout: float = 60.0) -> Proc:
        """Start it and wait (bounded) until its log says ``ready``."""
        env = os.environ | {"PYTHONUNBUFFERED": "1", "ATOLL_LOG_LEVEL": "WARNING"}
        cmd = ["ip", "netns", "exec", self.island.ns, PYTHON, "-m", "atoll.cli", *self.args]
        with self.log.open("a") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        end = time.monotonic() + timeout
        while ready not in self.text():
            if self.proc.returncode is not None or time.monotonic() > end:
                await self.kill()
                raise RuntimeError(f"{self.name} did not start:\n{self.text()[-3000:]}")
            await asyncio.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean stop), SIGKILL after ``timeout``."""
        if not self.running:
            return
        assert self.proc is not None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()

    def usage(self) -> dict[str, float]:
        """Resident memory (MB) and open fds of the process now."""
        import psutil

        p = psutil.Process(self.pid)
        return {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds()}


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the test


# --- islands and the lab ------------------------------------------------------------------------

BROKER_PORT = 7400


@dataclass
class Island:
    lab: Lab
    name: str
    index: int
    ns: str
    ip: str
    netns: NetNs
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def broker_url(self) -> str:
        """This island's broker, as its own agents reach it."""
        return f"ws://{self.ip}:{BROKER_PORT}"

    # --- faults (nftables on eth0; loopback is never touched) ---

    def _rules(self, rules: list[str]) -> None:
        """Replace this island's fault rules with ``rules`` (chain: rule) in one transaction."""
        body = "\n".join(f"add rule inet {NFT_TABLE} {r}" for r in rules)
        script = (
            f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
            f"add table inet {NFT_TABLE}\n"
            f"add chain inet {NFT_TABLE} input {{ type filter hook input priority -10 ; }}\n"
            f"add chain inet {NFT_TABLE} output {{ type filter hook output priority -10 ; }}\n"
            f"{body}\n"
        )
        sh("ip", "netns", "exec", self.ns, "nft", "-f", "-", input=script)
        self.faults = rules

    faults: list[str] = field(default_factory=list)

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets arriving at this island (nftables numgen)."""
        per_mille = round(percent * 10)
        self._rules([f'input iifname "eth0" numgen random mod 1000 < {per_mille} drop'])

    def partition(self, inbound: bool = True, outbound: bool = True) -> None:
        """Cut this island off: every packet in and/or out on eth0 dropped (one of them: an
        asymmetric partition)."""
        rules = []
        if inbound:
            rules.append('input iifname "eth0" drop')
        if outbound:
            rules.append('output oifname "eth0" drop')
        self._rules(rules)

    def heal(self) -> None:
        self._rules([])

    # --- Atoll inside the island ---

    async def broker(self, peers: list[str] | None = None, name: str | None = None) -> Proc:
        """A standalone broker on ``ip:7400`` with its own issued identity, linked to ``peers``."""
        from atoll.broker.identity import issue_broker_dir

        name = name or f"broker-{self.name}"
        data = self.lab.root / name
        issue_broker_dir(self.lab.operator, data, name)
        config = data / "broker.toml"
        section = {
            "data_dir": data,
            "listen": f"{self.ip}:{BROKER_PORT}",
            "peers": list(peers or []),
            "advertise": False,
        }
        config.write_text(toml_file({"broker": section}))
        proc = Proc(name, self, ["broker", "--config", str(config)], data / "log")
        self.procs[name] = proc
        return await proc.start("listening on")

    async def agent(
        self,
        name: str,
        roles: list[str],
        plugins: dict[str, dict[str, Any]],
        brokers: list[str] | None = None,
        heartbeat: float = 1.0,
        metrics_interval: float = 1.0,
        **agent_options: Any,
    ) -> Proc:
        """An agent ``name`` (enrolled with ``roles``) running ``plugins``, its brokers this
        island's first (then ``brokers``)."""
        from atoll.agent.identity import AgentKeys

        data = self.lab.root / name
        AgentKeys.issue(self.lab.operator, self.lab.tenant, name, roles, region=self.name).save(
            data
        )
        sections: dict[str, dict[str, Any]] = {
            "agent": {
                "name": name,
                "data_dir": data,
                "brokers": brokers or [self.broker_url],
                "heartbeat": heartbeat,
                "metrics_interval": metrics_interval,
                **agent_options,
            }
        }
        sections |= {f"plugins.{p}": body for p, body in plugins.items()}
        config = data / "agent.toml"
        config.write_text(toml_file(sections))
        proc = Proc(name, self, ["agent", "run", "--config", str(config)], data / "log")
        self.procs[name] = proc
        return await proc.start("connected to")


class Lab:
    """Islands in namespaces around a hub; see the module's docstring. ``async with Lab(...)``."""

    def __init__(self, root: Path, tenant: str = "acme") -> None:
        from atoll.tenancy.operator import OperatorStore

        self.root = root
        self.tenant = tenant
        self.id = f"{PREFIX}{os.getpid()}"
        self.hub_ns = f"{self.id}-hub"
        self.islands: dict[str, Island] = {}
        self.relays: list[Relay] = []
        self.operator = OperatorStore(root / "operator")
        self.operator.init()
        self.operator.create_tenant(tenant)
        self.hub: NetNs | None = None
        self.host = NetNs(None)

    async def __aenter__(self) -> Lab:
        if (why := unavailable()) is not None:
            raise RuntimeError(why)
        try:
            self._setup_hub()
        except BaseException:
            self.teardown_namespaces()
            raise
        self.hub = NetNs(self.hub_ns)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _setup_hub(self) -> None:
        if self.hub_ns in namespaces():  # a lab of this process left it (a failed teardown)
            delete_namespace(self.hub_ns)
        sh("ip", "netns", "add", self.hub_ns)
        ip = ("ip", "-n", self.hub_ns)
        sh(*ip, "link", "set", "lo", "up")
        sh(*ip, "link", "add", "br0", "type", "bridge")
        sh(*ip, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        sh(*ip, "link", "set", "br0", "up")

    def island(self, name: str) -> Island:
        """A new island: a namespace with eth0 on the hub's bridge at 10.77.0.<10+i>."""
        index = len(self.islands) + 1
        ns = f"{self.id}-{name}"
        addr = f"{SUBNET}.{10 + index}"
        port = f"p{index}"
        if ns in namespaces():
            delete_namespace(ns)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        sh("ip", "-n", self.hub_ns, "link", "set", port, "master", "br0")
        sh("ip", "-n", self.hub_ns, "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        isl = Island(self, name, index, ns, addr, NetNs(ns))
        self.islands[name] = isl
        return isl

    async def wan(self, to: Island, port: int = BROKER_PORT) -> Relay:
        """A WAN link into ``to``: a relay in the hub (10.77.0.1:<free>) to ``to``'s port; set
        its profile with ``relay.profile(rtt=..., rate=...)``."""
        assert self.hub is not None
        relay = await Relay(self.hub, HUB_IP, to.netns, (to.ip, port)).start()
        self.relays.append(relay)
        return relay

    async def portal(self, to: Island, port: int, host: str | None = None) -> Relay:
        """``to``'s ``host:port`` (its own address by default) from this process: a relay on
        127.0.0.1 in the root namespace."""
        relay = await Relay(self.host, "127.0.0.1", to.netns, (host or to.ip, port)).start()
        self.relays.append(relay)
        return relay

    def procs(self) -> list[Proc]:
        return [p for isl in self.islands.values() for p in isl.procs.values()]

    async def close(self) -> None:
        try:
            await asyncio.gather(*(p.stop(5) for p in self.procs()), return_exceptions=True)
            for relay in self.relays:
                with contextlib.suppress(Exception):
                    await relay.stop()
        finally:
            self.teardown_namespaces()

    def teardown_namespaces(self) -> None:
        for isl in self.islands.values():
            isl.netns.close()
        if self.hub is not None:
            self.hub.close()
        for ns in namespaces():
            if ns.startswith(f"{self.id}-"):
                delete_namespace(ns)


async def until(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, step: float = 0.1
) -> float:
    """Poll ``check`` (sync or async) until true, bounded by ``timeout``; the seconds it took."""
    start = time.monotonic()
    while True:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
