"""The credit ledger: every signed QUOTE/ACCEPT pair and RECEIPT this node took part in.

SQLite in WAL mode with synchronous=FULL: each deal, delivery and receipt is one
transaction, so a process killed at any instant leaves each either whole or absent. The
signed frames are stored as received, so the audit log is evidence, not a claim.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from kvx.protocol import (
    Accept,
    ErrorCode,
    MessageType,
    Quote,
    Receipt,
    RemoteProtocolError,
    receipt_price,
)

from ._config import owner_only
from ._credit import Allowance
from ._envelope import Statement, open_envelope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deals (
    quote_id     BLOB PRIMARY KEY,
    seller       BLOB NOT NULL,
    buyer        BLOB NOT NULL,
    price        INTEGER NOT NULL,
    root         BLOB NOT NULL,
    bytes        INTEGER NOT NULL,
    quote_frame  BLOB NOT NULL,
    accept_frame BLOB NOT NULL,
    accepted_ms  INTEGER NOT NULL,
    delivered_ms INTEGER,
    window       INTEGER NOT NULL DEFAULT 0,
    network      TEXT NOT NULL DEFAULT '',
    sent         INTEGER,
    ended_ms     INTEGER,
    ended        TEXT
);
CREATE INDEX IF NOT EXISTS deals_by_time ON deals (accepted_ms);
CREATE TABLE IF NOT EXISTS receipts (
    quote_id      BLOB PRIMARY KEY REFERENCES deals (quote_id),
    receipt_frame BLOB NOT NULL,
    recorded_ms   INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    price         INTEGER NOT NULL
);
"""

_RECEIPT_COLUMNS = (  # a ledger written before payment windows held whole receipts only
    "ALTER TABLE receipts ADD COLUMN bytes INTEGER NOT NULL DEFAULT -1",
    "ALTER TABLE receipts ADD COLUMN price INTEGER NOT NULL DEFAULT -1",
    "UPDATE receipts SET bytes = (SELECT d.bytes FROM deals d WHERE d.quote_id ="
    " receipts.quote_id), price = (SELECT d.price FROM deals d WHERE d.quote_id ="
    " receipts.quote_id) WHERE bytes = -1",
)


_DEAL_COLUMNS = {  # a ledger written before deals had a life and a source network
    "window": "ALTER TABLE deals ADD COLUMN window INTEGER NOT NULL DEFAULT 0",
    "network": "ALTER TABLE deals ADD COLUMN network TEXT NOT NULL DEFAULT ''",
    "sent": "ALTER TABLE deals ADD COLUMN sent INTEGER",
    "ended_ms": "ALTER TABLE deals ADD COLUMN ended_ms INTEGER",
    "ended": "ALTER TABLE deals ADD COLUMN ended TEXT",
}

_UNPAID = """
SELECT COALESCE(SUM(CASE
    WHEN d.sent IS NULL
    THEN MIN(CASE WHEN d.window > 0 THEN d.window ELSE d.bytes END,
             d.bytes - COALESCE(r.bytes, 0))
    ELSE MAX(0, d.sent - COALESCE(r.bytes, 0)) END), 0)
FROM deals d LEFT JOIN receipts r USING (quote_id)
WHERE d.seller = :me AND d.accepted_ms >= :since
"""
"""Bytes sold and not receipted: what a deal's stream sent past its last receipt, or, while
it may still stream (or where a restart lost count), the window it may send unpaid."""

_STRANGER = """d.buyer NOT IN (SELECT p.buyer FROM deals p JOIN receipts pr USING (quote_id)
    WHERE p.seller = :me)"""


def _fail(code: ErrorCode, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, detail)


@dataclass(frozen=True)
class Receipted:
    """What one receipt added to a deal's payment: credits, and the deal's tokens when
    it is the first to cover the whole delivery."""

    credits: int
    tokens: int


@dataclass(frozen=True)
class AuditEntry:
    when_ms: int
    role: str  # "sold" or "bought"
    peer: bytes
    quote_id: bytes
    bytes: int
    price: int
    paid: int  # what the latest receipt states: the price, or part of it mid-stream
    receipted: bool  # a receipt for the whole delivery is stored
    ended: str | None = None  # why a deal expired undelivered (spec §10.7)


