"""Scenario: one inference island partitioned under load, then healed (``support.chaos``)."""

from __future__ import annotations

import json

import pytest

from support.chaos import deploy, partition_heal
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


@pytest.mark.parametrize("inbound_only", [False, True], ids=["both-ways", "one-way"])
async def test_partitioned_island_is_routed_around_and_rejoins(
    lab: Lab, inbound_only: bool
) -> None:
    d = await deploy(lab, token_delay=0.002, storage=False)
    f = await partition_heal(d, partition_s=8.0, outbound=not inbound_only)
    print(json.dumps(f, indent=1))
    # Nothing failed: requests caught on the cut island are retried on the other one before
    # their first token; new ones go there at once.
    assert f["during"]["success_rate"] == 1.0 and f["all"]["success_rate"] == 1.0, f
    assert f["new_requests_rerouted_s"] < 3.0, f
    assert f["stuck_recovered_s"] < 15.0, f  # the gateway's 10 s first-event timeout
    assert f["left_routing_s"] is not None and f["left_routing_s"] < 8.0, f
    assert f["rejoin_s"] is not None and f["rejoin_s"] < 20.0 and f["served_again"], f
    # Each request exactly once in the ledger, every success a 200 row.
    assert f["doubled"] == 0 and f["successes_without_row"] == 0, f
    assert f["ledger_rows"] == f["requests_answered"], f
