"""The gateway's HTTP API (FastAPI): errors in OpenAI's (or LoRAX's) shape, who is calling, the
admin API, Prometheus /metrics and the live feed; the inference routes are inference_routes.py's,
files and fine-tuning finetune.py's, batches batches.py's, vector stores vector_routes.py's, the
web UI webui.py's, its single sign-on sso.py's."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, some of which
# (User, Admin) are local to create_app.
import asyncio
import csv
import inspect
import io
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry.trace import Tracer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atoll.agent.prometheus import exposition
from atoll.plugins.gateway import (
    adapter_routes,
    finetune,
    inference_routes,
    mixture_routes,
    pipeline_routes,
    self_service,
    vector_routes,
    webui,
)
from atoll.plugins.gateway import batches as batch_routes
from atoll.plugins.gateway import contract as c
from atoll.plugins.gateway import evaluations as evaluation_routes
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.admin import AdminRPC, plain, settle
from atoll.plugins.gateway.batches import Batches
from atoll.plugins.gateway.bodies import parse_body, sse
from atoll.plugins.gateway.dataset_features import DatasetFeatures
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.evaluations import Evaluations
from atoll.plugins.gateway.lorax_api import lorax_error
from atoll.plugins.gateway.mixture_routes import MixtureSearches
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.gateway.sso import Sso
from atoll.plugins.gateway.traces import TraceRequests
from atoll.plugins.gateway.vector_batches import FileBatches
from atoll.plugins.gateway.vector_stores import VectorStores
from atoll.plugins.inference.contract import MAX_AUDIO_BYTES

log = logging.getLogger(__name__)
FEED_INTERVAL = 1.0  # seconds between frames of the admin live feed


# An audio upload's body: the file (MAX_AUDIO_BYTES) and its multipart form around it.
AUDIO_BODY_BYTES = MAX_AUDIO_BYTES + 1024 * 1024


class BodyLimit:
    """413 for a body over ``limit`` bytes (an audio upload: ``AUDIO_BODY_BYTES``), before it is
    read whole (Content-Length or not)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = AUDIO_BODY_BYTES if scope["path"].startswith("/v1/audio/") else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise GatewayError(413, f"the request body is over {limit} bytes")
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


@dataclass(frozen=True)
class Services:
    """What the routes serve besides the gateway's own: the runs and stores the plugin keeps
    in its data directory (and closes when it stops)."""

    evaluations: Evaluations
    batches: Batches
    mixtures: MixtureSearches
    vector_stores: VectorStores
    file_batches: FileBatches
    features: DatasetFeatures


