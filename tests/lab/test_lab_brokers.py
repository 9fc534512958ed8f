"""Scenario: a broker SIGKILLed (and restarted) or SIGSTOPped (and continued) while the gateway
serves 32 concurrent clients (``support.chaos``): at least 99% of the requests succeed (the
gateway retries on another node before the first token only; clients never retry), and the
gateway's ledger has exactly one row per request."""

from __future__ import annotations

import json

import pytest

from support.chaos import broker_fault, deploy
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]


@pytest.mark.parametrize(
    ("island", "sig", "outage_s"),
    [
        ("b", "kill", 2.0),
        ("b", "stop", 6.0),
        ("a", "kill", 2.0),
        ("a", "stop", 6.0),
    ],
    ids=[
        "inference-broker-kill",
        "inference-broker-stop",
        "gateway-broker-kill",
        "gateway-broker-stop",
    ],
)
async def test_a_broker_dies_under_load(lab: Lab, island: str, sig: str, outage_s: float) -> None:
    # Up to 32 requests may be mid-answer when the gateway's own broker dies (they fail: no
    # retry after the first token), so that case runs long enough for 99% to mean something.
    n = 3000 if (island, sig) == ("a", "kill") else 1500
    d = await deploy(lab, token_delay=0.002, storage=False)
    f = await broker_fault(d, sig=sig, requests=n, concurrency=32, outage_s=outage_s, island=island)
    print(json.dumps(f, indent=1))
    assert f["requests"] == n and f["fault_at_request"] < n, f
    assert f["success_rate"] >= 0.99, f
    # Nothing failed before its first token: those are retried (after the gateway's failover).
    assert not [e for e in f["errors"] if "failed before answering" in e], f
    assert f["doubled"] == 0 and f["successes_without_row"] == 0, f
    assert f["ledger_rows"] == f["requests_answered"] == n, f
