"""Single sign-on for the web UI with OpenID Connect: the authorization code flow with PKCE
(S256), through authlib, which also checks the ID token (signature by the provider's JWKS,
issuer, audience, nonce, expiry).

- ``GET /ui/sso`` (anyone): the provider's display name, for the log-in page's button.
- ``GET /ui/login`` (anyone): to the provider, with a fresh state, nonce and PKCE verifier kept
  in a sealed cookie (HMAC with the gateway's secret, ten minutes, this path only): no server
  state, so gateways sharing a database and secret may each finish a login another began.
- ``GET /ui/callback`` (the browser that began the login: the state must match its cookie):
  the code exchanged, the claims mapped (accounts/identities.py does the rest in one
  transaction), a project-less API key made for the session. It goes to the page in an
  HttpOnly, SameSite=Strict cookie scoped to ``/ui/claim``, never in a URL; a refusal is a page
  saying why, with an honest status, and changes nothing.
- ``POST /ui/claim`` (the browser holding that cookie): the key, once; the page then calls the
  API with it as a Bearer token like any key, so no API route accepts a cookie (no CSRF).
- ``GET /ui/logout`` (anyone): after the page revoked its key, on to the provider's
  end-session endpoint and back to the log-in page.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import base64
import hashlib
import hmac
import html
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx2  # authlib's HTTP client (it falls back to httpx, deprecated, without it)
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import StarletteOAuth2App
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from joserfc.errors import JoseError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.identities import SignIn
from atoll.plugins.gateway.accounts.keys import KEY_FORMAT
from atoll.plugins.gateway.accounts.users import NAME
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.webui import HEADERS

log = logging.getLogger(__name__)
FLOW_COOKIE = "atoll_sso_flow"
KEY_COOKIE = "atoll_sso_key"
FLOW_TTL_S = 600  # a login must come back from the provider within this
CLAIM_TTL_S = 60  # the page claims its key at once after the redirect
PROVIDER_TIMEOUT_S = 10.0
LOOPBACK = ("localhost", "127.0.0.1", "::1")
ERROR_CODE = re.compile(r"[a-z_]{1,64}")  # OAuth's error codes (RFC 6749 4.1.2.1)
ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri")  # what the flow uses
ROLE_RANK = {"viewer": 0, "member": 1, "owner": 2}  # a user in several groups gets the highest


class GroupRole(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str
    role: Literal["owner", "member", "viewer"] = "member"

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError("a project name is 1-64 characters of a-z 0-9 . _ -")
        return v


class OidcConfig(BaseModel):
    """``[plugins.gateway.oidc]``: the provider, how its claims map to users and projects."""

    model_config = ConfigDict(extra="forbid")

    issuer: str  # its discovery document is <issuer>/.well-known/openid-configuration
    client_id: str = Field(min_length=1)
    # A file holding the client secret (never the secret in the TOML): the gateway is a
    # confidential client, authenticated at the token endpoint besides PKCE.
    client_secret_file: Path
    name: str = Field("single sign-on", min_length=1, max_length=64)  # "Log in with <name>"
    scopes: list[str] = ["openid", "profile", "email"]
    username_claim: str = "preferred_username"  # lowercased; names a new user
    groups_claim: str = "groups"
    groups: dict[str, GroupRole] = {}  # provider group -> (project, role); the truth for those
    admin_groups: list[str] = []  # set: admin exactly when in one; empty: admin left alone
    require_group: bool = False  # refuse a user in none of ``groups`` and ``admin_groups``
    create_users: bool = True  # an unknown user is created at their first login
    # An existing Atoll user not yet linked to this provider is linked by name at first login
    # (off: refused): only where the username claim cannot be chosen by the user.
    match_existing_users: bool = False
    session_ttl_s: float = Field(8 * 3600, ge=60, le=7 * 86400)  # the session key's lifetime
    # The callback URL registered at the provider; None: this gateway's own URL + /ui/callback
    # (set it behind a proxy that terminates TLS).
    redirect_url: str | None = None

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        url = urlsplit(v)
        secure = url.scheme == "https" or (url.scheme == "http" and url.hostname in LOOPBACK)
        if not secure or not url.hostname or url.query or url.fragment:
            raise ValueError("an https:// URL (http:// only on loopback), with no query")
        return v.rstrip("/")

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("scopes must include openid")
        return v


def read_client_secret(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"oidc.client_secret_file {path}: {exc.strerror}") from exc
    if not secret:
        raise ValueError(f"oidc.client_secret_file {path} is empty")
    return secret


class Sso:
    """The OIDC client of one gateway: its provider, its config and the secret that seals the
    flow cookie."""

    def __init__(
        self, config: OidcConfig, client_secret: str, secret: bytes, accounts: Accounts
    ) -> None:
        self.config = config
        self.accounts = accounts
        self._seal_key = hmac.new(secret, b"atoll sso flow", hashlib.sha256).digest()
        self.provider = StarletteOAuth2App(
            framework=None,  # authlib's session storage is unused: the flow is our cookie
            name="oidc",
            client_id=config.client_id,
            client_secret=client_secret,
            server_metadata_url=f"{config.issuer}/.well-known/openid-configuration",
            client_kwargs={
                "scope": " ".join(config.scopes),
                "code_challenge_method": "S256",
                "timeout": PROVIDER_TIMEOUT_S,
            },
        )

    def seal(self, data: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
        mac = hmac.new(self._seal_key, body.encode(), hashlib.sha256).hexdigest()
        return f"{body}.{mac}"

    def unseal(self, text: str | None) -> dict[str, Any] | None:
        """The data ``seal`` made, unless altered or expired."""
        body, _, mac = (text or "").partition(".")
        good = hmac.new(self._seal_key, body.encode(), hashlib.sha256).hexdigest()
        if not body or not hmac.compare_digest(mac.encode(), good.encode()):
            return None
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return data if isinstance(data, dict) and data.get("exp", 0) > time.time() else None

    def redirect_uri(self, request: Request) -> str:
        """Where the provider sends the browser back: as configured, or this gateway's own."""
        return self.config.redirect_url or f"{request.base_url}ui/callback"

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (authlib keeps it), its issuer checked."""
        try:
            metadata = dict(await self.provider.load_server_metadata())  # a copy: see below
        except (httpx2.HTTPError, ValueError) as exc:
            raise GatewayError(
                502, f"the identity provider at {self.config.issuer} did not answer: {exc}"
            ) from exc
        lacking = [k for k in ENDPOINTS if not isinstance(metadata.get(k), str)]
        issuer = str(metadata.get("issuer", "")).rstrip("/")
        if lacking or issuer != self.config.issuer:
            self.provider.server_metadata.clear()  # authlib keeps it: fetched again next time
            raise GatewayError(
                502,
                f"the identity provider's discovery document lacks {', '.join(lacking)}"
                if lacking
                else f"the identity provider says its issuer is {metadata.get('issuer')!r}, "
                f"not {self.config.issuer!r} as configured",
            )
        return metadata

    async def _with_userinfo(
        self, token: Any, claims: dict[str, Any], metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """The ID token's claims, with those the mapping needs that it leaves out (the
        username's, the groups') read from the provider's userinfo endpoint: a provider may
        keep claims there only (OIDC Core 5.4; Entra ID's groups overage, a Keycloak mapper
        set to userinfo). Its answer must be about the ID token's subject (OIDC Core 5.3.2)."""
        cfg = self.config
        wanted = [c for c in (cfg.username_claim, cfg.groups_claim) if c not in claims]
        if not wanted or not isinstance(metadata.get("userinfo_endpoint"), str):
            return claims
        info = await self.provider.userinfo(token=token)
        if str(info.get("sub")) != str(claims.get("sub")):
            raise GatewayError(
                401, "the identity provider's userinfo is about another subject than its ID token"
            )
        return claims | {c: info[c] for c in wanted if c in info}

    def sign_in(self, claims: dict[str, Any]) -> SignIn:
        """The login the claims make (the ID token's, and userinfo's where it left some out),
        as the config maps them (403 when refused)."""
        cfg = self.config
        username = claims.get(cfg.username_claim)
        if not isinstance(username, str) or not username:
            raise GatewayError(
                502,
                f"the identity provider gave no {cfg.username_claim!r} claim (username_claim), "
                "in its ID token nor its userinfo, to name the user by",
            )
        found = claims.get(cfg.groups_claim, [])
        found = [found] if isinstance(found, str) else found
        if not isinstance(found, list) or not all(isinstance(g, str) for g in found):
            raise GatewayError(
                502, f"the ID token's {cfg.groups_claim!r} claim is not a list of group names"
            )
        groups = set(found)
        roles: dict[str, str | None] = {m.project: None for m in cfg.groups.values()}
        for group, mapped in cfg.groups.items():
            have = roles[mapped.project]
            if group in groups and (have is None or ROLE_RANK[mapped.role] > ROLE_RANK[have]):
                roles[mapped.project] = mapped.role
        admin = bool(groups & set(cfg.admin_groups)) if cfg.admin_groups else None
        if cfg.require_group and not admin and not any(roles.values()):
            raise GatewayError(
                403,
                f"{username!r} is in none of the identity provider's groups this gateway "
                "admits: ask an administrator",
                code="no_group",
            )
        return SignIn(
            issuer=cfg.issuer,
            subject=str(claims["sub"]),
            username=username.lower(),
            admin=admin,
            roles=roles,
            create_users=cfg.create_users,
            match_existing_users=cfg.match_existing_users,
            ttl_s=cfg.session_ttl_s,
        )

    def install(self, app: FastAPI) -> None:
        @app.get("/ui/sso", include_in_schema=False)
        async def offered() -> dict[str, str]:
            return {"name": self.config.name}

        @app.get("/ui/login", include_in_schema=False)
        async def login(request: Request) -> Response:
            try:
                await self.metadata()
                redirect_uri = self.redirect_uri(request)
                flow = await self.provider.create_authorization_url(redirect_uri)
            except GatewayError as exc:
                return page(exc.status, exc.message)
            sealed = self.seal({
                "state": flow["state"], "nonce": flow["nonce"],
                "verifier": flow["code_verifier"], "redirect_uri": redirect_uri,
                "exp": time.time() + FLOW_TTL_S,
            })  # fmt: skip
            response = RedirectResponse(flow["url"], status_code=303)
            response.set_cookie(
                FLOW_COOKIE, sealed, max_age=FLOW_TTL_S, path="/ui/callback",
                secure=redirect_uri.startswith("https:"), httponly=True,
                samesite="lax",  # sent on the provider's top-level redirect back, not Strict
            )  # fmt: skip
            return response

        @app.get("/ui/callback", include_in_schema=False)
        async def callback(request: Request) -> Response:
            try:
                key = await self._finish(request)
            except GatewayError as exc:  # the operator sees it too: a provider misconfigured
                log.warning("single sign-on refused (%d): %s", exc.status, exc.message)
                response = page(exc.status, exc.message)
            else:
                response = RedirectResponse("/ui/#claim", status_code=303)
                response.set_cookie(
                    KEY_COOKIE, key, max_age=CLAIM_TTL_S, path="/ui/claim",
                    secure=self.redirect_uri(request).startswith("https:"), httponly=True,
                    samesite="strict",
                )  # fmt: skip
            response.delete_cookie(FLOW_COOKIE, path="/ui/callback")  # one try per login
            return response

        @app.get("/ui/logout", include_in_schema=False)
        async def logout(request: Request) -> Response:
            # Where the page goes once it revoked its session's key: the provider's end-session
            # endpoint, if it has one, so that the next "Log in with" on a shared computer asks
            # who is there (RP-initiated logout), then back to the log-in page.
            back = self.redirect_uri(request).removesuffix("callback")
            try:
                end = (await self.metadata()).get("end_session_endpoint")
            except GatewayError:  # logged out of Atoll all the same
                end = None
            if not isinstance(end, str):
                return RedirectResponse(back, status_code=303)
            query = urlencode({"client_id": self.config.client_id,
                               "post_logout_redirect_uri": back})  # fmt: skip
            return RedirectResponse(f"{end}{'&' if '?' in end else '?'}{query}", status_code=303)

        @app.post("/ui/claim", include_in_schema=False)
        async def claim(request: Request) -> Response:
            key = request.cookies.get(KEY_COOKIE, "")
            if not KEY_FORMAT.fullmatch(key):
                raise GatewayError(
                    401,
                    "no single sign-on session waiting in this browser (a session is claimed "
                    f"once, within {CLAIM_TTL_S} s of logging in): log in again",
                    code="no_session",
                )
            response = JSONResponse({"key": key}, headers={"cache-control": "no-store"})
            response.delete_cookie(KEY_COOKIE, path="/ui/claim")
            return response

    async def _finish(self, request: Request) -> str:
        """The callback's work: the session key's plaintext, or GatewayError saying why not."""
        params = request.query_params
        flow = self.unseal(request.cookies.get(FLOW_COOKIE))
        state = params.get("state", "").encode()
        ours = flow is not None and hmac.compare_digest(state, flow["state"].encode())
        if error := params.get("error"):
            # Anyone can link here with an error: its free text is shown only for this
            # browser's own login (some providers leave the state out of an error).
            said = error if ERROR_CODE.fullmatch(error) else "error"
            if ours and (description := params.get("error_description")):
                said = f"{said}: {description[:200]}"
            status = 403 if error == "access_denied" else 400
            raise GatewayError(status, f"the identity provider refused the log-in ({said})")
        if flow is None:
            raise GatewayError(
                400,
                "no log-in is in progress in this browser (it was finished already, began in "
                f"another browser, or took over {FLOW_TTL_S // 60} minutes): log in again",
            )
        if not ours:
            raise GatewayError(400, "the answer's state is not this browser's log-in: log in again")
        code = params.get("code")
        if not code:
            raise GatewayError(400, "the identity provider's answer has no code")
        try:
            metadata = await self.metadata()
            token = await self.provider.fetch_access_token(
                redirect_uri=flow["redirect_uri"], code=code, code_verifier=flow["verifier"]
            )
            claims = await self.provider.parse_id_token(token, nonce=flow["nonce"])
            if claims is not None:
                claims = await self._with_userinfo(token, dict(claims), metadata)
        except OAuthError as exc:  # the token endpoint's refusal: a used or expired code
            said = exc.description or exc.error
            raise GatewayError(400, f"the identity provider refused the code: {said}") from exc
        except JoseError as exc:
            raise GatewayError(
                401, f"the identity provider's ID token was refused: {exc.description or exc}"
            ) from exc
        except (httpx2.HTTPError, ValueError) as exc:
            raise GatewayError(502, f"the identity provider did not answer: {exc}") from exc
        if claims is None:
            raise GatewayError(502, "the identity provider sent no ID token")
        _, key = self.accounts.sign_in(self.sign_in(dict(claims)))
        return key


def page(status: int, message: str) -> Response:
    """A refused login, said on a page of the UI's look (the same strict headers)."""
    sentence = message[:1].upper() + message[1:]
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Log-in failed · '
        'Atoll</title><link rel="stylesheet" href="/ui/style.css"></head><body><main>'
        '<section class="card narrow"><h1>Log-in failed</h1>'
        f'<p id="sso-error" class="error" role="alert">{html.escape(sentence)}</p>'
        '<p><a href="/ui/">Back to the log-in page</a></p></section></main></body></html>'
    )
    return Response(body, status_code=status, media_type="text/html", headers=HEADERS)
