"""The `rewrite` command: output files, exit codes, and nothing half-written."""
import os
import subprocess
import sys

import pytest
import torch

from rewrite import P, rule
from rewrite.cli import main
from rewrite.demo import default_model
from rewrite.pass_manager import RulePass, register_pass, _REGISTRY


def test_apply_writes_a_loadable_equivalent_model(tmp_path, capsys):
    out = tmp_path / "demo.pt"
    code = main(["apply", "rewrite.demo:default_model", "--passes", "fold_bn,cleanup", "-o", str(out), "--verify",
                 "--input-shape", "2,3,32,32", "--report-json", str(tmp_path / "report.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fold_bn_into_conv" in printed and "verified: ok" in printed
    fused = torch.load(out, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    ref = default_model()(x)
    assert (fused(x) - ref).abs().max() / ref.abs().max() <= 1e-5
    assert "fold_bn" in (tmp_path / "report.json").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_saved_model_can_be_rewritten_again(tmp_path):
    first = tmp_path / "a.pt"
    assert main(["apply", "rewrite.demo:default_model", "-o", str(first)]) == 0
    assert main(["apply", str(first), "--passes", "cleanup", "-o", str(tmp_path / "b.pt"), "--trust-pickle"]) == 0
    assert (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("argv", [
    ["apply", "no_such_package.models:net", "--dry-run"],
    ["apply", "rewrite.demo:default_model", "--passes", "no_such_pass", "--dry-run"],
    ["apply", "/nonexistent/model.pt", "--dry-run"],
    ["apply", "rewrite.demo:default_model", "--input-shape", "1,x,3", "--dry-run"],
])
def test_bad_input_exits_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_not_a_model_file_exits_2(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle")
    assert main(["apply", str(junk), "-o", str(tmp_path / "out.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


@rule(P.op("relu", P.any("x")))
def forget_relu(ctx, x):
    """A deliberately wrong rule, to see verification fail."""
    return x


def test_failed_verification_exits_3_and_writes_nothing(tmp_path, capsys):
    register_pass(RulePass("forget_relu", [forget_relu], "wrong on purpose"))
    try:
        out = tmp_path / "never.pt"
        assert main(["apply", "rewrite.demo:default_model", "--passes", "forget_relu", "-o", str(out), "--verify",
                     "--input-shape", "1,3,32,32"]) == 3
        assert not out.exists() and list(tmp_path.iterdir()) == []
        assert "pass forget_relu" in capsys.readouterr().err
    finally:
        _REGISTRY.pop("forget_relu")


def test_console_script_lists_passes():
    exe = os.path.join(os.path.dirname(sys.executable), "rewrite")
    done = subprocess.run([exe, "passes"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "fold_bn" in done.stdout and "cleanup" in done.stdout


def export_demo_onnx(path):
    model = default_model()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def test_apply_on_an_onnx_file(tmp_path, capsys):
    import hashlib
    import onnx

    src, out = tmp_path / "demo.onnx", tmp_path / "demo.fused.onnx"
    export_demo_onnx(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main(["apply", str(src), "--passes", "fold_bn,cleanup", "-o", str(out), "--verify"]) == 0
    assert "verified: ok" in capsys.readouterr().out
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("BatchNormalization") < [n.op_type for n in onnx.load(str(src)).graph.node].count(
        "BatchNormalization")


def test_truncated_onnx_file_exits_2_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "demo.onnx"
    export_demo_onnx(src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.onnx"
    assert main(["apply", str(src), "-o", str(out)]) == 2
    assert "demo.onnx" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_exits_2_naming_the_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the output file should go
    assert main(["apply", "rewrite.demo:default_model", "-o", str(target)]) == 2
    assert "taken" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and not any(target.iterdir())


def test_capture_flag_chooses_how_a_torch_model_is_captured(tmp_path, capsys):
    # written_blocks is on sys.path (pytest's rootdir conftest); ShapeChecked branches on a size, so fx refuses it
    common = ["apply", "written_blocks:ShapeChecked", "--passes", "fold_bn", "--input-shape", "1,3,16,16"]
    assert main(common + ["--dry-run", "--capture", "fx"]) == 2
    assert "cannot trace" in capsys.readouterr().err
    out = tmp_path / "m.pt"
    assert main(common + ["-o", str(out), "--verify"]) == 0  # auto: falls back to torch.export, and says so
    printed = capsys.readouterr().out
    assert "capture:" in printed and "export" in printed and "verified: ok" in printed
    import onnx
    from onnx_builders import conv_bn_model

    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    assert main(["apply", str(tmp_path / "m.onnx"), "--capture", "export", "--dry-run"]) == 2
    assert "--capture is for torch models" in capsys.readouterr().err
