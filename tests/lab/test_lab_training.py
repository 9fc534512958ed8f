"""Scenario: a trainer SIGKILLed mid-job (a fine-tuning job submitted through the gateway's API,
two trainers on two islands): its job process ends with it (nothing left holding the device),
the queue puts the job back in line once the trainer's heartbeats stop, and the other trainer
finishes it."""

from __future__ import annotations

import json

import pytest

from support.chaos import deploy, trainer_killed_mid_job
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]


async def test_a_trainer_killed_mid_job_leaves_no_orphan_and_the_job_finishes_elsewhere(
    lab: Lab,
) -> None:
    d = await deploy(lab, training=True)
    f = await trainer_killed_mid_job(d)
    print(json.dumps(f, indent=1))
    assert f["orphan_gone_s"] < 5, f  # its parent watch looks twice a second
    assert f["requeued"] and f["status"] == "succeeded", f
    assert f["fine_tuned_model"], f
