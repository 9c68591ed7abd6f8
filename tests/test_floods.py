"""Honest peers never punish each other for volume (spec §8.7, §12.6): live node
processes under the honest traffic that used to look like a flood.

Each test is one break of issue #24 as it was seen against live nodes, such as probes
that turn a helper into a suspect. Anti-entropy that answers thousands of frames at
once, and a relay that pushes thousands onward, run on two cores in memory
(tests/test_attack_rules.py).
"""

import asyncio
import contextlib
import socket
import threading
import time

import blake3
import pytest
from swarm import NodeProcess, TestPeer, eventually

from kvx.p2p import Miss, PeerClient
from kvx.protocol import (
    Accept,
    Advertise,
    DataAddress,
    Header,
    Hello,
    KVLayout,
    PeerEntry,
    Peers,
    Probe,
    Quote,
    QuoteRequest,
    Transfer,
    Withdraw,
    frame_header,
)
from kvx.protocol._datachannel import FrameTag
from kvx.trust import Identity, Signer, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
BUSY = {"rate_per_s": 1e6, "burst": 10**6}  # a node that takes a test's ads at once
DEFAULT_TIMERS = {"heartbeat_s": 1.0, "suspect_after_s": 5.0, "dead_after_s": 12.0}


def now() -> int:
    return time.time_ns() // 1_000_000


def strangers(n: int) -> list[Identity]:
    return [Identity.generate() for _ in range(n)]


def ads(count: int, keys: list[Identity]) -> list[bytes]:
    """`count` valid relayable ADVERTISEs signed in turn by `keys`, each of its own chain."""
    frames = []
    for i in range(count):
        block = blake3.blake3(f"flood/{i}".encode()).digest()
        ad = Advertise(
            fp=b"\x0f" * 32,
            layout=LAYOUT,
            blocks=(block,),
            root=block,
            chunk=1 << 16,
            price=1,
            ctl="tcp://127.0.0.1:1",
            data=(DataAddress("tcp", "127.0.0.1:2"),),
        )
        t = now()
        frames.append(seal(keys[i % len(keys)], ad, Header(iat=t, exp=t + 600_000, seq=t + i)))
    return frames


def inject(node: NodeProcess, frames: list[bytes]) -> None:
    """Hand a node statements as a peer that said HELLO first, and wait until indexed."""
    peer = TestPeer(node, Identity.generate())
    try:
        peer.send(
            Signer(peer.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=peer.node_id
            )
        )
        assert isinstance(peer.recv().message, Peers)
        held = node.call("status")["ads"]
        for frame in frames:
            peer.send(frame)
        eventually(lambda: node.call("status")["ads"] >= held + len(frames), timeout=60)
    finally:
        peer.close()


def publish(node: NodeProcess, layout: KVLayout, chain: list, payload: bytes, chunk: int) -> None:
    node.call(
        "publish",
        fp=b"\x0f" * 32,
        layout=layout.__dict__,
        blocks=chain,
        payload=payload,
        chunk=chunk,
        params=10**9,
    )


def standing(node: NodeProcess, other: NodeProcess) -> dict:
    rows = node.call("peers")["peers"]
    return next(
        (p for p in rows if p["node_id"] == other.info["node_id"]),
        {"score": 0.0, "banned": False},
    )


@pytest.fixture
def started(tmp_path):
    made = []

    def start(name: str, bootstrap=(), **config) -> NodeProcess:
        n = NodeProcess(tmp_path / name, [b.dir / "node.json" for b in bootstrap], **config)
        n.start().wait_ready()
        made.append(n)
        return n

    yield start
    for n in made:
        n.stop()


