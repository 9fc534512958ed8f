"""Unit tests for the sans-I/O protocol core: handshake, credentials, sealing, replay protection,
enrollment tokens, revocations, the operator data dir and subjects."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import msgpack
import pytest
from nacl.signing import SigningKey

from atoll.protocol import trust as chain
from atoll.protocol.errors import AuthError, ProtocolError, ReplayError
from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame, pack, unpack_map
from atoll.protocol.handshake import (
    AUTH_CONTEXT,
    WELCOME_CONTEXT,
    ClientHandshake,
    ServerHandshake,
    Welcome,
)
from atoll.protocol.seal import (
    EPOCH_SIZE,
    MAX_AGE_MS,
    NONCE_SIZE,
    WINDOW,
    ReplayGuard,
    Sealer,
    box_key,
    open_sealed,
    secretbox,
    secretbox_open,
)
from atoll.protocol.subjects import SubjectIndex, check_subject
from atoll.protocol.trust import (
    CLOCK_SKEW_MS,
    AgentIdentity,
    now_ms,
    verify_agent,
    verify_broker,
    verify_revocation,
)
from atoll.tenancy import credentials as cred
from atoll.tenancy.keys import load_key, read_secret, save_key, write_secret
from atoll.tenancy.operator import OperatorStore

# "now" (ms) for tests that control time: a minute before the suite started, so that material
# minted at T0 is valid at the real time too (handshakes verify at the real time).
T0 = (int(time.time()) - 60) * 1000
MAX_MESSAGE = 1 << 20


def pub(key: SigningKey) -> bytes:
    return key.verify_key.encode()


@dataclass
class Trust:
    """One operator, tenant ``acme`` and a broker: what a deployment's handshake relies on."""

    op: SigningKey
    tenant_key: SigningKey
    tenant_claim: bytes
    broker_key: SigningKey
    broker_cred: bytes

    @property
    def op_pub(self) -> bytes:
        return pub(self.op)

    def agent(
        self,
        name: str = "alpha",
        roles: tuple[str, ...] = ("agent",),
        region: str = "",
        ttl_s: int = 30 * 86400,
    ) -> tuple[SigningKey, bytes]:
        key = SigningKey.generate()
        blob = cred.agent_credential(
            self.tenant_key, self.tenant_claim, pub(key), name, "acme", list(roles), region, ttl_s
        )
        return key, blob

    def token(
        self,
        roles: tuple[str, ...] = ("inference",),
        ttl_s: int = 3600,
        region: str = "",
        cred_ttl_s: int = 30 * 86400,
    ) -> cred.EnrollmentToken:
        return cred.enrollment_token(
            self.tenant_key,
            self.tenant_claim,
            self.op_pub,
            {1: b"k" * 32},
            "acme",
            list(roles),
            ttl_s,
            region,
            cred_ttl_s,
        )

    def server(self) -> ServerHandshake:
        return ServerHandshake(self.broker_key, self.broker_cred, self.op_pub, MAX_MESSAGE)

    def client(self, key: SigningKey, blob: bytes) -> ClientHandshake:
        return ClientHandshake(key, blob, self.op_pub)


def make_trust(tenant: str = "acme") -> Trust:
    op = SigningKey.generate()
    tk = SigningKey.generate()
    bk = SigningKey.generate()
    with mock.patch.object(cred, "now_ms", return_value=T0):  # issued at T0, never expiring
        return Trust(
            op=op,
            tenant_key=tk,
            tenant_claim=cred.tenant_claim(op, tenant, pub(tk)),
            broker_key=bk,
            broker_cred=cred.broker_credential(op, "broker-1", pub(bk)),
        )


@pytest.fixture
def trust() -> Trust:
    return make_trust()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the time the credential module believes it is (issuing and default verification)."""

    def set_now(ms: int) -> None:
        monkeypatch.setattr(cred, "now_ms", lambda: ms)
        monkeypatch.setattr(chain, "now_ms", lambda: ms)

    return set_now


def one(data: bytes) -> Frame:
    [frame] = decode_message(data)
    return frame


def handshake(server: ServerHandshake, client: ClientHandshake) -> tuple[AgentIdentity, Welcome]:
    auth = client.receive_hello(one(server.hello()))
    ident = server.receive_auth(one(auth))
    assert isinstance(ident, AgentIdentity)  # the clients here are agents
    return ident, client.receive_welcome(one(server.welcome()))


def auth_refused(trust: Trust, key: SigningKey, blob: bytes) -> AuthError:
    """Run a handshake that the broker must refuse at AUTH; return the refusal."""
    server, client = trust.server(), trust.client(key, blob)
    auth = client.receive_hello(one(server.hello()))
    with pytest.raises(AuthError) as info:
        server.receive_auth(one(auth))
    assert server.peer is None
    with pytest.raises(ProtocolError):
        server.welcome()
    return info.value


def reminted(token: cred.EnrollmentToken, claims: dict[str, object]) -> bytes:
    """A credential signed with the token's grant key over arbitrary claims (as a redeemer can)."""
    return pack(
        {
            "tenant": token.tenant_claim,
            "grant": token.grant,
            "agent": cred.sign(SigningKey(token.grant_seed), claims),
        }
    )


# --- handshake: success ------------------------------------------------------------------------


def test_full_handshake_direct_credential(trust: Trust) -> None:
    key, blob = trust.agent("alpha", ("agent", "inference"), region="eu-west")
    server, client = trust.server(), trust.client(key, blob)
    ident, welcome = handshake(server, client)
    assert ident.pub == pub(key)
    assert (ident.name, ident.tenant, ident.region) == ("alpha", "acme", "eu-west")
    assert ident.roles == ("agent", "inference")
    assert ident.grant == "" and ident.credential == blob
    assert ident.has_role("inference") and not ident.has_role("admin")
    assert server.peer is ident
    assert welcome.broker.pub == pub(trust.broker_key) and welcome.broker.name == "broker-1"
    assert welcome.max_message == MAX_MESSAGE
    assert len(welcome.session) == 16 and int(welcome.session, 16) >= 0


