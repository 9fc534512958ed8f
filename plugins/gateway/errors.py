"""Errors at the gateway's HTTP API, in OpenAI's shape with honest statuses, and the mapping from
the platform's typed errors (raised by inference agents over the overlay) to them."""

from __future__ import annotations

import asyncio
from typing import Any

from atoll.agent.errors import (
    AtollError,
    ConnectionLost,
    DeadlineExceeded,
    Forbidden,
    InvalidRequest,
    NoResponder,
)
from atoll.plugins.inference.contract import (
    AdapterRejected,
    BackendUnavailable,
    Overloaded,
    Unsupported,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from atoll.plugins.storage.contract.datasets import DatasetInvalid
from atoll.plugins.storage.contract.wire import ObjectDamaged

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        detail: dict[str, Any] | None = None,
        retry: bool = True,
    ) -> None:
        """``detail``: more fields of the error object (a budget refusal's figures);
        ``retry=False`` tells clients that retrying cannot help (the openai SDK reads
        ``x-should-retry``)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "api_error")
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.detail = detail or {}
        self.retry = retry

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.detail,
            }
        }

    def headers(self) -> dict[str, str]:
        out = {} if self.retry else {"x-should-retry": "false"}
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, round(self.retry_after + 0.499)))
        return out


def from_platform(exc: AtollError) -> GatewayError:
    """What a platform error (an inference or storage agent's) means to the API caller."""
    message = exc.message
    if isinstance(exc, AdapterNotFound):
        return GatewayError(404, message, code="model_not_found")
    if isinstance(exc, AdapterRejected):
        return GatewayError(400, message, code="adapter_rejected")
    if isinstance(exc, (InvalidRequest, Unsupported)):
        return GatewayError(400, message)
    if isinstance(exc, DatasetInvalid):  # the caller's file or rows: the message names them
        return GatewayError(400, message, code="invalid_file")
    if isinstance(exc, ObjectDamaged):  # storage refused what it holds: no retry helps
        return GatewayError(502, message, "api_error", code="stored_object_damaged")
    if isinstance(exc, Overloaded):
        return GatewayError(429, message, code="overloaded", retry_after=1)
    if isinstance(exc, DeadlineExceeded):
        return GatewayError(504, message)
    if isinstance(exc, Forbidden):  # the gateway itself lacks a role on the node: not the user
        return GatewayError(503, f"this gateway may not use that node: {message}")
    if isinstance(exc, (BackendUnavailable, NoResponder, ConnectionLost)):
        return GatewayError(503, message, code="no_capacity")
    return GatewayError(503, f"inference failed: {exc}")


CLIENT_GONE = 499  # as nginx logs it: the caller closed the connection


def ended_status(exc: BaseException) -> int:
    """The status (ledger, metrics, traces) of a request that ended in ``exc``."""
    if isinstance(exc, GatewayError):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # Cancelled while waiting for a reply or token, or (a stream) closed by the response at a
        # ``yield`` while its client left: either way the caller is gone.
        return CLIENT_GONE
    return 500
