"""The agent's session as a state machine, without sockets: two sessions exchange the frames
they make through a hand-driven broker; every event they report is checked."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from nacl.signing import SigningKey

from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame
from atoll.protocol.session import (
    BrokerError,
    CallFailed,
    Cancelled,
    Event,
    Failure,
    KeyRequest,
    PeerKnown,
    PeerUnknown,
    Publication,
    Refused,
    Replied,
    Requested,
    Session,
    StreamMessage,
    Undelivered,
)
from atoll.protocol.trust import now_ms
from atoll.tenancy import credentials as cred

FEED = {1: os.urandom(32)}
T = 100.0  # a monotonic "now" for deadlines


@dataclass
class World:
    operator_pub: bytes
    credentials: dict[str, bytes]  # by agent name
    sessions: dict[str, Session]

    def keyresp(self, name: str, credential: bytes | None = None) -> Frame:
        """The broker's answer to a key request for ``name``."""
        blob = self.credentials[name] if credential is None else credential
        return Frame(FrameType.KEYRESP, {"name": name}, blob)

    def introduce(self, who: str, peer: str) -> None:
        """``who`` learns ``peer``'s key."""
        events = self.sessions[who].receive([self.keyresp(peer)], now_ms())
        assert [type(e) for e in events] == [PeerKnown]


def one(frame: bytes) -> Frame:
    [decoded] = decode_message(frame)
    return decoded


@pytest.fixture
def world() -> World:
    operator = SigningKey.generate()
    tenant_key = SigningKey.generate()
    claim = cred.tenant_claim(operator, "acme", tenant_key.verify_key.encode())
    credentials, sessions = {}, {}
    for name in ("alice", "bob"):
        key = SigningKey.generate()
        credentials[name] = cred.agent_credential(
            tenant_key, claim, key.verify_key.encode(), name, "acme", ["agent"]
        )
        sessions[name] = Session("acme", key._signing_key, operator.verify_key.encode(), FEED)
    return World(operator.verify_key.encode(), credentials, sessions)


def call(world: World, method: str = "m", timeout: float = 5.0) -> tuple[int, Frame]:
    """alice calls ``bob/x``; the call id and the request as the broker relays it."""
    alice = world.sessions["alice"]
    peer = alice.peers["bob"]
    call_id, frame = alice.call(peer, "alice", "bob/x", method, {"n": 1}, timeout, T + timeout, T)
    return call_id, one(frame)


def served(world: World, request: Frame) -> Requested:
    [event] = world.sessions["bob"].receive([request], now_ms())
    assert isinstance(event, Requested)
    return event


