"""Property and fuzz tests for the sans-I/O protocol core.

The contract under test (``atoll.protocol.errors``): whatever bytes or objects a peer sends, the
decoding and verifying functions raise ``ProtocolError`` (or a subclass) and nothing else, and what
they do accept satisfies every documented bound. Hostile inputs are built at three depths: raw
bytes, structured-but-wrong msgpack, and correctly signed/sealed data with wrong contents.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nacl import bindings
from nacl.signing import SigningKey

from atoll.protocol.errors import AuthError, ProtocolError, ReplayError
from atoll.protocol.frames import (
    MAX_FRAMES_PER_MESSAGE,
    MAX_HEADER_KEYS,
    VERSION,
    Frame,
    FrameType,
    decode_message,
    encode_frame,
    pack,
    unpack_map,
)
from atoll.protocol.handshake import ClientHandshake, ServerHandshake
from atoll.protocol.seal import (
    EPOCH_SIZE,
    NONCE_SIZE,
    WINDOW,
    ReplayGuard,
    Sealer,
    open_sealed,
)
from atoll.protocol.subjects import SubjectIndex, SubjectTable, check_subject, matches
from atoll.protocol.trust import (
    ROLES,
    AgentIdentity,
    BrokerIdentity,
    now_ms,
    verify_agent,
    verify_broker,
    verify_revocation,
)
from atoll.tenancy import credentials as cred

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SLOW = settings(FUZZ, max_examples=60)

# --- strategies --------------------------------------------------------------------------------

MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SMALL_INT = st.integers(min_value=-(2**16), max_value=2**16)


def _scalars(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=24),
        st.binary(max_size=48),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
        st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
    )


def _objects(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    """Arbitrary msgpack-encodable objects (nested arrays and maps with any key type)."""
    keys = st.one_of(st.text(max_size=10), ints, st.binary(max_size=6))
    return st.recursive(
        _scalars(ints),
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=16,
    )


OBJECTS = _objects(MSGPACK_INT)
# Used where the code under test calls bytes(x) on unsigned input: a huge int there would make the
# test allocate gigabytes (see the report), so those places get small ints only.
SMALL_OBJECTS = _objects(SMALL_INT)

# The header spec as documented in frames.py, restated here so drift is caught.
HEADER_SPEC: dict[str, tuple[type, int]] = {
    "id": (int, 2**63),
    "src": (str, 256),
    "dst": (str, 256),
    "subj": (str, 256),
    "sid": (int, 2**31),
    "kid": (int, 2**31),
    "ttl": (int, 256),
    "code": (str, 64),
    "reason": (str, 1024),
    "name": (str, 256),
    "fatal": (bool, 1),
    "keep": (bool, 1),
    "tenant": (str, 256),
    "origin": (str, 256),
    "seq": (int, 2**63),
    "to": (str, 256),
}
REQUIRED: dict[FrameType, tuple[str, ...]] = {
    FrameType.ERROR: ("code", "reason"),
    FrameType.MSG: ("id", "dst"),
    FrameType.PUB: ("id", "subj", "kid"),
    FrameType.SUB: ("sid", "subj"),
    FrameType.UNSUB: ("sid",),
    FrameType.KEYREQ: ("name",),
    FrameType.KEYRESP: ("name",),
    FrameType.NORESP: ("id", "dst", "reason"),
    FrameType.PEER_STATE: ("origin", "seq"),
    FrameType.RELAY: ("tenant", "origin", "ttl"),
    FrameType.SYNC: ("origin",),
}


def _valid_value(key: str) -> st.SearchStrategy[Any]:
    kind, bound = HEADER_SPEC[key]
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(min_value=-bound + 1, max_value=bound - 1)
    return st.text(max_size=bound)


def _boundary_values(key: str) -> list[Any]:
    kind, bound = HEADER_SPEC[key]
    if kind is int:
        return [bound - 1, bound, -bound + 1, -bound, 0, True, 1.0]
    if kind is bool:
        return [0, 1, None, "true"]
    return ["x" * bound, "x" * (bound + 1), "\U0001f600" * bound, b"x", "x" * 5000]


HEADER_KEYS = sorted(HEADER_SPEC)


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[FrameType, dict[str, Any], bytes]:
    ftype = draw(st.sampled_from(list(FrameType)))
    header = {k: draw(_valid_value(k)) for k in REQUIRED.get(ftype, ())}
    optional = draw(st.lists(st.sampled_from(HEADER_KEYS), max_size=MAX_HEADER_KEYS, unique=True))
    for k in optional:
        if len(header) < MAX_HEADER_KEYS and k not in header:
            header[k] = draw(_valid_value(k))
    payload = draw(st.binary(max_size=256))
    return ftype, header, payload


@st.composite
def hostile_headers(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(OBJECTS)  # not a map at all, usually
    keys = draw(
        st.lists(st.sampled_from([*HEADER_KEYS, "bogus", "", "ID"]), max_size=14, unique=True)
    )
    header: dict[str, Any] = {}
    for k in keys:
        choices: list[st.SearchStrategy[Any]] = [OBJECTS]
        if k in HEADER_SPEC:
            choices += [_valid_value(k), st.sampled_from(_boundary_values(k))]
        header[k] = draw(st.one_of(*choices))
    return header


@st.composite
def hostile_frame_objects(draw: st.DrawFn) -> Any:
    version = draw(
        st.one_of(st.just(VERSION), st.sampled_from([0, 2, -1, True, 1.0, "1", None]), OBJECTS)
    )
    ftype = draw(
        st.one_of(st.integers(-1, 14), st.sampled_from([5.0, True, "MSG", None, 2**63]), OBJECTS)
    )
    header = draw(hostile_headers())
    payload = draw(st.one_of(st.binary(max_size=64), OBJECTS))
    parts = [version, ftype, header, payload]
    shape = draw(st.integers(0, 6))
    if shape == 0:
        return parts[: draw(st.integers(0, 3))]  # too short
    if shape == 1:
        return [*parts, draw(OBJECTS)]  # too long
    if shape == 2:
        return tuple(parts) if draw(st.booleans()) else dict(enumerate(parts))
    return parts


def assert_frame_within_spec(frame: Frame) -> None:
    """What decode_message accepted must satisfy every documented bound."""
    assert isinstance(frame.type, FrameType)
    assert type(frame.payload) is bytes
    assert type(frame.header) is dict
    assert len(frame.header) <= MAX_HEADER_KEYS
    for key, value in frame.header.items():
        assert key in HEADER_SPEC, key
        kind, bound = HEADER_SPEC[key]
        if kind is int:
            assert type(value) is int and -bound < value < bound, (key, value)
        elif kind is bool:
            assert type(value) is bool, (key, value)
        else:
            assert type(value) is str and len(value) <= bound, (key, value)
    for key in REQUIRED.get(frame.type, ()):
        assert key in frame.header, (frame.type, key)


def decode_or_protocol_error(data: Any) -> list[Frame] | None:
    """decode_message, where only ProtocolError may escape; accepted frames are checked."""
    try:
        frames = decode_message(data)
    except ProtocolError:
        return None
    assert frames, "decode_message returned no frames without raising"
    for f in frames:
        assert_frame_within_spec(f)
        # what was accepted re-encodes to something that decodes to the same frame
        assert decode_message(f.encode()) == [f]
    return frames


# --- frames ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xc1")  # the one byte msgpack never uses
@example(b"\x94\x01\x05\x80")  # an array of 4 cut short
@example(b"\xdd\xff\xff\xff\xff")  # array32 claiming 4 G elements
@example(b"\xdb\xff\xff\xff\xff")  # str32 claiming 4 GiB
@example(b"\x91" * 5000)  # deeply nested arrays
@example(b"\x81" * 5000)  # deeply nested maps
def test_decode_arbitrary_bytes_only_protocol_error(data: bytes) -> None:
    decode_or_protocol_error(data)


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=20), st.integers(), st.lists(st.integers())))
def test_decode_non_binary_inputs_refused(data: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_message(data)


@FUZZ
@given(st.lists(hostile_frame_objects(), min_size=1, max_size=4))
def test_decode_hostile_structured_frames_only_protocol_error(objs: list[Any]) -> None:
    data = b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)
    frames = decode_or_protocol_error(data)
    if frames is not None:
        assert len(frames) == len(objs)
        for f, o in zip(frames, objs, strict=True):
            assert type(o[0]) is int and o[0] == VERSION
            assert f.payload == o[3] and f.header == o[2]


@FUZZ
@given(OBJECTS)
def test_decode_arbitrary_msgpack_objects_only_protocol_error(obj: Any) -> None:
    decode_or_protocol_error(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(st.lists(valid_frames(), min_size=1, max_size=6))
def test_valid_frames_round_trip(specs: list[tuple[FrameType, dict[str, Any], bytes]]) -> None:
    data = b"".join(encode_frame(t, h, p) for t, h, p in specs)
    frames = decode_message(data)
    assert frames == [Frame(t, h, p) for t, h, p in specs]
    assert [f.raw for f in frames] == [encode_frame(t, h, p) for t, h, p in specs]
    for f in frames:
        assert_frame_within_spec(f)
        assert Frame(f.type, f.header, f.payload).encode() == encode_frame(
            f.type, f.header, f.payload
        )


@FUZZ
@given(st.lists(valid_frames(), min_size=1, max_size=4), st.data())
def test_truncated_messages_refused_or_whole_prefix(
    specs: list[tuple[FrameType, dict[str, Any], bytes]], data: st.DataObject
) -> None:
    encoded = [encode_frame(t, h, p) for t, h, p in specs]
    whole = b"".join(encoded)
    cut = data.draw(st.integers(0, len(whole) - 1))
    boundaries: dict[int, int] = {}
    pos = 0
    for i, e in enumerate(encoded):
        pos += len(e)
        boundaries[pos] = i + 1
    if cut in boundaries:
        assert (
            decode_message(whole[:cut]) == [Frame(t, h, p) for t, h, p in specs][: boundaries[cut]]
        )
    else:
        with pytest.raises(ProtocolError):
            decode_message(whole[:cut])


@FUZZ
@given(valid_frames(), st.data())
def test_mutated_frames_only_protocol_error(
    spec: tuple[FrameType, dict[str, Any], bytes], data: st.DataObject
) -> None:
    raw = bytearray(encode_frame(*spec))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif raw:
            del raw[i]
    decode_or_protocol_error(bytes(raw))


_UNSUB = encode_frame(FrameType.UNSUB, {"sid": 1})


@pytest.mark.parametrize(
    "data",
    [
        b"\x94",  # array-of-4 header only
        b"\x94\x01\x05\x80",  # version, type and header present, payload missing
        _UNSUB[:-1],  # a frame short of its last byte
        _UNSUB + b"\x94\x01\x08",  # a whole frame, then a truncated one
        _UNSUB + _UNSUB[:-1],
    ],
    ids=["header-only", "no-payload", "last-byte-cut", "frame-then-partial", "frame-then-cut"],
)
def test_truncated_frames_refused(data: bytes) -> None:
    """msgpack's C Unpacker.tell() also counts bytes of a partially parsed array: a truncated
    trailing frame must still be refused, never silently dropped."""
    with pytest.raises(ProtocolError, match="truncated"):
        decode_message(data)


def test_frame_count_limit() -> None:
    one = encode_frame(FrameType.UNSUB, {"sid": 1})
    assert len(decode_message(one * MAX_FRAMES_PER_MESSAGE)) == MAX_FRAMES_PER_MESSAGE
    with pytest.raises(ProtocolError, match="too many frames"):
        decode_message(one * (MAX_FRAMES_PER_MESSAGE + 1))


def test_message_size_limit() -> None:
    frame = encode_frame(FrameType.MSG, {"id": 1, "dst": "a"}, b"x" * 1000)
    assert decode_message(frame, max_size=len(frame))[0].payload == b"x" * 1000
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_message(frame, max_size=len(frame) - 1)


@FUZZ
@given(st.binary(max_size=256))
def test_unpack_map_only_protocol_error(data: bytes) -> None:
    try:
        obj = unpack_map(data, "thing")
    except ProtocolError:
        return
    assert isinstance(obj, dict)


# --- a small world of real keys and credentials (built once; hypothesis dislikes fixtures) ----


@dataclass(frozen=True)
class World:
    op: SigningKey
    op_pub: bytes
    tenant_key: SigningKey
    tenant_claim: bytes
    broker_key: SigningKey
    broker_cred: bytes
    agent_key: SigningKey
    agent_cred: bytes
    token: cred.EnrollmentToken
    enrolled_key: SigningKey
    enrolled_cred: bytes
    revocation: bytes


@functools.cache
def world() -> World:
    op = SigningKey.generate()
    tk = SigningKey.generate()
    tclaim = cred.tenant_claim(op, "acme", tk.verify_key.encode())
    bk = SigningKey.generate()
    ak = SigningKey.generate()
    token = cred.enrollment_token(
        tk, tclaim, op.verify_key.encode(), {1: b"f" * 32}, "acme", ["inference"], 3600
    )
    ek = SigningKey.generate()
    return World(
        op=op,
        op_pub=op.verify_key.encode(),
        tenant_key=tk,
        tenant_claim=tclaim,
        broker_key=bk,
        broker_cred=cred.broker_credential(op, "broker-1", bk.verify_key.encode()),
        agent_key=ak,
        agent_cred=cred.agent_credential(
            tk, tclaim, ak.verify_key.encode(), "alpha", "acme", ["agent", "inference"], "eu"
        ),
        token=token,
        enrolled_key=ek,
        enrolled_cred=token.redeem(ek.verify_key.encode(), "beta"),
        revocation=cred.revocation(tk, tclaim, "acme", name="alpha"),
    )


def server_hs() -> ServerHandshake:
    w = world()
    return ServerHandshake(w.broker_key, w.broker_cred, w.op_pub, 1 << 20)


def client_hs() -> ClientHandshake:
    w = world()
    return ClientHandshake(w.agent_key, w.agent_cred, w.op_pub)


def only_protocol_error(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call fn; a ProtocolError is an answer (returned), anything else propagates and fails."""
    try:
        return fn(*args, **kwargs)
    except ProtocolError as exc:
        return exc


