"""kvx: a peer-to-peer exchange for transformer KV caches.

The layers live in kvx.protocol, kvx.trust, kvx.transport and kvx.p2p; this facade grows
`Node` and `PeerClient` as the node and the client land.
"""

from importlib.metadata import version as _version

__version__ = _version("kvx")

__all__ = ["__version__"]
