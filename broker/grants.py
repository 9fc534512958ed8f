"""The grants a broker enforces (sans-I/O): which cross-tenant messages and key requests pass.

Every other name stays inside its tenant; a frame crosses from tenant T to tenant U only when an
unrevoked, unexpired operator-signed grant covers it (``atoll.protocol.grants``):

- a *request*: T imports from U, and the destination's plugin is one U exports to T;
- a *reply* (results, errors, stream messages back): U imports from T, and the frame comes from
  T's plugin that U imports. As NATS's implicit response permissions, without per-request state:
  a stream answers many times, and the exporting plugin is the one that was called anyway.

Both checks read only the clear header (tenant, ``agent@tenant/plugin`` addresses), so the broker
still holds no payload key; what only the payload says (the base model a grant may be limited
to) the callee checks, with the grant the broker hands it beside the caller's credential.

Key requests across tenants (``agent@tenant``) are answered the same verified way as in-tenant,
plus the grant: an importer may learn the keys of the exporter's agents whose signed roles name
an exported plugin (the roles they were enrolled to serve), never of its other agents; an
exporter's agent may learn the key of an importer's agent, which it only ever hears of by being
called. ``@`` lists what the asking tenant imports: per grant, those agents' credentials.

Records come from the operator (pushed by ``atoll operator grant``, flooded across the mesh as
revocations are, loaded from an operator's own data dir); a revocation is kept forever so a grant
sent again stays dead, and takes effect at the next frame: in-flight calls and streams are cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import pack
from atoll.protocol.grants import MAX_PEER_GRANTS, Grant, GrantRevocation, verify_record
from atoll.protocol.subjects import split_remote
from atoll.protocol.trust import AgentIdentity, now_ms, verify_agent

MAX_GRANTS = 4096
MAX_LISTED = 256  # agents listed per import (``@``)
LIST_ALL = "@"


class GrantBook:
    def __init__(self, operator_pub: bytes, clock: Callable[[], int] = now_ms) -> None:
        self.operator_pub = operator_pub
        self.clock = clock
        self._grants: dict[str, Grant] = {}
        self._revoked: dict[str, bytes] = {}  # grant id -> its revocation
        self._idents: dict[bytes, AgentIdentity] = {}  # credentials seen in key requests

    def apply(self, blob: Any) -> tuple[Grant | GrantRevocation, bool]:
        """Verify and take a grant or a revocation (raises AuthError); True when it is news."""
        record = verify_record(blob, self.operator_pub)
        if isinstance(record, GrantRevocation):
            new = record.id not in self._revoked
            self._revoked.setdefault(record.id, blob)
            self._grants.pop(record.id, None)
            return record, new
        if record.id in self._revoked:
            return record, False
        if record.id not in self._grants and len(self._grants) >= MAX_GRANTS:
            now = self.clock()  # expired ones make room
            self._grants = {k: g for k, g in self._grants.items() if g.live(now)}
            if len(self._grants) >= MAX_GRANTS:
                raise AuthError(f"this broker holds {MAX_GRANTS} grants already")
        new = record.id not in self._grants
        self._grants[record.id] = record
        return record, new

    def revoked(self, grant_id: str) -> bool:
        return grant_id in self._revoked

    def load(self, blobs: list[bytes]) -> None:
        """Records kept before: those that expired since drop out."""
        for blob in blobs:
            with contextlib.suppress(AuthError):
                self.apply(blob)

    def records(self) -> list[bytes]:
        """What a new mesh neighbour must hear: live grants, then every revocation."""
        now = self.clock()
        live = [g.blob for g in self._grants.values() if g.live(now)]
        return live + list(self._revoked.values())

    def linking(self, importer: str, exporter: str) -> list[Grant]:
        now = self.clock()
        return [
            g
            for g in self._grants.values()
            if g.importer == importer and g.exporter == exporter and g.live(now)
        ]

    def imports(self, importer: str) -> list[Grant]:
        now = self.clock()
        return [g for g in self._grants.values() if g.importer == importer and g.live(now)]

    def crossing(self, tenant: str, src: str, dst: str) -> tuple[str, str] | str:
        """May a frame from ``src`` (an agent of ``tenant``) go to ``dst`` in another tenant?
        (the destination's tenant and agent), or why not. ``src`` must name its tenant: the
        seal binds the addresses, and the receiver needs it to know whom to answer."""
        try:
            agent, there, plugin = split_remote(dst)
            _, src_tenant, src_plugin = split_remote(src)
        except ProtocolError as exc:
            return exc.reason
        if there is None or there == tenant:
            return f"{dst!r} names no other tenant (use {agent!r} inside tenant {tenant!r})"
        if src_tenant != tenant:
            return f"source {src!r} must be qualified with its tenant ({tenant!r})"
        if any(g.exports(plugin) for g in self.linking(tenant, there)):
            return there, agent
        if any(g.exports(src_plugin) for g in self.linking(there, tenant)):
            return there, agent
        return f"no grant lets tenant {tenant!r} reach {dst!r}"

    def _ident(self, blob: bytes) -> AgentIdentity | None:
        ident = self._idents.get(blob)
        if ident is None:
            try:
                ident = verify_agent(blob, self.operator_pub)
            except AuthError:
                return None
            if len(self._idents) >= MAX_GRANTS:
                self._idents.clear()
            self._idents[blob] = ident
        return ident

    def key_answer(
        self,
        tenant: str,
        name: str,
        credential: Callable[[str, str], bytes | None],
        agents: Callable[[str], dict[str, bytes]],
    ) -> bytes | str:
        """A KEYRESP payload for ``name`` (``agent@tenant``, or ``@``) asked by an agent of
        ``tenant``, or why none. ``credential`` and ``agents`` look up the mesh's view."""
        if name == LIST_ALL:
            return pack({"imports": [self._listing(g, agents) for g in self.imports(tenant)]})
        try:
            agent, there, _ = split_remote(name)
        except ProtocolError as exc:
            return exc.reason
        if there is None or there == tenant:
            return f"{name!r} names no other tenant"
        blob = credential(there, agent)
        ident = self._ident(blob) if blob is not None else None
        if blob is not None and ident is not None:
            # Grants of its services to the asker's tenant (the asker may call it), and grants
            # of the asker's tenant's services to its own (it may call the asker; each callee
            # tells which applies to a call: protocol/grants.py calling_grant).
            grants = [g for g in self.linking(tenant, there) if g.exports_any(ident.roles)]
            grants += self.linking(there, tenant)
            if grants:
                return pack({"cred": blob, "grants": [g.blob for g in grants[:MAX_PEER_GRANTS]]})
        return f"no agent {name!r} that a grant lets tenant {tenant!r} reach"

    def _listing(self, grant: Grant, agents: Callable[[str], dict[str, bytes]]) -> dict[str, Any]:
        creds: list[bytes] = []
        for blob in agents(grant.exporter).values():
            ident = self._ident(blob)
            if ident is not None and grant.exports_any(ident.roles):
                creds.append(blob)
            if len(creds) >= MAX_LISTED:
                break
        return {"grant": grant.blob, "agents": creds}
