"""A passive tap on the loopback interface: every byte any process sends over it while
the tap is open, as an eavesdropper on the data path would see it. Needs root."""

from __future__ import annotations

import os
import socket
import threading

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # Linux; Python's socket module does not name it


def can_tap() -> bool:
    return os.geteuid() == 0 and hasattr(socket, "AF_PACKET")


class Tap:
    def __init__(self, interface: str = "lo") -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # Root may pass rmem_max: a tap that drops packets could miss what it looks for.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.seen = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen += self.sock.recv(1 << 17)
            except TimeoutError:
                continue

    def close(self) -> bytes:
        """Stop listening; everything seen."""
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return bytes(self.seen)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.close()


def pieces(payload: bytes, every: int = 512, size: int = 32) -> list[bytes]:
    """Slices of `payload` to look for on the wire, short enough to sit in one packet."""
    return [payload[i : i + size] for i in range(0, len(payload) - size, every)]