def test_world_is_sane() -> None:
    """The fuzzers below start from these; if they were broken every property would be vacuous."""
    w = world()
    assert verify_agent(w.agent_cred, w.op_pub).name == "alpha"
    assert verify_agent(w.enrolled_cred, w.op_pub).grant == w.token.jti
    assert verify_broker(w.broker_cred, w.op_pub).name == "broker-1"
    assert verify_revocation(w.revocation, w.op_pub).name == "alpha"
    assert cred.EnrollmentToken.decode(w.token.encode()).jti == w.token.jti


# --- handshake ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_receive_auth_arbitrary_payload(payload: bytes) -> None:
    hs = server_hs()
    with pytest.raises(ProtocolError):
        hs.receive_auth(Frame(FrameType.AUTH, {}, payload))
    assert hs.peer is None
    with pytest.raises(ProtocolError):
        hs.welcome()


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "cred": st.one_of(
                st.sampled_from(["agent", "enrolled", "broker", "revocation"]),
                st.binary(max_size=64),
                OBJECTS,
            ),
            "nonce": st.one_of(st.binary(min_size=32, max_size=32), OBJECTS),
            "sig": st.one_of(st.binary(min_size=64, max_size=64), OBJECTS),
            "extra": OBJECTS,
        },
    )
)
def test_receive_auth_structured_hostile(msg: dict[str, Any]) -> None:
    w = world()
    blobs = {
        "agent": w.agent_cred,
        "enrolled": w.enrolled_cred,
        "broker": w.broker_cred,
        "revocation": w.revocation,
    }
    if isinstance(msg.get("cred"), str) and msg["cred"] in blobs:
        msg["cred"] = blobs[msg["cred"]]
    hs = server_hs()
    # Without the agent's key nobody can produce a valid sig, so this must always be refused.
    with pytest.raises(ProtocolError):
        hs.receive_auth(Frame(FrameType.AUTH, {}, pack(msg)))
    assert hs.peer is None


@FUZZ
@given(valid_frames())
def test_receive_auth_wrong_frame_types(spec: tuple[FrameType, dict[str, Any], bytes]) -> None:
    ftype, header, payload = spec
    hs = server_hs()
    frame = decode_message(encode_frame(ftype, header, payload))[0]
    if ftype is FrameType.ERROR:
        with pytest.raises(AuthError):
            hs.receive_auth(frame)
    else:
        with pytest.raises(ProtocolError):
            hs.receive_auth(frame)
    assert hs.peer is None


@FUZZ
@given(st.binary(max_size=512))
def test_receive_hello_arbitrary_payload(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        client_hs().receive_hello(Frame(FrameType.HELLO, {}, payload))


@FUZZ
@given(
    v=st.one_of(st.just(VERSION), OBJECTS),
    nonce=st.one_of(st.binary(min_size=32, max_size=32), OBJECTS),
    max_=st.one_of(st.integers(0, 2**40), OBJECTS),
    which=st.sampled_from(["broker", "agent", "junk"]),
)
def test_receive_hello_structured_hostile(v: Any, nonce: Any, max_: Any, which: str) -> None:
    w = world()
    blob = {"broker": w.broker_cred, "agent": w.agent_cred, "junk": b"\x92\xc4\x00\xc4\x00"}[which]
    body = {"v": v, "nonce": nonce, "cred": blob, "max": max_}
    hs = client_hs()
    out = only_protocol_error(hs.receive_hello, Frame(FrameType.HELLO, {}, pack(body)))
    well_formed = (
        type(v) is int
        and v == VERSION
        and type(nonce) is bytes
        and len(nonce) == 32
        and which == "broker"
        and type(max_) is int
        and max_ >= 1024
    )
    if isinstance(out, ProtocolError):
        assert not well_formed, f"well-formed HELLO refused: {out.reason}"
    else:
        # Accepted: it must have been well-formed (modulo v being some other 1-equal value)
        assert v == VERSION and type(nonce) is bytes and len(nonce) == 32
        assert which == "broker" and type(max_) is int and max_ >= 1024
        [auth] = decode_message(out)
        assert auth.type is FrameType.AUTH


@FUZZ
@given(st.one_of(st.binary(max_size=256), OBJECTS.map(pack)))
def test_receive_welcome_arbitrary_payload(payload: bytes) -> None:
    server, client = server_hs(), client_hs()
    client.receive_hello(decode_message(server.hello())[0])
    with pytest.raises(ProtocolError):
        client.receive_welcome(Frame(FrameType.WELCOME, {}, payload))
    with pytest.raises(ProtocolError):
        client_hs().receive_welcome(Frame(FrameType.WELCOME, {}, payload))  # before HELLO


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "sig": st.one_of(st.binary(min_size=64, max_size=64), OBJECTS),
            "session": OBJECTS,
        },
    )
)
def test_receive_welcome_structured_hostile(msg: dict[str, Any]) -> None:
    server, client = server_hs(), client_hs()
    client.receive_hello(decode_message(server.hello())[0])
    with pytest.raises(ProtocolError):
        client.receive_welcome(Frame(FrameType.WELCOME, {}, pack(msg)))


# --- credentials -------------------------------------------------------------------------------

VERIFIERS = [verify_agent, verify_broker, verify_revocation]


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(VERIFIERS))
@example(b"\x80", verify_agent)
@example(b"\x92\xc4\x00\xc4\x00", verify_broker)
def test_verifiers_arbitrary_bytes(data: bytes, verify: Any) -> None:
    with pytest.raises(ProtocolError):
        verify(data, world().op_pub)


@FUZZ
@given(OBJECTS, st.sampled_from(VERIFIERS), st.booleans())
def test_verifiers_arbitrary_objects(obj: Any, verify: Any, packed: bool) -> None:
    with pytest.raises(ProtocolError):
        verify(pack(obj) if packed else obj, world().op_pub)


CHAIN_PARTS = ["tenant", "agent", "grant", "broker", "revoke"]


def _real_parts() -> dict[str, bytes]:
    """Every genuinely signed component in the world, by name."""
    w = world()
    parts: dict[str, bytes] = {"tenant_claim": w.tenant_claim}
    for name, blob in [
        ("a", w.agent_cred),
        ("e", w.enrolled_cred),
        ("b", w.broker_cred),
        ("r", w.revocation),
    ]:
        for k, v in unpack_map(blob, "chain").items():
            parts[f"{name}.{k}"] = v
    return parts


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(CHAIN_PARTS),
        st.one_of(st.sampled_from(sorted(_real_parts())), st.binary(max_size=48), OBJECTS),
        max_size=5,
    ),
    st.sampled_from(VERIFIERS),
)
def test_verifiers_spliced_chains(chain: dict[str, Any], verify: Any) -> None:
    """Chains spliced from genuine components of other chains: refused, or exactly a real one."""
    parts = _real_parts()
    chain = {k: parts.get(v, v) if isinstance(v, str) else v for k, v in chain.items()}
    out = only_protocol_error(verify, pack(chain), world().op_pub)
    if isinstance(out, ProtocolError):
        return
    w = world()
    if isinstance(out, AgentIdentity):
        assert (out.pub, out.name) in {
            (w.agent_key.verify_key.encode(), "alpha"),
            (w.enrolled_key.verify_key.encode(), "beta"),
        }
    elif isinstance(out, BrokerIdentity):
        assert out.pub == w.broker_key.verify_key.encode()
    else:
        assert out.name == "alpha" and out.tenant == "acme"


