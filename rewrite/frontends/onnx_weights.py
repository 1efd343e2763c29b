"""Big ONNX weights, each held once: read from the external data file straight into its array, and written
into the exported model one tensor at a time.

`onnx.load` with its external data puts every tensor's bytes in the ModelProto, and reading them as
numpy copies them again (`raw_data` gives a fresh `bytes` each access). Here a model file is loaded as
its skeleton (external references only); each main-graph initializer is read from its file with
`readinto` (file -> array, the only copy) when the importer first needs it. The file is never written.

On the way out, the emitter gives onnx-graphsurgeon stubs (name, type, dims) instead of the big arrays,
so its export copies no weight; `fill_initializers` then puts each array's bytes in its initializer,
exactly as graphsurgeon would have written them, and can release the IR's reference to each array as
soon as it is written (the final export), so the weights are never held twice in full.
"""
from __future__ import annotations

import os
import sys
import weakref
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import ExternalDataInfo
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

from ..errors import ModelLoadError
from ..files import first_line
from .onnx_checks import node_subgraphs
from .onnx_io import check_onnx, load_onnx

# Tensors smaller than this are written by graphsurgeon as usual: stubbing them saves nothing.
STUB_BYTES = 1 << 16
_PENDING = "rewrite:pending"  # the location of a stub whose bytes are in the emitter's hands


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _plain_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype a tensor's raw bytes are, when they can be read as they lie (no unpacking, no casts)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return None
    plain = dtype.kind in "biufc" and sys.byteorder == "little" and dtype.isbuiltin == 1
    return dtype if plain else None


class ExternalData:
    """The external data of one model file: checked up front, read tensor by tensor on demand."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(model_path))
        self.folder = os.path.dirname(self.path)
        self.where = f"file {os.fspath(model_path)}"
        # Arrays read and still alive (by their external reference), so the final export can let them go.
        self._read: weakref.WeakValueDictionary[tuple, np.ndarray] = weakref.WeakValueDictionary()

    def _open(self, tensor: onnx.TensorProto, info: ExternalDataInfo) -> int:
        """A descriptor of the tensor's data file; onnx resolves the location against the model's folder and
        refuses absolute paths, `..` and symlinks out of it."""
        try:
            return onnx.external_data_helper._open_external_data_fd(self.folder, info.location, tensor.name, True)
        except Exception as exc:
            raise ModelLoadError(f"initializer {tensor.name!r}: its external data {info.location!r} cannot be read "
                                 f"({first_line(exc)})", where=self.where) from None

    def _span(self, tensor: onnx.TensorProto, fd: int, info: ExternalDataInfo) -> tuple[int, int]:
        """(offset, length) of the tensor's bytes, checked against the file and against its type and dims."""
        size = os.fstat(fd).st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset > size or offset + length > size:
            raise ModelLoadError(f"initializer {tensor.name!r}: its external data ({length} bytes at offset {offset}) "
                                 f"runs past the end of {info.location!r} ({size} bytes)", where=self.where)
        dtype = _plain_dtype(tensor.data_type)
        if dtype is not None:
            expected = dtype.itemsize * int(np.prod(tensor.dims, dtype=np.int64))
            if length != expected:
                raise ModelLoadError(f"initializer {tensor.name!r} has {length} bytes of external data, its type "
                                     f"{onnx.TensorProto.DataType.Name(tensor.data_type)} and dims "
                                     f"{list(tensor.dims)} need {expected}", where=self.where)
        return offset, length

    def check(self, model: onnx.ModelProto) -> None:
        """Every external initializer of the main graph is readable and the right size; external tensors
        elsewhere (Constant attributes, subgraphs: small by nature) are loaded into the skeleton now."""
        for tensor in model.graph.initializer:
            if _is_external(tensor):
                self._checked(tensor, load=False)
        for tensor in _tensors_outside_main_initializers(model):
            if _is_external(tensor):
                self._checked(tensor, load=True)

    def _checked(self, tensor: onnx.TensorProto, load: bool) -> None:
        info = ExternalDataInfo(tensor)
        fd = self._open(tensor, info)
        try:
            offset, length = self._span(tensor, fd, info)
            if load:
                load_bytes(tensor, os.pread(fd, length, offset))
        finally:
            os.close(fd)

    def raw_bytes(self, tensor: onnx.TensorProto) -> bytes:
        """The tensor's bytes as they lie in the file."""
        info = ExternalDataInfo(tensor)
        fd = self._open(tensor, info)
        try:
            offset, length = self._span(tensor, fd, info)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values, read from the file into a new array (the one copy)."""
        dtype = _plain_dtype(tensor.data_type)
        if dtype is None:  # packed or exotic types: onnx's own conversion, from a loaded copy of the stub
            return onnx.numpy_helper.to_array(loaded_copy(tensor, self.raw_bytes(tensor)))
        info = ExternalDataInfo(tensor)
        fd = self._open(tensor, info)
        try:
            offset, length = self._span(tensor, fd, info)
            array = np.empty(tuple(tensor.dims), dtype=dtype)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as data:
                data.seek(offset)
                if length and data.readinto(memoryview(array.reshape(-1)).cast("B")) != length:
                    raise ModelLoadError(f"initializer {tensor.name!r}: the external data file ended early",
                                         where=self.where)
        finally:
            os.close(fd)
        self._read[_key(tensor)] = array
        return array

    def read_before(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """The array `array(tensor)` gave, while something still holds it."""
        return self._read.get(_key(tensor))


def _tensors_outside_main_initializers(model: onnx.ModelProto):
    """Tensors in node attributes (any graph) and initializers of subgraphs."""
    yield from onnx.external_data_helper._get_attribute_tensors(model)

    def subgraphs(graph: onnx.GraphProto):
        for node in graph.node:
            for sub in node_subgraphs(node):
                yield sub
                yield from subgraphs(sub)

    for sub in subgraphs(model.graph):
        yield from sub.initializer


def _key(tensor: onnx.TensorProto) -> tuple:
    return tuple((e.key, e.value) for e in tensor.external_data)


def loaded_copy(stub: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
    full = onnx.TensorProto()
    full.CopyFrom(stub)
    load_bytes(full, raw)
    return full


def load_bytes(tensor: onnx.TensorProto, raw: bytes) -> None:
    """Put an external tensor's bytes in it, field for field as onnx.load does (data_location set to DEFAULT)."""
    tensor.raw_data = raw
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def load_lazily(path: str | os.PathLike) -> tuple[onnx.ModelProto, ExternalData | None]:
    """The model at `path`, checked, without its initializers' external data in memory, and what reads that
    data (None when the file keeps every tensor inline)."""
    model = load_onnx(path, load_external_data=False, check=False)
    weights = None
    if any(_is_external(t) for t in onnx.external_data_helper._get_all_tensors(model)):
        weights = ExternalData(path)
        weights.check(model)  # before onnx.checker, which would read external attribute tensors from the cwd
    check_onnx(model, path)
    return model, weights


