"""The examples run end to end (each checks its own outputs and raises if they differ)."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(path)])  # the examples parse their own command line
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()
