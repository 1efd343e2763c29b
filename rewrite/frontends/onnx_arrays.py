"""ONNX tensor data <-> torch tensors, for every element type both sides have.

onnx's numpy arrays hold bfloat16 and the float8 types as ml_dtypes scalars, which torch.from_numpy
does not read; torch has each of them, so they cross by their bits (viewed as unsigned ints of the
same width), value for value. Strings, int4 and float4 have no torch type: `to_torch` raises
TypeError for them, and the importer keeps what holds them as it is.
"""
from __future__ import annotations

import numpy as np
import torch

# ml_dtypes name -> (unsigned int of its width, torch type)
_BY_BITS = {
    "bfloat16": (np.uint16, torch.bfloat16),
    "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
    "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz),
    "float8_e5m2": (np.uint8, torch.float8_e5m2),
    "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz),
}
_TO_NUMPY = {torch_type: name for name, (_, torch_type) in _BY_BITS.items()}


def to_torch(values, copy: bool = True) -> torch.Tensor:
    """A torch tensor of the same type and values (a private copy unless `copy=False`)."""
    array = np.array(values) if copy else np.asarray(values)
    bits = _BY_BITS.get(array.dtype.name)
    if bits is not None:
        # reshape: ascontiguousarray makes a 0-d array 1-d
        return torch.from_numpy(np.ascontiguousarray(array).view(bits[0]).reshape(array.shape)).view(bits[1])
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as the numpy array onnx writes (ml_dtypes for bfloat16 and the float8 types)."""
    tensor = tensor.detach().cpu()
    name = _TO_NUMPY.get(tensor.dtype)
    if name is None:
        return tensor.numpy()
    import ml_dtypes  # onnx's own dependency for these types

    width = _BY_BITS[name][0]
    unsigned = {np.uint8: torch.uint8, np.uint16: torch.uint16}[width]
    return tensor.contiguous().view(unsigned).numpy().view(getattr(ml_dtypes, name))


def torch_type_of(np_dtype) -> torch.dtype | None:
    """The torch type of a numpy dtype (ml_dtypes included), or None when torch has none."""
    try:
        dtype = np.dtype(np_dtype)
    except TypeError:
        return None
    bits = _BY_BITS.get(dtype.name)
    if bits is not None:
        return bits[1]
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        return None


def numpy_type_of(dtype: torch.dtype | None):
    """The numpy dtype onnx uses for a torch type, or None."""
    if dtype is None:
        return None
    name = _TO_NUMPY.get(dtype)
    if name is not None:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        return None
