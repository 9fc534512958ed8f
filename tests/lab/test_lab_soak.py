"""Scenario: a short soak (``support.chaos``): steady load across the three islands for 45 s:
no error, no fd growth, RSS within 10% for every process, brokers included, after a warm-up
(the benchmark runs it for 10 minutes). A broker's duplicate filter of relayed frames
(``broker/seen_ids.py``) takes its memory when the broker starts, so filling it is no growth."""

from __future__ import annotations

import json

import pytest

from support.chaos import deploy, soak
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


async def test_steady_load_leaks_nothing(lab: Lab) -> None:
    d = await deploy(lab, token_delay=0.002, rtt=0.01)
    f = await soak(d, seconds=45.0, concurrency=4, pace=0.02)
    print(json.dumps(f, indent=1))
    assert f["requests"] > 200 and f["success_rate"] == 1.0, f
    for name, p in f["processes"].items():
        assert p["fd_growth"] <= 2, (name, f)
        assert p["rss_growth_pct"] < 10.0, (name, f)
