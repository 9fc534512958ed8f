"""Chaos benchmark: the network lab's fault scenarios at full size (Linux, root, ip and nft).

Each scenario builds three islands in network namespaces (``tests/support/lab.py``: islands on a
hub bridge, WAN links through a fault-injecting relay, faults with nftables) and runs one
scenario of ``tests/support/chaos.py`` against real `atoll` processes:

* ``partition``: island b (an inference node) cut off for 30 s under steady load, then healed:
  time until new requests avoid it, until requests caught on it are answered elsewhere, until
  the gateway drops it and (after the heal) routes to it again; success rate; ledger check.
* ``broker_kill`` / ``broker_stop`` (for the inference island's broker and the gateway's own):
  SIGKILL (restart 2 s later) or SIGSTOP (15 s, longer than the agents' keepalive) while the
  gateway serves 5,000 requests at concurrency 32: success rate, p99, ledger rows lost/doubled.
* ``wan``: 40 ms RTT on every link between islands and 1% of the packets into each island
  dropped: chat and streaming p50/p99 against the same requests on the healthy lab (the anchor,
  same run), and a 200 MB file between islands over the data plane.
* ``storage_kill``: storage SIGKILLed mid-upload: partial objects visible, resume.
* ``trainer_kill``: a trainer SIGKILLed mid-job: seconds until its job process is gone, until the
  job runs on the other trainer, until it succeeds.
* ``soak``: 10 minutes of steady load: errors, RSS and fd growth of every process.

Prints ONE JSON object on stdout (logs on stderr). ``--quick``: every scenario small (a smoke
run of a few minutes); ``--only NAME`` (repeatable) runs some.

    sudo .venv/bin/python bench/chaos.py [--quick] [--only partition]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from atoll.bench.harness import QUIET_LOGGERS, base_environment, run_main, setup_logging

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the lab and its scenarios are the tests' shared helpers

from support import chaos  # noqa: E402
from support.lab import Lab, cleanup_stale, unavailable  # noqa: E402

log = logging.getLogger("bench.chaos")

SCENARIOS = ("partition", "broker", "wan", "storage_kill", "trainer_kill", "soak")


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"partition_s": 8.0, "requests": 800, "stop_s": 6.0, "transfer": 8 * 2**20,
                "wan_requests": 60, "soak_s": 30.0}  # fmt: skip
    return {"partition_s": 30.0, "requests": 5000, "stop_s": 15.0, "transfer": 200 * 2**20,
            "wan_requests": 400, "soak_s": 600.0}  # fmt: skip


async def in_lab(
    root: Path, name: str, run: Callable[[Lab], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``run`` in a fresh lab (torn down after); its figures, or the error it ended in."""
    started = time.monotonic()
    log.info("scenario %s", name)
    try:
        async with Lab(root / name) as lab:
            figures = await run(lab)
    except Exception as exc:
        log.exception("scenario %s failed", name)
        figures = {"error": f"{type(exc).__name__}: {exc}"}
    figures["wall_s"] = round(time.monotonic() - started, 1)
    return figures


async def main(args: argparse.Namespace, _profile: Path | None) -> dict[str, Any]:
    if (why := unavailable()) is not None:
        raise RuntimeError(why)
    cleanup_stale()
    n = sizes(args.quick)
    only = set(args.only or SCENARIOS)
    out: dict[str, Any] = {
        "environment": base_environment(quick=args.quick),
        "sizes": n,
    }
    root = Path(tempfile.mkdtemp(prefix="atoll-chaos-"))

    async def partition(lab: Lab) -> dict[str, Any]:
        d = await chaos.deploy(lab, token_delay=0.002, storage=False)
        return await chaos.partition_heal(d, partition_s=n["partition_s"])

    def broker(island: str, sig: str) -> Callable[[Lab], Awaitable[dict[str, Any]]]:
        async def run(lab: Lab) -> dict[str, Any]:
            d = await chaos.deploy(lab, token_delay=0.002, storage=False, request_timeout=60)
            outage = 2.0 if sig == "kill" else n["stop_s"]
            return await chaos.broker_fault(
                d, sig=sig, requests=n["requests"], outage_s=outage, island=island
            )

        return run

    async def wan(lab: Lab) -> dict[str, Any]:
        d = await chaos.deploy(lab, token_delay=0.002)
        async with d.client(60) as http:  # the anchor: the same requests on the healthy lab
            await chaos.drive(http, concurrency=4, count=40)  # warm-up (keys, connections)
            lan = chaos.summary(await chaos.drive(http, concurrency=4, count=n["wan_requests"]))
        for relay in d.wan.values():
            relay.profile(rtt=0.04)
        for island in (d.a, d.b, d.c):
            island.loss(1.0)
        figures = await chaos.wan_profile(
            d, requests=n["wan_requests"], transfer_bytes=n["transfer"]
        )
        figures["lan_anchor"] = lan
        if lan["p50_ms"]:
            figures["chat_p50_vs_lan"] = round(figures["chat"]["p50_ms"] / lan["p50_ms"], 2)
        return figures

    async def storage_kill(lab: Lab) -> dict[str, Any]:
        d = await chaos.deploy(lab)
        return await chaos.storage_killed_mid_upload(
            d, dataset_bytes=3 * 2**20, file_bytes=6 * 2**20, rate=1.5e6, kill_after=1.0,
            fail_within=10.0,
        )  # fmt: skip

    async def trainer_kill(lab: Lab) -> dict[str, Any]:
        d = await chaos.deploy(lab, training=True)
        return await chaos.trainer_killed_mid_job(d)

    async def soak(lab: Lab) -> dict[str, Any]:
        d = await chaos.deploy(lab, token_delay=0.002, rtt=0.01)
        return await chaos.soak(d, seconds=n["soak_s"], samples=11)

    if "partition" in only:
        out["partition"] = await in_lab(root, "partition", partition)
    if "broker" in only:
        for island, role in (("b", "inference"), ("a", "gateway")):
            for sig in ("kill", "stop"):
                key = f"broker_{sig}_{role}"
                out[key] = await in_lab(root, key, broker(island, sig))
    if "wan" in only:
        out["wan"] = await in_lab(root, "wan", wan)
    if "storage_kill" in only:
        out["storage_kill"] = await in_lab(root, "storage_kill", storage_kill)
    if "trainer_kill" in only:
        out["trainer_kill"] = await in_lab(root, "trainer_kill", trainer_kill)
    if "soak" in only:
        out["soak"] = await in_lab(root, "soak", soak)
    return out


if __name__ == "__main__":
    setup_logging((*QUIET_LOGGERS, "httpx"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="every scenario small (minutes)")
    p.add_argument("--only", action="append", choices=SCENARIOS, help="run only these")
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    run_main(main, p.parse_args(), idle_spin_us=0)
