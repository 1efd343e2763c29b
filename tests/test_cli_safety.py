"""The `rewrite` command on untrusted and malformed input: nothing runs, nothing is written, the error names the place."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from rewrite.cli import EXIT_BAD_INPUT, main
from rewrite.demo import default_model
from rewrite.model_files import looks_like_onnx
from tests.test_cli import export_demo_onnx


class WritesMarker:
    """A pickle payload: unpickling it calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("as_module", [False, True])
def test_a_pickle_payload_is_not_run(tmp_path, capsys, as_module):
    marker, payload = tmp_path / "marker", tmp_path / "model.pt"
    obj = {"model": WritesMarker(marker)} if as_module else WritesMarker(marker)
    torch.save(obj, payload)
    assert not marker.exists()
    assert main(["apply", str(payload), "-o", str(tmp_path / "out.pt")]) == EXIT_BAD_INPUT
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()
    err = capsys.readouterr().err
    assert "model.pt" in err and "--trust-pickle" in err and "package.module:callable" in err


def test_a_legacy_pickle_payload_is_not_run(tmp_path):
    marker, payload = tmp_path / "marker", tmp_path / "model.pth"
    with open(payload, "wb") as f:
        pickle.dump(WritesMarker(marker), f, protocol=2)
    assert main(["apply", str(payload), "--dry-run"]) == EXIT_BAD_INPUT
    assert not marker.exists()


def test_a_pickled_module_loads_only_with_trust_pickle(tmp_path, capsys):
    saved = tmp_path / "model.pt"
    torch.save(default_model(), saved)
    assert main(["apply", str(saved), "--input-shape", "1,3,16,16", "--dry-run"]) == EXIT_BAD_INPUT
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["apply", str(saved), "--input-shape", "1,3,16,16", "--dry-run", "--trust-pickle"]) == 0
    assert main(["apply", str(saved), "--input-shape", "1,3,16,16", "--dry-run", "--unsafe-load"]) == 0


def test_trust_pickle_help_says_what_it_means(capsys):
    with pytest.raises(SystemExit):
        main(["apply", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in help_text and "runs code" in help_text and "weights_only=True" in help_text


def test_a_state_dict_gets_a_hint(tmp_path, capsys):
    saved = tmp_path / "weights.pt"
    torch.save(default_model().state_dict(), saved)
    assert main(["apply", str(saved), "--dry-run"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "weights.pt" in err and "state_dict" in err and "load_state_dict" in err


@pytest.mark.parametrize("name", ["MODEL.ONNX", "model.Onnx", "model.bin"])
def test_onnx_by_upper_case_suffix_or_by_content(tmp_path, capsys, name):
    src = tmp_path / name
    export_demo_onnx(src)
    out = tmp_path / "OUT.ONNX"
    assert main(["apply", str(src), "--passes", "fold_bn", "-o", str(out)]) == 0
    import onnx

    onnx.checker.check_model(onnx.load(str(out)))
    assert "frontend" not in capsys.readouterr().err


def test_upper_case_torch_suffix(tmp_path):
    out = tmp_path / "MODEL.PT"
    assert main(["apply", "rewrite.demo:default_model", "--input-shape", "1,3,16,16", "-o", str(out)]) == 0
    assert isinstance(torch.load(out, weights_only=False), torch.nn.Module)


def test_content_sniffing():
    import onnx

    from rewrite.frontends import is_onnx_model

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert looks_like_onnx(model.SerializeToString())
    assert not looks_like_onnx(b"PK\x03\x04....")  # a torch zip
    assert not looks_like_onnx(b"\x80\x02}q\x00.")  # a pickle
    assert not looks_like_onnx(b"not a model")
    assert is_onnx_model("missing.ONNX") and not is_onnx_model("missing.pt")
