"""A GGUF file's header, metadata and tensor views, read straight off one mmap.

gguf-py's GGUFReader builds a numpy view per metadata element: a 262,144-token vocabulary (tokens,
scores, token types) costs over a minute before the first weight is touched. Here arrays of numbers are
one `np.frombuffer` each and strings a tight `struct.unpack_from` loop, so the same header parses in well
under a second. The values and tensors are what gguf-py gives (`ReaderField.contents()`, `ReaderTensor`),
so callers need not care which reader ran; the `gguf` package is still the source of the type tables
and of `gguf.quants.dequantize`. Never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import struct
import sys
from typing import Any

import gguf
import numpy as np

from jlora.errors import JloraError

_V = gguf.GGUFValueType
# Fixed-size value types: struct code and numpy dtype (byte order added per file).
_SCALARS = {
    _V.UINT8: ("B", np.uint8),
    _V.INT8: ("b", np.int8),
    _V.UINT16: ("H", np.uint16),
    _V.INT16: ("h", np.int16),
    _V.UINT32: ("I", np.uint32),
    _V.INT32: ("i", np.int32),
    _V.FLOAT32: ("f", np.float32),
    _V.BOOL: ("?", np.bool_),
    _V.UINT64: ("Q", np.uint64),
    _V.INT64: ("q", np.int64),
    _V.FLOAT64: ("d", np.float64),
}
_Q = gguf.GGMLQuantizationType
# Tensor types gguf-py views as numbers; every other type is uint8 [.., bytes per row].
_ELEMENT_DTYPES = {
    _Q.F16: np.float16,
    _Q.F32: np.float32,
    _Q.F64: np.float64,
    _Q.I8: np.int8,
    _Q.I16: np.int16,
    _Q.I32: np.int32,
    _Q.I64: np.int64,
}
SUPPORTED_VERSIONS = (2, 3)
_HOST = "<" if sys.byteorder == "little" else ">"


class GGUFFileError(JloraError, ValueError):
    """A file that is not a GGUF jlora can read; the message is one line naming the file."""

    def __init__(self, file: str | os.PathLike, problem: object):
        self.file = str(file)
        self.problem = " ".join(str(problem).split())  # the message without the file, for callers that wrap it
        super().__init__(f"{self.file}: {self.problem}")


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: what gguf-py's ReaderTensor says, with `data` a read-only view of the file (no copy)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order, innermost (contiguous) dim first: ReaderTensor.shape
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray  # numbers: [reversed shape]; block types: uint8 [.., bytes per row]


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF: metadata as plain Python values (ReaderField.contents()), tensors in file order."""

    path: str
    version: int
    byte_order: str  # "<" or ">": the file's, as struct writes it
    alignment: int
    data_offset: int  # where tensor data starts
    metadata: dict[str, Any]  # includes GGUF.version, GGUF.tensor_count, GGUF.kv_count as gguf-py's fields do
    tensors: list[GGUFTensor]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the GGUF at `path`. Raises GGUFFileError for a file that is not one (OSError if unreadable)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GGUFFileError(path, "not a GGUF file: it is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while any tensor view does
    try:
        return _Parser(path, buf).parse()
    except GGUFFileError:
        raise
    except (struct.error, IndexError, EOFError) as e:
        raise GGUFFileError(path, f"truncated GGUF file ({e})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise GGUFFileError(path, f"corrupt GGUF file ({e})") from None


class _Parser:
    """One pass over the header; `off` moves forward through it."""

    def __init__(self, path: pathlib.Path, buf: mmap.mmap):
        self.path, self.buf, self.size, self.off = path, buf, len(buf), 0

    def fail(self, problem: str) -> GGUFFileError:
        return GGUFFileError(self.path, problem)

    def dtype(self, d: type) -> np.dtype:
        """`d` in the file's byte order (native where the file's matches the host's, as gguf-py's views)."""
        return np.dtype(d) if self.e == _HOST else np.dtype(d).newbyteorder(self.e)

    def parse(self) -> GGUFFile:
        if self.buf[:4] != b"GGUF":
            raise self.fail(f"not a GGUF file: it starts with {bytes(self.buf[:4])!r}, not b'GGUF'")
        (version,) = struct.unpack_from("<I", self.buf, 4)
        e = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file's version reads as N << 24 (as gguf-py)
        self.e = e
        if e == ">":
            (version,) = struct.unpack_from(">I", self.buf, 4)
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
        self.u32, self.u64 = struct.Struct(e + "I").unpack_from, struct.Struct(e + "Q").unpack_from
        self.scalars = {t: (struct.Struct(e + c), self.dtype(d)) for t, (c, d) in _SCALARS.items()}
        (n_tensors,) = self.u64(self.buf, 8)
        (n_kv,) = self.u64(self.buf, 16)
        self.off = 24
        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
        kinds: dict[str, int] = {}
        for _ in range(n_kv):
            key = self.string("a metadata key")
            if key in meta:
                raise self.fail(f"metadata key {key!r} appears twice")
            (kinds[key],) = self.u32(self.buf, self.off)
            self.off += 4
            meta[key] = self.value(kinds[key], key)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in meta:
            alignment = meta["general.alignment"]
            if kinds["general.alignment"] != _V.UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise self.fail(f"general.alignment={alignment!r} is not a uint32 power of two")
        data_offset = -(-self.off // alignment) * alignment
        names: set[str] = set()
        tensors = []
        for name, dims, kind, rel in infos:
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            tensors.append(self.tensor(name, dims, kind, data_offset + rel))
        return GGUFFile(str(self.path), version, e, alignment, data_offset, meta, tensors)

    def string(self, what: str) -> str:
        (n,) = self.u64(self.buf, self.off)
        start = self.off + 8
        self.off = start + n
        if self.off > self.size:
            raise self.fail(f"truncated GGUF file: {what} runs past the end ({self.size} bytes)")
        try:
            return str(self.buf[start : self.off], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8") from None

    def value(self, kind: int, key: str) -> Any:
        """The value of type `kind` at `off`, as ReaderField.contents() gives it (nested arrays flattened)."""
        if kind in self.scalars:
            s, _ = self.scalars[kind]
            (v,) = s.unpack_from(self.buf, self.off)
            self.off += s.size
            return v
        if kind == _V.STRING:
            return self.string(f"the value of {key}")
        if kind != _V.ARRAY:
            raise self.fail(f"metadata key {key!r} has unknown value type {kind}")
        (item,) = self.u32(self.buf, self.off)
        (n,) = self.u64(self.buf, self.off + 4)
        self.off += 12
        if item in self.scalars:
            dtype = self.scalars[item][1]
            end = self.off + n * dtype.itemsize
            if end > self.size:
                raise self.fail(f"truncated GGUF file: the array {key} runs past the end ({self.size} bytes)")
            out = np.frombuffer(self.buf, dtype, n, self.off).tolist()  # [n] python numbers
            self.off = end
            return out
        if item == _V.STRING:
            return self.strings(n, key)
        out = []
        for _ in range(n):  # an array of arrays: gguf-py's contents() flattens it to its leaves
            out += self.value(item, key)
        return out

    def strings(self, n: int, key: str) -> list[str]:
        """`n` length-prefixed strings: the hot loop for a vocabulary (262k tokens well under a second)."""
        buf, u64, off, size, out = self.buf, self.u64, self.off, self.size, []
        append = out.append
        try:
            for _ in range(n):
                (k,) = u64(buf, off)
                off += 8 + k
                if off > size:
                    raise self.fail(f"truncated GGUF file: the array {key} runs past the end ({size} bytes)")
                append(str(buf[off - k : off], "utf-8"))
        except UnicodeDecodeError:
            raise self.fail(f"{key}[{len(out)}] is not valid UTF-8") from None
        self.off = off
        return out

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string("a tensor name")
        (n_dims,) = self.u32(self.buf, self.off)
        if self.off + 4 + 8 * n_dims > self.size:
            raise self.fail(f"truncated GGUF file: tensor {name}'s {n_dims} dims run past the end ({self.size} bytes)")
        dims = struct.unpack_from(f"{self.e}{n_dims}Q", self.buf, self.off + 4)
        self.off += 4 + 8 * n_dims
        kind, rel = struct.unpack_from(f"{self.e}IQ", self.buf, self.off)
        self.off += 12
        return name, dims, kind, rel

    def tensor(self, name: str, dims: tuple[int, ...], kind: int, start: int) -> GGUFTensor:
        """The view gguf-py's _build_tensors makes: numbers [reversed dims], block types uint8 [.., bytes/row]."""
        try:
            qtype = _Q(kind)
        except ValueError:
            raise self.fail(f"tensor {name} has unknown GGML type {kind}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = math.prod(dims)
        n_bytes = n_elements * type_size // block
        view_shape = tuple(reversed(dims))
        dtype = _ELEMENT_DTYPES.get(qtype)
        if dtype is None:
            if not dims or dims[0] % block:
                row = dims[0] if dims else "no"
                raise self.fail(f"tensor {name} has rows of {row} values, not whole {qtype.name} blocks of {block}")
            dtype, view_shape = np.uint8, (*view_shape[:-1], dims[0] // block * type_size)
        if start + n_bytes > self.size:
            raise self.fail(
                f"truncated GGUF file: tensor {name}'s data (bytes {start}..{start + n_bytes}) "
                f"runs past the end ({self.size} bytes)"
            )
        dtype = self.dtype(dtype)
        data = np.frombuffer(self.buf, dtype, n_bytes // dtype.itemsize, start).reshape(view_shape)
        return GGUFTensor(name, qtype, tuple(dims), n_elements, n_bytes, start, data)
