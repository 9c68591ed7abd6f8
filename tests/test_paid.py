"""Paid in full (issue #25): window receipts that mean what they say, credit that fresh
identities cannot farm, and deals that end. Each test attacks a live seller process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rawbuy import RawBuyer, error_of, pay_on_stream, read_frame
from swarm import NodeProcess, eventually
from test_attacks import BIG, BIG_PAYLOAD, CHAIN, CHUNK, FP, alive_and_serving, publish

from kvx.protocol import Error, ErrorCode, FrameTag, Quote
from kvx.trust import Ledger


@pytest.fixture
def buyers():
    made: list[RawBuyer] = []

    def make(seller: NodeProcess, source: str | None = None) -> RawBuyer:
        made.append(RawBuyer(seller, source))
        return made[-1]

    yield make
    for buyer in made:
        buyer.close()


def ledger_of(seller: NodeProcess) -> Ledger:
    return Ledger(seller.dir / "ledger.db", bytes.fromhex(seller.info["node_id"]))


def deal(buyer: RawBuyer) -> Quote:
    q = buyer.quote(FP, CHAIN)
    assert isinstance(q, Quote), q
    buyer.accept(q)
    return q


def first_window(buyer: RawBuyer, q: Quote):
    """Open the stream and read the chunk list and the one chunk a window of CHUNK holds."""
    sock = buyer.open(q)
    assert read_frame(sock)[0] == FrameTag.CHUNK_LIST
    tag, body = read_frame(sock)
    assert tag == FrameTag.CHUNK and len(body) == 4 + CHUNK
    return sock


def score_of(seller: NodeProcess, buyer: RawBuyer) -> float:
    rows = seller.call("peers")["peers"]
    return next(r["score"] for r in rows if r["node_id"] == buyer.identity.node_id.hex())


# ---- a receipt means what it says ---------------------------------------------------

TRICKS = {
    "the whole delivery, one chunk in": lambda q, other: (q, q.deliver),
    "two chunks, one chunk in": lambda q, other: (q, 2 * CHUNK),
    "another deal's receipt": lambda q, other: (other, CHUNK),
}


TWO_WINDOWS = "[policy]\nstranger_unpaid_windows = 2\n"  # two open deals for a newcomer


@pytest.mark.parametrize("trick", TRICKS, ids=list(TRICKS))
def test_a_window_receipt_for_what_was_not_sent_ends_the_stream(node, buyers, trick):
    seller = node(payment_window_bytes=CHUNK, tables=TWO_WINDOWS)
    publish(seller, BIG, BIG_PAYLOAD)
    buyer = buyers(seller)
    other = deal(buyer)  # a second deal of the same buyer, to pay with its receipt
    q = deal(buyer)
    sock = first_window(buyer, q)
    paying, paid = TRICKS[trick](q, other)
    pay_on_stream(sock, buyer.receipt(paying, paid))
    # The seller answers why, sends no chunk more, and closes.
    tag, body = read_frame(sock)
    assert tag == FrameTag.CONTROL and error_of(body).code == ErrorCode.UNKNOWN_TRANSFER
    assert read_frame(sock) is None
    sock.close()
    # Its books hold no receipt, and the buyer paid for the trick with its score.
    ledger = ledger_of(seller)
    assert [e.paid for e in ledger.audit()] == [0, 0]
    ledger.close()
    eventually(lambda: score_of(seller, buyer) < 0)
    [cut] = seller.events("stream_cut")
    assert cut["code"] == "UNKNOWN_TRANSFER"
    alive_and_serving(seller)


def test_an_honest_window_receipt_moves_the_window_and_is_on_the_books(node, buyers):
    seller = node(payment_window_bytes=CHUNK)
    publish(seller, BIG, BIG_PAYLOAD)
    buyer = buyers(seller)
    q = deal(buyer)
    sock = first_window(buyer, q)
    pay_on_stream(sock, buyer.receipt(q, CHUNK))
    tag, body = read_frame(sock)
    assert tag == FrameTag.CHUNK and body[:4] == (1).to_bytes(4, "little")
    sock.close()
    ledger = ledger_of(seller)
    assert [e.paid for e in ledger.audit()] == [q.price * CHUNK // q.deliver]
    ledger.close()


# ---- credit that fresh identities cannot farm --------------------------------------

ALLOWANCE = """
[policy]
stranger_unpaid_windows = 1
network_unpaid_windows = 3
"""


def test_fresh_identities_take_one_window_each_and_their_network_no_more(node, buyers):
    seller = node(payment_window_bytes=CHUNK, tables=ALLOWANCE)
    publish(seller, BIG, BIG_PAYLOAD)
    served, refused = 0, []
    sybils = [buyers(seller) for _ in range(10)]  # all from 127.0.0.1: one network
    for sybil in sybils:
        q = sybil.quote(FP, CHAIN)
        if isinstance(q, Error):
            refused.append(q.code)
            continue
        sybil.accept(q)
        first_window(sybil, q).close()  # one window taken, and never paid
        served += 1
    assert served == 3 and refused == [ErrorCode.CREDIT_LIMIT] * 7
    # The first one again: its own window within the hour is used up.
    assert sybils[0].quote(FP, CHAIN).code == ErrorCode.CREDIT_LIMIT
    ledger = ledger_of(seller)
    eventually(lambda: ledger.unpaid_bytes(0) == 3 * CHUNK)
    # A newcomer from another network buys, paying window by window, and is served whole.
    honest = buyers(seller, source="127.0.1.7")
    q = deal(honest)
    assert buy_paying(honest, q) == BIG_PAYLOAD[: q.deliver]
    honest.peer.send(honest.receipt(q, q.deliver))
    eventually(lambda: [e.receipted for e in ledger.audit()][-1])
    # Having paid, it buys again at once; a newcomer of the swarm's network waits the hour.
    assert isinstance(honest.quote(FP, CHAIN), Quote)
    assert buyers(seller, source="127.0.0.9").quote(FP, CHAIN).code == ErrorCode.CREDIT_LIMIT
    assert ledger.unpaid_bytes(0) == 3 * CHUNK
    ledger.close()
    alive_and_serving(seller)


def buy_paying(buyer: RawBuyer, q: Quote) -> bytes:
    """The whole stream, paying each window as it fills (one chunk a window)."""
    sock = buyer.open(q)
    assert read_frame(sock)[0] == FrameTag.CHUNK_LIST
    got = b""
    while (frame := read_frame(sock)) is not None and frame[0] == FrameTag.CHUNK:
        got += frame[1][4:]
        if len(got) < q.deliver:
            pay_on_stream(sock, buyer.receipt(q, len(got)))
    assert frame is not None and frame[0] == FrameTag.END
    sock.close()
    return got


# ---- deals end ----------------------------------------------------------------------

KILLED_BUYER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from rawbuy import RawBuyer, read_frame
from test_attacks import CHAIN, FP
class Seller:
    info = json.loads(open({info!r}).read())
buyer = RawBuyer(Seller)
q = buyer.quote(FP, CHAIN)
buyer.accept(q)
sock = buyer.open(q)
read_frame(sock)
read_frame(sock)
print(buyer.identity.node_id.hex(), q.price, flush=True)
time.sleep(600)  # holding the stream, unpaid, until it is killed
"""


def test_a_buyer_killed_mid_purchase_leaves_no_exposure_behind(node):
    seller = node(payment_window_bytes=CHUNK)
    publish(seller, BIG, BIG_PAYLOAD)
    tests = str(Path(__file__).parent)
    script = KILLED_BUYER.format(tests=tests, info=str(seller.dir / "node.json"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        buyer_hex, price = proc.stdout.readline().split()
        buyer = bytes.fromhex(buyer_hex)
        ledger = ledger_of(seller)
        assert ledger.exposure(buyer) == int(price) > 0  # mid-purchase: the deal is open
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        eventually(lambda: ledger.exposure(buyer) == 0)
        [entry] = ledger.audit()
        assert entry.ended == "its stream ended before END" and entry.paid == 0
        assert ledger.unpaid_bytes(0, buyer=buyer) == CHUNK  # what it did take
        ledger.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    alive_and_serving(seller)
