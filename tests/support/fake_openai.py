"""A fake OpenAI-compatible server shaped like vLLM serving one base model with two
``--lora-modules`` and a Whisper-style transcription route: a real HTTP server (FastAPI + uvicorn)
on 127.0.0.1 whose replies derive from the request, so tests can predict them. It checks the
Bearer key on /v1, records what it was sent, and has switches that make it fail. With
``runtime_lora`` it has vLLM's runtime LoRA API (load_lora_adapter / unload_lora_adapter), with
vLLM's answers: it reads the adapter directory it is given, as vLLM does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

BASE = "fake-base"
ADAPTERS = ("sql-lora", "chat-lora")
EMBEDDER = "fake-embed"  # served by /v1/embeddings, not listed (vLLM runs one model per server)
MAX_TOKENS = 1000  # the fake's context limit: more is a 400, as vLLM answers


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


def words(text: str) -> int:
    """The fake's token count: whitespace-separated words."""
    return len(text.split())


def pieces(text: str) -> list[str]:
    """The fake's tokens: each word with the spaces after it."""
    return re.findall(r"\S+\s*", text)


def chat_reply(model: str, messages: list[dict[str, Any]]) -> str:
    return f"{model} heard: {messages[-1]['content']}"


def completion_reply(model: str, prompt: str) -> str:
    return f"{model} continues {prompt}"


def logprob(piece: str) -> float:
    return -len(piece) / 10


def embedding(text: str) -> list[float]:
    """Four positive numbers from the text's digest; not unit length, so normalising shows."""
    return [1.0 + b / 16 for b in hashlib.sha256(text.encode()).digest()[:4]]


def heard(audio: bytes) -> str:
    return f"{len(audio)} bytes sha256 {hashlib.sha256(audio).hexdigest()[:12]}"


def tool_arguments(messages: list[dict[str, Any]], name: str) -> str:
    return json.dumps({"tool": name, "query": messages[-1]["content"]})


class FakeOpenAI:
    def __init__(self, api_key: str = "sk-island", port: int = 0) -> None:
        self.api_key = api_key
        self.port = port
        self.seen: list[Seen] = []
        # switches
        self.fail_status: int | None = None  # every /v1 POST answers this status
        self.fail_midstream = False  # streams die with an error event after two chunks
        self.delay = 0.0  # seconds before any /v1 POST answers
        self.send_usage = True  # False: ignore stream_options.include_usage
        self.tokenize = True  # False: no /tokenize route
        self.health_status = 200
        self.missing: set[str] = set()  # /v1 paths answered with FastAPI's 404 "Not Found"
        self.runtime_lora = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload routes
        self.loaded: dict[str, str] = {}  # adapters loaded at run time: name -> path
        self.load_refusal: str | None = None  # a load answers 400 with this message
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = self._build()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def last(self, path: str) -> Seen:
        return next(s for s in reversed(self.seen) if s.path == path)

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(500):  # up to 5 s
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self._server.started:
            raise RuntimeError(f"the fake server did not start on port {self.port}")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)
        self._server = self._task = None

    # --- the app ------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def gate(request: Request, call_next: Any) -> Response:
            path = request.url.path
            if path.startswith("/v1"):  # vLLM's --api-key guards /v1 only
                if request.headers.get("authorization") != f"Bearer {self.api_key}":
                    return JSONResponse({"error": "Unauthorized"}, status_code=401)
                if path in self.missing:
                    return JSONResponse({"detail": "Not Found"}, status_code=404)
                if request.method == "POST":
                    await asyncio.sleep(self.delay)
                    if self.fail_status is not None:
                        return error(self.fail_status, f"switched to fail with {self.fail_status}")
            return await call_next(request)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=self.health_status)

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            if not self.tokenize:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await self._record(request)
            text = body.get("prompt") or " ".join(m["content"] for m in body["messages"])
            return JSONResponse({"count": words(text), "max_model_len": MAX_TOKENS})

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [card(BASE, f"/models/{BASE}", None)]
            cards += [card(a, f"/adapters/{a}", BASE) for a in ADAPTERS]
            cards += [card(a, path, BASE) for a, path in self.loaded.items()]
            return {"object": "list", "data": cards}

        @app.post("/v1/load_lora_adapter")
        async def load_lora(request: Request) -> Response:
            if not self.runtime_lora:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await self._record(request)
            name, path = body.get("lora_name"), str(body.get("lora_path"))
            if name in ADAPTERS or name in self.loaded:
                return error(400, f"The lora adapter '{name}' has already been loaded.")
            if not (Path(path) / "adapter_config.json").is_file():
                return error(400, f"No adapter found for {path}")
            if self.load_refusal is not None:
                return error(400, self.load_refusal)
            self.loaded[str(name)] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(request: Request) -> Response:
            if not self.runtime_lora:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await self._record(request)
            name = body.get("lora_name")
            if self.loaded.pop(str(name), None) is None:
                return error(404, f"The lora adapter '{name}' cannot be found.")
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await self._record(request)
            if (bad := check(body, True, self.loaded)) is not None:
                return bad
            return self._stream(body, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await self._record(request)
            if (bad := check(body, False, self.loaded)) is not None:
                return bad
            return self._stream(body, chat=False)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            body = await self._record(request)
            if body.get("model") not in (BASE, EMBEDDER):
                return missing_model(body.get("model"))
            inputs = body["input"]
            data = [
                {"object": "embedding", "index": i, "embedding": embedding(text)}
                for i, text in enumerate(inputs)
            ]
            tokens = sum(words(t) for t in inputs)
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            # reversed, as the spec allows: clients must order by index
            return JSONResponse({"object": "list", "data": data[::-1], "usage": usage})

        @app.post("/v1/audio/transcriptions")
        @app.post("/v1/audio/translations")  # the same form, without language
        async def transcriptions(
            request: Request,
            file: UploadFile,
            model: str = Form(),
            language: str | None = Form(None),
            prompt: str | None = Form(None),
            response_format: str = Form("json"),
            temperature: float | None = Form(None),
        ) -> Response:
            audio = await file.read()
            form = {
                "model": model,
                "language": language,
                "prompt": prompt,
                "response_format": response_format,
                "temperature": temperature,
                "filename": file.filename,
                "content_type": file.content_type,
                "size": len(audio),
            }
            self.seen.append(Seen(request.url.path, dict(request.headers), form))
            text = heard(audio)
            if response_format == "json":
                return JSONResponse({"text": text})
            if response_format == "verbose_json":
                segment = {"id": 0, "start": 0.0, "end": 1.0, "text": text}
                return JSONResponse(
                    {
                        "task": "translate" if "translations" in request.url.path else "transcribe",
                        "language": language or "en",
                        "duration": 1.0,
                        "text": text,
                        "segments": [segment],
                    }
                )
            if response_format == "srt":
                return PlainTextResponse(f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n")
            if response_format == "vtt":
                return PlainTextResponse(f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n")
            return PlainTextResponse(text + "\n")

        return app

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.seen.append(Seen(request.url.path, dict(request.headers), body))
        return body

    def _stream(self, body: dict[str, Any], chat: bool) -> StreamingResponse:
        return StreamingResponse(self._events(body, chat), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        """SSE as vLLM writes it: a role chunk (chat), one chunk per token, the finish reason on
        the last, the usage chunk with empty choices when asked, then [DONE]."""
        model, created = body["model"], int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": "cmpl-fake", "object": kind, "created": created, "model": model}

        def chunk(choice: dict[str, Any]) -> str:
            return sse({**head, "choices": [{"index": 0, "logprobs": None, **choice}]})

        if chat:
            messages = body["messages"]
            prompt_tokens = sum(words(m["content"]) for m in messages)
            text = chat_reply(model, messages)
            yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        else:
            prompt_tokens = words(body["prompt"])
            text = completion_reply(model, body["prompt"])
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        out: list[str] = []
        if chat and tools:
            for i, tool in enumerate(tools[:2]):
                name = tool["function"]["name"]
                start = {"index": i, "id": f"call_{i}", "type": "function"}
                start["function"] = {"name": name, "arguments": ""}
                yield chunk({"delta": {"tool_calls": [start]}, "finish_reason": None})
                args = tool_arguments(messages, name)
                for at in range(0, len(args), 7):
                    fragment = args[at : at + 7]
                    part = {"index": i, "function": {"arguments": fragment}}
                    yield chunk({"delta": {"tool_calls": [part]}, "finish_reason": None})
                    out.append(fragment)
            finish = "tool_calls"
        else:
            tokens = pieces(text)
            limit = body.get("max_tokens") or len(tokens)
            finish = "length" if len(tokens) > limit else "stop"
            for n, piece in enumerate(tokens[:limit]):
                if self.fail_midstream and n == 2:
                    err = {"message": "engine died", "type": "InternalServerError", "code": 500}
                    yield sse({"error": err})
                    yield "data: [DONE]\n\n"
                    return
                last = n == min(limit, len(tokens)) - 1
                choice: dict[str, Any] = {"finish_reason": finish if last else None}
                if chat:
                    choice["delta"] = {"content": piece}
                    if body.get("logprobs"):
                        choice["logprobs"] = {
                            "content": [{"token": piece, "logprob": logprob(piece), "bytes": []}]
                        }
                else:
                    choice["text"] = piece
                    if body.get("logprobs") is not None:
                        choice["logprobs"] = {
                            "tokens": [piece],
                            "token_logprobs": [logprob(piece)],
                            "top_logprobs": [{piece: logprob(piece)}],
                            "text_offset": [0],
                        }
                yield chunk(choice)
                out.append(piece)
                await asyncio.sleep(0)
        if chat and tools:
            yield chunk({"delta": {}, "finish_reason": finish})
        if self.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(out),
                "total_tokens": prompt_tokens + len(out),
            }
            yield sse({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": MAX_TOKENS,
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def missing_model(model: Any) -> JSONResponse:
    return error(404, f"The model `{model}` does not exist.")


def check(body: dict[str, Any], chat: bool, loaded: dict[str, str]) -> JSONResponse | None:
    """vLLM's answers to a bad request: unknown model 404, over-long max_tokens 400."""
    if body.get("model") not in (BASE, *ADAPTERS, *loaded):
        return missing_model(body.get("model"))
    if not body.get("stream"):
        return error(400, "this fake streams only")
    if (body.get("max_tokens") or 0) > MAX_TOKENS:
        return error(400, f"max_tokens must be at most {MAX_TOKENS}")
    if ("messages" if chat else "prompt") not in body:
        return error(422, "missing field")
    return None
