"""What every plugin contract is built from: strict wire models, one way to parse them, service
addresses and progress counters.

A contract (``plugins/<name>/contract.py``) is a leaf: it imports this kit, ``agent.errors`` and
pydantic, never another plugin's implementation, so a caller imports a contract without pulling
in torch, boto3 or FastAPI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from atoll.agent.errors import InvalidRequest

Progress = Callable[[int, int], None]  # (bytes or items done, in all)
M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")


class Strict(BaseModel):
    """A request model: a field it does not know is an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class NoParams(BaseModel):
    """The parameters of a method that takes none: whatever a caller sends is ignored."""


def parse(
    model: type[M], data: Any, what: str | None = None, context: dict[str, Any] | None = None
) -> M:
    """``data`` as ``model`` (validated with ``context``), or InvalidRequest naming each wrong
    field and why (led by ``bad <what>``, or ``invalid <model name>`` when ``what`` is not
    given)."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if not str(p).startswith('function-')) or 'value'}"
            f": {e['msg']}"
            for e in exc.errors()
        )
        lead = f"bad {what}" if what is not None else f"invalid {model.__name__}"
        raise InvalidRequest(f"{lead}: {problems}") from None


def service_address(target: str, plugin: str) -> str:
    """``agent/plugin``: a bare agent name means that agent's ``plugin``."""
    return target if "/" in target else f"{target}/{plugin}"


def counter(total: int, progress: Progress | None, start: int = 0) -> Callable[[int], None]:
    """A callback that adds each step's count and reports the running sum (from ``start``: what
    a resumed transfer already holds) out of ``total``."""
    done = start

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return advance


# --- typed clients --------------------------------------------------------------------------


class Caller(Protocol):
    """What a client needs from the overlay (an ``Agent`` or a ``PluginContext``)."""

    async def call(
        self, dst: str, method: str, params: Any = None, timeout: float | None = None
    ) -> Any: ...


@dataclass(frozen=True)
class Method(Generic[P, R]):
    """One RPC of a plugin: its name, parameters model and reply type. A contract lists its
    methods once; the plugin serves them and its client calls them from that one list."""

    name: str
    params: type[P]
    reply: Any  # a type pydantic can validate: a model, ``list[Model]``, ``dict[str, Any]``
    what: str | None = None  # how a refusal names the parameters (see ``parse``)

    def parse_params(self, data: Any) -> P:
        """Parameters as a caller sent them (none: an empty object) as this method's model;
        both the serving plugin and a client building a request use it, so they refuse alike."""
        return parse(self.params, {} if data is None else data, self.what)

    def check_reply(self, value: Any) -> R:
        """The reply as its declared type; a reply that is not is the callee's bug, said so."""
        try:
            result: R = TypeAdapter(self.reply).validate_python(value)
        except ValidationError as exc:
            raise InvalidRequest(f"bad reply to {self.name}: {exc.errors()[0]['msg']}") from None
        return result


class Client:
    """Calls one plugin instance's methods with typed parameters and replies."""

    def __init__(self, caller: Caller, address: str, timeout: float | None = None) -> None:
        self.caller = caller
        self.address = address
        self.timeout = timeout

    async def invoke(self, method: Method[P, R], params: P) -> R:
        data = params.model_dump(mode="json", exclude_none=True)
        reply = await self.caller.call(self.address, method.name, data, self.timeout)
        return method.check_reply(reply)
