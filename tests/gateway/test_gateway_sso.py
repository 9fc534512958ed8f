"""Single sign-on over HTTP, against a real OpenID Connect provider (oidc-provider-mock): claims
mapped to users, projects and roles, memberships synced at each login, and every refusal a page
with an honest status that changes nothing. The browser's side is in test_webui_sso.py."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import tomllib
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.identities import SignIn
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.plugin import GatewayConfig
from atoll.plugins.gateway.sso import (
    FLOW_COOKIE,
    KEY_COOKIE,
    GroupRole,
    OidcConfig,
    read_client_secret,
)
from atoll.tenancy.keys import read_secret, write_secret
from support import REPO
from support.island import Island
from support.oidc import Provider, authorize, oidc_config, sso_key
from support.overlay import AgentFactory


async def sso_island(
    make_agent: AgentFactory, issuer: str, tmp_path: Path, **options: Any
) -> Island:
    return await Island(make_agent).start_gateway(oidc=oidc_config(issuer, tmp_path, **options))


async def me(isl: Island, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=isl.url) as http:
        answer = await http.get("/me", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


async def test_the_request_carries_pkce_and_a_nonce_and_the_cookies_are_narrow(
    make_agent: AgentFactory, oidc_provider: Provider, tmp_path: Path
) -> None:
    isl = await sso_island(make_agent, oidc_provider.url, tmp_path)
    oidc_provider.set_user("u-1", preferred_username="alice")
    async with httpx.AsyncClient() as http:
        started = await http.get(f"{isl.url}/ui/login")
        asked = parse_qs(urlsplit(started.headers["location"]).query)
        flow = isl.plugin.sso.unseal(http.cookies.get(FLOW_COOKIE))
        challenge = hashlib.sha256(flow["verifier"].encode()).digest()
        assert asked["code_challenge"] == [base64.urlsafe_b64encode(challenge).decode().strip("=")]
        assert asked["code_challenge_method"] == ["S256"]
        assert asked["nonce"] == [flow["nonce"]] and asked["state"] == [flow["state"]]
        assert asked["redirect_uri"] == [f"{isl.url}/ui/callback"]
        assert asked["scope"] == ["openid profile email"]
        cookie = started.headers["set-cookie"]
        for attribute in ("HttpOnly", "Path=/ui/callback", "SameSite=lax", "Max-Age=600"):
            assert attribute in cookie, cookie
        answered = await http.post(started.headers["location"], data={"sub": "u-1"})
        back = await http.get(answered.headers["location"])
        cookies = back.headers.get_list("set-cookie")
        (handoff,) = [c for c in cookies if c.startswith(f"{KEY_COOKIE}=")]
        for attribute in ("HttpOnly", "Path=/ui/claim", "SameSite=strict", "Max-Age=60"):
            assert attribute in handoff, handoff
        assert any(c.startswith(f'{FLOW_COOKIE}=""') for c in cookies)  # one try per login


def snapshot(isl: Island) -> tuple[Any, ...]:
    acc = isl.accounts
    members = {p.name: acc.members(p.name) for p in acc.list_projects()}
    return acc.list_users(), acc.list_keys(), acc.list_projects(), members


async def test_groups_map_to_projects_and_roles_and_each_login_syncs_them(
    make_agent: AgentFactory, oidc_provider: Provider, tmp_path: Path
) -> None:
    isl = await sso_island(make_agent, oidc_provider.url, tmp_path)
    acc = isl.accounts
    oidc_provider.set_user("u-1", preferred_username="Alice", groups=["lab-users", "ml-leads"])
    async with httpx.AsyncClient() as http:
        key = await sso_key(http, isl.url, "u-1")
    who = await me(isl, key)
    assert (who["user"], who["admin"], who["project"]) == ("alice", False, None)
    assert who["projects"] == {"lab": "member", "ml": "owner"}  # both projects made at login
    session = next(k for k in acc.list_keys("alice") if k.key_id == who["key_id"])
    assert session.name == "web session" and session.project is None
    assert session.expires_at is not None
    assert session.expires_at - session.created == pytest.approx(8 * 3600)
    acc.create_project("other", actor="t")
    acc.add_member("other", "alice", "member", actor="t")  # not mapped: SSO leaves it alone

    # The groups changed at the provider, and so did her user name: the subject keeps her user;
    # lab is now a viewer's, ml is gone, she is an admin; the first session still works.
    oidc_provider.set_user(
        "u-1", preferred_username="alice2", groups=["lab-viewers", "atoll-admins"]
    )
    async with httpx.AsyncClient() as http:
        second = await sso_key(http, isl.url, "u-1")
    who = await me(isl, second)
    assert (who["user"], who["admin"]) == ("alice", True)
    assert who["projects"] == {"lab": "viewer", "other": "member"}
    assert "alice2" not in {u.name for u in acc.list_users()}
    assert (await me(isl, key))["user"] == "alice"

    # Several groups for one project: the highest role. Out of the admin group: no admin.
    oidc_provider.set_user("u-1", preferred_username="alice", groups=["lab-viewers", "lab-users"])
    async with httpx.AsyncClient() as http:
        third = await sso_key(http, isl.url, "u-1")
    who = await me(isl, third)
    assert who["admin"] is False and who["projects"]["lab"] == "member"
    actions = {(e.actor, e.action) for e in acc.audit_log()}
    for action in ("user.create", "identity.link", "project.create", "member.add",
                   "member.remove", "user.set_admin", "key.create"):  # fmt: skip
        assert ("sso", action) in actions, action


async def test_claims_the_id_token_leaves_out_are_read_from_userinfo(
    make_agent: AgentFactory,
    oidc_provider: Provider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider that keeps the groups (or the username) out of its ID tokens, as Entra ID
    does past a size and a Keycloak mapper may: the gateway reads what its mapping needs from
    the provider's real userinfo endpoint, and refuses an answer about another subject."""
    isl = await sso_island(make_agent, oidc_provider.url, tmp_path)
    oidc_provider.set_user("u-1", preferred_username="Alice", groups=["ml-leads"])
    sso = isl.plugin.sso
    assert sso is not None
    parse = sso.provider.parse_id_token
    asked: list[str] = []

    async def id_token_without(token: Any, nonce: str) -> Any:
        claims = dict(await parse(token, nonce=nonce))
        del claims["groups"], claims["preferred_username"]
        return claims

    userinfo = sso.provider.userinfo

    async def counted(**kw: Any) -> Any:
        asked.append("userinfo")
        return await userinfo(**kw)

    monkeypatch.setattr(sso.provider, "parse_id_token", id_token_without)
    monkeypatch.setattr(sso.provider, "userinfo", counted)
    async with httpx.AsyncClient() as http:
        key = await sso_key(http, isl.url, "u-1")
    who = await me(isl, key)
    assert (who["user"], who["projects"]) == ("alice", {"ml": "owner"}) and asked == ["userinfo"]

    async def another_subject(**kw: Any) -> Any:
        return {**await userinfo(**kw), "sub": "u-2"}

    monkeypatch.setattr(sso.provider, "userinfo", another_subject)
    before = snapshot(isl)
    async with httpx.AsyncClient() as http:
        answer = await http.get(await authorize(http, isl.url, "u-1"))
    assert answer.status_code == 401 and "userinfo is about another subject" in answer.text
    assert snapshot(isl) == before

    monkeypatch.setattr(sso.provider, "parse_id_token", parse)  # a full ID token: no userinfo
    monkeypatch.setattr(sso.provider, "userinfo", counted)
    asked.clear()
    async with httpx.AsyncClient() as http:
        await sso_key(http, isl.url, "u-1")
    assert asked == []