def test_strangers_probing_through_a_helper_cost_the_target_one_hello_a_second(started):
    """Break 2: four strangers asking helper H to probe T made H send T hundreds of
    HELLOs a second, and T banned H. Now H probes T at most once a second for all askers,
    answers askers within that second with T's last answer, and T bans nobody."""
    target = started("target")
    helper = started("helper", [target])
    eventually(lambda: standing(helper, target).get("state") == "alive")
    key = bytes.fromhex(target.info["public_key"])
    askers = [TestPeer(helper, Identity.generate()) for _ in range(4)]
    try:
        for asker in askers:
            asker.send(
                Signer(asker.identity).seal(
                    Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=asker.node_id
                )
            )
            assert asker.recv() is not None
        before = target.call("status")["received"]["HELLO"]
        start, sent = time.monotonic(), 0
        while time.monotonic() - start < 8:
            for asker in askers:  # 4 x 50 a second: within the helper's limits
                t = now()
                header = Header(iat=t, exp=t + 60_000, seq=time.time_ns(), to=asker.node_id)
                asker.send(seal(asker.identity, Probe(target=key), header))
                sent += 1
            time.sleep(0.02)
        seconds = time.monotonic() - start
        hellos = target.call("status")["received"]["HELLO"] - before
        acks = 0
        for asker in askers:
            while (answer := asker.recv(timeout=0.5)) is not None:
                acks += type(answer.message).__name__ == "ProbeAck"
    finally:
        for asker in askers:
            asker.close()
    # The heartbeat probes T a few times a second anyway (0.3 s in tests); help adds at
    # most one a second, where it added one for nearly every PROBE.
    assert hellos <= seconds / 0.3 + seconds + 4, (hellos, sent)
    assert acks > sent // 2  # askers are still answered, from the probe's answer
    assert standing(target, helper)["score"] >= 0 and not standing(target, helper)["banned"]


# ---- 5. slow readers ------------------------------------------------------------------

BIG = KVLayout(dtype="float16", layers=8, kv_heads=8, head_dim=128, block=256)  # 8 MiB a block
BIG_CHAIN = [blake3.blake3(f"slow/{i}".encode()).digest() for i in range(3)]
BIG_PAYLOAD = blake3.blake3(b"slow doc").digest(length=BIG.payload_bytes(3))


def _slow_stream(seller: NodeProcess, identity: Identity) -> socket.socket:
    """Quote, accept and open a stream as `identity`, on a socket that takes 4 KiB at a
    time; the caller reads it as slowly as it likes."""
    peer = TestPeer(seller, identity)
    signer = Signer(identity)
    try:
        peer.send(
            signer.seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=peer.node_id
            )
        )
        assert peer.recv() is not None
        request = QuoteRequest(
            fp=b"\x0f" * 32, blocks=tuple(BIG_CHAIN), transports=("tcp",), max_price=10**12
        )
        peer.send(signer.seal(request, now_ms=now(), to=peer.node_id))
        quote = peer.recv().message
        assert isinstance(quote, Quote), quote
        accept = Accept(quote=quote.quote, price=quote.price, root=quote.root)
        peer.send(signer.seal(accept, now_ms=now(), to=peer.node_id))
        host, port = quote.data.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        transfer = signer.seal(
            Transfer(quote=quote.quote, token=quote.token, first=0), now_ms=now(), to=peer.node_id
        )
        sock.sendall(frame_header(FrameTag.CONTROL, len(transfer)) + transfer)
        return sock
    finally:
        peer.close()


def test_slow_readers_holding_every_stream_are_cut_and_an_honest_purchase_is_served(started):
    """Break 5: four identities with two streams each (their budget) read a large payload
    a few KiB at a time. The send timeout restarted on every partial send and the deadline
    was checked between 1 MiB slices, so they held every thread past the deadline and an
    honest purchase failed. Now the pace is checked at every send: while a stream waits,
    readers below the minimum rate are cut at once, and the rest when their grace (5 s
    here) is over; each is scored."""
    seller = started("seller", data_stall_s=5.0)
    buyer = started("buyer", [seller])
    publish(seller, BIG, BIG_CHAIN, BIG_PAYLOAD, 1 << 22)
    eventually(lambda: buyer.call("status")["ads"] == 1)
    attackers = [Identity.generate() for _ in range(4)]
    socks = [_slow_stream(seller, a) for a in attackers for _ in range(2)]
    stop = threading.Event()

    def trickle() -> None:  # 4 KiB a second on each stream, as long as the seller sends
        while not stop.wait(1.0):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.recv(4096)

    reader = threading.Thread(target=trickle)
    reader.start()
    try:
        time.sleep(2.0)  # every stream thread of the seller is now held
        assert _buy(buyer) == BIG_PAYLOAD

        def all_cut() -> bool:
            scores = {p["node_id"]: p["score"] for p in seller.call("peers")["peers"]}
            every_stream = len(seller.events("stream_cut")) == len(socks)
            return every_stream and all(scores.get(a.node_id.hex(), 0) < 0 for a in attackers)

        # While the readers still trickle: a stream closed by its reader is not cut.
        eventually(all_cut, timeout=15)
    finally:
        stop.set()
        reader.join()
        for sock in socks:
            sock.close()


