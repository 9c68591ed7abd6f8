"""What a buyer's end of one stream is, whatever carries it (spec §9): the stream's
opening TRANSFER, its verifier and destination, and how its windows are paid. The TCP
and UCX receivers differ in how they move frames, and in whether the buyer can end a
stream sooner."""

from __future__ import annotations

from collections.abc import Callable

from ._destination import Destination
from ._verify import StreamVerifier


class Receiving:
    """One stream a buyer receives; `run` receives it whole or raises, `shorten` asks the
    seller to end it before chunk `stop` (§9.7; False if it cannot), `cancel` abandons it."""

    def __init__(
        self,
        address: str,
        opening: bytes,
        verifier: StreamVerifier,
        dest: Destination,
        timeout_s: float,
        pay: Callable[[int], bytes] | None = None,
        key: bytes | None = None,
    ) -> None:
        if verifier.expected.window and pay is None:
            raise ValueError("a quote with a payment window needs `pay`")
        self.address = address
        self.opening = opening
        self.verifier = verifier
        self.dest = dest
        self.timeout_s = timeout_s
        self.pay = pay  # seals the receipt for a window (§9.4)
        self.key = key  # the deal's channel key, when the stream is sealed (§9.6)

    async def run(self) -> None:
        raise NotImplementedError

    def shorten(self, stop: int, frame: bytes) -> bool:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError
