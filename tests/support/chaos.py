"""Fault scenarios on a three-island deployment in the network lab (``support.lab``), each
returning its figures as a dict: the tests in ``tests/lab/`` run them small and assert on the
figures, ``bench/chaos.py`` runs them at full size and prints them.

The deployment (``deploy``)::

    island a: broker-a, gateway "gw"            (the test reaches it through a portal)
    island b: broker-b, echo inference "gpu-b"
    island c: broker-c, echo inference "gpu-c", storage "store"

and with ``training``: a training queue "queue" on a, trainers "train-b" and "train-c" (a tiny
random model, "tiny-llama") on b and c.

Brokers b and c link to a (and c to b) through WAN relays in the hub; every agent lists its own
island's broker first, then the others' (through the relays), to fail over to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from support.lab import BROKER_PORT, Island, Lab, Proc, Relay, until

GATEWAY_PORT = 8000
MODEL = "echo"
TRAINED = "tiny-llama"  # the base model trainers fine-tune (``training`` deployments)
PROMPT = "the quick brown fox jumps over the lazy dog"  # 9 words: 9 tokens from echo


@dataclass
class Deployment:
    lab: Lab
    a: Island
    b: Island
    c: Island
    wan: dict[str, Relay]  # island name -> the relay into its broker
    gateway: Proc
    nodes: dict[str, Proc]  # inference agents by name
    storage: Proc | None
    trainers: dict[str, Proc]  # by name (none without ``training``)
    portal: Relay  # 127.0.0.1 -> the gateway
    broker_portal: Relay  # 127.0.0.1 -> broker-a (for an in-process admin agent)
    admin_key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.portal.port}"

    @property
    def gateway_dir(self) -> Path:
        return self.lab.root / "gw" / "plugins" / "gateway"

    def client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=timeout,
            limits=limits,
        )

    async def served(self) -> dict[str, float]:
        """Generate requests each inference node has served, from the gateway's /metrics (the
        tenant's metrics feed)."""
        async with self.client(10) as http:
            text = (await http.get("/metrics")).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(
                r'atoll_inference_requests_total\{[^}]*agent="([^"]+)"[^}]*\}\s+(\S+)', line
            )
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    async def routable(self) -> set[str]:
        """Inference nodes the gateway's discovery shows ACTIVE now (one frame of its admin
        feed)."""
        async with self.client(10) as http, http.stream("GET", "/admin/feed") as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    rows = json.loads(line[6:])["agents"]
                    return {
                        r["name"]
                        for r in rows
                        if r.get("status") == "ACTIVE" and "inference" in r.get("plugins", [])
                    }
        return set()


def echo_node(delay: float) -> dict[str, dict[str, Any]]:
    return {"inference": {"backend": "echo", "echo": {"model": MODEL, "delay": delay}}}


