"""The `atoll` command end to end, as separate processes on loopback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from atoll.agent.config import load_config
from support.net import ATOLL_CLI, free_port


def atoll(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([*ATOLL_CLI, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"atoll {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*ATOLL_CLI, *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_text(path: Path, text: str, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text()}")


def start_broker(op: str, tmp_path: Path, procs: list[subprocess.Popen]) -> str:
    """`atoll broker` on a free loopback port (no mDNS); returns its URL once it listens."""
    port = free_port()
    procs.append(
        spawn(
            "broker",
            "-d",
            op,
            "--listen",
            f"127.0.0.1:{port}",
            "--no-advertise",
            log=tmp_path / "b",
        )
    )
    wait_for_text(tmp_path / "b", "listening on")
    return f"ws://127.0.0.1:{port}"


@pytest.fixture
def procs():
    running: list[subprocess.Popen] = []
    yield running
    for p in running:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_operator_join_run_call_revoke(tmp_path: Path, procs) -> None:
    op = str(tmp_path / "op")
    assert "initialised" in atoll("init", "-d", op).stdout
    assert "already initialised" in atoll("init", "-d", op).stdout
    atoll("tenant", "create", "acme", "-d", op)
    dup = atoll("tenant", "create", "acme", "-d", op, check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert atoll("tenant", "list", "-d", op).stdout.split() == ["acme", "default"]
    assert (tmp_path / "op" / "operator.key").stat().st_mode & 0o777 == 0o600

    url = start_broker(op, tmp_path, procs)

    token = atoll(
        "token", "create", "-d", op, "--tenant", "acme", "--role", "inference", "--ttl", "10m"
    ).stdout.strip()
    agent_dir = tmp_path / "gpu1"
    joined = atoll("agent", "join", url, "--token", token, "--name", "gpu-1", "-d", str(agent_dir))
    assert "joined tenant acme as gpu-1 (inference)" in joined.stdout
    reused = atoll(
        "agent",
        "join",
        url,
        "--token",
        token,
        "--name",
        "gpu-2",
        "-d",
        str(tmp_path / "gpu2"),
        check=False,
    )
    assert reused.returncode == 1 and "enrollment token already used" in reused.stderr
    assert not (tmp_path / "gpu2" / "identity.msgpack").exists()
    bad = atoll(
        "agent",
        "join",
        url,
        "--token",
        "atoll1.garbage",
        "--name",
        "x",
        "-d",
        str(tmp_path / "x"),
        check=False,
    )
    assert bad.returncode == 1 and "token refused" in bad.stderr

    agent = spawn("agent", "run", "--config", str(agent_dir / "agent.toml"), log=tmp_path / "a")
    procs.append(agent)
    wait_for_text(tmp_path / "a", "connected to")
    info = atoll("call", "gpu-1", "info", "-d", op, "--tenant", "acme", "--broker", url)
    assert '"name": "gpu-1"' in info.stdout and '"inference"' in info.stdout
    other = atoll("call", "gpu-1", "ping", "-d", op, "--broker", url, check=False)
    assert other.returncode == 1 and "no agent 'gpu-1' in tenant 'default'" in other.stderr

    atoll("agent", "revoke", "gpu-1", "-d", op, "--tenant", "acme", "--broker", url)
    assert agent.wait(15) == 1  # the agent exits, saying why
    assert "revoked" in (tmp_path / "a").read_text()


def test_up_starts_island_and_stops_on_ctrl_c(tmp_path: Path, procs) -> None:
    port, gw_port = free_port(), free_port()
    data = tmp_path / "island"
    up = spawn(
        "up",
        "-d",
        str(data),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-interval",
        "1",
        "--inference",
        "echo",  # the embedded model's own test is marked `embedded`
        "--gateway",
        f"127.0.0.1:{gw_port}",
        log=tmp_path / "up",
    )
    procs.append(up)
    text = wait_for_text(tmp_path / "up", "Ctrl-C to stop")
    assert f"ws://127.0.0.1:{port}" in text and "initialised" in text
    assert "plugin   inference: running echo" in text
    assert f"web UI   http://127.0.0.1:{gw_port}/ui/" in text
    # The first run shows the admin key once; it opens the UI's session and the admin API.
    shown = re.search(r"admin    API key (atk_\S+)", text)
    assert shown, text
    session = httpx.get(
        f"http://127.0.0.1:{gw_port}/ui/session",
        headers={"Authorization": f"Bearer {shown[1]}"},
        timeout=10,
    ).json()
    assert session["user"] == "admin" and session["admin"] is True
    url = f"ws://127.0.0.1:{port}"
    pong = atoll("call", "island", "ping", "-d", str(data), "--broker", url)
    assert '"pong": true' in pong.stdout
    listed = json.loads(atoll("agents", "--json", "-d", str(data), "--broker", url).stdout)
    assert [(a["name"], a["status"]) for a in listed] == [("island", "ACTIVE")]
    assert listed[0]["plugins"] == ["system", "storage", "gateway", "training", "inference"]
    assert listed[0]["age_s"] < 5
    # Gateway administration from the CLI, then the key at the OpenAI-compatible API.
    admin = ["-d", str(data), "--broker", url]
    atoll("users", "create", "alice", *admin)
    idp = ["--issuer", "https://idp.example", "--subject", "s-42"]
    atoll("users", "link", "alice", *idp, *admin)
    linked = json.loads(atoll("users", "identities", "--user", "alice", *admin).stdout)
    assert [(i["user"], i["subject"]) for i in linked] == [("alice", "s-42")]
    atoll("users", "unlink", *idp, *admin)
    gone = atoll("users", "unlink", *idp, *admin, check=False)
    assert gone.returncode == 1 and "no identity" in gone.stderr
    key = atoll("keys", "create", "alice", "--name", "laptop", *admin).stdout.strip()
    assert key.startswith("atk_")
    listed_keys = json.loads(atoll("keys", "list", "--user", "alice", *admin).stdout)
    assert [k["name"] for k in listed_keys] == ["laptop"] and key not in json.dumps(listed_keys)
    chat = httpx.post(
        f"http://127.0.0.1:{gw_port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "echo", "messages": [{"role": "user", "content": "hi from the cli"}]},
        timeout=10,
    )
    assert chat.json()["choices"][0]["message"]["content"] == "hi from the cli"
    atoll("keys", "revoke", listed_keys[0]["key_id"], *admin)
    refused = httpx.get(
        f"http://127.0.0.1:{gw_port}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    assert refused.status_code == 401
    missing = atoll("keys", "create", "nobody", *admin, check=False)
    assert missing.returncode == 1 and "nobody" in missing.stderr
    # Datasets and training jobs from the CLI.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "a"}\n')
    bad_rows = atoll("datasets", "upload", str(rows), "--owner", "alice", *admin, check=False)
    assert bad_rows.returncode == 1 and "line 2" in bad_rows.stderr
    rows.write_text('{"instruction": "hi", "output": "hello"}\n')
    record = json.loads(atoll("datasets", "upload", str(rows), "--owner", "alice", *admin).stdout)
    assert record["rows"] == 1 and record["format"] == "alpaca" and record["version"] == 1
    assert record["id"] in atoll("datasets", "list", *admin).stdout
    job_id = atoll(
        "train",
        "submit",
        "--owner",
        "alice",
        "--model",
        "no-such-model",
        "--dataset",
        record["id"],
        "--option",
        "lora_rank=4",
        *admin,
    ).stdout.strip()
    assert job_id.startswith("ftjob-")
    deadline = time.monotonic() + 60
    while (state := json.loads(atoll("train", "status", job_id, *admin).stdout)["state"]) not in (
        "failed",
        "completed",
    ):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state == "failed"  # the trainer cannot find that model: failed with the reason
    logs = atoll("train", "logs", job_id, *admin)
    assert "no-such-model" in logs.stdout and f"{job_id}: failed" in logs.stdout
    atoll("datasets", "delete", record["id"], *admin)
    assert record["id"] not in atoll("datasets", "list", *admin).stdout
    request = json.dumps({"prompt": "hello island", "params": {"max_new_tokens": 4}})
    reply = atoll(
        "call",
        "island/inference",
        "generate",
        "--params",
        request,
        "-d",
        str(data),
        "--broker",
        url,
    )
    assert json.loads(reply.stdout)["text"] == "hello island"
    time.sleep(1.2)  # one metrics interval
    feeds = json.loads(atoll("metrics", "-d", str(data), "--broker", url).stdout)
    assert feeds["island"]["system"]["memory"]["total_bytes"] > 0
    prom = atoll("metrics", "--prometheus", "-d", str(data), "--broker", url).stdout
    assert 'atoll_memory_total_bytes{agent="island"}' in prom
    frame = atoll("top", "--once", "--sort", "cpu", "-d", str(data), "--broker", url).stdout
    assert "island" in frame and "ACTIVE" in frame
    bad = atoll("top", "--once", "--sort", "ram", "-d", str(data), "--broker", url, check=False)
    assert bad.returncode == 1 and "unknown sort key 'ram'" in bad.stderr
    live = spawn("top", "--refresh", "0.2", "-d", str(data), "--broker", url, log=tmp_path / "top")
    procs.append(live)
    time.sleep(1.5)  # a few refreshes (on a terminal they redraw in place)
    live.send_signal(signal.SIGINT)
    assert live.wait(10) == 0
    assert "island" in (tmp_path / "top").read_text()  # piped: the last frame, at exit
    up.send_signal(signal.SIGINT)
    assert up.wait(15) == 0
    assert "stopped" in (tmp_path / "up").read_text()
    # A second run reuses the data dir (no re-initialisation).
    again = spawn(
        "up",
        "-d",
        str(data),
        "--listen",
        f"127.0.0.1:{port}",
        "--no-advertise",
        "--inference",
        "none",
        "--gateway",
        f"127.0.0.1:{free_port()}",
        log=tmp_path / "up2",
    )
    procs.append(again)
    second = wait_for_text(tmp_path / "up2", "Ctrl-C to stop")
    assert "initialised" not in second
    assert shown[1] not in second and "admin    API key in" in second  # shown once only


def test_config_env_overrides_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nname = "gpu-1"\ndata_dir = "d"\nbrokers = ["ws://a:1"]\n[plugins.system]\n'
    )
    env = {
        "ATOLL_AGENT__BROKERS": '["ws://b:2", "wss://c:3"]',
        "ATOLL_PLUGINS__INFERENCE__BACKEND": "echo",
    }
    loaded = load_config(cfg, env)
    assert loaded.agent.brokers == ["ws://b:2", "wss://c:3"]
    with pytest.raises(ValueError, match="labels are signed into the agent's credential"):
        load_config(cfg, {"ATOLL_AGENT__LABELS__PHI": "true"})
    assert loaded.agent.data_dir == (tmp_path / "d").resolve()
    assert loaded.plugins["inference"] == {"backend": "echo"}
    with pytest.raises(ValueError, match="must start with ws://"):
        load_config(cfg, {"ATOLL_AGENT__BROKERS": '["http://x"]'})
    cfg.write_text('[agent]\nname = "Bad Name"\ndata_dir = "d"\nbrokers = ["ws://a:1"]\n')
    with pytest.raises(ValueError, match="invalid agent name"):
        load_config(cfg, {})
    bad = atoll("agent", "run", "--config", str(cfg), check=False)
    assert bad.returncode == 1 and "invalid agent name" in bad.stderr
    assert os.environ.get("ATOLL_AGENT__BROKERS") is None


def test_agent_with_its_own_broker(tmp_path: Path, procs) -> None:
    """An island whose agent also runs a broker ([broker] in its config), issued by the operator."""
    op = str(tmp_path / "op")
    atoll("init", "-d", op)
    island = tmp_path / "island"
    atoll("broker", "issue", "-d", op, "--name", "lab-broker", "--out", str(island))
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    token = atoll("token", "create", "-d", op, "--role", "agent").stdout.strip()
    # The island's identity comes from a token redeemed at its own broker once it is up: first
    # run a plain broker from the issued dir to redeem, then the agent with the broker inside.
    broker = spawn(
        "broker",
        "-d",
        str(island),
        "--listen",
        f"127.0.0.1:{port}",
        "--no-advertise",
        log=tmp_path / "b",
    )
    procs.append(broker)
    assert "lab-broker" in wait_for_text(tmp_path / "b", "listening on")
    atoll("agent", "join", url, "--token", token, "--name", "lab", "-d", str(island))
    broker.terminate()
    broker.wait(10)
    (island / "agent.toml").write_text(  # join wrote a plain config; add the broker section
        f'[agent]\nname = "lab"\ndata_dir = "."\nbrokers = ["{url}"]\n'
        f'[broker]\nlisten = "127.0.0.1:{port}"\nadvertise = false\n'
    )
    agent = spawn("agent", "run", "--config", str(island / "agent.toml"), log=tmp_path / "a")
    procs.append(agent)
    text = wait_for_text(tmp_path / "a", "connected to")
    assert "broker lab-broker listening on" in text
    pong = atoll("call", "lab", "ping", "-d", op, "--broker", url)
    assert '"pong": true' in pong.stdout


def test_join_discovers_a_broker_over_mdns(tmp_path: Path, procs) -> None:
    op = str(tmp_path / "op")
    atoll("init", "-d", op)
    port = free_port()
    procs.append(spawn("broker", "-d", op, "--listen", f"127.0.0.1:{port}", log=tmp_path / "b"))
    wait_for_text(tmp_path / "b", "listening on")
    token = atoll("token", "create", "-d", op).stdout.strip()
    joined = atoll(
        "agent",
        "join",
        "--discover",
        "--mdns-interface",
        "127.0.0.1",
        "--token",
        token,
        "--name",
        "found",
        "-d",
        str(tmp_path / "found"),
    )
    assert f"found broker ws://127.0.0.1:{port}" in joined.stdout
    assert f'"ws://127.0.0.1:{port}"' in (tmp_path / "found" / "agent.toml").read_text()
    both = atoll(
        "agent", "join", "ws://x:1", "--discover", "--token", token, "--name", "x", check=False
    )
    assert both.returncode == 1 and "not both" in both.stderr


def test_cp_and_tunnel_commands(tmp_path: Path, procs) -> None:
    op = str(tmp_path / "op")
    atoll("init", "-d", op)
    url = start_broker(op, tmp_path, procs)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    web = httpd.server_address[1]
    token = atoll("token", "create", "-d", op, "--role", "storage").stdout.strip()
    node = tmp_path / "node"
    atoll("agent", "join", url, "--token", token, "--name", "node", "-d", str(node))
    store = tmp_path / "store"
    with (node / "agent.toml").open("a") as fh:
        fh.write(
            f'\n[plugins.files]\ndirs = ["{store}"]\n'
            f'\n[plugins.tunnel]\nallow = ["127.0.0.1:{web}"]\n'
        )
    procs.append(spawn("agent", "run", "--config", str(node / "agent.toml"), log=tmp_path / "a"))
    wait_for_text(tmp_path / "a", "connected to")
    try:
        src = tmp_path / "model.bin"
        src.write_bytes(os.urandom(3_000_000))
        common = ["-d", op, "--broker", url]
        up = atoll("cp", str(src), "node:model.bin", *common)
        assert "3000000 bytes transferred, sha256 verified" in up.stdout
        assert (store / "model.bin").read_bytes() == src.read_bytes()
        down = tmp_path / "copy.bin"
        atoll("cp", "node:model.bin", str(down), *common)
        assert (
            hashlib.sha256(down.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
        )
        refused = atoll("cp", str(src), "node:/etc/x", *common, check=False)
        assert refused.returncode == 1 and "outside this agent's file allow-list" in refused.stderr
        both = atoll("cp", "a.bin", "b.bin", *common, check=False)
        assert both.returncode == 1 and "exactly one side" in both.stderr

        tport = free_port()
        procs.append(
            spawn(
                "tunnel",
                "--listen",
                f"127.0.0.1:{tport}",
                "--to",
                f"node:127.0.0.1:{web}",
                *common,
                log=tmp_path / "t",
            )
        )
        wait_for_text(tmp_path / "t", "Ctrl-C stops")
        (tmp_path / "hello.txt").write_text("through the overlay")
        page = urllib.request.urlopen(f"http://127.0.0.1:{tport}/hello.txt", timeout=10).read()
        assert page == b"through the overlay"
    finally:
        httpd.shutdown()


def test_agent_run_reports_a_misconfigured_plugin(tmp_path: Path, procs) -> None:
    op = str(tmp_path / "op")
    atoll("init", "-d", op)
    url = start_broker(op, tmp_path, procs)
    token = atoll("token", "create", "-d", op).stdout.strip()
    node = tmp_path / "node"
    atoll("agent", "join", url, "--token", token, "--name", "node", "-d", str(node))
    with (node / "agent.toml").open("a") as fh:
        fh.write('\n[plugins.files]\ndirs = "oops"\n')
    procs.append(spawn("agent", "run", "--config", str(node / "agent.toml"), log=tmp_path / "a"))
    text = wait_for_text(tmp_path / "a", "did not start")
    assert "plugin files did not start" in text and "dirs" in text
    assert '"pong": true' in atoll("call", "node", "ping", "-d", op, "--broker", url).stdout


def test_process_tuning_collects_the_young_generation_less_often() -> None:
    import gc

    from atoll.tuning import GC_GEN0_THRESHOLD, tune_process

    before = gc.get_threshold()
    try:
        tune_process()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_agent_issue_refuses_bad_names_roles_and_tenants(tmp_path: Path) -> None:
    op = str(tmp_path / "op")
    atoll("init", "-d", op)
    made = atoll("agent", "issue", "-d", op, "--name", "gw-1", "--role", "gateway", "--out",
                 str(tmp_path / "gw-1"))  # fmt: skip
    assert "agent identity for gw-1" in made.stdout
    assert (tmp_path / "gw-1" / "agent.key").stat().st_mode & 0o077 == 0  # private: 0600
    for args, reason in (
        (["--name", "Bad Name"], "invalid agent name"),
        (["--name", "x", "--role", "wizard"], "unknown roles ['wizard']"),
        (["--name", "x", "--tenant", "nope"], "no tenant 'nope'"),
    ):
        bad = atoll("agent", "issue", "-d", op, *args, "--out", str(tmp_path / "x"), check=False)
        assert bad.returncode == 1 and reason in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()