def _buy(buyer: NodeProcess) -> bytes:
    async def go() -> bytes:
        client = PeerClient(buyer.dir, timeout_s=15)
        try:
            bought = await client.fetch(b"\x0f" * 32, BIG_CHAIN, params=10**9)
            return bytes(bought.tensor.numpy())
        finally:
            await client.close()

    return asyncio.run(go())


# ---- 4. totals that prefer the proven ----------------------------------------------------


def test_sybils_filling_the_index_never_keep_an_honest_ad_out(started):
    """Break 4: signers each within their budget filled the whole index, and a new honest
    ad was never indexed; withdrawals had no total at all. Now a full index makes room
    from its least proven, heaviest holders, and withdrawals have a total too."""
    node = started("node", max_ads=1000, max_ads_per_signer=400, **BUSY)
    seller = started("seller", [node])
    eventually(lambda: standing(node, seller).get("state") == "alive")
    sybils = strangers(5)
    flood = ads(2000, sybils)  # 5 sybils x 400: twice the index
    inject(node, flood[:1000])
    peer = TestPeer(node, Identity.generate())
    for frame in flood[1000:]:
        peer.send(frame)
    eventually(lambda: node.call("status")["held"]["ads_forgotten"] > 0)
    assert node.call("status")["ads"] <= 1000
    # An honest peer's new ad and a stranger's single ad are both indexed.
    publish(seller, LAYOUT, [b"\x01" * 32], b"\x02" * LAYOUT.payload_bytes(1), 1 << 16)
    (stranger,) = ads(1, strangers(1))
    peer.send(stranger)
    signers = lambda: {a["signer"] for a in node.call("ads")["ads"]}  # noqa: E731
    eventually(lambda: seller.info["node_id"] in signers(), timeout=10)
    eventually(lambda: open_envelope(stranger).signer_id.hex() in signers(), timeout=10)
    # Withdrawals have a total as well: sybils withdrawing 2,000 ads hold at most 1,000.
    for sybil in sybils:  # each withdraws 400 made-up ads of its own
        t = now()
        for k in range(400):
            header = Header(iat=t, exp=t + 600_000, seq=t + 10**6 + k)
            peer.send(seal(sybil, Withdraw(ad=k + 1), header))
    time.sleep(2.0)
    peer.close()
    assert node.call("status")["held"]["withdrawals"] <= 1000
    assert node.proc.poll() is None


# ---- 3. the event loop serves everyone ---------------------------------------------------


def test_identities_within_their_limits_do_not_starve_a_newcomer_or_the_admin_api(started):
    """Break 3: twenty identities at 180 statements a second each (within each one's limit,
    above the node's capacity) kept the receive loop busy, since a receive that finds data
    queued never yields: new peers' HELLOs and the admin API got no answer in 10 s."""
    node = started("node")
    flooders = [TestPeer(node, Identity.generate()) for _ in range(20)]
    seconds = 12
    frames = [  # signed beforehand, so that the test's own core sends at full speed
        [
            Signer(f.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=f.node_id
            )
            for _ in range(180 * seconds)
        ]
        for f in flooders
    ]
    stop = threading.Event()

    def flood() -> None:
        start = time.monotonic()
        for tick in range(180 * seconds):
            for flooder, own in zip(flooders, frames, strict=True):
                flooder.send(own[tick])
            if stop.is_set():
                return
            time.sleep(max(0.0, start + (tick + 1) / 180 - time.monotonic()))

    def drain() -> None:  # the flooders read their answers, as peers do
        while not stop.is_set():
            for flooder in flooders:
                with contextlib.suppress(Exception):
                    while flooder.sock.poll(0):
                        flooder.sock.recv()
            time.sleep(0.01)

    threads = [threading.Thread(target=flood), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    try:
        time.sleep(3.0)  # the node is over its capacity now
        assert node.call("status")["ads"] == 0  # the admin API answers
        newcomer = TestPeer(node, Identity.generate())
        try:
            newcomer.send(
                Signer(newcomer.identity).seal(
                    Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1),
                    now_ms=now(),
                    to=newcomer.node_id,
                )
            )
            answer = newcomer.recv(timeout=10)
            assert answer is not None and isinstance(answer.message, Peers)
        finally:
            newcomer.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
        for f in flooders:
            f.close()
    assert node.proc.poll() is None


