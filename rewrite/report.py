"""The report `apply` returns: per pass, what was rewritten, what was refused and why, and checks."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .pass_manager import PassResult, Refused
from .verify import VerifyResult


MAX_SUMMARY_LINES = 8  # per pass in the printed report; to_dict keeps them all
EXAMPLES = 3  # sites named per group of refusals in the printed table


def reason_template(refusal: Refused) -> str:
    """The refusal's reason with the site's own names taken out, so like refusals read alike."""
    text = refusal.reason
    names = sorted({refusal.node, *refusal.modules, *refusal.node_names} - {""}, key=len, reverse=True)
    for name in names:  # whole names only: a module called "g" must not eat the g of "group"
        text = re.sub(rf"(?<![\w.]){re.escape(name)}(?!\w)", "<site>", text)
    text = re.sub(r"\b[A-Za-z_]\w*(?:\.\w+)+\b", "<module>", text)  # other dotted module paths
    return re.sub(r"(?<=[A-Za-z])_\d+\b", "", text)  # cat_54 -> cat: graph names numbered by fx


def group_refusals(refused: list[Refused]) -> list[tuple[str, str, list[str]]]:
    """(rule, reason template, site labels) per group of like refusals, the largest group first."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in refused:
        groups.setdefault((r.rule, reason_template(r)), []).append(r.node)
    singles = {key: next(r.reason for r in refused if (r.rule, reason_template(r)) == key)
               for key, sites in groups.items() if len(sites) == 1}
    rows = [(rule, singles.get((rule, reason), reason), sites) for (rule, reason), sites in groups.items()]
    return sorted(rows, key=lambda row: -len(row[2]))


@dataclass
class PassReport:
    result: PassResult
    verification: VerifyResult | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.result.name


@dataclass
class Report:
    frontend: str
    passes: list[PassReport] = field(default_factory=list)
    nodes_before: dict[str, int] = field(default_factory=dict)
    nodes_after: dict[str, int] = field(default_factory=dict)
    graph_before: Any = None  # report_html.GraphSnapshot, for to_html()
    graph_after: Any = None
    capture: str = ""  # how a torch model was captured, when it was not plain symbolic_trace
    notes: list[str] = field(default_factory=list)  # from the frontend: what loading the model did

    def to_html(self, title: str = "rewrite report") -> str:
        """One self-contained HTML page (see rewrite.report_html)."""
        from .report_html import to_html

        return to_html(self, title)

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def modified(self) -> bool:
        return any(p.result.modified for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "frontend": self.frontend,
            "capture": self.capture,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "notes": list(self.notes),
            "passes": [
                {
                    "name": p.name,
                    "seconds": p.seconds,
                    "counts": dict(p.result.counts),
                    "rewritten": [{"rule": r.rule, "nodes": list(r.nodes), "node_names": list(r.node_names),
                                   "modules": list(r.modules)} for r in p.result.rewritten],
                    "refused": [{"rule": r.rule, "node": r.node, "reason": r.reason, "node_names": list(r.node_names),
                                 "modules": list(r.modules)} for r in p.result.refused],
                    "refused_by_reason": [{"rule": rule, "reason": reason, "count": len(sites), "sites": sites}
                                          for rule, reason, sites in group_refusals(p.result.refused)],
                    "verification": None if p.verification is None else p.verification.to_dict(),
                    "notes": {k: v for k, v in p.result.notes.items() if isinstance(v, (int, float, str, list, dict))},
                }
                for p in self.passes
            ],
        }

    def __str__(self) -> str:
        lines = [f"capture: {self.capture}", ""] if self.capture else []
        lines.append(f"{'pass':<18} {'rule':<34} {'count':>5}")
        lines.append("-" * len(lines[-1]))
        for p in self.passes:
            if not p.result.counts:
                lines.append(f"{p.name:<18} {'(nothing rewritten)':<34} {0:>5}")
            for rule, count in sorted(p.result.counts.items()):
                lines.append(f"{p.name:<18} {rule:<34} {count:>5}")
            if p.verification is not None:
                lines.append(f"{'':<18} verified: {p.verification}")
            summary = p.result.notes.get("summary", [])
            for note in summary[:MAX_SUMMARY_LINES]:
                lines.append(f"{'':<18} {note}")
            if len(summary) > MAX_SUMMARY_LINES:
                lines.append(f"{'':<18} ... {len(summary) - MAX_SUMMARY_LINES} more lines in the JSON report")
        refused = sum(len(p.result.refused) for p in self.passes)
        if refused:
            lines.append("")
            lines.append(f"refused ({refused}), by reason:")
            for p in self.passes:
                for rule, reason, sites in group_refusals(p.result.refused):
                    more = f" and {len(sites) - EXAMPLES} more" if len(sites) > EXAMPLES else ""
                    where = ", ".join(sites[:EXAMPLES]) + more
                    lines.append(f"  {len(sites):>4} x {p.name}/{rule}: {reason}" +
                                 (f"  [{where}]" if len(sites) > 1 else ""))
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        if self.nodes_before:
            changed = sorted(set(self.nodes_before) | set(self.nodes_after))
            diffs = [f"{k} {self.nodes_before.get(k, 0)}->{self.nodes_after.get(k, 0)}" for k in changed
                     if self.nodes_before.get(k, 0) != self.nodes_after.get(k, 0)]
            lines.append("")
            lines.append("ops: " + (", ".join(diffs) if diffs else "unchanged"))
        return "\n".join(lines)
