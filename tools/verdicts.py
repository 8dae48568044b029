"""Verdict rows of the record checker and their table (docs/rules.md "Verdicts").

FAIL: a rule is broken (size, time beyond tolerance, network, artifact not what the log says, score better than the
logs). WARN: metadata defects and rule risks. INFO: what was measured and how. PASS: a rule checked and held.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("PASS", "INFO", "WARN", "FAIL")


@dataclass(frozen=True)
class Row:
    check: str
    seed: str
    value: str
    limit: str
    status: str  # one of LEVELS

    def __post_init__(self) -> None:
        if self.status not in LEVELS:
            raise ValueError(f"status {self.status!r} not in {LEVELS}")


def passes(ok: bool, fail: str = "FAIL") -> str:
    return "PASS" if ok else fail


def counts(rows: list[Row]) -> dict[str, int]:
    return {level: sum(r.status == level for r in rows) for level in LEVELS}


def verdict(rows: list[Row]) -> str:
    """The folder's verdict: FAIL if any row fails, else WARN if any warns, else PASS (INFO rows are neutral)."""
    return "FAIL" if any(r.status == "FAIL" for r in rows) else "WARN" if any(r.status == "WARN" for r in rows) else "PASS"


def format_rows(rows: list[Row]) -> str:
    head = Row("check", "seed", "value", "limit", "PASS")
    widths = [min(max(len(getattr(r, f)) for r in [head, *rows]), cap)
              for f, cap in (("check", 22), ("seed", 6), ("value", 200), ("limit", 40), ("status", 7))]
    lines = []
    for r in [head, *rows]:
        cells = [r.check, r.seed, r.value, r.limit, "verdict" if r is head else r.status]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = counts(rows)
    lines.append(f"{verdict(rows)}: {c['FAIL']} violation(s), {c['WARN']} warning(s) in {len(rows)} checks")
    return "\n".join(lines)
