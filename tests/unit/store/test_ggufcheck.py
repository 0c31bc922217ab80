"""A corrupt GGUF file is refused before the gguf package reads it (store/ggufcheck.py), by a message naming the
file, the byte offset, the field and what was expected, never numpy's reason; a good file passes untouched."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kubeflash_node.store.ggufsource import GGUFSource
from kubeflash_node.store.hf_config import SourceError


def _write(path) -> bytes:
    """A small, well-formed GGUF file (three keys: the architecture, a count, a string array; two float32 tensors); its bytes."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_token_list(["a", "bc", "def"])
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _after(raw: bytes, name: str) -> int:
    """The offset just past the GGUF string `name` (its 8-byte length and its bytes)."""
    return raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)


def _set(raw: bytes, at: int, fmt: str, value) -> bytes:
    return raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):]


def _corrupt(kind: str, raw: bytes) -> tuple[bytes, str]:
    """(the file's bytes corrupted in one way, the words its refusal must hold)."""
    arch = _after(raw, "general.architecture")
    embd = _after(raw, "token_embd.weight")  # then n_dims u32, dims u64 x 2, type u32, offset u64
    if kind == "magic":
        return b"GGUX" + raw[4:], r"at byte 0, the magic: expected b'GGUF', found b'GGUX'"
    if kind == "version":
        return _set(raw, 4, "<I", 9), r"at byte 4, the version: expected 2 or 3, found 9"
    if kind == "key length":
        at = arch - len("general.architecture") - 8
        return _set(raw, at, "<Q", 1 << 40), (rf"at byte {at}, key 0's name: a string of 1099511627776 bytes runs "
                                              rf"past the end of the file \({len(raw)} bytes\)")
    if kind == "value type":
        return _set(raw, arch, "<I", 99), (rf"at byte {arch}, the value type of key 'general.architecture': expected "
                                           rf"one of 0-12 \(GGUF value types\), found 99")
    if kind == "array count":
        at = _after(raw, "tokenizer.ggml.tokens") + 8  # value type u32, element type u32, then the count
        return _set(raw, at, "<Q", 1 << 50), (rf"at byte {at}, the element count of key 'tokenizer.ggml.tokens': "
                                              rf"1125899906842624 elements of at least 8 bytes run past the end")
    if kind == "n_dims":
        return _set(raw, embd, "<I", 7), (rf"at byte {embd}, the dimension count of tensor 'token_embd.weight': "
                                          rf"expected 1 to 4, found 7")
    if kind == "tensor type":
        at = embd + 4 + 16
        return _set(raw, at, "<I", 250), (rf"at byte {at}, the type of tensor 'token_embd.weight': expected a ggml "
                                          rf"type this reader knows, found 250")
    if kind == "tensor offset":
        at = embd + 4 + 16 + 4
        return _set(raw, at, "<Q", 1 << 40), (rf"at byte {at}, the data offset of tensor 'token_embd.weight': its "
                                              rf"128 bytes at file bytes \d+ to \d+ run past the end of the file "
                                              rf"\({len(raw)} bytes\)")
    if kind == "truncated":
        return raw[:-20], (rf"the data offset of tensor 'output_norm.weight': its 32 bytes at file bytes \d+ to "
                           rf"{len(raw)} run past the end of the file \({len(raw) - 20} bytes\)")
    if kind == "cut in the keys":
        return raw[:arch + 2], (rf"at byte {arch}, the value type of key 'general.architecture': expected 4 bytes, "
                                rf"the file ends at byte {arch + 2}")
    raise AssertionError(kind)


KINDS = ["magic", "version", "key length", "value type", "array count", "n_dims", "tensor type", "tensor offset",
         "truncated", "cut in the keys"]


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_a_corrupt_gguf_is_refused_naming_the_file_the_offset_and_what_was_expected(tmp_path, kind):
    """Each corruption is refused as SourceError '<file>: not a readable GGUF file: at byte N, <field>: expected …'."""
    good = tmp_path / "good.gguf"
    bad, words = _corrupt(kind, _write(good))
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a readable GGUF file: ")
    assert __import__("re").search(words, msg), msg


def test_a_well_formed_gguf_passes_the_check(tmp_path):
    """The good file gets past the structure check to the model checks (a missing key is the next refusal)."""
    from kubeflash_node.store.ggufcheck import check

    path = tmp_path / "good.gguf"
    raw = _write(path)
    info = check(path)
    assert info.tensors == 2 and info.keys == 3 and info.data_end == len(raw)
    with pytest.raises(SourceError, match="metadata key 'llama.embedding_length' missing"):
        GGUFSource(path)
