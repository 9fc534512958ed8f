"""Mesh benchmark: RPC latency across 1, 2 and 3 brokers, and failover after a broker dies.

Every broker runs in its own child process (this script with ``--broker-child``), with its own
issued data dir and identity; the agents live in this process. Prints ONE JSON object on stdout
(logs go to stderr).

* RPC: a line of brokers A—B—C; the caller sits on A, one callee on each of A, B and C, so a call
  crosses 1, 2 or 3 brokers. Sequential calls after a warm-up, in rounds that rotate the three
  paths (slow drift of a shared machine hits all three alike).
* RPC in one process: the same line and calls with the brokers in the harness's own event loop
  (``inproc_*`` figures): the hops' CPU path (Python, framing, loopback syscalls) without the
  process wake-ups and waits for a core that dominate the process-per-broker figures when four
  processes share two vCPUs. The target is judged on the process-per-broker figures.
* Failover: a triangle X, Y, Z; agent M on X (broker list [X, Y]), agent C on Z calling M in a
  loop with short timeouts. X is SIGKILLed (``kill`` trials: the kernel closes its sockets, so
  peers see it at once) or SIGSTOPped (``stall`` trials: a hung host, noticed only by
  keepalives); the time until C's call succeeds again is the failover time. Each trial builds a
  fresh triangle.

* Mesh state (``state_*`` figures, brokers in this process): a triangle A, B, C with N agents
  already behind A (N = 1,000 and 10,000; sessions handed to A's router without sockets, as
  many as a real broker holds): the bytes all mesh links carry for one more agent's join, and
  the time until B and C can route to it (convergence). Anchors from the same run: the joining
  agent's credential (what one copy must carry at least) and a loopback websocket round trip.
  A join must cost the same at 10,000 agents as at 1,000.
* Ring: 30 brokers in a ring (this process); agents on the two neighbours of r00 call each
  other (two hops, through r00); r00 stops, and the time until the call gets through the long
  way round (28 hops) is the reroute time. Anchor: the call's own latency before.

* Idle links (``--idle S``, on its own: the run is S seconds of waiting): a triangle of brokers
  in this process with the default keepalive and refresh settings, left idle; how many times a
  link was made again (target 0 over 30 minutes: ``--idle 1800``) and how many one-second
  samples found one down.

``--profile-dir D`` writes cProfile stats of the RPC phase's brokers (``broker_a.prof`` ...) and
of the agents' side (``agents.prof``) into D (look at them with ``python -m pstats``).

    .venv/bin/python bench/mesh.py [--quick] [--failover-trials N] [--stall-trials N]
                                   [--profile-dir D] [--state-only] [--idle S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import itertools
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.bench.harness import (
    ECHO,
    RPC_PARAMS,
    CpuClock,
    LineChild,
    base_environment,
    broker_child,
    broker_url,
    pct,
    run_main,
    serve_echo,
    setup_logging,
    spawn_child,
    stop_process,
)
from atoll.tuning import tune_process

if TYPE_CHECKING:
    from atoll.agent.node import Agent
    from atoll.broker.server import BrokerServer
    from atoll.protocol.trust import AgentIdentity
    from atoll.tenancy.operator import OperatorStore

log = logging.getLogger("bench.mesh")

HERE = Path(__file__).resolve()
PHASE_SLACK_S = 30.0  # set-up and tear-down on top of a phase's own time limit


@dataclass(frozen=True)
class Plan:
    rpc_warmup: int = 500  # per path
    rpc_rounds: int = 5
    rpc_calls_per_round: int = 1_000  # per path and round
    rpc_time_s: float = 30.0  # all measured RPC rounds together
    failover_trials: int = 5
    stall_trials: int = 2
    failover_limit_s: float = 15.0  # per trial: give up when C has not got through by then
    steady_s: float = 0.2  # C calls M this long before X goes down
    state_agents: tuple[int, ...] = (1_000, 10_000)  # behind one broker of a triangle
    state_joins: int = 20  # measured joins at each size
    state_limit_s: float = 60.0  # a join (or the set-up) not converged by then: failed
    ring_size: int = 30


QUICK = Plan(
    rpc_warmup=100,
    rpc_rounds=2,
    rpc_calls_per_round=300,
    failover_trials=2,
    stall_trials=0,
    state_joins=10,
)


@dataclass(frozen=True)
class MeshSettings:
    """Timers of the brokers (``BrokerServer``) and of the agents' links (``BrokerLink``)."""

    broker_mesh_refresh_s: float = 0.5
    broker_ping_interval_s: float = 1.0
    agent_ping_interval_s: float = 1.0
    agent_backoff_base_s: float = 0.02
    agent_backoff_max_s: float = 0.25
    agent_open_timeout_s: float = 5.0  # BrokerLink's default
    probe_timeout_s: float = 0.2  # C's RPC timeout while polling M

    def link_options(self) -> dict[str, Any]:  # Agent's **link_options
        return {
            "ping_interval": self.agent_ping_interval_s,
            "backoff_base": self.agent_backoff_base_s,
            "backoff_max": self.agent_backoff_max_s,
            "open_timeout": self.agent_open_timeout_s,
        }


