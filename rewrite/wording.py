"""Refusal wording that fits the kind of model: the fix for a torch module is not the fix for an ONNX file.

Importers record their frontend in `graph.meta["frontend"]` ("fx" or "onnx"); a rule asks here
for the phrase instead of writing torch advice into a message an ONNX user reads.
"""
from __future__ import annotations

from .ir import Node

_BATCH_STATISTICS = {
    "fx": "(training mode or track_running_stats=False); call model.eval() first",
    "onnx": "(training_mode=1); export the model for inference (torch.onnx.export(..., "
            "training=TrainingMode.EVAL)) or set training_mode to 0",
}
_BATCH_STATISTICS_DEFAULT = "(training mode); put the model in inference mode first"


def frontend_of(node: Node) -> str | None:
    graph = getattr(node, "graph", None)
    return None if graph is None else graph.meta.get("frontend")


def batch_statistics_fix(node: Node) -> str:
    """Why a BN uses batch statistics and what to do about it, in the terms of the model's frontend."""
    return _BATCH_STATISTICS.get(frontend_of(node), _BATCH_STATISTICS_DEFAULT)
