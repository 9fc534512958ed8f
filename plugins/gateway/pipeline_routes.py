"""The admins' view of declarative pipelines (the web UI's Pipelines tab): ``GET
/admin/pipelines`` asks the tenant's active controller, found in the gateway's own live
discovery view, for every pipeline's status (each service's desired and actual replicas, its
state, the pipeline's events). Read-only: applying and deleting stay the operator's, through
``atoll apply`` and ``atoll pipelines``."""

# No `from __future__ import annotations`: FastAPI reads the route's annotations, and ``admin``
# is install()'s parameter, not a global it could resolve from a string.
from typing import Any

from fastapi import FastAPI

from atoll.agent.discovery import Status
from atoll.agent.errors import AtollError
from atoll.plugins.controller.contract import leader, list_pipelines
from atoll.plugins.gateway.errors import from_platform
from atoll.plugins.gateway.service import Gateway

TIMEOUT_S = 10.0


def install(app: FastAPI, gw: Gateway, admin: Any) -> None:
    """The route; ``admin`` is app.py's administrator dependency."""

    @app.get("/admin/pipelines")
    async def pipelines(_: admin) -> dict[str, Any]:
        """``{controller, pipelines}``: the active controller (null when none runs: a tenant
        without pipelines, not an error) and what it reports."""
        entries = gw.watch.discovery.entries.values()
        active = leader([(e.name, e.roles, e.plugins, e.status is not Status.LOST)
                         for e in entries])  # fmt: skip
        if active is None:
            return {"controller": None, "pipelines": []}
        try:
            found = await list_pipelines(gw.agent, active, TIMEOUT_S)
        except AtollError as exc:
            raise from_platform(exc) from None
        return {"controller": active, "pipelines": [p.model_dump(mode="json") for p in found]}
