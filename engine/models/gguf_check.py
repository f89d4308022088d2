"""A GGUF file's header checked against the file before anything is allocated for it.

A GGUF header is a list of counts and lengths (metadata entries, array lengths, string
lengths, tensor shapes and offsets). A reader that believes them can be made to loop
over or allocate billions of entries by a file of a few bytes. Here every count is
bounded by the bytes left in the file, every tensor must lie inside the file, and the
float32 conversion's size is compared with the memory and disk there are, so a file that
can't be served is refused with the reason before the conversion starts.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path


class GGUFError(ValueError):
    """The file can't be served: not a GGUF, truncated, or an unsupported kind."""


# GGUF value types: (struct format, size); 8 (string) and 9 (array) are variable-sized.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: none in practice, bounded to keep recursion shallow


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int
    n_elements: int
    nbytes: int  # stored (quantized) size in the file


@dataclass(frozen=True)
class HeaderSummary:
    version: int
    n_metadata: int
    tensors: list[TensorInfo]

    @property
    def float32_bytes(self) -> int:
        """The size of every tensor dequantized to float32: the converted model."""
        return 4 * sum(t.n_elements for t in self.tensors)

    @property
    def largest_float32_bytes(self) -> int:
        return 4 * max((t.n_elements for t in self.tensors), default=0)


class _Cursor:
    """Reads little-endian values from a mapped file, never past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> int | float | bool:
        size = struct.calcsize("<" + fmt)
        if size > self.left():
            raise GGUFError(f"{self.path}: the header ends early at byte {self.pos} of "
                            f"{len(self.buf)}; is the file complete?")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A uint64 count, refused unless that many items can fit in the bytes left."""
        n = int(self.take("Q"))
        if n * min_item_bytes > self.left():
            raise GGUFError(f"{self.path}: {what} claims {n} entries, more than the "
                            f"{self.left()} bytes left in the file can hold; is the file "
                            "complete?")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> object:
        """Step over one metadata value; scalars and short strings are returned."""
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth < _MAX_NESTING:
            etype = int(self.take("I"))
            if etype in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[etype])
                n = self.count(what, size)
                self.pos += n * size  # fixed-size items: nothing to read one by one
            elif etype in (_STRING, _ARRAY):
                n = self.count(what, 8 if etype == _STRING else 12)
                for _ in range(n):
                    self.skip_value(etype, what, depth + 1)
            else:
                raise GGUFError(f"{self.path}: {what} has unknown item type {etype}")
            return None
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


def check_header(path: Path) -> HeaderSummary:
    """Walk the header of ``path`` with every count bounded by the file's size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    if size < 24:
        raise GGUFError(f"{path}: {size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        c.pos = 4
        version = int(c.take("I"))
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise GGUFError(f"{path}: GGUF version {version}{hint} is not supported (2 "
                            "and 3 are)")
        # The smallest tensor entry is 8 (name length) + 4 + 8 + 4 + 8 bytes; the
        # smallest metadata entry 8 (key length) + 4 + 1.
        n_tensors = c.count("the tensor count", 32)
        n_kv = c.count("the metadata count", 13)
        alignment = 32
        for _ in range(n_kv):
            key = c.string("a metadata key")
            value = c.skip_value(int(c.take("I")), f"metadata {key!r}")
            if key == "general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1):
                    raise GGUFError(f"{path}: general.alignment {value!r} is not a "
                                    "power of two")
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            n_dims = int(c.take("I"))
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            dims = [int(c.take("Q")) for _ in range(n_dims)]
            qtype, offset = int(c.take("I")), int(c.take("Q"))
            infos.append((name, dims, qtype, offset))
        data_start = -(-c.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name!r} has unknown type {qtype}") from None
        n = 1
        for d in dims:
            n *= d
        if n == 0 or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} has shape {dims}, not whole blocks "
                            f"of {block}")
        nbytes = n // block * type_size
        end = data_start + offset + nbytes
        if end > size:
            raise GGUFError(f"{path}: tensor {name!r} ends at byte {end}, past the end of "
                            f"the file ({size} bytes); is the file complete?")
        tensors.append(TensorInfo(name, qtype, n, nbytes))
    return HeaderSummary(version, n_kv, tensors)


def available_memory() -> int:
    """Bytes of memory this process can still use: MemAvailable, capped by a cgroup."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:  # macOS: physical memory (unified memory, no MemAvailable)
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit is lower than the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_fits(summary: HeaderSummary, path: Path, out_dir: Path) -> None:
    """Refuse a file whose float32 conversion would not fit in memory or on disk."""
    # The conversion holds every float32 weight at once, plus one tensor's numpy
    # dequantization, its reshaped copy and its MLX copy (measured: 2.9 GB peak for
    # Gemma 3 270M's 1.0 GB); serving needs the float32 weights again.
    need = summary.float32_bytes + 3 * summary.largest_float32_bytes
    have = available_memory()
    gib = 1 << 30
    if need > have:
        raise GGUFError(f"{path}: converting it to float32 needs about {need / gib:.1f} GiB "
                        f"of memory, and {have / gib:.1f} GiB is available; use a smaller "
                        "model (the CPU backend serves float32 weights)")
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if summary.float32_bytes > free:
        raise GGUFError(f"{path}: the float32 conversion needs "
                        f"{summary.float32_bytes / gib:.1f} GiB of disk in {probe}, and "
                        f"{free / gib:.1f} GiB is free")