@FUZZ
@given(st.sampled_from(["agent", "enrolled", "broker", "revocation"]), st.data())
def test_verifiers_mutated_credentials(which: str, data: st.DataObject) -> None:
    """Flip/insert/delete bytes in a real credential: refused, or the same identity comes out."""
    w = world()
    blob, verify = {
        "agent": (w.agent_cred, verify_agent),
        "enrolled": (w.enrolled_cred, verify_agent),
        "broker": (w.broker_cred, verify_broker),
        "revocation": (w.revocation, verify_revocation),
    }[which]
    original = verify(blob, w.op_pub)
    raw = bytearray(blob)
    i = data.draw(st.integers(0, len(raw) - 1))
    op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    if op == "flip":
        raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "insert":
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        del raw[i]
    out = only_protocol_error(verify, bytes(raw), w.op_pub)
    if not isinstance(out, ProtocolError):
        fields = ("pub", "name", "tenant", "roles", "region", "iat", "exp", "grant", "before")
        for f in fields:
            assert getattr(out, f, None) == getattr(original, f, None), f


# Signed-but-hostile claims: whoever holds a tenant key (a tenant admin, not the operator) or an
# enrollment grant key (whoever redeems a token) can sign any claims at all. Brokers verify these
# during the handshake, so they too must only ever raise ProtocolError.
DROP = object()
GRANT_FIELDS = ["k", "tenant", "pub", "roles", "region", "iat", "exp", "cred_ttl", "jti"]
AGENT_FIELDS = ["k", "pub", "name", "tenant", "roles", "region", "iat", "exp", "grant"]
OVERRIDE = st.one_of(st.just(DROP), OBJECTS, st.sampled_from([0, -1, 2**62, "", [], ["admin"]]))


