"""A GGUF header is hostile until checked: counts, lengths and tensor sizes larger than
the file, and conversions larger than memory, are refused before anything is allocated."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from blockserve.engine.models import gguf_check
from blockserve.engine.models.demo import demo_spec, ensure_demo_model
from blockserve.engine.models.gguf import GGUFError, convert_gguf
from tests.test_gguf import write_gguf


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(n_tensors: int, kvs: bytes, n_kv: int, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data + b"\0" * 64)
    return path


@pytest.mark.parametrize("data, message", [
    # An array of 2^40 uint32s in a file of a hundred bytes.
    (_header(0, _string("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 4, 1 << 40),
             1), "claims 1099511627776 entries"),
    # 2^40 strings: each needs at least its 8-byte length.
    (_header(0, _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40), 1),
     "claims 1099511627776 entries"),
    # A key 2^60 bytes long.
    (_header(0, struct.pack("<Q", 1 << 60), 1), "the length of a metadata key claims"),
    # 2^50 metadata entries, 2^50 tensors.
    (_header(0, b"", 1 << 50), "the metadata count claims"),
    (_header(1 << 50, b"", 0), "the tensor count claims"),
    # A float32 tensor of 2^32 x 2^32 elements at offset 0.
    (_header(1, b"", 0, _string("token_embd.weight") + struct.pack("<IQQIQ", 2, 1 << 32,
                                                                     1 << 32, 0, 0)),
     "ends at byte .* past the end of the file"),
    # Five dimensions (GGML has four), and a type no one knows.
    (_header(1, b"", 0, _string("x") + struct.pack("<I", 5)), "has 5 dimensions"),
    (_header(1, b"", 0, _string("x") + struct.pack("<IQIQ", 1, 32, 999, 0)),
     "unknown type 999"),
])
def test_hostile_headers_are_refused_at_once(tmp_path, data, message):
    path = _write(tmp_path, data)
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=message):
        convert_gguf(path, tmp_path / "out")
    assert time.perf_counter() - start < 2  # no loop over the claimed entries
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "model.gguf"
    write_gguf(ensure_demo_model(demo_spec("tiny", "qwen3", seed=5)), path)
    return path


def test_the_header_walk_agrees_with_llama_cpps_reader(small_gguf):
    from gguf import GGUFReader

    summary = gguf_check.check_header(small_gguf)
    reader = GGUFReader(small_gguf)
    assert [t.name for t in summary.tensors] == [t.name for t in reader.tensors]
    assert [t.nbytes for t in summary.tensors] == [int(t.n_bytes) for t in reader.tensors]
    assert summary.n_metadata == len([k for k in reader.fields if not k.startswith("GGUF.")])


def test_a_conversion_larger_than_memory_is_refused(small_gguf, tmp_path, monkeypatch):
    need = gguf_check.check_header(small_gguf).float32_bytes
    monkeypatch.setattr(gguf_check, "available_memory", lambda: need // 2)
    with pytest.raises(GGUFError, match=r"needs about .* GiB of memory, and .* GiB is "
                                        "available"):
        convert_gguf(small_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(gguf_check, "available_memory", lambda: 64 * need)
    convert_gguf(small_gguf, tmp_path / "out")  # the same file, with room: converted
    assert (tmp_path / "out" / "model.safetensors").exists()
