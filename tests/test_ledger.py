"""The credit ledger: deals, receipts, credit limits, and survival of a killed writer."""

import random
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from deals import deal

from kvx.protocol import ErrorCode, Header, RemoteProtocolError
from kvx.trust import Identity, Ledger, open_envelope, seal

SELLER = Identity.from_seed(b"\x51" * 32)
BUYER = Identity.from_seed(b"\x52" * 32)
OTHER = Identity.from_seed(b"\x53" * 32)
Q1, Q2 = b"\x01" * 16, b"\x02" * 16
KILLS = 50  # SIGKILLs of a process recording receipts, at random instants


@pytest.fixture
def seller_ledger(tmp_path):
    ledger = Ledger(tmp_path / "seller.db", SELLER.node_id)
    yield ledger
    ledger.close()


def code(fn, *args, **kwargs) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as err:
        fn(*args, **kwargs)
    return err.value.code


def test_a_full_deal_shows_in_both_ledgers(tmp_path, seller_ledger):
    buyer_ledger = Ledger(tmp_path / "buyer.db", BUYER.node_id)
    quote, accept, receipt = deal(SELLER, BUYER, Q1, 500)
    for ledger in (seller_ledger, buyer_ledger):
        ledger.record_accept(quote, accept, now_ms=1, limit=1000)
    seller_ledger.record_delivery(Q1, now_ms=2)
    seller_ledger.record_receipt(receipt, now_ms=3)
    buyer_ledger.record_receipt(receipt, now_ms=3)  # the buyer's own receipt
    assert seller_ledger.balances() == {BUYER.node_id: 500}
    assert buyer_ledger.balances() == {SELLER.node_id: -500}
    [entry] = seller_ledger.audit()
    assert (entry.role, entry.peer, entry.price, entry.receipted) == (
        "sold",
        BUYER.node_id,
        500,
        True,
    )
    assert buyer_ledger.audit()[0].role == "bought"
    seller_ledger.verify()
    buyer_ledger.close()


def test_accept_past_the_buyers_credit_limit_is_refused(seller_ledger):
    q1, a1, _ = deal(SELLER, BUYER, Q1, 600)
    seller_ledger.record_accept(q1, a1, now_ms=1, limit=1000)
    q2, a2, _ = deal(SELLER, BUYER, Q2, 401)
    assert code(seller_ledger.record_accept, q2, a2, now_ms=1, limit=1000) == ErrorCode.CREDIT_LIMIT
    assert [e.quote_id for e in seller_ledger.audit()] == [Q1]  # nothing half-recorded
    q3, a3, _ = deal(SELLER, BUYER, b"\x03" * 16, 400)
    seller_ledger.record_accept(q3, a3, now_ms=1, limit=1000)  # exactly at the limit


def test_check_credit_before_quoting(seller_ledger):
    seller_ledger.check_credit(BUYER.node_id, 1000, limit=1000)
    assert code(seller_ledger.check_credit, BUYER.node_id, 1001, limit=1000) == (
        ErrorCode.CREDIT_LIMIT
    )


def test_receipt_for_a_transfer_that_never_happened(seller_ledger):
    _, _, receipt = deal(SELLER, BUYER, Q1, 5)
    assert code(seller_ledger.record_receipt, receipt, now_ms=1) == ErrorCode.UNKNOWN_TRANSFER


def test_receipt_for_an_accepted_but_undelivered_deal(seller_ledger):
    quote, accept, receipt = deal(SELLER, BUYER, Q1, 5)
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=100)
    assert code(seller_ledger.record_receipt, receipt, now_ms=1) == ErrorCode.UNKNOWN_TRANSFER
    assert seller_ledger.balances() == {}


@pytest.mark.parametrize("bad", ["price", "signer"])
def test_receipt_that_does_not_match_its_deal(seller_ledger, bad):
    quote, accept, _ = deal(SELLER, BUYER, Q1, 5)
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=100)
    seller_ledger.record_delivery(Q1, now_ms=2)
    if bad == "price":
        receipt = deal(SELLER, BUYER, Q1, 5, receipt_price=4)[2]
    else:
        receipt = deal(SELLER, OTHER, Q1, 5)[2]  # signed by someone who is not the buyer
    assert code(seller_ledger.record_receipt, receipt, now_ms=3) == ErrorCode.UNKNOWN_TRANSFER


