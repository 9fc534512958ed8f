"""The gateway's accounts, in a SQLite file or a PostgreSQL database that gateways share
(database.py, postgres.py): users, projects and roles (users.py), API keys
(keys.py), which user an identity provider's account is and what a single sign-on changes
(identities.py), who may see and use which adapter (adapters.py) and which named mixture of
adapters (mixtures.py), the usage ledger, one row per
request (ledger.py), budgets with their reservations, settled by the ledger's own
transaction (budgets.py), and the audit log, one row per admin action written in the same
transaction as the change it records and hash-chained (audit.py, audit_chain.py), and each
project's retention periods with the ledger's purge (retention.py). store.py holds the schema and
the database they share. Gateways sharing a PostgreSQL database exchange what their rate limits
admitted (rate_shares.py).

``Accounts``' methods are synchronous and each runs one short statement or transaction, so the
app may call them from the event loop (``ledger.Ledger`` batches the ledger's rows there); on
PostgreSQL, the request path's calls go through ``offload`` (a worker thread) instead, so a
round trip never stops the loop.
Nothing is cached but authenticate's key lookups, which any write here and any other
connection's commit make stale: SQLite's file tells (its data_version); on PostgreSQL every
write transaction that may change them notifies the gateways listening as it commits
(changes.py), and a request is answered from the cache only after a barrier has read every
notification sent before it came. A revoked key, a removed member or a changed admin flag is
refused from the next request on, through whichever gateway.
"""

from __future__ import annotations

from atoll.plugins.gateway.accounts.adapters import AdapterRegistry
from atoll.plugins.gateway.accounts.audit import AuditLog
from atoll.plugins.gateway.accounts.budgets import Budgets
from atoll.plugins.gateway.accounts.identities import Identities
from atoll.plugins.gateway.accounts.keys import Keys
from atoll.plugins.gateway.accounts.ledger import UsageTable
from atoll.plugins.gateway.accounts.mixtures import MixtureRegistry
from atoll.plugins.gateway.accounts.rate_shares import RateShares
from atoll.plugins.gateway.accounts.retention import Retention
from atoll.plugins.gateway.accounts.users import UsersAndProjects


class Accounts(
    UsersAndProjects,
    Identities,
    Keys,
    AdapterRegistry,
    MixtureRegistry,
    UsageTable,
    Budgets,
    RateShares,
    AuditLog,
    Retention,
):
    """The store, as callers see it: one object over one connection, lock and clock (``Store``),
    each concern's methods from its own module. ``Accounts(path_or_postgresql_url, secret,
    clock=time.time)``."""