async def deploy(
    lab: Lab,
    *,
    token_delay: float = 0.0,
    rtt: float = 0.0,
    rate: float = 0.0,
    storage: bool = True,
    training: bool = False,
    request_timeout: float = 30.0,
) -> Deployment:
    """Three islands as the module says, WAN relays with ``rtt``/``rate``; returns once the
    gateway routes to both inference nodes."""
    a, b, c = lab.island("a"), lab.island("b"), lab.island("c")
    wan = {"a": await lab.wan(a), "b": await lab.wan(b), "c": await lab.wan(c)}
    for relay in wan.values():
        relay.profile(rtt=rtt, rate=rate)
    # Brokers and agents start in parallel per stage: each is a process start (~1 s of CPU).
    await asyncio.gather(
        a.broker(), b.broker(peers=[wan["a"].url]), c.broker(peers=[wan["a"].url, wan["b"].url])
    )
    others = {n: [wan[m].url for m in "abc" if m != n] for n in "abc"}
    gateway_cfg = {
        "gateway": {"listen": f"{a.ip}:{GATEWAY_PORT}", "request_timeout": request_timeout}
    }
    starts = [
        a.agent("gw", ["gateway"], gateway_cfg, brokers=[a.broker_url, *others["a"]]),
        b.agent("gpu-b", ["inference"], echo_node(token_delay), [b.broker_url, *others["b"]]),
        c.agent("gpu-c", ["inference"], echo_node(token_delay), [c.broker_url, *others["c"]]),
    ]
    if storage:
        store = {"storage": {}, "files": {"dirs": [str(lab.root / "store-files")]}}
        (lab.root / "store-files").mkdir(exist_ok=True)
        starts.append(c.agent("store", ["storage"], store, [c.broker_url, *others["c"]]))
    if training:
        from support.tiny_models import build_tiny_model

        base = build_tiny_model(lab.root / "tiny-llama")
        # Lost after 3 s without a heartbeat (the default 30 s would only make the test wait).
        queue = {"training": {"mode": "queue", "lost_after": 3.0}}
        starts.append(a.agent("queue", ["training"], queue, [a.broker_url, *others["a"]]))
        for island in (b, c):
            trainer = {
                "mode": "trainer", "device": "cpu", "heartbeat": 0.5, "poll": 0.5,
                "models": {TRAINED: str(base)}, "model_cache": str(lab.root / "models"),
            }  # fmt: skip
            name = f"train-{island.name}"
            brokers = [island.broker_url, *others[island.name]]
            starts.append(island.agent(name, ["training"], {"training": trainer}, brokers))
    procs = await asyncio.gather(*starts)
    gw, gpu_b, gpu_c = procs[:3]
    trainers = {p.name: p for p in procs if p.name.startswith("train-")}
    portal = await lab.portal(a, GATEWAY_PORT)
    broker_portal = await lab.portal(a, BROKER_PORT)
    d = Deployment(
        lab, a, b, c, wan, gw, {"gpu-b": gpu_b, "gpu-c": gpu_c}, procs[3] if storage else None,
        trainers, portal, broker_portal,
    )  # fmt: skip
    d.admin_key = (d.gateway_dir / "admin-key").read_text().strip()
    await until(lambda: _both_routable(d), 60, 0.3)
    return d


async def _both_routable(d: Deployment) -> bool:
    return {"gpu-b", "gpu-c"} <= await d.routable()


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Result:
    start: float  # monotonic
    end: float
    status: int  # HTTP status; 0: no response (connection error, timeout)
    rid: str | None = None  # the ledger's request id (from the response id)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def latency(self) -> float:
        return self.end - self.start


