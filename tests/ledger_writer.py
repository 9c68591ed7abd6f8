"""Records deals into a ledger as fast as it can, printing each quote id once committed.

Run by test_ledger.py, which kills it with SIGKILL at random instants.
"""

import secrets
import sys

from deals import deal

from kvx.trust import Identity, Ledger

SELLER = Identity.from_seed(b"\x51" * 32)
BUYER = Identity.from_seed(b"\x52" * 32)

if __name__ == "__main__":
    ledger = Ledger(sys.argv[1], SELLER.node_id)
    while True:
        qid = secrets.token_bytes(16)
        quote, accept, receipt = deal(SELLER, BUYER, qid, 7)
        ledger.record_accept(quote, accept, now_ms=1, limit=10**15)
        ledger.record_delivery(qid, now_ms=2)
        ledger.record_receipt(receipt, now_ms=3)
        print(qid.hex(), flush=True)