async def test_an_admin_moves_a_user_to_an_account_the_provider_made_anew(
    make_agent: AgentFactory, oidc_provider: Provider, tmp_path: Path
) -> None:
    """Alice's account at the provider is made again (a new subject, the same name): refused at
    login, until an admin unlinks the old account and links the new one to her user; the old
    one then logs in as nobody. Only admins see or change the links."""
    isl = await sso_island(make_agent, oidc_provider.url, tmp_path)
    issuer = oidc_provider.url
    for sub in ("old-1", "new-2"):
        oidc_provider.set_user(sub, preferred_username="alice", groups=["lab-users"])
    async with httpx.AsyncClient() as http:
        first = await sso_key(http, isl.url, "old-1")
        refused = await http.get(await authorize(http, isl.url, "new-2"))
    assert refused.status_code == 403 and "ask an administrator" in refused.text
    isl.accounts.create_user("root", admin=True, actor="t")
    admin = {"Authorization": f"Bearer {isl.key('root')}"}
    async with httpx.AsyncClient(base_url=isl.url) as http:
        for key in (first, isl.key("bob")):  # a user's key, SSO's or not, is no admin's
            no = await http.get("/admin/identities", headers={"Authorization": f"Bearer {key}"})
            assert no.status_code == 403, no.text
        listed = await http.get("/admin/identities", params={"user": "alice"}, headers=admin)
        assert [(i["issuer"], i["subject"]) for i in listed.json()] == [(issuer, "old-1")]
        new = {"user": "alice", "issuer": issuer, "subject": "new-2"}
        taken = await http.post("/admin/identities/link", json=new, headers=admin)
        assert taken.status_code == 409 and "unlink it first" in taken.text
        old = {"issuer": issuer, "subject": "old-1"}
        assert (await http.post("/admin/identities/unlink", json=old, headers=admin)).is_success
        assert (await http.post("/admin/identities/link", json=new, headers=admin)).is_success
    async with httpx.AsyncClient() as http:
        second = await sso_key(http, isl.url, "new-2")
        again = await http.get(await authorize(http, isl.url, "old-1"))
    assert (await me(isl, second))["user"] == "alice"
    assert again.status_code == 403
    actions = [(e.actor, e.action, e.target) for e in isl.accounts.audit_log()]
    assert ("root", "identity.unlink", "alice") in actions
    assert ("root", "identity.link", "alice") in actions


