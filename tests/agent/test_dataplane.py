"""The data plane: file transfers (large, resumed across a broker restart, verified, never
visible half-written, allow-listed) and TCP tunnels (HTTP through the overlay, 50 concurrent
connections, a large download, refused destinations)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import threading
import urllib.request
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden
from atoll.agent.files import get_file, put_file
from atoll.agent.transfer import STAGING, TransferFailed
from atoll.agent.tunnel import TunnelListener
from atoll.broker.server import BrokerServer
from atoll.protocol.frames import Frame, FrameType
from support.overlay import eventually, intercept


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 4 << 20))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != STAGING)


async def test_large_file_both_ways_and_allow_list(tmp_path, make_agent) -> None:
    store = tmp_path / "store"
    a = await make_agent("alpha", roles=("operator",))  # files serve operators
    b = await make_agent("beta", plugins={"files": {"dirs": [str(store)]}})
    src = tmp_path / "big.bin"
    digest = random_file(src, 200 * 1024 * 1024)
    seen: list[int] = []
    sent = await put_file(
        a.agent, "beta", src, str(store / "big.bin"), progress=lambda done, total: seen.append(done)
    )
    assert sent == src.stat().st_size and seen[-1] == sent
    assert hashlib.sha256((store / "big.bin").read_bytes()).hexdigest() == digest
    back = tmp_path / "back.bin"
    await get_file(a.agent, "beta", "big.bin", back)  # relative to the first allowed dir
    assert back.stat().st_size == src.stat().st_size
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    # Finished transfers leave no stream behind on either side.
    await eventually(lambda: not a.agent.streams.streams and not b.agent.streams.streams)
    with pytest.raises(Forbidden, match="outside this agent's file allow-list"):
        await put_file(a.agent, "beta", src, "/etc/evil.bin")
    with pytest.raises(Forbidden):
        await get_file(a.agent, "beta", str(store / ".." / "big.bin"), tmp_path / "x")
    with pytest.raises(TransferFailed, match="no file"):
        await get_file(a.agent, "beta", "missing.bin", tmp_path / "y")


async def test_transfer_resumes_across_broker_restart(operator, tmp_path, make_agent) -> None:
    server = BrokerServer.from_data_dir(operator.root)
    await server.start()
    port = server.port
    store = tmp_path / "store"
    a = await make_agent("alpha", roles=("operator",), brokers=[server.url])
    await make_agent("beta", brokers=[server.url], plugins={"files": {"dirs": [str(store)]}})
    src = tmp_path / "data.bin"
    size = 200 * 1024 * 1024
    digest = random_file(src, size)
    restarted = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= total // 3 and not restarted.is_set():
            restarted.set()

    transfer = asyncio.create_task(
        put_file(a.agent, "beta", src, str(store / "data.bin"), progress=progress)
    )
    await restarted.wait()
    await server.stop()
    server.state.close()
    assert visible(store) == []  # mid-transfer: nothing visible
    server = BrokerServer.from_data_dir(operator.root)
    await server.start("127.0.0.1", port)
    try:
        sent = await asyncio.wait_for(transfer, 60)
        assert hashlib.sha256((store / "data.bin").read_bytes()).hexdigest() == digest
        assert sent < 1.5 * size  # resumed from where the receiver stood, not from zero
        assert not list((store / STAGING).glob("*.part"))
    finally:
        await server.stop()


async def test_tampered_chunk_is_refused_and_resent(broker, tmp_path, make_agent) -> None:
    store = tmp_path / "store"
    a = await make_agent("alpha", roles=("operator",))  # files serve operators
    await make_agent("beta", plugins={"files": {"dirs": [str(store)]}})
    src = tmp_path / "f.bin"
    digest = random_file(src, 8 * 1024 * 1024)
    count = {"n": 0}

    def tamper(session, frame: Frame) -> Frame | None:
        if frame.type is FrameType.MSG and frame.header["dst"] == "beta/files":
            count["n"] += 1
            if count["n"] == 10:
                payload = bytearray(frame.payload)
                payload[-5] ^= 0x40
                return Frame(frame.type, frame.header, bytes(payload))
        return None

    intercept(broker, tamper)
    await put_file(a.agent, "beta", src, str(store / "f.bin"))
    assert hashlib.sha256((store / "f.bin").read_bytes()).hexdigest() == digest


async def test_interrupted_transfer_leaves_nothing_visible(tmp_path, make_agent) -> None:
    store = tmp_path / "store"
    a = await make_agent("alpha", roles=("operator",))  # files serve operators
    await make_agent("beta", plugins={"files": {"dirs": [str(store)]}})
    src = tmp_path / "f.bin"
    random_file(src, 32 * 1024 * 1024)
    half = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done > total // 2:
            half.set()

    task = asyncio.create_task(put_file(a.agent, "beta", src, str(store / "f.bin"), progress))
    await half.wait()
    task.cancel()  # the sender gives up
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    assert visible(store) == []
    # A file whose bytes do not match the sender's checksum never appears either.
    stream = await a.agent.streams.open(
        "beta/files", "put", {"path": str(store / "bad.bin"), "size": 4, "version": "v1"}
    )
    assert await stream.read_exactly(14) == b'{"offset": 0}\n'
    await stream.write(b"abcd" + b'{"sha256": "' + b"0" * 64 + b'"}\n')
    with pytest.raises(TransferFailed, match="checksum mismatch"):
        while await stream.read():
            pass
    assert visible(store) == []


class _Handler(http.server.BaseHTTPRequestHandler):
    big = os.urandom(20 * 1024 * 1024)

    def do_GET(self) -> None:
        body = self.big if self.path == "/big" else f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


async def test_tunnel_http_concurrency_download_and_refusal(make_agent) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    web_port = httpd.server_address[1]
    try:
        gateway = await make_agent("gateway", roles=("inference",))  # as a LoRAX node
        await make_agent("gpu", plugins={"tunnel": {"allow": [f"127.0.0.1:{web_port}"]}})
        listener = await TunnelListener(gateway.agent, "gpu", "127.0.0.1", web_port).start(
            "127.0.0.1", 0
        )
        host, port = listener.address

        def fetch(path: str) -> bytes:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as r:
                return r.read()

        bodies = await asyncio.gather(*(asyncio.to_thread(fetch, f"/{i}") for i in range(50)))
        assert bodies == [f"hello /{i}".encode() for i in range(50)]
        assert await asyncio.to_thread(fetch, "/big") == _Handler.big
        await listener.stop()

        # The GPU agent refuses what its allow-list does not name, and says so.
        denied = await TunnelListener(gateway.agent, "gpu", "127.0.0.1", 22).start("127.0.0.1", 0)
        h2, p2 = denied.address
        reader, writer = await asyncio.open_connection(h2, p2)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
        writer.close()
        await eventually(lambda: bool(denied.errors))
        assert "not in agent gpu's tunnel allow-list" in denied.errors[-1]
        stream = await gateway.agent.streams.open(
            "gpu/tunnel", "tcp", {"host": "10.0.0.1", "port": 5432}
        )
        with pytest.raises(Forbidden, match=r"10\.0\.0\.1:5432"):
            await stream.read()
        await denied.stop()
    finally:
        httpd.shutdown()
