"""Scenario: the storage agent SIGKILLed mid-upload over a slow WAN link, then restarted
(``support.chaos``): no partial object is ever visible, the dataset is not listed, and uploading
it again resumes where it stopped, as a file put through the files plugin (``atoll cp``) does.

An uploader whose receiver dies learns it within seconds (its stream probes the silent side; the
broker answers that it has no such agent). Not built: adapter uploads (a few files of a few MB)
start over."""

from __future__ import annotations

import json

import pytest

from support.chaos import deploy, storage_killed_mid_upload
from support.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


async def test_storage_killed_mid_upload_leaves_nothing_partial(lab: Lab) -> None:
    d = await deploy(lab)
    f = await storage_killed_mid_upload(
        d, dataset_bytes=3 * 2**20, file_bytes=6 * 2**20, rate=1.5e6, kill_after=1.0,
        fail_within=5.0,
    )  # fmt: skip
    print(json.dumps(f, indent=1))
    ds, fl = f["dataset"], f["file"]
    assert ds["killed_upload"] != "completed" and ds["partial_objects_visible"] == [], f
    assert not ds["listed_after_restart"] and ds["reupload_ok"], f
    assert ds["resumed"] and ds["resent_bytes"] < ds["bytes"], f
    assert fl["killed_put"] != "completed" and not fl["partial_visible"], f
    assert fl["resumed"] and fl["sha256_ok"], f


async def test_an_upload_fails_soon_after_its_receiver_dies(lab: Lab) -> None:
    d = await deploy(lab)
    f = await storage_killed_mid_upload(
        d, dataset_bytes=0, file_bytes=6 * 2**20, rate=1.5e6, kill_after=1.0, fail_within=10.0,
        parts=("file",),
    )  # fmt: skip
    print(json.dumps(f, indent=1))
    assert not f["file"]["killed_put"].startswith("hung"), f