async def test_refused_logins_say_why_and_change_nothing(
    make_agent: AgentFactory, oidc_provider: Provider, tmp_path: Path
) -> None:
    isl = await sso_island(make_agent, oidc_provider.url, tmp_path, require_group=True)
    oidc_provider.set_user("u-ok", preferred_username="bob", groups=["lab-users"])
    oidc_provider.set_user("u-none", preferred_username="carol", groups=["unmapped"])
    oidc_provider.set_user("u-admin", preferred_username="admin", groups=["lab-users"])
    oidc_provider.set_user("u-mail", preferred_username="dave@uni.example", groups=["lab-users"])
    oidc_provider.set_user("u-anon", groups=["lab-users"])
    oidc_provider.set_user("u-odd", preferred_username="odd", groups={"lab-users": True})
    before = snapshot(isl)

    async def refused(http: httpx.AsyncClient, url: str, status: int, says: str) -> None:
        answer = await http.get(url)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("text/html")
        assert says in answer.text, answer.text
        assert "script-src 'self'" in answer.headers["content-security-policy"]

    async with httpx.AsyncClient() as http:
        # The provider's refusal (the user pressed Deny there).
        started = await http.get(f"{isl.url}/ui/login")
        denied = await http.post(started.headers["location"], data={"action": "deny"})
        await refused(http, denied.headers["location"], 403, "refused the log-in (access_denied)")
        # A link anyone could send: the provider's free text is shown for the browser's own
        # login only, and an error that is no OAuth code is not repeated.
        lure = "error=access_denied&error_description=Call+555-0100+to+unlock"
        answer = await http.get(f"{isl.url}/ui/callback?{lure}")
        assert answer.status_code == 403 and "555" not in answer.text
        answer = await http.get(f"{isl.url}/ui/callback?error=Call+555-0100")
        assert answer.status_code == 400 and "555" not in answer.text
        assert "refused the log-in (error)" in answer.text
        started = await http.get(f"{isl.url}/ui/login")  # this browser's own: said in full
        state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
        own = urlencode({"error": "temporarily_unavailable", "error_description": "Try later",
                         "state": state})  # fmt: skip
        await refused(http, f"{isl.url}/ui/callback?{own}", 400, "unavailable: Try later")
        # A state that is not this browser's.
        back = urlsplit(await authorize(http, isl.url, "u-ok"))
        query = parse_qs(back.query)
        query["state"] = ["gefälscht"]  # not ASCII either: compared as bytes, no 500
        forged = back._replace(query=urlencode(query, doseq=True)).geturl()
        await refused(http, forged, 400, "state is not this browser")
        # The flow is over once its callback came back: the real answer now finds no log-in.
        await refused(http, back.geturl(), 400, "No log-in is in progress")
        # A nonce that is not the one sent (a flow cookie sealed with the gateway's secret).
        url = await authorize(http, isl.url, "u-ok")
        reseal_flow(isl, http, nonce="other")
        await refused(http, url, 401, "ID token was refused: Invalid claim: &#x27;nonce&#x27;")
        # A log-in that took too long.
        url = await authorize(http, isl.url, "u-ok")
        reseal_flow(isl, http, exp=time.time() - 1)
        await refused(http, url, 400, "No log-in is in progress")
        # Users the config refuses: in no mapped group; a name a local user has; no valid name.
        await refused(http, await authorize(http, isl.url, "u-none"), 403, "none of the")
        await refused(http, await authorize(http, isl.url, "u-admin"), 403, "already exists")
        await refused(http, await authorize(http, isl.url, "u-mail"), 403, "not a valid Atoll")
        # Claims the gateway cannot use.
        no_name = "gave no &#x27;preferred_username&#x27; claim"
        await refused(http, await authorize(http, isl.url, "u-anon"), 502, no_name)
        await refused(http, await authorize(http, isl.url, "u-odd"), 502, "not a list of group")
        # No session waits to be claimed.
        claim = await http.post(f"{isl.url}/ui/claim")
        assert claim.status_code == 401
        assert "no single sign-on session" in claim.json()["error"]["message"]
    assert snapshot(isl) == before

    # And a good login claims its key once.
    async with httpx.AsyncClient() as http:
        url = await authorize(http, isl.url, "u-ok")
        flow = next(c for c in http.cookies.jar if c.name == FLOW_COOKIE)
        assert (await http.get(url)).status_code == 303
        claimed = await http.post(f"{isl.url}/ui/claim")
        assert (await http.post(f"{isl.url}/ui/claim")).status_code == 401
        # Its answer and cookie, captured and replayed: the provider refuses the used code.
        http.cookies.set(FLOW_COOKIE, flow.value or "", domain=flow.domain, path=flow.path)
        made = snapshot(isl)
        await refused(http, url, 400, "refused the code")
        assert snapshot(isl) == made
    assert (await me(isl, claimed.json()["key"]))["projects"] == {"lab": "member"}


