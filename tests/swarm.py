"""A hand-driven peer for node tests (the node processes come from kvx.testing)."""

from kvx.testing import NodeProcess
from kvx.testing import wait_for as eventually

__all__ = ["NodeProcess", "TestPeer", "eventually"]


class TestPeer:
    """A hand-driven peer: a CURVE DEALER to a node process, sending whatever frames a test
    makes (good or hostile) and reading the node's answers."""

    __test__ = False  # not a test class

    def __init__(self, node: NodeProcess, identity, source: str | None = None) -> None:
        import zmq

        from kvx.trust import make_curve_client

        self.identity = identity
        self.node_key = bytes.fromhex(node.info["public_key"])
        self.node_id = bytes.fromhex(node.info["node_id"])
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        make_curve_client(self.sock, identity, self.node_key)
        ctl = node.info["ctl"]
        if source is not None:  # speak from this local address (another network, say)
            ctl = ctl.replace("tcp://", f"tcp://{source}:0;", 1)
        self.sock.connect(ctl)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float = 3.0):
        """The node's next statement to us, opened, or None if it stays silent."""
        from kvx.trust import open_envelope

        if not self.sock.poll(int(timeout * 1000)):
            return None
        return open_envelope(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self._ctx.term()
