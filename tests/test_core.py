"""The node core without I/O: cores driven in memory by the simulator (kvx/testing/_sim.py), the
same code the daemon runs, over simulated links and simulated time."""

from pathlib import Path

from imports import imported

from kvx.p2p import NodeConfig
from kvx.p2p._core import NodeCore, Output
from kvx.p2p._events import Happening
from kvx.p2p._peers import State
from kvx.testing._sim import Network, Simulation

ROOT = Path(__file__).parent.parent
CORE = [
    "p2p/_core.py",
    "p2p/_buying.py",
    "p2p/_purchase.py",
    "p2p/_gossip.py",
    "p2p/_liveness.py",
    "p2p/_trading.py",
    "p2p/_peers.py",
    "p2p/_index.py",
    "p2p/_market.py",
    "p2p/_negotiation.py",
    "p2p/_rates.py",
    "p2p/_clock.py",
    "p2p/_pricing.py",
    "p2p/_probing.py",
    "p2p/_store.py",
    "kvx/testing/_sim.py",
    "p2p/_outbox.py",
    "p2p/_fraud.py",
    "p2p/_events.py",
    "p2p/_dials.py",
    "transport/_sessions.py",
]


def said_by(core: NodeCore) -> list[Output]:
    """What a core emitted for the wire (sends, answers, connections), not what it noted."""
    return [out for out in core.drain() if not isinstance(out, Happening)]


def logged(outputs: list[Output]) -> list[str]:
    """What of these a node carries out or logs: all but what it only counts."""
    return [type(o).__name__ for o in outputs if getattr(o, "level", 0) is not None]


def test_no_module_of_the_core_imports_asyncio_or_zmq():
    for path in CORE:
        for name in imported(ROOT / path):
            assert name.split(".")[0] not in ("asyncio", "zmq", "socket"), (path, name)


def test_the_core_reads_no_clock_random_source_or_file_of_its_own():
    """Time comes with each input, randomness from the driver's sources; the store is the
    one part that holds files, and the simulator is a driver."""
    forbidden = {"time", "secrets", "random", "os", "pathlib", "tempfile", "socket"}
    for path in set(CORE) - {"p2p/_store.py", "kvx/testing/_sim.py"}:
        for name in imported(ROOT / path, at_runtime=True):
            assert name.split(".")[0] not in forbidden, (path, name)


def spread(seed: int, n: int = 40, loss: float = 0.0) -> tuple[dict[int, float], dict]:
    with Simulation(n, seed=seed, network=Network(loss=loss)) as sim:
        sim.start(known=6)
        sim.run_until(1.0)
        ad = sim.publish(0)
        reached: dict[int, float] = {0: 1.0}

        def seen(to: int, sender: int, frame: bytes) -> None:
            if to not in reached and ad in sim.cores[to].gossip.index:
                reached[to] = sim.clock.now

        sim.on_receive = seen
        sim.run_until(8.0)
        return reached, dict(sim.traffic.frames)


def test_an_advertisement_reaches_every_node_of_a_simulated_swarm():
    reached, frames = spread(seed=3)
    assert len(reached) == 40
    assert frames["ADVERTISE"] >= 39 and frames["HELLO"] and frames["PEERS"]


def test_a_run_is_reproduced_by_its_seed_and_not_by_another():
    first, second, other = spread(seed=5), spread(seed=5), spread(seed=6)
    assert first == second
    assert first != other


def test_with_loss_gossip_and_anti_entropy_still_reach_everyone():
    reached, _ = spread(seed=7, loss=0.05)
    assert len(reached) == 40


def test_healthy_peers_with_a_lossy_network_are_not_suspected():
    """A probe is retried before suspicion: one lost frame suspects nobody."""
    with Simulation(20, seed=11, network=Network(loss=0.01)) as sim:
        sim.start(known=8)
        sim.run_until(60.0)
        suspect = [
            p for core in sim.cores for p in core.liveness.peers.all() if p.state != State.ALIVE
        ]
        assert suspect == []


def test_a_crashed_node_is_found_dead_by_its_peers():
    with Simulation(12, seed=13) as sim:
        sim.start(known=11)
        sim.run_until(2.0)
        gone = sim.cores[5].identity.public_key
        sim.crash(5)
        sim.run_until(60.0)
        for i, core in enumerate(sim.cores):
            if i != 5 and gone in core.liveness.peers:
                assert core.liveness.peers.get(gone).state == State.DEAD, i


