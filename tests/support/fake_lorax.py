"""A fake LoRAX server for tests: a real HTTP server (starlette + uvicorn) on 127.0.0.1 speaking
LoRAX's REST protocol as its router does (predibase/lorax router/src/server.rs):

- ``POST /`` with ``"stream"`` in the body (what lorax-client sends): a one-element JSON list, or
  server-sent events; ``POST /generate`` (one JSON object) and ``POST /generate_stream`` (SSE);
- SSE events ``data: {"token", "generated_text", "details"}``, the last with the text and
  ``details``; errors as ``{"error", "error_type"}``: with their status before a reply, or as a
  ``data:`` event inside a stream (LoRAX has answered 200 by then);
- ``GET /health``, ``GET /info``, ``POST /embed``.

Like a proxy in front of LoRAX, it checks ``Authorization: Bearer <token>`` when given one. It
records every request, and its replies are deterministic: ``words`` in order, then an EOS token.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

EOS = {"id": 2, "text": "</s>", "logprob": -0.01, "special": True}
MAX_KEEPALIVES = 400


@dataclass
class Failure:
    """The next generations fail: ``error_type`` None is a proxy's bare HTTP error; with one,
    LoRAX's own error, sent in-band after ``after`` tokens when streaming."""

    status: int
    error: str
    error_type: str | None = None
    after: int = 0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.error_type is not None:
            out["error_type"] = self.error_type
        return out


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class FakeLorax:
    token: str | None = None
    model_id: str = "fake/base-7b"
    words: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    fail: Failure | None = None
    null_logprobs: bool = False  # every other token's logprob null, as a real LoRAX may send
    token_delay: float = 0.0
    keepalive_only: bool = False  # a stream that sends keep-alives and never a token
    unhealthy: bool = False
    open_streams: int = 0  # SSE replies still being sent
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/", self._compat, methods=["POST"]),
                Route("/generate", self._generate, methods=["POST"]),
                Route("/generate_stream", self._generate_stream, methods=["POST"]),
                Route("/embed", self._embed, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/info", self._info, methods=["GET"]),
            ]
        )
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generations(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path != "/embed"]

    async def start(self, sock: socket.socket | None = None) -> FakeLorax:
        """Serve on ``sock`` (bound, perhaps not yet listening) or a fresh loopback port."""
        if sock is None:
            sock = bound_socket()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        for _ in range(500):  # 5 s
            if self.server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the fake LoRAX did not start")
        return self

    async def stop(self) -> None:
        if self.server is not None and self._task is not None:
            self.server.should_exit = True
            await asyncio.wait_for(self._task, 10)
            self.server = self._task = None

    # --- routes -------------------------------------------------------------------------------

    async def _record(self, request: Request) -> Response | None:
        body = json.loads(await request.body()) if request.method == "POST" else None
        self.requests.append(
            Recorded(request.method, request.url.path, body, dict(request.headers))
        )
        if (
            self.token is not None
            and request.headers.get("authorization") != f"Bearer {self.token}"
        ):
            return JSONResponse({"error": "invalid or missing API token"}, status_code=401)
        return None

    async def _compat(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        body = self.requests[-1].body
        if body.get("stream"):
            return self._sse(body)
        reply = self._reply(body)
        return reply if isinstance(reply, Response) else JSONResponse([reply])

    async def _generate(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        reply = self._reply(self.requests[-1].body)
        return reply if isinstance(reply, Response) else JSONResponse(reply)

    async def _generate_stream(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        return self._sse(self.requests[-1].body)

    async def _embed(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        text = self.requests[-1].body["inputs"]
        return JSONResponse({"embeddings": [float(len(text)), float(text.count(" ")), 1.0]})

    async def _health(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        if self.unhealthy:
            body = {"error": "unhealthy", "error_type": "healthcheck"}
            return JSONResponse(body, status_code=503)
        return Response(status_code=200)

    async def _info(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        return JSONResponse(
            {
                "model_id": self.model_id,
                "model_sha": "0" * 40,
                "model_dtype": "torch.float16",
                "model_device_type": "cuda",
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_length": 1024,
                "max_total_tokens": 2048,
                "waiting_served_ratio": 1.2,
                "max_batch_total_tokens": 100_000,
                "max_waiting_tokens": 20,
                "validation_workers": 2,
                "version": "0.12.1",
                "sha": None,
                "docker_label": None,
                "request_logger_url": None,
                "eager_prefill": False,
            }
        )

    # --- generation ---------------------------------------------------------------------------

    def _generation(self, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """``words`` until max_new_tokens, a stop sequence (kept in the text, as LoRAX does) or
        their end (then EOS)."""
        params = body.get("parameters") or {}
        max_new = params.get("max_new_tokens") or 20
        stops = params.get("stop") or []
        text, tokens, reason = "", [], "length"
        for i in range(max_new):
            if i == len(self.words):
                tokens.append(dict(EOS))
                reason = "eos_token"
                break
            logprob = None if self.null_logprobs and i % 2 == 0 else -0.25 * (i + 1)
            tokens.append(
                {"id": 100 + i, "text": self.words[i], "logprob": logprob, "special": False}
            )
            text += self.words[i]
            if any(text.endswith(s) for s in stops):
                reason = "stop_sequence"
                break
        details = {
            "finish_reason": reason,
            "prompt_tokens": len(body["inputs"].split()),
            "generated_tokens": len(tokens),
            "seed": params.get("seed"),
        }
        return text, tokens, details

    def _reply(self, body: dict[str, Any]) -> dict[str, Any] | Response:
        if self.fail is not None:
            return JSONResponse(self.fail.body(), status_code=self.fail.status)
        text, tokens, details = self._generation(body)
        return {"generated_text": text, "details": {**details, "prefill": [], "tokens": tokens}}

    def _sse(self, body: dict[str, Any]) -> Response:
        fail = self.fail
        if fail is not None and fail.error_type is None:
            return JSONResponse(fail.body(), status_code=fail.status)
        text, tokens, details = self._generation(body)

        async def events() -> AsyncIterator[str]:
            self.open_streams += 1
            try:
                async for event in self._events(text, tokens, details, fail):
                    yield event
            finally:  # also when the client went away: starlette cancels the sender
                self.open_streams -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _events(
        self,
        text: str,
        tokens: list[dict[str, Any]],
        details: dict[str, Any],
        fail: Failure | None,
    ) -> AsyncIterator[str]:
        if self.keepalive_only:
            for _ in range(MAX_KEEPALIVES):
                yield ":\n\n"
                await asyncio.sleep(0.05)
            return
        for i, token in enumerate(tokens):
            if fail is not None and i == fail.after:
                yield f"data: {json.dumps(fail.body())}\n\n"
                return
            await asyncio.sleep(self.token_delay)
            last = i == len(tokens) - 1
            event = {
                "token": token,
                "generated_text": text if last else None,
                "details": details if last else None,
            }
            yield f"data: {json.dumps(event)}\n\n"


def bound_socket() -> socket.socket:
    """A loopback socket bound to a free port and not listening yet: connections to it are
    refused until a server starts on it (a LoRAX still loading its model)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
