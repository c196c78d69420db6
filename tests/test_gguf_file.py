"""jlora.formats.gguf_file: the mmap GGUF reader gives exactly gguf-py's GGUFReader values (metadata as
ReaderField.contents(), tensors' name/type/shape/data) on the real Gemma 3 270M and SmolLM2 files and on small
written files holding every value type (both byte orders, a custom alignment), and a bad file (wrong magic,
cut anywhere, unknown types, offsets past the end) is a one-line error naming it."""

import struct
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from jlora.formats.gguf_file import GGUFFileError, read_gguf


def assert_same_as_gguf_py(path) -> tuple[float, float]:
    """read_gguf(path) against GGUFReader(path), field by field and tensor by tensor; the two parse times."""
    t0 = time.perf_counter()
    ours = read_gguf(path)
    t1 = time.perf_counter()
    ref = gguf.GGUFReader(path)
    t2 = time.perf_counter()
    assert list(ours.metadata) == list(ref.fields)  # same keys, same order
    for key, field in ref.fields.items():
        want = field.contents()
        got = ours.metadata[key]
        assert got == want, key
        assert type(got) is type(want), key
        if isinstance(want, list):
            assert [type(v) for v in got] == [type(v) for v in want], key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(d) for d in b.shape))
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data, equal_nan=a.data.dtype.kind == "f"), a.name
        assert not a.data.flags.writeable and not a.data.flags.owndata, a.name  # a view of the file, not a copy
    return t1 - t0, t2 - t1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3_gguf", "smollm2_gguf"])
def test_real_files_match_gguf_reader(model, request):
    """The shipped models: every metadata value and every tensor as GGUFReader gives it (times printed)."""
    path = request.getfixturevalue(model)
    ours, ref = assert_same_as_gguf_py(path)
    print(f"\n{model}: read_gguf {ours:.3f} s, gguf.GGUFReader {ref:.3f} s ({ref / ours:.0f}x)")
    meta = read_gguf(path).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) > 40_000


