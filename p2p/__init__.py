"""kvx.p2p: the node daemon — membership, gossip of signed advertisements over ZeroMQ,
the advertisement index, the local KV store, and the local admin API — and the peer
client an agent embeds."""

from ._admin import AdminError, admin_call
from ._client import Bought, Check, Miss, PeerClient, Refusal, SyncPeerClient
from ._config import Bootstrap, NodeConfig, load_node_config
from ._node import Node, run_node
from ._pricing import PricePolicy, prefill_flops
from ._store import PublishRequest

__all__ = [
    "AdminError",
    "Bootstrap",
    "Bought",
    "Check",
    "Miss",
    "Node",
    "NodeConfig",
    "PeerClient",
    "PricePolicy",
    "PublishRequest",
    "Refusal",
    "SyncPeerClient",
    "admin_call",
    "load_node_config",
    "prefill_flops",
    "run_node",
]
