"""``/docs`` was served without a key and without the web UI's CSP, loading Swagger's scripts
from a CDN on the UI's origin. Now no docs page is ever served (FastAPI's pages cannot work
without the CDN), and ``/openapi.json`` only when the gateway's ``docs`` option is on, to callers
with a key, with a CSP that lets nothing run."""

from __future__ import annotations

import httpx

from support.island import Island
from support.overlay import AgentFactory

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json")


async def test_docs_and_schema_are_off_by_default(make_agent: AgentFactory) -> None:
    isl = await Island(make_agent).start_gateway()
    assert isl.plugin.config.docs is False
    async with httpx.AsyncClient(base_url=isl.url) as http:
        for headers in ({}, {"Authorization": f"Bearer {isl.admin_key}"}):
            for path in PAGES:
                reply = await http.get(path, headers=headers)
                assert reply.status_code == 404, (path, reply.text)
                assert reply.json()["error"]["type"] == "api_error"  # OpenAI's shape
                assert "<script" not in reply.text and "cdn" not in reply.text


async def test_docs_on_serve_only_the_schema_behind_a_key_with_a_csp(
    make_agent: AgentFactory,
) -> None:
    isl = await Island(make_agent).start_gateway(docs=True)
    user = {"Authorization": f"Bearer {isl.key('bob')}"}
    async with httpx.AsyncClient(base_url=isl.url) as http:
        anonymous = await http.get("/openapi.json")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "authentication_error"
        wrong = await http.get("/openapi.json", headers={"Authorization": "Bearer atk_x"})
        assert wrong.status_code == 401
        # No page, with a key or without: FastAPI's would load scripts from a CDN.
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            for headers in ({}, user):
                assert (await http.get(path, headers=headers)).status_code == 404, path
        schema = await http.get("/openapi.json", headers=user)
        assert schema.status_code == 200
        assert schema.headers["content-type"] == "application/json"
        csp = schema.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert schema.headers["x-content-type-options"] == "nosniff"
        document = schema.json()
        assert "/v1/chat/completions" in document["paths"]
        assert "/openapi.json" not in document["paths"] and "/docs" not in document["paths"]
