"""The report `apply` returns: per pass, what was rewritten, what was refused and why, and checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .pass_manager import PassResult
from .verify import VerifyResult


MAX_SUMMARY_LINES = 8  # per pass in the printed report; to_dict keeps them all


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
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "passes": [
                {
                    "name": p.name,
                    "seconds": p.seconds,
                    "counts": dict(p.result.counts),
                    "rewritten": [{"rule": r.rule, "nodes": list(r.nodes)} for r in p.result.rewritten],
                    "refused": [{"rule": r.rule, "node": r.node, "reason": r.reason} for r in p.result.refused],
                    "verification": None if p.verification is None else {
                        "ok": p.verification.ok, "max_abs": p.verification.max_abs,
                        "max_rel": p.verification.max_rel, "tolerance": p.verification.tolerance},
                    "notes": {k: v for k, v in p.result.notes.items() if isinstance(v, (int, float, str, list, dict))},
                }
                for p in self.passes
            ],
        }

    def __str__(self) -> str:
        lines = [f"{'pass':<18} {'rule':<34} {'count':>5}"]
        lines.append("-" * len(lines[0]))
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
        refused = [(p.name, r) for p in self.passes for r in p.result.refused]
        if refused:
            lines.append("")
            lines.append(f"refused ({len(refused)}):")
            for name, r in refused:
                lines.append(f"  {name}/{r.rule} at {r.node}: {r.reason}")
        if self.nodes_before:
            changed = sorted(set(self.nodes_before) | set(self.nodes_after))
            diffs = [f"{k} {self.nodes_before.get(k, 0)}->{self.nodes_after.get(k, 0)}" for k in changed
                     if self.nodes_before.get(k, 0) != self.nodes_after.get(k, 0)]
            lines.append("")
            lines.append("ops: " + (", ".join(diffs) if diffs else "unchanged"))
        return "\n".join(lines)