def body(stream: bool, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def request(http: httpx.AsyncClient, stream: bool) -> Result:
    """One chat completion (streamed or not), bounded by the client's timeout."""
    start = time.monotonic()
    try:
        if not stream:
            reply = await http.post("/v1/chat/completions", json=body(False))
            rid = None
            error = ""
            if reply.status_code == 200:
                data = reply.json()
                rid = data["id"].removeprefix("chatcmpl-")
                if data["choices"][0]["message"]["content"] != PROMPT:
                    error = f"wrong text {data['choices'][0]['message']['content']!r}"
            else:
                error = reply.text[:300]
            return Result(start, time.monotonic(), reply.status_code, rid, error)
        async with http.stream("POST", "/v1/chat/completions", json=body(True)) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")[:300]
                return Result(start, time.monotonic(), reply.status_code, None, text)
            rid, text, done, error = None, "", False, ""
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = json.dumps(chunk["error"])[:300]
                    continue
                rid = chunk["id"].removeprefix("chatcmpl-")
                for choice in chunk.get("choices", []):
                    text += (choice.get("delta") or {}).get("content") or ""
            if not error and (not done or text != PROMPT):
                error = f"stream ended early (done={done}, text={text!r})"
            return Result(start, time.monotonic(), 200, rid, error)
    except (httpx.HTTPError, OSError) as exc:
        return Result(start, time.monotonic(), 0, None, f"{type(exc).__name__}: {exc}")


async def drive(
    http: httpx.AsyncClient,
    *,
    concurrency: int,
    count: int | None = None,
    seconds: float | None = None,
    stream: bool = False,
    pace: float = 0.0,
    stop: asyncio.Event | None = None,
) -> list[Result]:
    """Requests from ``concurrency`` workers until ``count`` were sent, ``seconds`` passed or
    ``stop`` is set (at least one bound); each worker waits ``pace`` s between its requests."""
    assert count is not None or seconds is not None or stop is not None
    results: list[Result] = []
    end = time.monotonic() + seconds if seconds is not None else None
    budget = count if count is not None else 10**9
    hard_cap = 10**6  # never unbounded

    async def worker() -> None:
        nonlocal budget
        while budget > 0 and len(results) < hard_cap:
            if end is not None and time.monotonic() >= end:
                return
            if stop is not None and stop.is_set():
                return
            budget -= 1
            results.append(await request(http, stream))
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summary(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    lat = [r.latency for r in ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status}: {r.error[:120]}"
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "success_rate": round(len(ok) / len(results), 5) if results else 0.0,
        "p50_ms": round(p(lat, 50) * 1000, 1),
        "p99_ms": round(p(lat, 99) * 1000, 1),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


# --- the ledger ----------------------------------------------------------------------------------


def ledger(d: Deployment, since: float = 0.0) -> list[tuple[str, int]]:
    """(request id, status) of the gateway's ledger rows written at or after ``since`` (epoch)."""
    db = sqlite3.connect(f"file:{d.gateway_dir / 'gateway.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT request_id, status FROM usage WHERE at >= ?", (since,))
        return [(r[0], int(r[1])) for r in rows]
    finally:
        db.close()


async def ledger_check(d: Deployment, results: list[Result], since: float) -> dict[str, Any]:
    """Every request that reached the gateway has exactly one row; every success is a 200 row.
    (Rows are written before a response ends, so no wait is needed; a short one covers a
    client that gave up before the gateway did.)"""
    answered = [r for r in results if r.status != 0]
    rows: list[tuple[str, int]] = []
    with contextlib.suppress(AssertionError):
        await until(lambda: len(ledger(d, since)) >= len(answered), 10, 0.2)
    rows = ledger(d, since)
    ids = [rid for rid, _ in rows]
    ok_rows = {rid for rid, status in rows if status == 200}
    ok_ids = [r.rid for r in results if r.ok]
    return {
        "ledger_rows": len(rows),
        "requests_answered": len(answered),
        "doubled": len(ids) - len(set(ids)),
        "successes_without_row": sum(1 for rid in ok_ids if rid not in ok_rows),
        "rows_200": len(ok_rows),
        "successes": len(ok_ids),
    }


# --- scenarios -----------------------------------------------------------------------------------


async def partition_heal(
    d: Deployment,
    *,
    partition_s: float,
    concurrency: int = 4,
    pace: float = 0.05,
    inbound: bool = True,
    outbound: bool = True,
) -> dict[str, Any]:
    """Island b (gpu-b) cut off (nftables; one direction only for an asymmetric partition) for
    ``partition_s`` under steady load, then healed. Figures:

    - ``new_requests_rerouted_s``: from the cut until every request started later succeeded in
      under a second (the gateway stopped choosing gpu-b);
    - ``stuck_recovered_s``: from the cut until the last request caught on gpu-b had its answer
      (from gpu-c, after the gateway's first-event timeout);
    - ``left_routing_s``: until the gateway's discovery no longer shows gpu-b ACTIVE;
    - ``rejoin_s``: from the heal until it shows gpu-b ACTIVE again, and ``served_again``: gpu-b
      then served new requests;
    - the load's success rate and latency, and the ledger check."""
    since = time.time()
    stop = asyncio.Event()
    seen: list[tuple[float, set[str]]] = []

    async def monitor() -> None:
        while not stop.is_set():  # bounded by the load's own bound (``stop`` or its seconds)
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
                seen.append((time.monotonic(), await d.routable()))
            await asyncio.sleep(0.25)

    async with d.client(60) as http:
        load = asyncio.create_task(
            drive(http, concurrency=concurrency, stop=stop, pace=pace, seconds=partition_s + 120)
        )
        watching = asyncio.create_task(monitor())
        await asyncio.sleep(2.0)  # steady state, both islands serving
        cut = time.monotonic()
        d.b.partition(inbound=inbound, outbound=outbound)
        await asyncio.sleep(partition_s)
        healed = time.monotonic()
        d.b.heal()
        await until(lambda: any(t > healed and "gpu-b" in s for t, s in seen), 90, 0.1)
        await asyncio.sleep(2.5)  # gpu-b's metrics after the heal have reached the gateway
        base = (await d.served()).get("gpu-b", 0.0)
        served_again = True
        try:
            await until(lambda: _served_more(d, "gpu-b", base), 30, 0.25)
        except AssertionError:
            served_again = False
        stop.set()
        results = await load
        await watching
    gone = [t for t, s in seen if cut <= t < healed and "gpu-b" not in s]
    back = [t for t, s in seen if t > healed and "gpu-b" in s]
    during = [r for r in results if cut <= r.start < healed]
    slow = [
        r for r in results if r.start < healed and r.end > cut and (not r.ok or r.latency > 1.0)
    ]
    figures = {
        "partition_s": partition_s,
        "direction": "both" if inbound and outbound else ("inbound" if inbound else "outbound"),
        "new_requests_rerouted_s": round(max((r.start - cut for r in slow), default=0.0), 2),
        "stuck_requests": len(slow),
        "stuck_recovered_s": round(max((r.end - cut for r in slow), default=0.0), 2),
        "left_routing_s": round(gone[0] - cut, 2) if gone else None,
        "rejoin_s": round(back[0] - healed, 2) if back else None,
        "served_again": served_again,
        "during": summary(during),
        "all": summary(results),
    }
    figures |= await ledger_check(d, results, since)
    return figures


async def _served_more(d: Deployment, node: str, before: float) -> bool:
    return (await d.served()).get(node, 0.0) > before + 2


async def broker_fault(
    d: Deployment,
    *,
    sig: str,
    requests: int,
    concurrency: int = 32,
    outage_s: float = 3.0,
    stream: bool = False,
    island: str = "b",
) -> dict[str, Any]:
    """``sig`` (``kill``: SIGKILL then restart; ``stop``: SIGSTOP for ``outage_s`` then SIGCONT)
    the broker of ``island`` (b: gpu-b's; a: the gateway's own) a second into ``requests`` at
    ``concurrency``. Figures: success rate, p99, and the ledger check (no row lost or
    doubled)."""
    import signal as signals

    since = time.time()
    broker = d.lab.islands[island].procs[f"broker-{island}"]
    async with d.client(120) as http:
        load = asyncio.create_task(
            drive(http, concurrency=concurrency, count=requests, stream=stream)
        )
        await asyncio.sleep(1.0)
        hit = time.monotonic()
        if sig == "kill":
            await broker.kill()
            await asyncio.sleep(outage_s)
            await broker.start("listening on")
        else:
            broker.signal(signals.SIGSTOP)
            await asyncio.sleep(outage_s)
            broker.signal(signals.SIGCONT)
        back = time.monotonic()
        results = await asyncio.wait_for(load, 600)
    after = [r for r in results if r.start >= hit]
    figures = {
        "signal": sig,
        "broker": broker.name,
        "outage_s": outage_s,
        "fault_at_request": sum(1 for r in results if r.start < hit),
        "restored_after_s": round(back - hit, 2),
        **summary(results),
        "after_fault": summary(after),
    }
    figures |= await ledger_check(d, results, since)
    return figures


async def wan_profile(d: Deployment, *, requests: int, transfer_bytes: int) -> dict[str, Any]:
    """Chat and streaming through the WAN relays (their RTT and each island's nftables loss set
    by the caller), and an adapter-sized file from storage on island c to the gateway's island
    over the data plane. Figures: success rate and p50/p99 of each, transfer MB/s."""
    async with d.client(60) as http:
        chat = await drive(http, concurrency=4, count=requests)
        streamed = await drive(http, concurrency=4, count=requests, stream=True)
    transfer = await file_transfer(d, transfer_bytes)
    return {"chat": summary(chat), "stream": summary(streamed), "transfer": transfer}


async def file_transfer(d: Deployment, size: int) -> dict[str, Any]:
    """``size`` random bytes uploaded to storage (island c) by an admin agent on island a, then
    downloaded again, over the data plane through broker a and the WAN; sha256 checked."""
    import hashlib
    import os

    from atoll.agent.identity import AgentKeys
    from atoll.agent.node import Agent

    src = d.lab.root / "blob.bin"
    with src.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            fh.write(chunk)
            left -= len(chunk)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    keys = AgentKeys.issue(d.lab.operator, d.lab.tenant, "lab-admin", ["admin"])
    agent = await Agent(keys, [d.broker_portal.url]).start()
    try:
        return await _transfer(agent, src, digest, size, d.lab.root / "back.bin")
    finally:
        await agent.stop()


async def _transfer(agent: Any, src: Path, digest: str, size: int, back: Path) -> dict[str, Any]:
    import hashlib

    from atoll.agent.files import get_file, put_file

    t0 = time.monotonic()
    await put_file(agent, "store", src, "blob.bin")
    up = time.monotonic() - t0
    t1 = time.monotonic()
    await get_file(agent, "store", "blob.bin", back)
    down = time.monotonic() - t1
    ok = hashlib.sha256(back.read_bytes()).hexdigest() == digest
    mb = size / 2**20
    return {
        "bytes": size,
        "up_s": round(up, 2),
        "down_s": round(down, 2),
        "up_mb_s": round(mb / up, 2),
        "down_mb_s": round(mb / down, 2),
        "sha256_ok": ok,
    }


async def soak(
    d: Deployment, *, seconds: float, concurrency: int = 4, pace: float = 0.02, samples: int = 6
) -> dict[str, Any]:
    """Steady load for ``seconds``: success rate, p99, and each process's RSS and fd growth
    from the first sample (after a warm-up) to the last; ``rss_mb_series``: ``samples`` RSS
    readings spread over the run (a plateau or a slope)."""
    procs = d.lab.procs()
    series: dict[str, list[float]] = {p.name: [] for p in procs}
    fds: dict[str, list[int]] = {p.name: [] for p in procs}
    stop = asyncio.Event()

    async def sample() -> None:
        for i in range(samples):
            for p in procs:
                u = p.usage()
                series[p.name].append(round(u["rss_mb"], 1))
                fds[p.name].append(int(u["fds"]))
            if i < samples - 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), seconds / (samples - 1))

    async with d.client(60) as http:
        await drive(http, concurrency=concurrency, seconds=min(10.0, seconds / 4), pace=pace)
        sampler = asyncio.create_task(sample())
        results = await drive(http, concurrency=concurrency, seconds=seconds, pace=pace)
        stop.set()
        await sampler
    growth = {
        n: {
            "rss_mb": series[n][0],
            "rss_growth_pct": round(100 * (series[n][-1] / series[n][0] - 1), 2),
            "rss_mb_series": series[n],
            "fds": fds[n][0],
            "fd_growth": fds[n][-1] - fds[n][0],
        }
        for n in series
    }
    return {"seconds": seconds, **summary(results), "processes": growth}