def test_full_handshake_enrolled_credential(trust: Trust) -> None:
    token = trust.token(("inference", "storage"), region="lab")
    key = SigningKey.generate()
    blob = cred.EnrollmentToken.decode(token.encode()).redeem(pub(key), "gpu-1")
    ident, _ = handshake(trust.server(), trust.client(key, blob))
    assert (ident.name, ident.grant, ident.region) == ("gpu-1", token.jti, "lab")
    assert ident.roles == ("inference", "storage")


def test_hello_carries_nonce_credential_limit_and_clock(trust: Trust) -> None:
    server = trust.server()
    frame = one(server.hello(now=1_700_000_000_000))
    assert frame.type is FrameType.HELLO
    body = unpack_map(frame.payload, "hello")
    assert body == {
        "v": 1,
        "nonce": server.nonce,
        "cred": trust.broker_cred,
        "max": MAX_MESSAGE,
        "t": 1_700_000_000_000,
    }
    assert len(server.nonce) == 32 and trust.server().nonce != server.nonce


@pytest.mark.parametrize(
    ("offset_ms", "admitted"),
    [(0, True), (59_000, True), (-59_000, True), (61_000, False), (-600_000, False)],
)
def test_clocks_are_compared_at_the_handshake(trust: Trust, offset_ms: int, admitted: bool) -> None:
    """Each side measures the other's clock; a broker refuses an agent more than
    MAX_CLOCK_SKEW_MS off, saying by how much and what to do, once its credential verified."""
    broker_now = 1_700_000_000_000
    server, client = trust.server(), trust.client(*trust.agent())
    auth = client.receive_hello(one(server.hello(now=broker_now)), now=broker_now + offset_ms)
    assert client.skew_ms == offset_ms
    if admitted:
        assert server.receive_auth(one(auth), now=broker_now).name == "alpha"
        assert server.skew_ms == offset_ms
        assert client.receive_welcome(one(server.welcome())).skew_ms == offset_ms
        return
    with pytest.raises(AuthError) as err:
        server.receive_auth(one(auth), now=broker_now)
    assert err.value.code == "clock-skew"
    side = "ahead of" if offset_ms > 0 else "behind"
    assert f"agent 'alpha' is {abs(offset_ms) // 1000} s {side} this broker's" in err.value.reason
    assert "NTP" in err.value.reason
    assert server.verified is not None and server.verified.name == "alpha"
    assert server.peer is None  # refused: no WELCOME can follow
    with pytest.raises(ProtocolError):
        server.welcome()


def test_a_malformed_clock_is_a_protocol_error(trust: Trust) -> None:
    with pytest.raises(ProtocolError, match="'t' malformed"):
        trust.client(*trust.agent()).receive_hello(hello_with(trust, t="noon"))


# --- handshake: the broker refuses bad AUTHs ---------------------------------------------------


def test_auth_signed_over_other_nonce_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    first, client = trust.server(), trust.client(key, blob)
    auth = client.receive_hello(one(first.hello()))
    second = trust.server()  # same broker, fresh nonce: the AUTH was signed over the first one
    with pytest.raises(AuthError, match="agent signature does not verify"):
        second.receive_auth(one(auth))
    assert second.peer is None
    assert first.receive_auth(one(auth)).name == "alpha"  # the genuine recipient accepts it


def test_auth_with_signature_over_forged_nonce_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    server = trust.server()
    nonce_a = os.urandom(32)
    wrong = os.urandom(32)
    sig = key.sign(AUTH_CONTEXT + wrong + nonce_a + pub(trust.broker_key)).signature
    frame = one(
        encode_frame(FrameType.AUTH, {}, pack({"cred": blob, "nonce": nonce_a, "sig": sig}))
    )
    with pytest.raises(AuthError, match="agent signature does not verify"):
        server.receive_auth(frame)
    # the same construction over the right nonce is accepted, so the nonce is what failed
    good = key.sign(AUTH_CONTEXT + server.nonce + nonce_a + pub(trust.broker_key)).signature
    frame = one(
        encode_frame(FrameType.AUTH, {}, pack({"cred": blob, "nonce": nonce_a, "sig": good}))
    )
    assert server.receive_auth(frame).pub == pub(key)


def test_auth_relayed_to_another_broker_refused(trust: Trust) -> None:
    """Same nonce, different broker key: the AUTH is bound to the broker it was made for."""
    key, blob = trust.agent()
    real, client = trust.server(), trust.client(key, blob)
    auth = client.receive_hello(one(real.hello()))
    other_key = SigningKey.generate()
    other = ServerHandshake(
        other_key, cred.broker_credential(trust.op, "broker-2", pub(other_key)), trust.op_pub, 4096
    )
    other.nonce = real.nonce
    with pytest.raises(AuthError, match="agent signature"):
        other.receive_auth(one(auth))


def test_stolen_credential_without_its_key_refused(trust: Trust) -> None:
    _, blob = trust.agent("alpha")
    thief = SigningKey.generate()
    err = auth_refused(trust, thief, blob)
    assert "agent signature does not verify" in err.reason


def test_credential_from_another_operator_refused(trust: Trust) -> None:
    foreign = make_trust()
    key, blob = foreign.agent("alpha")
    err = auth_refused(trust, key, blob)
    assert "tenant claim has a bad signature" in err.reason
    assert verify_agent(blob, foreign.op_pub).name == "alpha"  # it is genuine elsewhere


