"""`rewrite expand`: writes a training-ready expanded model, checks the round trip, exits 2 on bad input."""
import json

import pytest
import torch

import rewrite
from rewrite.cli import main
from rewrite.demo import default_model


@pytest.mark.parametrize("scheme", [["acb"], ["mobileone", "--k", "2"]])
def test_expand_writes_a_training_ready_model_whose_round_trip_holds(tmp_path, capsys, scheme):
    out, report = tmp_path / "wide.pt", tmp_path / "report.json"
    code = main(["expand", "rewrite.demo:default_model", "--scheme", *scheme, "-o", str(out), "--verify",
                 "--input-shape", "2,3,16,16", "--report-json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "the round trip (contracted vs expanded): ok" in printed and "preserving init" in printed
    wide = torch.load(out, weights_only=False)
    assert wide.training
    x = torch.randn(2, 3, 16, 16)
    assert rewrite.verify(default_model(), wide.eval(), x).ok
    data = json.loads(report.read_text())
    assert data["expanded"] and all(s["reason"] for s in data["skipped"])
    # the demo's own RepVGG block is already a sum of branches of one input: its convs are left, with the reason
    assert any("another branch of its input" in s["reason"] for s in data["skipped"])


@pytest.mark.parametrize("argv, text", [
    (["expand", "no.such:model"], "cannot build the model"),
    (["expand", "rewrite.demo:default_model", "--where", "[", "--input-shape", "1,3,8,8", "--k", "0",
      "--scheme", "mobileone"], "positive integer"),
    (["expand", "rewrite.demo:default_model", "--scheme", "acb", "--k", "2"], "--k is an option of the mobileone"),
    (["expand", "model.onnx"], "no such file"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, text):
    assert main(argv + ["-o", str(tmp_path / "x.pt")]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