def _apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _enrolled_chain(grant_over: dict[str, Any], agent_over: dict[str, Any]) -> bytes:
    w = world()
    gk = SigningKey(bytes(range(32)))
    now = now_ms()
    grant = {
        "k": "enroll",
        "tenant": "acme",
        "pub": gk.verify_key.encode(),
        "roles": ["agent"],
        "region": "",
        "iat": now - 1000,
        "exp": now + 3_600_000,
        "cred_ttl": 60,
        "jti": "jti-1",
        "labels": {},
    }
    claims = cred.agent_claims(b"\x01" * 32, "gamma", "acme", ["agent"], "", 60, "jti-1")
    return pack(
        {
            "tenant": w.tenant_claim,
            "grant": cred.sign(w.tenant_key, _apply(grant, grant_over)),
            "agent": cred.sign(gk, _apply(claims, agent_over)),
        }
    )


def test_enrolled_chain_baseline_verifies() -> None:
    assert verify_agent(_enrolled_chain({}, {}), world().op_pub).name == "gamma"


@FUZZ
@given(
    st.dictionaries(st.sampled_from(GRANT_FIELDS), OVERRIDE, max_size=3),
    st.dictionaries(st.sampled_from(AGENT_FIELDS), OVERRIDE, max_size=3),
)
# Regression: a tenant-signed grant without "iat" once raised KeyError('iat')
@example(grant_over={"iat": DROP}, agent_over={})
# Regression: a tenant-signed grant whose "roles" is not iterable once raised TypeError
@example(grant_over={"roles": 5}, agent_over={})
def test_verify_agent_signed_hostile_grant_chain(
    grant_over: dict[str, Any], agent_over: dict[str, Any]
) -> None:
    out = only_protocol_error(verify_agent, _enrolled_chain(grant_over, agent_over), world().op_pub)
    if not isinstance(out, ProtocolError):
        assert out.tenant == "acme" and out.grant == "jti-1"
        assert all(r in ROLES for r in out.roles)


@FUZZ
@given(st.dictionaries(st.sampled_from(AGENT_FIELDS), OVERRIDE, max_size=3))
def test_verify_agent_signed_hostile_direct_claims(over: dict[str, Any]) -> None:
    w = world()
    claims = cred.agent_claims(b"\x02" * 32, "delta", "acme", ["agent"], "", 60)
    blob = pack({"tenant": w.tenant_claim, "agent": cred.sign(w.tenant_key, _apply(claims, over))})
    out = only_protocol_error(verify_agent, blob, w.op_pub)
    if not isinstance(out, ProtocolError):
        assert out.tenant == "acme" and isinstance(out.name, str) and len(out.pub) == 32


@FUZZ
@given(st.dictionaries(st.sampled_from(["k", "tenant", "name", "pub", "iat", "exp"]), OVERRIDE))
def test_verify_revocation_signed_hostile_claims(over: dict[str, Any]) -> None:
    w = world()
    claims = {"k": "revoke", "tenant": "acme", "name": "x", "pub": b"", "iat": 1, "exp": 0}
    blob = pack({"tenant": w.tenant_claim, "revoke": cred.sign(w.tenant_key, _apply(claims, over))})
    out = only_protocol_error(verify_revocation, blob, w.op_pub)
    if not isinstance(out, ProtocolError):
        assert out.tenant == "acme" and type(out.before) is int


# --- enrollment tokens -------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200))
@example("atoll1.")
@example("atoll1.====")
@example("atoll1.\u00e9")
@example("  atoll1.gA  ")
def test_token_decode_arbitrary_text(text: str) -> None:
    with pytest.raises(ProtocolError):
        cred.EnrollmentToken.decode(text)
    with pytest.raises(ProtocolError):
        cred.EnrollmentToken.decode(cred.TOKEN_PREFIX + text)


