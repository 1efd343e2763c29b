"""The README's custom-pass example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_custom_pass_example_runs():
    blocks = python_blocks("Custom rules and passes")
    assert blocks, "the README lost its custom-pass example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["report"]["simplify"].result.modified


def test_pass_catalogue_example_runs_and_says_true():
    blocks = python_blocks("Pass catalogue")
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    deploy, plain = namespace["deploy"], namespace["plain"]
    import torch

    def count(model, cls):
        return sum(isinstance(m, cls) for m in model.modules())

    assert count(deploy, torch.nn.Conv2d) == 22 and count(deploy, torch.nn.BatchNorm2d) == 0
    assert count(plain, torch.nn.Conv2d) == 17 and "add" not in plain.code


def test_user_op_example_runs():
    blocks = python_blocks("Custom rules and passes")
    assert len(blocks) >= 2, "the README lost its user-op example"
    namespace: dict = {}
    try:
        exec(compile(blocks[1], "README.md", "exec"), namespace)
    finally:
        from rewrite.ir import ops

        ops._OPS.pop("hard_swish", None)
    assert "hardsigmoid" not in namespace["fused"].code


def test_expansion_example_runs():
    """The README's training example: expand, train, contract, export to ONNX, verify."""
    blocks = python_blocks("Expansion (training-time re-parameterization)")
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["error"] <= 1e-5
    assert [e.path for e in namespace["report"].expanded] == ["0", "3", "6"]
    assert namespace["report"].reason("10")
