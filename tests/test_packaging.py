"""blockserve installs under one name, and its load generator runs without MLX."""

import asyncio
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from blockserve.engine.runtime.worker import EngineWorker
from tests.server_harness import serve

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kvpool", "scheduler", "engine", "server", "bench")


def test_imports_as_blockserve_from_outside_the_source_tree(tmp_path):
    probe = f"""
import importlib, json
found = {{p: importlib.import_module("blockserve." + p).__file__ for p in {PARTS!r}}}
bare = []
for p in {PARTS!r}:
    try:
        importlib.import_module(p)
        bare.append(p)
    except ImportError:
        pass
print(json.dumps({{"found": found, "bare": bare}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout)
    assert result["bare"] == []  # no generic top-level packages
    for part, path in result["found"].items():
        assert Path(path) == ROOT / part / "__init__.py"


def test_the_wheel_holds_only_the_blockserve_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("blockserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"blockserve"}
    for part in PARTS:
        assert f"blockserve/{part}/__init__.py" in names
    assert "blockserve/kvpool/pool.py" in names and "blockserve/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "blockserve = blockserve.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


# Any import of mlx (or mlx_lm) fails in this process, as on a machine without MLX.
NO_MLX = """
import sys
class NoMLX:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm"):
            raise ImportError(f"no MLX here ({name})")
        return None
sys.meta_path.insert(0, NoMLX())
from blockserve.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("mlx", "mlx_lm") for m in sys.modules), "MLX loaded"
sys.exit(code)
"""


# The modules that must load without MLX: the engine's root and text side, the server,
# the scheduler and the pool (the server renders, tokenizes and parses with them).
MLX_FREE = ["blockserve.engine", "blockserve.engine.text.frontend",
            "blockserve.engine.text.chat", "blockserve.engine.text.output",
            "blockserve.engine.text.structured", "blockserve.engine.text.streaming",
            "blockserve.server.app", "blockserve.scheduler", "blockserve.kvpool"]


@pytest.mark.parametrize("module", MLX_FREE)
def test_the_text_side_and_the_server_import_no_mlx(module):
    probe = NO_MLX.split("from blockserve.cli")[0] + f"""
import importlib
importlib.import_module({module!r})
assert not any(m.split(".")[0] in ("mlx", "mlx_lm") for m in sys.modules), "MLX loaded"
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_mlx_block_catches_a_module_that_loads_mlx():
    probe = NO_MLX.split("from blockserve.cli")[0] + "import blockserve.engine.runtime\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode != 0 and "no MLX here" in out.stderr


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker("demo:tiny", block_size=16, max_running=4)
    yield w
    w.close()


async def test_blockserve_bench_runs_without_mlx(worker, tmp_path):
    async with serve(worker) as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NO_MLX, "bench", "--url", srv.url,  # model: /v1/models
            "--workload", "agent", "--sessions", "2", "--turns", "2", "--system-tokens", "40",
            "--output-tokens", "3", "--concurrency", "2", "--no-progress",
            "--out", str(tmp_path), "--name", "nomlx",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()
    result = json.loads((tmp_path / "nomlx.json").read_text())
    assert result["model"] == "demo:tiny"
    summary = result["runs"][0]["summary"]
    assert summary["requests"] == 4 and summary["errors"] == 0
    assert summary["distinct_prefix_tokens"] > 40  # prompts rendered by the server
    assert summary["cached_tokens"] > 0  # second turns hit the first turns' blocks
