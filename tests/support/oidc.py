"""A real OpenID Connect provider for single sign-on tests: oidc-provider-mock (authlib's
authorization server in a Flask app) on a loopback port, whose users' claims a test sets; and a
login driven over HTTP as a browser would, for the tests that need no browser."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import authlib.deprecate  # noqa: F401 (imported first: see provider())
import httpx


@dataclass
class Provider:
    url: str  # the issuer

    def set_user(self, sub: str, **claims: Any) -> None:
        """The claims the provider gives ``sub`` from the next login on."""
        response = httpx.put(f"{self.url}/users/{sub}", json=claims)
        assert response.status_code == 204, response.text


@contextmanager
def provider() -> Iterator[Provider]:
    # It imports authlib's deprecated jose module (its warning is the provider's, not the
    # gateway's): quiet, by a filter put in front of the "always" that authlib.deprecate adds
    # when it is first imported (above).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from oidc_provider_mock import run_server_in_thread

    # require_nonce: the provider refuses a login the gateway sent without one.
    with run_server_in_thread(require_nonce=True) as server:
        yield Provider(f"http://localhost:{server.server_port}")


def oidc_config(issuer: str, here: Path, **options: Any) -> dict[str, Any]:
    """The gateway's ``oidc`` section for ``issuer``: projects lab and ml mapped from groups,
    the client secret in a file in ``here``."""
    secret = here / "oidc-client-secret"
    secret.write_text("s3cret\n")
    return {
        "issuer": issuer,
        "client_id": "atoll-test",
        "client_secret_file": str(secret),
        "name": "Test IdP",
        "groups": {
            "lab-users": {"project": "lab", "role": "member"},
            "lab-viewers": {"project": "lab", "role": "viewer"},
            "ml-leads": {"project": "ml", "role": "owner"},
        },
        "admin_groups": ["atoll-admins"],
    } | options


async def authorize(http: httpx.AsyncClient, gateway: str, sub: str) -> str:
    """Start a login at ``gateway`` and authorize it as ``sub`` at the provider: the callback
    URL the provider sends the browser back to (not yet followed). ``http`` keeps cookies."""
    started = await http.get(f"{gateway}/ui/login")
    assert started.status_code == 303, started.text
    answered = await http.post(started.headers["location"], data={"sub": sub})
    assert answered.status_code == 302, answered.text
    return answered.headers["location"]


async def sso_key(http: httpx.AsyncClient, gateway: str, sub: str) -> str:
    """A whole login as ``sub``: the session key the page claims."""
    back = await http.get(await authorize(http, gateway, sub))
    assert back.status_code == 303 and back.headers["location"] == "/ui/#claim", back.text
    claimed = await http.post(f"{gateway}/ui/claim")
    assert claimed.status_code == 200, claimed.text
    return str(claimed.json()["key"])