def create_app(
    gw: Gateway,
    services: Services,
    docs: bool = False,
    sso: Sso | None = None,
    tracer: Tracer | None = None,
) -> FastAPI:
    """The app; ``docs`` serves ``/openapi.json`` to callers with a key (off: 404); ``sso``
    logs the web UI in through an OpenID Connect provider (None: API keys only); ``tracer``
    traces the OpenAI inference requests (traces.py; None: no middleware at all)."""
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
    admin = AdminRPC(gw)

    # --- errors in OpenAI's shape -----------------------------------------------------------

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        if request.url.path in inference_routes.LORAX_PATHS:
            return JSONResponse(lorax_error(exc), status_code=exc.status, headers=exc.headers())
        return error_response(exc)

    async def unauthenticated(request: Request) -> GatewayError | None:
        """FastAPI parses and checks a body before the route's dependencies run: a request
        without a valid key must still be told that first."""
        try:
            await gw.authenticate(request.headers.get("authorization"))
        except GatewayError as refused:
            return refused
        return None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if refused := await unauthenticated(request):
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
        if exc.status_code == 400 and (refused := await unauthenticated(request)):
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
        return await gw.authenticate(request.headers.get("authorization"))

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

    inference_routes.install_openai(app, gw, User)
    s = services
    finetune.install(app, gw, User, s.features)
    evaluation_routes.install(app, s.evaluations, User)
    mixture_routes.install(app, s.mixtures, User)
    batch_routes.install(app, s.batches, User)
    vector_routes.install(app, s.vector_stores, s.file_batches, s.features, User)
    adapter_routes.install(app, gw, User)
    inference_routes.install_lorax(app, gw, User)

    # --- operations ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "models": sorted(gw.catalog.base_models())}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(_: Admin, request: Request) -> Response:
        """Prometheus exposition of every agent of the tenant, OpenMetrics when asked for. The
        gateway's own agent is built now and listed first: there before any feed message
        arrived, and it wins a name clash; the others are as the feed last brought them."""
        own = gw.own_feed()
        others = {n: m for n, m in gw.watch.metrics.items() if n != own["agent"]}
        body, content_type = exposition(
            {own["agent"]: own, **others}, request.headers.get("accept")
        )
        return Response(body, media_type=content_type)

    @app.get("/admin/feed")
    async def feed(_: Admin, request: Request) -> StreamingResponse:
        """Server-sent events: the tenant's agents (status, load, metrics) every second."""

        async def frames() -> AsyncIterator[bytes]:
            while not await request.is_disconnected():
                yield sse({"agents": finite(plain(gw.watch.rows()))})
                await asyncio.sleep(FEED_INTERVAL)

        return StreamingResponse(frames(), media_type="text/event-stream")

    # --- administration (the same operations as the overlay admin RPC) ----------------------

    def admin_route(path: str, method: str, name: str, http: str = "POST") -> None:
        schema = c.METHODS[name].params
        handler = getattr(admin, name)

        async def endpoint(principal: Principal, request: Request, body: Any = None) -> Any:
            if http == "GET":
                body = parse_body(schema, dict(request.query_params))
            result = plain(await settle(handler(body, principal.user)))
            if getattr(body, "format", None) == "csv":
                return usage_csv(result)
            return result

        # A real signature, so FastAPI checks the body and puts its schema in /openapi.json.
        params = [
            inspect.Parameter("principal", inspect.Parameter.KEYWORD_ONLY, annotation=Admin),
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        ]
        if http == "POST":
            params.append(
                inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=schema)
            )
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        app.add_api_route(path, endpoint, methods=[http], name=method)

    admin_route("/admin/users", "create_user", "users_create")
    admin_route("/admin/users", "list_users", "users_list", "GET")
    admin_route("/admin/identities", "list_identities", "identities_list", "GET")
    admin_route("/admin/identities/link", "link_identity", "identities_link")
    admin_route("/admin/identities/unlink", "unlink_identity", "identities_unlink")
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
    admin_route("/admin/audit/verify", "verify_audit", "audit_verify", "GET")
    admin_route("/admin/retention", "set_retention", "retention_set")
    admin_route("/admin/retention", "list_retention", "retention_list", "GET")
    admin_route("/admin/retention/purge", "purge_retention", "retention_purge")
    admin_route("/admin/budgets", "set_budget", "budgets_set")
    admin_route("/admin/budgets", "list_budgets", "budgets_list", "GET")
    admin_route("/admin/budgets/remove", "remove_budget", "budgets_remove")
    self_service.install(app, gw, User, usage_csv)
    pipeline_routes.install(app, gw, Admin)
    if sso is not None:
        sso.install(app)  # before the UI's static files, which would answer its paths 404
    webui.install(app, User)

    limited = BodyLimit(app, gw.max_body_bytes)
    # Outermost, so that a request refused early (413) is traced too.
    return TraceRequests(limited, tracer) if tracer else limited  # type: ignore[return-value]


def usage_csv(report: dict[str, Any]) -> Response:
    """A usage report's groups (or its totals alone) as CSV, for a spreadsheet (chargeback)."""
    rows = report.get("groups") or [{k: v for k, v in report.items() if k != "groups"}]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    disposition = {"content-disposition": 'attachment; filename="usage.csv"'}
    return Response(text.getvalue(), media_type="text/csv", headers=disposition)


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