def test_expired_credential_refused_in_handshake(
    trust: Trust, clock: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_now = now_ms()
    clock(real_now - 3_600_000)  # minted an hour ago ...
    key, blob = trust.agent(ttl_s=60)  # ... for one minute
    monkeypatch.undo()
    err = auth_refused(trust, key, blob)
    assert err.code == "expired" and err.reason.startswith("credential expired")


def test_credential_time_window(trust: Trust, clock: Callable[[int], None]) -> None:
    t1 = T0 + 10_000
    clock(t1)
    _, blob = trust.agent(ttl_s=60)
    exp = t1 + 60_000
    assert verify_agent(blob, trust.op_pub, now=t1).exp == exp
    assert verify_agent(blob, trust.op_pub, now=exp - 1).iat == t1
    with pytest.raises(AuthError, match="credential expired") as info:
        verify_agent(blob, trust.op_pub, now=exp)
    assert info.value.code == "expired"
    # issued in the future: tolerated up to the clock skew, refused beyond it
    assert verify_agent(blob, trust.op_pub, now=t1 - CLOCK_SKEW_MS).name == "alpha"
    with pytest.raises(AuthError, match="credential is issued in the future"):
        verify_agent(blob, trust.op_pub, now=t1 - CLOCK_SKEW_MS - 1)


def test_credential_without_ttl_never_expires(trust: Trust, clock: Callable[[int], None]) -> None:
    clock(T0)
    _, blob = trust.agent(ttl_s=0)
    assert verify_agent(blob, trust.op_pub, now=T0 + 100 * 365 * 86_400_000).exp == 0


def test_roles_not_granted_by_token_refused(trust: Trust) -> None:
    token = trust.token(("inference",))
    key = SigningKey.generate()
    claims = cred.agent_claims(
        pub(key), "rogue", "acme", ["inference", "admin"], "", 3600, token.jti
    )
    blob = reminted(token, claims)
    err = auth_refused(trust, key, blob)
    assert err.reason == "credential claims roles its token did not grant"
    # the honest redemption of the same token is accepted
    ok = token.redeem(pub(key), "rogue")
    assert verify_agent(ok, trust.op_pub).roles == ("inference",)


def test_region_not_granted_by_token_refused(trust: Trust) -> None:
    token = trust.token(("inference",), region="lab")
    key = SigningKey.generate()
    claims = cred.agent_claims(pub(key), "gpu-1", "acme", ["inference"], "cloud", 3600, token.jti)
    with pytest.raises(AuthError, match="region its token did not grant"):
        verify_agent(reminted(token, claims), trust.op_pub)


def test_credential_for_other_grant_refused(trust: Trust) -> None:
    token = trust.token()
    key = SigningKey.generate()
    claims = cred.agent_claims(pub(key), "gpu-1", "acme", ["inference"], "", 3600, "other-jti")
    with pytest.raises(AuthError, match="does not match its enrollment grant"):
        verify_agent(reminted(token, claims), trust.op_pub)


def test_credential_minted_after_token_expired_refused(
    trust: Trust, clock: Callable[[int], None]
) -> None:
    clock(T0)
    token = trust.token(ttl_s=60)
    clock(T0 + 120_000)  # redeemed a minute after the token expired
    blob = token.redeem(pub(SigningKey.generate()), "late")
    with pytest.raises(AuthError, match="outside its token's validity") as info:
        verify_agent(blob, trust.op_pub, now=T0 + 121_000)
    assert info.value.code == "expired"


def test_grant_signed_for_another_tenant_refused(trust: Trust) -> None:
    gk = SigningKey.generate()
    grant = {
        "k": "enroll",
        "tenant": "globex",
        "pub": pub(gk),
        "roles": ["agent"],
        "region": "",
        "iat": now_ms(),
        "exp": now_ms() + 60_000,
        "cred_ttl": 60,
        "jti": "j",
        "labels": {},
    }
    claims = cred.agent_claims(b"\x01" * 32, "x", "acme", ["agent"], "", 60, "j")
    blob = pack(
        {
            "tenant": trust.tenant_claim,
            "grant": cred.sign(trust.tenant_key, grant),
            "agent": cred.sign(gk, claims),
        }
    )
    with pytest.raises(AuthError, match="enrollment grant is for another tenant"):
        verify_agent(blob, trust.op_pub)


def test_tampered_claim_byte_refused(trust: Trust) -> None:
    key, blob = trust.agent("alpha")
    i = blob.index(b"alpha")
    tampered = blob[:i] + b"b" + blob[i + 1 :]  # "alpha" -> "blpha": still well-formed msgpack
    with pytest.raises(AuthError, match="agent claim has a bad signature"):
        verify_agent(tampered, trust.op_pub)
    err = auth_refused(trust, key, tampered)
    assert err.reason == "agent claim has a bad signature"


def test_tampered_tenant_claim_refused(trust: Trust) -> None:
    _, blob = trust.agent("alpha")
    i = blob.index(b"acme")  # first occurrence: inside the operator-signed tenant claim
    tampered = blob[:i] + b"ACME" + blob[i + 4 :]
    with pytest.raises(AuthError, match="tenant claim has a bad signature"):
        verify_agent(tampered, trust.op_pub)


def test_error_frame_during_handshake_raises_auth_error(trust: Trust) -> None:
    key, blob = trust.agent()
    err = encode_frame(FrameType.ERROR, {"code": "revoked", "reason": "go away", "fatal": True})
    with pytest.raises(AuthError) as info:
        trust.client(key, blob).receive_hello(one(err))
    assert (info.value.code, info.value.reason) == ("revoked", "go away")
    with pytest.raises(AuthError, match="go away"):
        trust.server().receive_auth(one(err))


def test_auth_state_machine_misuse(trust: Trust) -> None:
    key, blob = trust.agent()
    server, client = trust.server(), trust.client(key, blob)
    with pytest.raises(ProtocolError, match="no verified AUTH"):
        server.welcome()
    with pytest.raises(ProtocolError, match="WELCOME before HELLO"):
        client.receive_welcome(one(encode_frame(FrameType.WELCOME, {}, pack({}))))
    auth = one(client.receive_hello(one(server.hello())))
    with pytest.raises(ProtocolError, match="expected AUTH"):
        server.receive_auth(one(server.hello()))
    server.receive_auth(auth)
    with pytest.raises(ProtocolError, match="already complete"):
        server.receive_auth(auth)


# --- handshake: the agent refuses bad brokers --------------------------------------------------


def hello_with(trust: Trust, **fields: object) -> Frame:
    body: dict[str, object] = {
        "v": 1,
        "nonce": os.urandom(32),
        "cred": trust.broker_cred,
        "max": MAX_MESSAGE,
    }
    body.update(fields)
    return one(encode_frame(FrameType.HELLO, {}, pack(body)))


def test_broker_credential_from_another_operator_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    foreign = make_trust()
    with pytest.raises(AuthError, match="broker claim has a bad signature"):
        trust.client(key, blob).receive_hello(hello_with(trust, cred=foreign.broker_cred))
    # a broker credential of the right operator in the same HELLO is accepted
    assert one(trust.client(key, blob).receive_hello(hello_with(trust))).type is FrameType.AUTH


def test_agent_credential_offered_as_broker_credential_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    with pytest.raises(AuthError):
        trust.client(key, blob).receive_hello(hello_with(trust, cred=blob))


def test_expired_broker_credential(
    trust: Trust, clock: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock(T0)
    bk = SigningKey.generate()
    blob = cred.broker_credential(trust.op, "b", pub(bk), ttl_s=10)
    assert verify_broker(blob, trust.op_pub, now=T0 + 9_999).pub == pub(bk)
    with pytest.raises(AuthError, match="broker credential expired") as info:
        verify_broker(blob, trust.op_pub, now=T0 + 10_000)
    assert info.value.code == "expired"
    monkeypatch.undo()  # back to real time: the handshake verifies at "now"
    with pytest.raises(AuthError) as info:
        trust.client(*trust.agent()).receive_hello(hello_with(trust, cred=blob))
    assert info.value.code == "expired"


def test_hello_wrong_version_or_limit_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    with pytest.raises(ProtocolError) as info:
        trust.client(key, blob).receive_hello(hello_with(trust, v=2))
    assert info.value.code == "version"
    with pytest.raises(ProtocolError, match="message size"):
        trust.client(key, blob).receive_hello(hello_with(trust, max=1023))
    with pytest.raises(ProtocolError, match="nonce"):
        trust.client(key, blob).receive_hello(hello_with(trust, nonce=b"short"))


def test_welcome_signed_by_wrong_key_refused(trust: Trust) -> None:
    """An impostor replaying the real broker's credential cannot produce its WELCOME."""
    key, blob = trust.agent()
    impostor = ServerHandshake(SigningKey.generate(), trust.broker_cred, trust.op_pub, MAX_MESSAGE)
    client = trust.client(key, blob)
    client.receive_hello(one(impostor.hello()))
    data = WELCOME_CONTEXT + client.nonce + impostor.nonce + pub(key)
    forged = impostor.key.sign(data).signature
    welcome = one(encode_frame(FrameType.WELCOME, {}, pack({"sig": forged, "session": "s"})))
    with pytest.raises(AuthError, match="broker signature does not verify"):
        client.receive_welcome(welcome)
    # the very same bytes signed by the real broker key are accepted
    real = trust.broker_key.sign(data).signature
    ok = one(encode_frame(FrameType.WELCOME, {}, pack({"sig": real, "session": "s"})))
    assert client.receive_welcome(ok).session == "s"


def test_welcome_from_another_session_refused(trust: Trust) -> None:
    key, blob = trust.agent()
    s1, c1 = trust.server(), trust.client(key, blob)
    s2, c2 = trust.server(), trust.client(key, blob)
    s1.receive_auth(one(c1.receive_hello(one(s1.hello()))))
    s2.receive_auth(one(c2.receive_hello(one(s2.hello()))))
    with pytest.raises(AuthError, match="broker signature"):
        c2.receive_welcome(one(s1.welcome()))
    assert c2.receive_welcome(one(s2.welcome())).broker.name == "broker-1"


# --- sealing -----------------------------------------------------------------------------------


def sk64(key: SigningKey) -> bytes:
    return key._signing_key  # the 64-byte Ed25519 secret key, as the agent runtime passes it


def test_box_key_is_shared_and_seals_between_two_agents() -> None:
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    k_ab = box_key(sk64(a), pub(b))
    assert k_ab == box_key(sk64(b), pub(a)) and len(k_ab) == 32
    assert k_ab != box_key(sk64(c), pub(a))
    sealed = Sealer().seal(k_ab, "a", "b/inference", b"hello", now_ms=T0)
    assert b"hello" not in sealed
    assert open_sealed(k_ab, sealed, "a", "b/inference")[1:] == (T0, b"hello")
    with pytest.raises(ProtocolError) as info:
        open_sealed(box_key(sk64(c), pub(a)), sealed, "a", "b/inference")
    assert info.value.code == "tampered"


def test_box_key_refuses_unusable_peer_key() -> None:
    with pytest.raises(ProtocolError, match="unusable peer key"):
        box_key(sk64(SigningKey.generate()), b"\x01" * 31)


@pytest.mark.parametrize("where", [0, NONCE_SIZE - 1, NONCE_SIZE, NONCE_SIZE + 20, -1])
def test_open_sealed_refuses_tampering(where: int) -> None:
    key = os.urandom(32)
    sealed = bytearray(Sealer().seal(key, "a", "b", b"payload"))
    sealed[where] ^= 0x01
    with pytest.raises(ProtocolError) as info:
        open_sealed(key, bytes(sealed), "a", "b")
    assert info.value.code == "tampered"


def test_open_sealed_refuses_short_and_truncated() -> None:
    key = os.urandom(32)
    sealed = Sealer().seal(key, "a", "b", b"payload")
    with pytest.raises(ProtocolError, match="too short"):
        open_sealed(key, sealed[: NONCE_SIZE + 15], "a", "b")
    with pytest.raises(ProtocolError) as info:
        open_sealed(key, sealed[:-1], "a", "b")
    assert info.value.code == "tampered"


@pytest.mark.parametrize(("src", "to"), [("mallory", "b"), ("a", "c"), ("a", "b/other")])
def test_open_sealed_refuses_misrouted(src: str, to: str) -> None:
    key = os.urandom(32)
    sealed = Sealer().seal(key, "a", "b", b"payload")
    with pytest.raises(ProtocolError) as info:
        open_sealed(key, sealed, src, to)
    assert info.value.code == "misrouted"
    assert "'a'->'b'" in info.value.reason


def test_sealer_nonces_unique() -> None:
    key = os.urandom(32)
    sealer = Sealer()
    nonces = [sealer.seal(key, "a", "b", b"same")[:NONCE_SIZE] for _ in range(2000)]
    assert len(set(nonces)) == len(nonces)
    assert {n[:EPOCH_SIZE] for n in nonces} == {sealer.epoch}
    counters = [int.from_bytes(n[EPOCH_SIZE:], "big") for n in nonces]
    assert counters == list(range(1, 2001))
    assert Sealer().epoch != sealer.epoch  # a restarted process never reuses a nonce
    # identical plaintexts give different ciphertexts
    assert sealer.seal(key, "a", "b", b"x", T0) != sealer.seal(key, "a", "b", b"x", T0)


# --- replay guard ------------------------------------------------------------------------------

EPOCH = b"e" * EPOCH_SIZE


def nonce_of(counter: int, epoch: bytes = EPOCH) -> bytes:
    return epoch + counter.to_bytes(8, "big")


def test_replay_rejected() -> None:
    guard = ReplayGuard()
    guard.check("a", nonce_of(1), T0, now_ms=T0)
    with pytest.raises(ReplayError, match="replayed") as info:
        guard.check("a", nonce_of(1), T0, now_ms=T0)
    assert info.value.code == "replay"
    guard.check("b", nonce_of(1), T0, now_ms=T0)  # another sender has its own state
    guard.check("a", nonce_of(1, b"f" * EPOCH_SIZE), T0, now_ms=T0)  # another epoch too


def test_reordering_within_window_accepted() -> None:
    guard = ReplayGuard()
    order = [5, 1, 3, 2, 10, 4, 9, 6, 8, 7]
    for c in order:
        guard.check("a", nonce_of(c), T0, now_ms=T0)
    for c in order:  # every one of them is now a replay
        with pytest.raises(ReplayError, match="replayed"):
            guard.check("a", nonce_of(c), T0, now_ms=T0)
    guard.check("a", nonce_of(11), T0, now_ms=T0)


def test_too_old_or_too_new_rejected() -> None:
    guard = ReplayGuard()
    guard.check("a", nonce_of(1), T0 - MAX_AGE_MS, now_ms=T0)  # exactly at the limit: fine
    with pytest.raises(ReplayError, match="outside the window"):
        guard.check("a", nonce_of(2), T0 - MAX_AGE_MS - 1, now_ms=T0)
    with pytest.raises(ReplayError, match="outside the window"):
        guard.check("a", nonce_of(3), T0 + MAX_AGE_MS + 1, now_ms=T0)


def test_far_behind_rejected() -> None:
    guard = ReplayGuard()
    high = WINDOW + 5
    guard.check("a", nonce_of(high), T0, now_ms=T0)
    with pytest.raises(ReplayError, match="too far behind"):
        guard.check("a", nonce_of(high - WINDOW), T0, now_ms=T0)
    guard.check("a", nonce_of(high - WINDOW + 1), T0, now_ms=T0)  # the oldest slot still open
    with pytest.raises(ReplayError, match="replayed"):
        guard.check("a", nonce_of(high - WINDOW + 1), T0, now_ms=T0)


def test_large_jump_forgets_old_window() -> None:
    guard = ReplayGuard()
    guard.check("a", nonce_of(1), T0, now_ms=T0)
    guard.check("a", nonce_of(10 * WINDOW), T0, now_ms=T0)
    with pytest.raises(ReplayError, match="too far behind"):
        guard.check("a", nonce_of(1), T0, now_ms=T0)
    guard.check("a", nonce_of(10 * WINDOW - 1), T0, now_ms=T0)


# --- enrollment tokens -------------------------------------------------------------------------


def test_token_round_trip(trust: Trust) -> None:
    token = trust.token(("inference", "storage"), region="lab", cred_ttl_s=600)
    text = token.encode()
    assert text.startswith("atoll1.") and "=" not in text
    back = cred.EnrollmentToken.decode(f"  {text}\n")
    assert back == token
    key = SigningKey.generate()
    before = now_ms()
    ident = verify_agent(back.redeem(pub(key), "gpu-1"), trust.op_pub)
    assert (ident.grant, ident.tenant, ident.region) == (token.jti, "acme", "lab")
    # iat is the grant's (the tenant's signature); the credential lives cred_ttl from redemption
    assert before + 600_000 <= ident.exp <= now_ms() + 600_000
    assert ident.iat <= before


def test_expired_token_refused(trust: Trust, clock: Callable[[int], None]) -> None:
    clock(T0)
    text = trust.token(ttl_s=60).encode()
    assert cred.EnrollmentToken.decode(text, now=T0 + 59_999).tenant == "acme"
    with pytest.raises(AuthError, match="enrollment token expired") as info:
        cred.EnrollmentToken.decode(text, now=T0 + 60_000)
    assert info.value.code == "expired"


def test_token_refusals(trust: Trust) -> None:
    token = trust.token()
    with pytest.raises(AuthError, match="not an Atoll enrollment token"):
        cred.EnrollmentToken.decode("nats1." + token.encode()[7:])
    other_seed = dataclasses.replace(token, grant_seed=os.urandom(32))
    with pytest.raises(AuthError, match="does not match its grant"):
        cred.EnrollmentToken.decode(other_seed.encode())
    foreign = make_trust()
    forged = dataclasses.replace(token, tenant_claim=foreign.tenant_claim)
    with pytest.raises(AuthError, match="tenant claim has a bad signature"):
        cred.EnrollmentToken.decode(forged.encode())
    forged = dataclasses.replace(forged, operator_pub=foreign.op_pub)  # a consistent foreign chain
    with pytest.raises(AuthError, match="enroll claim has a bad signature"):
        cred.EnrollmentToken.decode(forged.encode())  # acme's grant is not foreign's tenant's


def test_token_from_another_operator_yields_useless_credential(trust: Trust) -> None:
    """A token is self-contained, so a forged one decodes; what it mints is refused by brokers."""
    foreign = make_trust()
    token = cred.EnrollmentToken.decode(foreign.token().encode())
    blob = token.redeem(pub(SigningKey.generate()), "x")
    with pytest.raises(AuthError, match="bad signature"):
        verify_agent(blob, trust.op_pub)


def test_enrolled_credential_cannot_outlive_token_cred_ttl(trust: Trust) -> None:
    """The redeemer signs its own agent claim with the grant key, so it picks ``exp``: a
    credential longer-lived than the grant's ``cred_ttl`` (or never expiring) is refused."""
    token = trust.token(cred_ttl_s=60)
    key = SigningKey.generate()
    forever = dataclasses.replace(token, cred_ttl_s=0).redeem(pub(key), "gpu-1")
    with pytest.raises(AuthError, match="outlives the lifetime its token allows"):
        verify_agent(forever, trust.op_pub)
    longer = dataclasses.replace(token, cred_ttl_s=61).redeem(pub(key), "gpu-1")
    with pytest.raises(AuthError, match="outlives"):
        verify_agent(longer, trust.op_pub)
    assert verify_agent(token.redeem(pub(key), "gpu-1"), trust.op_pub).exp > 0


# --- revocations -------------------------------------------------------------------------------


def test_revocation_by_name_covers_earlier_credentials_only(
    trust: Trust, clock: Callable[[int], None]
) -> None:
    clock(T0)
    _, old = trust.agent("alpha")
    _, other = trust.agent("beta")
    clock(T0 + 1000)
    rev = verify_revocation(
        cred.revocation(trust.tenant_key, trust.tenant_claim, "acme", name="alpha"), trust.op_pub
    )
    assert (rev.tenant, rev.name, rev.pub, rev.before) == ("acme", "alpha", b"", T0 + 1000)
    _, same_ms = trust.agent("alpha")
    clock(T0 + 1001)
    _, new = trust.agent("alpha")
    now = T0 + 2000
    assert rev.covers(verify_agent(old, trust.op_pub, now=now))
    assert rev.covers(verify_agent(same_ms, trust.op_pub, now=now))  # iat == before: covered
    assert not rev.covers(verify_agent(new, trust.op_pub, now=now))
    assert not rev.covers(verify_agent(other, trust.op_pub, now=now))


def test_revocation_by_pub_covers_any_name_with_that_key(
    trust: Trust, clock: Callable[[int], None]
) -> None:
    clock(T0)
    key = SigningKey.generate()
    blobs = [
        cred.agent_credential(trust.tenant_key, trust.tenant_claim, pub(key), n, "acme", ["agent"])
        for n in ("alpha", "alpha-2")
    ]
    _, unrelated = trust.agent("alpha")
    clock(T0 + 10)
    rev = verify_revocation(
        cred.revocation(trust.tenant_key, trust.tenant_claim, "acme", pub=pub(key)), trust.op_pub
    )
    assert all(rev.covers(verify_agent(b, trust.op_pub, now=T0 + 20)) for b in blobs)
    assert not rev.covers(verify_agent(unrelated, trust.op_pub, now=T0 + 20))
    clock(T0 + 11)
    later = cred.agent_credential(
        trust.tenant_key, trust.tenant_claim, pub(key), "alpha", "acme", ["agent"]
    )
    assert not rev.covers(verify_agent(later, trust.op_pub, now=T0 + 20))


def test_revocation_does_not_cross_tenants(trust: Trust, clock: Callable[[int], None]) -> None:
    clock(T0)
    key = SigningKey.generate()
    gk = SigningKey.generate()
    globex_claim = cred.tenant_claim(trust.op, "globex", pub(gk))
    theirs = cred.agent_credential(gk, globex_claim, pub(key), "alpha", "globex", ["agent"])
    clock(T0 + 10)
    rev = verify_revocation(
        cred.revocation(trust.tenant_key, trust.tenant_claim, "acme", name="alpha", pub=pub(key)),
        trust.op_pub,
    )
    assert not rev.covers(verify_agent(theirs, trust.op_pub, now=T0 + 20))


def test_revocation_refusals(trust: Trust) -> None:
    with pytest.raises(ValueError):
        cred.revocation(trust.tenant_key, trust.tenant_claim, "acme")
    intruder = SigningKey.generate()  # not acme's tenant key
    blob = cred.revocation(intruder, trust.tenant_claim, "acme", name="alpha")
    with pytest.raises(AuthError, match="revoke claim has a bad signature"):
        verify_revocation(blob, trust.op_pub)
    other_tenant = cred.revocation(trust.tenant_key, trust.tenant_claim, "globex", name="alpha")
    with pytest.raises(AuthError, match="revocation names another tenant"):
        verify_revocation(other_tenant, trust.op_pub)


def test_revoked_enrolled_agent_cannot_remint_past_revocation(
    trust: Trust, clock: Callable[[int], None]
) -> None:
    """A credential minted from a token carries an ``iat`` chosen by the redeemer (it signs with
    the grant key). An agent revoked while its token is still valid must not escape by minting
    itself a fresh credential dated after the revocation: revocations compare the grant's time."""
    clock(T0)
    token = trust.token(ttl_s=3600)
    key = SigningKey.generate()
    first = token.redeem(pub(key), "mallory")
    clock(T0 + 60_000)
    rev = verify_revocation(
        cred.revocation(trust.tenant_key, trust.tenant_claim, "acme", name="mallory"),
        trust.op_pub,
    )
    assert rev.covers(verify_agent(first, trust.op_pub, now=T0 + 60_000))
    clock(T0 + 120_000)  # still within the token's hour
    again = token.redeem(pub(key), "mallory")
    ident = verify_agent(again, trust.op_pub, now=T0 + 120_000)
    assert rev.covers(ident), "a revoked agent escaped its revocation by re-minting"


# --- the operator's data dir and key files -----------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_operator_store_writes_secrets_0600(tmp_path: Path) -> None:
    store = OperatorStore(tmp_path / "op")
    assert not store.initialised
    with pytest.raises(FileNotFoundError):
        _ = store.operator_key
    assert store.init() is True
    assert store.init() is False
    assert mode(store.root) == 0o700
    assert mode(store.root / "operator.key") == 0o600
    tdir = store.tenant_dir("default")
    for name in ("tenant.key", "feed.keys"):
        assert mode(tdir / name) == 0o600, name
    assert len(store.operator_pub) == 32
    assert pub(store.operator_key) == store.operator_pub
    store.create_tenant("acme")
    assert store.tenants() == ["acme", "default"]
    assert mode(store.tenant_dir("acme") / "tenant.key") == 0o600
    assert not list(store.root.rglob("*.tmp"))  # no temporary secrets left behind


@pytest.mark.parametrize("bad", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_read_secret_refuses_group_or_world_access(tmp_path: Path, bad: int) -> None:
    store = OperatorStore(tmp_path / "op")
    store.init()
    key_file = store.root / "operator.key"
    os.chmod(key_file, bad)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_secret(key_file)
    with pytest.raises(PermissionError):
        _ = store.operator_key
    os.chmod(key_file, 0o400)
    assert pub(store.operator_key) == store.operator_pub


def test_write_secret_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "s" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_secret(path, b"new")
    assert mode(path) == 0o600 and read_secret(path) == b"new"


def test_key_file_round_trip_and_refusal(tmp_path: Path) -> None:
    key = SigningKey.generate()
    save_key(tmp_path / "k", key)
    assert bytes(load_key(tmp_path / "k")) == bytes(key)
    write_secret(tmp_path / "junk", b"not a key file\n")
    with pytest.raises(ValueError, match="not an Atoll key file"):
        load_key(tmp_path / "junk")


def test_operator_store_issues_verifiable_material(tmp_path: Path) -> None:
    store = OperatorStore(tmp_path / "op")
    store.init()
    store.create_tenant("acme")
    with pytest.raises(FileExistsError):
        store.create_tenant("acme")
    with pytest.raises(ProtocolError):
        store.create_tenant("Bad Name")
    key = SigningKey.generate()
    ident = verify_agent(
        store.agent_credential("acme", pub(key), "alpha", ["agent"]), store.operator_pub
    )
    assert (ident.tenant, ident.name) == ("acme", "alpha")
    token = cred.EnrollmentToken.decode(store.token("acme", ["inference"], 60).encode())
    assert token.operator_pub == store.operator_pub and token.tenant == "acme"
    assert token.feed_keys == store.tenant("acme").feed_keys
    blob = store.revoke("acme", name="alpha")
    assert store.revocations() == [blob]
    assert verify_revocation(blob, store.operator_pub).covers(ident)
    bk = SigningKey.generate()
    assert verify_broker(store.broker_credential("b1", pub(bk)), store.operator_pub).pub == pub(bk)


# --- subjects ----------------------------------------------------------------------------------


def test_subject_index_wildcards() -> None:
    idx: SubjectIndex[str, str] = SubjectIndex()
    for key, pattern in [
        ("star", "metrics.*"),
        ("tail", "metrics.>"),
        ("exact", "metrics.gpu"),
        ("all", ">"),
        ("first", "*.gpu"),
        ("two", "*.*"),
    ]:
        idx.add(key, pattern, key)
    assert sorted(idx.match("metrics.gpu")) == ["all", "exact", "first", "star", "tail", "two"]
    assert sorted(idx.match("metrics.gpu.0")) == ["all", "tail"]
    assert sorted(idx.match("metrics")) == ["all"]  # ">" needs at least one more token
    assert sorted(idx.match("jobs.gpu")) == ["all", "first", "two"]
    assert sorted(idx.match("metrics.cpu")) == ["all", "star", "tail", "two"]


def test_subject_index_cache_invalidated_on_add_and_remove() -> None:
    idx: SubjectIndex[int, str] = SubjectIndex()
    assert idx.match("a.b") == []
    idx.add(1, "a.*", "one")
    assert idx.match("a.b") == ["one"]
    idx.add(2, "a.>", "two")
    assert sorted(idx.match("a.b")) == ["one", "two"]
    idx.remove(1)
    assert idx.match("a.b") == ["two"]
    idx.add(2, "x.y", "two")  # re-adding a key replaces its pattern
    assert idx.match("a.b") == []
    assert idx.match("x.y") == ["two"]
    idx.remove(99)  # unknown key: no error
    assert len(idx) == 1
    idx.remove(2)
    assert idx.match("x.y") == [] and len(idx) == 0


def test_subject_index_change_invalidates_only_what_it_matches() -> None:
    """A subscription change drops only the cached subjects its pattern matches (NATS's
    sublist), so the next publications on other subjects stay a dict lookup."""
    idx: SubjectIndex[int, str] = SubjectIndex()
    idx.add(1, "metrics.*", "watch")
    for subject in ("metrics.a", "metrics.b", "jobs.1.events", "jobs.2.events"):
        idx.match(subject)
    idx.add(2, "jobs.1.events", "job-1")  # literal: one cached subject
    assert set(idx._cache) == {"metrics.a", "metrics.b", "jobs.2.events"}
    idx.add(3, "jobs.*.events", "jobs")  # a wildcard: the subjects it matches
    assert set(idx._cache) == {"metrics.a", "metrics.b"}
    assert sorted(idx.match("jobs.1.events")) == ["job-1", "jobs"]
    idx.remove(1)
    assert set(idx._cache) == {"jobs.1.events"}
    assert idx.match("metrics.a") == []
    idx.remove(2)
    idx.remove(3)
    assert idx._root.empty()  # emptied levels are pruned


def test_subject_index_cache_limit() -> None:
    idx: SubjectIndex[int, str] = SubjectIndex(cache_limit=2)
    idx.add(1, ">", "v")
    for i in range(10):
        assert idx.match(f"s.{i}") == ["v"]
    assert len(idx._cache) <= 2


@pytest.mark.parametrize(
    ("subject", "kwargs"),
    [
        ("$SYS.revoke", {}),
        ("$SYS.>", {"pattern": True}),
        ("", {}),
        ("a..b", {}),
        (".a", {}),
        ("a.", {}),
        ("a" * 257, {}),
        ("a." * 16 + "a", {}),  # 17 tokens
        ("x" * 65, {}),
        ("a.*", {}),  # wildcard in a plain subject
        ("a.>", {}),
        ("a.>.b", {"pattern": True}),  # '>' only last
        ("a*", {"pattern": True}),
        ("a b", {}),
        ("caf\u00e9", {}),
        ("$", {"system": True}),
        ("a.$b", {"system": True}),  # '$' only on the first token
    ],
)
def test_check_subject_refuses(subject: str, kwargs: dict[str, bool]) -> None:
    with pytest.raises(ProtocolError):
        check_subject(subject, **kwargs)


@pytest.mark.parametrize(
    ("subject", "kwargs", "tokens"),
    [
        ("$SYS.revoke", {"system": True}, ["$SYS", "revoke"]),
        ("metrics.gpu-1", {}, ["metrics", "gpu-1"]),
        ("a:b.C_d", {}, ["a:b", "C_d"]),
        ("*.x.>", {"pattern": True}, ["*", "x", ">"]),
        (">", {"pattern": True}, [">"]),
        ("a." * 15 + "a", {}, ["a"] * 16),
        ("x" * 64, {}, ["x" * 64]),
    ],
)
def test_check_subject_accepts(subject: str, kwargs: dict[str, bool], tokens: list[str]) -> None:
    assert check_subject(subject, **kwargs) == tokens


def test_check_subject_length_boundary() -> None:
    ok = ".".join(["x" * 63] * 4)  # 255 characters
    assert len(check_subject(ok)) == 4
    assert len(check_subject(ok + "y")) == 4  # 256: the limit
    with pytest.raises(ProtocolError, match="1-256 characters"):
        check_subject(ok + ".y")  # 257
    with pytest.raises(ProtocolError):
        check_subject(None)  # type: ignore[arg-type]


def test_signed_non_map_claim_refused() -> None:
    """A non-map claim body signed correctly still surfaces as AuthError, not a msgpack error."""
    op = SigningKey.generate()
    body = msgpack.packb([1, 2, 3])
    blob = pack({"broker": pack([body, op.sign(body).signature])})
    with pytest.raises(AuthError, match="must be a map"):
        verify_broker(blob, pub(op))


def test_secretbox_is_nacls_and_refuses_tampering() -> None:
    """The direct libsodium calls give PyNaCl's (NaCl's) bytes, and open only what they sealed."""
    from nacl import bindings

    key, nonce = os.urandom(32), os.urandom(24)
    for message in (b"", b"x", os.urandom(128), os.urandom(70_000)):
        boxed = secretbox(message, nonce, key)
        assert boxed == bindings.crypto_secretbox_easy(message, nonce, key)
        assert secretbox_open(boxed, nonce, key) == message
        flipped = bytes([boxed[0] ^ 1]) + boxed[1:]
        assert secretbox_open(flipped, nonce, key) is None
        assert secretbox_open(boxed, nonce, os.urandom(32)) is None
    assert secretbox_open(b"short", nonce, key) is None
    with pytest.raises(ProtocolError, match="32-byte key"):
        secretbox(b"m", nonce, key[:31])
    with pytest.raises(ProtocolError, match="24-byte nonce"):
        secretbox_open(b"m" * 20, nonce[:8], key)
