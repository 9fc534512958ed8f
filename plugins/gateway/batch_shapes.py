"""OpenAI's Batch API shapes, as the openai SDK's ``batches`` sends and reads them: the create
body, the Batch object and its list, one line of a batch's output or error file, and the check
of an input file's request bodies against the routes' own request models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from atoll.plugins.gateway.bodies import RequestBody, parse_body
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from atoll.plugins.storage.contract.datasets import BATCH_URLS

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
Status = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
UNFINISHED: tuple[Status, ...] = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW_S = 24 * 3600  # "24h", the only completion window
REQUEST_MODELS: dict[str, type[RequestBody]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
assert tuple(REQUEST_MODELS) == BATCH_URLS  # storage checks the same urls


class CreateBatch(RequestBody):
    input_file_id: str = Field(min_length=1, max_length=256)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v and any(len(k) > 64 or len(x) > 512 for k, x in v.items()):
            raise ValueError("metadata keys have at most 64 characters, values 512")
        return v


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: Endpoint
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: Literal["24h"] = "24h"
    status: Status
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def result_line(
    line_id: str, custom_id: str, status: int, request_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A request's line in the output (200) or error file: its HTTP status and body."""
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


def unrun_line(line_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A request the batch never ran (it expired or was cancelled first): the error file's."""
    error = {"code": code, "message": message}
    return {"id": line_id, "custom_id": custom_id, "response": None, "error": error}


def request_body(url: str, body: dict[str, Any]) -> Any:
    """A line's body as its route's request model; 4xx naming the field as the route would, and
    400 for ``stream``: a batch's answers are whole."""
    request = parse_body(REQUEST_MODELS[url], body)
    if getattr(request, "stream", None):
        raise GatewayError(400, "stream is not supported in a batch", param="stream")
    return request


def check_bodies(path: Path) -> None:
    """Each request body of a batch file at upload: 400 naming the first bad line. Lines whose
    envelope is wrong (a url not the first line's included) are left to storage's check, which
    names them all."""
    first: str | None = None
    with path.open("rb") as lines:
        for n, raw in enumerate(lines, start=1):
            try:
                obj = json.loads(raw) if raw.strip() else None
            except (ValueError, RecursionError):  # storage names the line
                continue
            if not isinstance(obj, dict) or obj.get("url") not in REQUEST_MODELS:
                continue
            first = first or obj["url"]
            if obj["url"] != first:
                continue
            if not isinstance(body := obj.get("body"), dict):
                continue
            try:
                request_body(obj["url"], body)
            except GatewayError as exc:
                raise GatewayError(
                    400, f"line {n}: {exc.message}", code="invalid_file", param="file"
                ) from None
