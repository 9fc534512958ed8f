"""Helpers shared by the benchmarks in this folder (``overlay.py``, ``mesh.py``, ``dataplane.py``,
``gateway.py``, ``multilora.py``, ``adapters.py``, ``training.py``).

Not a benchmark: each benchmark runs as a script (``python bench/overlay.py``) and imports it as
``atoll.bench.harness`` (the repository root is the package), so the type checker follows it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import json
import logging
import os
import platform
import signal
import socket
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from atoll import eventloop
from atoll.tenancy.permissions import ANY

if TYPE_CHECKING:
    from atoll.agent.node import Agent
    from atoll.agent.plugins import Plugin
    from atoll.agent.runtime import AgentRuntime

P = TypeVar("P", bound="Plugin")

log = logging.getLogger("bench.harness")

QUIET_LOGGERS = ("atoll", "websockets", "asyncio")


def setup_logging(quiet: Iterable[str] = QUIET_LOGGERS) -> None:
    """Logs to stderr (stdout carries the one JSON object); the ``quiet`` loggers at WARNING."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def profiled(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(str(path))
        log.warning("profile written to %s", path)


def run_main(
    main: Callable[[Any, Path | None], Coroutine[Any, Any, dict[str, Any]]],
    args: Any,
    idle_spin_us: int = eventloop.DEFAULT_IDLE_SPIN_US,
) -> None:
    """Run ``main(args, profile_dir)`` on atoll's event loop and print its result, or
    ``{"error": ...}``, as ONE JSON object on stdout; exit 1 on an error, 143 when cancelled.
    ``idle_spin_us=0`` for a process that only drives load (no agent of its own)."""
    profile_dir = Path(args.profile_dir).resolve() if args.profile_dir else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    try:
        out = eventloop.run(main(args, profile_dir), idle_spin_us)
    except asyncio.CancelledError:
        print(json.dumps({"error": "terminated"}))
        sys.exit(143)
    except Exception as exc:
        log.exception("benchmark failed")
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(out))


def model_bench_args(
    description: str, quick_help: str, switches: dict[str, str] | None = None
) -> argparse.Namespace:
    """The command line of a benchmark on the embedded model: ``--quick`` (a smoke run, as
    ``quick_help`` says), ``--model-cache`` (where the converted model is kept) and the
    benchmark's own on/off ``switches`` (name: help)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    for name, help in (switches or {}).items():
        p.add_argument(f"--{name}", action="store_true", help=help)
    p.add_argument(
        "--model-cache",
        default=os.environ.get("ATOLL_MODEL_CACHE", "~/.cache/atoll/models"),
        help="where the converted embedded model is kept",
    )
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    return p.parse_args()


# --- processes ---------------------------------------------------------------------------------


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child before exec: get ``sig`` if we die, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


async def stop_process(proc: Process, name: str) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            log.warning("%s ignored SIGTERM; killing it", name)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def spawn_child(
    script: Path,
    name: str,
    *args: str,
    profile: Path | None = None,
    timeout: float = 30.0,
    death_signal: int = signal.SIGTERM,
) -> tuple[Process, str]:
    """``script`` run as a child with ``args``: the process and the line it prints when ready
    (stopped again when it prints none). Its stdin stays a pipe: it exits when that closes,
    and gets ``death_signal`` when we die, so it cannot outlive us."""
    cmd = [sys.executable, str(script), *args]
    if profile is not None:
        cmd += ["--child-profile", str(profile)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=functools.partial(die_with_parent, death_signal),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line.strip():
            raise RuntimeError(f"{name} child did not start (status {proc.returncode})")
    except BaseException:
        await stop_process(proc, name)
        raise
    return proc, line.decode().strip()


@contextlib.asynccontextmanager
async def script_child(
    script: Path, name: str, *args: str, profile: Path | None = None, timeout: float = 30.0
) -> AsyncIterator[tuple[Process, str]]:
    """``spawn_child`` for the block: yields the process and its ready line, stopped on exit."""
    proc, line = await spawn_child(script, name, *args, profile=profile, timeout=timeout)
    try:
        yield proc, line
    finally:
        await stop_process(proc, name)


def broker_url(ready: str, name: str = "broker child") -> str:
    """The URL of a ``broker_child`` from the line it printed when ready (its port)."""
    if not ready.isdigit():
        raise RuntimeError(f"{name} did not report a port (got {ready!r})")
    return f"ws://127.0.0.1:{int(ready)}"


class LineChild:
    """A child process speaking lines (``spawn_child``, ``serve_lines``): it printed ``ready``
    when it started, answers a command line with a JSON line, and exits when its stdin closes
    or on SIGTERM."""

    def __init__(self, name: str, proc: Process, ready: str) -> None:
        self.name = name
        self.proc = proc
        self.ready = ready
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ask(self, command: bytes) -> Any:
        """The child's JSON answer to ``command``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(command + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), 5)
        if not line:
            raise RuntimeError(f"{self.name} exited (status {self.proc.returncode})")
        return json.loads(line)


