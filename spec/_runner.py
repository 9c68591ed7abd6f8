"""Running the suite: against a live target, or the vectors through an adapter program.

    kvx conformance --target tcp://HOST:PORT --target-key PUBKEYHEX [--json OUT] [--strict]
    kvx conformance --vectors-only --adapter "COMMAND" [--json OUT]
    kvx conformance --dry-run

Every MUST case must pass for the exit code to be 0; SHOULD cases count only under
--strict. Each case uses a fresh identity, so one case's penalties never bias the next.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from importlib.resources import files
from typing import Any

import zmq
from rich.console import Console
from rich.table import Table

from kvx.protocol import ConfigError

from ._cases import CASES, Case
from ._peer import Failed, Session, Skipped


def run_case(ctx: zmq.Context, case: Case, target: str, key: bytes) -> tuple[str, str]:
    session = Session(ctx, target, key)
    try:
        case.run(session)
    except Failed as exc:
        return "fail", str(exc)
    except Skipped as exc:
        return "skip", str(exc)
    except Exception as exc:  # the target broke the case in a way it did not foresee
        return "fail", f"{type(exc).__name__}: {exc}"
    finally:
        session.close()
    return "pass", ""


def run_live(target: str, key: bytes, only: list[str] | None = None) -> list[dict[str, Any]]:
    ctx = zmq.Context()
    try:
        greeting = Session(ctx, target, key)  # a target that answers nothing fails fast
        try:
            greeting.hello()
        except Failed as exc:
            raise ConfigError(f"the target at {target} answers no HELLO: {exc}") from None
        finally:
            greeting.close()
        results = []
        for case in CASES:
            if only and case.id not in only:
                continue
            result, detail = run_case(ctx, case, target, key)
            results.append(
                {
                    "id": case.id,
                    "section": case.section,
                    "level": case.level,
                    "requirement": case.requirement,
                    "result": result,
                    "detail": detail,
                }
            )
        return results
    finally:
        ctx.term()


def _vectors(name: str) -> list[dict[str, Any]]:
    return json.loads((files("kvx.conformance") / "vectors" / name).read_text())["cases"]


def run_vectors(adapter: str) -> list[dict[str, Any]]:
    """Feed every frame vector to an adapter (spec/README.md) and compare its verdicts."""
    proc = subprocess.Popen(
        shlex.split(adapter), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    results = []
    try:
        for name in ("messages.json", "invalid.json"):
            for vector in _vectors(name):
                request = {k: vector[k] for k in ("frame", "frame_fill", "context") if k in vector}
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("the adapter stopped answering")
                got = json.loads(line)
                if vector["expected"] == "valid":
                    ok = (
                        got.get("result") == "valid"
                        and got.get("type") == vector["type"]
                        and got.get("body") == vector["body"]
                    )
                else:
                    ok = got.get("result") == "reject" and got.get("code") == vector["code"]
                results.append(
                    {
                        "id": f"vector/{vector['id']}",
                        "section": "14",
                        "level": "MUST",
                        "requirement": vector["description"],
                        "result": "pass" if ok else "fail",
                        "detail": "" if ok else f"adapter said {got}",
                    }
                )
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    return results


def report(results: list[dict[str, Any]], strict: bool, console: Console) -> int:
    table = Table(title="kvx conformance")
    for column in ("case", "level", "result", "requirement / detail"):
        table.add_column(column)
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}
    for r in results:
        text = r["requirement"] + (f"\n[dim]{r['detail']}[/dim]" if r["detail"] else "")
        table.add_row(r["id"], r["level"], f"[{colours[r['result']]}]{r['result']}[/]", text)
    console.print(table)
    counts = {k: sum(r["result"] == k for r in results) for k in ("pass", "fail", "skip")}
    failing = [r for r in results if r["result"] == "fail" and (strict or r["level"] == "MUST")]
    console.print(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; "
        f"{len(failing)} failing {'requirements' if strict else 'MUST requirements'}"
    )
    return 1 if failing else 0


def dry_run(console: Console) -> None:
    for case in CASES:
        console.print(f"{case.id:<8} {case.level:<6} {case.requirement}")
