"""kvx: a peer-to-peer exchange for transformer KV caches.

The layers live in kvx.protocol, kvx.trust, kvx.transport and kvx.p2p; this facade names
what an agent or an operator needs: a node, the client an agent embeds, the names its
calls take, and the errors they raise (each a KvxError).
"""

from importlib.metadata import version as _version

from kvx.p2p import AdminError, Bought, Miss, Node, NodeConfig, PeerClient, SyncPeerClient
from kvx.protocol import KVLayout, KvxError, ModelFingerprint, Namespace
from kvx.transport import Fault

__version__ = _version("kvx")

__all__ = [
    "AdminError",
    "Bought",
    "Fault",
    "KVLayout",
    "KvxError",
    "Miss",
    "ModelFingerprint",
    "Namespace",
    "Node",
    "NodeConfig",
    "PeerClient",
    "SyncPeerClient",
    "__version__",
]