RPC_SETTINGS = MeshSettings()  # the RPC paths run with the same timers (their traffic is tiny)


# --- processes ---------------------------------------------------------------------------------


class BrokerProc(LineChild):
    """A broker child: its URL, and its routing table on request (``hops``)."""

    def __init__(self, name: str, proc: Process, url: str) -> None:
        super().__init__(f"broker {name}", proc, url)
        self.url = url

    async def hops(self) -> dict[str, str]:
        """The broker's next hops (reachable broker -> peer to send through)."""
        hops: dict[str, str] = await self.ask(b"hops")
        return hops


async def spawn_broker(
    data_dir: Path, name: str, peers: list[str], s: MeshSettings, profile: Path | None = None
) -> BrokerProc:
    args = ["--broker-child", str(data_dir), "--peers", ",".join(peers)]
    args += ["--mesh-refresh", str(s.broker_mesh_refresh_s)]
    args += ["--ping-interval", str(s.broker_ping_interval_s)]
    # SIGKILL, not SIGTERM as in overlay.py: a SIGSTOPped broker (stall trials) would never act
    # on a SIGTERM
    proc, ready = await spawn_child(
        HERE, f"broker {name}", *args, profile=profile, timeout=20, death_signal=signal.SIGKILL
    )
    try:
        url = broker_url(ready, f"broker child {name}")
    except RuntimeError:
        await stop_process(proc, f"broker {name}")
        raise
    return BrokerProc(name, proc, url)


@dataclass
class InprocBroker:
    """A broker in this process's event loop (the contention-free RPC figures)."""

    name: str
    server: BrokerServer
    pid: None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def hops(self) -> dict[str, str]:
        return self.server.mesh.state.next_hops()


Broker = BrokerProc | InprocBroker


@contextlib.asynccontextmanager
async def cluster(
    op: OperatorStore,
    root: Path,
    wiring: list[tuple[str, list[str]]],
    s: MeshSettings,
    profile_dir: Path | None = None,
    inproc: bool = False,
) -> AsyncIterator[dict[str, Broker]]:
    """Brokers started in order, each dialling the named earlier ones; all stopped on exit.
    Child processes, or with ``inproc`` servers in this event loop."""
    from atoll.broker.identity import issue_broker_dir
    from atoll.broker.server import BrokerServer

    brokers: dict[str, Broker] = {}
    try:
        for name, peers in wiring:
            d = issue_broker_dir(op, root / name, name)  # own key, own credential, own state
            prof = profile_dir / f"broker_{name}.prof" if profile_dir else None
            urls = [brokers[p].url for p in peers]
            if inproc:
                server = BrokerServer.from_data_dir(
                    d,
                    peers=urls,
                    mesh_refresh=s.broker_mesh_refresh_s,
                    ping_interval=s.broker_ping_interval_s,
                )
                brokers[name] = InprocBroker(name, await server.start("127.0.0.1", 0))
            else:
                brokers[name] = await spawn_broker(d, name, urls, s, prof)
        yield brokers
    finally:
        await asyncio.gather(
            *(
                b.server.stop() if isinstance(b, InprocBroker) else stop_process(b.proc, b.name)
                for b in brokers.values()
            ),
            return_exceptions=True,
        )


async def converged(brokers: dict[str, Broker], timeout: float = 10.0) -> dict[str, Any]:
    """Wait until every broker reaches every other; return their next-hop tables."""
    names = set(brokers)
    deadline = time.monotonic() + timeout
    while True:
        views = {n: await b.hops() for n, b in brokers.items()}
        if all(set(v) == names - {n} for n, v in views.items()):
            return views
        if time.monotonic() > deadline:
            raise RuntimeError(f"mesh did not converge within {timeout}s: {views}")
        await asyncio.sleep(0.05)


