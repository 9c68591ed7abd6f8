"""The seller's quote states (p2p/_negotiation.py) and the buyer's steps (p2p/_buying.py)
are the tables of spec §10.4, row for row."""

import re
from pathlib import Path

import pytest

from kvx.p2p._buying import TRANSITIONS, Deal, Step
from kvx.p2p._negotiation import Phase, advance
from kvx.protocol import ErrorCode, LocalProtocolError, MessageType, RemoteProtocolError

SPEC = Path(__file__).parent.parent / "spec" / "PROTOCOL.md"


def spec_tables() -> list[list[str]]:
    """The rows of each table of §10.4, header first."""
    text = SPEC.read_text()
    section = text[text.index("10.4. **Quote states.**") : text.index("10.5. **Credit.**")]
    blocks = [b.strip().splitlines() for b in section.split("\n\n")]
    return [
        [row for row in b if not row.startswith("|---")] for b in blocks if b and b[0][:2] == "| "
    ]


def spec_table() -> dict[tuple[str, str], str]:
    """(the quote's phase, message) -> '→ PHASE' or an error code name, from §10.4."""
    rows = spec_tables()[0]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        phase = cells[0].split(":")[0]
        for message, cell in zip(header[1:], cells[1:], strict=True):
            found = re.match(r"→ (\w+)|`(\w+)`", cell)
            assert found, cell
            table[(phase, message)] = found.group(1) or found.group(2)
    return table


def node_answer(phase: Phase | None, message: MessageType) -> str:
    try:
        return advance(phase, message).name
    except RemoteProtocolError as exc:
        return exc.code.name


def test_the_spec_table_is_the_nodes():
    table = spec_table()
    phases = {"not held": None, **{p.name: p for p in Phase}}
    assert {phase for phase, _ in table} == set(phases)
    for (phase, message), expected in table.items():
        assert node_answer(phases[phase], MessageType[message]) == expected, (phase, message)


@pytest.mark.parametrize("phase", [Phase.ACCEPTED, Phase.REJECTED])
@pytest.mark.parametrize("message", [MessageType.ACCEPT, MessageType.REJECT])
def test_a_settled_quote_takes_nothing_more(phase, message):
    with pytest.raises(RemoteProtocolError) as err:
        advance(phase, message)
    assert err.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_the_buyers_steps_are_the_spec_table():
    """'fails' in the spec is an ERROR received or a local failure: MessageType.ERROR."""
    table = {}
    for row in spec_tables()[1][1:]:
        step, on, after = (cell.strip() for cell in row.strip("|").split("|"))
        message = "ERROR" if on == "fails" else on.split()[0]
        table[(Step[step.split()[0]], MessageType[message])] = Step[after.split()[0]]
    assert table == TRANSITIONS


def test_a_buyer_never_takes_a_step_the_table_does_not_list():
    for step in Step:
        for message in MessageType:
            deal = Deal()
            deal.step = step
            if (step, message) in TRANSITIONS:
                assert deal.advance(message) == TRANSITIONS[(step, message)]
            else:
                with pytest.raises(LocalProtocolError):
                    deal.advance(message)
    assert not any(step in (Step.PAID, Step.FAILED) for step, _ in TRANSITIONS)  # final
