"""Accounts store benchmark: what the gateway's per-request store calls cost on SQLite (a file) and
on PostgreSQL (``--postgres URL``, an empty database), in microseconds per call, median of rounds:

* ``authenticate``: a known key (SQLite answers from its cache, checked against the file's
  data_version; PostgreSQL reads the key every time: other gateways commit unseen);
* ``ledger_row``: one request's row in its own transaction (the ledger at concurrency 1);
* ``ledger_row_in_32``: per row, 32 rows in one transaction (a busy event-loop turn's batch);
* ``reserve_settle``: a request under one budget: its reservation, then its row settling it.

Prints ONE JSON object on stdout. A throwaway PostgreSQL to point it at (as a non-root user):

    initdb -D /tmp/pg -U atoll --auth=trust && pg_ctl -D /tmp/pg -o "-k /tmp -c fsync=off" start
    createdb -h /tmp -U atoll bench
    .venv/bin/python bench/accounts.py --postgres "postgresql:///bench?host=/tmp&user=atoll"
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from atoll.plugins.gateway.accounts import Accounts

SECRET = b"b" * 32


def per_call_us(call: Callable[[int], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls (each given a fresh index)."""
    means, n = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call(n)
            n += 1
        means.append((time.perf_counter() - started) / calls * 1e6)
    return round(statistics.median(means), 1)


def measure(acc: Accounts, calls: int, rounds: int) -> dict[str, float]:
    acc.create_user("bench", actor="bench")
    _, key = acc.create_key("bench", actor="bench")
    me = acc.authenticate(key)

    def row(rid: str) -> tuple[object, ...]:
        return acc.usage_row(me, rid, "echo", None, 20, 8, 200, 1.0)

    def batch(i: int) -> None:
        acc.insert_usage([row(f"b{i}-{j}") for j in range(32)])

    figures = {
        "authenticate": per_call_us(lambda _: acc.authenticate(key), calls, rounds),
        "ledger_row": per_call_us(lambda i: acc.insert_usage([row(f"r{i}")]), calls, rounds),
        "ledger_row_in_32": round(per_call_us(batch, max(1, calls // 32), rounds) / 32, 1),
    }
    acc.set_budget("user", "bench", "tokens", "total", 10**12, actor="bench")

    def reserve_settle(i: int) -> None:
        acc.reserve(f"s{i}", me.key_id, "bench", None, 28, 0, 60)
        acc.insert_usage([row(f"s{i}")])

    figures["reserve_settle"] = per_call_us(reserve_settle, calls, rounds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="an empty PostgreSQL database's URL")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result: dict[str, object] = {"machine": platform.machine(), "calls": args.calls}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = Accounts(Path(tmp) / "bench.sqlite", SECRET)
        try:
            result["sqlite_us"] = measure(sqlite, args.calls, args.rounds)
        finally:
            sqlite.close()
    if args.postgres:
        pg = Accounts(args.postgres, SECRET)
        try:
            result["postgres_us"] = measure(pg, args.calls, args.rounds)
        finally:
            pg.close()
    else:
        result["postgres_us"] = None  # no --postgres given
    print(json.dumps(result))


if __name__ == "__main__":
    main()