# ---- 6. a buyer that does not wait on liars ----------------------------------------------


def _silent_liars(buyer: NodeProcess, count: int) -> list[TestPeer]:
    """Peers that say HELLO to the buyer's node (live peers of its table, for now) and
    advertise the test's chain at price 0 from an address where nobody answers."""
    liars = []
    for _ in range(count):
        liar = TestPeer(buyer, Identity.generate())
        signer = Signer(liar.identity)
        hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
        liar.send(signer.seal(hello, now_ms=now(), to=liar.node_id))
        assert liar.recv() is not None
        ad = Advertise(
            fp=b"\x0f" * 32,
            layout=LAYOUT,
            blocks=tuple(CHAIN),
            root=b"\x07" * 32,
            chunk=1 << 16,
            price=0,
            ctl="tcp://127.0.0.1:9",
            data=(DataAddress("tcp", "127.0.0.1:9"),),
        )
        liar.send(signer.seal(ad, now_ms=now(), ttl_ms=600_000))
        liars.append(liar)
    return liars


CHAIN = [blake3.blake3(f"liars/{i}".encode()).digest() for i in range(3)]
PAYLOAD = blake3.blake3(b"liars doc").digest(length=LAYOUT.payload_bytes(3))


async def test_silent_liars_cost_a_buyer_a_moment_each_not_its_timeout(started):
    """Break 6: eight price-0 adverts whose signers never answer made a first-time buyer
    with a 5 s timeout miss after 41 s. Now providers are asked hedged (the next one
    after a quarter second without an answer), the timeout bounds the wait over all of
    them, and the honest seller's quote is taken while the liars are still silent."""
    seller = started("seller")
    buyer = started("buyer", [seller], **DEFAULT_TIMERS)  # liars stay live peers for 5 s
    publish(seller, LAYOUT, CHAIN, PAYLOAD, 1 << 16)
    eventually(lambda: buyer.call("status")["ads"] == 1)
    liars = _silent_liars(buyer, 8)
    try:
        eventually(lambda: buyer.call("status")["ads"] == 9)
        async with PeerClient(buyer.dir, timeout_s=5) as client:
            _, listed = await client.lookup(b"\x0f" * 32, CHAIN)
            assert [ad.message.price for ad in listed][:1] == [0]  # a liar is asked first
            bought = await client.fetch(b"\x0f" * 32, CHAIN, params=10**9)
        assert bytes(bought.tensor.numpy()) == PAYLOAD
        assert bought.seller == bytes.fromhex(seller.info["node_id"])
        assert not [f for f in bought.faults if f.code.name == "TIMEOUT"]  # nobody waited out
    finally:
        for liar in liars:
            liar.close()


async def test_a_buyer_facing_only_silent_providers_gives_up_at_its_timeout(started):
    buyer = started("buyer")
    liars = _silent_liars(buyer, 8)
    try:
        eventually(lambda: buyer.call("status")["ads"] == 8)
        async with PeerClient(buyer.dir, timeout_s=2) as client:
            start = time.monotonic()
            with pytest.raises(Miss):
                await client.fetch(b"\x0f" * 32, CHAIN, params=10**9)
            waited = time.monotonic() - start
        assert waited < 2 * 2  # one timeout over all eight (it was one timeout each)
    finally:
        for liar in liars:
            liar.close()


# ---- 7. no reflection ------------------------------------------------------------------


