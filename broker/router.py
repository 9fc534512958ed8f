"""Routing core of the broker (sans-I/O): sessions in, frames out.

Every address and subject is resolved inside the sender's tenant, so isolation does not depend
on agents behaving. The router never opens payloads; it only reads the clear header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from atoll.broker.state import BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame
from atoll.protocol.subjects import SubjectIndex, check_subject, matches, split_address
from atoll.tenancy.credentials import AgentIdentity, now_ms, verify_revocation

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
    subs: SubjectIndex = field(default_factory=SubjectIndex)
    retained: dict[str, bytes] = field(default_factory=dict)  # subject -> last PUB kept


class Mesh(Protocol):
    """What the router needs from the broker mesh (absent on a lone broker)."""

    def changed(self) -> None: ...

    def forward_msg(self, tenant: str, agent: str, data: bytes, route: dict[str, Any]) -> bool: ...

    def forward_pub(
        self, tenant: str, subject: str, data: bytes, route: dict[str, Any]
    ) -> None: ...

    def credential(self, tenant: str, agent: str) -> bytes | None: ...

    def flood_sync(self, body: dict) -> None: ...


MAX_RETAINED_PER_TENANT = 10_000
METRICS_PREFIX = "metrics."
# The gateway serves the feed to admin API keys (Prometheus /metrics, the live dashboard).
WATCH_ROLES = ("admin", "operator", "gateway")


def may_watch(ident: AgentIdentity, subject: str) -> bool:
    """An agent sees its own metrics feed; only admins, operators and gateways see everyone's."""
    return (
        not subject.startswith(METRICS_PREFIX)
        or subject == METRICS_PREFIX + ident.name
        or ident.has_role(*WATCH_ROLES)
    )


def error_frame(code: str, reason: str, **header: object) -> bytes:
    return encode_frame(FrameType.ERROR, {"code": code, "reason": reason, **header})


