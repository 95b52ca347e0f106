"""What torchfast.transformers.patch did: each part replaced (and by which mechanism) and each part left
as it was (and why), as a table and as plain data, in the style of torchfast.optimize's report."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torchfast._optimize._report import _columns


@dataclass(frozen=True)
class Patched:
    """One module whose forward now runs torchfast: `how` is "kernels.kernelize (hook 'RMSNorm')" for
    the parts transformers' kernel hooks cover, "instance forward" for those torchfast binds itself
    ("instance forward (module-level apply_rotary_pos_emb)": a copy of the class's forward that calls
    torchfast's rotary, bound to the instance)."""

    name: str
    part: str
    old: str
    how: str
    new: str


@dataclass(frozen=True)
class LeftAsIs:
    """A part that still runs transformers' own code; `reason` says why."""

    name: str
    part: str
    old: str
    reason: str


@dataclass
class PatchReport:
    """The result of torchfast.transformers.patch. `str(report)` is `report.table()`: rows of the same
    part in every layer are shown once, with `*` for the layer index and the count."""

    model: str = ""
    kernels: str = ""
    replaced: list[Patched] = field(default_factory=list)
    left_alone: list[LeftAsIs] = field(default_factory=list)

    def parts(self) -> set[str]:
        """The parts (rms_norm, layer_norm, mlp, rope, loss) replaced at least once."""
        return {r.part for r in self.replaced}

    def to_dict(self) -> dict:
        """Plain data (lists of dicts, strings), e.g. for json.dumps."""
        return {"model": self.model, "kernels": self.kernels,
                "replaced": [asdict(r) for r in self.replaced],
                "left_alone": [asdict(s) for s in self.left_alone]}

    def table(self) -> str:
        head = (f"torchfast.transformers.patch({self.model}): {len(self.replaced)} modules replaced, "
                f"{len(self.left_alone)} parts left as they are; {self.kernels}")
        lines = [head]
        if self.replaced:
            rows = _grouped([(r.name, (r.part, r.old, r.how, r.new)) for r in self.replaced])
            lines += _columns(["replaced", "part", "old", "how", "new"], rows)
        if self.left_alone:
            rows = _grouped([(s.name, (s.part, s.old, s.reason)) for s in self.left_alone])
            lines += _columns(["left as is", "part", "old", "reason"], rows)
        return "\n".join(lines)

    __str__ = table


def _grouped(items: list[tuple[str, tuple[str, ...]]]) -> list[list[str]]:
    """Rows keyed by the name with layer indices as `*`, in first-seen order, with a count when > 1."""
    groups: dict[tuple, list[str]] = {}
    for name, cols in items:
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", name), cols)
        groups.setdefault(key, []).append(name)
    rows = []
    for (pattern, cols), names in groups.items():
        label = pattern if len(names) == 1 else f"{pattern} (x{len(names)})"
        rows.append([label or "(model)", *cols])
    return rows
