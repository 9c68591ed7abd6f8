"""kvx: a peer-to-peer exchange for transformer KV caches.

The layers live in kvx.protocol, kvx.trust, kvx.transport and kvx.p2p; this facade names
what an agent or an operator needs: a node, and the client an agent embeds.
"""

from importlib.metadata import version as _version

from kvx.p2p import Bought, Miss, Node, NodeConfig, PeerClient, SyncPeerClient

__version__ = _version("kvx")

__all__ = [
    "Bought",
    "Miss",
    "Node",
    "NodeConfig",
    "PeerClient",
    "SyncPeerClient",
    "__version__",
]