def reseal_flow(isl: Island, http: httpx.AsyncClient, **changes: Any) -> None:
    """Change the flow cookie ``http`` holds, sealed again with the gateway's key."""
    cookie = next(c for c in http.cookies.jar if c.name == FLOW_COOKIE)
    flow = isl.plugin.sso.unseal(cookie.value)
    assert flow is not None
    sealed = isl.plugin.sso.seal(flow | changes)
    http.cookies.set(FLOW_COOKIE, sealed, domain=cookie.domain, path=cookie.path)


async def test_without_oidc_the_ui_offers_api_keys_only(make_agent: AgentFactory) -> None:
    isl = await Island(make_agent).start_gateway()
    async with httpx.AsyncClient(base_url=isl.url) as http:
        for method, path in (("GET", "/ui/sso"), ("GET", "/ui/login"), ("GET", "/ui/callback"),
                             ("POST", "/ui/claim"), ("GET", "/ui/logout")):  # fmt: skip
            answer = await http.request(method, path)
            assert answer.status_code in (404, 405), (path, answer.status_code)


async def test_a_login_begun_at_one_gateway_finishes_at_another_with_its_secret(
    make_agent: AgentFactory, oidc_provider: Provider, tmp_path: Path
) -> None:
    """The flow lives in the browser's sealed cookie, not in a gateway: behind a load balancer,
    the callback may reach another gateway that has the first one's ``gateway.secret``."""
    first = await sso_island(make_agent, oidc_provider.url, tmp_path)
    secret = read_secret(first.plugin.ctx.data_dir / "gateway.secret")
    write_secret(tmp_path / "agents/acme/gw2/plugins/gateway/gateway.secret", secret)
    second = Island(make_agent)
    gateway = {"listen": "127.0.0.1:0", "oidc": oidc_config(oidc_provider.url, tmp_path)}
    second.gateway = await make_agent("gw2", roles=("gateway",), plugins={"gateway": gateway})
    oidc_provider.set_user("u-1", preferred_username="alice")
    async with httpx.AsyncClient() as http:
        back = urlsplit(await authorize(http, first.url, "u-1"))
        elsewhere = back._replace(netloc=urlsplit(second.url).netloc).geturl()
        assert (await http.get(elsewhere)).status_code == 303  # cookies ignore the port
        key = (await http.post(f"{second.url}/ui/claim")).json()["key"]
    assert (await me(second, key))["user"] == "alice"


