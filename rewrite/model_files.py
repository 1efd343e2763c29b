"""What kind of model a file or spec is, and loading it safely (no torch import until a torch model is loaded).

A `.pt` file is a pickle, and unpickling can run arbitrary code. Files are therefore read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a pickled
nn.Module (which needs its classes imported and constructed) is loaded only when the caller says it
trusts the file. Kinds are told apart by content as well as by name, case-insensitively.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from .errors import ModelLoadError

ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth")

# ModelProto's field numbers and wire types (onnx.proto): 1 ir_version (varint) comes first in
# every serializer, then any of these.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ZIP_MAGIC = b"PK\x03\x04"


def has_suffix(path: str | os.PathLike, suffixes: tuple[str, ...]) -> bool:
    return os.fspath(path).lower().endswith(suffixes)


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return None


def looks_like_onnx(head: bytes) -> bool:
    """Whether bytes start like a serialized ModelProto: ir_version first, then a ModelProto field."""
    if not head.startswith(b"\x08"):
        return False
    ir = _varint(head, 1)
    if ir is None or not 1 <= ir[0] <= 100:
        return False
    key = _varint(head, ir[1])
    if key is None:
        return ir[1] == len(head)  # nothing but an IR version
    field, wire = key[0] >> 3, key[0] & 7
    return _MODEL_FIELDS.get(field) == wire


def looks_like_torch(head: bytes) -> bool:
    """torch.save writes a zip archive (or, in the legacy format, a pickle of protocol 2 or more)."""
    return head.startswith(_ZIP_MAGIC) or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_head(path: str | os.PathLike, size: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_onnx_file(path: str | os.PathLike) -> bool:
    """An ONNX file by its name (any case) or, for an existing file of another name, by its content."""
    if has_suffix(path, ONNX_SUFFIXES):
        return True
    return os.path.isfile(path) and looks_like_onnx(read_head(path))


def model_kind(path: str | os.PathLike) -> str:
    """'onnx' or 'torch' for an existing model file."""
    return "onnx" if is_onnx_file(path) else "torch"


TRUST_HINT = ("to load it without running its code, pass the model as `package.module:callable` (a function "
              "that builds it); if you trust the file's origin, --trust-pickle loads it anyway")

STATE_DICT_HINT = ("this file holds a state_dict (parameters only), not a model: pass a `package.module:callable` "
                   "that builds the model and calls model.load_state_dict(torch.load(path)), or save the module "
                   "itself (torch.save(model, path))")


def load_torch_file(path: str, trust_pickle: bool = False) -> Any:
    """A torch.save'd object; code in the pickle runs only with trust_pickle=True."""
    import pickle

    import torch

    head = read_head(path)
    if not looks_like_torch(head):
        raise ModelLoadError("not a torch.save'd file (neither a zip archive nor a pickle) and not ONNX", where=path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ModelLoadError("the file is a pickle of Python objects (a pickled module, say), and unpickling "
                                 "can run arbitrary code, so it was not loaded; " + TRUST_HINT, where=path) from None
        safe_error = exc
    except Exception as exc:
        raise ModelLoadError(f"not a readable torch.save'd file: {type(exc).__name__}: {_short(exc)}",
                             where=path) from None
    try:  # the caller said it trusts the file
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"not a readable torch.save'd file: {type(exc).__name__}: {_short(exc)} "
                             f"(the safe loader said: {_short(safe_error)})", where=path) from None


def _short(exc: BaseException) -> str:
    from .files import first_line

    return first_line(exc)


def build_from_spec(spec: str) -> Any:
    """Call `package.module:callable`."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return factory()
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model: {type(exc).__name__}: {_short(exc)}", where=spec) from None


def load_model(spec: str, train: bool = False, trust_pickle: bool = False) -> Any:
    """A model from `package.module:callable`, a torch.save'd module (.pt/.pth) or an ONNX file (returned as its path).

    Built or loaded torch models are put in eval mode unless `train`.
    """
    if os.path.isdir(spec):
        raise ModelLoadError("is a folder, not a model file", where=spec)
    if os.path.isfile(spec):
        if is_onnx_file(spec):
            return spec  # the ONNX frontend reads (and validates) the file itself
        model = load_torch_file(spec, trust_pickle)
    elif ":" in spec and not has_suffix(spec, ONNX_SUFFIXES + TORCH_SUFFIXES):
        model = build_from_spec(spec)
    elif has_suffix(spec, ONNX_SUFFIXES + TORCH_SUFFIXES) or os.sep in spec:
        raise ModelLoadError("no such file", where=spec)
    else:
        raise ModelLoadError("expected package.module:callable, a .pt/.pth file or a .onnx file", where=spec)
    import torch

    if not isinstance(model, torch.nn.Module):
        if isinstance(model, dict) and model and all(isinstance(v, torch.Tensor) for v in model.values()):
            raise ModelLoadError(f"expected an nn.Module, got {type(model).__name__}; {STATE_DICT_HINT}", where=spec)
        raise ModelLoadError(f"expected an nn.Module, got {type(model).__name__}", where=spec)
    return model if train else model.eval()
