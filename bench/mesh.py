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

``--profile-dir D`` writes cProfile stats of the RPC phase's brokers (``broker_a.prof`` ...) and
of the agents' side (``agents.prof``) into D (look at them with ``python -m pstats``).

    .venv/bin/python bench/mesh.py [--quick] [--failover-trials N] [--stall-trials N]
                                   [--profile-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.tenancy.permissions import ANY
from atoll.tuning import tune_process
from harness import (
    CpuClock,
    broker_child,
    die_with_parent,
    pct,
    run_main,
    setup_logging,
    stop_process,
)

if TYPE_CHECKING:
    from atoll.agent.node import Agent
    from atoll.broker.server import BrokerServer
    from atoll.tenancy.operator import OperatorStore

log = logging.getLogger("bench.mesh")

HERE = Path(__file__).resolve()
RPC_PARAMS = b"ping"
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


QUICK = Plan(
    rpc_warmup=100, rpc_rounds=2, rpc_calls_per_round=300, failover_trials=2, stall_trials=0
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

    def link_options(self) -> dict[str, float]:
        return {
            "ping_interval": self.agent_ping_interval_s,
            "backoff_base": self.agent_backoff_base_s,
            "backoff_max": self.agent_backoff_max_s,
            "open_timeout": self.agent_open_timeout_s,
        }


RPC_SETTINGS = MeshSettings()  # the RPC paths run with the same timers (their traffic is tiny)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class BrokerProc:
    """A broker child: its URL, and its routing table on request (``hops``)."""

    name: str
    proc: Process
    url: str
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def hops(self) -> dict[str, str]:
        """The broker's next hops (reachable broker -> peer to send through)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(b"hops\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), 5)
        if not line:
            raise RuntimeError(f"broker {self.name} exited (status {self.proc.returncode})")
        return json.loads(line)


async def spawn_broker(
    data_dir: Path, name: str, peers: list[str], s: MeshSettings, profile: Path | None = None
) -> BrokerProc:
    cmd = [
        sys.executable,
        str(HERE),
        "--broker-child",
        str(data_dir),
        "--peers",
        ",".join(peers),
        "--mesh-refresh",
        str(s.broker_mesh_refresh_s),
        "--ping-interval",
        str(s.broker_ping_interval_s),
    ]
    if profile is not None:
        cmd += ["--child-profile", str(profile)]
    # stdin stays a pipe: the child exits when it closes, so it cannot outlive us
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        # SIGKILL, not SIGTERM as in overlay.py: a SIGSTOPped broker (stall trials) would never
        # act on a SIGTERM
        preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line.strip().isdigit():
            raise RuntimeError(f"broker child {name} did not report a port (got {line!r})")
    except BaseException:
        await stop_process(proc, f"broker {name}")
        raise
    return BrokerProc(name, proc, f"ws://127.0.0.1:{int(line)}")


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
                b.server.stop()
                if isinstance(b, InprocBroker)
                else stop_process(b.proc, f"broker {b.name}")
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


async def echo(params: Any, _call: Any) -> Any:
    return params


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
        a.handle("bench", "echo", echo, ANY)
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
            await caller.call(dst, "echo", RPC_PARAMS, timeout=1.0)
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
                await caller.call(dst[n], "echo", RPC_PARAMS)

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
                    await call(dst[n], "echo", RPC_PARAMS)
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
                await self.caller.call(self.dst, "echo", RPC_PARAMS, timeout=self.probe_timeout)
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

    link.on_up, link.on_down = up, down  # type: ignore[method-assign]


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


# --- report ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "event_loop": type(asyncio.get_running_loop()).__name__,
        "websockets": pkg_version("websockets"),
        "msgpack": pkg_version("msgpack"),
        "pynacl": pkg_version("pynacl"),
        "payload_bytes": len(RPC_PARAMS),
    }


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
    result: dict[str, Any] = {}
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