def test_nodes_that_crash_as_an_ad_spreads_get_it_once_restarted():
    with Simulation(30, seed=17) as sim:
        sim.start(known=10)
        sim.run_until(1.0)
        churned = [3, 7, 11, 19]
        for i in churned:
            sim.crash(i)
        ad = sim.publish(0)
        sim.run_until(3.0)
        assert not any(ad in sim.cores[i].gossip.index for i in churned)  # their state is gone
        for i in churned:
            sim.restart(i, known=5)
        sim.run_until(15.0)
        assert all(ad in core.gossip.index for core in sim.cores)


def test_made_up_news_in_peers_pulls_at_most_one_digest_a_second():
    """A PEERS naming news nobody has costs its sender a kilobyte; the DIGEST it asks
    for may be far larger, so a flood of them is answered once a second at most."""
    from kvx.protocol import DigestEntry, Peers
    from kvx.protocol import MessageType as T

    with Simulation(2, seed=19) as sim:
        sim.start(known=1)
        victim, liar = sim.cores
        fake = tuple(DigestEntry(key=bytes([i]) * 32, seq=i) for i in range(64))
        digests = 0
        for k in range(50):
            sim.clock.now = 5.0 + k * 0.01  # 50 within half a second
            frame = liar.signer.seal(
                Peers(peers=(), recent=fake), now_ms=sim.clock.at().now_ms(), to=victim.id
            )
            victim.receive(frame, sim.curve[1], None, liar.identity.public_key, now=sim.clock.at())
            digests += sum(1 for out in victim.drain() if getattr(out, "mtype", None) == T.DIGEST)
        assert digests == 1


def suspected_over_one_dead_link(indirect_probes: int) -> int:
    """Seconds in which node 0 held a healthy peer suspect or dead, when every frame
    between the two is lost and every other link works."""
    config = lambda d: NodeConfig(data_dir=d, metrics_port=None, indirect_probes=indirect_probes)  # noqa: E731
    with Simulation(24, seed=23, config=config) as sim:
        sim.start(known=8)
        a = sim.cores[0]
        b = a.liveness.peers.alive()[0].key
        sim.link(0, sim.index[b], loss=1.0)
        seconds = 0
        for t in range(1, 91):
            sim.run_until(float(t))
            seconds += a.liveness.peers.get(b).state != State.ALIVE
        return seconds


def test_one_lossy_link_suspects_nobody_with_indirect_probes():
    """SWIM's ping-req: other peers probe for us, and show us the peer's own answer."""
    assert suspected_over_one_dead_link(0) > 10  # the failure it prevents
    assert suspected_over_one_dead_link(3) == 0


def test_a_probe_ack_counts_only_with_the_targets_own_fresh_words_to_the_helper():
    from kvx.protocol import Peers, ProbeAck

    with Simulation(3, seed=29) as sim:
        sim.start(known=2)
        sim.run_until(1.0)
        asker, helper, target = sim.cores
        t_key, h_key = target.identity.public_key, helper.identity.public_key
        now = sim.clock.at().now_ms()

        def ack(seq: int, proof: bytes) -> bool:
            """Node 0 asked the helper (PROBE `seq`), and gets this proof back: taken?"""
            peer = asker.liveness.peers.get(t_key)
            peer.state, peer.awaiting = State.SUSPECT, sim.clock.now - 3
            asker.liveness.probes.asked(h_key, seq, t_key, now, sim.clock.now + 10)
            frame = helper.signer.seal(
                ProbeAck(re=seq, target=t_key, proof=proof), now_ms=now, to=asker.id
            )
            asker.receive(frame, sim.curve[1], None, h_key, now=sim.clock.at())
            return peer.state == State.ALIVE

        def said(by, to, at=now) -> bytes:
            return by.signer.seal(Peers(peers=()), now_ms=at, to=to.id)

        assert not ack(1, said(helper, helper))  # the helper's own words
        assert not ack(2, said(target, asker))  # the target's, but not to the helper
        assert not ack(3, said(target, helper, at=now - 31_000))  # older than the skew
        good = said(target, helper)
        assert not ack(4, good[:-9] + bytes([good[-9] ^ 1]) + good[-8:])  # a broken signature
        fresh = said(target, helper)
        assert ack(5, fresh)
        assert not ack(6, fresh)  # shown before
        assert asker.liveness.probes.held()["probes_asked"] == 5  # the refused ones wait on

        peer = asker.liveness.peers.get(t_key)
        peer.state = State.SUSPECT
        unasked = helper.signer.seal(
            ProbeAck(re=99, target=t_key, proof=said(target, helper)), now_ms=now, to=asker.id
        )
        asker.drain()  # what the acks above made it say and note
        asker.receive(unasked, sim.curve[1], None, h_key, now=sim.clock.at())
        assert peer.state == State.SUSPECT and not said_by(asker)  # ignored, not answered


