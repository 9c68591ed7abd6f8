"""Sealing and opening signed envelopes; the receive-side checks in their order."""

import itertools

import pytest

from kvx.protocol import (
    Advertise,
    DataAddress,
    ErrorCode,
    Header,
    Hello,
    KVLayout,
    LocalProtocolError,
    RemoteProtocolError,
    Withdraw,
    encode_envelope,
    parse_envelope,
)
from kvx.trust import Identity, Inbox, Signer, curve_public_key, open_envelope, seal

ALICE = Identity.from_seed(b"\x0a" * 32)
BOB = Identity.from_seed(b"\x0b" * 32)
EVE = Identity.from_seed(b"\x0e" * 32)
HELLO = Hello(ctl="tcp://127.0.0.1:1", data=(DataAddress("tcp", "127.0.0.1:2"),), inc=0)
NOW = 10_000_000
ALICE_CURVE = curve_public_key(ALICE.public_key)


def test_open_returns_what_was_sealed():
    header = Header(iat=NOW, exp=NOW + 1000, seq=5, to=BOB.node_id)
    st = open_envelope(seal(ALICE, HELLO, header))
    assert (st.header, st.message, st.signer, st.signer_id) == (
        header,
        HELLO,
        ALICE.public_key,
        ALICE.node_id,
    )


def test_body_is_not_decoded_before_its_signature_verifies():
    # A forged body that would be INVALID_FIELD is reported as BAD_SIGNATURE: the
    # receiver never looked inside it.
    good = parse_envelope(seal(ALICE, HELLO, Header(iat=NOW, exp=NOW + 1, seq=1, to=BOB.node_id)))
    forged = encode_envelope(good.type, b"\x81\xa3ctl\x05", good.signer, good.signature)
    with pytest.raises(RemoteProtocolError) as err:
        open_envelope(forged)
    assert err.value.code == ErrorCode.BAD_SIGNATURE


def test_a_key_that_is_no_curve_point_is_a_bad_signature():
    good = parse_envelope(seal(ALICE, HELLO, Header(iat=NOW, exp=NOW + 1, seq=1, to=BOB.node_id)))
    for signer in (b"\xff" * 32, b"\x00" * 32):
        with pytest.raises(RemoteProtocolError) as err:
            open_envelope(encode_envelope(good.type, good.body, signer, good.signature))
        assert err.value.code == ErrorCode.BAD_SIGNATURE


def test_signer_sequence_numbers_strictly_increase():
    signer = Signer(ALICE, seqs=itertools.count(100).__next__)
    seqs = [
        open_envelope(signer.seal(HELLO, now_ms=NOW, to=BOB.node_id)).header.seq for _ in range(3)
    ]
    assert seqs == [100, 101, 102]


def test_signer_default_ttl_respects_each_type():
    signer = Signer(ALICE)
    st = open_envelope(signer.seal(HELLO, now_ms=NOW, to=BOB.node_id))
    assert st.header.exp - st.header.iat == 60_000


def test_a_failed_seal_never_lets_a_sequence_number_repeat():
    signer = Signer(ALICE, seqs=itertools.count(1).__next__)
    first = open_envelope(signer.seal(HELLO, now_ms=NOW, to=BOB.node_id)).header.seq
    with pytest.raises(LocalProtocolError):
        signer.seal(HELLO, now_ms=NOW)  # no recipient
    assert open_envelope(signer.seal(HELLO, now_ms=NOW, to=BOB.node_id)).header.seq > first


def test_signers_of_one_identity_share_one_sequence_by_default():
    """Clients of one node in one process never sign two statements with one number."""
    a, b = Signer(ALICE), Signer(ALICE)
    seqs = [open_envelope(s.seal(HELLO, now_ms=NOW, to=BOB.node_id)).header.seq for s in (a, b, a)]
    assert seqs == sorted(set(seqs))


def make_inbox() -> Inbox:
    return Inbox(BOB.node_id)


def test_inbox_accepts_a_direct_statement_from_its_signer():
    frame = Signer(ALICE).seal(HELLO, now_ms=NOW, to=BOB.node_id)
    assert make_inbox().receive(frame, now_ms=NOW, peer_curve_key=ALICE_CURVE).message == HELLO


def test_inbox_refuses_a_statement_for_someone_else():
    frame = Signer(ALICE).seal(HELLO, now_ms=NOW, to=EVE.node_id)
    with pytest.raises(RemoteProtocolError) as err:
        make_inbox().receive(frame, now_ms=NOW, peer_curve_key=ALICE_CURVE)
    assert err.value.code == ErrorCode.WRONG_RECIPIENT


def test_inbox_refuses_a_direct_statement_sent_by_another_peer():
    frame = Signer(ALICE).seal(HELLO, now_ms=NOW, to=BOB.node_id)
    with pytest.raises(RemoteProtocolError) as err:
        make_inbox().receive(frame, now_ms=NOW, peer_curve_key=curve_public_key(EVE.public_key))
    assert err.value.code == ErrorCode.SIGNER_MISMATCH


def test_inbox_accepts_relayed_gossip_from_another_peer():
    ad = Advertise(
        fp=b"\x01" * 32,
        layout=KVLayout("float16", 1, 1, 8, 16),
        blocks=(b"\x02" * 32,),
        root=b"\x03" * 32,
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )
    inbox = make_inbox()
    eve = curve_public_key(EVE.public_key)
    for msg in (ad, Withdraw(ad=1)):
        st = inbox.receive(Signer(ALICE).seal(msg, now_ms=NOW), now_ms=NOW, peer_curve_key=eve)
        assert st.signer == ALICE.public_key


def test_inbox_refuses_the_same_statement_twice():
    frame = Signer(ALICE).seal(HELLO, now_ms=NOW, to=BOB.node_id)
    inbox = make_inbox()
    inbox.receive(frame, now_ms=NOW, peer_curve_key=ALICE_CURVE)
    with pytest.raises(RemoteProtocolError) as err:
        inbox.receive(frame, now_ms=NOW + 1, peer_curve_key=ALICE_CURVE)
    assert err.value.code == ErrorCode.REPLAYED


def test_a_rejected_statement_is_not_remembered():
    # A frame refused for its recipient must not block the signer's sequence number.
    inbox = make_inbox()
    wrong = seal(ALICE, HELLO, Header(iat=NOW, exp=NOW + 10, seq=9, to=EVE.node_id))
    with pytest.raises(RemoteProtocolError):
        inbox.receive(wrong, now_ms=NOW, peer_curve_key=ALICE_CURVE)
    right = seal(ALICE, HELLO, Header(iat=NOW, exp=NOW + 10, seq=9, to=BOB.node_id))
    inbox.receive(right, now_ms=NOW, peer_curve_key=ALICE_CURVE)
