"""kvx.p2p: the node daemon — membership, gossip of signed advertisements over ZeroMQ,
the advertisement index, the local KV store, and the local admin API."""

from ._admin import AdminError, admin_call
from ._client import Bought, Check, Miss, PeerClient, Refusal, SyncPeerClient
from ._config import Bootstrap, NodeConfig, load_node_config
from ._index import AdIndex, Advert
from ._launch import NodeProcess, wait_for
from ._node import Node, run_node
from ._peers import Peer, PeerTable, State
from ._pricing import PricePolicy, prefill_flops
from ._store import Entry, LocalStore, Payload

__all__ = [
    "AdIndex",
    "AdminError",
    "Advert",
    "Bootstrap",
    "Bought",
    "Check",
    "Entry",
    "LocalStore",
    "Miss",
    "Node",
    "NodeConfig",
    "NodeProcess",
    "Payload",
    "Peer",
    "PeerClient",
    "PeerTable",
    "PricePolicy",
    "Refusal",
    "State",
    "SyncPeerClient",
    "admin_call",
    "load_node_config",
    "prefill_flops",
    "run_node",
    "wait_for",
]
