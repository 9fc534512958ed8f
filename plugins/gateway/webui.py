"""The web UI: static files under ``/ui/`` (no build step, no third-party script) and the one
route only the UI needs, ``GET /ui/session`` (who the key belongs to); single sign-on's routes
are sso.py's. Everything else the UI shows comes from the public API (/v1/..., /admin/feed),
with the key the user logged in with.

Conversations stay in the browser (localStorage, per user): the gateway stores no prompt text
unless a project opts in, and the playground does not get round that."""

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atoll.plugins.gateway.accounts.keys import Principal

UI_DIR = files("atoll.plugins.gateway") / "ui"
# Only our own scripts and styles, no framing (clickjacking), no inline script: model output is
# rendered as text, and a script injected into it would find nothing willing to run it.
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class SecuredStatic:
    """The UI's files with the security headers above on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.encode(), v.encode()) for k, v in HEADERS.items()),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI, user: Any) -> None:
    """Add the UI; ``user`` is the authenticated-caller dependency of app.py."""

    @app.get("/ui/session", include_in_schema=False)
    async def session(principal: user) -> dict[str, Any]:
        p: Principal = principal
        return {"user": p.user, "project": p.project, "admin": p.admin, "key_id": p.key_id}

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("/ui/")

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/")

    app.mount("/ui", SecuredStatic(StaticFiles(directory=str(UI_DIR), html=True)), name="ui")
