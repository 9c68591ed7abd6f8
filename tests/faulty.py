"""A kvx node process with one fault of a seller, for tests of striped purchases:

    python faulty.py FAULT -- python -m kvx.cli node --config FILE

Each fault is put in by patching the reference code in this process only, before the
node starts; nothing of it ships in kvx.
"""

import time


def _lie() -> None:
    """Every chunk at an odd index goes out with one bit flipped: its hash fails."""
    from kvx.transport import Offer

    honest = Offer.chunk

    def chunk(self, index: int) -> memoryview:
        data = honest(self, index)
        if index % 2:
            flipped = bytearray(data)
            flipped[0] ^= 0x01
            return memoryview(flipped)
        return data

    Offer.chunk = chunk


def _stall() -> None:
    """Every stream sends three chunks, then hangs with its connection open."""
    from kvx.transport._serving import Serving

    honest = Serving.chunk_sent

    def chunk_sent(self) -> None:
        honest(self)
        if self.sent - self.first == 3:
            time.sleep(3600)

    Serving.chunk_sent = chunk_sent


FAULTS = {"lie": _lie, "stall": _stall}

if __name__ == "__main__":
    from mutant import launch  # beside this file, so on sys.path when it runs as a script

    launch(FAULTS)
