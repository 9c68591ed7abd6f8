"""kvx.p2p: the node daemon, membership, gossip, the advertisement index. Arrives with issue 4."""

__all__: list[str] = []
