"""Grants in the protocol core (sans-I/O): qualified addresses, the verifiers, and a session
learning another tenant's key only with a grant that joins the two tenants."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, decode_message, pack
from atoll.protocol.grants import calling_grant, verify_grant, verify_record
from atoll.protocol.session import Event, PeerKnown, PeerUnknown, Requested, Session
from atoll.protocol.subjects import peer_name, qualify, split_address, split_remote
from atoll.protocol.trust import now_ms
from atoll.tenancy import credentials as cred

FEED = {1: os.urandom(32)}
OPERATOR = SigningKey.generate()
OP_PUB = OPERATOR.verify_key.encode()


def tenant(name: str) -> tuple[SigningKey, bytes]:
    key = SigningKey.generate()
    return key, cred.tenant_claim(OPERATOR, name, key.verify_key.encode())


def member(
    t: tuple[SigningKey, bytes], tname: str, name: str, *roles: str
) -> tuple[bytes, Session]:
    key = SigningKey.generate()
    blob = cred.agent_credential(t[0], t[1], key.verify_key.encode(), name, tname, list(roles))
    return blob, Session(tname, key._signing_key, OP_PUB, FEED)


def grant(
    importer: str = "acme", exporter: str = "globex", roles: tuple[str, ...] = ("gateway",)
) -> bytes:
    return cred.service_grant(
        OPERATOR, exporter, importer, [{"plugin": "inference"}], list(roles), 60
    )


def test_qualified_addresses_cannot_pass_for_in_tenant_names() -> None:
    assert split_remote("node@globex/inference") == ("node", "globex", "inference")
    assert split_remote("node") == ("node", None, None)
    assert peer_name("node@globex/inference") == "node@globex" and peer_name("n/p") == "n"
    assert qualify("gw/gateway", "acme") == "gw@acme/gateway" and qualify("gw", "a") == "gw@a"
    for bad in ("node@", "@globex", "node@Globex", "node@a@b", "node@a/p/q", "a@b/"):
        with pytest.raises(ProtocolError):
            split_remote(bad)
    with pytest.raises(ProtocolError):
        split_address("node@globex/inference")  # in-tenant parsing refuses a qualifier


def test_verifiers_refuse_what_the_operator_did_not_sign() -> None:
    g = verify_grant(grant(), OP_PUB)
    assert (g.importer, g.exporter, g.roles) == ("acme", "globex", ("gateway",))
    t_key, _ = tenant("acme")
    with pytest.raises(AuthError, match="bad signature"):
        verify_grant(
            cred.service_grant(t_key, "globex", "acme", [{"plugin": "p"}], ["user"], 9), OP_PUB
        )
    with pytest.raises(AuthError, match="two different tenants"):
        verify_grant(grant("acme", "acme"), OP_PUB)
    with pytest.raises(AuthError, match="grant roles"):
        verify_grant(grant(roles=("operator",)), OP_PUB)
    assert verify_record(cred.grant_revocation(OPERATOR, g.id), OP_PUB).id == g.id
    assert calling_grant([g], "acme", "inference", now_ms()) is g
    assert "does not export" in str(calling_grant([g], "acme", "storage", now_ms()))
    assert "expired" in str(calling_grant([g], "acme", "inference", g.exp))
    # The exporter's agents answer the importer's calls and make none of their own.
    for plugin in ("storage", "inference", None):
        assert "imports nothing" in str(calling_grant([g], "globex", plugin, now_ms()))
    # Grants both ways: each call is judged by the one its caller imports through.
    back = verify_grant(grant("globex", "acme", roles=("gateway",)), OP_PUB)
    assert calling_grant([g, back], "globex", "inference", now_ms()) is back
    assert calling_grant([g, back], "acme", "inference", now_ms()) is g


FIELDS = st.sampled_from(["grant", "ungrant", "x"])
VALUES = st.binary(max_size=80) | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.builds(pack, st.dictionaries(FIELDS, VALUES, max_size=3)))
def test_any_bytes_give_a_grant_record_or_an_auth_error(blob: bytes) -> None:
    with contextlib.suppress(AuthError):
        verify_record(blob, OP_PUB)


def test_a_session_learns_another_tenants_key_only_with_a_joining_grant() -> None:
    acme, globex, initech = tenant("acme"), tenant("globex"), tenant("initech")
    gw_cred, gw = member(acme, "acme", "gw", "gateway", "user")
    node_cred, node = member(globex, "globex", "node", "inference")

    def answer(who: Session, name: str, payload: bytes) -> list[Event]:
        return who.receive([Frame(FrameType.KEYRESP, {"name": name}, payload)], now_ms())

    good = grant(roles=("gateway", "training"))
    [known] = answer(gw, "node@globex", pack({"cred": node_cred, "grants": [good]}))
    assert isinstance(known, PeerKnown) and known.peer.ident.roles == ("inference",)
    [known] = answer(node, "gw@acme", pack({"cred": gw_cred, "grants": [good]}))
    assert isinstance(known, PeerKnown)
    assert known.peer.ident.roles == ("gateway",)  # granted, and held at home: not training
    other = grant("initech", "globex")
    for name, payload in [
        ("gw@acme", pack({"cred": gw_cred, "grants": [other]})),  # joins other tenants
        ("gw@acme", gw_cred),  # no grant at all
        ("gw@acme", pack({"cred": node_cred, "grants": [good]})),  # someone else's credential
        ("gw@acme", pack({"grants": [good]})),
        ("gw@acme", pack({"cred": gw_cred, "grants": [good, other]})),  # one joins others
        ("gw@acme", pack({"cred": gw_cred, "grant": good})),  # not a list
    ]:
        events = answer(node, name, payload)
        assert any(isinstance(e, PeerUnknown) for e in events), payload
    assert initech  # a third tenant exists; nothing joins it

    # A request sealed to the granted peer names the caller's tenant in its source.
    peer = gw.peers["node@globex"]
    _, frame = gw.call(peer, "gw/gateway", "node@globex/inference", "generate", {}, 5, 105, 100)
    [request] = decode_message(frame)
    assert request.header["src"] == "gw@acme/gateway"
    node.peers["gw@acme"] = known.peer
    [served] = node.receive([request], now_ms())
    assert isinstance(served, Requested) and served.peer.grants