def test_statements_naming_a_victim_cost_it_a_few_connections_a_minute(started):
    """Break 7: one ADVERTISE and one PEERS of 64 keys naming a victim's address brought
    it a connection every second or so: libzmq's reconnect backoff does not grow when the
    victim accepts and closes, and unproven candidates were shared onward. Now a node
    dials an address nobody has proven with a backoff of its own (1 s doubling to 64 s),
    and shares only peers that spoke for themselves."""
    victim = socket.create_server(("127.0.0.1", 0))
    victim.settimeout(0.2)
    port = victim.getsockname()[1]
    node = started("node", **DEFAULT_TIMERS)
    peer = TestPeer(node, Identity.generate())
    signer = Signer(peer.identity)
    try:
        hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
        peer.send(signer.seal(hello, now_ms=now(), to=peer.node_id))
        assert peer.recv() is not None
        aimed = f"tcp://127.0.0.1:{port}"
        entries = tuple(
            PeerEntry(key=Identity.generate().public_key, ctl=aimed, inc=1, state=0)
            for _ in range(64)
        )
        peer.send(signer.seal(Peers(peers=entries), now_ms=now(), to=peer.node_id))
        ad = Advertise(
            fp=b"\x0f" * 32,
            layout=LAYOUT,
            blocks=(b"\x01" * 32,),
            root=b"\x01" * 32,
            chunk=1 << 16,
            price=1,
            ctl=aimed,
            data=(DataAddress("tcp", "127.0.0.1:2"),),
        )
        peer.send(seal(Identity.generate(), ad, Header(iat=now(), exp=now() + 600_000, seq=1)))
        accepted, start = 0, time.monotonic()
        told = False
        while time.monotonic() < start + 30:
            try:
                conn, _ = victim.accept()
                accepted += 1
                conn.close()
            except TimeoutError:
                pass
            if not told and time.monotonic() > start + 1:
                assert aimed not in _peers_told(node)  # an unproven name is never passed on
                told = True
    finally:
        peer.close()
        victim.close()
    # Attempts at 0, 1, 3, 7 and 15 s (it was 13 in these 30 s, every 1-2 s).
    assert accepted <= 5, f"{accepted} connections to the victim in 30 s"


def _peers_told(node: NodeProcess) -> set[str]:
    """The addresses `node` lists to a newcomer that says HELLO."""
    peer = TestPeer(node, Identity.generate())
    try:
        hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
        peer.send(Signer(peer.identity).seal(hello, now_ms=now(), to=peer.node_id))
        return {e.ctl for e in peer.recv().message.peers}
    finally:
        peer.close()


def test_connections_churned_from_one_address_are_refused_at_the_handshake(started):
    """Fair service, handshakes: a source that opens new CURVE connections faster than
    `handshakes_per_s` (10 here, bursts of 40) is refused at the handshake, by a ZAP
    handler that can say no; a peer at another address is served meanwhile."""
    import zmq

    from kvx.trust import make_curve_client

    node = started("node", handshakes_per_s=10)
    key = bytes.fromhex(node.info["public_key"])
    ctx = zmq.Context()
    socks, answered = [], 0
    try:
        for _ in range(400):  # at once, from 127.0.0.1
            ident = Identity.generate()
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            make_curve_client(sock, ident, key)
            sock.connect(node.info["ctl"])
            hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
            sock.send(
                Signer(ident).seal(hello, now_ms=now(), to=bytes.fromhex(node.info["node_id"]))
            )
            socks.append(sock)
        deadline = time.monotonic() + 5
        for sock in socks:
            if sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                answered += 1
        assert 40 <= answered <= 40 + 10 * 8, answered  # the burst and the rate, no more
        assert node.call("status")["shed"].get("handshake", 0) > 0
        honest = TestPeer(node, Identity.generate())  # another source address
        honest.sock.close()
        honest.sock = honest._ctx.socket(zmq.DEALER)
        honest.sock.linger = 0
        make_curve_client(honest.sock, honest.identity, key)
        port = node.info["ctl"].rsplit(":", 1)[1]
        honest.sock.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")
        try:
            hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
            honest.send(Signer(honest.identity).seal(hello, now_ms=now(), to=honest.node_id))
            assert isinstance(honest.recv(timeout=10).message, Peers)
        finally:
            honest.close()
    finally:
        for sock in socks:
            sock.close()
        ctx.term()