# --- agents ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def agent_pool(op: OperatorStore, s: MeshSettings) -> AsyncIterator[Callable[..., Any]]:
    """``start(name, urls)`` starts an echoing agent; all are stopped on exit."""
    from atoll.agent.identity import AgentKeys
    from atoll.agent.node import Agent
    from atoll.tenancy.operator import DEFAULT_TENANT

    agents: list[Agent] = []

    async def start(name: str, urls: list[str]) -> Agent:
        keys = AgentKeys.issue(op, DEFAULT_TENANT, name, ["agent"])
        a = Agent(keys, urls, call_timeout=10.0, **s.link_options())
        serve_echo(a)
        agents.append(a)  # before start: stopped on error too
        return await a.start(wait=10.0)

    try:
        yield start
    finally:
        for a in reversed(agents):
            with contextlib.suppress(Exception):
                await a.stop()


async def reachable(caller: Agent, dst: str, timeout: float = 10.0) -> None:
    """Call until the callee answers (its broker's advert has to reach the caller's first)."""
    from atoll.agent.errors import AtollError

    deadline = time.monotonic() + timeout
    while True:
        try:
            await caller.call(dst, ECHO, RPC_PARAMS, timeout=1.0)
            return
        except AtollError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dst} unreachable after {timeout}s: {exc}") from exc
            await asyncio.sleep(0.02)


# --- RPC across 1, 2, 3 brokers ----------------------------------------------------------------


def summarize(samples: list[int]) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "calls": len(samples),
        "p50_us": pct(samples, 50),
        "p90_us": pct(samples, 90),
        "p99_us": pct(samples, 99),
        "mean_us": round(sum(samples) / len(samples) / 1000, 1),
    }


async def bench_rpc(
    op: OperatorStore, root: Path, plan: Plan, profile_dir: Path | None, inproc: bool = False
) -> dict[str, Any]:
    s = RPC_SETTINGS
    wiring = [("a", []), ("b", ["a"]), ("c", ["b"])]  # a line: a—b—c
    async with (
        cluster(op, root, wiring, s, None if inproc else profile_dir, inproc) as brokers,
        agent_pool(op, s) as start,
    ):
        views = await converged(brokers)
        if views["a"].get("c") != "b":
            raise RuntimeError(f"a does not route to c through b: {views['a']}")
        caller = await start("caller", [brokers["a"].url])
        on = {1: "a", 2: "b", 3: "c"}  # brokers on the path: the callee's broker
        dst = {}
        for n, bname in on.items():
            await start(f"callee-{n}", [brokers[bname].url])
            dst[n] = f"callee-{n}/bench"
            await reachable(caller, dst[n])
        for n in on:
            for _ in range(plan.rpc_warmup):
                await caller.call(dst[n], ECHO, RPC_PARAMS)

        samples: dict[int, list[int]] = {n: [] for n in on}
        cpu_s: dict[int, Counter[str]] = {n: Counter() for n in on}
        pids = {n: b.pid for n, b in brokers.items() if b.pid is not None}
        clock, cpu = time.perf_counter_ns, CpuClock(pids)
        deadline = time.perf_counter() + plan.rpc_time_s
        prof = cProfile.Profile() if profile_dir and not inproc else None
        if prof:
            prof.enable()
        for r in range(plan.rpc_rounds):
            order = [1, 2, 3][r % 3 :] + [1, 2, 3][: r % 3]  # rotate: no path always first
            for n in order:
                call, out = caller.call, samples[n]
                before = cpu.read()
                for _ in range(plan.rpc_calls_per_round):
                    t0 = clock()
                    await call(dst[n], ECHO, RPC_PARAMS)
                    out.append(clock() - t0)
                after = cpu.read()
                cpu_s[n].update({k: after[k] - before[k] for k in after})
            if time.perf_counter() > deadline:
                log.warning("RPC time limit reached after %d rounds", r + 1)
                break
        if prof and profile_dir:
            prof.disable()
            prof.dump_stats(str(profile_dir / "agents.prof"))
    paths = {}
    for n in on:
        calls = len(samples[n])
        paths[n] = summarize(samples[n]) | {
            "cpu_us_per_call": {k: round(v / calls * 1e6, 1) for k, v in sorted(cpu_s[n].items())}
        }
    return {"paths": paths, "next_hops": views, "topology": "line a-b-c; caller on a"}


# --- failover ----------------------------------------------------------------------------------


