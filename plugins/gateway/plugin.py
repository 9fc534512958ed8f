"""The gateway plugin: the platform's only door for users. It serves the HTTP API (app.py) with
uvicorn inside the agent's event loop, keeps accounts, keys and the ledger in SQLite in its data
dir (or in a PostgreSQL database that gateways share: ``database``), and reaches inference agents
over the overlay (router.py).

On first start it creates the tenant's ``admin`` user and writes one admin API key to
``<plugin data dir>/admin-key`` (0600): the key is shown once, there, and never stored in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
from typing import Any, Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from atoll.agent.config import check_listen
from atoll.agent.errors import AtollError
from atoll.agent.imports import Imports
from atoll.agent.plugins import Plugin, PluginContext
from atoll.agent.tracing import check_endpoint, start_tracing
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.admin import AdminRPC
from atoll.plugins.gateway.app import Services, create_app
from atoll.plugins.gateway.batches import Batches
from atoll.plugins.gateway.catalog import describe_node
from atoll.plugins.gateway.contract import Price
from atoll.plugins.gateway.dataset_features import DatasetFeatures
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.evaluations import Evaluations
from atoll.plugins.gateway.http_limits import HttpLimits, guarded_protocol
from atoll.plugins.gateway.limits import RateLimiter
from atoll.plugins.gateway.mixture_routes import MixtureSearches
from atoll.plugins.gateway.rate_exchange import exchange_rates
from atoll.plugins.gateway.router import ModelRouter
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.gateway.spending import TEMPLATE_TOKENS, Spending
from atoll.plugins.gateway.sso import OidcConfig, Sso, read_client_secret
from atoll.plugins.gateway.vector_batches import FileBatches
from atoll.plugins.gateway.vector_stores import VectorStores
from atoll.plugins.inference.contract import PLUGIN as INFERENCE
from atoll.plugins.storage.contract.adapters import (
    ADAPTERS_DELETED,
    ADAPTERS_NEW,
    AdapterNotFound,
    describe_adapter,
)
from atoll.protocol.session import Publication
from atoll.tenancy.keys import read_secret, write_secret

ADMIN_USER = "admin"
ADAPTER_LOOKUP_TIMEOUT = 10.0  # seconds to ask storage for a newly announced adapter
DISCOVERY_POLL = 0.1  # seconds between looks at discovery for an announcing storage agent
MAX_HINTS_WAITING = 64  # adapters.new hints from sources discovery does not list yet


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = "127.0.0.1:8000"  # HOST:PORT; port 0 picks a free one
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # larger bodies: 413
    request_timeout: float = Field(120.0, gt=0)  # deadline of one request: 504 after it
    retry_attempts: int = Field(3, ge=1, le=10)  # nodes tried before the first token
    # Inference nodes of other tenants that operator-signed grants let this one use
    # (docs/security.md): "fallback" for base models no node of its own serves, "prefer" them
    # before its own, "off" never.
    imports: Literal["fallback", "prefer", "off"] = "fallback"
    bootstrap_admin: bool = True
    storage: str | None = None  # agent of the storage plugin (files); None: discovery
    queue: str | None = None  # agent of the training queue (fine-tuning); None: discovery
    # Bounded resources: a request's head must arrive within header_timeout, its body progress
    # every body_timeout; an idle keep-alive connection closes after idle_timeout; beyond
    # max_connections open sockets a new one is answered 503 at once.
    header_timeout: float = Field(10.0, gt=0, le=300)
    body_timeout: float = Field(30.0, gt=0, le=600)
    # Longer than clients keep an idle pooled connection (httpx 5 s, aiohttp 15 s; nginx's own
    # default is 75 s): a server closing first races the client's next request on that
    # connection, which then fails with no response at all (a lab run lost a request so).
    idle_timeout: float = Field(75.0, gt=0, le=600)
    max_connections: int = Field(1000, ge=1, le=100_000)
    # GET /openapi.json for callers with a key (client generators, fuzzers); off: 404. There is
    # never a /docs or /redoc page (FastAPI's load scripts from a CDN on the web UI's origin).
    docs: bool = False
    # Distinct models, adapters and projects each labels the gateway's metrics with; later ones
    # are counted as "other", so thousands of adapters cannot explode the series count.
    metrics_label_values: int = Field(100, ge=1, le=10_000)
    # What tokens cost, per base model or adapter id (budgets in cost count with it); a model
    # with no price costs nothing.
    prices: dict[str, Price] = {}
    # Tokens a chat template may add to a prompt (a default system prompt, markers), reserved
    # against budgets beside the prompt's own bytes.
    template_tokens: int = Field(TEMPLATE_TOKENS, ge=0, le=100_000)
    # Where accounts, keys, budgets, the ledger and the audit log are kept: None, a SQLite file
    # in the data dir; a postgresql:// URL, a database that several gateways may share (each
    # with a copy of the first one's gateway.secret).
    database: str | None = None
    # Batch API lines this gateway runs at once (all batches together), below interactive
    # requests' priority (batch_gate.py).
    batch_concurrency: int = Field(4, ge=1, le=256)
    # Single sign-on for the web UI (sso.py); None: the UI logs in with an API key only.
    oidc: OidcConfig | None = None
    # OTLP/HTTP traces of the OpenAI inference requests (traces.py), e.g.
    # "http://collector:4318/v1/traces"; None: no tracing at all.
    otlp_traces_endpoint: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return check_listen(v)

    @field_validator("database")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("database is a postgresql:// URL (leave it out for SQLite)")
        return v

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp(cls, v: str | None) -> str | None:
        return check_endpoint(v)


class GatewayPlugin(Plugin):
    name = "gateway"
    config_model = GatewayConfig
    new_admin_key: str | None = None  # the admin key made at this start (a first start only)
    sso: Sso | None = None  # single sign-on for the web UI, when configured
    _rates: asyncio.Task[None] | None = None  # rate limits exchanged with other gateways

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        self.config = config = ctx.settings(GatewayConfig)
        secret_path = ctx.data_dir / "gateway.secret"
        if not secret_path.exists():
            write_secret(secret_path, secrets.token_bytes(32))
        secret = read_secret(secret_path)
        # Read first: a missing file stops the start before the database is opened.
        oidc = config.oidc
        oidc_secret = read_client_secret(oidc.client_secret_file) if oidc else None
        self.accounts = Accounts(config.database or ctx.data_dir / "gateway.sqlite", secret)
        await self.accounts.listen()  # other gateways' commits, on a shared database
        if oidc is not None and oidc_secret is not None:
            self.sso = Sso(oidc, oidc_secret, secret, self.accounts)
        if config.bootstrap_admin:
            self._bootstrap_admin()
        self.watch = await ctx.watch()
        # Inference nodes of other tenants that grants let this one use, beside its own.
        describe = functools.partial(describe_node, ctx)
        self.imports = Imports(ctx.imports, self.watch.discovery, INFERENCE, describe)
        if config.imports != "off":
            self.imports.start()
        router = ModelRouter(ctx, self.watch.discovery, attempts=config.retry_attempts)
        router.prefer_imported = config.imports == "prefer"
        self.tracing = start_tracing(config.otlp_traces_endpoint, "atoll-gateway", ctx.identity)
        if self.tracing is not None:
            router.tracer = self.tracing.tracer
        self.gateway = Gateway(
            accounts=self.accounts,
            limiter=RateLimiter(),
            router=router,
            watch=self.watch,
            metrics=ctx.metrics,
            own_feed=ctx.metrics_snapshot,
            request_timeout=config.request_timeout,
            max_body_bytes=config.max_body_bytes,
            storage=config.storage,
            queue=config.queue,
            label_values=config.metrics_label_values,
            # A reservation outlives its request's deadline only by the time its row takes.
            spending=Spending(
                self.accounts, config.prices, config.template_tokens, config.request_timeout + 60
            ),
        )
        self.admin = AdminRPC(self.gateway)
        self.evaluations = Evaluations(self.gateway, ctx.data_dir / "evaluations")
        self.mixtures = MixtureSearches(self.gateway, ctx.data_dir / "mixture_searches")
        self.batches = Batches(self.gateway, ctx.data_dir / "batches", config.batch_concurrency)
        stores = VectorStores(self.gateway)
        self.services = Services(
            evaluations=self.evaluations,
            batches=self.batches,
            mixtures=self.mixtures,
            vector_stores=stores,
            file_batches=FileBatches(stores, ctx.data_dir / "vector_file_batches"),
            features=DatasetFeatures(stores),
        )
        # New adapters (uploaded, or made by a training job) become usable by their owner or
        # project at once.
        self._hints_waiting: set[asyncio.Task[None]] = set()
        self._adapters_sub = await ctx.subscribe(ADAPTERS_NEW, self._on_new_adapter)
        self._deleted_sub = await ctx.subscribe(ADAPTERS_DELETED, self._on_deleted_adapter)
        host, _, port = config.listen.rpartition(":")
        sock = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
        # create_server leaves proto 0, and asyncio sets TCP_NODELAY only on proto 6 sockets:
        # uvicorn writes a response's head and body apart, so Nagle + delayed ACK cost ~40 ms.
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        server_config = uvicorn.Config(
            create_app(
                self.gateway,
                self.services,
                docs=config.docs,
                sso=self.sso,
                tracer=self.tracing.tracer if self.tracing else None,
            ),
            log_level="warning",
            lifespan="off",
            access_log=False,
            # X-Forwarded-* are not trusted (and not parsed): a proxy in front is the operator's
            # to configure; the ledger records the key, not the address.
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            # uvicorn annotates an int but hands it to call_later: a fraction of a second works.
            timeout_keep_alive=config.idle_timeout,  # type: ignore[arg-type]
            http=guarded_protocol(
                HttpLimits(config.header_timeout, config.body_timeout, config.max_connections)
            ),
        )
        self.server = uvicorn.Server(server_config)
        self._serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        await self._wait_started()
        self.batches.start()  # those a stopped gateway left unfinished
        if self.accounts.shared:  # other gateways may admit requests of the same keys
            me = f"{ctx.identity.tenant}/{ctx.identity.name}"
            self._rates = asyncio.create_task(
                exchange_rates(self.accounts, self.gateway.limiter, me, ctx.log)
            )
        ctx.log.info("gateway.listening", url=self.url)

    async def _wait_started(self) -> None:
        for _ in range(500):  # bounded: 10 s
            if self.server.started:
                return
            if self._serving.done():
                self._serving.result()  # raises why it could not start
            await asyncio.sleep(0.02)
        raise RuntimeError("the gateway's HTTP server did not start within 10 s")

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def _on_new_adapter(self, pub: Publication) -> None:
        """An announcement is only a hint naming an adapter: its owner, project and visibility
        come from the storage agent that announced it (the configured one, or one discovery
        lists: the broker lets only storage publish there, and the gateway checks again), never
        from the publication; a registration that disagrees with storage is corrected."""
        log = self.ctx.log
        adapter_id = pub.data.get("id") if isinstance(pub.data, dict) else None
        if not isinstance(adapter_id, str):
            log.warning("gateway.adapter_hint_refused", src=pub.src, reason="no adapter id")
            return
        storage = pub.src.partition("/")[0]
        if self._is_storage(storage):
            await self._register_from_storage(storage, adapter_id, pub.src)
        elif self.config.storage or len(self._hints_waiting) >= MAX_HINTS_WAITING:
            log.warning("gateway.adapter_hint_refused", src=pub.src, reason="not a storage agent")
        else:
            # An agent that adds its storage plugin after starting shows it in discovery at its
            # next heartbeat: wait for that aside (bounded), so that hints from other sources
            # are not held up behind this one. Each hint reads storage's record afresh, so the
            # order they are handled in does not matter.
            task = asyncio.create_task(self._when_storage(storage, adapter_id, pub.src))
            self._hints_waiting.add(task)
            task.add_done_callback(self._hints_waiting.discard)

    def _is_storage(self, agent: str) -> bool:
        """``agent`` is the configured storage agent or, with none configured, one that
        discovery lists with the storage plugin."""
        if self.config.storage:
            return agent == self.config.storage.partition("/")[0]
        view = self.watch.discovery
        return any(e.name == agent for e in view.select(plugin="storage", status=None))

    async def _when_storage(self, storage: str, adapter_id: str, src: str) -> None:
        for _ in range(int(ADAPTER_LOOKUP_TIMEOUT / DISCOVERY_POLL)):  # bounded
            await asyncio.sleep(DISCOVERY_POLL)
            if self._is_storage(storage):
                try:
                    await self._register_from_storage(storage, adapter_id, src)
                except Exception as exc:  # no subscription pump here to log it
                    self.ctx.log.error("gateway.adapter_not_registered", id=adapter_id, error=exc)
                return
        self.ctx.log.warning("gateway.adapter_hint_refused", src=src, reason="not a storage agent")

    async def _register_from_storage(self, storage: str, adapter_id: str, src: str) -> None:
        """Register ``adapter_id`` (or correct its registration) from ``storage``'s record."""
        log = self.ctx.log
        try:
            record = await describe_adapter(
                self.ctx, f"{storage}/storage", adapter_id, ADAPTER_LOOKUP_TIMEOUT
            )
        except AtollError as exc:  # AdapterNotFound: a hint for nothing stored
            log.warning("gateway.adapter_not_registered", id=adapter_id, src=src, error=exc)
            return
        if record.id != adapter_id:  # storage answers for the id asked, or not at all
            log.warning("gateway.adapter_not_registered", id=adapter_id, src=src)
            return
        owner = None if record.project else record.owner
        truth = (owner, record.project, record.public)
        try:
            known = self.accounts.adapter(record.id)
            if known is None:
                self.accounts.register_adapter(
                    record.id, record.base_model, owner, record.project, record.public,
                    actor=src,
                )  # fmt: skip
            elif (known.owner, known.project, known.public) != truth:
                self.accounts.update_adapter(
                    record.id, actor=src, owner=owner, project=record.project,
                    public=record.public,
                )  # fmt: skip
                log.warning(
                    "gateway.adapter_corrected", id=record.id, owner=owner,
                    project=record.project, public=record.public,
                    was_owner=known.owner, was_project=known.project, was_public=known.public,
                )  # fmt: skip
        except GatewayError as exc:  # e.g. an owner this gateway does not know: say so
            log.warning("gateway.adapter_not_registered", id=record.id, error=exc)

    async def _on_deleted_adapter(self, pub: Publication) -> None:
        """A deletion is a hint too: access is taken back only once the storage agent that
        announced it (as for ``adapters.new``) answers that it holds no such adapter."""
        adapter_id = pub.data.get("id") if isinstance(pub.data, dict) else None
        storage = pub.src.partition("/")[0]
        if not isinstance(adapter_id, str) or not self._is_storage(storage):
            self.ctx.log.warning("gateway.adapter_hint_refused", src=pub.src, reason="deletion")
            return
        try:
            await describe_adapter(
                self.ctx, f"{storage}/storage", adapter_id, ADAPTER_LOOKUP_TIMEOUT
            )
            return  # still stored: nothing to take back
        except AdapterNotFound:
            pass
        except AtollError as exc:  # unreachable: keep access rather than guess
            self.ctx.log.warning("gateway.adapter_not_unregistered", id=adapter_id, error=exc)
            return
        if self.accounts.adapter(adapter_id) is not None:
            self.accounts.unregister_adapter(adapter_id, actor=pub.src)
            self.ctx.log.info("gateway.adapter_unregistered", id=adapter_id, src=pub.src)

    async def stop(self) -> None:
        await self._adapters_sub.unsubscribe()
        await self._deleted_sub.unsubscribe()
        for task in list(self._hints_waiting):
            task.cancel()
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._serving, 10)
        await self.evaluations.close()
        await self.mixtures.close()
        await self.services.file_batches.close()
        await self.batches.close()
        await self.imports.stop()
        await self.watch.stop()
        if self._rates is not None:
            self._rates.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rates
        await self.accounts.unlisten()
        self.accounts.close()
        if self.tracing is not None:  # the last requests' spans, ended with the server
            await asyncio.to_thread(self.tracing.close)

    def describe(self) -> dict[str, Any]:
        return {"endpoints": {"http": self.url}, "capabilities": {"openai": True, "lorax": True}}

    def status(self) -> dict[str, Any]:
        # `atoll up` shows the admin key once, read from its file, after the start that wrote it.
        return {
            "url": self.url,
            "admin_key_file": str(self.ctx.data_dir / "admin-key"),
            "new_admin_key": self.new_admin_key is not None,
        }

    def rpc_methods(self) -> dict[str, Any]:
        return self.admin.methods()

    def _bootstrap_admin(self) -> None:
        if any(u.name == ADMIN_USER for u in self.accounts.list_users()):
            return
        try:
            self.accounts.create_user(ADMIN_USER, admin=True, actor="gateway")
        except GatewayError as exc:  # another gateway on the same database, starting too
            if exc.code == "already_exists":
                return
            raise
        _, key = self.accounts.create_key(ADMIN_USER, name="bootstrap", actor="gateway")
        path = self.ctx.data_dir / "admin-key"
        write_secret(path, key.encode())
        os.chmod(path, 0o600)
        self.new_admin_key = key  # for `atoll up` to show once
        self.ctx.log.warning("gateway.admin_key_written", path=str(path))
