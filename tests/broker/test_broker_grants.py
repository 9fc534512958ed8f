"""Grants in the broker's Router (sans-I/O): which cross-tenant messages and key requests pass,
checked with fake sessions and real operator-signed grants; a property test over addresses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atoll.broker.grants import GrantBook
from atoll.broker.router import Router
from atoll.broker.state import BrokerState
from atoll.protocol.errors import ProtocolError
from atoll.protocol.frames import Frame, FrameType
from atoll.protocol.grants import Grant
from atoll.tenancy import credentials as cred
from atoll.tenancy.operator import OperatorStore
from support.broker_fakes import FakeSession, frame, identity


@pytest.fixture
def router(operator: OperatorStore) -> Router:
    return Router(BrokerState(None, operator.operator_pub))


def grant(op: OperatorStore, *plugins: str, model: str = "") -> Grant:
    services = [{"plugin": p, "base_model": model} if model else {"plugin": p} for p in plugins]
    return op.grant("globex", "acme", services, ["gateway"], 600)


def connect(router: Router, op: OperatorStore, name: str, tenant: str, *roles: str) -> FakeSession:
    s = FakeSession(identity(op, name, roles or ("agent",), tenant))
    router.attach(s)
    return s


def msg(dst: str, src: str | None = None, id: int = 7) -> Frame:
    header: dict[str, Any] = {"id": id, "dst": dst}
    if src is not None:
        header["src"] = src
    return frame(FrameType.MSG, header, b"sealed")


def keyreq(name: str) -> Frame:
    return frame(FrameType.KEYREQ, {"name": name})


def test_a_grant_opens_one_plugin_one_way_and_replies_back(router, operator) -> None:
    gw = connect(router, operator, "gw", "acme", "gateway")
    node = connect(router, operator, "node", "globex", "inference")
    router.handle(gw, frame(FrameType.GRANT, {}, grant(operator, "inference").blob))
    router.handle(gw, msg("node@globex/inference", "gw@acme/gateway"))
    (got,) = node.frames()
    assert got.header["src"] == "gw@acme/gateway"  # the callee learns the caller's tenant
    router.handle(node, msg("gw@acme/gateway", "node@globex/inference"))  # the reply
    assert [f.type for f in gw.frames()] == [FrameType.MSG]
    for src, dst, sender in [
        ("gw@acme/gateway", "node@globex/storage", gw),  # not exported
        ("gw@acme/gateway", "node@globex", gw),  # the system plugin
        ("node@globex/storage", "gw@acme/gateway", node),  # not from the exported plugin
        ("node@globex/inference", "admin@acme/gateway", node),  # no such agent: no-responder
    ]:
        router.handle(sender, msg(dst, src))
        (refused,) = sender.frames()
        assert refused.type is FrameType.NORESP, (src, dst)
    assert node.frames() == [] and gw.frames() == []


def test_without_a_grant_every_qualified_name_is_refused(router, operator) -> None:
    gw = connect(router, operator, "gw", "acme", "gateway")
    node = connect(router, operator, "node", "globex", "inference")
    router.handle(gw, msg("node@globex/inference", "gw@acme/gateway"))
    (refused,) = gw.frames()
    assert refused.type is FrameType.NORESP and "no grant" in refused.header["reason"]
    router.handle(gw, msg("node@globex/inference"))  # unqualified source: refused as well
    assert "qualified" in gw.frames()[0].header["reason"]
    router.handle(gw, msg("gw@acme/gateway", "gw@acme/gateway"))  # its own tenant, qualified
    assert "names no other tenant" in gw.frames()[0].header["reason"]
    router.handle(gw, keyreq("node@globex"))
    (err,) = gw.frames()
    assert err.type is FrameType.ERROR and err.header["name"] == "node@globex"
    assert node.frames() == []


def test_spoofing_another_tenant_as_source_closes_the_sender(router, operator) -> None:
    gw = connect(router, operator, "gw", "acme", "gateway")
    router.handle(gw, frame(FrameType.GRANT, {}, grant(operator, "inference").blob))
    with pytest.raises(ProtocolError, match="not this agent"):
        router.handle(gw, msg("node@globex/inference", "gw@globex/gateway"))
    with pytest.raises(ProtocolError):  # a publication names no tenant
        router.handle(
            gw, frame(FrameType.PUB, {"id": 1, "subj": "a.b", "kid": 1, "src": "gw@acme"})
        )


def test_key_requests_show_only_agents_enrolled_for_an_exported_plugin(router, operator) -> None:
    gw = connect(router, operator, "gw", "acme", "gateway")
    node = connect(router, operator, "node", "globex", "inference")
    connect(router, operator, "store", "globex", "storage")
    g = grant(operator, "inference")
    router.handle(gw, frame(FrameType.GRANT, {}, g.blob))
    router.handle(gw, keyreq("node@globex"))
    (resp,) = gw.frames()
    answer = msgpack.unpackb(resp.payload)
    assert answer == {"cred": node.ident.credential, "grants": [g.blob]}
    router.handle(gw, keyreq("store@globex"))
    assert gw.frames()[0].type is FrameType.ERROR
    router.handle(gw, keyreq("@"))
    (listing,) = gw.frames()
    imports = msgpack.unpackb(listing.payload)["imports"]
    assert imports == [{"grant": g.blob, "agents": [node.ident.credential]}]
    router.handle(node, keyreq("gw@acme"))  # the exporter learns its caller's key
    (resp,) = node.frames()
    assert resp.type is FrameType.KEYRESP  # with the grant its caller comes through
    assert msgpack.unpackb(resp.payload) == {"cred": gw.ident.credential, "grants": [g.blob]}
    router.handle(node, keyreq("@"))  # and imports nothing itself
    assert msgpack.unpackb(node.frames()[0].payload) == {"imports": []}


def test_forged_grants_are_refused_and_revocation_is_final(router, operator) -> None:
    gw = connect(router, operator, "gw", "acme", "admin")
    acme = operator.tenant("acme")
    forged = cred.service_grant(acme.key, "globex", "acme", [{"plugin": "inference"}], ["user"], 60)
    for blob in (forged, b"", b"\x81\xa5grant\xc4\x01x"):
        router.handle(gw, frame(FrameType.GRANT, {}, blob))
        (err,) = gw.frames()
        assert err.type is FrameType.ERROR and "grant refused" in err.header["reason"]
    g = grant(operator, "inference")
    router.handle(gw, frame(FrameType.GRANT, {}, g.blob))
    assert router.grants.linking("acme", "globex")
    router.handle(gw, frame(FrameType.GRANT, {}, operator.revoke_grant(g.id)))
    assert not router.grants.linking("acme", "globex")
    router.handle(gw, frame(FrameType.GRANT, {}, g.blob))  # sent again: stays dead
    assert not router.grants.linking("acme", "globex")
    (err,) = gw.frames()
    assert err.type is FrameType.ERROR and "was revoked" in err.header["reason"]
    assert gw.closed is None


def test_grants_survive_a_restart_and_expire(operator) -> None:
    state = BrokerState(None, operator.operator_pub)
    first = Router(state)
    g = grant(operator, "inference")
    first.apply_grant(g.blob)
    assert Router(state).grants.linking("acme", "globex")
    first.apply_grant(operator.revoke_grant(g.id))
    assert not Router(state).grants.linking("acme", "globex")
    later = grant(operator, "inference")
    book = GrantBook(operator.operator_pub, clock=lambda: later.exp)
    book.apply(later.blob)  # verified now; read at its expiry
    assert book.imports("acme") == [] and book.records() == []
    assert book.linking("acme", "globex") == []


names = st.sampled_from(["gw", "node", "store", "x"])
tenants = st.sampled_from(["acme", "globex", "initech"])
plugins = st.sampled_from(["inference", "storage", "gateway", "system"])


@settings(max_examples=300, deadline=None)
@given(
    exported=st.sets(plugins, max_size=2),
    src=st.tuples(names, tenants, st.none() | plugins),
    dst=st.tuples(names, tenants, st.none() | plugins),
)
def test_crossing_passes_only_what_a_grant_covers(exported, src, dst) -> None:
    op = _OP
    book = GrantBook(op.operator_pub)
    if exported:
        book.apply(
            op.grant("globex", "acme", [{"plugin": p} for p in exported], ["gateway"], 600).blob
        )
    (sn, st_, sp), (dn, dt, dp) = src, dst

    def addr(n: str, t: str, p: str | None) -> str:
        return f"{n}@{t}" + (f"/{p}" if p else "")

    answer = book.crossing(st_, addr(sn, st_, sp), addr(dn, dt, dp))
    request = (st_, dt) == ("acme", "globex") and dp in exported
    # A reply, as far as brokers can tell (sealed): the importer's agents refuse any request in
    # it (protocol/grants.py calling_grant, tests/security/test_sec_grants.py).
    reply = (st_, dt) == ("globex", "acme") and sp in exported
    assert (answer == (dt, dn)) == (request or reply)
    if not (request or reply):
        assert isinstance(answer, str) and answer


@pytest.fixture(autouse=True, scope="module")
def _operator(tmp_path_factory: pytest.TempPathFactory) -> None:
    global _OP
    op = OperatorStore(tmp_path_factory.mktemp("op"))
    op.init()
    op.create_tenant("acme")
    op.create_tenant("globex")
    op.create_tenant("initech")
    _OP = op


_OP: OperatorStore