class Ledger:
    """One node's view of its bilateral balances; `me` is its node id."""

    def __init__(self, path: str | os.PathLike[str], me: bytes) -> None:
        self.me = me
        owner_only(path)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(receipts)")}
        if "price" not in columns:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _RECEIPT_COLUMNS:
                self._db.execute(statement)
            self._db.execute("COMMIT")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(deals)")}
        for column, statement in _DEAL_COLUMNS.items():
            if column not in columns:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def _sum(self, query: str, args: tuple[object, ...] | dict[str, object] = ()) -> int:
        """The one number a SUM or COUNT query gives."""
        return int(self._db.execute(query, args).fetchone()[0])

    def exposure(self, peer: bytes) -> int:
        """What `peer` owes this node, counting accepted deals not yet receipted; a deal
        that expired undelivered counts what its receipts paid, no more (§10.7)."""
        sold = self._sum(
            "SELECT COALESCE(SUM(CASE WHEN d.ended_ms IS NULL THEN d.price"
            " ELSE COALESCE(r.price, 0) END), 0)"
            " FROM deals d LEFT JOIN receipts r USING (quote_id)"
            " WHERE d.seller = ? AND d.buyer = ?",
            (self.me, peer),
        )
        bought = self._sum(
            "SELECT COALESCE(SUM(r.price), 0) FROM deals d JOIN receipts r USING (quote_id)"
            " WHERE d.seller = ? AND d.buyer = ?",
            (peer, self.me),
        )
        return sold - bought

    def check_credit(self, buyer: bytes, price: int, limit: int) -> None:
        """Raise CREDIT_LIMIT if selling to `buyer` at `price` would exceed `limit`."""
        owed = self.exposure(buyer)
        if owed + price > limit:
            raise _fail(
                ErrorCode.CREDIT_LIMIT,
                f"buyer owes {owed}; {price} more would pass its limit of {limit}",
            )

    def paid_bytes(self, buyer: bytes) -> int:
        """Bytes `buyer` has receipted to this node, ever: the history a stranger lacks."""
        return self._sum(
            "SELECT COALESCE(SUM(r.bytes), 0) FROM deals d JOIN receipts r USING (quote_id)"
            " WHERE d.seller = ? AND d.buyer = ?",
            (self.me, buyer),
        )

    def unpaid_bytes(
        self, since_ms: int, *, buyer: bytes | None = None, network: str | None = None
    ) -> int:
        """Bytes sold since `since_ms` and not receipted: to `buyer`, or to the buyers
        with no paid history that spoke from `network`."""
        query, args = _UNPAID, {"me": self.me, "since": since_ms}
        if buyer is not None:
            query += " AND d.buyer = :buyer"
            args["buyer"] = buyer
        if network is not None:
            query += f" AND d.network = :network AND {_STRANGER}"
            args["network"] = network
        return self._sum(query, args)

    def check_unpaid(
        self,
        buyer: bytes,
        network: str,
        unpaid: int,
        now_ms: int,
        allowance: Allowance,
        window_bytes: int,
    ) -> None:
        """Raise CREDIT_LIMIT if a deal that may leave `unpaid` bytes unpaid would take
        `buyer`, or the strangers of its network, past the allowance (§10.5), counted in
        windows of `window_bytes`."""
        since = now_ms - allowance.span_ms
        paid = self.paid_bytes(buyer)
        taken = self.unpaid_bytes(since, buyer=buyer)
        if taken + unpaid > allowance.stranger_windows * window_bytes + paid:
            raise _fail(
                ErrorCode.CREDIT_LIMIT,
                f"{taken} bytes unpaid within the hour; {unpaid} more would pass"
                f" {allowance.stranger_windows * window_bytes + paid}",
            )
        if paid == 0 and network:
            shared = self.unpaid_bytes(since, network=network)
            if shared + unpaid > allowance.network_windows * window_bytes:
                raise _fail(
                    ErrorCode.CREDIT_LIMIT,
                    f"new buyers from {network} have left the network's allowance unpaid"
                    " within the hour",
                )

    def record_accept(
        self,
        quote: Statement,
        accept: Statement,
        now_ms: int,
        limit: int,
        network: str = "",
        allowance: Allowance | None = None,
        window_bytes: int = 0,
    ) -> None:
        """Store a QUOTE and the ACCEPT that binds it, checking the buyer's credit (and,
        as its seller, what it may leave unpaid) atomically."""
        q, a = quote.message, accept.message
        if not (isinstance(q, Quote) and isinstance(a, Accept)):
            raise _fail(ErrorCode.UNEXPECTED_MESSAGE, "a deal is a QUOTE and its ACCEPT")
        if (
            a.quote != q.quote
            or a.price != q.price
            or a.root != q.root
            or (a.kx is None) != (q.kx is None)
        ):
            raise _fail(ErrorCode.UNKNOWN_QUOTE, "the ACCEPT does not match the QUOTE")
        seller, buyer = quote.signer_id, accept.signer_id
        if self.me not in (seller, buyer) or quote.header.to != buyer:
            raise _fail(ErrorCode.UNKNOWN_QUOTE, "this node is not a party to the quote")
        if accept.header.iat > quote.header.exp:
            raise _fail(ErrorCode.UNKNOWN_QUOTE, "the quote had expired when it was accepted")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT accept_frame FROM deals WHERE quote_id = ?", (q.quote,)
            ).fetchone()
            if row is not None:
                if row[0] != accept.frame:
                    raise _fail(ErrorCode.UNEXPECTED_MESSAGE, "this quote was already accepted")
                self._db.execute("COMMIT")
                return
            if seller == self.me:
                self.check_credit(buyer, q.price, limit)
                if allowance is not None:
                    window = min(q.window or q.deliver, q.deliver)
                    self.check_unpaid(buyer, network, window, now_ms, allowance, window_bytes)
            self._db.execute(
                "INSERT INTO deals (quote_id, seller, buyer, price, root, bytes, quote_frame,"
                " accept_frame, accepted_ms, window, network) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " ?, ?)",
                (
                    q.quote,
                    seller,
                    buyer,
                    q.price,
                    q.root,
                    q.deliver,
                    quote.frame,
                    accept.frame,
                    now_ms,
                    q.window or 0,
                    network,
                ),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def record_delivery(self, quote_id: bytes, now_ms: int, carried: int | None = None) -> None:
        """The seller streamed every chunk of this deal to END, `carried` bytes of it (less
        than the delivery when the stream resumed one another provider began, §9.4);
        only now may a receipt of the whole name it."""
        cur = self._db.execute(
            "UPDATE deals SET delivered_ms = ?, sent = COALESCE(?, bytes)"
            " WHERE quote_id = ? AND seller = ?",
            (now_ms, carried, quote_id, self.me),
        )
        if cur.rowcount != 1:
            raise _fail(ErrorCode.UNKNOWN_QUOTE, "no deal of ours with that quote id")

    def record_expiry(self, quote_id: bytes, now_ms: int, why: str, sent: int | None) -> bool:
        """A deal of ours whose life ended undelivered (§10.7): its unreceipted price no
        longer counts against its buyer; `sent` (None: not known) bytes of it did go out.
        False if it was delivered or had expired already."""
        cur = self._db.execute(
            "UPDATE deals SET ended_ms = ?, ended = ?, sent = ? WHERE quote_id = ?"
            " AND seller = ? AND delivered_ms IS NULL AND ended_ms IS NULL",
            (now_ms, why, sent, quote_id, self.me),
        )
        return cur.rowcount == 1

    def expire_undelivered(self, now_ms: int, why: str) -> int:
        """Expire every deal of ours still open: at start-up, when no stream can be alive."""
        return self._db.execute(
            "UPDATE deals SET ended_ms = ?, ended = ? WHERE seller = ? AND delivered_ms IS NULL"
            " AND ended_ms IS NULL",
            (now_ms, why, self.me),
        ).rowcount

    def record_receipt(self, receipt: Statement, now_ms: int, *, partial: bool = True) -> Receipted:
        """Store a buyer's RECEIPT for a deal that was accepted (and, for the whole
        delivery, delivered); a receipt for more of the delivery replaces one for less
        (the payment window, §9.4), anything else differing from the stored one is refused.
        With `partial` False (a seller's control channel) only a receipt of the whole
        delivery is taken: part of one moves a payment window, on the data channel.
        Returns what it adds to what was already paid."""
        r = receipt.message
        if not isinstance(r, Receipt):
            raise _fail(ErrorCode.UNEXPECTED_MESSAGE, "not a RECEIPT")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            deal = self._db.execute(
                "SELECT seller, buyer, price, root, bytes, delivered_ms, quote_frame, sent"
                " FROM deals WHERE quote_id = ?",
                (r.quote,),
            ).fetchone()
            if deal is None:
                raise _fail(ErrorCode.UNKNOWN_TRANSFER, "no accepted quote has this id")
            seller, buyer, price, root, size, delivered, quote_frame, sent = deal
            # What a final receipt covers: the delivering stream's bytes, once it ended.
            whole = sent if delivered is not None and sent is not None else size
            if receipt.signer_id != buyer:
                raise _fail(ErrorCode.UNKNOWN_TRANSFER, "the receipt is not signed by the buyer")
            if (
                (r.seller, r.root) != (seller, root)
                or not 0 < r.bytes <= size
                or r.price != receipt_price(price, r.bytes, size)
            ):
                raise _fail(ErrorCode.UNKNOWN_TRANSFER, "the receipt does not match the deal")
            if not partial and r.bytes != whole:
                raise _fail(
                    ErrorCode.UNKNOWN_TRANSFER,
                    f"a final receipt is for the {whole} bytes the stream carried (part of it"
                    " belongs on the data channel)",
                )
            if seller == self.me and r.bytes == size and delivered is None:
                raise _fail(ErrorCode.UNKNOWN_TRANSFER, "that transfer never completed")
            row = self._db.execute(
                "SELECT receipt_frame, bytes, price FROM receipts WHERE quote_id = ?", (r.quote,)
            ).fetchone()
            before_bytes, before_price = (0, 0) if row is None else (row[1], row[2])
            if row is None:
                self._db.execute(
                    "INSERT INTO receipts VALUES (?, ?, ?, ?, ?)",
                    (r.quote, receipt.frame, now_ms, r.bytes, r.price),
                )
            elif row[0] != receipt.frame:
                if r.bytes <= row[1]:
                    raise _fail(ErrorCode.REPLAYED, "a receipt for as much is already recorded")
                self._db.execute(
                    "UPDATE receipts SET receipt_frame = ?, recorded_ms = ?, bytes = ?, price = ?"
                    " WHERE quote_id = ?",
                    (receipt.frame, now_ms, r.bytes, r.price, r.quote),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if r.bytes <= before_bytes:
            return Receipted(0, 0)
        tokens = 0
        if r.bytes == whole:  # the delivery receipted: its share of the tokens sold
            quote = open_envelope(quote_frame).message
            assert isinstance(quote, Quote)
            tokens = quote.blocks * quote.layout.block * r.bytes // size
        return Receipted(r.price - before_price, tokens)

    def balances(self) -> dict[bytes, int]:
        """Net receipted amount each peer owes this node (negative: this node owes it)."""
        out: dict[bytes, int] = {}
        rows = self._db.execute(
            "SELECT d.seller, d.buyer, r.price FROM deals d JOIN receipts r USING (quote_id)"
        )
        for seller, buyer, price in rows:
            if seller == self.me:
                out[buyer] = out.get(buyer, 0) + price
            else:
                out[seller] = out.get(seller, 0) - price
        return out

    def audit(self) -> list[AuditEntry]:
        """Every deal, oldest first."""
        rows = self._db.execute(
            "SELECT d.accepted_ms, d.seller, d.buyer, d.quote_id, d.bytes, d.price,"
            " COALESCE(r.price, 0), COALESCE(r.bytes = d.bytes, 0), d.ended"
            " FROM deals d LEFT JOIN receipts r USING (quote_id)"
            " ORDER BY d.accepted_ms, d.quote_id"
        )
        return [
            AuditEntry(
                when_ms=when,
                role="sold" if seller == self.me else "bought",
                peer=buyer if seller == self.me else seller,
                quote_id=qid,
                bytes=size,
                price=price,
                paid=paid,
                receipted=bool(done),
                ended=ended,
            )
            for when, seller, buyer, qid, size, price, paid, done, ended in rows
        ]

    def verify(self) -> None:
        """Re-check every stored frame's signature and its agreement with its row."""
        if self._db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise _fail(ErrorCode.INTERNAL, "the ledger database is corrupt")
        rows = self._db.execute(
            "SELECT d.quote_id, d.quote_frame, d.accept_frame, r.receipt_frame"
            " FROM deals d LEFT JOIN receipts r USING (quote_id)"
        )
        for qid, quote_frame, accept_frame, receipt_frame in rows:
            frames = [quote_frame, accept_frame] + ([receipt_frame] if receipt_frame else [])
            statements = [open_envelope(f) for f in frames]
            kinds = [s.type for s in statements]
            expected = [MessageType.QUOTE, MessageType.ACCEPT, MessageType.RECEIPT]
            if kinds != expected[: len(kinds)] or any(
                getattr(s.message, "quote", None) != qid for s in statements
            ):
                raise _fail(ErrorCode.INTERNAL, f"deal {qid.hex()} holds mismatched frames")