def test_receipts_are_recorded_exactly_once(seller_ledger):
    quote, accept, receipt = deal(SELLER, BUYER, Q1, 5)
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=100)
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=100)  # same deal again: no-op
    seller_ledger.record_delivery(Q1, now_ms=2)
    seller_ledger.record_receipt(receipt, now_ms=3)
    seller_ledger.record_receipt(receipt, now_ms=4)  # same receipt again: no-op
    other = deal(SELLER, BUYER, Q1, 5, seq=2)[2]  # a different signed receipt, same deal
    assert code(seller_ledger.record_receipt, other, now_ms=5) == ErrorCode.REPLAYED
    assert seller_ledger.balances() == {BUYER.node_id: 5}


def receipt_for(quote, size: int, price: int, seq: int = 9):
    """The buyer's receipt for the first `size` bytes of a deal (a payment window)."""
    from kvx.protocol import Header, Receipt
    from kvx.trust import open_envelope, seal

    q = quote.message
    r = Receipt(quote=q.quote, seller=SELLER.node_id, root=q.root, bytes=size, price=price)
    t = quote.header.iat
    return open_envelope(seal(BUYER, r, Header(iat=t, exp=t + 30_000, seq=seq, to=SELLER.node_id)))


def test_window_receipts_pay_part_and_the_whole_one_needs_the_delivery(seller_ledger):
    quote, accept, whole = deal(SELLER, BUYER, Q1, 1_000)
    deliver = quote.message.deliver
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=10_000)
    part = receipt_for(quote, deliver // 4, 1_000 * (deliver // 4) // deliver, seq=10)
    seller_ledger.record_receipt(part, now_ms=2)  # no delivery needed for a window
    assert seller_ledger.balances() == {BUYER.node_id: 250}
    more = receipt_for(quote, deliver // 2, 500, seq=11)
    seller_ledger.record_receipt(more, now_ms=3)  # a receipt for more replaces it
    assert seller_ledger.balances() == {BUYER.node_id: 500}
    fewer = receipt_for(quote, deliver // 4, 250, seq=12)
    assert code(seller_ledger.record_receipt, fewer, now_ms=4) == ErrorCode.REPLAYED
    wrong = receipt_for(quote, deliver // 2 + 1, 600, seq=13)  # not its share of the price
    assert code(seller_ledger.record_receipt, wrong, now_ms=4) == ErrorCode.UNKNOWN_TRANSFER
    assert code(seller_ledger.record_receipt, whole, now_ms=5) == ErrorCode.UNKNOWN_TRANSFER
    seller_ledger.record_delivery(Q1, now_ms=6)
    seller_ledger.record_receipt(whole, now_ms=7)
    assert seller_ledger.balances() == {BUYER.node_id: 1_000}
    (entry,) = seller_ledger.audit()
    assert (entry.paid, entry.receipted) == (1_000, True)
    seller_ledger.verify()


def test_a_ledger_written_before_payment_windows_is_upgraded(tmp_path):
    db = tmp_path / "old.db"
    quote, accept, receipt = deal(SELLER, BUYER, Q1, 5)
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE deals (quote_id BLOB PRIMARY KEY, seller BLOB NOT NULL, buyer BLOB NOT NULL,"
        " price INTEGER NOT NULL, root BLOB NOT NULL, bytes INTEGER NOT NULL,"
        " quote_frame BLOB NOT NULL, accept_frame BLOB NOT NULL, accepted_ms INTEGER NOT NULL,"
        " delivered_ms INTEGER);"
        "CREATE TABLE receipts (quote_id BLOB PRIMARY KEY REFERENCES deals (quote_id),"
        " receipt_frame BLOB NOT NULL, recorded_ms INTEGER NOT NULL);"
    )
    q = quote.message
    conn.execute(
        "INSERT INTO deals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (Q1, SELLER.node_id, BUYER.node_id, 5, q.root, q.deliver, quote.frame, accept.frame, 1, 2),
    )
    conn.execute("INSERT INTO receipts VALUES (?, ?, ?)", (Q1, receipt.frame, 3))
    conn.commit()
    conn.close()
    ledger = Ledger(db, SELLER.node_id)
    assert ledger.balances() == {BUYER.node_id: 5}
    assert [(e.paid, e.receipted) for e in ledger.audit()] == [(5, True)]
    ledger.close()


def test_accept_must_match_its_quote_and_come_in_time(seller_ledger):
    quote, _, _ = deal(SELLER, BUYER, Q1, 5)
    wrong_price = deal(SELLER, BUYER, Q1, 6)[1]
    assert code(seller_ledger.record_accept, quote, wrong_price, now_ms=1, limit=100) == (
        ErrorCode.UNKNOWN_QUOTE
    )
    late = deal(SELLER, BUYER, Q1, 5, now=quote.header.exp + 1)[1]
    assert code(seller_ledger.record_accept, quote, late, now_ms=1, limit=100) == (
        ErrorCode.UNKNOWN_QUOTE
    )
    not_ours = deal(OTHER, BUYER, Q1, 5)
    assert code(seller_ledger.record_accept, *not_ours[:2], now_ms=1, limit=100) == (
        ErrorCode.UNKNOWN_QUOTE
    )


def test_a_second_accept_of_one_quote_is_refused(seller_ledger):
    quote, accept, _ = deal(SELLER, BUYER, Q1, 5)
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=100)
    again = deal(SELLER, BUYER, Q1, 5, seq=9)[1]
    assert code(seller_ledger.record_accept, quote, again, now_ms=1, limit=100) == (
        ErrorCode.UNEXPECTED_MESSAGE
    )


def test_ledger_survives_a_writer_killed_at_random_instants(tmp_path):
    db = tmp_path / "ledger.db"
    writer = Path(__file__).with_name("ledger_writer.py")
    acknowledged: list[str] = []
    rng = random.Random(1234)
    errors = tmp_path / "writer.err"
    for _ in range(KILLS):
        with open(errors, "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, str(writer), str(db)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        # Wait until it is writing, then kill it somewhere in the middle of its work.
        first = proc.stdout.readline()
        assert first, f"the writer produced nothing: {errors.read_text()[-2000:]}"
        acknowledged.append(first.strip())
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        out, _ = proc.communicate()
        acknowledged += out.split()
    assert len(acknowledged) > KILLS

    ledger = Ledger(db, SELLER.node_id)
    ledger.verify()  # integrity check, every frame's signature, every row's frames agree
    raw = sqlite3.connect(db)
    deals = {row[0].hex() for row in raw.execute("SELECT quote_id FROM deals")}
    receipts = {row[0].hex() for row in raw.execute("SELECT quote_id FROM receipts")}
    # Nothing lost: every id the writer saw committed is there, with its receipt.
    assert set(acknowledged) <= receipts
    # Nothing half-recorded: every receipt has its deal; at most the deal in flight lacks one.
    assert receipts <= deals
    assert len(deals - receipts) <= KILLS
    # Nothing doubled: one row per quote id, and the balance is the sum of receipts.
    assert raw.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == len(receipts)
    assert ledger.balances() == {BUYER.node_id: 7 * len(receipts)}
    ledger.close()


def test_a_resumed_delivery_is_receipted_for_what_its_stream_carried(seller_ledger):
    """A stream that resumed at a later chunk carried less than the delivery: its final
    receipt on the control channel is for exactly that, at its share (§8.14, §10.6)."""
    quote, accept, whole = deal(SELLER, BUYER, Q1, 600)
    size = whole.message.bytes
    carried, share = size // 2, 600 * (size // 2) // size
    seller_ledger.record_accept(quote, accept, now_ms=1, limit=1000)
    seller_ledger.record_delivery(Q1, now_ms=2, carried=carried)
    # The whole payload, chunks another provider sent included: refused.
    assert code(seller_ledger.record_receipt, whole, 3, partial=False) == (
        ErrorCode.UNKNOWN_TRANSFER
    )
    h = whole.header
    part = open_envelope(
        seal(
            BUYER,
            replace(whole.message, bytes=carried, price=share),
            Header(iat=h.iat, exp=h.exp, seq=h.seq + 1, to=h.to),
        )
    )
    assert seller_ledger.record_receipt(part, 4, partial=False).credits == share
    assert seller_ledger.balances() == {BUYER.node_id: share}
