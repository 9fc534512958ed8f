"""The network lab's fixtures: a session-wide cleanup of namespaces that a killed run left
behind, and ``lab``, a fresh ``support.lab.Lab`` per test, torn down (processes killed,
namespaces deleted) however the test ends. Skipped, saying why, off Linux or without root, ip
or nft."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from support.lab import Lab, cleanup_stale, unavailable


@pytest.fixture(scope="session", autouse=True)
def _stale_namespaces() -> Iterator[None]:
    if unavailable() is None:
        cleanup_stale()
    yield
    if unavailable() is None:
        cleanup_stale()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    if (why := unavailable()) is not None:
        pytest.skip(why)
    async with Lab(tmp_path) as it:
        yield it
