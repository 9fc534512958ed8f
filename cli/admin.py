"""Acting as a tenant admin: the one target every such command shares (operator data dir,
tenant, broker), the options that set it, and the one way to run work as that admin.

A command registered with ``admin_command`` takes an ``AdminTarget`` as its first parameter; the
CLI shows the target's options (``-d``, ``--tenant``, ``--broker``) after the command's own and
builds the target from them once, before the command runs. Plugins' commands (entry point group
``atoll.cli``) use the same decorator, so every admin command takes the same options.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.cli.loop import run_async
from atoll.cli.operator import operator_store
from atoll.cli.options import DataDir
from atoll.tenancy.operator import DEFAULT_TENANT

T = TypeVar("T")
Command = Callable[..., None]

LOCAL_BROKER = "ws://127.0.0.1:7400"  # `atoll up`'s broker
ISLAND = "island"  # `atoll up`'s agent: where plugin commands find their plugin by default
ADMIN_TTL_S = 600  # the minted admin credential's lifetime: one command's


@dataclass(frozen=True)
class AdminTarget:
    """Where an admin command acts: the operator data dir holding the tenant's key, the tenant,
    and the broker(s) to reach it through."""

    data_dir: Path
    tenant: str
    brokers: list[str]

    def run(self, work: Callable[[Agent], Awaitable[T]], role: str = "admin") -> T:
        """``await work(agent)`` as a short-lived ``role`` (admin; operator for what only the
        operator may do) of the tenant: an identity minted with the tenant key for this command;
        a platform error ends the command, saying why."""
        op = operator_store(self.data_dir)

        async def main() -> T:
            name = f"cli-{secrets.token_hex(4)}"
            keys = AgentKeys.issue(op, self.tenant, name, [role], ttl_s=ADMIN_TTL_S)
            agent = Agent(keys, self.brokers, backoff_max=0.5)
            try:
                return await work(await agent.start(wait=10))
            finally:
                await agent.stop()

        return run_async(main())


_TARGET_OPTIONS = [
    inspect.Parameter("data_dir", inspect.Parameter.KEYWORD_ONLY, annotation=DataDir),
    inspect.Parameter(
        "tenant",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[str, typer.Option(help="Tenant to act in.")],
        default=DEFAULT_TENANT,
    ),
    inspect.Parameter(
        "broker",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[str, typer.Option("--broker", help="Broker URL.")],
        default=LOCAL_BROKER,
    ),
]


def admin_command(group: typer.Typer, name: str | None = None) -> Callable[[Command], Command]:
    """Register the decorated function on ``group`` as a command acting as a tenant admin: its
    first parameter, an ``AdminTarget``, comes from the shared options."""

    def register(command: Command) -> Command:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

        def with_target(data_dir: Path, tenant: str, broker: str, **given: Any) -> None:
            command(AdminTarget(data_dir, tenant, [broker]), **given)

        # typer reads the command's options from its signature: the command's own, then the
        # target's.
        with_target.__signature__ = inspect.Signature([*own, *_TARGET_OPTIONS])  # type: ignore[attr-defined]
        with_target.__name__, with_target.__doc__ = command.__name__, command.__doc__
        group.command(name)(with_target)
        return command

    return register