class Router:
    def __init__(self, state: BrokerState, log: EventLogger | None = None) -> None:
        self.state = state
        self.log = log or EventLogger("broker")
        self.mesh: Mesh | None = None
        self._tenants: dict[str, _TenantSpace] = {}
        # Test/debug hook seeing every frame an agent sends, before routing; a Frame it returns
        # is routed instead (a test playing a compromised broker).
        self.tap: Callable[[Session, Frame], Frame | None] | None = None
        self._handlers = {
            FrameType.MSG: self._msg,
            FrameType.PUB: self._pub,
            FrameType.SUB: self._sub,
            FrameType.UNSUB: self._unsub,
            FrameType.KEYREQ: self._keyreq,
            FrameType.REVOKE: self._revoke,
        }

    def _space(self, tenant: str) -> _TenantSpace:
        space = self._tenants.get(tenant)
        if space is None:
            space = self._tenants[tenant] = _TenantSpace()
        return space

    # --- sessions ------------------------------------------------------------------------------

    def attach(self, s: Session) -> None:
        space = self._space(s.ident.tenant)
        old = space.agents.get(s.ident.name)
        if old is not None:
            if old.ident.pub != s.ident.pub:
                raise AuthError(
                    f"agent name {s.ident.name!r} is in use by another key in this tenant",
                    code="name-taken",
                )
            # The same agent reconnecting: the old connection is dead or dying; replace it.
            self.detach(old)
            old.close("replaced", "a newer connection of this agent took over")
        space.agents[s.ident.name] = s
        space.since[s.ident.name] = now_ms()
        if s.ident.grant and self.mesh is not None:  # other brokers learn the token is spent
            self.mesh.flood_sync(
                {
                    "kind": "enroll",
                    "jti": s.ident.grant,
                    "tenant": s.ident.tenant,
                    "pub": s.ident.pub,
                    "name": s.ident.name,
                    "at": s.ident.iat,
                }
            )
        self._changed()

    def detach(self, s: Session) -> None:
        space = self._tenants.get(s.ident.tenant)
        if space is None:
            return
        for sid in list(s.subs):
            space.subs.remove((s.id, sid))
        s.subs.clear()
        if space.agents.get(s.ident.name) is s:
            del space.agents[s.ident.name]
            space.since.pop(s.ident.name, None)
        self._changed()

    def _changed(self) -> None:
        if self.mesh is not None:
            self.mesh.changed()

    def agents(self, tenant: str) -> list[str]:
        space = self._tenants.get(tenant)
        return sorted(space.agents) if space else []

    def local_view(self) -> tuple[dict[tuple[str, str], tuple[bytes, int]], set[tuple[str, str]]]:
        """What this broker holds, for its mesh advert: agents (credential, since), interest."""
        agents = {}
        subs = set()
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

    def deliver_pub(self, tenant: str, subject: str, data: bytes, keep: bool) -> None:
        space = self._space(tenant)
        if keep:
            if subject in space.retained or len(space.retained) < MAX_RETAINED_PER_TENANT:
                space.retained[subject] = data
            else:
                self.log.warning("broker.retained_full", tenant=tenant, subject=subject)
        targets = dict.fromkeys(space.subs.match(subject))  # one copy per connection
        if subject.startswith(METRICS_PREFIX):
            targets = {t: None for t in targets if may_watch(t.ident, subject)}  # type: ignore[attr-defined]
        for target in targets:
            target.send(data)  # type: ignore[attr-defined]

    # --- frames --------------------------------------------------------------------------------

    def handle(self, s: Session, f: Frame) -> None:
        """Route one frame. Raises ProtocolError for misuse that must close the connection."""
        if self.tap is not None:
            f = self.tap(s, f) or f
        handler = self._handlers.get(f.type)
        if handler is None:
            raise ProtocolError(f"agents may not send {f.type.name} frames")
        handler(s, f)

    def _src(self, s: Session, f: Frame) -> str:
        claimed = f.header.get("src")
        if claimed is None:
            return s.ident.name
        agent, _plugin = split_address(claimed)
        if agent != s.ident.name:
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
        agent, _ = split_address(dst)
        tenant = s.ident.tenant
        src, data = self._stamped(s, f)
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
        src, data = self._stamped(s, f)
        keep = h.get("keep", False)
        self.deliver_pub(s.ident.tenant, subject, data, keep)
        if self.mesh is not None:
            route = {"id": h["id"], "src": src, "subj": subject}
            if keep:
                route["keep"] = True
            self.mesh.forward_pub(s.ident.tenant, subject, data, route)

    def _sub(self, s: Session, f: Frame) -> None:
        sid, pattern = f.header["sid"], f.header["subj"]
        try:
            tokens = check_subject(pattern, pattern=True)
            self.may_subscribe(s.ident, pattern)
        except ProtocolError as exc:
            s.send(error_frame(exc.code, exc.reason, sid=sid, subj=pattern))
            return
        if sid not in s.subs and len(s.subs) >= MAX_SUBS_PER_SESSION:
            s.send(error_frame("limit", "too many subscriptions", sid=sid, subj=pattern))
            return
        s.subs[sid] = pattern
        space = self._space(s.ident.tenant)
        space.subs.add((s.id, sid), pattern, s)
        for subject, data in space.retained.items():  # a new subscriber sees the current state
            if matches(tokens, subject.split(".")) and may_watch(s.ident, subject):
                s.send(data)
        self._changed()

    def may_subscribe(self, ident: AgentIdentity, pattern: str) -> None:
        """Subscription policy beyond tenant scoping (tenant scoping is structural): asking for
        other agents' metrics by name needs a role; wider patterns are filtered on delivery."""
        tokens = pattern.split(".")
        if (
            tokens[0] == "metrics"
            and len(tokens) > 1
            and tokens[1] != ident.name
            and not ident.has_role(*WATCH_ROLES)
        ):
            raise ProtocolError(
                "only admin, operator or gateway roles may watch other agents' metrics",
                code="forbidden",
            )

    def _unsub(self, s: Session, f: Frame) -> None:
        sid = f.header["sid"]
        if s.subs.pop(sid, None) is not None:
            self._tenants[s.ident.tenant].subs.remove((s.id, sid))
            self._changed()

    def _keyreq(self, s: Session, f: Frame) -> None:
        name = f.header["name"]
        tenant = s.ident.tenant
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

    def apply_revocation(self, blob: bytes) -> bool:
        """Keep a (verified) revocation and cut the sessions it covers; True if it was news."""
        rev, new = self.state.add_revocation(blob)
        if new:
            self.log.info("broker.revoked", tenant=rev.tenant, agent=rev.name or rev.pub.hex()[:16])
        space = self._tenants.get(rev.tenant)
        for target in list(space.agents.values()) if space else []:
            if rev.covers(target.ident):
                self.detach(target)
                target.close("revoked", f"credential of agent {target.ident.name!r} was revoked")
        return new
