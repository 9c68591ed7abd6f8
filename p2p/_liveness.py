"""Membership and liveness, sans-I/O: who the node's peers are and whether they live.

HELLO introduces and probes; PEERS answers with a sample of the table, the session's
membership challenge and recent news; a probe unanswered for half the suspicion time
asks a few other peers to probe too (PROBE, PROBE_ACK: SWIM's ping-req). The table's
rules live in p2p/_peers.py, the indirect probes' in p2p/_probing.py. A mixin of
NodeCore (p2p/_core.py), whose state and outputs it uses.
"""

from __future__ import annotations

from kvx.protocol import (
    ErrorCode,
    Hello,
    Leave,
    Membership,
    MessageType,
    Peers,
    Probe,
    ProbeAck,
    RemoteProtocolError,
    node_id,
    split_ctl,
)
from kvx.trust import Statement, open_envelope

from ._clock import Now
from ._events import Leaving, PeerDead, PeerJoined, PeerLeft, PeerSuspect, PeerVouched
from ._index import Standing
from ._peers import State
from ._probing import Waiting
from ._state import CoreState


class Liveness(CoreState):
    def _keeps(self, key: bytes) -> bool:
        """Peers the table never evicts for a newcomer: bootstrap peers and proven sellers."""
        return any(b.key == key for b in self.config.bootstrap) or (
            self.scores.score(node_id(key), self.clock.time()) > 0
        )

    def _standing(self, key: bytes) -> Standing:
        """How proven a signer is, for what a full budget keeps (spec §13.2)."""
        if (
            key == self.identity.public_key
            or self.scores.score(node_id(key), self.clock.time()) > 0
        ):
            return Standing.PROVEN
        peer = self.peers.get(key)
        alive = peer is not None and peer.proven and peer.state == State.ALIVE
        return Standing.PEER if alive else Standing.STRANGER

    def _allowed(self, ctl: str) -> bool:
        """Whether this node's policy lets it dial a (decoded, so well-formed) address."""
        try:
            self.policy.check_address(split_ctl(ctl)[0])
        except RemoteProtocolError:
            return False
        return True

    def _hello(self) -> Hello:
        return Hello(ctl=self.ctl, data=self.data, inc=self.incarnation, agent="kvx/0.2")

    def _on_hello(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        hello = st.message
        assert isinstance(hello, Hello)
        now = self.clock.monotonic()
        self.policy.check_address(split_ctl(hello.ctl)[0])
        if self.peers.heard_from(st.signer, hello.ctl, hello.inc, now):
            self._disconnect(st.signer)  # it may have restarted on a new address
            self.event(PeerJoined(peer=st.signer_id.hex()[:12], ctl=hello.ctl))
            self._pull_news(st.signer)
        if routing is not None:
            challenge = self.memberships.challenge(st.signer_id, self.clock.time())
            recent = self._recent_for(st.signer)
            self._reply(
                routing,
                st,
                Peers(
                    peers=self.peers.entries(),
                    re=st.header.seq,
                    challenge=challenge,
                    recent=recent or None,
                ),
            )

    def _on_leave(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        """A peer stops serving (§8.22): dead now, and its advertisements gone, so that no
        buyer of ours tries it while it restarts or after it has gone for good."""
        leave = st.message
        assert isinstance(leave, Leave)
        if not self.peers.left(st.signer, leave.inc):
            return  # not our peer, or an older incarnation's word
        gone = self.index.signer_left(st.signer, st.header.seq, st.header.iat)
        self.memberships.forget(st.signer_id)
        self._disconnect(st.signer)
        self.metrics.ads.set(len(self.index))
        self.event(PeerLeft(peer=st.signer_id.hex()[:12], ads=gone))

    def leave(self, now: Now) -> set[bytes]:
        """This node stops serving: every peer that heard from it is told so (§8.22);
        returns their keys. From now on it only finishes the deals it made; it probes,
        gossips and answers nothing else, since any statement of its own would tell a
        peer it is back."""
        self.clock = now
        self.leaving = True
        told = {p.key for p in self.peers.all() if p.proven and p.state != State.DEAD}
        for key in told:
            self._send(key, Leave(inc=self.incarnation))
        self.event(Leaving(peers=len(told)))
        return told

    def _on_peers(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        peers = st.message
        assert isinstance(peers, Peers)
        if st.signer not in self.peers:  # a bootstrap peer answering our first HELLO
            boot = next((b for b in self.config.bootstrap if b.key == st.signer), None)
            if boot is not None:
                self.peers.heard_from(st.signer, boot.ctl, 0, self.clock.monotonic())
        for candidate in self.peers.learn(list(peers.peers)):
            if self._allowed(candidate.ctl) and self.peers.add_candidate(
                candidate, self.clock.monotonic()
            ):
                self._send(candidate.key, self._hello())
        if peers.challenge is not None and self.policy.namespaces:
            self._send(st.signer, self.memberships.prove(st.signer_id, peers.challenge))
        if peers.recent and not all(self.index.holds((e.key, e.seq)) for e in peers.recent):
            # News this node missed: pull it now (§8.3) rather than at the next
            # anti-entropy round, which push gossip's misses would otherwise wait for.
            self._pull_news(st.signer)

    def _on_membership(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Membership)
        self.memberships.accept(st.signer_id, st.message, self.clock.time())

    def _on_probe(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        """Probe a peer for someone whose own probes it does not answer (§8.17): only a
        peer of our table, at the address we know, so a stranger cannot aim us elsewhere."""
        assert isinstance(st.message, Probe)
        target = st.message.target
        peer = self.peers.get(target)
        if peer is None or not peer.proven or peer.state == State.DEAD or target == st.signer:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node knows no live peer so keyed")
        now = self.clock.monotonic()
        waiting = Waiting(st.signer, routing, st.header.seq, now + self.config.suspect_after_s / 2)
        proof = self.probes.fresh(target, now)
        if proof is not None:
            self._ack(waiting, proof)
        elif self.probes.help(waiting, target, now):
            self._send(target, self._hello())

    def _vouch(self, st: Statement) -> None:
        """A peer spoke: send its statement to whoever asked us to probe it — if nothing
        in it belongs to a private namespace, since the asker need not be a member (§8.17):
        a HELLO, or a PEERS whose news are public advertisements this node holds."""
        if isinstance(st.message, Peers):
            recent = st.message.recent or ()
            if not all(self.index.public((e.key, e.seq)) for e in recent):
                return  # the askers wait for the target's next words
        elif st.type != MessageType.HELLO:
            return
        for waiting in self.probes.vouch(st, self.clock.monotonic()):
            self._ack(waiting, st)

    def _ack(self, waiting: Waiting, proof: Statement) -> None:
        ack = ProbeAck(re=waiting.seq, target=proof.signer, proof=proof.frame)
        frame = self.signer.seal(ack, now_ms=self.clock.now_ms(), to=node_id(waiting.asker))
        if waiting.routing is not None:
            self._reply_frame(waiting.routing, frame, MessageType.PROBE_ACK)
        else:
            self._send_frame(waiting.asker, frame, MessageType.PROBE_ACK)

    def _on_probe_ack(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        target = self.probes.take_ack(st)
        if target is not None and self.peers.vouched(target):
            self.event(PeerVouched(peer=node_id(target).hex()[:12], by=st.signer_id.hex()[:12]))

    def _ask_help(self, target: bytes) -> None:
        """Our probe of `target` went unanswered for half the suspicion time: ask
        `indirect_probes` other live peers to probe it (SWIM's ping-req)."""
        now_ms = self.clock.now_ms()
        until = self.clock.monotonic() + self.config.dead_after_s
        helpers = [p.key for p in self.peers.alive() if p.key != target]
        for key in self.random.sample(helpers, min(self.config.indirect_probes, len(helpers))):
            frame = self.signer.seal(Probe(target=target), now_ms=now_ms, to=node_id(key))
            self.probes.asked(key, open_envelope(frame).header.seq, target, now_ms, until)
            self._send_frame(key, frame, MessageType.PROBE)

    def _heartbeat_round(self) -> None:
        now = self.clock.monotonic()
        suspect, dead = self.peers.tick(now)
        for peer in suspect:
            self.event(PeerSuspect(peer=node_id(peer.key).hex()[:12]))
        for peer in dead:
            self.event(PeerDead(peer=node_id(peer.key).hex()[:12]))
            self.memberships.forget(node_id(peer.key))
            self._disconnect(peer.key)
        for peer in self.peers.to_probe(self.config.probes_per_heartbeat, now):
            self._send(peer.key, self._hello())
        for peer in self.peers.need_help(now):
            self._ask_help(peer.key)
        if not self.peers.alive():
            for boot in self.config.bootstrap:
                self._disconnect(boot.key)  # reconnect: it may have moved
                self._send(boot.key, self._hello())
        for state in State:
            self.metrics.peers.labels(state.name.lower()).set(
                sum(p.state == state for p in self.peers.all())
            )
