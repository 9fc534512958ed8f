"""Gateway benchmark: requests/s and added latency of the OpenAI endpoint (HTTP -> gateway ->
broker -> echo inference agent), against the same request straight to the agent over the
overlay, and against a LiteLLM proxy in front of an echo upstream.

Processes, as in dataplane.py (this script with a child flag):

* the broker (``--broker-child``), the echo inference agent ``gpu`` (``--node-child``) and the
  gateway agent ``gw`` (``--gateway-child``: it creates the user ``bench`` and prints its key);
* the echo upstream (``--upstream-child``): a raw asyncio HTTP/1.1 keep-alive server answering
  ``POST .../chat/completions`` with a chat completion echoing the prompt's words;
* the LiteLLM proxy (``litellm --config``, from its own venv, ``--litellm-venv``; created with
  ``pip install "litellm[proxy]"`` if missing), model ``echo`` = ``openai/echo`` at the upstream;
* the harness: the load generator (``concurrency`` workers, each with one HTTP/1.1 keep-alive
  connection of a minimal asyncio client, ``KeepAlive``, as wrk is to C servers; non-streaming
  chat completions with ``max_tokens`` 8; only 200s count; one answer per path checked whole
  with httpx first) and the ``direct`` anchor: an agent with role ``gateway`` calling
  ``stream_generate`` on ``gpu/inference`` itself.

With ``--postgres URL`` (an empty database), a second gateway agent keeps its accounts there:
path ``gateway_pg``, against ``gateway`` (SQLite) in the same run.

Budgets (``budget_overspend``): after the paths, 200 requests at once through each gateway by a
user whose token budget holds about 40 of them: admitted, refused (429 naming the budget), and
the tokens the admitted ones spent beyond the budget (target 0).

Paths measured, all in one run: ``gateway``, ``direct``, ``litellm`` and ``upstream`` (the
client straight to the echo upstream: what the HTTP client and a minimal server cost, and proof the
upstream is not LiteLLM's bottleneck). Concurrency 1 runs in rounds alternating the paths (a
shared machine's drift hits all alike); concurrency 32 too. Added latency = gateway - direct.
Each path also reports the CPU each process spent per answered request.

Prints ONE JSON object on stdout (logs go to stderr). ``--profile-dir D`` writes cProfile stats
of the harness, broker, node and gateway into D (``python -m pstats``).

    .venv/bin/python bench/gateway.py [--quick] [--skip-litellm] [--litellm-venv DIR]
                                      [--postgres URL] [--profile-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import tempfile
import time
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from atoll import eventloop
from atoll.bench.harness import (
    CpuClock,
    broker_child,
    broker_url,
    die_with_parent,
    free_port,
    pct,
    profiled,
    run_main,
    running_plugin,
    script_child,
    serve_lines,
    setup_logging,
    stop_process,
)
from atoll.tuning import tune_process

if TYPE_CHECKING:
    from atoll.agent.node import Agent
    from atoll.plugins.gateway.plugin import GatewayPlugin
    from atoll.plugins.inference.contract import GenerateRequest

log = logging.getLogger("bench.gateway")

HERE = Path(__file__).resolve()
MODEL = "echo"
NODE = "gpu"
GATEWAY = "gw"
USER = "bench"
BUDGETED = "budgeted"  # a user whose token budget the overspend phase runs into
BUDGET = 5_000  # tokens: ~40 requests at once (each reserves ~125: its prompt's bound + max_tokens)
BUDGET_REQUESTS = 200
PROMPT = "say hello to the gateway benchmark please"
MAX_TOKENS = 8
EXPECTED = " ".join(PROMPT.split()[:MAX_TOKENS])  # what every path must answer
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
).encode()
CHAT_PATH = "/v1/chat/completions"
PHASE_SLACK_S = 30.0  # warm-up and draining on top of a phase's own time limit
CHILD_START_S = 30.0
LITELLM_START_S = 120.0  # its imports alone take ~10 s on a busy 2-core machine
LITELLM_INSTALL_S = 900.0
MAX_HEAD = 16 * 1024  # the upstream's bound on a request head
MAX_BODY = 1 << 20  # and on a request body


@dataclass(frozen=True)
class Plan:
    c1_rounds: int = 3
    c1_calls: int = 400  # per path and round
    c1_time_s: float = 60.0  # all paths and rounds together
    warmup: int = 200  # per path, at full concurrency, before anything is measured
    c32_rounds: int = 2
    c32_requests: int = 4_000  # per path and round
    c32_time_s: float = 5.0  # per path and round
    concurrency: int = 32


QUICK = Plan(c1_rounds=1, c1_calls=100, warmup=64, c32_rounds=1, c32_requests=1_000, c32_time_s=2)


# --- the echo upstream: a raw asyncio HTTP/1.1 server ---------------------------------------------


def echo_completion(body: bytes) -> tuple[int, dict[str, Any]]:
    """A chat completion echoing the last message's words, up to ``max_tokens`` of them."""
    try:
        req = json.loads(body)
        content = req["messages"][-1]["content"]
        limit = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        if not isinstance(content, str) or limit < 1:
            raise ValueError("content must be a string and max_tokens positive")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return 400, {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}}
    words = content.split()
    return 200, {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words[:limit])},
                "finish_reason": "length" if len(words) > limit else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": len(words),
            "completion_tokens": min(len(words), limit),
            "total_tokens": len(words) + min(len(words), limit),
        },
    }


