"""The `rewrite` command behaves: fast help, output formats, -o or --dry-run, custom ops, --train, progress, quiet."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewrite.cli import EXIT_BAD_INPUT, EXIT_NOT_VERIFIABLE, main
from rewrite.pass_catalog import BUILTIN_PASSES
from tests.onnx_builders import conv_bn_model

CLI_MODEL = ["rewrite.demo:default_model", "--input-shape", "1,3,16,16"]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["passes"], ["apply", "--help"]])
def test_help_and_passes_do_not_import_torch(argv):
    done = run_python("import sys\nfrom rewrite.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                      "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')" % argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO TORCH")


def test_passes_lists_every_registered_pass_with_its_description(capsys):
    from rewrite.pass_manager import available_passes

    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    registered = {name: p.description for name, p in available_passes().items() if name in BUILTIN_PASSES}
    assert registered == BUILTIN_PASSES  # the torch-free table says what the passes say of themselves
    assert set(BUILTIN_PASSES) >= {"fold_bn", "fuse_branches", "remove_residual", "remove_channels", "cleanup"}
    for name, description in BUILTIN_PASSES.items():
        assert f"{name:<18} {description}" in printed


def test_output_is_required_unless_dry_run(tmp_path, capsys):
    assert main(["apply", *CLI_MODEL]) == EXIT_BAD_INPUT
    assert "-o/--output is required" in capsys.readouterr().err
    assert main(["apply", *CLI_MODEL, "--dry-run", "--report-json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "dry run: nothing written" in printed and "fold_bn_into_conv" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("out_name", ["model.onnx", "model.ONNX", "model.bin"])
def test_a_torch_model_is_not_written_under_another_suffix(tmp_path, capsys, out_name):
    assert main(["apply", *CLI_MODEL, "-o", str(tmp_path / out_name)]) == EXIT_BAD_INPUT
    assert ".pt or .pth" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_model_is_not_written_as_pt(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    assert main(["apply", str(src), "-o", str(tmp_path / "out.pt")]) == EXIT_BAD_INPUT
    assert "an ONNX model is written as .onnx" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_train_with_verify_is_refused_with_the_reason(tmp_path, capsys):
    assert main(["apply", *CLI_MODEL, "--train", "--verify", "-o", str(tmp_path / "o.pt")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--train with --verify" in err and "dropout" in err
    assert list(tmp_path.iterdir()) == []
    assert main(["apply", "torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--train", "--dry-run"]) == 0
    assert "training mode" in capsys.readouterr().out  # without --verify: refusals, with the reason


def with_custom_op(domain: str, op: str) -> onnx.ModelProto:
    model = conv_bn_model()
    model.graph.node[2].output[0] = "r"
    model.graph.node.append(helper.make_node(op, ["r"], ["y"], name="custom", domain=domain))
    model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def test_a_custom_domain_op_onnxruntime_runs_is_verified(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(with_custom_op("com.microsoft", "Gelu"), src)
    assert main(["apply", str(src), "--verify", "-o", str(out)]) == 0
    assert "verified: ok" in capsys.readouterr().out
    ops = [(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node]
    assert ("com.microsoft", "Gelu") in ops and ("", "BatchNormalization") not in ops


def test_a_custom_op_onnxruntime_cannot_run_is_not_verifiable(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(with_custom_op("my.company", "Magic"), src)
    done = subprocess.run([sys.executable, "-m", "rewrite.cli", "apply", str(src), "--verify", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_NOT_VERIFIABLE == 4
    assert "not verifiable" in done.stderr and "my.company:Magic" in done.stderr
    assert "\x1b[" not in done.stderr and "[E:onnxruntime" not in done.stderr  # onnxruntime's own log stays quiet
    assert not out.exists()
    # Without --verify the rewrite is written (the custom op passed through untouched).
    assert main(["apply", str(src), "-o", str(out)]) == 0
    assert ("my.company", "Magic") in [(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node]


def test_progress_bar_only_on_a_terminal_and_not_when_quiet(tmp_path, capsys, monkeypatch):
    assert main(["apply", *CLI_MODEL, "--dry-run", "--verify"]) == 0
    assert "it/s" not in capsys.readouterr().err and "step" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["apply", *CLI_MODEL, "--dry-run", "--verify", "--passes", "fold_bn,cleanup"]) == 0
    captured = capsys.readouterr()
    assert "/4 [" in captured.err and "verify cleanup" in captured.err  # the bar, on stderr: 2 passes, 2 checks
    assert "/4 [" not in captured.out
    assert main(["apply", *CLI_MODEL, "--dry-run", "--verify", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "/2" not in captured.err and "fold_bn_into_conv" not in captured.out


def test_remove_residual_notes_are_summarized_in_print_and_complete_in_json(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["apply", "torchvision.models:resnet18", "--input-shape", "1,3,32,32", "--passes", "remove_residual",
                 "--dry-run", "--report-json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "over 8 sites" in printed and printed.count("most params added") == 3
    assert "5 more sites" in printed
    assert len(printed.splitlines()) < 20
    notes = json.loads(report.read_text())["passes"][0]["notes"]
    assert len(notes["sites"]) == 8 and {s["add"] for s in notes["sites"]} >= {"layer1.0", "layer4.1"}