# One key per value type; (key, value, vtype, sub_type, what contents() gives back).
VALUES = [
    ("t.u8", 200, V.UINT8, None, 200),
    ("t.i8", -100, V.INT8, None, -100),
    ("t.u16", 60_000, V.UINT16, None, 60_000),
    ("t.i16", -30_000, V.INT16, None, -30_000),
    ("t.u32", 4_000_000_000, V.UINT32, None, 4_000_000_000),
    ("t.i32", -2_000_000_000, V.INT32, None, -2_000_000_000),
    ("t.u64", 2**64 - 1, V.UINT64, None, 2**64 - 1),
    ("t.i64", -(2**63), V.INT64, None, -(2**63)),
    ("t.f32", 0.1, V.FLOAT32, None, float(np.float32(0.1))),
    ("t.f64", 0.1, V.FLOAT64, None, 0.1),
    ("t.bool_t", True, V.BOOL, None, True),
    ("t.bool_f", False, V.BOOL, None, False),
    ("t.str", "héllo ✓", V.STRING, None, "héllo ✓"),
    ("t.str_empty", "", V.STRING, None, ""),
    ("t.a_u8", [0, 255, 7], V.ARRAY, V.UINT8, [0, 255, 7]),
    ("t.a_i8", [-128, 127], V.ARRAY, V.INT8, [-128, 127]),
    ("t.a_u16", [1, 65535], V.ARRAY, V.UINT16, [1, 65535]),
    ("t.a_i16", [-32768, 5], V.ARRAY, V.INT16, [-32768, 5]),
    ("t.a_u32", [1, 2**32 - 1], V.ARRAY, V.UINT32, [1, 2**32 - 1]),
    ("t.a_i32", [-1, 2**31 - 1], V.ARRAY, V.INT32, [-1, 2**31 - 1]),
    ("t.a_u64", [2**64 - 1, 0], V.ARRAY, V.UINT64, [2**64 - 1, 0]),
    ("t.a_i64", [-(2**63), 3], V.ARRAY, V.INT64, [-(2**63), 3]),
    ("t.a_f32", [0.5, -1.25, 0.1], V.ARRAY, V.FLOAT32, [0.5, -1.25, float(np.float32(0.1))]),
    ("t.a_f64", [0.1, 1e300], V.ARRAY, V.FLOAT64, [0.1, 1e300]),
    ("t.a_bool", [True, False, True], V.ARRAY, V.BOOL, [True, False, True]),
    ("t.a_str", ["a", "", "ü ▁x", "<|im_start|>"], V.ARRAY, None, ["a", "", "ü ▁x", "<|im_start|>"]),
    ("t.a_bytes", b"\x00\x01\xff", V.ARRAY, None, [0, 1, 255]),  # bytes: an array of uint8
    ("t.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY, None, [1, 2, 3, 4, 5, 6]),  # gguf-py flattens nesting
    ("t.nested_str", [["a", "b"], ["c"]], V.ARRAY, None, ["a", "b", "c"]),
    ("t.nested3", [[[1.5], [2.5]], [[3.5]]], V.ARRAY, None, [1.5, 2.5, 3.5]),
]


def write_all_types(path, endian=gguf.GGUFEndian.LITTLE, alignment=None):
    """A GGUF with every value type and a tensor of each kind gguf-py views differently; returns the tensors."""
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub, _ in VALUES:
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    tensors = {
        "w.f32": rng.standard_normal((3, 4)).astype(np.float32),
        "w.f32_1d": rng.standard_normal(5).astype(np.float32),
        "w.f32_3d": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "w.f16": rng.standard_normal((2, 8)).astype(np.float16),
        "w.f64": rng.standard_normal((2, 2)),
        "w.i8": rng.integers(-128, 127, (3, 2), dtype=np.int8),
        "w.i16": rng.integers(-999, 999, (4,), dtype=np.int16),
        "w.i32": rng.integers(-999, 999, (2, 3), dtype=np.int32),
        "w.i64": rng.integers(-999, 999, (3,), dtype=np.int64),
    }
    raw = {  # block types as their bytes [rows, bytes per row]
        "w.q8_0": (rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8), T.Q8_0),
        "w.q4_k": (rng.integers(0, 256, (2, 144), dtype=np.uint8), T.Q4_K),
        "w.bf16": (rng.integers(0, 256, (3, 8), dtype=np.uint8), T.BF16),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    for name, (arr, kind) in raw.items():
        w.add_tensor(name, arr, raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return tensors, raw


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["le", "be"])
@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind(tmp_path, endian, alignment):
    path = tmp_path / "all.gguf"
    tensors, raw = write_all_types(path, endian, alignment)
    assert_same_as_gguf_py(path)
    f = read_gguf(path)
    assert f.version == 3 and f.byte_order == ("<" if endian == gguf.GGUFEndian.LITTLE else ">")
    assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
    for key, _, _, _, want in VALUES:  # written out, not only gguf-py's word for it
        assert f.metadata[key] == want and type(f.metadata[key]) is type(want), key
    assert f.metadata["general.architecture"] == "llama" and f.metadata["GGUF.kv_count"] == len(VALUES) + 1 + bool(
        alignment
    )
    got = {t.name: t for t in f.tensors}
    for name, arr in tensors.items():
        t = got[name]
        assert t.shape == tuple(reversed(arr.shape)) and t.data.shape == arr.shape  # GGUF order is innermost first
        np.testing.assert_array_equal(t.data, arr)
    for name, (arr, kind) in raw.items():
        t = got[name]
        assert t.tensor_type == kind and t.data.dtype == np.uint8
        np.testing.assert_array_equal(t.data, arr)  # [rows, bytes]
    assert got["w.q8_0"].shape == (64, 4) and got["w.bf16"].shape == (4, 3)


def raw_gguf(kvs: bytes, n_kv: int, version: int = 2) -> bytes:
    """A tensorless GGUF from hand-packed key/values (GGUFWriter refuses empty arrays)."""
    return b"GGUF" + struct.pack("<IQQ", version, 0, n_kv) + kvs


def packed_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_empty_arrays_and_version_2(tmp_path):
    kvs = (
        packed_str("e.ints") + struct.pack("<IIQ", V.ARRAY, V.INT32, 0)
        + packed_str("e.strs") + struct.pack("<IIQ", V.ARRAY, V.STRING, 0)
        + packed_str("e.nested") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 2)
        + struct.pack("<IQ", V.UINT16, 0) + struct.pack("<IQ", V.UINT16, 1) + struct.pack("<H", 9)
    )  # fmt: skip
    path = tmp_path / "empty.gguf"
    path.write_bytes(raw_gguf(kvs, 3))
    assert_same_as_gguf_py(path)
    f = read_gguf(path)
    assert (f.version, f.tensors) == (2, [])
    assert (f.metadata["e.ints"], f.metadata["e.strs"], f.metadata["e.nested"]) == ([], [], [9])


