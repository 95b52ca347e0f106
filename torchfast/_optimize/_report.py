"""What torchfast.optimize did: every replacement and every candidate left alone, as a table and a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REASONS = ("did not match", "unsupported configuration", "excluded", "shared module")


@dataclass(frozen=True)
class Replacement:
    """One replacement: `name` is the qualified module name (two joined by " + " for a fused pair)."""

    name: str
    rule: str
    old: str
    new: str


@dataclass(frozen=True)
class LeftAlone:
    """A candidate that was not replaced; `reason` is one of REASONS, `detail` says what exactly."""

    name: str
    rule: str
    old: str
    reason: str
    detail: str


@dataclass
class OptimizeReport:
    """The result of torchfast.optimize besides the model. `str(report)` is `report.table()`.

    verification: "passed", "failed", "skipped" or "off"; verification_detail says on what inputs, the
    largest differences seen, or why it was skipped."""

    replaced: list[Replacement] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    verification: str = "off"
    verification_detail: str = ""

    def to_dict(self) -> dict:
        """Plain data (lists of dicts, strings), e.g. for json.dumps."""
        return {
            "replaced": [asdict(r) for r in self.replaced],
            "left_alone": [asdict(s) for s in self.left_alone],
            "verification": {"status": self.verification, "detail": self.verification_detail},
        }

    def table(self) -> str:
        lines = [
            f"torchfast.optimize: {len(self.replaced)} replaced, {len(self.left_alone)} left alone; "
            f"verification {self.verification}"
            + (f" ({self.verification_detail})" if self.verification_detail else "")
        ]
        if self.replaced:
            lines += _columns(["replaced", "old", "new"], [[r.name, r.old, r.new] for r in self.replaced])
        if self.left_alone:
            lines += _columns(
                ["left alone", "old", "reason"],
                [[s.name, s.old, f"{s.reason}: {s.detail}"] for s in self.left_alone],
            )
        return "\n".join(lines)

    __str__ = table


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return [fmt.format(*header).rstrip()] + [fmt.format(*r) for r in rows]
