"""Errors an RPC can end with. A remote handler's AtollError travels back by its ``type`` name and
is rebuilt as the same class on the caller when that class is known there."""

from __future__ import annotations

import builtins
from typing import Any, ClassVar


class AtollError(Exception):
    type: ClassVar[str] = "AtollError"
    # ``builtins.type``: inside this class body ``type`` is the attribute above.
    _registry: ClassVar[dict[str, builtins.type[AtollError]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.type = cls.__name__
        AtollError._registry[cls.__name__] = cls

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> list[Any]:
        return [self.type, self.message, self.data]

    @staticmethod
    def from_wire(value: Any) -> AtollError:
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)):
            return RemoteError("malformed error reply", remote_type="InvalidReply")
        etype, message, data = value
        cls = AtollError._registry.get(etype)
        if cls is None or cls is RemoteError:
            return RemoteError(str(message), data, remote_type=etype)
        return cls(str(message), data)


class RemoteError(AtollError):
    """The remote handler failed with an error type this side does not know."""

    def __init__(self, message: str, data: Any = None, remote_type: str = "RemoteError") -> None:
        super().__init__(message, data)
        self.remote_type = remote_type

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.message}"


class NoResponder(AtollError):
    """Nothing answers at that address: no such agent in this tenant, plugin or method."""


class NoSuchMethod(NoResponder):
    """The agent is there but has no handler for that plugin/method."""


class DeadlineExceeded(AtollError):
    """No reply within the call's deadline."""


class ConnectionLost(AtollError):
    """The broker connection dropped (or is down) while the call was pending."""


class InternalError(AtollError):
    """The remote handler raised an unexpected exception."""


class Forbidden(AtollError):
    """The caller's roles do not allow this."""


class InvalidRequest(AtollError):
    """The request's parameters are malformed."""
