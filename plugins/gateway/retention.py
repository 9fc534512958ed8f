"""A retention purge: for each project with a policy (accounts/retention.py), the ledger's prompt
texts and rows past their periods, then the project's datasets in storage past theirs (deleted
there, which also deletes their data keys: no copy of them can be read after; their chunks leave
every vector store, their rows' features too). Every purge is in the audit log; a dry run reports
the same and changes nothing."""

from __future__ import annotations

from typing import Any

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.errors import from_platform
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.gateway.vector_stores import VectorStores
from atoll.plugins.storage.contract.datasets import DatasetNotFound, delete_dataset, list_datasets


async def purge(gw: Gateway, dry_run: bool, actor: str) -> dict[str, Any]:
    """``{"dry_run", "at", "projects": {project: {"prompts", "ledger_rows", "datasets"}}}``:
    counts of prompt texts cleared and ledger rows removed, the ids of the datasets deleted (or,
    dry, that would be)."""
    at = gw.accounts.now()
    ledger = gw.accounts.purge_ledger(dry_run, actor=actor)
    projects: dict[str, dict[str, Any]] = {
        project: {"prompts": done.prompts, "ledger_rows": done.ledger_rows, "datasets": []}
        for project, done in ledger.items()
    }
    for policy in gw.accounts.list_retention():
        if policy.datasets_s is None:
            continue
        try:
            storage = gw.storage_address()
            found = await list_datasets(gw.agent, storage, project=policy.project)
            old = sorted(r.id for r in found if r.created < at - policy.datasets_s)
            for dataset_id in [] if dry_run else old:
                try:
                    await delete_dataset(gw.agent, storage, dataset_id)
                except DatasetNotFound:  # deleted meanwhile: gone either way
                    continue
                await VectorStores(gw).forget_file(dataset_id)  # its chunks and features too
                detail = {"project": policy.project}
                gw.accounts.audit(actor, "retention.purge_dataset", dataset_id, detail)
        except AtollError as exc:
            raise from_platform(exc) from None
        projects[policy.project]["datasets"] = old
    return {"dry_run": dry_run, "at": at, "projects": projects}