def rates(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


Check = Callable[[dict[str, Any]], None]


async def storage_killed_mid_upload(
    d: Deployment,
    *,
    dataset_bytes: int,
    file_bytes: int,
    rate: float,
    kill_after: float,
    fail_within: float = 10.0,
    parts: tuple[str, ...] = ("dataset", "file"),
) -> dict[str, Any]:
    """Storage (island c) SIGKILLed ``kill_after`` s into an upload over a WAN capped at
    ``rate`` bytes/s, then restarted; once for a dataset upload (the storage plugin) and once
    for a file put (the files plugin, ``atoll cp``). Figures: whether the upload failed, whether
    any partial object became visible, whether it then went through, and how many bytes the
    second upload had to send again (both resume from what the receiver kept). An
    upload still waiting ``fail_within`` s after the kill is given up (cancelled): ``hung``."""
    import hashlib
    import os

    from atoll.agent.errors import AtollError
    from atoll.agent.files import put_file
    from atoll.agent.identity import AgentKeys
    from atoll.agent.node import Agent
    from atoll.agent.transfer import READ_SIZE
    from atoll.plugins.storage.contract.datasets import list_datasets, upload_dataset

    assert d.storage is not None
    store = d.storage
    objects = d.lab.root / "store" / "plugins" / "storage" / "objects"
    files_dir = d.lab.root / "store-files"
    rows = d.lab.root / "rows.jsonl"
    with rows.open("w") as fh:
        i = 0
        while fh.tell() < dataset_bytes:
            row = {"instruction": f"Say {i} {os.urandom(24).hex()}.", "output": f"{i}."}
            fh.write(json.dumps(row) + "\n")
            i += 1
    blob = d.lab.root / "blob.bin"
    blob.write_bytes(os.urandom(file_bytes))
    keys = AgentKeys.issue(d.lab.operator, d.lab.tenant, "lab-admin", ["admin"])
    agent = await Agent(keys, [d.broker_portal.url]).start()
    link = d.wan["a"]  # broker c dialled broker a through it: the a <-> c traffic
    link.up.rate = link.down.rate = rate
    failed_after: list[float] = []

    def visible() -> list[str]:
        return sorted(
            str(p.relative_to(objects))
            for p in objects.rglob("*")
            if p.is_file() and ".atoll-staging" not in p.parts
        )

    async def kill_during(upload: Any) -> str:
        task = asyncio.create_task(upload)
        await asyncio.sleep(kill_after)
        assert not task.done(), "the upload finished before the kill: lower the rate"
        await store.kill()
        killed = time.monotonic()
        try:
            await asyncio.wait_for(task, fail_within)
            return "completed"
        except TimeoutError:
            return f"hung: no error within {fail_within}s of the kill"
        except (AtollError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            failed_after.append(round(time.monotonic() - killed, 2))

    async def restart() -> float:
        """The store again, until the gateway's island reaches it; seconds that took."""
        t = time.monotonic()
        await store.start("connected to")
        for _ in range(300):  # bounded: 30 s for the mesh to advertise it again
            try:
                await agent.call("store", "ping", timeout=2)
                break
            except AtollError:
                await asyncio.sleep(0.1)
        return round(time.monotonic() - t, 2)

    out: dict[str, Any] = {}
    try:
        if "dataset" in parts:
            before = visible()
            error = await kill_during(upload_dataset(agent, "store", rows, "big", "alice"))
            partial = [p for p in visible() if p not in before]
            back_s = await restart()
            listed = [r.name for r in await list_datasets(agent, "store")]
            t = time.monotonic()
            firsts: list[int] = []

            def first(done: int, total: int) -> None:
                if not firsts:
                    firsts.append(done)

            record = await upload_dataset(agent, "store", rows, "big", "alice", progress=first)
            size = rows.stat().st_size
            held = max(0, firsts[0] - min(READ_SIZE, size)) if firsts else 0
            out["dataset"] = {
                "bytes": rows.stat().st_size,
                "killed_upload": error,
                "failed_after_kill_s": failed_after[-1],
                "storage_back_s": back_s,
                "partial_objects_visible": partial,
                "listed_after_restart": "big" in listed,
                "reupload_ok": record.name == "big",
                "reupload_s": round(time.monotonic() - t, 2),
                "resent_bytes": size - held,
                "resumed": held > 0,
            }
        if "file" in parts:
            error = await kill_during(put_file(agent, "store", blob, "blob.bin"))
            partial_file = (files_dir / "blob.bin").exists()
            await restart()
            sent = await put_file(agent, "store", blob, "blob.bin")
            digest = hashlib.sha256(blob.read_bytes()).digest()
            landed = hashlib.sha256((files_dir / "blob.bin").read_bytes()).digest()
            out["file"] = {
                "bytes": file_bytes,
                "killed_put": error,
                "failed_after_kill_s": failed_after[-1],
                "partial_visible": partial_file,
                "resent_bytes": sent,
                "resumed": sent < file_bytes,
                "sha256_ok": landed == digest,
            }
    finally:
        link.up.rate = link.down.rate = 0.0
        await agent.stop()
    return out


def _runner(trainer: Proc) -> int | None:
    """The training job process a trainer runs now (its child), if any."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(trainer.pid).children():
            if "atoll.plugins.training.runner" in " ".join(child.cmdline()):
                return child.pid
    return None


async def trainer_killed_mid_job(
    d: Deployment, *, epochs: int = 12, timeout: float = 180.0
) -> dict[str, Any]:
    """A fine-tuning job (through the gateway's API) whose trainer is SIGKILLed while its job
    process runs: that process must end with it (no orphan holding the device), the queue must
    put the job back in line once the trainer's heartbeats stop, and the other trainer must
    finish it. Figures: seconds from the kill to the orphan's end, to the job running again,
    and to its success."""
    import psutil

    rows = "".join(
        json.dumps({"instruction": f"Say the colour number {i}.", "output": f"Blue {i}."}) + "\n"
        for i in range(24)
    )
    out: dict[str, Any] = {}
    async with d.client(60) as http:
        files = {"file": ("colours.jsonl", rows.encode(), "application/jsonl")}
        reply = await http.post("/v1/files", data={"purpose": "fine-tune"}, files=files)
        reply.raise_for_status()
        body = {
            "model": TRAINED, "training_file": reply.json()["id"],
            "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
            "options": {"lora_rank": 4, "cutoff_len": 64, "logging_steps": 1},
        }  # fmt: skip
        reply = await http.post("/v1/fine_tuning/jobs", json=body)
        reply.raise_for_status()
        job_id = reply.json()["id"]

        async def job() -> dict[str, Any]:
            got = await http.get(f"/v1/fine_tuning/jobs/{job_id}")
            got.raise_for_status()
            return dict(got.json())

        running: list[tuple[Proc, int]] = []

        def claimed() -> bool:
            running[:] = [(t, pid) for t in d.trainers.values() if (pid := _runner(t))]
            return bool(running)

        await until(claimed, 60, 0.2)
        victim, runner = running[0]
        out["killed"] = victim.name
        await asyncio.sleep(1.0)  # into its steps
        assert (await job())["status"] == "running", "the job ended before the kill: more epochs"
        await victim.kill()
        killed = time.monotonic()

        def orphan_gone() -> bool:
            try:
                return psutil.Process(runner).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        await until(orphan_gone, 30, 0.1)
        out["orphan_gone_s"] = round(time.monotonic() - killed, 2)
        survivor = next(t for t in d.trainers.values() if t is not victim)
        await until(lambda: _runner(survivor) is not None, 60, 0.2)
        out["running_again_s"] = round(time.monotonic() - killed, 2)
        deadline = time.monotonic() + timeout
        state = await job()
        while state["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {state['status']} after {timeout}s"
            await asyncio.sleep(0.5)
            state = await job()
        out["finished_s"] = round(time.monotonic() - killed, 2)
        out["status"] = state["status"]
        out["error"] = state.get("error")
        out["fine_tuned_model"] = state.get("fine_tuned_model")
        events = (await http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000")).json()
        out["requeued"] = any("queued again" in e["message"] for e in events["data"])
    return out
