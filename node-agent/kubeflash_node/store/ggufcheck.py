"""A GGUF file's structure checked before the gguf package reads it, so a corrupt file is refused by what is wrong.

The gguf package maps the file and slices it with numpy: a truncated or damaged file fails there with numpy's words
("index 0 is out of bounds", "cannot reshape array of size 0"). `check` walks the same layout first (GGUF v2/v3:
magic, version, counts, each key's name, value type and value, each tensor's name, dimensions, ggml type and data
offset, the aligned data section) and refuses the first thing wrong as `CorruptGGUF`: at which byte, which field
(key or tensor by name), what was expected and what was found. Only the layout is checked: a tensor's bytes are not.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what the gguf package's reader reads
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value types 0-12: fixed sizes (struct formats); 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class CorruptGGUF(ValueError):
    """The file's layout is not GGUF's: the message says at which byte, which field, expected and found."""


@dataclass(frozen=True)
class Layout:
    """What check found: counts, the data section's start and the end of the last tensor's bytes."""

    version: int
    keys: int
    tensors: int
    data_offset: int
    data_end: int


class _Cursor:
    """Reads little- (or big-) endian fields from the file's bytes, refusing any that would run past the end."""

    def __init__(self, buf, order: str = "<"):
        self.buf, self.pos, self.order = buf, 0, order

    def need(self, n: int, field: str) -> None:
        if self.pos + n > len(self.buf):
            raise CorruptGGUF(f"at byte {self.pos}, {field}: expected {n} bytes, the file ends at byte {len(self.buf)}")

    def get(self, fmt: str, field: str):
        size = struct.calcsize(fmt)
        self.need(size, field)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, field: str) -> str:
        at, n = self.pos, self.get("Q", field)
        if n > len(self.buf) - self.pos:
            raise CorruptGGUF(f"at byte {at}, {field}: a string of {n} bytes runs past the end of the file "
                              f"({len(self.buf)} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptGGUF(f"at byte {at + 8 + e.start}, {field}: expected UTF-8 text, found byte "
                              f"0x{raw[e.start]:02x}") from None


def check(path: Path) -> Layout:
    """The layout of the GGUF file `path`, or CorruptGGUF naming the first field that is not GGUF's."""
    import mmap

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise CorruptGGUF("at byte 0, the magic: expected b'GGUF', found an empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Cursor(memoryview(buf)))


def _walk(c: _Cursor) -> Layout:
    try:
        c.need(4, "the magic")
        if bytes(c.buf[:4]) != MAGIC:
            raise CorruptGGUF(f"at byte 0, the magic: expected {MAGIC!r}, found {bytes(c.buf[:4])!r}")
        c.pos = 4
        version = c.get("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (the gguf reader swaps too)
            c.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise CorruptGGUF(f"at byte 4, the version: expected {' or '.join(map(str, VERSIONS))}, found {version}")
        tensors, keys = c.get("Q", "the tensor count"), c.get("Q", "the key count")
        alignment = DEFAULT_ALIGNMENT
        for k in range(keys):
            name = c.string(f"key {k}'s name")
            value = _value(c, f"key {name!r}")
            if name == "general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1):
                    raise CorruptGGUF(f"key 'general.alignment': expected a power of two, found {value!r}")
                alignment = value
        infos = [_tensor_info(c, t) for t in range(tensors)]
        data = -(-c.pos // alignment) * alignment
        end = data
        for name, at, offset, nbytes in infos:
            field = f"the data offset of tensor {name!r}"
            if offset % alignment:
                raise CorruptGGUF(f"at byte {at}, {field}: expected a multiple of {alignment}, found {offset}")
            lo, hi = data + offset, data + offset + nbytes
            if hi > len(c.buf):
                raise CorruptGGUF(f"at byte {at}, {field}: its {nbytes} bytes at file bytes {lo} to {hi} run past "
                                  f"the end of the file ({len(c.buf)} bytes)")
            end = max(end, hi)
        return Layout(version, keys, tensors, data, end)
    finally:
        c.buf.release()


def _value(c: _Cursor, field: str):
    """One key's value (type, then the value); arrays are walked, their elements not kept."""
    at, kind = c.pos, c.get("I", f"the value type of {field}")
    if kind in _SCALARS:
        return c.get(_SCALARS[kind], f"the value of {field}")
    if kind == STRING:
        return c.string(f"the value of {field}")
    if kind != ARRAY:
        raise CorruptGGUF(f"at byte {at}, the value type of {field}: expected one of 0-12 (GGUF value types), "
                          f"found {kind}")
    at, elem = c.pos, c.get("I", f"the element type of {field}")
    if elem not in _SCALARS and elem != STRING:
        raise CorruptGGUF(f"at byte {at}, the element type of {field}: expected one of 0-8 or 10-12 (GGUF value "
                          f"types, no nested arrays), found {elem}")
    at, n = c.pos, c.get("Q", f"the element count of {field}")
    least = struct.calcsize(_SCALARS[elem]) if elem in _SCALARS else 8  # a string: at least its length
    if n * least > len(c.buf) - c.pos:
        raise CorruptGGUF(f"at byte {at}, the element count of {field}: {n} elements of at least {least} bytes run "
                          f"past the end of the file ({len(c.buf)} bytes)")
    if elem in _SCALARS:
        c.pos += n * least
    else:
        for i in range(n):
            c.string(f"element {i} of {field}")
    return None


def _tensor_info(c: _Cursor, t: int) -> tuple[str, int, int, int]:
    """(name, the byte its data offset is at, that offset, its bytes) of tensor info `t`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = c.string(f"tensor {t}'s name")
    at, dims = c.pos, c.get("I", f"the dimension count of tensor {name!r}")
    if not 1 <= dims <= MAX_DIMS:
        raise CorruptGGUF(f"at byte {at}, the dimension count of tensor {name!r}: expected 1 to {MAX_DIMS}, "
                          f"found {dims}")
    shape = [c.get("Q", f"dimension {d} of tensor {name!r}") for d in range(dims)]
    at, kind = c.pos, c.get("I", f"the type of tensor {name!r}")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise CorruptGGUF(f"at byte {at}, the type of tensor {name!r}: expected a ggml type this reader knows, "
                          f"found {kind}") from None
    if shape[0] % block:
        raise CorruptGGUF(f"at byte {at - 8 * dims}, dimension 0 of tensor {name!r}: expected a multiple of "
                          f"{block} (the block of {GGMLQuantizationType(kind).name}), found {shape[0]}")
    elems = 1
    for n in shape:
        elems *= n
    at, offset = c.pos, c.get("Q", f"the data offset of tensor {name!r}")
    return name, at, offset, elems // block * type_size