class Upstream(asyncio.Protocol):
    """One keep-alive connection: requests with a Content-Length body, answered in order."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():  # one per request
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.reply(431, {"error": {"message": "request head too large"}}, close=True)
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers or not headers.get("content-length", "0").isdigit():
                self.reply(411, {"error": {"message": "send a Content-Length body"}}, close=True)
                return
            length = int(headers.get("content-length", "0"))
            if length > MAX_BODY:
                self.reply(413, {"error": {"message": "body too large"}}, close=True)
                return
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            if method == "POST" and path.endswith("/chat/completions"):
                status, payload = echo_completion(body)
            else:
                status, payload = 404, {"error": {"message": f"no route {method} {path}"}}
            self.reply(status, payload, close=headers.get("connection", "").lower() == "close")

    def reply(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        assert self.transport is not None
        data = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        self.transport.write(head.encode() + data)
        if close:
            self.transport.close()


def upstream_child() -> None:
    """``--upstream-child``: serve on a loopback port, which it prints, until SIGTERM or EOF."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=256)
        serve_lines(stop.set, dict)
        print(server.sockets[0].getsockname()[1], flush=True)
        try:
            await stop.wait()
        finally:
            server.close()

    asyncio.run(serve())


# --- the atoll agents --------------------------------------------------------------------------


def agent_child(
    kind: str, data_dir: Path, broker: str, profile: Path | None, database: str | None = None
) -> None:
    """``--node-child`` / ``--gateway-child``: run the agent until SIGTERM or stdin EOF. The
    gateway (its accounts in ``database`` if given) waits until it sees the echo model, then
    prints ``{"url", "key"}``."""
    from atoll.agent.runtime import AgentRuntime
    from atoll.plugins.gateway.plugin import GatewayPlugin

    configs: dict[str, dict[str, dict[str, Any]]] = {
        "node": {"inference": {"backend": "echo", "echo": {"model": MODEL}}},
        "gateway": {"gateway": {"listen": "127.0.0.1:0"}},
    }
    plugins = configs[kind]
    if database:
        plugins["gateway"]["database"] = database

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        rt = await AgentRuntime.start(data_dir, [broker], plugins, call_timeout=10.0)
        try:
            serve_lines(stop.set, dict)
            if kind == "gateway":
                gateway = running_plugin(rt, "gateway", GatewayPlugin)
                print(json.dumps(await gateway_ready(gateway)), flush=True)
            else:
                print("ready", flush=True)
            await stop.wait()
        finally:
            await rt.stop()

    with profiled(profile):
        eventloop.run(run())  # as ``atoll agent run`` does


async def gateway_ready(plugin: GatewayPlugin) -> dict[str, str]:
    """Wait (bounded) until the gateway routes to the echo model; a user key for the bench."""
    for _ in range(int(CHILD_START_S / 0.02)):
        if MODEL in plugin.gateway.catalog.base_models():
            break
        await asyncio.sleep(0.02)
    else:
        raise RuntimeError(f"the gateway did not see the model {MODEL!r} in {CHILD_START_S}s")
    plugin.accounts.create_user(USER, actor="bench")
    _, key = plugin.accounts.create_key(USER, name="bench", actor="bench")
    plugin.accounts.create_user(BUDGETED, actor="bench")
    _, budget_key = plugin.accounts.create_key(BUDGETED, name="bench", actor="bench")
    plugin.accounts.set_budget("user", BUDGETED, "tokens", "total", BUDGET, actor="bench")
    return {"url": plugin.url, "key": key, "budget_key": budget_key}