def _token_text(obj: Any) -> str:
    return cred.TOKEN_PREFIX + base64.urlsafe_b64encode(pack(obj)).decode().rstrip("=")


@FUZZ
@given(st.one_of(st.binary(max_size=300), SMALL_OBJECTS.map(pack)))
def test_token_decode_arbitrary_bytes(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        cred.EnrollmentToken.decode(
            cred.TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")
        )


@FUZZ
@given(st.dictionaries(st.sampled_from(["tenant", "grant", "seed", "op", "feed"]), SMALL_OBJECTS))
# Regression: a genuine token whose (unsigned) seed had the wrong length once raised
# nacl.exceptions.ValueError instead of AuthError.
@example({"seed": b"short"})
@example({"seed": 7})
def test_token_decode_hostile_fields(over: dict[str, Any]) -> None:
    t = world().token
    obj = {
        "tenant": t.tenant_claim,
        "grant": t.grant,
        "seed": t.grant_seed,
        "op": t.operator_pub,
        "feed": t.feed_keys,
    }
    obj.update(over)
    out = only_protocol_error(cred.EnrollmentToken.decode, _token_text(obj))
    if not isinstance(out, ProtocolError):
        # only the genuine signed parts and the genuine seed can be accepted
        assert out.jti == t.jti and out.grant_seed == t.grant_seed
        assert all(type(k) is int and type(v) is bytes for k, v in out.feed_keys.items())


# --- sealing -----------------------------------------------------------------------------------

KEY = bytes(range(32))


@FUZZ
@given(st.binary(max_size=300))
def test_open_sealed_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        open_sealed(KEY, data, "a", "b")
    if len(data) >= NONCE_SIZE + 16:
        assert info.value.code == "tampered"


@FUZZ
@given(st.one_of(OBJECTS.map(pack), st.binary(max_size=64)))
@example(pack(["a", "b", 5, b"x"]))
@example(pack(["a", "b", 5, "not bytes"]))
@example(pack(["a", "b", 5.0, b"x"]))
@example(pack(["a", "b", 5, b"x", 6]))
@example(pack(["a", ["b"], 5, b"x"]))
@example(pack({"a": 1}))
def test_open_sealed_authentic_but_hostile_plaintext(plain: bytes) -> None:
    """Correctly sealed (by a key holder) but malformed envelopes: ProtocolError or a clean open."""
    nonce = os.urandom(NONCE_SIZE)
    data = nonce + bindings.crypto_secretbox(plain, nonce, KEY)
    out = only_protocol_error(open_sealed, KEY, data, "a", "b")
    if not isinstance(out, ProtocolError):
        got_nonce, sent, body = out
        assert got_nonce == nonce and type(sent) is int
        assert msgpack.unpackb(plain, strict_map_key=False) == ["a", "b", sent, body]


@FUZZ
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.binary(max_size=300),
    st.integers(0, 2**62),
)
def test_seal_open_round_trip(src: str, to: str, body: bytes, now: int) -> None:
    sealer = Sealer()
    sealed = sealer.seal(KEY, src, to, body, now_ms=now)
    nonce, sent, got = open_sealed(KEY, sealed, src, to)
    assert (sent, got) == (now, body)
    assert nonce[:EPOCH_SIZE] == sealer.epoch
    with pytest.raises(ProtocolError) as info:
        open_sealed(KEY, sealed, src + "x", to)
    assert info.value.code == "misrouted"


def check_replay_guard_against_model(counters: list[int]) -> None:
    """Model: accept unseen counters not WINDOW or more behind the highest accepted one."""
    guard = ReplayGuard()
    epoch = b"E" * EPOCH_SIZE
    seen: set[int] = set()
    high: int | None = None
    for c in counters:
        expect_ok = high is None or c > high or (high - c < WINDOW and c not in seen)
        nonce = epoch + c.to_bytes(8, "big")
        try:
            guard.check("peer", nonce, 1000, now_ms=1000)
            ok = True
        except ReplayError:
            ok = False
        assert ok == expect_ok, (c, high)
        if ok:
            seen.add(c)
            high = c if high is None else max(high, c)


@FUZZ
@given(st.lists(st.integers(0, 3 * WINDOW), min_size=1, max_size=60))
def test_replay_guard_matches_model(counters: list[int]) -> None:
    check_replay_guard_against_model(counters)


@FUZZ
@given(st.integers(0, 3), st.lists(st.integers(-WINDOW - 3, 6), min_size=1, max_size=40))
def test_replay_guard_matches_model_once_its_window_is_full(extra: int, offsets: list[int]) -> None:
    """In-order traffic fills the window (the guard's fast path), then anything goes."""
    high = WINDOW + 4 + extra  # the lowest offset still names a counter >= 1
    check_replay_guard_against_model(list(range(1, high + 1)) + [high + o for o in offsets])


