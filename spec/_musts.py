"""Where each MUST of PROTOCOL.md is tested. A key is the section and the first eight
words of the sentence (as tests/test_spec_musts.py cuts them); its value is the live
cases that test it, "vectors: …" for the frames the vector mode runs through a codec,
or "untestable: …" saying why a black-box suite cannot, and what tests it instead.

A test fails when a MUST of the spec is missing here, when an entry names no MUST any
more, or names a case that does not exist or is not a MUST case.
"""

from __future__ import annotations

MUSTS: dict[str, str | tuple[str, ...]] = {
    "§1: Receivers MUST accept a uint in any msgpack": ("1/1",),
    "§1: Senders MUST encode a uint in an unsigned": (
        "untestable: the suite decodes what the target sends with a decoder that accepts "
        "every integer format; the reference encoder's bytes are fixed by the vectors"
    ),
    "§3.3: A node MUST use this derived pair on": ("8.2/1",),
    "§4.2: A ZeroMQ message of more than one frame": ("4.2/1",),
    "§4.3: A receiver MUST NOT decode a frame longer": ("4.3/1",),
    "§4.3: It MUST NOT answer it: nothing of it": ("4.3/2",),
    "§4.3: A sender MUST NOT produce a larger frame.": (
        "untestable: the target's largest answers (LOOKUP_RESULT, PEERS) depend on what it "
        "holds, which the suite cannot fill black-box; every answer the suite reads is bounded"
    ),
    "§4.4: Receivers MUST reject with MALFORMED:": ("4.4/1", "4.4/2", "4.4/3"),
    "§4.4: nesting deeper than the receiver's decoder supports (at": (
        "vectors: codec/* (the live target is sent none: a deep frame tests only its decoder)"
    ),
    "§4.4: Receivers MUST refuse these counts before they build": ("4.4/4", "4.4/5"),
    "§4.4: Senders SHOULD encode every integer in its shortest": (
        "8.2/1",  # its MUST: bin and str; every answer is decoded with those types enforced
    ),
    "§4.4: Signatures cover the exact bytes sent (§5.2), so": ("8.6/1", "1/1"),
    "§4.5: Receivers MUST ignore them, at every level (they": ("4.5/1", "4.5/2"),
    "§4.5: A field defined here MUST have the type": ("6.4/1",),
    "§4.5: A relayable statement (§6.3) is held and relayed": ("4.5/3",),
    "§4.6: A receiver MUST read it before it checks": ("4.6/1", "4.6/2"),
    "§5.3: A receiver MUST verify the signature against signer": ("5.3/1",),
    "§5.3: A receiver MUST NOT act on any content": ("5.3/1", "6.5/3"),
    "§6.1: to bin32 — direct: yes; relayable: MUST be": (
        "vectors: header/missing-to, header/relay-with-to"
    ),
    "§6.2: A signer MUST give every statement it signs": (
        "untestable: the suite sees only the few statements the target addresses to it"
    ),
    "§6.2: A receiver MUST remember each accepted pair at": ("6.2/1", "6.2/2"),
    "§6.2: A receiver MUST NOT refuse a statement because": (
        "untestable: filling a target's replay memory needs its budgets and hours of "
        "statements; tests/test_attacks.py does it to the reference node"
    ),
    "§6.3: MUST drop it silently as a duplicate —": ("6.3/1",),
    "§6.4: A receiver MUST apply these checks in this": (
        "6.4/1",
        "6.4/2",
        "6.4/3",
        "6.4/4",
        "6.4/5",
    ),
    "§6.4: A rejected frame MUST NOT be remembered for": ("6.4/6",),
    "§6.5: A frame refused at steps 1–7 or for": ("6.5/3", "6.5/4", "4.6/1"),  # noqa: RUF001
    "§6.5: A node MUST NOT answer an ERROR with": ("6.5/5",),
    "§6.5: So MUST a frame refused at step 8": ("6.5/6",),
    "§7.2: weights_hash lp(bytes), 0 or 32 bytes BLAKE3 of": (
        "untestable: fingerprints are computed by buyers and sellers and never sent for a "
        "node to check; vectors: naming.json fixes them"
    ),
    "§7.2: positional lp(utf8), non-empty positional encoding and its parameters,": (
        "untestable: as the fingerprint above; vectors: naming.json"
    ),
    "§7.3: Token ids are encoded as u32le each, so": "vectors: naming.json chains",
    "§7.5: chunk MUST be a power of two from": "vectors: field/bad-chunk",
    "§7.5: A receiver checks the chunk hash list it": (
        "untestable: a rule for buyers, and the suite tests the target as a seller"
    ),
    "§7.6: A node MUST NOT send an ADVERTISE or": (
        "untestable: needs the target to hold a private namespace's advertisement, which no "
        "documented interface lets the suite give it; tests/test_private_namespace.py"
    ),
    "§8.1a: Host names MUST be refused: a receiver must": ("8.1a/1", "8.1a/3", "8.1a/4"),
    "§8.1a: A node MUST NOT open more than one": ("8.1a/5",),
    "§8.1a: A node MUST NOT list in PEERS a": ("8.1a/6",),
    "§8.8: The buyer MUST verify each listed envelope itself": (
        "untestable: a rule for buyers; the suite tests the target as a seller"
    ),
    "§8.10: Without a conversion, root MUST equal the advertised": ("8.10/1",),
    "§8.10: Before it allocates anything for a quote, the": (
        "untestable: a rule for buyers; the suite tests the target as a seller"
    ),
    "§8.11: — quote (quote-id), price (uint, MUST equal the": ("10.4/2",),
    "§8.15: — code (uint 1–65535, §11; unknown codes MUST": ("6.5/5",),  # noqa: RUF001
    "§8.6: - A node MUST NOT answer one DIGEST": ("8.6/2",),
    "§8.6: A node MUST NOT send one peer relayable": ("8.6/2",),
    "§8.17: A recipient MUST probe target only if it": ("8.17/1", "8.17/3"),
    "§8.18: A helper that took a PROBE MUST send": ("8.17/2",),
    # Black-box, only an unasked PROBE_ACK: the target asks only when its own probes
    # go unanswered. tests/test_core.py shows a node forged, misaddressed, stale and
    # reused proofs.
    "§8.18: The asker MUST take it only for a": ("8.18/1",),
    "§8.18: Only a statement that carries nothing of a": (
        "untestable: needs a target that is a member of a namespace with the helper; "
        "tests/test_private_namespace.py probes a member through a member as a stranger"
    ),
    "§9.7: The seller MUST then end the stream after": ("9.7/1", "9.7/2", "9.7/4"),
    "§9.7: No chunk twice. A buyer MUST NOT have": (
        "untestable: a rule of the buyer, which the suite (a buyer) cannot watch from outside; "
        "tests/test_striping.py checks the reference buyer's streams and receipts"
    ),
    "§9.2: The seller MUST check the envelope as in": (
        *("9.2/1", "9.2/2", "9.2/3", "9.2/5", "9.2/6", "9.2/7", "9.2/8", "9.7/3"),
    ),
    "§9.2: The buyer MUST verify CHUNK_LIST against the quote's": (
        "untestable: a rule for buyers; the suite's own client keeps it (spec/_data.py)"
    ),
    "§9.3: Because a completed UCX send does not mean": (
        "untestable: the suite speaks the TCP data channel only"
    ),
    "§9.4: The seller MUST NOT send another chunk before": ("9.4/2", "9.4/3", "9.4/4"),
    "§9.6: A seller MUST seal the stream of every": ("9.6/1",),
    "§9.6: A buyer MUST NOT accept a quote for": (
        "untestable: a rule for buyers; tests/test_market.py checks the reference buyer's "
        "refusal of a private quote without kx"
    ),
    "§9.6: A buyer that agreed a key MUST treat": (
        "untestable: a rule for buyers; the suite's own client keeps it (spec/_data.py), "
        "tests/test_transport.py serves the reference buyer a clear stream"
    ),
    "§10.1: A counter above the price of the QUOTE": ("10.1/4",),
    "§10.1: At most 3 counter-offers per QUOTE_REQUEST, counted along": ("10.1/3",),
    "§10.3: Every node MUST offer tcp.": ("10.1/1",),
    "§10.4: A seller keeps every QUOTE it signs, until": (
        "10.4/1",
        "10.4/3",
        "10.4/4",
    ),
    "§10.5: A seller MUST check, before it sends a": (
        "untestable: needs a credit limit the suite cannot set on the target; "
        "tests/test_ledger.py and tests/test_market.py"
    ),
    "§10.5: A seller therefore MUST also bound the bytes": (
        "untestable: needs fresh identities from chosen networks and allowances the suite "
        "cannot set on the target; tests/test_paid.py runs ten against a live seller"
    ),
    "§10.6: A seller MUST refuse a RECEIPT with UNKNOWN_TRANSFER": ("10.4/5", "10.6/1", "10.6/4"),
    "§10.6: A node MUST NOT report a deal as": (
        "untestable: the ledger is not visible on the wire; tests/test_ledger.py kills its "
        "writer mid-receipt"
    ),
    "§10.7: A deal whose life ends without the seller's": (
        "untestable: the ledger is not visible on the wire; tests/test_paid.py kills a buyer "
        "mid-stream, tests/test_deal_life.py lets a token's life pass and restarts a seller"
    ),
    "§10.7: A seller MUST NOT stream a deal that": (
        "untestable: the token's life is 90 s; tests/test_deal_life.py"
    ),
    "§11: Implementations MUST accept codes they do not know": ("6.5/5",),
    "§12.3: Anything not meant for every node MUST be": (
        "untestable: a rule for operators, not for implementations"
    ),
    "§12.4: The namespace secret authorises matching and proving membership;": (
        "untestable: a rule for operators, not for implementations"
    ),
    "§12.6: Nodes SHOULD rate-limit each peer's messages and gossip,": (
        "untestable: its MUST (a destination no larger than the buyer's bound) is a rule for "
        "buyers; the rate limit is case 12.6/3 (a SHOULD case)"
    ),
    "§12.6: Rate limits are flow control, not blame: a": ("12.6/2",),
    "§13.2: Forgetting MUST NOT resurrect: a node that forgets": (
        "untestable: forcing a target to forget needs a flood past its configured totals, "
        "which a black-box suite cannot size; tests/test_index.py and tests/test_floods.py "
        "force it on the reference node"
    ),
    "§12.6: Every resource a peer can make a node": (
        "untestable: budgets are the target's own settings; tests/test_attacks.py fills each "
        "one on the reference node"
    ),
    "§8.19: SHOULD send ACCUSE to its peers, and MUST": (
        "untestable: a rule for buyers; tests/test_fraud.py has the reference buyer's node "
        "serve its evidence to a node that convicts from it"
    ),
    "§8.19: If it convicts, it MUST drop every advertisement": (
        "untestable: a target holding weights for the suite's fingerprint cannot be asked of "
        "a stranger's implementation; tests/test_fraud.py convicts at a third node that never "
        "bought, and checks its ads and peers"
    ),
    "§8.19: If the evidence binds nobody or the weights": (
        "untestable: as above, it needs the weights; tests/test_fraud.py has a false accuser "
        "convicted and its accusation not relayed"
    ),
    "§8.19: that holds no such weights MUST NOT act": ("8.19/1",),
    "§12.2: - Layout. Every field of an ADVERTISE or": (
        "untestable: a rule for buyers; tests/test_verify.py and tests/test_vllm.py sell a "
        "float16 layout under a float32 fingerprint to the reference buyer and engine"
    ),
    '§14: messages.json — frames a receiver MUST accept ("expected":': (
        "vectors: every case of messages.json"
    ),
    '§14: invalid.json — frames a receiver MUST reject ("expected":': (
        "vectors: every case of invalid.json"
    ),
    "§8.22: From then on it MUST NOT send any": (
        "untestable: the suite cannot make its target leave; tests/test_leave.py stops a "
        "node with SIGTERM and checks that its peers see no sign of life from it"
    ),
    "§8.22: A receiver MUST ignore a LEAVE whose inc": ("8.22/2",),
    "§8.22: Else it MUST mark the sender dead at": ("8.22/1",),
    "§10.2: A seller MUST check a QUOTE_REQUEST in this": ("10.2/5", "10.2/1"),
    "§5.3: Ed25519 libraries disagree at the edges, and a": (
        "vectors: sig/s-not-canonical, sig/small-order-key, sig/non-canonical-key"
    ),
}
