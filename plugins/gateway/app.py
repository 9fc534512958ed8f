"""The gateway's HTTP API (FastAPI): OpenAI's /v1 routes, LoRAX's /, /generate and
/generate_stream, the admin API, Prometheus /metrics and the live feed. Bodies are parsed and
built by openai_api.py; what a request does is service.py's."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, some of which
# (User, Admin) are local to create_app.
import asyncio
import inspect
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from atoll.agent.prometheus import prometheus_text
from atoll.plugins.gateway import contract as c
from atoll.plugins.gateway import finetune, webui
from atoll.plugins.gateway import openai_api as api
from atoll.plugins.gateway.accounts import Principal
from atoll.plugins.gateway.admin import AdminRPC, plain
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.inference.contract import (
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    TranscribeRequest,
    TranscribeResult,
)

log = logging.getLogger(__name__)
Event = TokenEvent | FinishEvent
FEED_INTERVAL = 1.0  # seconds between frames of the admin live feed


class BodyLimit:
    """413 for a body over ``limit`` bytes, before it is read whole (Content-Length or not)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise GatewayError(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    error = GatewayError(413, f"the request body is over {limit} bytes")
    return JSONResponse(error.body(), status_code=413)


def error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


# The OpenAPI document is data, never a page: nothing in it may run, load or be framed.
SCHEMA_HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def create_app(gw: Gateway, docs: bool = False) -> FastAPI:
    """The app; ``docs`` serves ``/openapi.json`` to callers with a key (off: 404)."""
    # Never /docs or /redoc: FastAPI's pages load their scripts from a CDN on the web UI's origin,
    # and a browser navigating to them sends no key. With ``docs`` only the schema is served.
    app = FastAPI(
        title="Atoll gateway",
        summary="OpenAI- and LoRAX-compatible API to the models of one tenant's islands",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    admin = AdminRPC(gw.accounts)

    # --- errors in OpenAI's shape -----------------------------------------------------------

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        if _is_lorax(request):
            return JSONResponse(api.lorax_error(exc), status_code=exc.status, headers=exc.headers())
        return error_response(exc)

    def unauthenticated(request: Request) -> GatewayError | None:
        """FastAPI parses and checks a body before the route's dependencies run: a request
        without a valid key must still be told that first."""
        try:
            gw.authenticate(request.headers.get("authorization"))
        except GatewayError as refused:
            return refused
        return None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if refused := unauthenticated(request):
            return await _gateway_error(request, refused)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            error = GatewayError(400, f"the body is not valid JSON: {first.get('msg')}")
        else:
            where = ".".join(loc) or "body"
            error = GatewayError(422, f"{where}: {first.get('msg')}", param=where)
        return await _gateway_error(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and (refused := unauthenticated(request)):
            return await _gateway_error(request, refused)
        return error_response(GatewayError(exc.status_code, str(exc.detail), type="api_error"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("gateway request failed")  # a bug of ours: say so, keep serving
        return await _gateway_error(
            request, GatewayError(500, f"internal error: {type(exc).__name__}")
        )

    # Dependencies, so that a caller without a valid key gets 401 before any body checks. Async:
    # FastAPI runs a plain def in a worker thread, a thread hop per request for a lookup.
    async def caller(request: Request) -> Principal:
        return gw.authenticate(request.headers.get("authorization"))

    async def admin_caller(request: Request) -> Principal:
        principal = await caller(request)
        if principal.admin:
            return principal
        if principal.project is not None:  # an admin's scoped key is a plain key of its project
            raise GatewayError(
                403,
                f"API key {principal.key_id} is scoped to project {principal.project!r}, so it is "
                "not an administrator's key: the admin API needs an administrator's key with no "
                "project scope",
                code="permission_denied",
            )
        raise GatewayError(
            403, f"{principal.user!r} is not an administrator", code="permission_denied"
        )

    User = Annotated[Principal, Depends(caller)]
    Admin = Annotated[Principal, Depends(admin_caller)]

    if docs:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_schema(principal: User) -> JSONResponse:
            """The OpenAPI document, for client generators and fuzzers: any valid key."""
            return JSONResponse(app.openapi(), headers=SCHEMA_HEADERS)

    # --- OpenAI ----------------------------------------------------------------------------

    @app.get("/v1/models", response_model=api.ModelList)
    async def list_models(principal: User) -> Any:
        models = [
            api.Model(id=m, created=int(gw.started), owned_by="atoll", root=m)
            for m in sorted(gw.base_models())
        ]
        for a in gw.accounts.visible_adapters(principal):
            owner = a.project or a.owner or "public"
            models.append(
                api.Model(
                    id=a.id,
                    created=int(a.created),
                    owned_by=owner,
                    parent=a.base_model,
                    root=a.base_model,
                )
            )
        return _json(api.ModelList(data=models))

    @app.post("/v1/chat/completions", response_model=api.ChatCompletion)
    async def chat(principal: User, body: api.ChatCompletionRequest) -> Any:
        target = gw.resolve(principal, body.model, api.mixture_of(body))
        rid = uuid.uuid4().hex
        requests = _ids(api.chat_to_generate(body, target.base, target.adapter), rid)
        prompt = _prompt_text(principal, [m.model_dump(mode="json") for m in body.messages])
        events = gw.run(principal, target, requests, per_prompt=len(requests), prompt_text=prompt)
        if body.stream:
            stream = api.ChatStream(
                rid,
                body.model,
                len(requests),
                include_usage=body.include_usage,
                logprobs=bool(body.logprobs),
            )
            return await _sse(events, stream.chunks, stream.finish, stream.error)
        choices = await _collect(events, len(requests))
        return _json(api.chat_completion(rid, body.model, choices, logprobs=bool(body.logprobs)))

    @app.post("/v1/completions", response_model=api.Completion)
    async def completions(principal: User, body: api.CompletionRequest) -> Any:
        target = gw.resolve(principal, body.model, api.mixture_of(body))
        rid = uuid.uuid4().hex
        requests = _ids(api.completion_to_generate(body, target.base, target.adapter), rid)
        per_prompt = body.choices_per_prompt
        prompt = _prompt_text(principal, body.prompt)
        events = gw.run(principal, target, requests, per_prompt=per_prompt, prompt_text=prompt)
        logprobs = bool(body.logprobs is not None)
        if body.stream:
            stream = api.CompletionStream(
                rid,
                body.model,
                len(requests),
                per_prompt=per_prompt,
                include_usage=body.include_usage,
                logprobs=logprobs,
            )
            return await _sse(events, stream.chunks, stream.finish, stream.error)
        choices = await _collect(events, len(requests))
        return _json(
            api.completion(rid, body.model, choices, per_prompt=per_prompt, logprobs=logprobs)
        )

    @app.post("/v1/embeddings", response_model=api.CreateEmbeddingResponse)
    async def embeddings(principal: User, body: api.EmbeddingRequest) -> Any:
        embed = api.embedding_to_embed(body, body.model)
        reply = await gw.call(
            principal, body.model, "embed", embed, _prompt_text(principal, body.input)
        )
        result = EmbedResult.model_validate(reply)
        return _json(api.embedding_response(result, body.model, body.encoding_format))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        principal: User,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float | None, Form()] = None,
    ) -> Any:
        try:
            params = TranscribeRequest(
                audio=await file.read(),
                filename=file.filename or "audio",
                model=model,
                language=language,
                prompt=prompt,
                response_format=response_format,  # type: ignore[arg-type]
                temperature=temperature,
            )
        except ValueError as exc:
            raise GatewayError(422, f"invalid transcription request: {exc}") from None
        reply = await gw.call(principal, model, "transcribe", params, None)
        result = TranscribeResult.model_validate(reply)
        if response_format in ("text", "srt", "vtt"):
            return PlainTextResponse(result.text)
        return result.body if isinstance(result.body, dict) else {"text": result.text}

    finetune.install(app, gw, User)

    # --- LoRAX -----------------------------------------------------------------------------

    async def lorax(
        principal: Principal, body: api.LoraxRequest, stream: bool, listed: bool
    ) -> Any:
        mixture = api.lorax_mixture(body)
        adapter_id = body.params.adapter_id
        model = adapter_id or gw.default_base()
        target = gw.resolve(principal, model if not mixture else gw.default_base(), mixture)
        rid = uuid.uuid4().hex
        generate = api.lorax_to_generate(body, target.base, target.adapter)
        events = gw.run(
            principal,
            target,
            _ids([generate], rid),
            per_prompt=1,
            prompt_text=_prompt_text(principal, body.inputs),
        )
        if stream:
            out = api.LoraxStream(body)
            return await _sse(events, lambda _i, e: out.chunks(e), lambda: b"", out.error)
        (choice,) = await _collect(events, 1)
        reply = api.lorax_response(body, choice)
        return [reply] if listed else reply

    @app.post("/", response_model=list[api.LoraxResponse])
    async def lorax_root(principal: User, body: api.LoraxRequest) -> Any:
        return await lorax(principal, body, bool(body.stream), listed=True)

    @app.post("/generate", response_model=api.LoraxResponse)
    async def lorax_generate(principal: User, body: api.LoraxRequest) -> Any:
        return await lorax(principal, body, False, listed=False)

    @app.post("/generate_stream")
    async def lorax_generate_stream(principal: User, body: api.LoraxRequest) -> Any:
        return await lorax(principal, body, True, listed=False)

    # --- operations ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "models": sorted(gw.base_models())}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(_: Admin) -> str:
        return prometheus_text(gw.watch.metrics)

    @app.get("/admin/feed")
    async def feed(_: Admin, request: Request) -> StreamingResponse:
        """Server-sent events: the tenant's agents (status, load, metrics) every second."""

        async def frames() -> AsyncIterator[bytes]:
            while not await request.is_disconnected():
                yield api.sse({"agents": finite(plain(gw.watch.rows()))})
                await asyncio.sleep(FEED_INTERVAL)

        return StreamingResponse(frames(), media_type="text/event-stream")

    # --- administration (the same operations as the overlay admin RPC) ----------------------

    def admin_route(path: str, method: str, name: str, http: str = "POST") -> None:
        schema = c.METHODS[name]
        handler = getattr(admin, name)

        async def endpoint(principal: Principal, request: Request, body: Any = None) -> Any:
            if schema is not None and http == "GET":
                body = api.parse_body(schema, dict(request.query_params))
            return plain(handler(body, principal.user))

        # A real signature, so FastAPI checks the body and puts its schema in /openapi.json.
        params = [
            inspect.Parameter("principal", inspect.Parameter.KEYWORD_ONLY, annotation=Admin),
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        ]
        if schema is not None and http == "POST":
            params.append(
                inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=schema)
            )
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        app.add_api_route(path, endpoint, methods=[http], name=method)

    admin_route("/admin/users", "create_user", "users_create")
    admin_route("/admin/users", "list_users", "users_list", "GET")
    admin_route("/admin/projects", "create_project", "projects_create")
    admin_route("/admin/projects", "list_projects", "projects_list", "GET")
    admin_route("/admin/members", "add_member", "projects_add_member")
    admin_route("/admin/members/remove", "remove_member", "projects_remove_member")
    admin_route("/admin/keys", "create_key", "keys_create")
    admin_route("/admin/keys", "list_keys", "keys_list", "GET")
    admin_route("/admin/keys/revoke", "revoke_key", "keys_revoke")
    admin_route("/admin/keys/rotate", "rotate_key", "keys_rotate")
    admin_route("/admin/adapters", "register_adapter", "adapters_register")
    admin_route("/admin/adapters", "list_adapters", "adapters_list", "GET")
    admin_route("/admin/usage", "usage", "usage", "GET")
    admin_route("/admin/audit", "audit", "audit", "GET")
    webui.install(app, User)

    return BodyLimit(app, gw.max_body_bytes)  # type: ignore[return-value]


def _json(body: Any) -> Response:
    """Built and checked by openai_api already: serialised once, not validated again by FastAPI
    (``response_model`` stays on the route for the OpenAPI schema)."""
    return Response(body.model_dump_json(), media_type="application/json")


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: a diverging loss is a gauge value the feed
    carries, and JSON (the browser's JSON.parse) has no spelling for it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def _is_lorax(request: Request) -> bool:
    return request.url.path in ("/", "/generate", "/generate_stream")


def _ids(requests: list[GenerateRequest], rid: str) -> list[GenerateRequest]:
    return [r.model_copy(update={"request_id": rid}) for r in requests]


def _prompt_text(principal: Principal, prompt: Any) -> str | None:
    """Prompt text for the ledger, only for projects that opted in."""
    if not principal.store_prompts:
        return None
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


async def _collect(events: AsyncIterator[tuple[int, Event]], n: int) -> list[list[Event]]:
    choices: list[list[Event]] = [[] for _ in range(n)]
    async for index, event in events:
        choices[index].append(event)
    return choices


async def _sse(
    events: AsyncIterator[tuple[int, Event]],
    chunks: Callable[[int, Event], bytes],
    finish: Callable[[], bytes],
    error: Callable[[GatewayError], bytes],
) -> Response:
    """A streaming response whose status is settled by the first event: an error before it is an
    honest HTTP status; after it, an error event ends the stream."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        raise GatewayError(503, "the inference node ended without answering") from None

    async def body() -> AsyncIterator[bytes]:
        try:
            yield chunks(*first)
            async for index, event in events:
                if data := chunks(index, event):
                    yield data
            yield finish()  # after the ledger row: `events` has ended
        except GatewayError as exc:
            yield error(exc)
        finally:
            await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
