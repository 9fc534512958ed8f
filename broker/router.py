"""Routing core of the broker (sans-I/O): sessions in, frames out.

Every address and subject is resolved inside the sender's tenant, so isolation does not depend
on agents behaving. The router never opens payloads; it only reads the clear header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from atoll.broker.state import BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame
from atoll.protocol.subjects import SubjectIndex, check_subject, split_address
from atoll.tenancy.credentials import AgentIdentity

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
    subs: SubjectIndex = field(default_factory=SubjectIndex)


def error_frame(code: str, reason: str, **header: object) -> bytes:
    return encode_frame(FrameType.ERROR, {"code": code, "reason": reason, **header})


class Router:
    def __init__(self, state: BrokerState, log: EventLogger | None = None) -> None:
        self.state = state
        self.log = log or EventLogger("broker")
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

    # --- sessions ------------------------------------------------------------------------------

    def attach(self, s: Session) -> None:
        space = self._tenants.setdefault(s.ident.tenant, _TenantSpace())
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

    def detach(self, s: Session) -> None:
        space = self._tenants.get(s.ident.tenant)
        if space is None:
            return
        for sid in list(s.subs):
            space.subs.remove((s.id, sid))
        s.subs.clear()
        if space.agents.get(s.ident.name) is s:
            del space.agents[s.ident.name]

    def agents(self, tenant: str) -> list[str]:
        space = self._tenants.get(tenant)
        return sorted(space.agents) if space else []

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

    def _msg(self, s: Session, f: Frame) -> None:
        h = f.header
        dst = h["dst"]
        agent, _ = split_address(dst)
        target = self._tenants[s.ident.tenant].agents.get(agent)
        if target is None:
            reason = f"no agent {agent!r} in tenant {s.ident.tenant!r}"
            s.send(encode_frame(FrameType.NORESP, {"id": h["id"], "dst": dst, "reason": reason}))
            return
        src = self._src(s, f)
        if f.raw and len(h) == 3 and "src" in h:  # exactly what goes out: forward the bytes
            target.send(f.raw)
        else:
            target.send(
                encode_frame(FrameType.MSG, {"id": h["id"], "src": src, "dst": dst}, f.payload)
            )

    def _pub(self, s: Session, f: Frame) -> None:
        h = f.header
        subject = h["subj"]
        try:
            check_subject(subject)
        except ProtocolError as exc:
            s.send(error_frame("bad-subject", exc.reason, id=h["id"]))
            return
        receivers = self._tenants[s.ident.tenant].subs.match(subject)
        if not receivers:
            return
        src = self._src(s, f)
        if f.raw and len(h) == 4 and "src" in h:
            data = f.raw
        else:
            out = {"id": h["id"], "src": src, "subj": subject, "kid": h["kid"]}
            data = encode_frame(FrameType.PUB, out, f.payload)
        for target in dict.fromkeys(receivers):  # one copy per connection, however many subs
            target.send(data)  # type: ignore[attr-defined]

    def _sub(self, s: Session, f: Frame) -> None:
        sid, pattern = f.header["sid"], f.header["subj"]
        try:
            check_subject(pattern, pattern=True)
            self.may_subscribe(s.ident, pattern)
        except ProtocolError as exc:
            s.send(error_frame(exc.code, exc.reason, sid=sid, subj=pattern))
            return
        if sid not in s.subs and len(s.subs) >= MAX_SUBS_PER_SESSION:
            s.send(error_frame("limit", "too many subscriptions", sid=sid, subj=pattern))
            return
        s.subs[sid] = pattern
        self._tenants[s.ident.tenant].subs.add((s.id, sid), pattern, s)

    def may_subscribe(self, ident: AgentIdentity, pattern: str) -> None:
        """Subscription policy beyond tenant scoping (tenant scoping is structural)."""

    def _unsub(self, s: Session, f: Frame) -> None:
        sid = f.header["sid"]
        if s.subs.pop(sid, None) is not None:
            self._tenants[s.ident.tenant].subs.remove((s.id, sid))

    def _keyreq(self, s: Session, f: Frame) -> None:
        name = f.header["name"]
        target = self._tenants[s.ident.tenant].agents.get(name)
        if target is None:
            reason = f"no agent {name!r} in tenant {s.ident.tenant!r}"
            s.send(error_frame("no-agent", reason, name=name))
            return
        s.send(encode_frame(FrameType.KEYRESP, {"name": name}, target.ident.credential))

    def _revoke(self, s: Session, f: Frame) -> None:
        try:
            rev = self.state.add_revocation(f.payload)
        except AuthError as exc:
            s.send(error_frame("auth", f"revocation refused: {exc.reason}"))
            return
        if rev.tenant != s.ident.tenant:
            s.send(error_frame("auth", "revocation is for another tenant"))
            return
        self.log.info("broker.revoked", tenant=rev.tenant, agent=rev.name or rev.pub.hex()[:16])
        for target in list(self._tenants[rev.tenant].agents.values()):
            if rev.covers(target.ident):
                self.detach(target)
                target.close("revoked", f"credential of agent {target.ident.name!r} was revoked")