def free_port() -> int:
    """A loopback TCP port free now (for a server that takes its port as an argument)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_lines(
    stop: Callable[[], None], stats: Callable[[], dict[str, Any]], command: bytes = b"stats"
) -> None:
    """In a child's event loop: answer ``command`` lines on stdout with ``stats()`` as JSON; call
    ``stop`` at stdin EOF."""
    loop = asyncio.get_running_loop()
    buf = bytearray()

    def on_stdin() -> None:
        data = os.read(0, 4096)
        if not data:  # EOF: the parent is gone or done
            loop.remove_reader(0)
            stop()
            return
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if line.strip() == command:
                print(json.dumps(stats()), flush=True)

    loop.add_reader(0, on_stdin)


def broker_child(
    op_dir: Path,
    profile: Path | None,
    command: bytes = b"stats",
    answer: Callable[[Any], Any] = lambda server: {},
    **options: Any,
) -> None:
    """``--broker-child``: a broker on a loopback port, which it prints; serve until SIGTERM or
    until the parent closes our stdin. A ``command`` line on stdin is answered with
    ``answer(server)`` as JSON; ``options`` go to the BrokerServer."""
    from atoll.broker.server import BrokerServer

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = await BrokerServer.from_data_dir(op_dir, **options).start("127.0.0.1", 0)
        serve_lines(stop.set, lambda: answer(server), command)
        print(server.port, flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    with profiled(profile):
        eventloop.run(serve())


def running_plugin(rt: AgentRuntime, name: str, kind: type[P]) -> P:
    """``rt``'s plugin ``name`` as its own class (its Python API beyond ``Plugin``'s)."""
    plugin = rt.host.plugins.get(name)
    if not isinstance(plugin, kind):
        raise RuntimeError(f"{name} is not a running {kind.__name__}: {type(plugin).__name__}")
    return plugin


# --- the RPC that overlay.py and mesh.py time: the wire itself, no plugin in the way ------------

ECHO = "echo"  # the method, served at ``<agent>/bench``
RPC_PARAMS = b"ping"


async def echo(params: Any, _call: Any) -> Any:
    return params


def serve_echo(agent: Agent) -> None:
    """``agent`` answers ``ECHO`` at ``<its name>/bench`` for any agent of the tenant."""
    agent.handle("bench", ECHO, echo, ANY)


# --- measurements ------------------------------------------------------------------------------


def base_environment(**extra: Any) -> dict[str, Any]:
    """Where an overlay benchmark ran: Python, platform, CPUs, event loop and the overlay's
    libraries, then ``extra``."""
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
        **extra,
    }


def pct(samples: list[int], p: float) -> float:
    """The ``p``-th percentile of sorted nanosecond ``samples``, in microseconds."""
    return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1000


class CpuClock:
    """CPU seconds of this process (``harness``, all threads) and of each child (by pid)."""

    def __init__(self, children: dict[str, int]) -> None:
        import psutil

        self._procs = {n: psutil.Process(pid) for n, pid in children.items()}

    def read(self) -> dict[str, float]:
        out = {"harness": time.process_time()}
        for n, p in self._procs.items():
            t = p.cpu_times()
            out[n] = t.user + t.system
        return out

    def since(self, before: dict[str, float], wall: float) -> dict[str, float]:
        """Cores busy per process over ``wall`` seconds (1.0 = one core saturated)."""
        after = self.read()
        return {k: round((after[k] - before[k]) / max(wall, 1e-9), 3) for k in after}
