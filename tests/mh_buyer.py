"""A buyer on another host (run inside a network namespace by test_multihost.py): buys one
payload through its node and prints what happened as JSON."""

import json
import sys

import blake3

from kvx.p2p import SyncPeerClient

if __name__ == "__main__":
    data_dir, fp, chain = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3].split(",")
    client = SyncPeerClient(data_dir, timeout_s=5.0)
    try:
        bought = client.fetch(fp, [bytes.fromhex(h) for h in chain], params=10**9)
        print(
            json.dumps(
                {
                    "providers": [f.provider.hex() for f in bought.faults] + [bought.seller.hex()],
                    "faults": [f.code.name for f in bought.faults],
                    "digest": blake3.blake3(bought.tensor.numpy()).hexdigest(),
                    "seller": bought.seller.hex(),
                    "price": bought.price,
                }
            )
        )
    finally:
        client.close()
