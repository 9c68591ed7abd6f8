"""kvx.p2p: the node daemon — membership, gossip of signed advertisements over ZeroMQ,
the advertisement index, the local KV store, and the local admin API."""

from ._admin import AdminError, admin_call
from ._config import Bootstrap, NodeConfig, load_node_config
from ._index import AdIndex, Advert
from ._launch import NodeProcess, wait_for
from ._node import Node, run_node
from ._peers import Peer, PeerTable, State
from ._store import Entry, LocalStore, Payload

__all__ = [
    "AdIndex",
    "AdminError",
    "Advert",
    "Bootstrap",
    "Entry",
    "LocalStore",
    "Node",
    "NodeConfig",
    "NodeProcess",
    "Payload",
    "Peer",
    "PeerTable",
    "State",
    "admin_call",
    "load_node_config",
    "run_node",
    "wait_for",
]