class Prober:
    """C calls M back to back (``probe_timeout`` each) and notes what happens after ``down``."""

    def __init__(self, caller: Agent, dst: str, probe_timeout: float) -> None:
        self.caller = caller
        self.dst = dst
        self.probe_timeout = probe_timeout
        self.down_at: float | None = None  # X taken down (signal sent)
        self.count_from: float | None = None  # X certainly down: calls started later count
        self.recovered_at: float | None = None
        self.steady_ok = 0
        self.steady_failed = 0
        self.errors: Counter[str] = Counter()  # after down, by kind
        self.first_error_at: dict[str, float] = {}

    async def run(self, limit: float) -> None:
        from atoll.agent.errors import AtollError

        hard_stop = time.perf_counter() + limit
        while time.perf_counter() < hard_stop:
            if self.down_at is not None:
                hard_stop = min(hard_stop, self.down_at + limit)
            t0 = time.perf_counter()
            try:
                await self.caller.call(self.dst, ECHO, RPC_PARAMS, timeout=self.probe_timeout)
            except AtollError as exc:
                kind = type(exc).__name__
                if self.down_at is None:
                    self.steady_failed += 1
                else:
                    self.errors[kind] += 1
                    self.first_error_at.setdefault(kind, time.perf_counter() - self.down_at)
                await asyncio.sleep(0.005)  # a NORESP comes back at once: do not spin
                continue
            if self.count_from is not None and t0 >= self.count_from:
                self.recovered_at = time.perf_counter()
                return
            if self.down_at is None:
                self.steady_ok += 1


def watch_link(agent: Agent, events: list[tuple[str, float, str]]) -> None:
    """Note when the agent's broker link goes down and up (wraps the link's callbacks)."""
    link = agent.link
    on_up, on_down = link.on_up, link.on_down

    async def up() -> None:
        events.append(("up", time.perf_counter(), link.url or ""))
        await on_up()

    def down(exc: Any) -> None:
        events.append(("down", time.perf_counter(), link.url or ""))
        on_down(exc)

    link.on_up, link.on_down = up, down


async def wait_stopped(pid: int, timeout: float = 2.0) -> None:
    import psutil

    p, deadline = psutil.Process(pid), time.monotonic() + timeout
    while p.status() != psutil.STATUS_STOPPED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"broker {pid} not stopped after SIGSTOP")
        await asyncio.sleep(0.001)