def test_a_helper_probes_only_its_own_live_peers_and_holds_few_askers():
    from kvx.protocol import ErrorCode, Probe
    from kvx.protocol import MessageType as T
    from kvx.trust import Identity, open_envelope

    with Simulation(3, seed=31) as sim:
        sim.start(known=2)
        sim.run_until(1.0)
        asker, helper, target = sim.cores
        a_key, t_key = asker.identity.public_key, target.identity.public_key

        def probe(key: bytes) -> list:
            frame = asker.signer.seal(
                Probe(target=key), now_ms=sim.clock.at().now_ms(), to=helper.id
            )
            helper.receive(frame, sim.curve[0], b"\0\0\0\0", None, now=sim.clock.at())
            return said_by(helper)

        for key in (Identity.generate().public_key, a_key):  # a stranger; the asker itself
            (out,) = probe(key)
            assert out.mtype == T.ERROR
            assert open_envelope(out.frame).message.code == ErrorCode.NOT_FOUND
        first = probe(t_key)
        assert [(o.mtype, o.key) for o in first] == [(T.HELLO, t_key)]
        assert all(probe(t_key) == [] for _ in range(7))  # one HELLO serves eight askers
        (over,) = probe(t_key)
        assert open_envelope(over.frame).message.code == ErrorCode.OVER_BUDGET


def test_hostile_nodes_neither_stop_an_ad_nor_keep_honest_buyers_from_buying():
    """A tenth of the swarm withholds gossip, eclipses, makes up news and advertises the
    chain at price 0 without holding it: every honest node still gets the honest ad,
    and a buyer walks past each liar once, then buys from the honest provider first."""
    from kvx.testing._sim import HostileCore

    cheats = frozenset(range(50, 60))
    with Simulation(60, seed=37, hostile=cheats) as sim:
        assert all(isinstance(sim.cores[i], HostileCore) for i in cheats)
        sim.start(known=16)
        sim.run_until(1.0)
        document = (b"\x01" * 32, (b"\x02" * 32, b"\x03" * 32))
        ad = sim.publish(0, document=document)
        sim.run_until(8.0)
        assert all(ad in sim.cores[i].gossip.index for i in range(50))
        liars = {sim.cores[i].identity.public_key for i in cheats}
        _, listed = sim.cores[7].lookup(
            document[0], None, document[1], 8, asker=b"", now=sim.clock.at()
        )
        assert {a.signer for a in listed} <= liars  # price 0 comes first among strangers
        first = sim.purchase(7, *document)
        assert first == len(liars) + 1  # each liar once, then the honest provider
        assert sim.purchase(7, *document) == 1  # which now ranks first


def test_a_healed_partition_joins_up_and_spreads_what_one_side_missed():
    with Simulation(40, seed=41) as sim:
        sim.start(known=12)
        sim.run_until(1.0)
        side = set(range(20))
        sim.partition(side)
        ad = sim.publish(0)
        sim.run_until(21.0)  # long enough for each side to find the other dead
        assert [ad in core.gossip.index for core in sim.cores] == [i in side for i in range(40)]
        assert any(p.state == State.DEAD for p in sim.cores[0].liveness.peers.all())
        sim.heal()
        sim.run_until(41.0)
        assert all(ad in core.gossip.index for core in sim.cores)
        assert all(p.state == State.ALIVE for core in sim.cores for p in core.liveness.peers.all())