async def test_a_provider_that_does_not_answer_or_answers_wrong_is_said(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """A provider failing, then a discovery document without the endpoints the flow needs, then
    another issuer's: each said, and the document fetched again at the next login (a fixed
    provider is seen without a restart)."""
    document: dict[str, Any] = {}

    class Discovery(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(document).encode()
            self.send_response(200 if document else 500)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    issuer = f"http://127.0.0.1:{server.server_port}"
    try:
        isl = await sso_island(make_agent, issuer, tmp_path)
        async with httpx.AsyncClient() as http:

            async def login_says(says: str) -> None:
                answer = await http.get(f"{isl.url}/ui/login")
                assert answer.status_code == 502 and says in answer.text, answer.text

            await login_says(f"The identity provider at {issuer} did not answer")
            document.update(issuer=issuer, authorization_endpoint=f"{issuer}/authorize")
            await login_says("lacks token_endpoint, jwks_uri")
            endpoints = {"token_endpoint": f"{issuer}/token", "jwks_uri": f"{issuer}/jwks"}
            document.update(endpoints, issuer="https://other.example")
            await login_says("says its issuer is &#x27;https://other.example&#x27;")
            document["issuer"] = issuer
            answer = await http.get(f"{isl.url}/ui/login")
            assert answer.status_code == 303
            assert answer.headers["location"].startswith(f"{issuer}/authorize?")
            # This provider has no end-session endpoint: a logout goes straight back.
            answer = await http.get(f"{isl.url}/ui/logout")
            assert (answer.status_code, answer.headers["location"]) == (303, f"{isl.url}/ui/")
    finally:
        server.shutdown()
        server.server_close()


def test_a_subject_keeps_its_user_and_names_are_never_taken_over(
    accounts_db: Path | str,
) -> None:
    """The store's side, on SQLite and PostgreSQL: a provider's subject is linked to one user
    at its first login; a name that is another's (a local user, another subject) is refused
    unless the config matches existing users, and then only an unlinked one."""
    acc = Accounts(accounts_db, b"s" * 32)
    login = SignIn(
        issuer="https://idp.example", subject="s-1", username="erin", admin=None,
        roles={"lab": "member"}, create_users=True, match_existing_users=False, ttl_s=600,
    )  # fmt: skip
    record, key = acc.sign_in(login)
    assert acc.authenticate(key).user == "erin" and record.expires_at == record.created + 600
    acc.sign_in(replace(login, username="renamed"))
    assert [u.name for u in acc.list_users()] == ["erin"]
    acc.create_user("frank", actor="t")
    before = (acc.list_users(), acc.list_keys())
    changes: dict[str, Any]
    for changes, code in (
        ({"subject": "s-2"}, "user_not_linked"),  # erin is s-1's
        ({"subject": "s-2", "match_existing_users": True}, "user_not_linked"),
        ({"subject": "s-3", "username": "frank"}, "user_not_linked"),  # a local user
        ({"subject": "s-4", "username": "gina", "create_users": False}, "user_not_found"),
    ):
        with pytest.raises(GatewayError) as refused:
            acc.sign_in(replace(login, **changes))
        assert (refused.value.status, refused.value.code) == (403, code)
    assert (acc.list_users(), acc.list_keys()) == before
    # Matching existing users links frank to s-3 once; from then on s-3 is frank.
    linked = replace(login, subject="s-3", username="frank", match_existing_users=True)
    assert acc.authenticate(acc.sign_in(linked)[1]).user == "frank"
    assert acc.memberships("frank") == {"lab": "member"}
    acc.close()


def test_the_config_is_checked(tmp_path: Path) -> None:
    good = {
        "issuer": "https://idp.example/realms/uni/",
        "client_id": "atoll",
        "client_secret_file": "/run/credentials/atoll/oidc",
    }
    assert OidcConfig.model_validate(good).issuer == "https://idp.example/realms/uni"
    assert OidcConfig.model_validate(good | {"issuer": "http://localhost:8080"})
    for bad, says in (
        ({"issuer": "http://idp.example"}, "https://"),
        ({"scopes": ["profile"]}, "openid"),
        ({"groups": {"g": {"project": "Not A Name"}}}, "project name"),
        ({"groups": {"g": {"project": "lab", "role": "boss"}}}, "role"),
        ({"client_secret": "inline"}, "Extra inputs"),
    ):
        with pytest.raises(ValidationError, match=says):
            OidcConfig.model_validate(good | bad)
    with pytest.raises(ValueError, match="No such file"):
        read_client_secret(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_client_secret(tmp_path / "empty")


def test_the_admins_example_config_is_valid() -> None:
    """docs/admins.md's ``[plugins.gateway.oidc]`` example, as the gateway would read it."""
    text = (REPO / "docs" / "admins.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    (example,) = [b for b in blocks if "[plugins.gateway.oidc]" in b]
    config = GatewayConfig.model_validate(tomllib.loads(example)["plugins"]["gateway"])
    assert config.oidc is not None and config.oidc.require_group
    assert config.oidc.groups["radiology-leads"] == GroupRole(project="radiology", role="owner")