def test_call_and_reply_are_matched(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    first, request = call(world)
    second, _ = call(world)
    req = served(world, request)
    assert (req.src, req.dst, req.call, req.method, req.params) == (
        "alice",
        "bob/x",
        first,
        "m",
        {"n": 1},
    )
    assert req.peer.ident.name == "alice"
    assert req.timeout_ms == 5000
    bob, alice = world.sessions["bob"], world.sessions["alice"]
    reply = one(bob.reply(req.peer, req.dst, req.src, req.call, {"ok": True}))
    assert alice.receive([reply], now_ms()) == [Replied(first, {"ok": True})]
    replayed = alice.receive([reply], now_ms())[0]
    assert isinstance(replayed, Refused) and replayed.event == "agent.msg_refused"  # a replay
    error = one(bob.reply_error(req.peer, req.dst, req.src, second, ["NoSuchMethod", "no", None]))
    assert alice.receive([error], now_ms()) == [
        CallFailed(second, Failure.REMOTE, ["NoSuchMethod", "no", None])
    ]
    # Both calls ended: a late answer to either is dropped, nothing fails twice.
    again = one(bob.reply(req.peer, req.dst, req.src, first, "late"))
    assert alice.receive([again], now_ms()) == []


def test_frames_are_held_until_the_key_arrives(world: World) -> None:
    world.introduce("alice", "bob")
    bob = world.sessions["bob"]
    first_id, first = call(world, "first")
    _, second = call(world, "second")
    [ask] = bob.receive([first], now_ms())
    assert isinstance(ask, KeyRequest) and ask.name == "alice"
    keyreq = one(ask.frame)
    assert (keyreq.type, keyreq.header) == (FrameType.KEYREQ, {"name": "alice"})
    assert bob.receive([second], now_ms()) == []  # held too, and not asked for again
    assert bob.request_key("alice") is None
    events = bob.receive([world.keyresp("alice")], now_ms())
    assert [type(e) for e in events] == [PeerKnown, Requested, Requested]
    assert isinstance(events[1], Requested) and isinstance(events[2], Requested)
    assert (events[1].call, events[1].method, events[2].method) == (first_id, "first", "second")
    assert bob.peers["alice"].ident.name == "alice"


def test_held_frames_go_when_the_key_is_refused(world: World) -> None:
    world.introduce("alice", "bob")
    bob = world.sessions["bob"]
    _, request = call(world)
    assert [type(e) for e in bob.receive([request], now_ms())] == [KeyRequest]
    # The broker answers for alice with bob's credential: refused, and alice stays unknown.
    forged = world.keyresp("alice", world.credentials["bob"])
    refused, unknown = bob.receive([forged], now_ms())
    assert isinstance(refused, Refused) and refused.event == "agent.peer_key_refused"
    assert isinstance(unknown, PeerUnknown) and unknown.name == "alice"
    assert "credential of 'bob'" in unknown.reason
    assert "alice" not in bob.peers
    # The held request went with the refusal: the real key now brings no request.
    assert [type(e) for e in bob.receive([world.keyresp("alice")], now_ms())] == [PeerKnown]


def test_broker_error_for_a_key_request(world: World) -> None:
    alice = world.sessions["alice"]
    assert alice.request_key("carol") is not None
    header = {"code": "no-agent", "reason": "no agent 'carol'", "name": "carol"}
    error = Frame(FrameType.ERROR, header)
    assert alice.receive([error], now_ms()) == [
        BrokerError("no-agent", "no agent 'carol'", False),
        PeerUnknown("carol", "no agent 'carol'"),
    ]
    assert alice.request_key("carol") is not None  # asked again on the next need


def test_no_responder(world: World) -> None:
    world.introduce("alice", "bob")
    alice = world.sessions["alice"]
    call_id, request = call(world)
    noresp = Frame(
        FrameType.NORESP, {"id": request.header["id"], "dst": "bob/x", "reason": "no agent 'bob'"}
    )
    assert alice.receive([noresp], now_ms()) == [
        CallFailed(call_id, Failure.NO_RESPONDER, "no agent 'bob'")
    ]
    # Not a pending call's message (a stream's open): reported as undelivered.
    assert alice.receive([noresp], now_ms()) == [
        Undelivered(request.header["id"], "bob/x", "no agent 'bob'")
    ]


def test_replayed_request_is_refused(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    _, request = call(world)
    served(world, request)
    [refused] = world.sessions["bob"].receive([request], now_ms())
    assert isinstance(refused, Refused) and refused.event == "agent.msg_refused"
    assert refused.fields["code"] == "replay"


def test_tampered_message_is_refused_and_the_key_fetched_again(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    _, request = call(world)
    bad = Frame(request.type, request.header, request.payload[:-1] + b"\x00")
    [refused] = world.sessions["bob"].receive([bad], now_ms())
    assert isinstance(refused, Refused) and refused.fields["code"] == "tampered"
    assert "alice" not in world.sessions["bob"].peers


def test_cancel(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    alice = world.sessions["alice"]
    call_id, request = call(world)
    req = served(world, request)
    cancel = alice.cancel(call_id)
    assert cancel is not None and alice.cancel(call_id) is None
    assert world.sessions["bob"].receive([one(cancel)], now_ms()) == [Cancelled("alice", call_id)]
    reply = one(world.sessions["bob"].reply(req.peer, req.dst, req.src, call_id, "too late"))
    assert alice.receive([reply], now_ms()) == []
    assert alice.expire(T + 3600) == []  # ended: its deadline passes unnoticed


def test_a_deadline_passing(world: World) -> None:
    world.introduce("alice", "bob")
    alice = world.sessions["alice"]
    slow, _ = call(world, "slow", timeout=2.0)
    fast, _ = call(world, "fast", timeout=1.0)
    assert alice.expire(T + 0.999) == []
    assert "bob" in alice.peers
    assert alice.expire(T + 1.0) == [
        CallFailed(fast, Failure.DEADLINE, "bob/x did not answer 'fast' within 1.0s")
    ]
    assert "bob" not in alice.peers  # its key may have changed: asked for again next time
    assert alice.expire(T + 1.5) == []
    [expired] = alice.expire(T + 5)
    assert isinstance(expired, CallFailed)
    assert (expired.call, expired.failure) == (slow, Failure.DEADLINE)


def test_ended_calls_do_not_pile_up_deadlines(world: World) -> None:
    world.introduce("alice", "bob")
    alice = world.sessions["alice"]
    for _ in range(500):
        call_id, _ = call(world)
        alice.forget(call_id)
    assert len(alice._deadlines) <= 64 + 1


def test_request_time_left_is_measured_from_now(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    peer = world.sessions["alice"].peers["bob"]
    _, late = world.sessions["alice"].call(peer, "alice", "bob/x", "m", None, 5.0, T + 5, T + 4.5)
    assert served(world, one(late)).timeout_ms == 500


def test_connection_lost_fails_calls_and_forgets_requests(world: World) -> None:
    world.introduce("alice", "bob")
    alice = world.sessions["alice"]
    call_id, _ = call(world)
    assert alice.request_key("carol") is not None
    assert alice.connection_lost("connection to broker lost") == [
        CallFailed(call_id, Failure.DISCONNECTED, "connection to broker lost (calling bob/x)")
    ]
    assert alice.expire(T + 3600) == []
    assert alice.request_key("carol") is not None  # asked anew on the next connection


def test_key_request_that_could_not_be_written_is_asked_again(world: World) -> None:
    alice = world.sessions["alice"]
    assert alice.request_key("carol") is not None
    assert alice.request_key("carol") is None
    alice.key_request_failed("carol")
    assert alice.request_key("carol") is not None


def test_malformed_request_is_ignored(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    alice = world.sessions["alice"]
    for body in ({"k": "q", "c": "7", "m": "m"}, {"k": "q", "c": 7, "m": 3}, {"k": "zz"}):
        _, frame = alice.message(alice.peers["bob"], "alice", "bob/x", body)
        assert world.sessions["bob"].receive([one(frame)], now_ms()) == []


def test_stream_messages_pass_through(world: World) -> None:
    world.introduce("alice", "bob")
    world.introduce("bob", "alice")
    alice, bob = world.sessions["alice"], world.sessions["bob"]
    msg, frame = alice.message(alice.peers["bob"], "alice", "bob/x", {"k": "sd", "s": 1, "o": 0})
    decoded = one(frame)
    assert decoded.header["id"] == msg
    [event] = bob.receive([decoded], now_ms())
    assert isinstance(event, StreamMessage)
    assert (event.src, event.dst, event.body) == ("alice", "bob/x", {"k": "sd", "s": 1, "o": 0})


def test_publication_opened_once(world: World) -> None:
    alice, bob = world.sessions["alice"], world.sessions["bob"]
    pub = one(alice.publish("app.news", {"n": 1}, "alice/x"))
    assert "keep" not in pub.header and pub.header["kid"] == 1
    assert bob.receive([pub], now_ms()) == [Publication("app.news", "alice/x", {"n": 1})]
    [replayed] = bob.receive([pub], now_ms())
    assert isinstance(replayed, Refused) and replayed.fields["code"] == "replay"
    unknown = Frame(pub.type, {**pub.header, "kid": 9}, pub.payload)
    [refused] = bob.receive([unknown], now_ms())
    assert isinstance(refused, Refused) and refused.fields["reason"] == "unknown feed key"


def test_a_kept_copy_sent_again_is_the_current_state_not_a_replay(world: World) -> None:
    """A broker sends the kept publication to every new subscription (a second view, a one-off
    look-up) on the same connection: the latest one opens again; an older one is a replay."""
    alice, bob = world.sessions["alice"], world.sessions["bob"]
    first = one(alice.publish("discovery.announce.alice", {"n": 1}, "alice", keep=True))
    second = one(alice.publish("discovery.announce.alice", {"n": 2}, "alice", keep=True))
    assert first.header["keep"] is True
    latest = Publication("discovery.announce.alice", "alice", {"n": 2})
    kept = bob.receive([first], now_ms())[0]
    assert isinstance(kept, Publication) and kept.data == {"n": 1}
    assert bob.receive([second], now_ms()) == [latest]
    assert bob.receive([second], now_ms()) == [latest]  # a new subscription's kept copy
    [old] = bob.receive([first], now_ms())  # superseded: only a replay would bring it back
    assert isinstance(old, Refused) and old.fields["code"] == "replay"


def test_subscription_and_revocation_frames(world: World) -> None:
    alice = world.sessions["alice"]
    sub = one(alice.subscribe(3, "app.>"))
    assert (sub.type, sub.header) == (FrameType.SUB, {"sid": 3, "subj": "app.>"})
    assert one(alice.unsubscribe(3)).header == {"sid": 3}
    revoke = one(alice.revoke(b"blob"))
    assert (revoke.type, revoke.payload) == (FrameType.REVOKE, b"blob")


def test_unexpected_frames_are_reported(world: World) -> None:
    sub = one(encode_frame(FrameType.SUB, {"sid": 1, "subj": "x"}))
    events: list[Event] = world.sessions["alice"].receive([sub], now_ms())
    assert events == [Refused("agent.unexpected_frame", {"type": "SUB"})]