def assert_bad(path, *words) -> str:
    with pytest.raises(GGUFFileError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert e.value.problem and msg.endswith(e.value.problem) and isinstance(e.value, ValueError)
    for word in words:
        assert word in msg, msg
    return msg


@pytest.fixture
def good(tmp_path):
    """A small valid GGUF's bytes, a writer of variants, and where the tensor data ends."""
    path = tmp_path / "good.gguf"
    write_all_types(path)
    data = path.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in read_gguf(path).tensors)

    def variant(new: bytes, name: str = "bad.gguf"):
        (tmp_path / name).write_bytes(new)
        return tmp_path / name

    return data, variant, end


def test_cut_anywhere_is_a_truncated_file(good):
    """Every cut inside the header and several in the tensor data: 'truncated', one line, the file named."""
    data, variant, end = good
    header = read_gguf(variant(data, "whole.gguf")).data_offset
    assert_bad(variant(b""), "empty")
    for cut in (*range(1, 4), *range(4, header + 1), header + 5, end // 2, end - 1):
        msg = assert_bad(variant(data[:cut]))
        assert "truncated" in msg if cut >= 4 else "not a GGUF" in msg, (cut, msg)


def test_bad_headers_are_one_line_errors(good):
    data, variant, _ = good

    def patched(at: int, new: bytes) -> bytes:
        return data[:at] + new + data[at + len(new) :]

    def after(name: bytes) -> int:  # the byte just past a key's or tensor's name
        return data.index(name) + len(name)

    assert_bad(variant(patched(0, b"GGML")), "not a GGUF file", "GGML")
    for version in (1, 4):
        assert_bad(variant(patched(4, struct.pack("<I", version))), f"version {version}")
    assert_bad(variant(patched(after(b"t.u8"), struct.pack("<I", 99))), "t.u8", "unknown value type 99")
    assert_bad(variant(patched(after(b"t.nested3") + 4, struct.pack("<I", 99))), "t.nested3", "unknown value type")
    assert_bad(variant(patched(after(b"t.a_u8") + 8, struct.pack("<Q", 2**60))), "t.a_u8", "truncated")
    assert_bad(variant(patched(after(b"t.a_str") + 4, struct.pack("<Q", 2**60))), "t.a_str", "truncated")
    assert_bad(variant(patched(after(b"t.str") + 4 + 8, b"\xff")), "t.str", "UTF-8")
    assert_bad(variant(patched(data.index(b"t.i8"), b"t.u8")), "'t.u8' appears twice")
    assert_bad(variant(patched(data.index(b"w.i16"), b"w.f16")), "'w.f16' appears twice")
    # w.q8_0: name, n_dims=2, dims (64, 4), type, offset
    q8 = after(b"w.q8_0")
    assert_bad(variant(patched(q8 + 4 + 16, struct.pack("<I", 99))), "w.q8_0", "unknown GGML type 99")
    assert_bad(variant(patched(q8 + 4, struct.pack("<Q", 60))), "w.q8_0", "not whole Q8_0 blocks of 32")
    assert_bad(variant(patched(q8 + 4 + 16 + 4, struct.pack("<Q", 2**40))), "w.q8_0", "past the end")
    assert_bad(variant(patched(q8, struct.pack("<I", 2**30))), "w.q8_0", "dims", "truncated")


@pytest.mark.parametrize("alignment", [(V.UINT32, 48), (V.UINT32, 0), (V.UINT64, 32)])
def test_bad_alignment(tmp_path, alignment):
    vtype, value = alignment
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_key_value("general.alignment", value, vtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert_bad(tmp_path / "a.gguf", "general.alignment", "power of two")


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nope.gguf")
