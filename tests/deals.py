"""Signed QUOTE / ACCEPT / RECEIPT statements between two identities, for ledger tests."""

from kvx.protocol import Accept, Header, KVLayout, Quote, Receipt
from kvx.trust import Identity, Statement, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
NOW = 1_800_000_000_000


def deal(
    seller: Identity,
    buyer: Identity,
    quote_id: bytes,
    price: int,
    *,
    seq: int = 1,
    now: int = NOW,
    receipt_price: int | None = None,
) -> tuple[Statement, Statement, Statement]:
    root = quote_id * 2
    quote = Quote(
        re=0,
        quote=quote_id,
        blocks=1,
        stored=2,
        layout=LAYOUT,
        root=root,
        chunk=1 << 16,
        price=price,
        transport="tcp",
        data="127.0.0.1:1",
        token=b"\x00" * 32,
    )
    accept = Accept(quote=quote_id, price=price, root=root)
    receipt = Receipt(
        quote=quote_id,
        seller=seller.node_id,
        root=root,
        bytes=quote.deliver,
        price=price if receipt_price is None else receipt_price,
    )

    def st(ident: Identity, msg, to: bytes) -> Statement:
        return open_envelope(seal(ident, msg, Header(iat=now, exp=now + 30_000, seq=seq, to=to)))

    return (
        st(seller, quote, buyer.node_id),
        st(buyer, accept, seller.node_id),
        st(buyer, receipt, seller.node_id),
    )
