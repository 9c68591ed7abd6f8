"""Every MUST of spec/PROTOCOL.md is tested by a conformance case, by the vectors, or is
listed as untestable black-box with the reason (spec/_musts.py) — and nothing else is."""

import re
from pathlib import Path

from kvx.conformance import CASES
from kvx.conformance._musts import MUSTS

SPEC = Path(__file__).parent.parent / "spec" / "PROTOCOL.md"


def musts(text: str) -> list[str]:
    """'§SECTION: first eight words' of each sentence, list item or table row with MUST."""
    section, out = "0", []
    for block in re.split(r"\n\s*\n", text):
        if m := re.match(r"## (\d+)\.", block):
            section = m.group(1)
        if m := re.match(r"(\d+\.\d+[a-z]?)\. (\*\*[^*]*\*\*)?", block):
            section, block = m.group(1), block[m.end() :]
        if block.lstrip().startswith("|"):
            parts = block.split("\n")
        else:
            flat = " ".join(line.strip() for line in block.split("\n"))
            parts = re.split(r"(?<=[.:)])\s+(?=[A-Z`(])|\s+- ", flat)
        for part in parts:
            if re.search(r"\bMUST\b", part) and "key words MUST" not in part:
                words = re.sub(r"[*`|]", "", part).split()
                out.append(f"§{section}: " + " ".join(words[:8]))
    return out


def test_every_must_of_the_spec_is_covered_and_nothing_else_is_listed():
    found = musts(SPEC.read_text())
    assert len(found) == len(set(found)), "two MUST sentences start alike: reword one"
    missing = [m for m in found if m not in MUSTS]
    stale = [m for m in MUSTS if m not in found]
    assert not missing, f"MUSTs with no case and no reason in spec/_musts.py: {missing}"
    assert not stale, f"spec/_musts.py lists what the spec no longer says: {stale}"


def test_each_entry_names_must_cases_or_a_reason():
    levels = {case.id: case.level for case in CASES}
    for must, covered in MUSTS.items():
        if isinstance(covered, str):
            kind, _, reason = covered.partition(": ")
            assert kind in ("untestable", "vectors") and len(reason) > 10, must
            continue
        for case_id in covered:
            assert levels.get(case_id) == "MUST", f"{must}: {case_id} is not a MUST case"


def test_there_are_at_least_forty_must_cases_each_quoting_its_section():
    must_cases = [case for case in CASES if case.level == "MUST"]
    assert len(must_cases) >= 40
    for case in CASES:
        section = case.id.split("/")[0]
        assert re.fullmatch(r"\d+(\.\d+[a-z]?)?", section) and case.requirement, case.id
        assert f"\n{section}. " in SPEC.read_text() or f"## {section}. " in SPEC.read_text()