async def failover_trial(
    op: OperatorStore, root: Path, mode: str, plan: Plan, s: MeshSettings
) -> dict[str, Any]:
    t_setup = time.perf_counter()
    wiring = [("x", []), ("y", ["x"]), ("z", ["x", "y"])]  # a triangle
    async with cluster(op, root, wiring, s) as brokers, agent_pool(op, s) as start:
        x = brokers["x"]
        if not isinstance(x, BrokerProc):  # cluster() without inproc: children all
            raise RuntimeError("a failover trial stops a broker process")
        await converged(brokers)
        names = {b.url: n for n, b in brokers.items()}
        m = await start("m", [x.url, brokers["y"].url])
        c = await start("c", [brokers["z"].url])
        await reachable(c, "m/bench")
        if m.link.url != x.url:
            raise RuntimeError(f"m is on {m.link.url}, not on x")
        events: list[tuple[str, float, str]] = []
        watch_link(m, events)
        prober = Prober(c, "m/bench", s.probe_timeout_s)
        task = asyncio.create_task(prober.run(plan.steady_s + plan.failover_limit_s + 5))
        try:
            setup_s = time.perf_counter() - t_setup
            await asyncio.sleep(plan.steady_s)
            prober.down_at = time.perf_counter()
            if mode == "kill":
                os.kill(x.pid, signal.SIGKILL)
                await asyncio.wait_for(x.proc.wait(), 5)  # reaped: nothing goes through x now
            else:
                os.kill(x.pid, signal.SIGSTOP)
                await wait_stopped(x.pid)
            prober.count_from = time.perf_counter()
            await task
        finally:
            task.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(x.pid, signal.SIGKILL)  # a stalled x goes for good (SIGKILL works on T)
    t0 = prober.down_at

    def rel(t: float | None) -> float | None:
        return round(t - t0, 4) if t is not None else None

    downs = [t for kind, t, _ in events if kind == "down"]
    ups = [(t, url) for kind, t, url in events if kind == "up"]
    return {
        "failover_s": rel(prober.recovered_at),
        "m_link_down_s": rel(downs[0] if downs else None),
        "m_link_up_s": rel(ups[0][0] if ups else None),
        "m_reconnected_to": names.get(ups[0][1]) if ups else None,
        "c_errors": dict(prober.errors),
        "c_first_error_s": {k: round(v, 4) for k, v in prober.first_error_at.items()},
        "steady_calls_ok": prober.steady_ok,
        "steady_calls_failed": prober.steady_failed,
        "setup_s": round(setup_s, 3),
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median, a trial that never recovered counting as infinitely slow."""
    if not values:
        return None
    med = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(med) else round(med, 4)


async def bench_failover(
    op: OperatorStore, root: Path, mode: str, trials: int, plan: Plan
) -> list[dict[str, Any]]:
    out = []
    for i in range(trials):
        async with asyncio.timeout(plan.failover_limit_s + PHASE_SLACK_S):
            r = await failover_trial(op, root / f"{mode}-{i}", mode, plan, RPC_SETTINGS)
        log.info("%s trial %d: %s", mode, i, r)
        out.append(r)
    return out


# --- mesh state: bytes per join, convergence, rerouting in a ring ------------------------------


TENANT = "default"  # the operator's default tenant: the agents of these figures live there


class QuietSession:
    """A connected agent as the router sees it, without a socket: the router's ``Session``."""

    _ids = itertools.count(1)

    def __init__(self, ident: AgentIdentity) -> None:
        self.id = next(self._ids)
        self.ident = ident
        self.subs: dict[int, str] = {}

    def send(self, data: bytes) -> None:
        pass

    def close(self, code: str, reason: str) -> None:
        pass


def identities(op: OperatorStore, names: list[str]) -> list[AgentIdentity]:
    """Verified credentials of the test operator (what a broker holds of its agents)."""
    from nacl.signing import SigningKey

    from atoll.protocol.trust import verify_agent
    from atoll.tenancy.operator import DEFAULT_TENANT

    out = []
    for name in names:
        pub = SigningKey.generate().verify_key.encode()
        blob = op.agent_credential(DEFAULT_TENANT, pub, name, ["agent"])
        out.append(verify_agent(blob, op.operator_pub))
    return out


class LinkBytes:
    """Bytes sent on every mesh link of the given brokers (wraps each link's ``send``)."""

    def __init__(self, servers: list[BrokerServer]) -> None:
        self.total = 0
        for server in servers:
            for link in server.mesh.links.values():
                link.send = self._counting(link.send)

    def _counting(self, send: Callable[..., None]) -> Callable[..., None]:
        def counted(data: bytes, *args: Any) -> None:
            self.total += len(data)
            send(data, *args)

        return counted


def located(peers: list[BrokerServer], name: str) -> bool:
    """Every one of ``peers`` routes to agent ``name`` through broker a."""
    return all(p.mesh.state.locate(TENANT, name) == "a" for p in peers)


async def until(check: Callable[[], bool], timeout: float, step: float = 0.001) -> bool:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def loopback_rtt_us(rounds: int = 200) -> float:
    """Median round trip of a small message over a loopback websocket (the anchor)."""
    from atoll.transport import connect, serve

    def echo_back(ws: Any) -> None:
        ws.deliver_to(lambda m: ws.send(m, True))

    server = await serve(
        echo_back, "127.0.0.1", 0, max_message=1 << 16, limit=1 << 20, ping_interval=None
    )
    port = server.sockets[0].getsockname()[1]
    ws = await connect(
        f"ws://127.0.0.1:{port}", max_message=1 << 16, ping_interval=None, open_timeout=5
    )
    samples = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            ws.send(b"x" * 64, True)
            await ws.recv(5)
            samples.append(time.perf_counter_ns() - t0)
    finally:
        ws.abort()
        server.close()
    return round(statistics.median(samples) / 1000, 1)


async def bench_join(
    op: OperatorStore, root: Path, agents: int, joins: int, limit_s: float
) -> dict[str, Any]:
    """N agents behind A in a triangle, then ``joins`` more one at a time: bytes on all mesh
    links and time until B and C route to each."""
    s = RPC_SETTINGS
    wiring = [("a", []), ("b", ["a"]), ("c", ["a", "b"])]
    async with cluster(op, root, wiring, s, inproc=True) as brokers:
        await converged(brokers)
        servers = {n: b.server for n, b in brokers.items() if isinstance(b, InprocBroker)}
        a, peers = servers["a"], [servers["b"], servers["c"]]
        t0 = time.perf_counter()
        names = [f"n{agents}-{i}" for i in range(agents + joins)]
        idents = identities(op, names)
        idents_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, ident in enumerate(idents[:agents]):
            a.router.attach(QuietSession(ident))
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the coalesced deltas go out
        last = names[agents - 1]
        ok = await until(functools.partial(located, peers, last), limit_s, 0.01)
        setup_s = time.perf_counter() - t0
        routable = sum(1 for n in names[:agents] if located(peers, n))
        out: dict[str, Any] = {
            "agents": agents,
            "setup_converged": ok,
            "routable_from_peers": routable,
            "setup_s": round(setup_s, 3),
            "identities_s": round(idents_s, 3),
            "credential_bytes": len(idents[0].credential),
        }
        if not ok:  # the mesh never learnt of them: no join figures to give
            return out
        await asyncio.sleep(0.5)
        counter = LinkBytes(list(servers.values()))
        sizes, times = [], []
        for ident, name in zip(idents[agents:], names[agents:], strict=True):
            before = counter.total
            t = time.perf_counter()
            a.router.attach(QuietSession(ident))
            if not await until(functools.partial(located, peers, name), limit_s):
                out["join_converged"] = False
                return out
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)  # the last copies (B and C pass it on to each other)
            sizes.append(counter.total - before)
        # A broker joining now pulls the whole record (in chunks) from its neighbour.
        from atoll.broker.identity import issue_broker_dir
        from atoll.broker.server import BrokerServer

        d = issue_broker_dir(op, root / "late", "late")
        t = time.perf_counter()
        late = BrokerServer.from_data_dir(
            d,
            peers=[servers["b"].url],
            mesh_refresh=s.broker_mesh_refresh_s,
            ping_interval=s.broker_ping_interval_s,
        )
        await late.start("127.0.0.1", 0)
        try:
            synced = await until(functools.partial(located, [late], names[-1]), limit_s)
            synced &= all(located([late], n) for n in names)
            late_s = time.perf_counter() - t
        finally:
            await late.stop()
        out |= {
            "new_broker_synced": synced,
            "new_broker_synced_s": round(late_s, 3),
            "join_converged": True,
            "joins": joins,
            "join_bytes_median": statistics.median(sizes),
            "join_bytes_max": max(sizes),
            "convergence_ms_p50": round(statistics.median(times) * 1000, 2),
            "convergence_ms_max": round(max(times) * 1000, 2),
        }
        return out


async def bench_ring(op: OperatorStore, root: Path, size: int, limit_s: float) -> dict[str, Any]:
    s = RPC_SETTINGS
    names = [f"r{i:02}" for i in range(size)]
    wiring = [(n, [names[i - 1]] if i else []) for i, n in enumerate(names)]
    wiring[-1] = (names[-1], [names[-2], names[0]])
    async with (
        cluster(op, root, wiring, s, inproc=True) as brokers,
        agent_pool(op, s) as start,
    ):
        t0 = time.perf_counter()
        await converged(brokers, timeout=60)
        converge_s = time.perf_counter() - t0
        x = await start("x", [brokers[names[1]].url])
        await start("y", [brokers[names[-1]].url])
        await reachable(x, "y/bench")
        samples = []
        for _ in range(200):
            t = time.perf_counter_ns()
            await x.call("y/bench", ECHO, RPC_PARAMS)
            samples.append(time.perf_counter_ns() - t)
        rpc_p50_us = pct(sorted(samples), 50)
        dead = brokers[names[0]]
        assert isinstance(dead, InprocBroker)
        first = brokers[names[1]]
        assert isinstance(first, InprocBroker)
        t0 = time.perf_counter()
        await dead.server.stop()
        state = first.server.mesh.state
        around = await until(lambda: state.next_hops().get(names[-1]) == names[2], limit_s)
        rerouted_s = time.perf_counter() - t0 if around else None
        try:
            await reachable(x, "y/bench", timeout=limit_s)
            through_s: float | None = time.perf_counter() - t0
        except RuntimeError as exc:  # never got through: a failed figure, not a failed run
            log.warning("ring: %s", exc)
            through_s = None
        return {
            "brokers": size,
            "converge_s": round(converge_s, 3),
            "rpc_p50_us_before": rpc_p50_us,
            "hops_after": len(names) - 2,
            "routes_around_s": round(rerouted_s, 4) if rerouted_s is not None else None,
            "call_through_s": round(through_s, 4) if through_s is not None else None,
            "call_through_vs_rpc": round(through_s * 1e6 / rpc_p50_us, 1) if through_s else None,
        }


