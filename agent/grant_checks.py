"""The callee's own check of a call or stream from another tenant's agent (brokers checked it
too; a broker must not be all that stands between another tenant and a plugin)."""

from __future__ import annotations

from atoll.agent.errors import Forbidden
from atoll.protocol.grants import Grant, calling_grant
from atoll.protocol.session import Peer
from atoll.protocol.trust import now_ms


def granted(peer: Peer, plugin: str | None) -> Grant | None:
    """The grant a caller of another tenant comes through to ``plugin`` (None: one of ours), or
    Forbidden saying why it may not."""
    if not peer.grants:
        return None
    found = calling_grant(peer.grants, peer.ident.tenant, plugin, now_ms())
    if isinstance(found, str):
        raise Forbidden(found)
    return found
