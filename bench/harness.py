"""Helpers shared by the benchmarks in this folder (``overlay.py``, ``mesh.py``, ``dataplane.py``).

Not a benchmark: each benchmark runs as a script (``python bench/overlay.py``), which puts this
folder on ``sys.path``, so they import it as ``from harness import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import logging
import os
import signal
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

from atoll import eventloop

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


@contextlib.asynccontextmanager
async def script_child(
    script: Path, name: str, *args: str, profile: Path | None = None, timeout: float = 30.0
) -> AsyncIterator[tuple[Process, str]]:
    """``script`` run as a child with ``args``; yields the process and the line it prints when
    ready. Its stdin stays a pipe: it exits when that closes, so it cannot outlive us."""
    cmd = [sys.executable, str(script), *args]
    if profile is not None:
        cmd += ["--child-profile", str(profile)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line.strip():
            raise RuntimeError(f"{name} child did not start (status {proc.returncode})")
        yield proc, line.decode().strip()
    finally:
        await stop_process(proc, name)


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


# --- measurements ------------------------------------------------------------------------------


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