# --- subjects ----------------------------------------------------------------------------------


def ref_match(pattern: list[str], subject: list[str]) -> bool:
    """Reference NATS-style matcher, recursive and obviously correct."""
    if not pattern:
        return not subject
    head = pattern[0]
    if head == ">":
        return len(pattern) == 1 and len(subject) >= 1
    if not subject:
        return False
    return (head == "*" or head == subject[0]) and ref_match(pattern[1:], subject[1:])


TOKENS = st.sampled_from(["a", "b", "c", "metrics", "gpu-1"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=5))
    if not toks or draw(st.booleans()):
        toks.append(">" if draw(st.booleans()) else draw(TOKENS))
    return ".".join(toks)


@FUZZ
@given(patterns(), SUBJECTS)
def test_matches_agrees_with_reference(pattern: str, subject: str) -> None:
    ptoks = check_subject(pattern, pattern=True)
    stoks = check_subject(subject)
    assert matches(ptoks, stoks) == ref_match(ptoks, stoks)
    idx: SubjectIndex[str, str] = SubjectIndex()
    idx.add("k", pattern, "v")
    assert idx.match(subject) == (["v"] if ref_match(ptoks, stoks) else [])


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 4), patterns()),
            st.tuples(st.just("remove"), st.integers(0, 4), st.just("")),
            st.tuples(st.just("match"), st.just(0), SUBJECTS),
        ),
        max_size=30,
    )
)
def test_subject_index_matches_model(ops: list[tuple[str, int, str]]) -> None:
    """Interleaved add/remove/match agree with a cache-free model (the cache never goes stale)."""
    idx: SubjectIndex[int, str] = SubjectIndex(cache_limit=4)
    model: dict[int, str] = {}
    for op, key, arg in ops:
        if op == "add":
            idx.add(key, arg, f"v{key}:{arg}")
            model[key] = arg
        elif op == "remove":
            idx.remove(key)
            model.pop(key, None)
        else:
            want = sorted(
                f"v{k}:{p}" for k, p in model.items() if ref_match(p.split("."), arg.split("."))
            )
            assert sorted(idx.match(arg)) == want
        assert len(idx) == len(model)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), SUBJECTS),
            st.tuples(st.just("pop"), SUBJECTS),
            st.tuples(st.just("find"), patterns()),
        ),
        max_size=30,
    )
)
def test_subject_table_finds_what_a_scan_would(ops: list[tuple[str, str]]) -> None:
    """Kept subjects found by a pattern's walk of the trie are those a full scan matches, and
    popping prunes the trie back to empty."""
    table: SubjectTable[str] = SubjectTable()
    model: dict[str, str] = {}
    for n, (op, arg) in enumerate(ops):
        if op == "put":
            table.put(arg, f"{arg}#{n}")
            model[arg] = f"{arg}#{n}"
        elif op == "pop":
            assert table.pop(arg) == model.pop(arg, None)
        else:
            want = sorted(v for k, v in model.items() if ref_match(arg.split("."), k.split(".")))
            assert sorted(table.matching(arg)) == want
        assert len(table) == len(model)
    for subject in list(model):
        table.pop(subject)
    assert table._root.empty()


SUBJECT_CHARS = st.sampled_from(list("ab9_-:.*>$ \u00e9\n"))


def ref_valid_subject(s: str, pattern: bool, system: bool) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:")
    if not 1 <= len(s) <= 256:
        return False
    toks = s.split(".")
    if len(toks) > 16:
        return False
    for i, t in enumerate(toks):
        if i == 0 and t.startswith("$"):
            if not system:
                return False
            t = t[1:]  # "$" marks a literal token: never a wildcard
            if not (1 <= len(t) <= 64 and set(t) <= allowed):
                return False
            continue
        if pattern and (t == "*" or (t == ">" and i == len(toks) - 1)):
            continue
        if not (1 <= len(t) <= 64 and set(t) <= allowed):
            return False
    return True


@FUZZ
@given(st.text(SUBJECT_CHARS, max_size=40), st.booleans(), st.booleans())
def test_check_subject_agrees_with_reference(s: str, pattern: bool, system: bool) -> None:
    out = only_protocol_error(check_subject, s, pattern=pattern, system=system)
    if isinstance(out, ProtocolError):
        assert not ref_valid_subject(s, pattern, system), s
    else:
        assert ref_valid_subject(s, pattern, system), s
        assert out == s.split(".")
