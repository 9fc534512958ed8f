"""Scenario: three islands over a WAN (``support.chaos``): 40 ms round trips on every link
between islands (the relays) and 1% of the packets into every island dropped (nftables): chat,
streaming and a file transfer between islands all complete, correct."""

from __future__ import annotations

import json

import pytest

from support.chaos import deploy, wan_profile
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


async def test_chat_streaming_and_a_transfer_over_a_lossy_wan(lab: Lab) -> None:
    d = await deploy(lab, token_delay=0.002, rtt=0.04)
    for island in (d.a, d.b, d.c):
        island.loss(1.0)
    f = await wan_profile(d, requests=60, transfer_bytes=8 * 2**20)
    print(json.dumps(f, indent=1))
    assert f["chat"]["success_rate"] == 1.0 and f["stream"]["success_rate"] == 1.0, f
    # Each request crosses one WAN link there and back (gateway -> broker a -> relay -> the
    # node's broker): at least the 40 ms round trip, and not many more of them.
    assert 40 <= f["chat"]["p50_ms"] < 1000, f
    assert f["transfer"]["sha256_ok"], f