class _ReadOnDemand(gs.ir.tensor.LazyValues):
    """graphsurgeon's lazy values of an external or pending tensor: `.values` reads them through us (never
    against the working directory), while its export still writes the stub, not the bytes."""

    def __init__(self, tensor: onnx.TensorProto, read: Callable[[], np.ndarray]):
        super().__init__(tensor)
        self._read_values = read

    def load(self):
        return self._read_values()


def read_external_through(gs_graph: gs.Graph, weights: ExternalData | None) -> None:
    """Point graphsurgeon's external constants at `weights` (gs alone would read files against the cwd)."""
    if weights is None:
        return
    for tensor in gs_graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, gs.ir.tensor.LazyValues) and _is_external(lazy.tensor):
            tensor._values = lazy_values(lazy.tensor, weights)


def lazy_values(proto: onnx.TensorProto, weights: ExternalData | None) -> gs.ir.tensor.LazyValues:
    """graphsurgeon's lazy values of an initializer, external data read through `weights`."""
    if weights is not None and _is_external(proto):
        return _ReadOnDemand(proto, lambda: weights.array(proto))
    return gs.ir.tensor.LazyValues(proto)


def stub_constant(name: str, array: np.ndarray, pending: dict[str, np.ndarray]) -> gs.Constant | None:
    """A graphsurgeon constant for a big array that its export writes as a stub (no bytes); the array waits
    in `pending` for fill_initializers. None for arrays graphsurgeon should simply write."""
    if array.nbytes < STUB_BYTES:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except Exception:  # no ONNX type: graphsurgeon's export says so
        return None
    if _plain_dtype(data_type) is None:
        return None
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=array.shape)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", _PENDING
    pending[name] = array
    # Looked up, not captured: graphsurgeon's node <-> tensor cycles would keep the array alive past its writing.
    return gs.Constant(name, _ReadOnDemand(stub, lambda: pending[name]))


def _as_graphsurgeon_writes(name: str, array: np.ndarray) -> onnx.TensorProto:
    """The initializer graphsurgeon's export makes of a constant array (its constant_to_onnx_tensor, without
    a gs.Constant: those sit in reference cycles and would keep the array alive)."""
    return onnx.helper.make_tensor(name=name, data_type=dtype_to_onnx(array.dtype), dims=array.shape,
                                   vals=array.tobytes(), raw=True)


def fill_initializers(graph: onnx.GraphProto, pending: dict[str, np.ndarray], weights: ExternalData | None,
                      release: Callable[[np.ndarray], None] | None = None) -> None:
    """Give each stubbed initializer its bytes, one tensor at a time, as the plain path writes them.

    Pending arrays come from the emitter and are written as graphsurgeon writes an array; the original's
    external tensors are read from their file, as onnx.load reads them (so they are the file's bytes even
    if the IR's copy was edited). `release(array)`, when given, is called once an array's bytes are
    written, so its last holder can let it go before the next one is written.
    """
    for tensor in graph.initializer:
        if not _is_external(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location == _PENDING:
            array = pending.pop(tensor.name)
            tensor.CopyFrom(_as_graphsurgeon_writes(tensor.name, array))
        elif weights is not None:
            array = weights.read_before(tensor)
            load_bytes(tensor, weights.raw_bytes(tensor))
        else:
            continue  # a ModelProto's own external references are refused at import; nothing to fill
        if release is not None and array is not None:
            release(array)
        del array
