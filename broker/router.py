"""Routing core of the broker (sans-I/O): sessions in, frames out.

Every address and subject is resolved inside the sender's tenant, so isolation does not depend
on agents behaving. Inside a tenant, what an agent may publish, subscribe to and keep follows
from its signed roles (``atoll.tenancy.permissions``); anything else is refused with a reason and
the connection stays up. Kept publications have byte and count budgets per agent and per
tenant, refused with the reason, and outlive an agent that left the mesh only for ``kept_ttl``
(``expire_kept``). The router never opens payloads; it only reads the clear header.
A message or key request crosses tenants only where an operator-signed grant covers it
(``atoll.broker.grants``: the rules live there).

Over 400 lines because it is the whole per-tenant space (sessions, interest, kept state, the
journal the mesh advertises) that every frame handler reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from atoll.broker.grants import GrantBook
from atoll.broker.mesh import LocalChange
from atoll.broker.state import Binding, BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame, pack
from atoll.protocol.grants import Grant, GrantRevocation
from atoll.protocol.subjects import (
    REFUSALS,
    SubjectIndex,
    SubjectTable,
    check_subject,
    matches,
    split_address,
    split_remote,
)
from atoll.protocol.trust import AgentIdentity, now_ms, verify_revocation
from atoll.tenancy import permissions

MAX_SUBS_PER_SESSION = 10_000


class Session(Protocol):
    """A connected, authenticated agent as the router sees it."""

    id: int
    ident: AgentIdentity
    subs: dict[int, str]

    def send(self, data: bytes) -> None: ...

    def close(self, code: str, reason: str) -> None: ...


@dataclass
class _TenantSpace:
    agents: dict[str, Session] = field(default_factory=dict)
    since: dict[str, int] = field(default_factory=dict)  # agent -> connected at (ms)
    subs: SubjectIndex[tuple[int, int], Session] = field(default_factory=SubjectIndex)
    retained: SubjectTable[tuple[str, bytes]] = field(default_factory=SubjectTable)  # (by, PUB)
    retained_bytes: int = 0
    kept_by: dict[str, int] = field(default_factory=dict)  # agent -> bytes it keeps
    kept_subjects: dict[str, set[str]] = field(default_factory=dict)  # agent -> its subjects
    gone: dict[str, int] = field(default_factory=dict)  # keeping agent -> absent since (ms)
    interest: dict[str, int] = field(default_factory=dict)  # pattern -> subscriptions to it


class MeshRelay(Protocol):
    """What the router needs from the broker mesh (absent on a lone broker). ``changed`` says
    that ``Router.local_changes`` has news for the mesh to advertise."""

    def changed(self) -> None: ...

    def forward_msg(self, tenant: str, agent: str, data: bytes, route: dict[str, Any]) -> bool: ...

    def forward_pub(
        self, tenant: str, subject: str, data: bytes, route: dict[str, Any]
    ) -> None: ...

    def credential(self, tenant: str, agent: str) -> bytes | None: ...

    def flood_sync(self, body: dict[str, Any]) -> None: ...

    def agents(self, tenant: str) -> dict[str, bytes]: ...


# Kept publications live in broker memory until replaced or until their agent has been gone for
# the broker's kept_ttl: an agent keeps its announcement and metrics (a few KiB each), so these
# bounds only bite an agent or tenant gone wrong.
MAX_RETAINED_PER_TENANT = 10_000
MAX_KEPT_SUBJECTS_PER_AGENT = 64
MAX_KEPT_BYTES_PER_AGENT = 1024 * 1024
MAX_KEPT_BYTES_PER_TENANT = 256 * 1024 * 1024
_CACHE_LIMIT = 1024  # permission answers remembered per session (subjects repeat)


def error_frame(code: str, reason: str, **header: object) -> bytes:
    return encode_frame(FrameType.ERROR, {"code": code, "reason": reason, **header})


class Router:
    def __init__(
        self, state: BrokerState, log: EventLogger | None = None, name: str = "broker"
    ) -> None:
        self.state = state
        self.log = log or EventLogger("broker")
        self.name = name
        # Peer brokers this broker refused, for every tenant's admins: subject -> (at, PUB).
        self._broker_refusals: dict[str, tuple[int, bytes]] = {}
        self.mesh: MeshRelay | None = None
        # What the mesh has yet to hear (agents joined/left, patterns first/last here), in order;
        # kept only while a mesh is attached, drained by it (``local_changes``).
        self._journal: list[LocalChange] = []
        self._tenants: dict[str, _TenantSpace] = {}
        self.grants = GrantBook(state.operator_pub)
        self.grants.load(state.grant_records())  # kept across restarts
        self._allowed: dict[int, dict[tuple[str, str], bool]] = {}  # session id -> answers
        self._handlers: dict[FrameType, Callable[[Session, Frame], None]] = {
            FrameType.MSG: self._msg,
            FrameType.PUB: self._pub,
            FrameType.SUB: self._sub,
            FrameType.UNSUB: self._unsub,
            FrameType.KEYREQ: self._keyreq,
            FrameType.REVOKE: self._revoke,
            FrameType.GRANT: self._grant,
        }

    def _space(self, tenant: str) -> _TenantSpace:
        space = self._tenants.get(tenant)
        if space is None:
            space = self._tenants[tenant] = _TenantSpace()
        return space

    # --- sessions ------------------------------------------------------------------------------

    def attach(self, s: Session) -> None:
        """Admit an authenticated session (raises AuthError: revoked, name taken, token spent
        or expired) and make it reachable."""
        space = self._space(s.ident.tenant)
        old = space.agents.get(s.ident.name)
        if old is not None and old.ident.pub != s.ident.pub:
            raise AuthError(
                f"agent name {s.ident.name!r} is in use by another key in this tenant",
                code="name-taken",
            )
        bound = self.state.admit(s.ident)
        if old is not None:
            # The same agent reconnecting: the old connection is dead or dying; replace it.
            self.detach(old)
            old.close("replaced", "a newer connection of this agent took over")
        space.agents[s.ident.name] = s
        since = space.since[s.ident.name] = now_ms()
        self._note(LocalChange("+agent", s.ident.tenant, s.ident.name, s.ident.credential, since))
        if bound is not None and self.mesh is not None:  # other brokers learn the binding
            self.mesh.flood_sync({"kind": "bind", **bound.__dict__})
        self._changed()

    def apply_binding(self, b: Binding) -> None:
        """A name bound at another broker: cut a local session that lost the name to it."""
        if not self.state.record_binding(b):
            return
        space = self._tenants.get(b.tenant)
        target = space.agents.get(b.name) if space else None
        if target is not None and target.ident.pub != b.pub:
            self.detach(target)
            target.close("name-taken", f"agent name {b.name!r} belongs to another key")

    def detach(self, s: Session) -> None:
        space = self._tenants.get(s.ident.tenant)
        if space is None:
            return
        for sid, pattern in s.subs.items():
            space.subs.remove((s.id, sid))
            self._interest(s.ident.tenant, space, pattern, -1)
        s.subs.clear()
        self._allowed.pop(s.id, None)
        if space.agents.get(s.ident.name) is s:
            del space.agents[s.ident.name]
            space.since.pop(s.ident.name, None)
            self._note(LocalChange("-agent", s.ident.tenant, s.ident.name))
        self._changed()

    def _interest(self, tenant: str, space: _TenantSpace, pattern: str, delta: int) -> None:
        """Count subscriptions per pattern: the mesh hears of a pattern when it first appears
        on this broker and when it last goes."""
        if pattern.startswith("$"):
            return  # brokers' own notices ($SYS...) are published by each broker locally
        n = space.interest.get(pattern, 0) + delta
        if n > 0:
            space.interest[pattern] = n
            if n == 1 and delta > 0:
                self._note(LocalChange("+interest", tenant, pattern))
        elif space.interest.pop(pattern, None) is not None:
            self._note(LocalChange("-interest", tenant, pattern))

    def _note(self, change: LocalChange) -> None:
        if self.mesh is not None:
            self._journal.append(change)

    def local_changes(self) -> list[LocalChange]:
        """What changed here since the mesh last asked, in order (the mesh's deltas)."""
        out, self._journal = self._journal, []
        return out

    def _changed(self) -> None:
        if self.mesh is not None:
            self.mesh.changed()

    def agents(self, tenant: str) -> list[str]:
        space = self._tenants.get(tenant)
        return sorted(space.agents) if space else []

    def local_view(self) -> tuple[dict[tuple[str, str], tuple[bytes, int]], set[tuple[str, str]]]:
        """What this broker holds, for its mesh advert: agents (credential, since), interest."""
        agents: dict[tuple[str, str], tuple[bytes, int]] = {}
        subs: set[tuple[str, str]] = set()
        for tenant, space in self._tenants.items():
            for name, session in space.agents.items():
                agents[(tenant, name)] = (session.ident.credential, space.since.get(name, 0))
                subs.update((tenant, p) for p in session.subs.values())
        return agents, subs

    # --- delivery (local sessions), shared with mesh relays --------------------------------------

    def deliver_msg(self, tenant: str, agent: str, data: bytes) -> bool:
        space = self._tenants.get(tenant)
        target = space.agents.get(agent) if space else None
        if target is None:
            return False
        target.send(data)
        return True

    def deliver_pub(self, tenant: str, subject: str, data: bytes, keep: str | None) -> None:
        """Deliver to local subscribers; ``keep`` names the agent whose publication is kept
        (its permission to keep already checked)."""
        space = self._space(tenant)
        if keep is not None:
            self._keep(tenant, space, subject, keep, data)
        for target in dict.fromkeys(space.subs.match(subject)):  # one copy per connection
            target.send(data)

    def _keep(self, tenant: str, space: _TenantSpace, subject: str, by: str, data: bytes) -> None:
        old = space.retained.get(subject)
        if old is None and len(space.retained) >= MAX_RETAINED_PER_TENANT:
            # Only a relayed publication gets here (a local one was refused by kept_room).
            self.log.warning("broker.retained_full", tenant=tenant, subject=subject)
            return
        if old is not None:
            self._unkeep(space, subject)
        space.retained.put(subject, (by, data))
        space.retained_bytes += len(data)
        space.kept_by[by] = space.kept_by.get(by, 0) + len(data)
        space.kept_subjects.setdefault(by, set()).add(subject)

    def _unkeep(self, space: _TenantSpace, subject: str) -> None:
        old = space.retained.pop(subject)
        if old is None:
            return
        by, data = old
        space.retained_bytes -= len(data)
        space.kept_by[by] -= len(data)
        mine = space.kept_subjects[by]
        mine.discard(subject)
        if not mine:
            del space.kept_subjects[by], space.kept_by[by]
            space.gone.pop(by, None)

    def kept_room(self, tenant: str, agent: str, subject: str, size: int) -> str | None:
        """Why keeping a ``size``-byte frame on ``subject`` for ``agent`` would break a
        budget (None: it fits)."""
        space = self._space(tenant)
        old = space.retained.get(subject)
        if old is None:
            if len(space.kept_subjects.get(agent, ())) >= MAX_KEPT_SUBJECTS_PER_AGENT:
                return f"agent {agent!r} would keep over {MAX_KEPT_SUBJECTS_PER_AGENT} subjects"
            if len(space.retained) >= MAX_RETAINED_PER_TENANT:
                return f"tenant {tenant!r} would keep over {MAX_RETAINED_PER_TENANT} subjects"
        freed = len(old[1]) if old is not None and old[0] == agent else 0
        if space.kept_by.get(agent, 0) - freed + size > MAX_KEPT_BYTES_PER_AGENT:
            return f"agent {agent!r} would keep over {MAX_KEPT_BYTES_PER_AGENT} bytes"
        old_size = len(old[1]) if old is not None else 0
        if space.retained_bytes - old_size + size > MAX_KEPT_BYTES_PER_TENANT:
            return f"tenant {tenant!r} would keep over {MAX_KEPT_BYTES_PER_TENANT} bytes"
        return None

    def refused(
        self, tenant: str | None, kind: str, name: str, code: str, reason: str, now: int
    ) -> None:
        """Tell admins that this broker refused a verified agent (of ``tenant``) or peer broker
        (``tenant`` None: every tenant's admins) at the handshake, and why: the refused side
        cannot say so itself. A clear notice on ``$SYS.refused.<kind>.<name>``, kept for new
        watchers until ``expire_kept`` drops it."""
        subject = f"{REFUSALS}.{kind}.{name}"
        body = {"kind": kind, "name": name, "code": code, "reason": reason, "at": now}
        header = {"id": now, "subj": subject, "kid": 0}  # kid 0: not sealed
        data = encode_frame(FrameType.PUB, header, pack({**body, "broker": self.name}))
        if tenant is None:
            if subject not in self._broker_refusals and len(self._broker_refusals) >= 256:
                return  # a flood of bad peers: the first ones tell the story
            self._broker_refusals[subject] = (now, data)
            for each in list(self._tenants):
                self.deliver_pub(each, subject, data, None)
            return
        by = f"${self.name}"
        fits = self.kept_room(tenant, by, subject, len(data)) is None
        self.deliver_pub(tenant, subject, data, by if fits else None)

    def expire_kept(self, now: int, ttl_ms: int) -> int:
        """Drop what agents reachable nowhere (here or across the mesh) for ``ttl_ms`` kept;
        the number of subjects dropped. Called periodically: an agent that left, or whose
        host died, must not stay visible to new watchers, nor fill the tenant's budget."""
        dropped = 0
        for tenant, space in self._tenants.items():
            for agent in list(space.kept_subjects):
                if agent in space.agents or (
                    self.mesh is not None and self.mesh.credential(tenant, agent) is not None
                ):
                    space.gone.pop(agent, None)
                    continue
                if now - space.gone.setdefault(agent, now) < ttl_ms:
                    continue
                subjects = sorted(space.kept_subjects[agent])
                for subject in subjects:
                    self._unkeep(space, subject)
                dropped += len(subjects)
                self.log.info("broker.kept_expired", tenant=tenant, agent=agent, subjects=subjects)
        for subject, (at, _data) in list(self._broker_refusals.items()):
            if now - at >= ttl_ms:
                del self._broker_refusals[subject]
                dropped += 1
        return dropped

    def allowed(self, s: Session, kind: str, subject: str) -> bool:
        """Does ``s``'s roles' permission table allow ``kind`` on ``subject``? (cached)"""
        cache = self._allowed.get(s.id)
        if cache is None:
            cache = self._allowed[s.id] = {}
        hit = cache.get((kind, subject))
        if hit is None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            hit = cache[(kind, subject)] = permissions.allowed(
                s.ident.roles, s.ident.name, kind, subject
            )
        return hit

    # --- frames --------------------------------------------------------------------------------

    def handle(self, s: Session, f: Frame) -> None:
        """Route one frame. Raises ProtocolError for misuse that must close the connection."""
        handler = self._handlers.get(f.type)
        if handler is None:
            raise ProtocolError(f"agents may not send {f.type.name} frames")
        handler(s, f)

    def _src(self, s: Session, f: Frame) -> str:
        claimed: str | None = f.header.get("src")
        if claimed is None:
            return s.ident.name
        # Only a direct message may name its tenant (``agent@tenant``): one to another tenant.
        if f.type is FrameType.MSG:
            agent, tenant, _plugin = split_remote(claimed)
        else:
            (agent, _plugin), tenant = split_address(claimed), None
        if agent != s.ident.name or tenant not in (None, s.ident.tenant):
            raise ProtocolError(f"source {claimed!r} is not this agent", code="spoofed")
        return claimed

    def _stamped(self, s: Session, f: Frame) -> tuple[str, bytes]:
        """The frame's checked source, and the frame as it goes out: as received when it
        already names that source."""
        src = self._src(s, f)
        if f.raw and "src" in f.header:
            return src, f.raw
        return src, encode_frame(f.type, {**f.header, "src": src}, f.payload)

    def _msg(self, s: Session, f: Frame) -> None:
        h = f.header
        dst = h["dst"]
        agent, tenant, _ = split_remote(dst)
        src, data = self._stamped(s, f)
        if tenant is not None:  # another tenant's agent: only through a grant
            crossing = self.grants.crossing(s.ident.tenant, src, dst)
            if isinstance(crossing, str):
                self.log.warning("broker.cross_refused", agent=s.ident.name, dst=dst, why=crossing)
                refusal = {"id": h["id"], "dst": dst, "reason": f"forbidden: {crossing}"}
                s.send(encode_frame(FrameType.NORESP, refusal))
                return
        elif "@" in src:  # the receiver would look for the sender in another tenant
            reason = "a message inside the tenant names its source without a tenant"
            s.send(encode_frame(FrameType.NORESP, {"id": h["id"], "dst": dst, "reason": reason}))
            return
        else:
            tenant = s.ident.tenant
        if self.deliver_msg(tenant, agent, data):
            return
        if self.mesh is not None and self.mesh.forward_msg(
            tenant, agent, data, {"id": h["id"], "src": src, "dst": dst}
        ):
            return
        reason = f"no agent {agent!r} in tenant {tenant!r}"
        s.send(encode_frame(FrameType.NORESP, {"id": h["id"], "dst": dst, "reason": reason}))

    def _pub(self, s: Session, f: Frame) -> None:
        h = f.header
        subject = h["subj"]
        try:
            check_subject(subject)
        except ProtocolError as exc:
            s.send(error_frame("bad-subject", exc.reason, id=h["id"]))
            return
        keep = h.get("keep", False)
        src, data = self._stamped(s, f)
        why = self._refuse_pub(s, subject, keep, len(data))  # kept as stamped: its whole size
        if why is not None:
            self.log.warning("broker.pub_refused", agent=s.ident.name, subject=subject, reason=why)
            s.send(error_frame("forbidden", why, id=h["id"], subj=subject))
            return
        self.deliver_pub(s.ident.tenant, subject, data, s.ident.name if keep else None)
        if self.mesh is not None:
            route = {"id": h["id"], "src": src, "subj": subject}
            if keep:
                route["keep"] = True
            self.mesh.forward_pub(s.ident.tenant, subject, data, route)

    def _refuse_pub(self, s: Session, subject: str, keep: bool, size: int) -> str | None:
        ident = s.ident
        if not self.allowed(s, "publish", subject):
            return f"roles {','.join(ident.roles)} may not publish on {subject!r}"
        if keep:
            if not self.allowed(s, "keep", subject):
                return f"roles {','.join(ident.roles)} may not keep {subject!r}"
            return self.kept_room(ident.tenant, ident.name, subject, size)
        return None

    def _sub(self, s: Session, f: Frame) -> None:
        sid, pattern = f.header["sid"], f.header["subj"]
        try:
            tokens = check_subject(pattern, pattern=True, system=pattern.startswith("$"))
            if not self.allowed(s, "subscribe", pattern):
                raise ProtocolError(
                    f"roles {','.join(s.ident.roles)} may not subscribe to {pattern!r}",
                    code="forbidden",
                )
        except ProtocolError as exc:
            s.send(error_frame(exc.code, exc.reason, sid=sid, subj=pattern))
            return
        if sid not in s.subs and len(s.subs) >= MAX_SUBS_PER_SESSION:
            s.send(error_frame("limit", "too many subscriptions", sid=sid, subj=pattern))
            return
        old = s.subs.get(sid)
        s.subs[sid] = pattern
        space = self._space(s.ident.tenant)
        space.subs.add((s.id, sid), pattern, s)
        if old != pattern:  # a sid subscribed again moves to its new pattern
            if old is not None:
                self._interest(s.ident.tenant, space, old, -1)
            self._interest(s.ident.tenant, space, pattern, +1)
        for _by, data in space.retained.matching(pattern):  # a new subscriber sees the state
            s.send(data)
        if tokens[0] == REFUSALS.split(".")[0]:
            for subject, (_at, data) in self._broker_refusals.items():
                if matches(tokens, subject.split(".")):
                    s.send(data)
        self._changed()

    def _unsub(self, s: Session, f: Frame) -> None:
        sid = f.header["sid"]
        pattern = s.subs.pop(sid, None)
        if pattern is not None:
            space = self._tenants[s.ident.tenant]
            space.subs.remove((s.id, sid))
            self._interest(s.ident.tenant, space, pattern, -1)
            self._changed()

    def _keyreq(self, s: Session, f: Frame) -> None:
        name = f.header["name"]
        tenant = s.ident.tenant
        if "@" in name:
            answer = self.grants.key_answer(tenant, name, self._credential, self._all_agents)
            if isinstance(answer, str):
                s.send(error_frame("no-agent", answer, name=name))
            else:
                s.send(encode_frame(FrameType.KEYRESP, {"name": name}, answer))
            return
        target = self._space(tenant).agents.get(name)
        cred = target.ident.credential if target is not None else None
        if cred is None and self.mesh is not None:
            cred = self.mesh.credential(tenant, name)
        if cred is None:
            s.send(error_frame("no-agent", f"no agent {name!r} in tenant {tenant!r}", name=name))
            return
        s.send(encode_frame(FrameType.KEYRESP, {"name": name}, cred))

    def _revoke(self, s: Session, f: Frame) -> None:
        try:
            rev = verify_revocation(f.payload, self.state.operator_pub)
        except AuthError as exc:
            s.send(error_frame("auth", f"revocation refused: {exc.reason}"))
            return
        if rev.tenant != s.ident.tenant:
            s.send(error_frame("auth", "revocation is for another tenant"))
            return
        self.apply_revocation(f.payload)
        if self.mesh is not None:
            self.mesh.flood_sync({"kind": "revoke", "blob": f.payload})

    def _credential(self, tenant: str, agent: str) -> bytes | None:
        target = self._space(tenant).agents.get(agent)
        if target is not None:
            return target.ident.credential
        return self.mesh.credential(tenant, agent) if self.mesh is not None else None

    def _all_agents(self, tenant: str) -> dict[str, bytes]:
        """The tenant's agents here and across the mesh: name -> credential."""
        found = self.mesh.agents(tenant) if self.mesh is not None else {}
        space = self._tenants.get(tenant)
        for name, session in space.agents.items() if space else ():
            found[name] = session.ident.credential
        return found

    def _grant(self, s: Session, f: Frame) -> None:
        """An operator-signed grant or grant revocation, pushed by any agent (it is the
        operator's signature that counts): enforce it here and flood it."""
        try:
            record, new = self.apply_grant(f.payload)
        except AuthError as exc:
            s.send(error_frame("auth", f"grant refused: {exc.reason}"))
            return
        if not isinstance(record, GrantRevocation) and self.grants.revoked(record.id):
            s.send(error_frame("auth", f"grant refused: grant {record.id} was revoked"))
        elif new and self.mesh is not None:
            self.mesh.flood_sync({"kind": "grant", "blob": f.payload})

    def apply_grant(self, blob: Any) -> tuple[Grant | GrantRevocation, bool]:
        """Take a grant or revocation (raises AuthError, also for what is not one); whether
        it was news."""
        record, new = self.grants.apply(blob)
        if new:
            revoked = isinstance(record, GrantRevocation)
            self.log.info("broker.grant", id=record.id, revoked=revoked)
            self.state.keep_grant_record(blob)
        return record, new

    def apply_revocation(self, blob: bytes) -> bool:
        """Keep a (verified) revocation and cut the sessions it covers; True if it was news."""
        rev, new = self.state.add_revocation(blob)
        if new:
            self.log.info("broker.revoked", tenant=rev.tenant, agent=rev.name or rev.pub.hex()[:16])
        space = self._tenants.get(rev.tenant)
        for target in list(space.agents.values()) if space else []:
            if self.state.revoked(target.ident) is not None:
                self.detach(target)
                target.close("revoked", f"credential of agent {target.ident.name!r} was revoked")
        return new
