"""Router benchmark: what a broker's per-frame work costs when a tenant is large.

The broker's sans-I/O ``Router`` driven in-process by sessions that only record (no sockets), so
the figures are the routing work alone:

* ``sub_kept``: a SUB to one subject while the tenant keeps ``--agents`` agents' announcement and
  metrics (each subscriber is sent what is kept on the subjects it matches: a lookup, not a scan).
* ``pub_after_change``: the first publication on a subject after an unrelated subscription
  change, with ``--patterns`` subscriptions in the tenant (a change invalidates only the cached
  subjects its pattern matches).
* ``pub_cached``, the anchor: a publication whose subscriber list is cached.
* ``expire``: a sweep of kept state with every agent gone past the TTL.

Prints ONE JSON object on stdout; ratios are against ``pub_cached`` of the same run.

    .venv/bin/python bench/router.py [--agents N] [--patterns N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from nacl.signing import SigningKey

from atoll.bench.harness import setup_logging
from atoll.broker.router import Router
from atoll.broker.state import BrokerState
from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame
from atoll.protocol.trust import AgentIdentity, verify_agent
from atoll.tenancy.operator import OperatorStore


class Recorder:
    """A connected agent as the router sees it, counting what it is sent."""

    def __init__(self, sid: int, ident: AgentIdentity) -> None:
        self.id = sid
        self.ident = ident
        self.subs: dict[int, str] = {}
        self.received = 0

    def send(self, data: bytes) -> None:
        self.received += 1

    def close(self, code: str, reason: str) -> None:
        pass


def frame(ftype: FrameType, header: dict[str, object], payload: bytes = b"") -> Frame:
    (f,) = decode_message(encode_frame(ftype, header, payload))
    return f


def median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def run(agents: int, patterns: int, rounds: int) -> dict[str, object]:
    op = OperatorStore(Path(tempfile.mkdtemp()) / "op")
    op.init()
    op.create_tenant("acme")
    router = Router(BrokerState(None, op.operator_pub))

    def connect(n: int, name: str, roles: list[str]) -> Recorder:
        pub = SigningKey.generate().verify_key.encode()
        ident = verify_agent(op.agent_credential("acme", pub, name, roles), op.operator_pub)
        s = Recorder(n, ident)
        router.attach(s)
        return s

    started = time.perf_counter()
    members = [connect(i, f"a{i}", ["agent"]) for i in range(agents)]
    for s in members:
        name = s.ident.name
        router.handle(
            s,
            frame(
                FrameType.PUB,
                {"id": 1, "subj": f"discovery.announce.{name}", "kid": 1, "keep": True},
                b"x" * 400,
            ),
        )
        router.handle(
            s,
            frame(
                FrameType.PUB,
                {"id": 2, "subj": f"metrics.{name}", "kid": 1, "keep": True},
                b"y" * 600,
            ),
        )
    setup_s = time.perf_counter() - started

    admin = connect(agents + 1, "watcher", ["admin"])
    sub_kept: list[float] = []
    for r in range(rounds):
        subject = f"metrics.a{r % agents}"
        t = time.perf_counter()
        router.handle(admin, frame(FrameType.SUB, {"sid": r + 1, "subj": subject}))
        sub_kept.append(time.perf_counter() - t)
        router.handle(admin, frame(FrameType.UNSUB, {"sid": r + 1}))

    # Subscriptions: each member watches its own metrics; the watcher every agent's.
    for s in members[:patterns]:
        router.handle(s, frame(FrameType.SUB, {"sid": 1, "subj": f"metrics.{s.ident.name}"}))
    router.handle(admin, frame(FrameType.SUB, {"sid": 10**6, "subj": "metrics.*"}))
    publisher = members[0]
    pub = frame(FrameType.PUB, {"id": 3, "subj": "metrics.a0", "kid": 1}, b"z" * 200)
    cached: list[float] = []
    after_change: list[float] = []
    for r in range(rounds):
        router.handle(publisher, pub)  # the subject's match is cached now
        t = time.perf_counter()
        router.handle(publisher, pub)
        cached.append(time.perf_counter() - t)
        other = members[1 + r % (len(members) - 1)]  # a change elsewhere in the tenant
        router.handle(other, frame(FrameType.UNSUB, {"sid": 1}))
        router.handle(
            other, frame(FrameType.SUB, {"sid": 1, "subj": f"metrics.{other.ident.name}"})
        )
        t = time.perf_counter()
        router.handle(publisher, pub)
        after_change.append(time.perf_counter() - t)

    for s in members:
        router.detach(s)
    router.expire_kept(0, ttl_ms=1)
    t = time.perf_counter()
    dropped = router.expire_kept(10, ttl_ms=1)
    expire_s = time.perf_counter() - t

    anchor = statistics.median(cached)
    return {
        "bench": "router",
        "agents": agents,
        "patterns": patterns,
        "rounds": rounds,
        "setup_s": round(setup_s, 2),
        "sub_kept_us": median_us(sub_kept),
        "pub_cached_us": median_us(cached),
        "pub_after_change_us": median_us(after_change),
        "ratio_pub_after_change_vs_cached": round(statistics.median(after_change) / anchor, 2),
        "ratio_sub_kept_vs_pub_cached": round(statistics.median(sub_kept) / anchor, 2),
        "expire_dropped": dropped,
        "expire_ms": round(expire_s * 1000, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=5000)
    p.add_argument("--patterns", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    setup_logging()
    print(json.dumps(run(args.agents, min(args.patterns, args.agents), args.rounds)))


if __name__ == "__main__":
    main()