async def overspend(url: str, key: str, requests: int) -> dict[str, Any]:
    """``requests`` requests at once (a connection each) by a user whose token budget
    (``BUDGET``) holds a fraction of them: how many were admitted or refused (429), and the
    tokens the admitted ones report spending beyond the budget (target 0)."""
    import httpx

    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(trust_env=False, timeout=60.0, limits=limits) as client:
        replies = await asyncio.gather(
            *(client.post(url, content=BODY, headers=headers(key)) for _ in range(requests))
        )
    admitted = [r for r in replies if r.status_code == 200]
    refused = sum(r.status_code == 429 and "budget" in r.text for r in replies)
    spent = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    return {
        "requests": requests,
        "admitted": len(admitted),
        "refused": refused,
        "other": requests - len(admitted) - refused,
        "budget_tokens": BUDGET,
        "spent_tokens": spent,
        "overspend_tokens": max(0, spent - BUDGET),
    }


# --- LiteLLM -----------------------------------------------------------------------------------


def ensure_litellm(venv: Path) -> Path:
    """The ``litellm`` command of ``venv``, which is created (PyPI ``litellm[proxy]``) if
    missing: LiteLLM's many dependencies stay out of the project's venv."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    log.warning("no LiteLLM at %s: creating that venv (pip install 'litellm[proxy]') ...", venv)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"]
    subprocess.run(pip, check=True, timeout=LITELLM_INSTALL_S)
    if not exe.exists():
        raise RuntimeError(f"pip installed litellm[proxy] but there is no {exe}")
    return exe


def litellm_config(upstream_port: int, master_key: str) -> str:
    """No database (so no spend logs, no budgets), a master key (so it authenticates, as the
    gateway does), one model. JSON is YAML."""
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                        "api_key": "sk-upstream",
                    },
                }
            ],
            "litellm_settings": {"set_verbose": False, "json_logs": False},
            "general_settings": {"master_key": master_key, "disable_spend_logs": True},
        }
    )


@dataclass(frozen=True)
class Proxy:
    url: str
    key: str
    proc: Process

    async def ready(self) -> None:
        await wait_http(f"{self.url}/health/liveliness", self.proc, LITELLM_START_S)


@contextlib.asynccontextmanager
async def litellm_proxy(exe: Path, work: Path, upstream_port: int) -> AsyncIterator[Proxy]:
    """``litellm --config`` on a free loopback port, started (``ready()`` waits for it)."""
    key = f"sk-bench-{secrets.token_hex(8)}"
    cfg = work / "litellm.yaml"
    cfg.write_text(litellm_config(upstream_port, key))
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from GitHub
        "LITELLM_MODE": "PRODUCTION",  # no .env loading
        "DISABLE_ADMIN_UI": "True",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    port = free_port()
    logfile = work / "litellm.log"
    with logfile.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(exe),
            *("--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=work,
            preexec_fn=die_with_parent,
        )
    try:
        yield Proxy(f"http://127.0.0.1:{port}", key, proc)
    finally:
        await stop_process(proc, "litellm")
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        if tail:
            log.info("litellm's last log lines:\n%s", "\n".join(tail))


async def wait_http(url: str, proc: Process, timeout: float) -> None:
    """Until ``url`` answers 200 (bounded), or the server exits."""
    import httpx

    async with asyncio.timeout(timeout), httpx.AsyncClient(trust_env=False, timeout=2) as client:
        while True:  # ends by the timeout above
            if proc.returncode is not None:
                raise RuntimeError(f"{url}: the server exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.25)


def litellm_version(venv: Path) -> str | None:
    found = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


# --- load --------------------------------------------------------------------------------------

Call = Callable[[], Awaitable[int]]  # one request; returns its HTTP status (200: counted)


def headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


class KeepAlive:
    """The load generator's HTTP/1.1 client: one keep-alive connection, a POST written in one
    piece, the reply's status line and Content-Length body read back. A few dozen lines of
    asyncio instead of httpx (~0.5-0.7 ms of CPU per request, measured here): on two cores the
    load generator must not take the CPU the servers under test need (wrk's reason to exist)."""

    def __init__(self, url: str, key: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        head = "".join(f"{k}: {v}\r\n" for k, v in headers(key).items())
        self.request = (
            f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\n{head}"
            f"content-length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> int:
        reader, writer = self.reader, self.writer
        if reader is None or writer is None or reader.at_eof() or writer.is_closing():
            # The first call, or the server closed the idle connection (uvicorn after 5 s).
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.reader, self.writer = reader, writer
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines if ": " in line)
        if "content-length" not in fields:  # chunked or close-delimited: not what we send for
            writer.close()
            raise RuntimeError(f"no Content-Length in the reply ({status_line})")
        await reader.readexactly(int(fields["content-length"]))
        if fields.get("connection") == "close":
            writer.close()
        return int(status_line.split(" ", 2)[1])

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def http_workers(stack: contextlib.AsyncExitStack, n: int, url: str, key: str) -> list[Call]:
    """One call per worker, each on its own keep-alive connection."""
    calls: list[Call] = []
    for _ in range(n):
        client = KeepAlive(url, key)
        stack.push_async_callback(client.aclose)
        calls.append(client.call)
    return calls


def direct_request() -> GenerateRequest:
    from atoll.plugins.inference.contract import GenerateRequest

    return GenerateRequest.model_validate(
        {
            "messages": [{"role": "user", "content": PROMPT}],
            "model": MODEL,
            "params": {"max_new_tokens": MAX_TOKENS},
        }
    )


def direct_call(agent: Agent) -> Call:
    """The gateway's own overlay call (``stream_generate``) to the node, from the harness."""
    from atoll.plugins.inference.contract import stream_generate

    request = direct_request()

    async def call() -> int:
        async for _event in stream_generate(agent, f"{NODE}/inference", request):
            pass  # it returns after the finish event, or raises
        return 200

    return call


async def check_http(url: str, key: str) -> None:
    """One request, its answer checked: every path must really echo the prompt."""
    import httpx

    async with httpx.AsyncClient(trust_env=False, timeout=30.0) as client:
        r = await client.post(url, content=BODY, headers=headers(key))
    if r.status_code != 200:
        raise RuntimeError(f"{url}: status {r.status_code}: {r.text[:300]}")
    text = r.json()["choices"][0]["message"]["content"]
    if text != EXPECTED:
        raise RuntimeError(f"{url} answered {text!r}, not {EXPECTED!r}")


async def check_direct(agent: Agent) -> None:
    from atoll.plugins.inference.contract import stream_generate

    events = stream_generate(agent, f"{NODE}/inference", direct_request())
    text = "".join([e.text async for e in events if e.type == "token"])
    if text != EXPECTED:
        raise RuntimeError(f"the node answered {text!r}, not {EXPECTED!r}")


class Tally:
    """Latencies (ns) of the 200s, a count of everything else (by status or exception), and
    the wall and CPU seconds (per process) of the measured stretches."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.errors: Counter[str] = Counter()
        self.seconds = 0.0
        self.cpu_s: Counter[str] = Counter()

    @contextlib.contextmanager
    def clocked(self, cpu: CpuClock) -> Iterator[None]:
        before = cpu.read()
        t0 = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0
        after = cpu.read()
        self.cpu_s.update({k: after[k] - before[k] for k in after})

    async def timed(self, call: Call) -> None:
        t0 = time.perf_counter_ns()
        try:
            status = await call()
        except Exception as exc:  # a failed request is a figure of the run, not its end
            self.errors[type(exc).__name__] += 1
            return
        if status == 200:
            self.samples.append(time.perf_counter_ns() - t0)
        else:
            self.errors[str(status)] += 1

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        if not s:
            return {"ok": 0, "errors": dict(self.errors), "seconds": round(self.seconds, 3)}
        # processes under 1% of a core meanwhile were idle (heartbeats): left out
        busy = {k: v for k, v in self.cpu_s.items() if v > 0.01 * self.seconds}
        return {
            "p50_ms": round(pct(s, 50) / 1000, 3),
            "p99_ms": round(pct(s, 99) / 1000, 3),
            "rps": round(len(s) / max(self.seconds, 1e-9), 1),
            "mean_ms": round(sum(s) / len(s) / 1e6, 3),
            "ok": len(s),
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 3),
            "cores_busy": {k: round(v / self.seconds, 3) for k, v in busy.items()},
            "cpu_ms_per_request": {k: round(v / len(s) * 1000, 3) for k, v in busy.items()},
        }


def rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names) :] + names[: r % len(names)]


async def sequential(
    paths: dict[str, list[Call]], plan: Plan, cpu: CpuClock
) -> dict[str, dict[str, Any]]:
    """Concurrency 1: ``c1_calls`` back-to-back requests per path and round, the paths in
    rotating order each round."""
    tallies = {name: Tally() for name in paths}
    deadline = time.perf_counter() + plan.c1_time_s
    async with asyncio.timeout(plan.c1_time_s + PHASE_SLACK_S):
        for r in range(plan.c1_rounds):
            for name in rotated(list(paths), r):
                tally, call = tallies[name], paths[name][0]
                with tally.clocked(cpu):
                    for _ in range(plan.c1_calls):
                        await tally.timed(call)
            if time.perf_counter() > deadline:
                log.warning("concurrency 1: time limit reached after %d rounds", r + 1)
                break
    return {name: t.summary() for name, t in tallies.items()}


async def burst(tally: Tally, calls: list[Call], requests: int, limit: float) -> None:
    """``requests`` requests (or ``limit`` seconds' worth) by one worker per call."""
    issued = 0
    deadline = time.perf_counter() + limit

    async def worker(call: Call) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            await tally.timed(call)

    async with asyncio.timeout(limit + PHASE_SLACK_S):
        await asyncio.gather(*(worker(call) for call in calls))


async def parallel(
    paths: dict[str, list[Call]], plan: Plan, cpu: CpuClock
) -> dict[str, dict[str, Any]]:
    """Concurrency ``plan.concurrency`` (one worker per call), in rounds rotating the paths."""
    tallies = {name: Tally() for name in paths}
    for r in range(plan.c32_rounds):
        for name in rotated(list(paths), r):
            with tallies[name].clocked(cpu):
                await burst(tallies[name], paths[name], plan.c32_requests, plan.c32_time_s)
    return {name: t.summary() for name, t in tallies.items()}


async def warm(paths: dict[str, list[Call]], n: int) -> None:
    """First-time paths (imports, caches) and every worker's connection, before anything is
    measured."""
    for name, calls in paths.items():
        tally = Tally()
        await burst(tally, calls, n, 60.0)
        if tally.errors:
            raise RuntimeError(f"{name}: warm-up failed: {dict(tally.errors)}")


# --- the run -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    from atoll.agent.identity import AgentKeys
    from atoll.agent.node import Agent
    from atoll.tenancy.operator import DEFAULT_TENANT, OperatorStore

    plan = QUICK if args.quick else Plan()
    # SIGTERM unwinds like an error: children ended, temp dir removed
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    t_start = time.perf_counter()
    venv = Path(args.litellm_venv).expanduser()
    exe = None if args.skip_litellm else await asyncio.to_thread(ensure_litellm, venv)

    def prof(name: str) -> Path | None:
        return profile_dir / f"{name}.prof" if profile_dir else None

    with tempfile.TemporaryDirectory(prefix="atoll-bench-gateway-") as tmp_s:
        tmp = Path(tmp_s)
        op = OperatorStore(tmp / "operator")
        op.init()
        async with contextlib.AsyncExitStack() as stack:
            pids: dict[str, int] = {}

            async def start(name: str, *flags: str) -> str:
                proc, line = await stack.enter_async_context(
                    script_child(HERE, name, *flags, profile=prof(name), timeout=CHILD_START_S)
                )
                pids[name] = proc.pid
                return line

            async def agent_dir(name: str, role: str) -> str:
                data_dir = tmp / "agents" / name
                AgentKeys.issue(op, DEFAULT_TENANT, name, [role]).save(data_dir)
                return str(data_dir)

            broker = broker_url(await start("broker", "--broker-child", str(op.root)))
            upstream_port = int(await start("upstream", "--upstream-child"))
            proxy = None
            if exe is not None:  # started early: its slow start-up overlaps ours
                proxy = await stack.enter_async_context(litellm_proxy(exe, tmp, upstream_port))
                pids["litellm"] = proxy.proc.pid
            await start(
                "node", "--node-child", await agent_dir(NODE, "inference"), "--broker", broker
            )
            gw = json.loads(
                await start(
                    "gateway",
                    "--gateway-child",
                    await agent_dir(GATEWAY, "gateway"),
                    "--broker",
                    broker,
                )
            )
            gw_pg = None
            if args.postgres:
                gw_pg = json.loads(
                    await start(
                        "gateway_pg",
                        "--gateway-child",
                        await agent_dir(f"{GATEWAY}-pg", "gateway"),
                        "--broker",
                        broker,
                        "--database",
                        args.postgres,
                    )
                )
            direct = Agent(
                AgentKeys.issue(op, DEFAULT_TENANT, "bench", ["gateway"]), [broker], call_timeout=10
            )
            stack.push_async_callback(direct.stop)
            await direct.start(wait=10.0)
            await check_direct(direct)

            n = plan.concurrency
            urls = {
                "gateway": (gw["url"] + CHAT_PATH, gw["key"]),
                "upstream": (f"http://127.0.0.1:{upstream_port}{CHAT_PATH}", "none"),
            }
            if gw_pg is not None:
                urls["gateway_pg"] = (gw_pg["url"] + CHAT_PATH, gw_pg["key"])
            if proxy is not None:
                await proxy.ready()
                urls["litellm"] = (proxy.url + CHAT_PATH, proxy.key)
            paths = {"direct": [direct_call(direct)] * n}
            for name, (url, key) in urls.items():
                await check_http(url, key)
                paths[name] = await http_workers(stack, n, url, key)
            cpu = CpuClock(pids)
            log.info("warm-up ...")
            await warm(paths, plan.warmup)
            with profiled(prof("harness")):
                log.info("concurrency 1: %s ...", ", ".join(paths))
                c1 = await sequential(paths, plan, cpu)
                log.info("concurrency %d ...", plan.concurrency)
                cn = await parallel(paths, plan, cpu)
            log.info("%d requests at once against a budget ...", BUDGET_REQUESTS)
            budgets = {
                name: await overspend(g["url"] + CHAT_PATH, g["budget_key"], BUDGET_REQUESTS)
                for name, g in (("gateway", gw), ("gateway_pg", gw_pg))
                if g is not None
            }
    return report(plan, venv, c1, cn, budgets, time.perf_counter() - t_start)


def report(
    plan: Plan,
    venv: Path,
    c1: dict[str, dict[str, Any]],
    cn: dict[str, dict[str, Any]],
    budgets: dict[str, dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    key = f"c{plan.concurrency}"
    runs = {name: {"c1": c1[name], key: cn[name]} for name in c1}
    gw, direct = runs["gateway"], runs["direct"]
    added_p50 = round(gw["c1"]["p50_ms"] - direct["c1"]["p50_ms"], 3)
    added_p99 = round(gw["c1"]["p99_ms"] - direct["c1"]["p99_ms"], 3)
    vs = vs_cpu = None
    cpu = serving_cpu(gw[key], ("gateway", "broker", "node"))
    if "litellm" in runs:
        vs = round(gw[key]["rps"] / max(runs["litellm"][key].get("rps", 0), 1e-9), 2)
        ll_cpu = serving_cpu(runs["litellm"][key], ("litellm", "upstream"))
        vs_cpu = round(ll_cpu / max(cpu, 1e-9), 2)
    pg = runs.get("gateway_pg")
    pg_vs = None if pg is None else round(pg[key]["rps"] / max(gw[key]["rps"], 1e-9), 2)
    pg_vs_litellm = None
    if pg is not None and "litellm" in runs:
        pg_vs_litellm = round(pg[key]["rps"] / max(runs["litellm"][key].get("rps", 0), 1e-9), 2)
    return {
        "bench": "gateway",
        "gateway": gw,
        "direct": direct,
        "litellm": runs.get("litellm", {"skipped": "--skip-litellm"}),
        "upstream": runs["upstream"],
        "gateway_pg": runs.get("gateway_pg", {"skipped": "no --postgres"}),
        "pg_vs_sqlite_rps": pg_vs,
        "pg_vs_litellm_rps": pg_vs_litellm,
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "vs_litellm_rps": vs,
        "litellm_c1_p50_ms": runs["litellm"]["c1"]["p50_ms"] if "litellm" in runs else None,
        # CPU per request of the serving processes, less sensitive than requests/s to a small
        # machine shared with the load generator: LiteLLM + upstream over gateway + broker + node
        "vs_litellm_cpu": vs_cpu,
        "budget_overspend": budgets,
        "targets": {
            "budget_overspend.*.overspend_tokens==0": all(
                b["overspend_tokens"] == 0 and b["admitted"] > 0 for b in budgets.values()
            ),
            f"vs_litellm_rps>=10 (c{plan.concurrency})": None if vs is None else vs >= 10,
            "added_p50_ms<=2 (c1)": added_p50 <= 2.0,
            f"pg_vs_sqlite_rps>=0.7 (c{plan.concurrency})": None if pg_vs is None else pg_vs >= 0.7,
            f"pg_vs_litellm_rps>=10 (c{plan.concurrency})": (
                None if pg_vs_litellm is None else pg_vs_litellm >= 10
            ),
        },
        "detail": {
            "plan": asdict(plan),
            "request": json.loads(BODY),
            "notes": {
                "gateway": "HTTP -> uvicorn/FastAPI gateway (key check, limits, routing, "
                "ledger row) -> broker -> echo inference agent, all sealed end to end",
                "gateway_pg": "the same, by a second gateway whose accounts are in PostgreSQL "
                "(--postgres)",
                "direct": "stream_generate from an agent with role gateway in the harness: "
                "the same overlay hop with no HTTP and no gateway",
                "upstream": "HTTP -> the bench's raw asyncio echo server: the HTTP client's "
                "own cost, and the upstream's ceiling under LiteLLM",
                "litellm": "HTTP -> LiteLLM proxy (master key, no database) -> echo upstream",
                "added_ms": "gateway minus direct at concurrency 1; includes the HTTP client",
                "cores_busy": "CPU seconds per wall second of each process during that path's "
                "runs (1.0 = a core saturated); the harness holds the load generator and the "
                "direct agent",
                "cpu_ms_per_request": "the same CPU seconds per answered request",
            },
        },
        "env": environment(venv if "litellm" in runs else None),
        "bench_s": round(seconds, 2),
    }


def serving_cpu(run: dict[str, Any], processes: tuple[str, ...]) -> float:
    per = run.get("cpu_ms_per_request", {})
    return round(sum(per.get(p, 0.0) for p in processes), 3)


def environment(venv: Path | None) -> dict[str, Any]:
    from importlib.util import find_spec

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        # the gateway's uvicorn runs in its agent's asyncio loop; it parses HTTP with httptools
        # when installed, else with the pure-Python h11
        "gateway_http_parser": "httptools" if find_spec("httptools") else "h11",
        **{name: pkg_version(name) for name in ("httpx", "uvicorn", "fastapi", "pydantic")},
        "litellm": litellm_version(venv) if venv else None,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    p.add_argument("--skip-litellm", action="store_true", help="no LiteLLM anchor")
    p.add_argument(
        "--litellm-venv",
        default="~/.cache/atoll/litellm-venv",
        help="venv holding litellm[proxy] (created if missing)",
    )
    p.add_argument("--postgres", help="also a gateway on this (empty) PostgreSQL database")
    p.add_argument("--profile-dir", help="write cProfile stats of harness, broker, node, gateway")
    # internal: the children
    p.add_argument("--broker-child", help=argparse.SUPPRESS)
    p.add_argument("--node-child", help=argparse.SUPPRESS)
    p.add_argument("--gateway-child", help=argparse.SUPPRESS)
    p.add_argument("--upstream-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--broker", help=argparse.SUPPRESS)
    p.add_argument("--database", help=argparse.SUPPRESS)
    p.add_argument("--child-profile", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    setup_logging(("atoll", "websockets", "asyncio", "httpx", "uvicorn"))
    tune_process()  # as the atoll command does in every process it starts
    child_prof = Path(args.child_profile) if args.child_profile else None
    if args.broker_child:
        broker_child(Path(args.broker_child), child_prof)
    elif args.node_child:
        agent_child("node", Path(args.node_child), args.broker, child_prof)
    elif args.gateway_child:
        agent_child("gateway", Path(args.gateway_child), args.broker, child_prof, args.database)
    elif args.upstream_child:
        upstream_child()
    else:
        run_main(main, args, idle_spin_us=0)  # a load generator: no agent of its own
