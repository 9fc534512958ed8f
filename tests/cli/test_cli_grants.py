"""``atoll grant create|list|revoke``: signed in the operator's data dir, pushed to a real
broker, which enforces it at once; bad input is refused with the reason."""

from __future__ import annotations

import asyncio
import re

from typer.testing import CliRunner

from atoll.broker.server import BrokerServer
from atoll.cli.grants import commands
from atoll.tenancy.operator import OperatorStore

RUNNER = CliRunner()


def atoll_grant(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(commands, list(args))
    return result.exit_code, result.output


async def test_create_list_revoke_pushed_to_a_broker(
    operator: OperatorStore, broker: BrokerServer
) -> None:
    d = str(operator.root)
    create = (
        "create", "-d", d, "--exporter", "globex", "--importer", "acme",
        "--service", "inference:tiny-llama", "--broker", broker.url,
    )  # fmt: skip
    code, out = await asyncio.to_thread(atoll_grant, *create)
    assert code == 0, out
    match = re.search(r"grant ([0-9a-f]{16})", out)
    assert match is not None and "brokers notified" in out
    gid = match.group(1)
    (grant,) = broker.router.grants.linking("acme", "globex")
    assert grant.id == gid and grant.services[0].base_model == "tiny-llama"
    assert grant.roles == ("gateway",)
    code, out = atoll_grant("list", "-d", d)
    assert code == 0 and gid in out and "active" in out and "inference:tiny-llama" in out
    code, out = await asyncio.to_thread(atoll_grant, "revoke", gid, "-d", d, "--broker", broker.url)
    assert code == 0, out
    assert broker.router.grants.linking("acme", "globex") == []
    assert "revoked" in atoll_grant("list", "-d", d)[1]


def test_bad_grants_are_refused_with_the_reason(operator: OperatorStore) -> None:
    d = str(operator.root)
    base = ("create", "-d", d, "--exporter", "globex", "--importer", "acme")
    for extra, why in [
        (("--service", "Inference"), "invalid plugin name"),
        (("--service", "inference", "--role", "admin"), "grant roles must be"),
        (("--service", "inference", "--ttl", "0s"), "must expire"),
        (("--service", "inference:bad model"), "invalid base model"),
    ]:
        code, out = atoll_grant(*base, *extra)
        assert code != 0 and why in out, (extra, out)
    code, out = atoll_grant("create", "-d", d, "--exporter", "nope", "--importer", "acme",
                            "--service", "inference")  # fmt: skip
    assert code != 0 and "no tenant 'nope'" in out
    code, out = atoll_grant("revoke", "0123456789abcdef", "-d", d)
    assert code != 0 and "no grant" in out
    assert operator.grants() == []
