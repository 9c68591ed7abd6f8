"""A kvx node with one rule of the spec switched off, for tests/test_mutations.py:

    python mutant.py RULE -- python -m kvx.cli node --config FILE

Each rule is switched off by patching the reference code in this process only, before
the node starts; nothing of it ships in kvx.
"""

import importlib
import sys


def _serving():
    return importlib.import_module("kvx.transport._serving")


def _swap(owner: object, name: str, value: object) -> None:
    """Replace what the reference code has under `name`: a name it no longer has (a
    rename) fails here, not as a mutant that switches nothing off."""
    if not hasattr(owner, name):
        raise AttributeError(f"{owner!r} has no {name}: the mutation is out of date")
    setattr(owner, name, value)


def _market():
    return importlib.import_module("kvx.p2p._market").Market


def _gossip():
    return importlib.import_module("kvx.p2p._gossip").Gossip


MUTATIONS = {
    # §9.4: a seller waits for the receipt of each window
    "window": lambda: _swap(
        _serving().Serving,
        "next",
        lambda self: _serving().Next.END if self.sent >= self.stop else _serving().Next.CHUNK,
    ),
    # §9.4: a window receipt must be for exactly what was sent
    "receipt": lambda: _swap(_serving().Serving, "_check_receipt", lambda self, st: None),
    # §6.2: each (signer, seq) is taken once
    "replay": lambda: _swap(
        __import__("kvx.trust._freshness", fromlist=["ReplayGuard"]).ReplayGuard,
        "_remember",
        lambda self, signer, header: None,
    ),
    # §9.2: a TRANSFER before its ACCEPT waits for it
    "accept-wait": lambda: _patch_init_default(),
    # §10.1: at most three counter-offers
    "counters": lambda: _swap(__import__("kvx.p2p._market", fromlist=["x"]), "MAX_COUNTERS", 99),
    # §8.3: PEERS names recent news
    "recent": lambda: _swap(_gossip(), "recent_for", lambda self, key: ()),
    # §8.3: news a PEERS names that the node lacks is pulled with a DIGEST
    "pull": lambda: _swap(_gossip(), "pull_news", lambda self, *args, **kwargs: None),
    # §9.2: a refused TRANSFER is answered with its code
    "transfer-errors": lambda: _swap(_serving(), "refusal", lambda *a: None),
    # §4.5: a relayable statement carries at most MAX_UNKNOWN_BYTES of unknown fields
    "unknown-bytes": lambda: _swap(
        __import__("kvx.protocol._codec", fromlist=["x"]), "MAX_UNKNOWN_BYTES", 1 << 20
    ),
    # §8.1a: a control address is an IP literal and a port, never a host name
    "address": lambda: _swap(
        __import__("kvx.protocol._address", fromlist=["x"]),
        "_parse",
        lambda text: (__import__("ipaddress").ip_address("127.0.0.1"), 9),
    ),
    # §10.6: a receipt for part of a delivery belongs on the data channel
    "partial-receipt": lambda: _swap(_market(), "receipt", _market().window_receipt),
    # §8.22: a LEAVE of an older incarnation is ignored
    "leave-inc": lambda: _ignore_leave_incarnations(),
    # §8.22: a LEAVE drops the leaver's advertisements
    "leave": lambda: _swap(
        importlib.import_module("kvx.p2p._liveness").Liveness, "on_leave", lambda self, st: False
    ),
}


def _patch_init_default() -> None:
    from kvx.transport import _sessions

    original = _sessions.Sessions.__init__
    _sessions.Sessions.__init__ = lambda self, accept_wait_s=5.0: original(self, 0.0)


def _ignore_leave_incarnations() -> None:
    from kvx.p2p import _peers

    original = _peers.PeerTable.left
    _peers.PeerTable.left = lambda self, key, inc: original(self, key, 2**64)


def launch(patches: dict) -> None:
    """Run `python THIS_FILE NAME -- python -m kvx.cli ...` with patch NAME applied."""
    name, sep, *command = sys.argv[1:]
    assert sep == "--" and command[1:3] == ["-m", "kvx.cli"], command
    patches[name]()
    from kvx.cli import main

    sys.exit(main(command[3:]))


if __name__ == "__main__":
    launch(MUTATIONS)