async def bench_state(op: OperatorStore, root: Path, plan: Plan) -> dict[str, Any]:
    rtt = await loopback_rtt_us()
    joins = {}
    for n in plan.state_agents:
        log.info("mesh state: %d agents behind one broker ...", n)
        joins[n] = await timed(
            bench_join(op, root / f"join-{n}", n, plan.state_joins, plan.state_limit_s),
            plan.state_limit_s * 3 + 120,
        )
    log.info("ring of %d brokers ...", plan.ring_size)
    ring = await timed(bench_ring(op, root / "ring", plan.ring_size, 10.0), 180)
    small, big = min(joins), max(joins)
    out: dict[str, Any] = {"anchor_loopback_rtt_us": rtt}
    for n, j in joins.items():
        out[f"state_join_bytes_{n}"] = j.get("join_bytes_median")
        out[f"state_convergence_ms_p50_{n}"] = j.get("convergence_ms_p50")
        out[f"state_new_broker_synced_s_{n}"] = j.get("new_broker_synced_s")
    jb_small, jb_big = joins[small].get("join_bytes_median"), joins[big].get("join_bytes_median")
    cred = joins[big]["credential_bytes"]
    conv_big = joins[big].get("convergence_ms_p50")
    out |= {
        "state_join_bytes_growth": round(jb_big / jb_small, 3) if jb_small and jb_big else None,
        "state_join_bytes_per_credential": round(jb_big / cred, 2) if jb_big else None,
        "state_convergence_vs_rtt": round(conv_big * 1000 / rtt, 1) if conv_big else None,
        "ring_routes_around_s": ring["routes_around_s"],
        "ring_call_through_s": ring["call_through_s"],
    }
    out["state_targets"] = {
        "join_bytes_do_not_grow": out["state_join_bytes_growth"] is not None
        and out["state_join_bytes_growth"] <= 1.1,
        "convergence_s<2": conv_big is not None and conv_big < 2000,
        "ring_reroute_s<=2": ring["call_through_s"] is not None and ring["call_through_s"] <= 2,
    }
    out["state_detail"] = {"joins": joins, "ring": ring}
    return out


# --- report ------------------------------------------------------------------------------------


async def bench_idle(op: OperatorStore, root: Path, seconds: float) -> dict[str, Any]:
    """Three idle brokers (a triangle, default settings): links made again, samples down."""
    from atoll.broker.identity import issue_broker_dir
    from atoll.broker.server import BrokerServer

    servers: list[BrokerServer] = []
    try:
        for name in ("a", "b", "c"):
            d = issue_broker_dir(op, root / name, name)
            peers = [s.url for s in servers]
            servers.append(await BrokerServer.from_data_dir(d, peers=peers).start("127.0.0.1", 0))
        if not await until(lambda: all(len(s.mesh.links) == 2 for s in servers), 10, 0.05):
            raise RuntimeError("the triangle did not link within 10 s")
        seen = {
            (i, peer): link for i, s in enumerate(servers) for peer, link in s.mesh.links.items()
        }
        remade = down = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # bounded by ``seconds``
            await asyncio.sleep(1.0)
            for i, s in enumerate(servers):
                for peer in ("a", "b", "c"):
                    if (i, peer) not in seen:
                        continue  # itself
                    link = s.mesh.links.get(peer)
                    if link is None:
                        down += 1
                    elif link is not seen[i, peer]:
                        remade += 1
                        seen[i, peer] = link
        return {"idle_s": seconds, "links": len(seen), "remade": remade, "down_samples": down}
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


def environment() -> dict[str, Any]:
    return base_environment(payload_bytes=len(RPC_PARAMS))


