"""The broker mesh's routing state (sans-I/O): a link-state database.

Every broker floods an advertisement of what it holds — its peer links, its agents (with their
credentials, so any broker can answer a key request) and its subscription interest — numbered by a
sequence that only grows. Each broker keeps the newest advertisement of every broker, so all share
one view of the graph. From it:

* a direct message goes hop by hop along the shortest path to the broker holding the agent;
* a publication goes down the shortest-path tree rooted at the broker it entered the mesh on,
  only into branches holding an interested broker. All brokers compute the same tree, so each
  interested broker gets one copy, cycles or not; a (origin, id) memory and a hop limit guard
  against the moments when views differ.

Edges count only when both ends advertise them, so a dead broker drops out as soon as one of its
neighbours notices.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from atoll.protocol.errors import ProtocolError
from atoll.protocol.frames import pack, unpack_map
from atoll.protocol.subjects import SubjectIndex, check_name, check_subject

MAX_HOPS = 16
MAX_ADVERT = 8 * 1024 * 1024


@dataclass
class Advert:
    name: str
    seq: int
    peers: frozenset[str]
    agents: dict[tuple[str, str], tuple[bytes, int]]  # (tenant, agent) -> (credential, since_ms)
    subs: frozenset[tuple[str, str]]  # (tenant, pattern)
    received: float = field(default_factory=time.monotonic)

    def encode(self) -> bytes:
        return pack(
            {
                "name": self.name,
                "seq": self.seq,
                "peers": sorted(self.peers),
                "agents": [[t, a, c, s] for (t, a), (c, s) in self.agents.items()],
                "subs": [list(x) for x in sorted(self.subs)],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Advert:
        m = unpack_map(data, "link-state advertisement", MAX_ADVERT)
        try:
            name, seq = check_name(m["name"], "broker name"), m["seq"]
            if type(seq) is not int:
                raise ProtocolError("advert seq must be an int")
            peers = frozenset(check_name(p, "broker name") for p in m["peers"])
            agents: dict[tuple[str, str], tuple[bytes, int]] = {}
            for tenant, agent, cred, since in m["agents"]:
                check_name(tenant, "tenant name")
                check_name(agent, "agent name")
                if type(cred) is not bytes or type(since) is not int:
                    raise ProtocolError("advert agent entry malformed")
                agents[(tenant, agent)] = (cred, since)
            subs = set()
            for tenant, pattern in m["subs"]:
                check_name(tenant, "tenant name")
                check_subject(pattern, pattern=True)
                subs.add((tenant, pattern))
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("link-state advertisement malformed") from None
        return cls(name, seq, peers, agents, frozenset(subs))


class LinkState:
    def __init__(self, me: str) -> None:
        self.me = me
        # Start from the clock so a restarted broker's adverts supersede its old ones.
        self._seq = time.time_ns() // 1000
        self.adverts: dict[str, Advert] = {}
        self._hops: dict[str, str] | None = None
        self._trees: dict[str, dict[str, str | None]] = {}
        self._interest: dict[str, SubjectIndex] | None = None

    # --- adverts ---------------------------------------------------------------------------------

    def advertise(
        self,
        peers: set[str],
        agents: dict[tuple[str, str], tuple[bytes, int]],
        subs: set[tuple[str, str]],
    ) -> Advert:
        self._seq += 1
        advert = Advert(self.me, self._seq, frozenset(peers), dict(agents), frozenset(subs))
        self.adverts[self.me] = advert
        self._changed()
        return advert

    def accept(self, advert: Advert) -> bool:
        """Keep an advert if it is news; True when it should be flooded on."""
        if advert.name == self.me:
            return False
        old = self.adverts.get(advert.name)
        if old is not None and old.seq >= advert.seq:
            return False
        self.adverts[advert.name] = advert
        self._changed()
        return True

    def expire(self, max_age: float) -> list[str]:
        """Forget brokers out of reach for longer than ``max_age`` (dead or partitioned away;
        a reachable broker's advert stands until it sends a newer one)."""
        now = time.monotonic()
        reachable = self.next_hops()
        gone = [
            n
            for n, a in self.adverts.items()
            if n != self.me and n not in reachable and now - a.received > max_age
        ]
        for name in gone:
            del self.adverts[name]
        if gone:
            self._changed()
        return gone

    def _changed(self) -> None:
        self._hops = None
        self._trees.clear()
        self._interest = None

    # --- graph -----------------------------------------------------------------------------------

    def _neighbours(self, name: str) -> list[str]:
        advert = self.adverts.get(name)
        if advert is None:
            return []
        return sorted(
            p for p in advert.peers if p in self.adverts and name in self.adverts[p].peers
        )

    def _bfs(self, root: str) -> dict[str, str | None]:
        """Parent of every broker reachable from root (deterministic: neighbours by name)."""
        parent: dict[str, str | None] = {root: None}
        queue = deque([root])
        while queue:
            node = queue.popleft()
            for nb in self._neighbours(node):
                if nb not in parent:
                    parent[nb] = node
                    queue.append(nb)
        return parent

    def next_hops(self) -> dict[str, str]:
        """Reachable broker -> the peer of ours to send through."""
        if self._hops is None:
            parent = self._bfs(self.me)
            hops: dict[str, str] = {}
            for node in parent:
                if node == self.me:
                    continue
                hop = node
                while (up := parent[hop]) is not None and up != self.me:
                    hop = up
                hops[node] = hop
            self._hops = hops
        return self._hops

    def locate(self, tenant: str, agent: str) -> str | None:
        """The reachable broker holding that agent (the most recent connection wins)."""
        best: tuple[int, str] | None = None
        reachable = self.next_hops()
        for name, advert in self.adverts.items():
            if name != self.me and name not in reachable:
                continue
            entry = advert.agents.get((tenant, agent))
            if entry is not None and (best is None or entry[1] > best[0]):
                best = (entry[1], name)
        return best[1] if best else None

    def credential(self, tenant: str, agent: str) -> bytes | None:
        where = self.locate(tenant, agent)
        return self.adverts[where].agents[(tenant, agent)][0] if where else None

    # --- publications ----------------------------------------------------------------------------

    def interested(self, tenant: str, subject: str) -> set[str]:
        """Other reachable brokers with a subscription matching the subject."""
        if self._interest is None:
            index: dict[str, SubjectIndex] = {}
            reachable = self.next_hops()
            for name, advert in self.adverts.items():
                if name == self.me or name not in reachable:
                    continue
                for t, pattern in advert.subs:
                    index.setdefault(t, SubjectIndex()).add((name, pattern), pattern, name)
            self._interest = index
        idx = self._interest.get(tenant)
        if idx is None:
            return set()
        return set(idx.match(subject))  # type: ignore[arg-type]  # its values: broker names

    def fanout(self, origin: str, targets: set[str]) -> set[str]:
        """Our peers to pass a publication from ``origin`` to, for it to reach ``targets``:
        our children in the shortest-path tree rooted at the origin whose subtree holds one."""
        tree = self._trees.get(origin)
        if tree is None:
            tree = self._trees[origin] = self._bfs(origin)
        if self.me not in tree:
            return set()
        out = set()
        for target in targets:
            node: str | None = target
            if node not in tree:
                continue
            while node is not None and tree[node] != self.me:
                node = tree[node]
            if node is not None and node != self.me:
                out.add(node)
        return out


class SeenIds:
    """A bounded memory of relayed frame ids: the second copy of anything is dropped."""

    def __init__(self, size: int = 65536) -> None:
        self._order: deque[Any] = deque()
        self._set: set[Any] = set()
        self._size = size

    def add(self, key: Any) -> bool:
        if key in self._set:
            return False
        self._set.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._set.discard(self._order.popleft())
        return True