def test_every_illegal_step_of_a_quote_has_its_spec_code_in_memory():
    """Spec §10.4's table, against a seller core fed frames by hand (aioquic's roundtrip
    tests in shape): each answer is drained straight from the core."""
    from kvx.p2p._outbox import Reply
    from kvx.protocol import Accept, ErrorCode, Quote, QuoteRequest, Reject
    from kvx.trust import open_envelope

    with Simulation(2, seed=43, publishers=frozenset({0})) as sim:
        sim.start(known=1)
        seller, buyer = sim.cores
        sim.publish(0)
        advert = seller.gossip.index.ads()[0].message
        routing = (1).to_bytes(4, "big")

        outputs: list = []

        def ask(message) -> object:
            frame = buyer.signer.seal(message, now_ms=sim.clock.at().now_ms(), to=seller.id)
            seller.receive(frame, sim.curve[1], routing, None, now=sim.clock.at())
            outputs[:] = seller.drain()
            answers = [open_envelope(o.frame).message for o in outputs if isinstance(o, Reply)]
            return answers[0] if answers else None

        def code(message) -> ErrorCode:
            return ErrorCode(ask(message).code)

        def quote() -> Quote:
            q = ask(
                QuoteRequest(
                    fp=advert.fp, blocks=advert.blocks, transports=("tcp",), max_price=10**12
                )
            )
            assert isinstance(q, Quote)
            return q

        def accept(q: Quote, **over) -> Accept:
            return Accept(**{"quote": q.quote, "price": q.price, "root": q.root, **over})

        q = quote()
        assert code(accept(q, quote=b"\0" * 16)) == ErrorCode.UNKNOWN_QUOTE
        assert code(Reject(quote=b"\0" * 16, reason=0)) == ErrorCode.UNKNOWN_QUOTE
        assert code(accept(q, price=q.price + 1)) == ErrorCode.UNKNOWN_QUOTE
        assert ask(accept(q)) is None  # OFFERED -> ACCEPTED, nothing to answer
        # The payload is in the memory tier: its stream may open at once, no load asked.
        assert logged(outputs) == [] and len(seller.sessions) == 1
        assert code(accept(q)) == ErrorCode.UNEXPECTED_MESSAGE
        assert code(Reject(quote=q.quote, reason=0)) == ErrorCode.UNEXPECTED_MESSAGE
        q = quote()
        assert ask(Reject(quote=q.quote, reason=0)) is None  # OFFERED -> REJECTED
        assert code(accept(q)) == ErrorCode.UNEXPECTED_MESSAGE
        assert code(Reject(quote=q.quote, reason=0, counter=1)) == ErrorCode.UNEXPECTED_MESSAGE
        # The store's index cannot note the sale (a full disk, here a read-only index):
        # the deal is recorded and its stream opens all the same; selling goes on.
        seller.store._db.execute("PRAGMA query_only=ON")
        q = quote()
        assert ask(accept(q)) is None and len(seller.sessions) == 2
        assert seller.trading.selling()
        assert logged(outputs) == ["StoreNoteFailed"]


def test_a_seed_and_its_inputs_give_the_same_run_frame_for_frame():
    """The core reads no clock and no random source of its own: the simulator's time,
    seed and sequence numbers are all it gets, so a run replays byte for byte."""

    def run(seed: int) -> list[tuple[int, int, bytes]]:
        frames: list[tuple[int, int, bytes]] = []
        with Simulation(20, seed=seed, publishers=frozenset({0, 1})) as sim:
            sim.on_receive = lambda to, sender, frame: frames.append((to, sender, frame))
            sim.start(known=6)
            sim.run_until(1.0)
            sim.publish(0)
            sim.crash(5)
            sim.run_until(4.0)
            sim.restart(5, known=6)
            sim.publish(1)
            sim.run_until(8.0)
        return frames

    first = run(11)
    assert len(first) > 1000
    assert run(11) == first
    assert run(12) != first


def test_many_keys_at_one_address_cost_that_address_one_connection_in_memory():
    """Spec §8.1a, in the core: a PEERS listing many keys at one victim's address opens
    one connection there, whatever more keys later listings name there."""
    from kvx.p2p._clock import Now
    from kvx.p2p._dials import Connect
    from kvx.protocol import PeerEntry, Peers
    from kvx.trust import Identity

    with Simulation(3, seed=47) as sim:
        sim.start(known=2)
        sim.run_until(1.0)
        core, liar = sim.cores[0], sim.cores[1]
        victim = "tcp://10.9.9.9:7000"
        start = sim.clock.at()
        dials: list[float] = []  # when the core opened a connection to the victim
        for k in range(40):  # a new listing of 20 fresh keys there every half second
            now = Now(start.mono + k * 0.5, start.wall + k * 0.5)
            keys = [Identity.generate().public_key for _ in range(20)]
            listing = Peers(peers=tuple(PeerEntry(key, victim, 0, 0) for key in keys))
            frame = liar.signer.seal(listing, now_ms=now.now_ms(), to=core.id)
            core.receive(frame, sim.curve[1], None, liar.identity.public_key, now=now)
            core.handle_timer(now)
            opened = [o for o in core.drain() if isinstance(o, Connect) and o.ctl == victim]
            assert len(opened) <= 1  # twenty HELLOs, one connection at most
            assert all(not o.proven for o in opened)  # one attempt each, no reconnecting
            dials += [now.mono - start.mono] * len(opened)
        # The first key's connection holds the address until that key is forgotten; only
        # then may another key there be dialed, and then within the address's backoff.
        assert dials[0] == 0.0 and len(dials) <= 3, dials
