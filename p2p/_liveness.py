"""Membership and liveness, sans-I/O: who the node's peers are and whether they live.

HELLO introduces and probes; PEERS answers with a sample of the table, the session's
membership challenge and recent news; a probe unanswered for half the suspicion time
asks a few other peers to probe too (PROBE, PROBE_ACK: SWIM's ping-req). The table's
rules live in p2p/_peers.py, the indirect probes' in p2p/_probing.py. This part owns
the peer table, the probes and the namespace memberships; what a statement means for
gossip as well (news a newcomer brings, the ads of a peer that left) NodeCore
(p2p/_core.py) hands on to p2p/_gossip.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvx.protocol import (
    DataAddress,
    DigestEntry,
    ErrorCode,
    Hello,
    Leave,
    Membership,
    MessageType,
    PeerEntry,
    Peers,
    Probe,
    ProbeAck,
    RemoteProtocolError,
    node_id,
    split_ctl,
)
from kvx.trust import Identity, Memberships, PeerScores, Statement, open_envelope

from ._config import Bootstrap, NodeConfig
from ._events import Leaving, PeerDead, PeerJoined, PeerSuspect, PeerVouched
from ._index import Standing
from ._outbox import Outbox
from ._peers import Peer, PeerTable, State
from ._probing import IndirectProbes, Waiting

if TYPE_CHECKING:
    import random


class Liveness:
    def __init__(
        self,
        out: Outbox,
        config: NodeConfig,
        identity: Identity,
        *,
        scores: PeerScores,
        rng: random.Random,
        tokens: Callable[[int], bytes],
    ) -> None:
        self.out = out
        self.config = config
        self.policy = config.policy
        self.key = identity.public_key
        self.scores = scores
        self.random = rng  # seeded in a simulation
        self.peers = PeerTable(
            identity.public_key,
            suspect_after_s=config.suspect_after_s,
            dead_after_s=config.dead_after_s,
            max_peers=config.max_peers,
            keep=self.keeps,
            rng=rng,  # a seeded run evicts the same peers
        )
        self.memberships = Memberships(identity.node_id, self.policy, tokens=tokens)
        self.probes = IndirectProbes()
        self.incarnation = out.now.now_ms()
        self.leaving = False  # said LEAVE: it finishes its deals and does nothing else (§8.22)
        self.ctl = ""
        self.data: tuple[DataAddress, ...] = ()  # our data channel's addresses

    # ---- what the other parts ask ------------------------------------------------------

    def _bootstrap(self, key: bytes) -> Bootstrap | None:
        return next((b for b in self.config.bootstrap if b.key == key), None)

    def _delivered(self, key: bytes) -> bool:
        """A proven seller: its deliveries to us raised its score above zero."""
        return self.scores.score(node_id(key), self.out.now.time()) > 0

    def keeps(self, key: bytes) -> bool:
        """Peers the table never evicts for a newcomer: bootstrap peers and proven sellers."""
        return self._bootstrap(key) is not None or self._delivered(key)

    def standing(self, key: bytes) -> Standing:
        """How proven a signer is, for what a full budget keeps (spec §13.2)."""
        if key == self.key or self._delivered(key):
            return Standing.PROVEN
        peer = self.peers.get(key)
        alive = peer is not None and peer.proven and peer.state == State.ALIVE
        return Standing.PEER if alive else Standing.STRANGER

    def address(self, key: bytes) -> tuple[str | None, bool]:
        """Where `key` listens, if known, and whether it is proven (§8.1a)."""
        peer, boot = self.peers.get(key), self._bootstrap(key)
        proven = boot is not None or (peer is not None and peer.proven)
        if peer is not None:
            return peer.ctl, proven
        return (boot.ctl if boot is not None else None), proven

    def known(self) -> set[bytes]:
        """The keys per-identity state is kept for: the table's and the bootstrap peers'."""
        return {p.key for p in self.peers.all()} | {b.key for b in self.config.bootstrap}

    def may_see(self, key: bytes, ns: bytes | None) -> bool:
        """Private statements go only to peers that proved the namespace (spec §7.6)."""
        return self.memberships.is_member(node_id(key), ns, self.out.now.time())

    def may_buy(self, peer: bytes, ns: bytes) -> bool:
        """A node id that proved `ns` and that the namespace's rules let buy."""
        try:
            self.policy.check_namespace(peer, ns, publish=False)
        except RemoteProtocolError:
            return False
        return self.memberships.is_member(peer, ns, self.out.now.time())

    def hello(self) -> Hello:
        return Hello(ctl=self.ctl, data=self.data, inc=self.incarnation, agent="kvx/0.2")

    def candidate(self, key: bytes, ctl: str) -> None:
        """A provider news to us, whom a buyer of ours will need to reach."""
        if key not in self.peers:
            self.peers.add_candidate(
                Peer(key, ctl, 0, State.SUSPECT, 0.0), self.out.now.monotonic()
            )

    # ---- statements ------------------------------------------------------------------

    def on_hello(self, st: Statement) -> bool:
        """Whether the HELLO's signer is a peer new to us, or one that restarted."""
        hello = st.message
        assert isinstance(hello, Hello)
        self.policy.check_address(split_ctl(hello.ctl)[0])
        if not self.peers.heard_from(st.signer, hello.ctl, hello.inc, self.out.now.monotonic()):
            return False
        self.out.disconnect(st.signer)  # it may have restarted on a new address
        self.out.event(PeerJoined(peer=st.signer_id.hex()[:12], ctl=hello.ctl))
        return True

    def welcome(self, st: Statement, routing: bytes, recent: tuple[DigestEntry, ...]) -> None:
        """Answer a HELLO: our sample of the table, a membership challenge, our news."""
        challenge = self.memberships.challenge(st.signer_id, self.out.now.time())
        peers = Peers(
            peers=self.sample(), re=st.header.seq, challenge=challenge, recent=recent or None
        )
        self.out.reply(routing, st, peers)

    def sample(self) -> tuple[PeerEntry, ...]:
        """The peers a PEERS names (p2p/_peers.py says which)."""
        return self.peers.entries()

    def on_leave(self, st: Statement) -> bool:
        """Whether a LEAVE (§8.22) is our peer's own word: then it is dead now, so that no
        buyer of ours tries it while it restarts or after it has gone for good."""
        leave = st.message
        assert isinstance(leave, Leave)
        if not self.peers.left(st.signer, leave.inc):
            return False  # not our peer, or an older incarnation's word
        self.memberships.forget(st.signer_id)
        self.out.disconnect(st.signer)
        return True

    def leave(self) -> set[bytes]:
        """This node stops serving: every peer that heard from it is told so (§8.22);
        returns their keys. From now on it only finishes the deals it made; it probes,
        gossips and answers nothing else, since any statement of its own would tell a
        peer it is back."""
        self.leaving = True
        told = {p.key for p in self.peers.all() if p.proven and p.state != State.DEAD}
        for key in told:
            self.out.send(key, Leave(inc=self.incarnation))
        self.out.event(Leaving(peers=len(told)))
        return told

    def on_peers(self, st: Statement) -> None:
        peers = st.message
        assert isinstance(peers, Peers)
        now = self.out.now.monotonic()
        if st.signer not in self.peers:  # a bootstrap peer answering our first HELLO
            boot = self._bootstrap(st.signer)
            if boot is not None:
                self.peers.heard_from(st.signer, boot.ctl, 0, now)
        for candidate in self.peers.learn(list(peers.peers)):
            if self._allowed(candidate.ctl) and self.peers.add_candidate(candidate, now):
                self.out.send(candidate.key, self.hello())
        if peers.challenge is not None and self.policy.namespaces:
            self.out.send(st.signer, self.memberships.prove(st.signer_id, peers.challenge))

    def _allowed(self, ctl: str) -> bool:
        """Whether this node's policy lets it dial a (decoded, so well-formed) address."""
        try:
            self.policy.check_address(split_ctl(ctl)[0])
        except RemoteProtocolError:
            return False
        return True

    def on_membership(self, st: Statement) -> None:
        assert isinstance(st.message, Membership)
        self.memberships.accept(st.signer_id, st.message, self.out.now.time())

    def on_probe(self, st: Statement, routing: bytes | None) -> None:
        """Probe a peer for someone whose own probes it does not answer (§8.17): only a
        peer of our table, at the address we know, so a stranger cannot aim us elsewhere."""
        assert isinstance(st.message, Probe)
        target = st.message.target
        peer = self.peers.get(target)
        if peer is None or not peer.proven or peer.state == State.DEAD or target == st.signer:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node knows no live peer so keyed")
        now = self.out.now.monotonic()
        waiting = Waiting(st.signer, routing, st.header.seq, now + self.config.suspect_after_s / 2)
        proof = self.probes.fresh(target, now)
        if proof is not None:
            self._ack(waiting, proof)
        elif self.probes.help(waiting, target, now):
            self.out.send(target, self.hello())

    def vouch(self, st: Statement) -> None:
        """A peer spoke: send its HELLO or PEERS to whoever asked us to probe it (NodeCore
        holds back a PEERS whose news the askers may not see, §8.17)."""
        if st.type not in (MessageType.HELLO, MessageType.PEERS):
            return
        for waiting in self.probes.vouch(st, self.out.now.monotonic()):
            self._ack(waiting, st)

    def _ack(self, waiting: Waiting, proof: Statement) -> None:
        ack = ProbeAck(re=waiting.seq, target=proof.signer, proof=proof.frame)
        self.out.answer(waiting.routing, waiting.asker, ack)

    def on_probe_ack(self, st: Statement) -> None:
        target = self.probes.take_ack(st)
        if target is not None and self.peers.vouched(target):
            self.out.event(PeerVouched(peer=node_id(target).hex()[:12], by=st.signer_id.hex()[:12]))

    # ---- timers ----------------------------------------------------------------------

    def _ask_help(self, target: bytes) -> None:
        """Our probe of `target` went unanswered for half the suspicion time: ask
        `indirect_probes` other live peers to probe it (SWIM's ping-req)."""
        now_ms = self.out.now.now_ms()
        until = self.out.now.monotonic() + self.config.dead_after_s
        helpers = [p.key for p in self.peers.alive() if p.key != target]
        for key in self.random.sample(helpers, min(self.config.indirect_probes, len(helpers))):
            frame = self.out.seal(Probe(target=target), to=key)
            self.probes.asked(key, open_envelope(frame).header.seq, target, now_ms, until)
            self.out.send_frame(key, frame, MessageType.PROBE)

    def heartbeat_round(self) -> None:
        now = self.out.now.monotonic()
        suspect, dead = self.peers.tick(now)
        for peer in suspect:
            self.out.event(PeerSuspect(peer=node_id(peer.key).hex()[:12]))
        for peer in dead:
            self.out.event(PeerDead(peer=node_id(peer.key).hex()[:12]))
            self.memberships.forget(node_id(peer.key))
            self.out.disconnect(peer.key)
        for peer in self.peers.to_probe(self.config.probes_per_heartbeat, now):
            self.out.send(peer.key, self.hello())
        for peer in self.peers.need_help(now):
            self._ask_help(peer.key)
        if not self.peers.alive():
            for boot in self.config.bootstrap:
                self.out.disconnect(boot.key)  # reconnect: it may have moved
                self.out.send(boot.key, self.hello())

    def forget_strangers(self, known: set[bytes]) -> None:
        """Probes and membership sessions of peers no longer in the table go."""
        self.probes.expire(self.out.now.monotonic(), known)
        kept_ids = {node_id(k) for k in known}
        self.memberships.prune(lambda peer: peer in kept_ids, self.out.now.time())

    def counts(self) -> dict[str, int]:
        """Peers in the table, by state."""
        peers = self.peers.all()
        return {s.name.lower(): sum(p.state == s for p in peers) for s in State}
