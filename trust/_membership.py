"""Private-namespace membership, proved per session by challenge and response (spec §7.6).

The verifier hands each peer a fresh challenge (in PEERS); the peer answers with a
MEMBERSHIP message whose proofs bind the namespace secret to both node ids and that
challenge, so a proof is worth nothing on another connection or to another node.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from kvx.protocol import ErrorCode, Membership, NamespaceProof, RemoteProtocolError

from ._policy import Policy


def _not_member(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.NOT_A_MEMBER, reason)


@dataclass
class _Session:
    challenge: bytes
    issued: float
    proven: set[bytes] = field(default_factory=set)


class Memberships:
    """One node's challenges to its peers and the namespaces each peer has proved."""

    def __init__(
        self,
        me: bytes,
        policy: Policy,
        *,
        ttl_s: float = 3600.0,
        max_sessions: int = 4096,
        tokens: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.me = me
        self.tokens = tokens  # a simulation passes a seeded source
        self.policy = policy
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[bytes, _Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def challenge(self, peer: bytes, now: float) -> bytes:
        """The challenge of `peer`'s session, opening a new session if none is live.

        One challenge per session, not per HELLO: heartbeats must not void a proof that
        was just made, or a request could race the proof it relies on.
        """
        session = self._sessions.get(peer)
        if session is None or now - session.issued > self.ttl_s:
            if len(self._sessions) >= self.max_sessions:  # the oldest session goes
                del self._sessions[next(iter(self._sessions))]
            session = _Session(self.tokens(16), now)
            self._sessions.pop(peer, None)
            self._sessions[peer] = session
        return session.challenge

    def prune(self, keep: Callable[[bytes], bool], now: float, idle_s: float = 60.0) -> None:
        """Forget sessions of peers the node no longer keeps, once they are `idle_s` old."""
        for peer in [
            p for p, s in self._sessions.items() if not keep(p) and now - s.issued > idle_s
        ]:
            del self._sessions[peer]

    def forget(self, peer: bytes) -> None:
        """The session with `peer` ended (it disconnected or was declared dead)."""
        self._sessions.pop(peer, None)

    def prove(self, verifier: bytes, challenge: bytes) -> Membership:
        """Our answer to `verifier`'s challenge: a proof for each namespace we belong to."""
        if not self.policy.namespaces:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node belongs to no namespace")
        return Membership(
            challenge=challenge,
            proofs=tuple(
                NamespaceProof(ns=rule.id, mac=rule.namespace.proof(self.me, verifier, challenge))
                for rule in self.policy.namespaces
            ),
        )

    def accept(self, peer: bytes, message: Membership, now: float) -> frozenset[bytes]:
        """Check a peer's proofs against our current challenge; returns the namespaces proved.

        A proof for a namespace we are not in cannot be checked and is ignored; a wrong
        proof for one we are in fails the whole message.
        """
        session = self._sessions.get(peer)
        if session is None or now - session.issued > self.ttl_s:
            raise _not_member("no live challenge was issued to this peer")
        if message.challenge != session.challenge:
            raise _not_member("the proof answers another challenge")
        proven = set()
        for proof in message.proofs:
            rule = self.policy.namespace(proof.ns)
            if rule is None:
                continue
            if proof.mac != rule.namespace.proof(peer, self.me, session.challenge):
                raise _not_member(f"wrong proof for namespace {rule.name}")
            proven.add(proof.ns)
        session.proven |= proven
        return frozenset(proven)

    def is_member(self, peer: bytes, ns_id: bytes | None, now: float) -> bool:
        """Whether `peer` may see `ns_id`: always for the public namespace."""
        if ns_id is None:
            return True
        session = self._sessions.get(peer)
        return (
            session is not None and now - session.issued <= self.ttl_s and ns_id in session.proven
        )

    def require(self, peer: bytes, ns_id: bytes | None, now: float) -> None:
        """Raise NOT_A_MEMBER unless `peer` proved `ns_id` in its live session."""
        if not self.is_member(peer, ns_id, now):
            raise _not_member("no valid membership proof for this namespace")