async def timed(coro: Awaitable[Any], limit: float) -> Any:
    async with asyncio.timeout(limit):
        return await coro


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    from atoll.tenancy.operator import OperatorStore

    plan = QUICK if args.quick else Plan()
    overrides = {
        k: v
        for k, v in (("failover_trials", args.failover_trials), ("stall_trials", args.stall_trials))
        if v is not None
    }
    plan = Plan(**(asdict(plan) | overrides))
    # SIGTERM unwinds like an error: agents stopped, children ended, temp dir removed
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atoll-bench-mesh-") as tmp:
        op = OperatorStore(Path(tmp) / "operator")
        op.init()
        if args.idle is not None:
            log.info("idle links, %.0f s ...", args.idle)
            idle = await bench_idle(op, Path(tmp) / "idle", args.idle)
            return idle | {"targets": {"remade==0": idle["remade"] == 0}, "env": environment()}
        log.info("mesh state ...")
        state = await bench_state(op, Path(tmp) / "state", plan)
        if args.state_only:
            return state | {"env": environment(), "bench_s": round(time.perf_counter() - t0, 2)}
        log.info("rpc across 1, 2, 3 brokers ...")
        rpc = await timed(bench_rpc(op, Path(tmp) / "rpc", plan, profile_dir), plan.rpc_time_s + 60)
        log.info("rpc across 1, 2, 3 brokers, all in this process ...")
        rpc_inproc = await timed(
            bench_rpc(op, Path(tmp) / "rpc-inproc", plan, None, inproc=True), plan.rpc_time_s + 60
        )
        log.info("failover (SIGKILL), %d trials ...", plan.failover_trials)
        kill = await bench_failover(op, Path(tmp), "kill", plan.failover_trials, plan)
        log.info("failover (SIGSTOP), %d trials ...", plan.stall_trials)
        stall = await bench_failover(op, Path(tmp), "stall", plan.stall_trials, plan)

    p50 = {n: rpc["paths"][n]["p50_us"] for n in (1, 2, 3)}
    result: dict[str, Any] = {k: v for k, v in state.items() if k != "state_detail"}
    for n in (1, 2, 3):
        result[f"rpc_p50_us_{n}"] = round(p50[n], 1)
        result[f"rpc_p99_us_{n}"] = round(rpc["paths"][n]["p99_us"], 1)
    extra = (p50[2] - p50[1]) / p50[1]
    per_hop = (p50[3] - p50[1]) / (2 * p50[1])
    # The same calls with every broker and agent in one process: what the hops cost in CPU
    # (Python, framing, loopback syscalls), without wake-ups and waits for a core.
    inproc = {n: rpc_inproc["paths"][n]["p50_us"] for n in (1, 2, 3)}
    for n in (1, 2, 3):
        result[f"inproc_rpc_p50_us_{n}"] = round(inproc[n], 1)
    kill_s = [t["failover_s"] for t in kill]
    failover_median = median_or_none(kill_s)
    result |= {
        "extra_hop_vs_single": round(extra, 4),
        "per_hop_added_vs_single_p50": round(per_hop, 4),
        "inproc_per_hop_added_vs_single_p50": round((inproc[3] - inproc[1]) / (2 * inproc[1]), 4),
        "failover_s_median": failover_median,
        "failover_s_trials": kill_s,
        "failover_stall_s_median": median_or_none([t["failover_s"] for t in stall]),
        "failover_stall_s_trials": [t["failover_s"] for t in stall],
        "targets": {
            "per_hop_added<=0.5": per_hop <= 0.5,
            "failover_s<=3": (failover_median is not None and failover_median <= 3)
            if kill_s
            else None,  # no trials run
        },
        "settings": asdict(RPC_SETTINGS),
        "detail": {
            "state": state["state_detail"],
            "rpc": rpc,
            "rpc_inproc": rpc_inproc,
            "failover_kill": kill,
            "failover_stall": stall,
            "plan": asdict(plan),
        },
        "env": environment(),
        "bench_s": round(time.perf_counter() - t0, 2),
    }
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    p.add_argument("--failover-trials", type=int, help="SIGKILL failover trials")
    p.add_argument("--stall-trials", type=int, help="SIGSTOP (hung broker) failover trials")
    p.add_argument("--profile-dir", help="write cProfile stats of the RPC phase here")
    p.add_argument("--state-only", action="store_true", help="only the mesh state figures")
    p.add_argument("--idle", type=float, help="only the idle links figure, over this many seconds")
    p.add_argument("--broker-child", help=argparse.SUPPRESS)  # internal: run a broker
    p.add_argument("--child-profile", help=argparse.SUPPRESS)
    p.add_argument("--peers", default="", help=argparse.SUPPRESS)
    p.add_argument("--mesh-refresh", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--ping-interval", type=float, default=20.0, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    setup_logging()
    tune_process()  # as the atoll command does in every process it starts
    if args.broker_child:
        broker_child(  # answers "hops" with its routing table, for convergence checks
            Path(args.broker_child),
            Path(args.child_profile) if args.child_profile else None,
            b"hops",
            lambda server: server.mesh.state.next_hops(),
            peers=[u for u in args.peers.split(",") if u],
            mesh_refresh=args.mesh_refresh,
            ping_interval=args.ping_interval,
        )
        sys.exit(0)
    run_main(main, args)
